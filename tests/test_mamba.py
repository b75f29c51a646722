"""Mamba, the whole model (float64): config and presets, the parameter tree,
exact counts, step = full forward at every prefix, chunked = one call,
dropout, bad input.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refssm.models import mamba as M
from refssm.models._common import count_params, tree_shapes
from refssm.ops.activations import softplus_forward
from refssm.verify.metrics import BUDGETS, normwise_error

STEP = BUDGETS["step_vs_full"]
SCAN = BUDGETS["scan"]
PRESETS = ("mamba_ssm", "edifice")


def small(preset="mamba_ssm", **kw):
    opts = dict(embed_dim=5, hidden_size=24, state_size=4, expand_factor=2, conv_size=4,
                num_layers=3, preset=preset)
    opts.update(kw)
    return M.MambaConfig(**opts)


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
def test_original_api_defaults():
    c = M.MambaConfig(embed_dim=287)
    assert (c.hidden_size, c.state_size, c.expand_factor, c.conv_size, c.num_layers,
            c.dropout, c.window_size, c.seq_len) == (256, 16, 2, 4, 2, 0.0, 60, 60)
    assert c.preset == "mamba_ssm" and c.inner_size == 512 and c.dt_rank_size == 16
    assert M.MambaConfig(embed_dim=1, window_size=30).seq_len == 30     # seq_len follows window
    assert M.MambaConfig(embed_dim=1, window_size=30, seq_len=7).seq_len == 7
    rd = M.recommended_defaults()
    assert rd["window_size"] == 60 and rd["dropout"] == 0.1
    assert M.MambaConfig(embed_dim=3, **rd).window_size == 60
    assert M.output_size() == 256 and M.output_size(hidden_size=40) == 40
    assert M.output_size(small()) == 24


def test_preset_table():
    """DESIGN.md 1.1's table, flag by flag."""
    ms, ed = M.MambaConfig(embed_dim=4), M.MambaConfig(embed_dim=4, preset="edifice")
    table = {  # flag: (mamba_ssm, edifice)
        "norm": ("rms", "layer"), "final_norm": (True, False), "a_param": ("learned", "fixed"),
        "d_skip": (True, False), "x_proj": ("fused", "split"), "dt_rank": ("ceil", "floor"),
        "delta_clip": (None, (0.001, 0.1)), "b_bar": ("per_channel", "channel_mean"),
        "proj_bias": (False, True), "conv_bias": (True, True), "init": ("official", "glorot"),
    }
    assert set(table) == set(M.FLAGS)
    for flag, (a, b) in table.items():
        assert getattr(ms, flag) == a and getattr(ed, flag) == b, flag
    assert ms.norm_eps == ed.norm_eps == 1e-5


@pytest.mark.parametrize("flag", sorted(M.FLAGS))
def test_each_flag_settable_alone(flag):
    """Setting one flag to the other preset's value changes that flag and nothing else."""
    base = M.MambaConfig(embed_dim=4)
    other = M.PRESETS["edifice"][flag]
    c = M.MambaConfig(embed_dim=4, **{flag: other})
    diff = {k for k in M.FLAGS if getattr(c, k) != getattr(base, k)}
    assert diff == ({flag} if other != M.PRESETS["mamba_ssm"][flag] else set())
    assert c.preset == "mamba_ssm"
    e = M.MambaConfig(embed_dim=4, preset="edifice", **{flag: M.PRESETS["mamba_ssm"][flag]})
    assert getattr(e, flag) == M.PRESETS["mamba_ssm"][flag]


def test_dt_rank_rules():
    for h, ceil_, floor_ in [(8, 1, 1), (16, 1, 1), (24, 2, 1), (40, 3, 2), (256, 16, 16)]:
        assert M.MambaConfig(embed_dim=1, hidden_size=h).dt_rank_size == ceil_
        assert M.MambaConfig(embed_dim=1, hidden_size=h, preset="edifice").dt_rank_size == floor_
    assert M.MambaConfig(embed_dim=1, dt_rank=5).dt_rank_size == 5


def test_config_replace_and_as_config():
    c = small()
    assert c.replace(num_layers=1).num_layers == 1
    e = c.replace(preset="edifice")
    assert e.norm == "layer" and e.hidden_size == 24
    assert M.as_config(c.to_dict()) == c
    assert M.as_config(c) is c


# --------------------------------------------------------------------------
# Parameter tree: names, Axon layouts, initialisation
# --------------------------------------------------------------------------
def test_tree_names_and_layouts_mamba_ssm():
    c = small(embed_dim=5, num_layers=2)
    p = M.build(c, seed=0).params
    H, E, N, K, R = 24, 48, 4, 4, 2
    expected = {
        "input_projection": {"kernel": (5, H), "bias": (H,)},
        "final_norm": {"gamma": (H,)},
    }
    for i in (1, 2):
        b = f"mamba_block_{i}"
        expected.update({
            f"{b}_norm": {"gamma": (H,)},
            f"{b}_in_proj": {"kernel": (H, 2 * E)},
            f"{b}_conv_dw_conv": {"kernel": (K, 1, E), "bias": (E,)},
            f"{b}_ssm_x_proj": {"kernel": (E, R + 2 * N)},
            f"{b}_ssm_dt_proj": {"kernel": (R, E), "bias": (E,)},
            f"{b}_ssm": {"A_log": (E, N), "D": (E,)},
            f"{b}_out_proj": {"kernel": (E, H)},
        })
    assert tree_shapes(p) == expected
    assert tree_shapes(p) == M.param_shapes(c)


def test_tree_names_and_layouts_edifice():
    c = small(preset="edifice", embed_dim=24, num_layers=1)        # embed == hidden: no projection
    p = M.build(c, seed=0).params
    H, E, N, K, R = 24, 48, 4, 4, 1
    b = "mamba_block_1"
    assert tree_shapes(p) == {
        f"{b}_norm": {"gamma": (H,), "beta": (H,)},
        f"{b}_in_proj": {"kernel": (H, 2 * E), "bias": (2 * E,)},
        f"{b}_conv_dw_conv": {"kernel": (K, 1, E), "bias": (E,)},
        f"{b}_ssm_bc_proj": {"kernel": (E, 2 * N), "bias": (2 * N,)},
        f"{b}_ssm_dt_rank": {"kernel": (E, R), "bias": (R,)},
        f"{b}_ssm_dt_proj": {"kernel": (R, E), "bias": (E,)},
        f"{b}_out_proj": {"kernel": (E, H), "bias": (H,)},
    }


def test_official_initialisation():
    """mamba_simple.py: A_log = log(1..N), D = 1, softplus(dt bias) in [dt_min, dt_max], torch bounds."""
    c = M.MambaConfig(embed_dim=64, hidden_size=64, state_size=8, num_layers=1)
    p = M.build(c, seed=3).params
    E, N, R = 128, 8, 4
    np.testing.assert_array_equal(p["mamba_block_1_ssm"]["A_log"], np.log(np.tile(np.arange(1.0, N + 1), (E, 1))))
    np.testing.assert_array_equal(p["mamba_block_1_ssm"]["D"], np.ones(E))
    dt = softplus_forward(p["mamba_block_1_ssm_dt_proj"]["bias"])[0]
    assert dt.min() >= 1e-3 * (1 - 1e-12) and dt.max() <= 0.1 * (1 + 1e-12)
    assert np.log(dt).std() > 0.5                                 # log-uniform, not constant
    w = p["mamba_block_1_ssm_dt_proj"]["kernel"]
    assert np.abs(w).max() <= R ** -0.5 and np.abs(w).max() > 0.8 * R ** -0.5
    k = p["mamba_block_1_in_proj"]["kernel"]                      # nn.Linear: U(+-1/sqrt(in))
    assert np.abs(k).max() <= 1 / 8 and np.abs(k).max() > 0.95 / 8
    conv = p["mamba_block_1_conv_dw_conv"]                        # nn.Conv1d: U(+-1/sqrt(K))
    assert np.abs(conv["kernel"]).max() <= 0.5 and np.abs(conv["bias"]).max() <= 0.5
    np.testing.assert_array_equal(p["mamba_block_1_norm"]["gamma"], np.ones(64))


def test_glorot_initialisation():
    """Axon's defaults: glorot-uniform kernels (Axon's fans), zero biases, LayerNorm 1/0."""
    c = M.MambaConfig(embed_dim=64, hidden_size=64, state_size=8, num_layers=1, preset="edifice")
    p = M.build(c, seed=4).params
    for layer, names in p.items():
        for name, a in names.items():
            if name in ("bias", "beta"):
                np.testing.assert_array_equal(a, 0.0)
            elif name == "gamma":
                np.testing.assert_array_equal(a, 1.0)
    k = p["mamba_block_1_in_proj"]["kernel"]
    lim = math.sqrt(6 / (64 + 256))
    assert np.abs(k).max() <= lim and np.abs(k).max() > 0.95 * lim
    ck = p["mamba_block_1_conv_dw_conv"]["kernel"]                # [K, 1, C]: fan_in K, fan_out K C
    lim = math.sqrt(6 / (4 * (1 + 128)))
    assert np.abs(ck).max() <= lim and np.abs(ck).max() > 0.9 * lim


def test_build_is_reproducible():
    a, b = M.build(small(), seed=7), M.build(small(), seed=7)
    for layer in a.params:
        for name in a.params[layer]:
            np.testing.assert_array_equal(a.params[layer][name], b.params[layer][name])


# --------------------------------------------------------------------------
# Exact parameter count
# --------------------------------------------------------------------------
configs = st.builds(
    dict,
    embed_dim=st.integers(1, 40), hidden_size=st.integers(1, 40), state_size=st.integers(1, 8),
    expand_factor=st.integers(1, 3), conv_size=st.integers(1, 5), num_layers=st.integers(1, 3),
    preset=st.sampled_from(PRESETS),
)
flag_overrides = st.fixed_dictionaries({}, optional={
    flag: st.sampled_from([M.PRESETS["mamba_ssm"][flag], M.PRESETS["edifice"][flag]])
    for flag in M.FLAGS})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opts=configs, flags=flag_overrides, seed=st.integers(0, 2 ** 32 - 1))
def test_param_count_equals_counted_tree(opts, flags, seed):
    c = M.MambaConfig(**opts, **flags)
    model = M.build(c, seed=seed)
    assert M.param_count(c) == count_params(model.params) == model.param_count_tree()
    assert sum(M.param_count_breakdown(c).values()) == M.param_count(c)


def test_param_count_known_value_and_original_gap():
    """Defaults, embed 287: the exact count, and what the original formula leaves out."""
    c = M.MambaConfig(embed_dim=287)
    H, E, N, K, R = 256, 512, 16, 4, 16
    per_layer = H + H * 2 * E + (K * E + E) + E * (R + 2 * N) + (R * E + E) + E * N + E + E * H
    assert M.param_count(c) == 287 * H + H + 2 * per_layer + H
    assert M.original_param_count(c) == 287 * H + 2 * (2 * H * E + K * E + 2 * E * N + 2 * E * R + E * H)
    e = M.MambaConfig(embed_dim=287, preset="edifice")
    gap = M.param_count(e) - M.original_param_count(e)
    biases = H + 2 * (2 * E + E + 2 * N + R + E + H) + 2 * 2 * H   # input proj, block biases, LayerNorms
    assert gap == biases


# --------------------------------------------------------------------------
# Step = full forward at every prefix; chunked = one call
# --------------------------------------------------------------------------
def _check_unsaturated(params, x, c):
    """Delta stays inside Edifice's clip: the inputs exercise the delta path."""
    h = M._dense(params["input_projection"], x) if "input_projection" in params else x
    for i in range(1, c.num_layers + 1):
        out, _, _, saved = M.mamba_block_forward(params, h, c, i)
        dt = softplus_forward(saved.delta_pre)[0]
        assert 0.002 < dt.min() and dt.max() < 0.09, (dt.min(), dt.max())
        h = h + out


def _step_all(model, x, cache=None):
    cache = model.init_cache(x.shape[0]) if cache is None else cache
    ys = []
    for t in range(x.shape[1]):
        y, cache = model.step(cache, x[:, t])
        ys.append(y)
    return np.stack(ys, axis=1), cache


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("seq_len,embed_dim,num_layers", [
    (1, 5, 3),        # a single frame
    (2, 24, 3),       # shorter than the conv window (conv_size 4), no input projection
    (3, 5, 1),
    (200, 5, 3),      # long: the state carries (delta ~ 0.01: decay over ~100 frames)
])
def test_step_equals_full_forward_at_every_prefix(preset, seq_len, embed_dim, num_layers):
    c = small(preset, embed_dim=embed_dim, num_layers=num_layers)
    model = M.MambaModel(c, M.random_params(c, seed=11))
    x = np.random.default_rng(12).standard_normal((2, seq_len, embed_dim))
    _check_unsaturated(model.params, x, c)
    full = model.forward(x, return_sequence=True)
    stepped, cache = _step_all(model, x)
    err = normwise_error(stepped, full.output)
    assert err <= STEP, f"step vs full: {err:.3e}"
    # the last-timestep output and the final state are the same too
    assert normwise_error(model(x), full.output[:, -1]) == 0.0
    assert normwise_error(cache.h, full.state.h) <= STEP
    assert normwise_error(cache.conv, full.state.conv) <= STEP


def test_step_equals_full_when_the_clip_is_active():
    """Edifice preset with part of delta above 0.1: the step's clip must act as the forward's."""
    c = small("edifice", num_layers=2)
    model = M.MambaModel(c, M.random_params(c, seed=13, delta_range=(0.03, 0.5)))
    x = np.random.default_rng(14).standard_normal((2, 50, 5))
    h = M._dense(model.params["input_projection"], x)
    dt = softplus_forward(M.mamba_block_forward(model.params, h, c, 1)[3].delta_pre)[0]
    assert 0.2 < np.mean(dt > 0.1) < 0.8                           # clipped and unclipped both
    stepped, _ = _step_all(model, x)
    full = model(x, return_sequence=True)
    assert normwise_error(stepped, full) <= STEP
    unclipped = M.MambaModel(c.replace(delta_clip=None), model.params)
    assert normwise_error(_step_all(unclipped, x)[0], full) > 1e-3


@pytest.mark.parametrize("preset", PRESETS)
def test_step_equals_full_with_official_and_glorot_init(preset):
    """The built (initialised) model, not only random_params."""
    c = small(preset)
    model = M.build(c, seed=5)
    x = np.random.default_rng(6).standard_normal((3, 30, 5))
    stepped, _ = _step_all(model, x)
    assert normwise_error(stepped, model(x, return_sequence=True)) <= STEP


def test_step_state_carries():
    """Teeth: the output at t depends on frames far beyond the conv window (the SSM state)."""
    c = small()
    model = M.MambaModel(c, M.random_params(c, seed=1))
    x = np.random.default_rng(2).standard_normal((1, 60, 5))
    y = model(x)
    x2 = x.copy(); x2[:, :10] += 1.0                                # change only frames 0..9
    assert normwise_error(model(x2), y) > 1e-4                      # still felt at t = 59


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 46), max_size=5, unique=True), preset=st.sampled_from(PRESETS))
def test_chunked_forward_equals_one_call(cuts, preset):
    c = small(preset)
    params = M.random_params(c, seed=21)
    x = np.random.default_rng(22).standard_normal((2, 47, 5))
    full = M.forward(params, x, c, return_sequence=True)
    bounds = [0, *sorted(cuts), 47]
    state, outs = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        r = M.forward(params, x[:, a:b], c, state=state, return_sequence=True)
        outs.append(r.output)
        state = r.state
    assert normwise_error(np.concatenate(outs, axis=1), full.output) <= SCAN
    assert normwise_error(state.h, full.state.h) <= SCAN
    assert normwise_error(state.conv, full.state.conv) <= SCAN


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_then_step_continues(preset):
    """Prefill with forward, continue with step (and the other way round)."""
    c = small(preset)
    model = M.MambaModel(c, M.random_params(c, seed=31))
    x = np.random.default_rng(32).standard_normal((2, 20, 5))
    full = model.forward(x, return_sequence=True).output
    pre = model.forward(x[:, :13])
    stepped, cache = _step_all(model, x[:, 13:], pre.state)
    assert normwise_error(stepped, full[:, 13:]) <= STEP
    rest = model.forward(x[:, 13:], state=_step_all(model, x[:, :13])[1], return_sequence=True)
    assert normwise_error(rest.output, full[:, 13:]) <= STEP


@pytest.mark.parametrize("engine", [e for e in M.ENGINES if e != "numpy"])
@pytest.mark.parametrize("preset", PRESETS)
def test_scan_engines_agree_on_the_model(engine, preset):
    """The model with a fast scan engine equals the NumPy ground truth (and chunks too)."""
    c = small(preset)
    params = M.random_params(c, seed=35)
    x = np.random.default_rng(36).standard_normal((2, 120, 5))
    ref = M.forward(params, x, c, return_sequence=True)
    got = M.forward(params, x, c, return_sequence=True, engine=engine)
    assert normwise_error(got.output, ref.output) <= SCAN
    assert normwise_error(got.state.h, ref.state.h) <= SCAN
    a = M.forward(params, x[:, :50], c, engine=engine)
    b = M.forward(params, x[:, 50:], c, state=a.state, return_sequence=True, engine=engine)
    assert normwise_error(b.output, ref.output[:, 50:]) <= SCAN


def test_hidden_states_are_the_residual_stream():
    c = small()
    params = M.random_params(c, seed=41)
    x = np.random.default_rng(42).standard_normal((2, 9, 5))
    r = M.forward(params, x, c, return_sequence=True)
    assert len(r.hidden_states) == c.num_layers + 1
    h = M._dense(params["input_projection"], x)
    np.testing.assert_array_equal(r.hidden_states[0], h)
    for i in range(1, c.num_layers + 1):
        out = M.mamba_block_forward(params, h, c, i)[0]
        h = h + out
        np.testing.assert_array_equal(r.hidden_states[i], h)
    g = params["final_norm"]["gamma"]
    ref = h / np.sqrt(np.mean(h ** 2, -1, keepdims=True) + 1e-5) * g
    assert normwise_error(r.output, ref) <= 1e-15
    e = small("edifice")
    re_ = M.forward(M.random_params(e, 1), x, e, return_sequence=True)
    np.testing.assert_array_equal(re_.output, re_.hidden_states[-1])   # no final norm


# --------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------
def test_dropout_only_when_asked_with_seed():
    c = small(dropout=0.3)
    params = M.random_params(c, seed=51)
    x = np.random.default_rng(52).standard_normal((2, 8, 5))
    plain = M.forward(params, x, c).output
    np.testing.assert_array_equal(M.forward(params, x, c, seed=1).output, plain)  # not training
    a = M.forward(params, x, c, training=True, seed=1, return_sequence=True)
    b = M.forward(params, x, c, training=True, seed=1, return_sequence=True)
    d = M.forward(params, x, c, training=True, seed=2, return_sequence=True)
    np.testing.assert_array_equal(a.output, b.output)
    assert normwise_error(a.output[:, -1], plain) > 1e-3 and normwise_error(d.output, a.output) > 1e-3
    # between blocks only: block 1's output is dropped (some zeros after 0.3 dropout) ...
    assert np.mean(a.hidden_states[1] == 0) > 0.2
    # ... the last block's is not (its residual add is after the last dropout)
    assert np.mean(a.hidden_states[-1] == 0) == 0
    with pytest.raises(ValueError, match="needs seed"):
        M.forward(params, x, c, training=True)
    c0 = small(dropout=0.0)
    np.testing.assert_array_equal(M.forward(params, x, c0, training=True).output, plain)


# --------------------------------------------------------------------------
# Bad input: clear ValueErrors naming expected and actual
# --------------------------------------------------------------------------
def test_bad_config_values():
    with pytest.raises(ValueError, match="embed_dim: required"):
        M.MambaConfig()
    with pytest.raises(ValueError, match=r"preset: expected one of \('mamba_ssm', 'edifice'\), got 'mamba2'"):
        M.MambaConfig(embed_dim=4, preset="mamba2")
    with pytest.raises(ValueError, match=r"unknown Mamba option\(s\) \['normm'\]"):
        M.MambaConfig(embed_dim=4, normm="rms")
    with pytest.raises(ValueError, match=r"norm: expected one of \('rms', 'layer'\), got 'batch'"):
        M.MambaConfig(embed_dim=4, norm="batch")
    with pytest.raises(ValueError, match="hidden_size: expected an integer >= 1, got -3"):
        M.MambaConfig(embed_dim=4, hidden_size=-3)
    with pytest.raises(ValueError, match="state_size: expected an integer >= 1, got 2.5"):
        M.MambaConfig(embed_dim=4, state_size=2.5)
    with pytest.raises(ValueError, match=r"dropout: expected a finite number in \[0.0, 1.0\), got 1.0"):
        M.MambaConfig(embed_dim=4, dropout=1.0)
    with pytest.raises(ValueError, match="d_skip: expected True or False, got 'yes'"):
        M.MambaConfig(embed_dim=4, d_skip="yes")
    with pytest.raises(ValueError, match="delta_clip"):
        M.MambaConfig(embed_dim=4, delta_clip=(0.1, 0.01))
    with pytest.raises(ValueError, match="dt_rank"):
        M.MambaConfig(embed_dim=4, dt_rank="round")
    with pytest.raises(ValueError, match=r"unknown Mamba option\(s\) \['bogus'\]"):
        M.build(embed_dim=4, bogus=1)


def test_bad_inputs_to_forward_and_step():
    c = small()
    model = M.MambaModel(c, M.random_params(c, seed=61))
    x = np.random.default_rng(62).standard_normal((2, 6, 5))
    with pytest.raises(ValueError, match=r"x: expected last axis embed_dim=5 \(\[batch, seq_len, embed_dim\]\), got shape \(2, 6, 7\)"):
        model(np.ones((2, 6, 7)))
    with pytest.raises(ValueError, match="x: expected 3 dimensions, got shape"):
        model(np.ones((6, 5)))
    bad = x.copy(); bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"x: expected finite values, got 1 NaN/inf entries \(first at index \(1, 2, 3\)"):
        model(bad)
    with pytest.raises(ValueError, match="expected a floating-point array"):
        model(np.ones((2, 6, 5), dtype=int))
    cache = model.init_cache(2)
    with pytest.raises(ValueError, match=r"frame: expected shape \(batch, 5\) \[batch, embed_dim\], got \(2, 4\)"):
        model.step(cache, np.ones((2, 4)))
    with pytest.raises(ValueError, match="frame: expected 2 dimensions"):
        model.step(cache, np.ones((2, 1, 5)))
    with pytest.raises(ValueError, match=r"cache.h: expected shape \(3, 3, 48, 4\)"):
        model.step(cache, np.ones((3, 5)))                      # batch of the cache: 2
    other = M.init_cache(small(num_layers=2), 2)                   # a cache from another config
    with pytest.raises(ValueError, match=r"cache.h: expected shape \(2, 3, 48, 4\) \[batch, num_layers, inner, state\].*got \(2, 2, 48, 4\)"):
        model.step(other, x[:, 0])
    other = M.init_cache(small(conv_size=3), 2)
    with pytest.raises(ValueError, match=r"cache.conv: expected shape \(2, 3, 3, 48\).*got \(2, 3, 2, 48\)"):
        model.forward(x, state=other)
    with pytest.raises(ValueError, match=r"cache: expected a MambaCache"):
        model.step({"h": 0}, x[:, 0])
    with pytest.raises(ValueError, match=r"engine: expected one of"):
        model.forward(x, engine="cuda")


def test_params_not_matching_config():
    c = small()
    params = M.random_params(c, seed=71)
    with pytest.raises(ValueError, match=r"layers do not match the config: missing \['mamba_block_3_conv_dw_conv'"):
        M.forward({k: v for k, v in params.items() if k != "mamba_block_3_conv_dw_conv"},
                  np.ones((1, 2, 5)), c)
    p2 = {**params, "mamba_block_1_in_proj": {"kernel": np.ones((24, 95))}}
    with pytest.raises(ValueError, match=r"params\['mamba_block_1_in_proj'\]\['kernel'\]: expected shape \(24, 96\), got \(24, 95\)"):
        M.forward(p2, np.ones((1, 2, 5)), c)
    with pytest.raises(ValueError, match=r"expected parameters \['kernel'\], got \['bias', 'kernel'\]"):
        p3 = {**params, "mamba_block_1_in_proj": {"kernel": np.ones((24, 96)), "bias": np.ones(96)}}
        M.forward(p3, np.ones((1, 2, 5)), c)
    e = small("edifice")                                          # params of another preset
    with pytest.raises(ValueError, match="layers do not match the config"):
        M.forward(params, np.ones((1, 2, 5)), e)


def test_cache_from_official_refuses_malformed_states():
    from refssm.convert.mamba import cache_from_official, cache_to_official

    conv, ssm = np.arange(48.0).reshape(2, 6, 4), np.ones((2, 6, 3))
    cache = cache_from_official([conv, conv], [ssm, 2 * ssm])          # round trip holds
    back_conv, back_ssm = cache_to_official(cache)
    assert np.array_equal(back_conv[1][:, :, 1:], conv[:, :, 1:]) and np.array_equal(back_ssm[1], 2 * ssm)
    with pytest.raises(ValueError, match=r"expected conv states \[batch, inner, K >= 1\].* got "
                                         r"\(2, 6\) and \(2, 6, 3\)"):
        cache_from_official([np.zeros((2, 6))], [ssm])               # was an IndexError
    with pytest.raises(ValueError, match="one conv state and one ssm state per layer .* got 2 and 1"):
        cache_from_official([conv, conv], [ssm])                     # was stacked silently
    with pytest.raises(ValueError, match=r"layer 1 has \(2, 6, 5\) and \(2, 6, 3\)"):
        cache_from_official([conv, np.zeros((2, 6, 5))], [ssm, ssm])
    with pytest.raises(ValueError, match="same batch and inner"):
        cache_from_official([conv], [np.ones((2, 7, 3))])
