"""GatedSSM, the whole model (float64): config and presets, the parameter tree,
exact counts, step = full forward at every prefix, chunks = one call, the two
scan modes (the legacy mode's length dependence pinned), Edifice's forward
reproduced, Numba engine, dropout, bad input.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refssm.models import gated_ssm as G
from refssm.models._common import count_params, tree_shapes
from refssm.verify.metrics import BUDGETS, normwise_error

STEP = BUDGETS["step_vs_full"]
SCAN = BUDGETS["scan"]
PRESETS = tuple(G.PRESETS)


def small(preset="causal", **kw):
    opts = dict(embed_dim=5, hidden_size=24, state_size=4, expand_factor=2, conv_size=4,
                num_layers=3, preset=preset)
    opts.update(kw)
    return G.GatedSSMConfig(**opts)


def model_of(c, seed=11):
    return G.GatedSSMModel(c, G.random_params(c, seed=seed))


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
def test_original_api_defaults():
    c = G.GatedSSMConfig(embed_dim=287)
    assert (c.hidden_size, c.state_size, c.expand_factor, c.conv_size, c.num_layers,
            c.dropout, c.window_size, c.seq_len, c.checkpoint_every) == (256, 16, 2, 4, 2, 0.0,
                                                                         60, 60, 1)
    assert c.preset == "causal" and c.scan_mode == "causal" and c.alpha == 0.9
    assert c.inner_size == 512 and c.dt_rank_size == 256 // 16
    assert G.GatedSSMConfig(embed_dim=1, hidden_size=40, state_size=16).dt_rank_size == 2
    rd = G.recommended_defaults()
    assert rd == dict(hidden_size=256, state_size=16, expand_factor=2, conv_size=4,
                      num_layers=2, window_size=60, dropout=0.1)
    assert G.GatedSSMConfig(embed_dim=3, **rd).window_size == 60
    assert G.output_size() == 256 and G.output_size(hidden_size=40) == 40
    assert G.output_size(small()) == 24


def test_presets_and_flag():
    assert G.GatedSSMConfig(embed_dim=4).scan_mode == "causal"
    assert G.GatedSSMConfig(embed_dim=4, preset="edifice").scan_mode == "legacy"
    assert G.GatedSSMConfig(embed_dim=4, scan_mode="legacy").preset == "causal"   # flag alone
    assert G.GatedSSMConfig(embed_dim=4, preset="edifice", scan_mode="causal").scan_mode == "causal"
    assert set(G.FLAGS) == {"scan_mode"}
    c = small().replace(preset="edifice")
    assert c.scan_mode == "legacy" and c.replace(alpha=0.5).alpha == 0.5
    assert G.as_config(c.to_dict()) == c


def test_tree_names_and_layouts():
    """Edifice's layer names; Axon layouts; every dense layer with its bias."""
    c = G.GatedSSMConfig(embed_dim=7, hidden_size=16, state_size=4, num_layers=2, conv_size=3)
    shapes = G.param_shapes(c)
    E, R = 32, 4
    assert shapes["input_projection"] == {"kernel": (7, 16), "bias": (16,)}
    assert shapes["mamba_block_2_norm"] == {"gamma": (16,), "beta": (16,)}
    assert shapes["mamba_block_2_in_proj"] == {"kernel": (16, 2 * E), "bias": (2 * E,)}
    assert shapes["mamba_block_2_conv_proj"] == {"kernel": (E, E), "bias": (E,)}
    assert shapes["mamba_block_2_ssm_bc_proj"] == {"kernel": (E, 8), "bias": (8,)}
    assert shapes["mamba_block_2_ssm_dt_rank"] == {"kernel": (E, R), "bias": (R,)}
    assert shapes["mamba_block_2_ssm_dt_proj"] == {"kernel": (R, E), "bias": (E,)}
    assert shapes["mamba_block_2_out_proj"] == {"kernel": (E, 16), "bias": (16,)}
    assert len(shapes) == 1 + 2 * 7                          # no final norm
    assert "input_projection" not in G.param_shapes(c.replace(embed_dim=16))
    model = G.build(c, seed=3)
    assert tree_shapes(model.params) == shapes


def test_axon_initialisation_and_reproducibility():
    c = G.GatedSSMConfig(embed_dim=7, hidden_size=16, state_size=4)
    p = G.build(c, seed=3).params
    assert np.all(p["mamba_block_1_norm"]["gamma"] == 1) and np.all(p["mamba_block_1_norm"]["beta"] == 0)
    for layer, names in p.items():
        if "bias" in names:
            assert np.all(names["bias"] == 0), layer
    k = p["mamba_block_1_conv_proj"]["kernel"]                 # glorot: U(+-sqrt(6/(in+out)))
    assert np.max(np.abs(k)) <= math.sqrt(6 / 64) and np.std(k) > 0.5 * math.sqrt(2 / 64)
    q = G.build(c, seed=3).params
    assert all(np.array_equal(p[l][n], q[l][n]) for l in p for n in p[l])
    assert not np.array_equal(G.build(c, seed=4).params["mamba_block_1_in_proj"]["kernel"],
                              p["mamba_block_1_in_proj"]["kernel"])


# --------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------
configs = st.builds(
    dict, embed_dim=st.integers(1, 40), state_size=st.integers(1, 8),
    extra_hidden=st.integers(0, 32), expand_factor=st.integers(1, 3),
    conv_size=st.integers(1, 5), num_layers=st.integers(1, 3),
    preset=st.sampled_from(PRESETS), scan_mode=st.sampled_from(["causal", "legacy"]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opts=configs, seed=st.integers(0, 2 ** 32 - 1))
def test_param_count_equals_counted_tree(opts, seed):
    opts = dict(opts)
    opts["hidden_size"] = opts["state_size"] + opts.pop("extra_hidden")   # dt_rank >= 1
    c = G.GatedSSMConfig(**opts)
    model = G.build(c, seed=seed)
    assert G.param_count(c) == count_params(model.params) == model.param_count_tree()
    assert count_params(G.random_params(c, seed=seed)) == G.param_count(c)
    assert sum(G.param_count_breakdown(c).values()) == G.param_count(c)


def test_param_count_known_value_and_original_gap():
    """Defaults, embed 287: the exact count, Edifice's formula, and what it leaves out."""
    c = G.GatedSSMConfig(embed_dim=287)
    H, E, N, R = 256, 512, 16, 16
    per_layer = (2 * H + (2 * H * E + 2 * E) + (E * E + E) + (2 * E * N + 2 * N)
                 + (E * R + R) + (R * E + E) + (E * H + H))
    assert G.param_count(c) == (287 * H + H) + 2 * per_layer
    original = 287 * H + 2 * (2 * H * E + 4 * E + 2 * E * N + E * R + R * E + E * H)
    assert G.original_param_count(c) == original
    gap = G.param_count(c) - G.original_param_count(c)
    biases_norms = H + 2 * (2 * H + 2 * E + E + 2 * N + R + E + H)
    conv = 2 * (E * E - 4 * E)                                # dense E x E, not "4 taps"
    assert gap == biases_norms + conv
    assert G.original_param_count(c) == G.original_param_count(c.replace(preset="edifice"))


# --------------------------------------------------------------------------
# Step = full forward at every prefix; chunks = one call
# --------------------------------------------------------------------------
def _step_all(model, x, cache=None):
    cache = model.init_cache(x.shape[0]) if cache is None else cache
    ys = []
    for t in range(x.shape[1]):
        y, cache = model.step(cache, x[:, t])
        ys.append(y)
    return np.stack(ys, axis=1), cache


def _check_gates_unsaturated(model, x):
    """Teeth: both gates of every layer away from 0, 1/2 and 1 on these inputs."""
    c, p = model.config, model.params
    h = G._dense(p["input_projection"], x) if "input_projection" in p else x
    for i in range(1, c.num_layers + 1):
        out, _, _, saved = G.mamba_block_forward(p, h, c, i)
        assert 0.55 < saved.g.min() and saved.g.max() < 0.95, (saved.g.min(), saved.g.max())
        assert saved.g.max() - saved.g.min() > 0.01                       # moves over frames
        assert 0.02 < saved.s.min() and saved.s.max() < 0.98 and np.ptp(saved.s) > 0.2
        h = h + out


@pytest.mark.parametrize("seq_len,embed_dim,num_layers", [
    (1, 5, 3),        # a single frame
    (2, 24, 3),       # shorter than the window of the mean, no input projection
    (3, 5, 1),
    (60, 5, 3),       # the context carries (alpha^t over ~10 frames) far beyond the window
])
def test_step_equals_full_forward_at_every_prefix(seq_len, embed_dim, num_layers):
    c = small(embed_dim=embed_dim, num_layers=num_layers)
    model = model_of(c)
    x = np.random.default_rng(12).standard_normal((2, seq_len, embed_dim))
    if seq_len > 10:
        _check_gates_unsaturated(model, x)
    full = model.forward(x, return_sequence=True)
    stepped, cache = _step_all(model, x)
    err = normwise_error(stepped, full.output)
    assert err <= STEP, f"step vs full: {err:.3e}"
    assert normwise_error(model(x), full.output[:, -1]) == 0.0
    assert normwise_error(cache.context, full.state.context) <= STEP
    assert normwise_error(cache.conv, full.state.conv) <= STEP


def test_step_equals_full_with_the_built_model_and_other_alpha():
    for c in (small(), small(alpha=0.5, conv_size=1), small(alpha=1.0), small(alpha=0.0)):
        model = G.build(c, seed=5)
        x = np.random.default_rng(6).standard_normal((3, 25, 5))
        stepped, _ = _step_all(model, x)
        assert normwise_error(stepped, model(x, return_sequence=True)) <= STEP


def test_output_at_t_unchanged_by_future_input_causal_mode():
    model = model_of(small())
    x = np.random.default_rng(7).standard_normal((2, 20, 5))
    y = model(x, return_sequence=True)
    x2 = x.copy(); x2[:, 12:] = 10 * np.random.default_rng(8).standard_normal((2, 8, 5))
    y2 = model(x2, return_sequence=True)
    assert np.array_equal(y2[:, :12], y[:, :12])
    assert normwise_error(y2[:, 12:], y[:, 12:]) > 1e-2


def test_state_carries_beyond_the_window():
    """Teeth: frames 0..4 are still felt at t = 40 (conv window 4): through the context."""
    model = model_of(small())
    x = np.random.default_rng(2).standard_normal((1, 41, 5))
    x2 = x.copy(); x2[:, :5] += 1.0
    assert normwise_error(model(x2), model(x)) > 1e-5


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 36), max_size=5, unique=True))
def test_chunked_forward_equals_one_call(cuts):
    c = small()
    params = G.random_params(c, seed=21)
    x = np.random.default_rng(22).standard_normal((2, 37, 5))
    full = G.forward(params, x, c, return_sequence=True)
    bounds = [0, *sorted(cuts), 37]
    state, parts = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = G.forward(params, x[:, a:b], c, state=state, return_sequence=True)
        parts.append(out.output)
        state = out.state
    assert normwise_error(np.concatenate(parts, 1), full.output) <= SCAN
    assert normwise_error(state.context, full.state.context) <= SCAN


def test_forward_then_step_continues():
    model = model_of(small())
    x = np.random.default_rng(23).standard_normal((2, 30, 5))
    full = model(x, return_sequence=True)
    head = model.forward(x[:, :17])
    stepped, _ = _step_all(model, x[:, 17:], head.state)
    assert normwise_error(stepped, full[:, 17:]) <= STEP


@pytest.mark.parametrize("preset", PRESETS)
def test_numba_engine_equals_numpy_on_the_model(preset):
    model = model_of(small(preset, hidden_size=40, expand_factor=2))       # inner 80 > 64
    x = np.random.default_rng(24).standard_normal((2, 33, 5))
    a = model.forward(x, return_sequence=True)
    b = model.forward(x, return_sequence=True, engine="numba")
    assert normwise_error(b.output, a.output) <= SCAN
    if preset == "causal":
        assert normwise_error(b.state.context, a.state.context) <= SCAN


# --------------------------------------------------------------------------
# The two scan modes
# --------------------------------------------------------------------------
def test_legacy_and_causal_differ():
    c = small()
    model = model_of(c)
    legacy = G.GatedSSMModel(c.replace(scan_mode="legacy"), model.params)
    x = np.random.default_rng(30).standard_normal((2, 30, 5))
    assert normwise_error(legacy(x, return_sequence=True), model(x, return_sequence=True)) > 1e-2


@pytest.mark.parametrize("t", [0, 9, 19])
def test_legacy_output_at_t_changes_when_the_sequence_is_extended(t):
    """The documented fact: in legacy mode the output at a fixed t depends on the length."""
    c = small("edifice")
    legacy = model_of(c)
    causal = G.GatedSSMModel(c.replace(scan_mode="causal"), legacy.params)
    x = np.random.default_rng(31).standard_normal((2, 40, 5))
    for L in (t + 1, t + 2, 40):
        if L <= t + 1:
            continue
        short = legacy(x[:, :t + 1])                     # the sequence ends at t
        longer = legacy(x[:, :L], return_sequence=True)[:, t]
        assert normwise_error(longer, short) > 1e-5, (t, L)           # not round-off: ~1e-3
        assert normwise_error(causal(x[:, :L], return_sequence=True)[:, t],
                              causal(x[:, :t + 1])) <= 1e-15


def test_legacy_refuses_to_step_and_says_why():
    c = small("edifice")
    model = model_of(c)
    why = r"cannot be stepped: its context weights .* normalised over the whole sequence length"
    with pytest.raises(ValueError, match=why):
        model.init_cache()
    with pytest.raises(ValueError, match=why):
        G.init_cache(c, batch_size=2)
    causal_cache = G.init_cache(c.replace(scan_mode="causal"), 1)
    with pytest.raises(ValueError, match=why):
        model.step(causal_cache, np.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"state: GatedSSM scan_mode 'legacy' has no carried state"):
        model.forward(np.zeros((1, 3, 5)), state=causal_cache)
    assert model.forward(np.zeros((1, 3, 5))).state is None


# --------------------------------------------------------------------------
# Edifice's forward, transcribed independently
# --------------------------------------------------------------------------
def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def edifice_gated_ssm(params, x, cfg, *, context="legacy"):
    """Edifice's ``GatedSSM.build`` forward (``lib/edifice/ssm/gated_ssm.ex``) in plain NumPy,
    the whole sequence ``[batch, seq_len, hidden]``. ``context``: "legacy" is Edifice's
    ``cumulative_ema`` (``x * weights``); "recurrence" the causal EMA of DESIGN.md 1.2."""
    def dense(v, layer):
        return np.einsum("...i,io->...o", v, layer["kernel"]) + layer["bias"]

    def layer_norm(v, layer):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * layer["gamma"] + layer["beta"]

    E, N, K, alpha = cfg.inner_size, cfg.state_size, cfg.conv_size, 0.9
    h = dense(x, params["input_projection"]) if "input_projection" in params else x
    L = x.shape[1]
    for i in range(1, cfg.num_layers + 1):
        name = f"mamba_block_{i}"
        xz = dense(layer_norm(h, params[f"{name}_norm"]), params[f"{name}_in_proj"])
        xb, zb = xz[..., :E], xz[..., E:]
        padded = np.concatenate([np.zeros((x.shape[0], K - 1, E)), xb], axis=1)
        win = np.stack([padded[:, t:t + K].sum(1) / K for t in range(L)], axis=1)   # window_mean
        xc = dense(win, params[f"{name}_conv_proj"])
        xa = xc * _sig(xc)                                                # silu
        bc = dense(xa, params[f"{name}_ssm_bc_proj"])
        b, c = bc[..., :N], bc[..., N:]
        dt = dense(dense(xa, params[f"{name}_ssm_dt_rank"]), params[f"{name}_ssm_dt_proj"])
        dt = np.log1p(np.exp(-np.abs(dt))) + np.maximum(dt, 0)            # softplus
        gate = _sig(dt.mean(-1, keepdims=True))
        bc_gate = _sig((b * c).sum(-1, keepdims=True))
        gated_x = gate * bc_gate * xa
        if context == "legacy":
            w = alpha ** (L - 1 - np.arange(L))
            ctx = gated_x * (w / w.sum())[None, :, None]
        else:
            ctx = np.zeros_like(gated_x)
            prev = np.zeros_like(gated_x[:, 0])
            for t in range(L):
                prev = alpha * prev + (1 - alpha) * gated_x[:, t]
                ctx[:, t] = prev
        y = gated_x + (1 - gate) * ctx
        h = h + dense(y * (zb * _sig(zb)), params[f"{name}_out_proj"])   # residual
    return h


@pytest.mark.parametrize("preset,context", [("edifice", "legacy"), ("causal", "recurrence")])
def test_presets_equal_the_transcription(preset, context):
    c = small(preset)
    model = model_of(c, seed=101)
    x = np.random.default_rng(102).standard_normal((2, 30, 5))
    _check_gates_unsaturated(model, x)
    ours = model(x, return_sequence=True)
    err = normwise_error(ours, edifice_gated_ssm(model.params, x, c, context=context))
    assert err <= STEP, err
    other = "recurrence" if context == "legacy" else "legacy"             # teeth
    assert normwise_error(ours, edifice_gated_ssm(model.params, x, c, context=other)) > 1e-2


# --------------------------------------------------------------------------
# Dropout, hidden states, checkpointed build
# --------------------------------------------------------------------------
def test_dropout_only_when_training_with_seed():
    c = small(dropout=0.3)
    model = model_of(c)
    x = np.random.default_rng(40).standard_normal((2, 8, 5))
    base = model(x, return_sequence=True)
    assert np.array_equal(model(x, return_sequence=True, training=False), base)
    a = model(x, return_sequence=True, training=True, seed=1)
    assert np.array_equal(a, model(x, return_sequence=True, training=True, seed=1))
    assert normwise_error(a, base) > 1e-2
    with pytest.raises(ValueError, match="needs seed"):
        model(x, training=True)


def test_hidden_states_are_the_residual_stream():
    c = small()
    model = model_of(c)
    x = np.random.default_rng(41).standard_normal((2, 9, 5))
    out = model.forward(x, return_sequence=True)
    hs = out.hidden_states
    assert len(hs) == c.num_layers + 1 and np.array_equal(hs[-1], out.output)
    for i in range(1, c.num_layers + 1):
        block, _, _, _ = G.mamba_block_forward(model.params, hs[i - 1], c, i)
        assert np.array_equal(hs[i], hs[i - 1] + block)


def test_build_checkpointed_is_the_same_graph():
    c = small(checkpoint_every=2)
    a = G.build_checkpointed(c, seed=9)
    b = G.build(c, seed=9)
    assert a.checkpoint_every == 2 and b.checkpoint_every is None
    x = np.random.default_rng(42).standard_normal((1, 7, 5))
    assert np.array_equal(a(x), b(x))


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
def test_bad_config_values():
    with pytest.raises(ValueError, match=r"embed_dim: required"):
        G.GatedSSMConfig()
    with pytest.raises(ValueError, match=r"hidden_size: expected an integer >= 1, got 0"):
        G.GatedSSMConfig(embed_dim=3, hidden_size=0)
    with pytest.raises(ValueError, match=r"dt_rank = hidden_size div state_size: expected >= 1, "
                                         r"got 8 div 16 = 0"):
        G.GatedSSMConfig(embed_dim=3, hidden_size=8)
    with pytest.raises(ValueError, match=r"alpha: expected a finite number in \[0.0, 1.0\], got 1.2"):
        G.GatedSSMConfig(embed_dim=3, alpha=1.2)
    with pytest.raises(ValueError, match=r"scan_mode: expected one of \('causal', 'legacy'\), got 'ema'"):
        G.GatedSSMConfig(embed_dim=3, scan_mode="ema")
    with pytest.raises(ValueError, match=r"preset: expected one of \('causal', 'edifice'\)"):
        G.GatedSSMConfig(embed_dim=3, preset="mamba_ssm")
    with pytest.raises(ValueError, match=r"unknown GatedSSM option\(s\) \['num_heads'\]"):
        G.GatedSSMConfig(embed_dim=3, num_heads=2)
    with pytest.raises(ValueError, match=r"dropout: expected a finite number in \[0.0, 1.0\)"):
        G.GatedSSMConfig(embed_dim=3, dropout=1.0)


def test_bad_inputs_to_forward_and_step():
    c = small()
    model = model_of(c)
    with pytest.raises(ValueError, match=r"x: expected last axis embed_dim=5 .* got shape \(2, 3, 4\)"):
        model(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"x: expected 3 dimensions, got shape \(3, 5\)"):
        model(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"x: expected a floating-point array"):
        model(np.zeros((1, 3, 5), dtype=int))
    with pytest.raises(ValueError, match=r"frame: expected 2 dimensions, got shape \(2, 1, 5\)"):
        model.step(model.init_cache(2), np.zeros((2, 1, 5)))
    with pytest.raises(ValueError, match=r"frame: expected shape \(batch, 5\) \[batch, embed_dim\], "
                                         r"got \(2, 4\)"):
        model.step(model.init_cache(2), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"cache.context: expected shape \(3, 3, 48\)"):
        model.step(model.init_cache(2), np.zeros((3, 5)))
    other = G.init_cache(small(hidden_size=16), 2)
    with pytest.raises(ValueError, match=r"cache.context: expected shape \(2, 3, 48\)"):
        model.step(other, np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"engine: expected one of \('numpy', 'numba'\)"):
        model(np.zeros((1, 3, 5)), engine="logdepth")


def test_params_not_matching_config():
    c = small()
    p = G.random_params(c, seed=0)
    wrong = G.random_params(small(state_size=3), seed=0)
    with pytest.raises(ValueError, match=r"mamba_block_1_ssm_bc_proj'\]\['kernel'\]: expected "
                                         r"shape \(48, 8\), got \(48, 6\)"):
        G.forward(wrong, np.zeros((1, 2, 5)), c)
    del p["mamba_block_3_out_proj"]
    with pytest.raises(ValueError, match=r"missing \['mamba_block_3_out_proj'\]"):
        G.forward(p, np.zeros((1, 2, 5)), c)
