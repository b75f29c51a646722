"""The State Space Transformer, the whole model (float64): config and presets, the
parameter tree, exact counts, step (with the growing key/value cache) = full
forward at every prefix, chunks = one call, causality, an independent
transcription of both presets (each flag honoured), engines, dropout, bad input.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import erf

from refssm.models import ss_transformer as S
from refssm.models._common import count_params, tree_shapes
from refssm.ops.conv import causal_depthwise_conv1d_forward
from refssm.verify.metrics import BUDGETS, normwise_error

STEP = BUDGETS["step_vs_full"]
SCAN = BUDGETS["scan"]
PRESETS = tuple(S.PRESETS)


def small(preset="mamba_ssm", **kw):
    opts = dict(embed_dim=5, hidden_size=16, state_size=4, num_layers=3, num_heads=2,
                head_dim=5, expand_factor=2, conv_size=4, preset=preset)
    opts.update(kw)
    return S.SSTransformerConfig(**opts)


def model_of(c, seed=11):
    return S.SSTransformerModel(c, S.random_params(c, seed=seed))


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------
def test_original_api_defaults():
    c = S.SSTransformerConfig(embed_dim=287)
    assert (c.hidden_size, c.state_size, c.num_layers, c.num_heads, c.head_dim, c.expand_factor,
            c.conv_size, c.dropout, c.window_size, c.seq_len) == (256, 16, 6, 4, 64, 2, 4, 0.1,
                                                                  60, 60)
    assert c.preset == "mamba_ssm" and c.attn_dim == 256 and c.inner_size == 512
    assert c.dt_rank_size == 16 and S.SSTransformerConfig(embed_dim=1, hidden_size=40).dt_rank_size == 3
    assert S.recommended_defaults() == dict(hidden_size=256, state_size=16, num_layers=6,
                                            num_heads=4, head_dim=64, expand_factor=2,
                                            conv_size=4, dropout=0.1, window_size=60)
    assert S.output_size() == 256 and S.output_size(hidden_size=40) == 40
    assert S.output_size(small()) == 16


def test_preset_table():
    ms, ed = S.SSTransformerConfig(embed_dim=4), S.SSTransformerConfig(embed_dim=4, preset="edifice")
    table = {"ssm_path": ("selective", "ema"), "softmax_eps": (0.0, 1e-8),
             "ssm_proj_bias": (False, True), "init": ("official", "glorot")}
    assert set(table) == set(S.FLAGS)
    for flag, (a, b) in table.items():
        assert getattr(ms, flag) == a and getattr(ed, flag) == b, flag


@pytest.mark.parametrize("flag", sorted(S.FLAGS))
def test_each_flag_settable_alone(flag):
    base = S.SSTransformerConfig(embed_dim=4)
    c = S.SSTransformerConfig(embed_dim=4, **{flag: S.PRESETS["edifice"][flag]})
    assert {k for k in S.FLAGS if getattr(c, k) != getattr(base, k)} == {flag}
    e = S.SSTransformerConfig(embed_dim=4, preset="edifice", **{flag: S.PRESETS["mamba_ssm"][flag]})
    assert getattr(e, flag) == S.PRESETS["mamba_ssm"][flag]
    assert c.replace(preset="edifice").to_dict() == S.SSTransformerConfig(
        embed_dim=4, preset="edifice").to_dict()


def test_heads_times_head_dim_is_free():
    for heads, hd in ((1, 16), (3, 5), (4, 64), (7, 1)):
        c = small(num_heads=heads, head_dim=hd)
        model = S.build(c, seed=0)
        assert model.params["sst_block_1_attn_q"]["kernel"].shape == (16, heads * hd)
        assert model.params["sst_block_1_attn_out_proj"]["kernel"].shape == (heads * hd, 16)
        assert model(np.ones((1, 3, 5))).shape == (1, 16)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4", None])
@pytest.mark.parametrize("opt", ["num_heads", "head_dim"])
def test_inconsistent_heads_are_a_clear_error_at_build_time(opt, bad):
    with pytest.raises(ValueError, match=rf"{opt}: expected an integer >= 1, got {re.escape(repr(bad))}"):
        S.build(embed_dim=4, hidden_size=8, **{opt: bad})


def test_tree_names_and_layouts():
    c = small(embed_dim=7, num_layers=2)
    H, E, N, K, R, A = 16, 32, 4, 4, 1, 10
    sel = S.param_shapes(c)
    assert sel["input_projection"] == {"kernel": (7, H), "bias": (H,)}
    assert sel["sst_block_2_norm"] == sel["sst_block_2_ffn_norm"] == sel["final_norm"] == {
        "gamma": (H,), "beta": (H,)}
    assert sel["sst_block_2_ssm_in_proj"] == {"kernel": (H, 2 * E)}               # no bias
    assert sel["sst_block_2_ssm_conv"] == {"kernel": (K, 1, E), "bias": (E,)}
    assert sel["sst_block_2_ssm_x_proj"] == {"kernel": (E, R + 2 * N)}
    assert sel["sst_block_2_ssm_dt_proj"] == {"kernel": (R, E), "bias": (E,)}
    assert sel["sst_block_2_ssm"] == {"A_log": (E, N), "D": (E,)}
    assert sel["sst_block_2_ssm_out_proj"] == {"kernel": (E, H)}
    for p in "qkv":
        assert sel[f"sst_block_2_attn_{p}"] == {"kernel": (H, A), "bias": (A,)}
    assert sel["sst_block_2_attn_out_proj"] == {"kernel": (A, H), "bias": (H,)}
    assert sel["sst_block_2_gate_proj"] == {"kernel": (H, H), "bias": (H,)}
    assert sel["sst_block_2_ffn_up"] == {"kernel": (H, 4 * H), "bias": (4 * H,)}
    assert sel["sst_block_2_ffn_down"] == {"kernel": (4 * H, H), "bias": (H,)}
    ema = S.param_shapes(c.replace(preset="edifice"))
    assert ema["sst_block_1_ssm_b_proj"] == ema["sst_block_1_ssm_c_proj"] == {
        "kernel": (E, N), "bias": (N,)}
    assert ema["sst_block_1_ssm_dt_proj"] == {"kernel": (E, E), "bias": (E,)}
    assert ema["sst_block_1_ssm_in_proj"] == {"kernel": (H, 2 * E), "bias": (2 * E,)}
    assert "sst_block_1_ssm" not in ema and "sst_block_1_ssm_x_proj" not in ema
    for cc in (c, c.replace(preset="edifice")):
        assert tree_shapes(S.build(cc, seed=1).params) == S.param_shapes(cc)


def test_initialisations():
    off = S.build(small(), seed=2).params
    E, R, K = 32, 1, 4
    assert np.array_equal(off["sst_block_1_ssm"]["A_log"], np.log(np.tile(np.arange(1.0, 5), (E, 1))))
    assert np.all(off["sst_block_1_ssm"]["D"] == 1.0)
    dt = np.logaddexp(0, off["sst_block_1_ssm_dt_proj"]["bias"])
    assert 1e-3 <= dt.min() and dt.max() <= 0.1
    assert np.max(np.abs(off["sst_block_1_ssm_dt_proj"]["kernel"])) <= R ** -0.5
    assert np.max(np.abs(off["sst_block_1_ssm_conv"]["kernel"])) <= 1 / math.sqrt(K)
    assert np.max(np.abs(off["sst_block_1_attn_q"]["bias"])) <= 1 / 4 and \
        np.any(off["sst_block_1_attn_q"]["bias"] != 0)                          # torch Linear
    gl = S.build(small("edifice"), seed=2).params
    for layer, names in gl.items():
        if "bias" in names and not layer.endswith("norm"):
            assert np.all(names["bias"] == 0), layer                            # Axon
    assert np.all(gl["final_norm"]["gamma"] == 1) and np.all(gl["final_norm"]["beta"] == 0)


# --------------------------------------------------------------------------
# Parameter counts
# --------------------------------------------------------------------------
configs = st.builds(
    dict, embed_dim=st.integers(1, 24), hidden_size=st.integers(1, 24),
    state_size=st.integers(1, 6), num_layers=st.integers(1, 3), num_heads=st.integers(1, 4),
    head_dim=st.integers(1, 6), expand_factor=st.integers(1, 3), conv_size=st.integers(1, 4),
    preset=st.sampled_from(PRESETS))
flag_overrides = st.fixed_dictionaries({}, optional={
    flag: st.sampled_from([S.PRESETS["mamba_ssm"][flag], S.PRESETS["edifice"][flag]])
    for flag in S.FLAGS})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(opts=configs, flags=flag_overrides, seed=st.integers(0, 2 ** 32 - 1))
def test_param_count_equals_counted_tree(opts, flags, seed):
    c = S.SSTransformerConfig(**opts, **flags)
    model = S.build(c, seed=seed)
    assert S.param_count(c) == count_params(model.params) == model.param_count_tree()
    assert count_params(S.random_params(c, seed=seed)) == S.param_count(c)
    assert sum(S.param_count_breakdown(c).values()) == S.param_count(c)


def test_param_count_known_values():
    """Defaults, embed 287, both presets, written out."""
    H, E, N, K, R, A, F, L = 256, 512, 16, 4, 16, 256, 1024, 6
    common = (2 * H + (K * E + E) + 3 * (H * A + A) + (A * H + H) + (H * H + H) + 2 * H
              + (H * F + F) + (F * H + H))
    sel = common + H * 2 * E + E * (R + 2 * N) + (R * E + E) + E * N + E + E * H
    ema = common + (H * 2 * E + 2 * E) + 2 * (E * N + N) + (E * E + E) + (E * H + H)
    assert S.param_count(embed_dim=287) == (287 * H + H) + L * sel + 2 * H
    assert S.param_count(embed_dim=287, preset="edifice") == (287 * H + H) + L * ema + 2 * H
    assert S.original_param_count(embed_dim=287) is None           # Edifice has none


# --------------------------------------------------------------------------
# Step = full forward at every prefix (with the KV cache); chunks = one call
# --------------------------------------------------------------------------
def _step_all(model, x, cache=None):
    cache = model.init_cache(x.shape[0]) if cache is None else cache
    ys = []
    for t in range(x.shape[1]):
        y, cache = model.step(cache, x[:, t])
        ys.append(y)
    return np.stack(ys, axis=1), cache


VARIANTS = [("mamba_ssm", {}), ("edifice", {}), ("mamba_ssm", {"softmax_eps": 1e-8}),
            ("mamba_ssm", {"ssm_path": "ema"}), ("edifice", {"ssm_path": "selective"})]


@pytest.mark.parametrize("preset,flags", VARIANTS)
@pytest.mark.parametrize("seq_len,embed_dim,num_layers", [
    (1, 5, 3),        # a single frame
    (2, 16, 3),       # shorter than the conv window, no input projection
    (40, 5, 3),       # the SSM state carries; the KV cache grows to 40
])
def test_step_equals_full_forward_at_every_prefix(preset, flags, seq_len, embed_dim, num_layers):
    c = small(preset, embed_dim=embed_dim, num_layers=num_layers, **flags)
    model = model_of(c)
    x = np.random.default_rng(12).standard_normal((2, seq_len, embed_dim))
    full = model.forward(x, return_sequence=True)
    stepped, cache = _step_all(model, x)
    err = normwise_error(stepped, full.output)
    assert err <= STEP, f"step vs full: {err:.3e}"
    assert normwise_error(model(x), full.output[:, -1]) == 0.0
    assert cache.k.shape == (2, num_layers, 2, seq_len, 5)
    for name in ("ssm", "conv", "k", "v"):
        assert normwise_error(getattr(cache, name), getattr(full.state, name)) <= STEP, name


@pytest.mark.parametrize("preset", PRESETS)
def test_step_equals_full_with_the_built_model(preset):
    model = S.build(small(preset), seed=5)
    x = np.random.default_rng(6).standard_normal((2, 20, 5))
    stepped, _ = _step_all(model, x)
    assert normwise_error(stepped, model(x, return_sequence=True)) <= STEP


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 28), max_size=4, unique=True),
       preset=st.sampled_from(PRESETS))
def test_chunked_forward_equals_one_call(cuts, preset):
    c = small(preset)
    params = S.random_params(c, seed=21)
    x = np.random.default_rng(22).standard_normal((2, 29, 5))
    full = S.forward(params, x, c, return_sequence=True)
    bounds = [0, *sorted(cuts), 29]
    state, parts = None, []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = S.forward(params, x[:, a:b], c, state=state, return_sequence=True)
        parts.append(out.output)
        state = out.state
    assert normwise_error(np.concatenate(parts, 1), full.output) <= SCAN
    assert state.k.shape[3] == 29


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_then_step_continues(preset):
    model = model_of(small(preset))
    x = np.random.default_rng(23).standard_normal((2, 25, 5))
    full = model(x, return_sequence=True)
    head = model.forward(x[:, :14])
    stepped, _ = _step_all(model, x[:, 14:], head.state)
    assert normwise_error(stepped, full[:, 14:]) <= STEP


@pytest.mark.parametrize("preset", PRESETS)
def test_output_at_t_unchanged_by_future_input(preset):
    model = model_of(small(preset))
    x = np.random.default_rng(24).standard_normal((2, 20, 5))
    y = model(x, return_sequence=True)
    x2 = x.copy(); x2[:, 11:] = 10 * np.random.default_rng(25).standard_normal((2, 9, 5))
    y2 = model(x2, return_sequence=True)
    assert np.array_equal(y2[:, :11], y[:, :11])
    assert normwise_error(y2[:, 11:], y[:, 11:]) > 1e-2


@pytest.mark.parametrize("preset", PRESETS)
def test_both_paths_carry_the_past(preset):
    """Teeth: frame 0 is felt at t = 39 through the SSM path alone and through the
    attention path alone (each tested with the other path's output zeroed by the gate)."""
    c = small(preset, num_layers=1)
    params = S.random_params(c, seed=26)
    x = np.random.default_rng(27).standard_normal((1, 40, 5))
    x2 = x.copy(); x2[:, 0] += 1.0
    for bias in (+40.0, -40.0):                           # gate ~1: SSM only; ~0: attention only
        p = {k: dict(v) for k, v in params.items()}
        p["sst_block_1_gate_proj"] = {"kernel": np.zeros((16, 16)), "bias": np.full(16, bias)}
        change = normwise_error(S.forward(p, x2, c).output, S.forward(p, x, c).output)
        assert change > 1e-5, (bias, change)


@pytest.mark.parametrize("engine", ["numba", "logdepth"])
def test_scan_engines_agree_on_the_model(engine):
    model = model_of(small())
    x = np.random.default_rng(28).standard_normal((2, 30, 5))
    a = model.forward(x, return_sequence=True)
    b = model.forward(x, return_sequence=True, engine=engine)
    assert normwise_error(b.output, a.output) <= SCAN
    assert normwise_error(b.state.ssm, a.state.ssm) <= SCAN


# --------------------------------------------------------------------------
# An independent transcription of the model (both SSM paths, any softmax eps)
# --------------------------------------------------------------------------
def _sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def _softplus(z):
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)


def reference_sst(params, x, cfg, *, ssm="selective", eps=0.0):
    """The whole model ``[batch, seq_len, hidden]`` (after the final norm), loops and
    einsums only. ``ssm``: "selective" (Mamba S6) or "ema" (Edifice's approximation);
    ``eps``: added to the softmax denominator (Edifice: 1e-8)."""
    def dense(v, layer):
        y = np.einsum("...i,io->...o", v, layer["kernel"])
        return y + layer["bias"] if "bias" in layer else y

    def ln(v, layer):
        mu = v.mean(-1, keepdims=True)
        var = ((v - mu) ** 2).mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(var + 1e-5) * layer["gamma"] + layer["beta"]

    def silu(v):
        return v * _sig(v)

    batch, L, _ = x.shape
    H, E, N, K = cfg.hidden_size, cfg.inner_size, cfg.state_size, cfg.conv_size
    nh, hd, R = cfg.num_heads, cfg.head_dim, cfg.dt_rank_size
    h = dense(x, params["input_projection"]) if "input_projection" in params else x
    for i in range(1, cfg.num_layers + 1):
        b = f"sst_block_{i}"
        u = ln(h, params[f"{b}_norm"])
        # --- SSM path
        xz = dense(u, params[f"{b}_ssm_in_proj"])
        xb, zb = xz[..., :E], xz[..., E:]
        w, cb = params[f"{b}_ssm_conv"]["kernel"][:, 0], params[f"{b}_ssm_conv"]["bias"]
        xp = np.concatenate([np.zeros((batch, K - 1, E)), xb], axis=1)
        xa = silu(np.stack([np.einsum("bkc,kc->bc", xp[:, t:t + K], w) + cb for t in range(L)], 1))
        y = np.zeros_like(xa)
        if ssm == "selective":
            xd = dense(xa, params[f"{b}_ssm_x_proj"])
            dlow, Bm, Cm = xd[..., :R], xd[..., R:R + N], xd[..., R + N:]
            delta = _softplus(dense(dlow, params[f"{b}_ssm_dt_proj"]))
            A = -np.exp(params[f"{b}_ssm"]["A_log"])
            st_ = np.zeros((batch, E, N))
            for t in range(L):
                st_ = (np.exp(delta[:, t, :, None] * A) * st_
                       + delta[:, t, :, None] * Bm[:, t, None, :] * xa[:, t, :, None])
                y[:, t] = np.einsum("ben,bn->be", st_, Cm[:, t]) + params[f"{b}_ssm"]["D"] * xa[:, t]
        else:
            Bm = dense(xa, params[f"{b}_ssm_b_proj"])
            Cm = dense(xa, params[f"{b}_ssm_c_proj"])
            dt = np.log(np.exp(dense(xa, params[f"{b}_ssm_dt_proj"])) + 1.0)   # Edifice's softplus
            gate = _sig(dt.mean(-1, keepdims=True))
            bcg = _sig((Bm * Cm).sum(-1, keepdims=True))
            out = gate * bcg * xa
            prev = np.zeros((batch, E))
            for t in range(L):
                prev = gate[:, t] * prev + (1 - gate[:, t]) * out[:, t]
                y[:, t] = prev
        s = dense(y * silu(zb), params[f"{b}_ssm_out_proj"])
        # --- attention path
        q = dense(u, params[f"{b}_attn_q"]).reshape(batch, L, nh, hd)
        k = dense(u, params[f"{b}_attn_k"]).reshape(batch, L, nh, hd)
        v = dense(u, params[f"{b}_attn_v"]).reshape(batch, L, nh, hd)
        att = np.zeros((batch, L, nh, hd))
        for t in range(L):
            sc = np.einsum("bhd,bjhd->bhj", q[:, t], k[:, :t + 1]) / math.sqrt(hd)
            ex = np.exp(sc - sc.max(-1, keepdims=True))
            wts = ex / (ex.sum(-1, keepdims=True) + eps)
            att[:, t] = np.einsum("bhj,bjhd->bhd", wts, v[:, :t + 1])
        a = dense(att.reshape(batch, L, nh * hd), params[f"{b}_attn_out_proj"])
        # --- gate, residual, FFN
        g = _sig(dense(u, params[f"{b}_gate_proj"]))
        h = h + (g * s + (1 - g) * a)
        f = dense(ln(h, params[f"{b}_ffn_norm"]), params[f"{b}_ffn_up"])
        f = 0.5 * f * (1 + erf(f / math.sqrt(2)))
        h = h + dense(f, params[f"{b}_ffn_down"])
    return ln(h, params["final_norm"])


@pytest.mark.parametrize("preset,flags,ssm,eps", [
    ("mamba_ssm", {}, "selective", 0.0),
    ("edifice", {}, "ema", 1e-8),
    ("mamba_ssm", {"softmax_eps": 1e-8}, "selective", 1e-8),      # each flag alone
    ("mamba_ssm", {"ssm_path": "ema"}, "ema", 0.0),
    ("edifice", {"softmax_eps": 0.0}, "ema", 0.0),
    ("edifice", {"ssm_path": "selective", "ssm_proj_bias": False}, "selective", 1e-8),
])
def test_presets_and_flags_equal_the_transcription(preset, flags, ssm, eps):
    c = small(preset, **flags)
    model = model_of(c, seed=101)
    x = np.random.default_rng(102).standard_normal((2, 24, 5))
    ours = model(x, return_sequence=True)
    err = normwise_error(ours, reference_sst(model.params, x, c, ssm=ssm, eps=eps))
    assert err <= STEP, err
    # teeth: the other eps is seen (the 1e-8 moves the output by ~1e-9, far above round-off)
    other = normwise_error(ours, reference_sst(model.params, x, c, ssm=ssm, eps=1e-8 - eps))
    assert other > 1e-11, other


@pytest.mark.parametrize("preset", PRESETS)
def test_random_params_have_teeth(preset):
    """On the test inputs: the fusion gate and (EMA path) the forget gate unsaturated and
    moving; (selective path) delta inside [0.001, 0.1] so exp(delta A) carries the state."""
    c = small(preset)
    p = S.random_params(c, seed=11)
    x = np.random.default_rng(12).standard_normal((2, 40, 5))
    h = S._dense(p["input_projection"], x)
    for i in range(1, c.num_layers + 1):
        b = f"sst_block_{i}"
        u = S._layer_norm(p[f"{b}_norm"], h, c)
        g = _sig(S._dense(p[f"{b}_gate_proj"], u))
        assert 0.02 < g.min() and g.max() < 0.98 and np.ptp(g) > 0.5
        E, R = c.inner_size, c.dt_rank_size
        xs = S._dense(p[f"{b}_ssm_in_proj"], u)[..., :E]
        conv = p[f"{b}_ssm_conv"]
        xs = causal_depthwise_conv1d_forward(xs, conv["kernel"], conv["bias"])[0]
        xs = xs * _sig(xs)
        if c.ssm_path == "ema":
            forget = _sig(_softplus(S._dense(p[f"{b}_ssm_dt_proj"], xs)).mean(-1))
            assert 0.55 < forget.min() and forget.max() < 0.99 and np.ptp(forget) > 0.05
        else:
            dlow = S._dense(p[f"{b}_ssm_x_proj"], xs)[..., :R]
            delta = _softplus(S._dense(p[f"{b}_ssm_dt_proj"], dlow))
            assert 0.002 < delta.min() and delta.max() < 0.09
        h = S.sst_block_forward(p, h, c, i)[0]


# --------------------------------------------------------------------------
# Dropout, hidden states
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


def test_hidden_states_are_the_block_outputs():
    c = small()
    model = model_of(c)
    x = np.random.default_rng(41).standard_normal((2, 9, 5))
    out = model.forward(x, return_sequence=True)
    hs = out.hidden_states
    assert len(hs) == c.num_layers + 1
    for i in range(1, c.num_layers + 1):
        assert np.array_equal(hs[i], S.sst_block_forward(model.params, hs[i - 1], c, i)[0])
    final = S._layer_norm(model.params["final_norm"], hs[-1], c)
    assert np.array_equal(out.output, final)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
def test_bad_config_values():
    with pytest.raises(ValueError, match=r"embed_dim: required"):
        S.SSTransformerConfig()
    with pytest.raises(ValueError, match=r"softmax_eps: expected a finite number in \[0.0, None\], "
                                         r"got -1e-08"):
        S.SSTransformerConfig(embed_dim=3, softmax_eps=-1e-8)
    with pytest.raises(ValueError, match=r"ssm_path: expected one of \('selective', 'ema'\), got 's6'"):
        S.SSTransformerConfig(embed_dim=3, ssm_path="s6")
    with pytest.raises(ValueError, match=r"unknown SSTransformer option\(s\) \['heads'\]"):
        S.SSTransformerConfig(embed_dim=3, heads=2)
    with pytest.raises(ValueError, match=r"preset: expected one of \('mamba_ssm', 'edifice'\)"):
        S.SSTransformerConfig(embed_dim=3, preset="hymba")


def test_bad_inputs_to_forward_and_step():
    c = small()
    model = model_of(c)
    with pytest.raises(ValueError, match=r"x: expected last axis embed_dim=5 .* got shape \(2, 3, 4\)"):
        model(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match=r"x: expected batch >= 1 and seq_len >= 1, got shape \(2, 0, 5\)"):
        model(np.zeros((2, 0, 5)))
    with pytest.raises(ValueError, match=r"frame: expected shape \(batch, 5\) \[batch, embed_dim\], "
                                         r"got \(2, 4\)"):
        model.step(model.init_cache(2), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"cache.ssm: expected shape \(3, 3, 32, 4\)"):
        model.step(model.init_cache(2), np.zeros((3, 5)))
    cache = model.init_cache(2)
    bad = cache._replace(v=np.zeros((2, 3, 2, 1, 5)))
    with pytest.raises(ValueError, match=r"cache.v: expected shape \(2, 3, 2, 0, 5\) \[batch, "
                                         r"num_layers, num_heads, T, head_dim\], got \(2, 3, 2, 1, 5\)"):
        model.step(bad, np.zeros((2, 5)))
    ema_cache = S.init_cache(small("edifice"), 2)
    with pytest.raises(ValueError, match=r"cache.ssm: expected 4 dimensions, got shape \(2, 3, 32\)"):
        model.step(ema_cache, np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"engine: expected one of"):
        model(np.zeros((1, 3, 5)), engine="cuda")


def test_params_of_another_head_layout_are_refused():
    c = small()                                                   # 2 heads x 5 = 10
    wrong = S.random_params(small(num_heads=3, head_dim=5), seed=0)
    with pytest.raises(ValueError, match=r"sst_block_1_attn_q'\]\['kernel'\]: expected shape "
                                         r"\(16, 10\), got \(16, 15\)"):
        S.forward(wrong, np.zeros((1, 2, 5)), c)
