"""S5, the whole model (float64): config and presets, the parameter tree, exact
counts, step = full forward at every prefix, chunks = one call, dropout,
bidirectional, the edifice preset against a literal transcription of Edifice's
code, GELU/SwiGLU backward, bad input.
"""
from __future__ import annotations


import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refssm.models import s5 as M
from refssm.models._common import count_params, tree_shapes
from refssm.ops.norms import layer_norm_forward
from refssm.verify.metrics import BUDGETS, normwise_error

STEP = BUDGETS["step_vs_full"]
SCAN = BUDGETS["scan"]


def figure(name, value):
    print(f"FIGURE {name}: {value:.3e}")


def small(preset="s5", **kw):
    opts = dict(embed_dim=5, hidden_size=8, state_size=6, num_layers=3, preset=preset)
    opts.update(kw)
    return M.S5Config(**opts)


# --------------------------------------------------------------------------
# Config, names, counts
# --------------------------------------------------------------------------

def test_original_api_defaults():
    c = M.S5Config(embed_dim=287)
    assert (c.hidden_size, c.state_size, c.num_layers, c.dropout, c.window_size, c.seq_len) == \
        (256, 64, 4, 0.1, 60, 60)
    assert c.preset == "s5" and c.ssm_states == 32 and c.ffn_inner == 1024
    assert M.recommended_defaults() == dict(hidden_size=256, state_size=64, num_layers=4,
                                            window_size=60, dropout=0.1)
    assert M.output_size() == 256 and M.output_size(small()) == 8
    assert M.S5Config(embed_dim=1, window_size=30).seq_len == 30


def test_preset_table():
    s5, ed = M.S5Config(embed_dim=4), M.S5Config(embed_dim=4, preset="edifice")
    table = {"ssm": ("s5", "edifice"), "activation": ("gelu", "none")}
    assert set(table) == set(M.FLAGS)
    for flag, (a, b) in table.items():
        assert getattr(s5, flag) == a and getattr(ed, flag) == b
    assert M.S5Config(embed_dim=4, preset="edifice", activation="gelu").activation == "gelu"
    assert s5.replace(preset="edifice").ssm == "edifice"


@pytest.mark.parametrize("preset", ["s5", "edifice"])
def test_layer_names_and_axon_layouts(preset):
    c = small(preset)
    shapes = M.param_shapes(c)
    assert shapes["input_projection"] == {"kernel": (5, 8), "bias": (8,)}
    assert shapes["final_norm"] == {"gamma": (8,), "beta": (8,)}
    for i in (1, 2, 3):
        b = f"s5_block_{i}"
        assert shapes[f"{b}_ssm_norm"] == {"gamma": (8,), "beta": (8,)}
        assert shapes[f"{b}_ffn_gate"] == {"kernel": (8, 32), "bias": (32,)}
        assert shapes[f"{b}_ffn_up"] == {"kernel": (8, 32), "bias": (32,)}
        assert shapes[f"{b}_ffn_down"] == {"kernel": (32, 8), "bias": (8,)}
        if preset == "s5":
            assert shapes[f"{b}_ssm_ssm"] == {"Lambda_re": (3,), "Lambda_im": (3,),
                                              "B": (3, 8, 2), "C": (8, 3, 2), "D": (8,),
                                              "log_step": (3,)}
        else:
            assert shapes[f"{b}_ssm_b_proj"] == {"kernel": (8, 6), "bias": (6,)}
            assert shapes[f"{b}_ssm_c_proj"] == {"kernel": (8, 6), "bias": (6,)}
            assert shapes[f"{b}_ssm_d_proj"] == {"kernel": (8, 8), "bias": (8,)}
    assert "input_projection" not in M.param_shapes(small(preset, embed_dim=8))
    model = M.build(c, seed=0)
    assert tree_shapes(model.params) == shapes
    assert np.all(model.params["s5_block_1_ffn_gate"]["bias"] == 0)           # Axon: zero bias
    assert np.all(model.params["final_norm"]["gamma"] == 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(preset=st.sampled_from(["s5", "edifice"]), embed=st.integers(1, 12),
       hidden=st.integers(1, 12), half=st.integers(1, 4), layers=st.integers(1, 3),
       conj_sym=st.booleans(), bidirectional=st.booleans(), blocks=st.sampled_from([1, 2]),
       C_init=st.sampled_from(["trunc_standard_normal", "lecun_normal", "complex_normal"]))
def test_param_count_equals_counted_tree(preset, embed, hidden, half, layers, conj_sym,
                                         bidirectional, blocks, C_init):
    state = 2 * half * blocks
    c = M.S5Config(embed_dim=embed, hidden_size=hidden, state_size=state, num_layers=layers,
                   preset=preset, conj_sym=conj_sym, blocks=blocks, C_init=C_init,
                   bidirectional=bidirectional and preset == "s5")
    model = M.build(c, seed=0)
    assert M.param_count(c) == count_params(model.params) == model.param_count_tree()


def test_original_param_count_and_what_it_leaves_out():
    c = M.S5Config(embed_dim=287)
    H, N, E, L = 256, 64, 287, 4
    edifice_formula = E * H + L * (H * N + 2 * H * N + H * H + 2 * H * 4 * H + 4 * H * H)
    assert M.original_param_count(c) == edifice_formula
    exact = M.param_count(c.replace(preset="edifice"))
    gap = exact - edifice_formula
    # the gap: biases, norms, final norm, minus the encoder (H N) that does not exist
    biases = H + L * (2 * N + H + 2 * 4 * H + H)
    norms = L * 2 * (2 * H) + 2 * H
    assert gap == biases + norms - L * H * N
    assert M.param_count(c) == M.build(c, seed=0).param_count_tree()


# --------------------------------------------------------------------------
# Step = full forward, chunks = one call, layers keep their own state
# --------------------------------------------------------------------------

STEP_CASES = [
    dict(preset="s5"),
    dict(preset="s5", conj_sym=False, state_size=5),
    dict(preset="s5", discretization="bilinear", activation="gelu_tanh", clip_eigs=True),
    dict(preset="s5", blocks=3, C_init="complex_normal", step_rescale=1.7),
    dict(preset="edifice"),
    dict(preset="edifice", embed_dim=8, activation="gelu"),
]


@pytest.mark.parametrize("opts", STEP_CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("engine", ["numpy", "numba", "logdepth", "fft"])
def test_step_equals_full_forward_at_every_prefix(opts, engine):
    c = small(num_layers=4, **opts)
    if c.ssm == "edifice" and engine == "fft":
        pytest.skip("the edifice SSM is time-varying: no FFT engine")
    params = M.random_params(c, seed=3)
    x = np.random.default_rng(4).standard_normal((2, 33, c.embed_dim))
    full = M.forward(params, x, c, return_sequence=True, engine=engine)
    cache = M.init_cache(c, batch_size=2)
    worst = 0.0
    for t in range(x.shape[1]):
        y, cache = M.step(params, cache, x[:, t], c)
        worst = max(worst, normwise_error(y, full.output[:, t]))
    figure(f"step vs full every prefix {opts} engine={engine}", worst)
    assert worst <= STEP
    assert normwise_error(cache.h, full.state.h) <= STEP


def test_layers_keep_their_own_state_and_the_check_has_teeth():
    """Every layer carries its own state; sharing one (S5's old bug) is caught by a wide margin."""
    c = small(num_layers=3)
    params = M.random_params(c, seed=5)
    x = np.random.default_rng(6).standard_normal((1, 20, 5))
    full = M.forward(params, x, c, return_sequence=True)
    h = full.state.h
    assert h.shape == (1, 3, 3) and h.dtype == np.complex128
    assert min(np.max(np.abs(h[:, i] - h[:, j])) for i in range(3) for j in range(i)) > 1e-3
    # a stepper that shares one state between layers
    cache = M.init_cache(c)
    shared = cache.h[:, :1]
    worst = 0.0
    for t in range(20):
        y, cache = M.step(params, M.S5Cache(np.repeat(shared, 3, axis=1)), x[:, t], c)
        shared = cache.h[:, -1:]                           # the last layer's write wins
        worst = max(worst, normwise_error(y, full.output[:, t]))
    figure("shared-state stepper vs full (should be large)", worst)
    assert worst > 1e-3


@pytest.mark.parametrize("preset", ["s5", "edifice"])
@pytest.mark.parametrize("engine", ["numpy", "numba", "logdepth", "fft", "fft_dense"])
def test_chunks_equal_one_call(preset, engine):
    c = small(preset)
    if c.ssm == "edifice" and engine.startswith("fft"):
        with pytest.raises(ValueError, match="time-varying: no FFT engine"):
            M.forward(M.random_params(c), np.zeros((1, 2, 5)), c, engine=engine)
        return
    params = M.random_params(c, seed=7)
    x = np.random.default_rng(8).standard_normal((2, 29, 5))
    one = M.forward(params, x, c, return_sequence=True, engine=engine)
    ref = M.forward(params, x, c, return_sequence=True)
    parts, state = [], None
    for a, b in ((0, 1), (1, 12), (12, 29)):
        out = M.forward(params, x[:, a:b], c, state=state, return_sequence=True, engine=engine)
        parts.append(out.output)
        state = out.state
    assert normwise_error(np.concatenate(parts, 1), one.output) <= SCAN
    assert normwise_error(state.h, one.state.h) <= SCAN
    assert normwise_error(one.output, ref.output) <= SCAN                     # engines agree
    last = M.forward(params, x, c, engine=engine).output
    assert np.array_equal(last, one.output[:, -1])


def test_recommended_defaults_run():
    model = M.build(embed_dim=287, **M.recommended_defaults(), seed=0)
    assert model.param_count() == model.param_count_tree()
    x = np.random.default_rng(0).standard_normal((2, 60, 287))
    a = model(x)
    b = model(x, engine="numba")
    assert a.shape == (2, 256) and normwise_error(b, a) <= SCAN


# --------------------------------------------------------------------------
# Dropout, bidirectional
# --------------------------------------------------------------------------

def test_dropout_only_when_asked():
    c = small(dropout=0.3)
    params = M.random_params(c, seed=1)
    x = np.random.default_rng(2).standard_normal((2, 9, 5))
    ev = M.forward(params, x, c).output
    assert np.array_equal(ev, M.forward(params, x, c, seed=0).output)        # not training
    a = M.forward(params, x, c, training=True, seed=0).output
    b = M.forward(params, x, c, training=True, seed=0).output
    d = M.forward(params, x, c, training=True, seed=1).output
    assert np.array_equal(a, b) and not np.allclose(a, d) and not np.allclose(a, ev)
    with pytest.raises(ValueError, match="training=True with dropout > 0 needs seed"):
        M.forward(params, x, c, training=True)
    c0 = c.replace(dropout=0.0)
    assert np.array_equal(M.forward(params, x, c0, training=True).output, ev)


def test_bidirectional_model_is_not_causal_and_cannot_be_stepped():
    c = small(bidirectional=True)
    params = M.random_params(c, seed=1)
    assert "C1" in params["s5_block_1_ssm_ssm"] and "C2" in params["s5_block_1_ssm_ssm"]
    x = np.random.default_rng(2).standard_normal((1, 12, 5))
    y = M.forward(params, x, c, return_sequence=True)
    assert y.state is None
    x2 = x.copy()
    x2[:, -1] += 1.0
    y2 = M.forward(params, x2, c, return_sequence=True).output
    assert np.max(np.abs(y2[:, 0] - y.output[:, 0])) > 1e-6                  # sees the future
    causal = small()
    pc = M.random_params(causal, seed=1)
    a = M.forward(pc, x, causal, return_sequence=True).output
    b = M.forward(pc, x2, causal, return_sequence=True).output
    assert np.array_equal(a[:, :-1], b[:, :-1])
    for engine in ("numba", "logdepth", "fft", "fft_dense"):
        assert normwise_error(M.forward(params, x, c, return_sequence=True, engine=engine).output,
                              y.output) <= SCAN
    with pytest.raises(ValueError, match="bidirectional S5 is not causal .* cannot be stepped"):
        M.step(params, M.S5Cache(np.zeros((1, 3, 3), complex)), x[:, 0], c)
    with pytest.raises(ValueError, match="init_cache: a bidirectional S5 is not causal"):
        M.init_cache(c)
    with pytest.raises(ValueError, match="state: a bidirectional S5 is not causal"):
        M.forward(params, x, c, state=M.S5Cache(np.zeros((1, 3, 3), complex)))


# --------------------------------------------------------------------------
# The edifice preset: Edifice's own formula, transcribed
# --------------------------------------------------------------------------

def edifice_mimo_ssm_impl(x, b_proj, c_proj, d_proj, state_size, eps=1e-10):
    """Literal transcription of ``mimo_ssm_impl`` in Edifice's ``lib/edifice/ssm/s5.ex``."""
    a_diag = -(np.arange(state_size) + 1.0) / state_size
    dt = 0.1
    a_bar = np.broadcast_to(np.exp(dt * a_diag), b_proj.shape)          # [batch, L, N]
    b_bar = dt * b_proj
    bu = b_bar[:, :, None, :] * x[:, :, :, None]                        # [batch, L, H, N]
    a_bar_4d = a_bar[:, :, None, :]
    log_a = np.log(a_bar_4d + eps)
    a_cumprod = np.exp(np.cumsum(log_a, axis=1))
    bu_normalized = bu / (a_cumprod + eps)
    h = a_cumprod * np.cumsum(bu_normalized, axis=1)
    y = np.sum(c_proj[:, :, None, :] * h, axis=3)
    return y + d_proj


@pytest.mark.parametrize("engine", ["numpy", "numba", "logdepth"])
def test_edifice_ssm_sublayer_matches_edifice_formula(engine):
    c = small("edifice", hidden_size=6, state_size=5)
    params = M.random_params(c, seed=9)
    x = np.random.default_rng(10).standard_normal((2, 40, 6))
    out, h = M.mimo_ssm_forward(params, x, c, "s5_block_1_ssm", engine=engine)
    p = lambda n: params[f"s5_block_1_ssm_{n}"]                             # noqa: E731
    u = layer_norm_forward(x, p("norm")["gamma"], p("norm")["beta"], 1e-5)[0]
    dense = lambda q: u @ q["kernel"] + q["bias"]                         # noqa: E731
    exact_math = x + edifice_mimo_ssm_impl(u, dense(p("b_proj")), dense(p("c_proj")),
                                           dense(p("d_proj")), 5, eps=0.0)
    literal = x + edifice_mimo_ssm_impl(u, dense(p("b_proj")), dense(p("c_proj")),
                                        dense(p("d_proj")), 5)
    e_math, e_lit = normwise_error(out, exact_math), normwise_error(out, literal)
    figure(f"edifice sublayer vs Edifice formula, eps=0 ({engine})", e_math)
    figure(f"edifice sublayer vs Edifice formula with its 1e-10 terms ({engine})", e_lit)
    assert e_math <= SCAN
    assert e_lit <= 1e-8            # Edifice's own +1e-10 terms, documented in the module


def test_edifice_literal_formula_breaks_on_long_sequences_the_stable_scan_does_not():
    """Edifice's cumprod division with +1e-10 fails past ~200 steps; the preset stays exact."""
    c = small("edifice", hidden_size=6, state_size=5)
    params = M.random_params(c, seed=9)
    x = np.random.default_rng(10).standard_normal((1, 300, 6))
    out, _ = M.mimo_ssm_forward(params, x, c, "s5_block_1_ssm", engine="numba")
    p = lambda n: params[f"s5_block_1_ssm_{n}"]                             # noqa: E731
    u = layer_norm_forward(x, p("norm")["gamma"], p("norm")["beta"], 1e-5)[0]
    dense = lambda q: u @ q["kernel"] + q["bias"]                         # noqa: E731
    args = (u, dense(p("b_proj")), dense(p("c_proj")), dense(p("d_proj")), 5)
    e_math = normwise_error(out, x + edifice_mimo_ssm_impl(*args, eps=0.0))
    e_lit = normwise_error(out, x + edifice_mimo_ssm_impl(*args))
    figure("edifice L=300 vs formula without eps", e_math)
    figure("edifice L=300 vs Edifice's literal formula", e_lit)
    assert e_math <= SCAN and e_lit > 1e-2


# --------------------------------------------------------------------------
# GELU and SwiGLU (ops the model adds)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_forward_and_backward(approximate):
    import scipy.stats
    x = np.linspace(-6, 6, 41)
    y, s = M.gelu_forward(x, approximate)
    if not approximate:
        assert normwise_error(y, x * scipy.stats.norm.cdf(x)) <= 1e-15
    else:
        assert np.max(np.abs(y - x * scipy.stats.norm.cdf(x))) < 1e-3
    h = 1e-6
    fd = (M.gelu_forward(x + h, approximate)[0] - M.gelu_forward(x - h, approximate)[0]) / (2 * h)
    assert normwise_error(M.gelu_backward(np.ones_like(x), s)["x"], fd) <= 1e-8


def test_swiglu_backward_matches_finite_differences():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4))
    ps = {n: {"kernel": rng.standard_normal(sh), "bias": rng.standard_normal(sh[1])}
          for n, sh in (("gate", (4, 6)), ("up", (4, 6)), ("down", (6, 4)))}
    W = rng.standard_normal((2, 3, 4))
    loss = lambda x_, p: float(np.sum(M.swiglu_forward(x_, p["gate"], p["up"], p["down"])[0] * W))  # noqa: E731,E501
    _, saved = M.swiglu_forward(x, ps["gate"], ps["up"], ps["down"])
    g = M.swiglu_backward(W, saved)
    h = 1e-6
    v = rng.standard_normal(x.shape)
    fd = (loss(x + h * v, ps) - loss(x - h * v, ps)) / (2 * h)
    assert abs(fd - np.sum(g["x"] * v)) <= 1e-7 * abs(fd)
    for n in ps:
        for k in ("kernel", "bias"):
            v = rng.standard_normal(ps[n][k].shape)
            plus = {m: dict(q) for m, q in ps.items()}
            minus = {m: dict(q) for m, q in ps.items()}
            plus[n][k] = ps[n][k] + h * v
            minus[n][k] = ps[n][k] - h * v
            fd = (loss(x, plus) - loss(x, minus)) / (2 * h)
            assert abs(fd - np.sum(g[n][k] * v)) <= 1e-7 * abs(fd), (n, k)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

def test_bad_config():
    with pytest.raises(ValueError, match=r"state_size: expected an even state_size with conj_sym=True .* got 7"):
        M.S5Config(embed_dim=4, state_size=7)
    M.S5Config(embed_dim=4, state_size=7, conj_sym=False)
    M.S5Config(embed_dim=4, state_size=7, preset="edifice")                   # N real states
    with pytest.raises(ValueError, match=r"blocks: expected a divisor of state_size 8, got 3"):
        M.S5Config(embed_dim=4, state_size=8, blocks=3)
    with pytest.raises(ValueError, match=r"even block size state_size / blocks, got 12 / 4 = 3"):
        M.S5Config(embed_dim=4, state_size=12, blocks=4)
    with pytest.raises(ValueError, match=r"embed_dim: required"):
        M.S5Config()
    with pytest.raises(ValueError, match=r"unknown S5 option\(s\) \['hiden_size'\]"):
        M.S5Config(embed_dim=4, hiden_size=3)
    with pytest.raises(ValueError, match=r"preset: expected one of \('s5', 'edifice'\), got 'S5'"):
        M.S5Config(embed_dim=4, preset="S5")
    with pytest.raises(ValueError, match=r"step_rescale: expected a finite number in \(0.0, inf\), got 0.0"):
        M.S5Config(embed_dim=4, step_rescale=0.0)
    with pytest.raises(ValueError, match=r"dropout: expected a finite number in \[0.0, 1.0\)"):
        M.S5Config(embed_dim=4, dropout=1.0)
    with pytest.raises(ValueError, match=r"bidirectional: the edifice SSM is causal only"):
        M.S5Config(embed_dim=4, preset="edifice", bidirectional=True)


@pytest.mark.parametrize("preset", ["s5", "edifice"])
def test_bad_input(preset):
    c = small(preset)
    params = M.random_params(c)
    x = np.zeros((2, 4, 5))
    with pytest.raises(ValueError, match=r"x: expected last axis embed_dim=5 .* got shape \(2, 4, 6\)"):
        M.forward(params, np.zeros((2, 4, 6)), c)
    with pytest.raises(ValueError, match=r"x: expected 3 dimensions"):
        M.forward(params, np.zeros((4, 5)), c)
    bad = {k: dict(v) for k, v in params.items()}
    bad["s5_block_2_ffn_up"]["kernel"] = np.zeros((8, 31))
    with pytest.raises(ValueError, match=r"params\['s5_block_2_ffn_up'\]\['kernel'\]: expected shape \(8, 32\), got \(8, 31\)"):
        M.forward(bad, x, c)
    del bad["final_norm"]
    with pytest.raises(ValueError, match=r"missing \['final_norm'\]"):
        M.forward(bad, x, c)
    other = M.init_cache(small(preset, num_layers=2), batch_size=2)
    with pytest.raises(ValueError, match=r"state.h: expected shape .* got .*another config"):
        M.forward(params, x, c, state=other)
    with pytest.raises(ValueError, match=r"frame: expected shape \(batch, 5\)"):
        M.step(params, M.init_cache(c, batch_size=2), np.zeros((2, 4)), c)
    with pytest.raises(ValueError, match=r"engine: expected one of"):
        M.forward(params, x, c, engine="cuda")
