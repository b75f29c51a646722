"""The Numba fused engine (refssm.scan.numba_seq) and its exp (refssm.scan._fastexp).

Float64 budgets are normwise (max|a - b| / max|b|) against the NumPy engine,
the ground truth. Everything here runs in well under a minute including the
JIT compile (``cache=True`` makes reruns faster).
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

from refssm.scan import numba_seq, numpy_seq
from refssm.scan._fastexp import fexp, fexp_array
from refssm.ssm.selective_scan import (
    normalise_bc,
    selective_scan_backward,
    selective_scan_forward,
)
from refssm.verify.metrics import BUDGETS, normwise_error

from _scan_cases import make_case

SCAN = BUDGETS["scan"]          # 1e-12
CORE_KEYS = ("u", "dt", "dtB", "A", "B4", "C4", "h0")
API_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


# --------------------------------------------------------------------------
# fexp: ulp error against np.exp
# --------------------------------------------------------------------------
def _ulp_distance(a, b):
    """|a - b| in units in the last place (ordered integer distance of the bit patterns).

    Both non-negative here (exp): the bit patterns are ordered like the values,
    subnormals count in units of the smallest subnormal, 0.0 is 0.
    """
    ity = np.int64 if a.dtype == np.float64 else np.int32
    return np.abs(a.view(ity).astype(np.int64) - b.view(ity).astype(np.int64))


def _exp_points(dtype, lo, n_grid=2_000_001, n_rand=1_000_000):
    rng = np.random.default_rng(0)
    tiny = np.finfo(dtype).tiny
    edge = float(np.log(np.finfo(dtype).smallest_subnormal))     # where exp underflows to 0
    x = np.concatenate([
        np.linspace(lo, 0.0, n_grid),                             # dense grid
        rng.uniform(lo, 0.0, n_rand),                             # random points
        -rng.exponential(1.0, 100_000),                           # small arguments
        np.linspace(np.log(tiny) - 1, np.log(tiny) + 1, 100_001), # normal -> subnormal
        np.linspace(edge - 1, edge + 1, 100_001),                 # subnormal -> 0
        [0.0, -0.0, -1e-30, lo],
    ])
    return x.astype(dtype)


def test_fastexp_ulp_float64():
    """<= 2 ulp against np.exp over [-760, 0] (measured: 1 ulp), exact 0 where np.exp is 0."""
    x = _exp_points(np.float64, -760.0)
    got = fexp_array(x)
    ref = np.exp(x)
    d = _ulp_distance(got, ref)
    assert d.max() <= 2, f"max {d.max()} ulp at x={x[np.argmax(d)]!r}"
    assert np.all(got[ref == 0.0] == 0.0)
    assert np.isfinite(got).all() and (got >= 0).all()
    print(f"fexp float64: max {d.max()} ulp, {np.mean(d > 0):.2%} of points differ")


def test_fastexp_ulp_float32():
    """<= 2 ulp over [-110, 0] against exp correctly rounded to float32 (measured: 1 ulp).

    The reference is np.exp evaluated in float64 and rounded to float32: numpy's
    own float32 exp (SIMD) is itself up to 2 ulp away from that on this
    machine, so a 2 ulp budget against it would test numpy, not fexp. The
    distance to numpy's float32 result is also bounded (<= 3 ulp measured).
    """
    x = _exp_points(np.float32, -110.0)
    got = fexp_array(x)
    ref = np.exp(x.astype(np.float64)).astype(np.float32)
    d = _ulp_distance(got, ref)
    assert d.max() <= 2, f"max {d.max()} ulp at x={x[np.argmax(d)]!r}"
    assert np.all(got[ref == 0.0] == 0.0)
    assert np.isfinite(got).all() and (got >= 0).all()
    d_np = _ulp_distance(got, np.exp(x))
    assert d_np.max() <= 4
    print(f"fexp float32: max {d.max()} ulp (vs np.exp float32: {d_np.max()})")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fastexp_special_values(dtype):
    x = np.array([np.nan, -np.inf, np.inf, 0.0, -1e6, 1e6, 1.0, 50.0], dtype=dtype)
    got = fexp_array(x)
    assert np.isnan(got[0])
    np.testing.assert_array_equal(got[1:6], np.array([0.0, np.inf, 1.0, 0.0, np.inf], dtype))
    assert np.all(_ulp_distance(got[6:], np.exp(x[6:].astype(np.float64)).astype(dtype)) <= 2)
    # positive arguments up to the overflow threshold
    xp = np.linspace(0, 88.7 if dtype == np.float32 else 709.7, 10001).astype(dtype)
    ref = np.exp(xp.astype(np.float64)).astype(dtype)
    assert _ulp_distance(fexp_array(xp), ref).max() <= 2
    assert float(fexp(dtype(-1.0))) == pytest.approx(np.exp(-1.0), rel=2e-7)


def _ulps(a, ref):
    """|a - ref| in ulps of ``ref`` (values of one sign; ``np.spacing`` of the reference)."""
    return np.abs(a.astype(np.float64) - ref.astype(np.float64)) / np.spacing(np.abs(ref))


def test_flog1p_softplus_sigmoid_ulp():
    """The fused kernels' log1p, softplus and sigmoid against 40-digit mpmath and NumPy.

    Measured (float64): log1p <= 2 ulp against mpmath over [0, 1] (np.log1p: 1);
    softplus <= 2 ulp against mpmath and <= 3 against the NumPy engine's
    form over [-50, 50] and random points in [-800, 800]; sigmoid <= 2 ulp
    against mpmath (as NumPy's), <= 4 against NumPy's. float32: softplus and
    sigmoid <= 3 ulp against the correctly rounded value (normal results).
    Asserted: those figures.
    """
    mpmath = pytest.importorskip("mpmath")
    from refssm.scan._fastexp import flog1p_array, fsigmoid_array, fsoftplus_array
    from refssm.ssm.selective_scan import _sigmoid, softplus

    rng = np.random.default_rng(0)
    t = np.concatenate([np.linspace(0, 1, 200_001), rng.uniform(0, 1, 100_000),
                        10.0 ** rng.uniform(-300, 0, 10_000)])
    x = np.concatenate([np.linspace(-50, 50, 200_001), rng.uniform(-800, 800, 20_000)])
    tiny = np.finfo(np.float64).tiny

    def check(got, ref, ulps):
        """<= ``ulps`` where ``ref`` is normal; below that (softplus(x) for x < -708)
        within 2 units of the smallest subnormal."""
        normal = np.abs(ref) >= tiny
        assert _ulps(got[normal], ref[normal]).max() <= ulps
        assert np.abs(got[~normal] - ref[~normal]).max(initial=0.0) <= 1e-323

    check(flog1p_array(t), np.log1p(t), 2)
    check(fsoftplus_array(x), softplus(x), 3)
    check(fsigmoid_array(x), _sigmoid(x), 4)
    with mpmath.workdps(40):
        ts, xs = t[::61], x[::47]
        ref_l = np.array([float(mpmath.log1p(mpmath.mpf(v))) for v in ts])
        ref_sp = np.array([float(mpmath.log1p(mpmath.exp(mpmath.mpf(v)))) for v in xs])
        ref_sg = np.array([float(1 / (1 + mpmath.exp(-mpmath.mpf(v)))) for v in xs])
    check(flog1p_array(ts), ref_l, 2)
    check(fsoftplus_array(xs), ref_sp, 2)
    # (below x = -709.78, exp(-x) overflows: 1 / (1 + exp(-x)) is 0, as NumPy's, not the
    # true subnormal; NumPy's form is the ground truth, so only the normal range here)
    keep = xs > -708.0
    check(fsigmoid_array(xs[keep]), ref_sg[keep], 2)
    x32 = x.astype(np.float32)
    x64 = x32.astype(np.float64)
    for got, ref in ((fsoftplus_array(x32), softplus(x64)), (fsigmoid_array(x32), _sigmoid(x64))):
        ref = ref.astype(np.float32)
        normal = ref >= np.finfo(np.float32).tiny
        assert _ulps(got[normal], ref[normal]).max() <= 3


# --------------------------------------------------------------------------
# The core against the NumPy engine
# --------------------------------------------------------------------------
def _core_case(rng, batch, seq_len, channels, state, B_kind, C_kind, groups=2,
               dt_range=(1e-3, 1.0), dtype=np.float64):
    def bc(kind):
        shape = {"variable": (batch, seq_len, state),
                 "grouped": (batch, seq_len, groups, state),
                 "constant": (channels, state)}[kind]
        M4, _ = normalise_bc(rng.standard_normal(shape), "B", batch, seq_len, channels, state)
        return np.ascontiguousarray(M4, dtype=dtype)

    u = rng.standard_normal((batch, seq_len, channels))
    dt = rng.uniform(*dt_range, (batch, seq_len, channels))
    dtB = rng.uniform(*dt_range, (batch, seq_len, channels))
    A = -np.arange(1.0, state + 1)[None, :] * rng.uniform(0.3, 2.0, (channels, 1))
    h0 = rng.standard_normal((batch, channels, state))
    cast = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return (cast(u), cast(dt), cast(dtB), cast(A), bc(B_kind), bc(C_kind), cast(h0))


def _check_core(args, rng, dh_last=True, budget=SCAN):
    y0, h0, s0 = numpy_seq.scan_core_forward(*args)
    y1, h1, s1 = numba_seq.scan_core_forward(*args)
    assert normwise_error(y1, y0) <= budget
    assert normwise_error(h1, h0) <= budget
    dy = rng.standard_normal(y0.shape)
    dh = rng.standard_normal(h0.shape) if dh_last else None
    g0 = numpy_seq.scan_core_backward(dy, dh, s0)
    g1 = numba_seq.scan_core_backward(dy, dh, s1)
    assert set(g1) == set(CORE_KEYS)
    for k in CORE_KEYS:
        assert g1[k].shape == g0[k].shape and g1[k].dtype == g0[k].dtype, k
        err = normwise_error(g1[k], g0[k])
        assert err <= budget, f"d{k}: {err:.2e}"


@pytest.mark.parametrize("B_kind,C_kind", [
    ("variable", "variable"), ("grouped", "grouped"), ("constant", "constant"),
    ("variable", "constant"), ("constant", "grouped"),
])
@pytest.mark.parametrize("seq_len,batch,state", [
    (1, 1, 16), (2, 3, 1), (7, 2, 16), (65, 3, 16), (65, 1, 1), (130, 2, 5),
    (70, 2, 20),          # state: two 8-lane vector blocks and a scalar tail of 4
])
def test_core_matches_numpy_engine(B_kind, C_kind, seq_len, batch, state):
    rng = np.random.default_rng(seq_len * 100 + batch * 10 + state)
    args = _core_case(rng, batch, seq_len, 6, state, B_kind, C_kind)
    _check_core(args, rng)


def test_core_without_dh_last():
    rng = np.random.default_rng(2)
    _check_core(_core_case(rng, 2, 70, 4, 3, "variable", "grouped"), rng, dh_last=False)


@pytest.mark.parametrize("channels,groups,batch", [(48, 4, 1), (40, 8, 3), (33, 3, 2)])
def test_core_many_channels_and_groups(channels, groups, batch):
    """Channel blocks, backward partitions and groups that do not line up."""
    rng = np.random.default_rng(channels)
    for kinds in (("grouped", "grouped"), ("variable", "constant"), ("constant", "variable")):
        _check_core(_core_case(rng, batch, 67, channels, 4, *kinds, groups=groups), rng)


def test_core_long_sequence():
    rng = np.random.default_rng(4097)
    _check_core(_core_case(rng, 2, 4097, 3, 16, "variable", "variable"), rng)


def test_spare_lanes_start_clean_in_every_item():
    """A partition's buffers serve several items: spare lanes must not carry the last one's.

    More items than partitions (32 x 3 blocks of 16 channels), the last block
    partial (33 channels), one group per channel; an infinite initial state in
    channel 21 must make only its own group's gradients non-finite (it leaked
    into group 32 through stale spare lanes, summed into ``dC``).
    """
    rng = np.random.default_rng(0)
    batch, L, ch, N = 32, 5, 33, 2
    u = rng.standard_normal((batch, L, ch))
    dt = rng.uniform(0.01, 0.5, (batch, L, ch))
    A = -np.ones((ch, N))
    B4 = rng.standard_normal((batch, L, ch, N))
    C4 = rng.standard_normal((batch, L, ch, N))
    h0 = rng.standard_normal((batch, ch, N))
    h0[:, 21, 0] = np.inf
    dy = rng.standard_normal((batch, L, ch))
    bad = {}
    for name, mod in (("numpy", numpy_seq), ("numba", numba_seq)):
        with np.errstate(invalid="ignore"):          # inf * 0 in the NumPy engine's sums
            _, _, s = mod.scan_core_forward(u, dt, dt, A, B4, C4, h0)
            g = mod.scan_core_backward(dy, None, s)
        bad[name] = [sorted(set(np.nonzero(~np.isfinite(g[k]))[2].tolist())) for k in ("B4", "C4")]
    assert bad["numba"] == bad["numpy"] and bad["numpy"][1] == [21]


def test_saved_values_are_small_and_named():
    rng = np.random.default_rng(0)
    args = _core_case(rng, 2, 130, 3, 4, "variable", "variable")
    _, _, saved = numba_seq.scan_core_forward(*args)
    assert isinstance(saved, numba_seq.NumbaSaved)
    nc = -(-130 // saved.chunk)
    assert saved.checkpoints.shape == (2, nc, 3, 4)
    np.testing.assert_array_equal(saved.checkpoints[:, 0], args[-1])      # = h0
    big = 2 * 130 * 3 * 4
    assert all(np.asarray(v).size < big for v in saved)


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(5)
    args = _core_case(rng, 2, 100, 40, 8, "variable", "constant")
    dy = rng.standard_normal((2, 100, 40))
    old = numba.get_num_threads()
    try:
        outs = []
        for nt in sorted({1, old}):
            numba.set_num_threads(nt)
            y, h, s = numba_seq.scan_core_forward(*args)
            outs.append((y, h, numba_seq.scan_core_backward(dy, h, s)))
    finally:
        numba.set_num_threads(old)
    (y0, h0, g0), (y1, h1, g1) = outs[0], outs[-1]
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(h0, h1)
    for k in CORE_KEYS:
        np.testing.assert_array_equal(g0[k], g1[k])


@pytest.mark.parametrize("edifice", [False, True])
def test_fused_api_does_not_depend_on_thread_count(edifice):
    """The fused prologue/epilogue (and the channel-mean's partial sums) are bit-reproducible."""
    rng = np.random.default_rng(6)
    args = make_case(rng, batch=2, seq_len=100, channels=40, state=8, bc="grouped", groups=4)
    opts = dict(delta_softplus=True)
    if edifice:
        opts.update(delta_clip=(0.05, 0.4), delta_b_mean=True)
    W = rng.standard_normal(args["u"].shape)
    old = numba.get_num_threads()
    try:
        outs = []
        for nt in sorted({1, old}):
            numba.set_num_threads(nt)
            out, h, s = selective_scan_forward(**args, **opts, engine="numba")
            outs.append((out, h, selective_scan_backward(W, h, s)))
    finally:
        numba.set_num_threads(old)
    (o0, h0, g0), (o1, h1, g1) = outs[0], outs[-1]
    np.testing.assert_array_equal(o0, o1)
    np.testing.assert_array_equal(h0, h1)
    for k in API_KEYS:
        np.testing.assert_array_equal(g0[k], g1[k])


# --------------------------------------------------------------------------
# Through the public API
# --------------------------------------------------------------------------
@pytest.mark.parametrize("bc", ["variable", "grouped", "constant"])
@pytest.mark.parametrize("opts", [dict(delta_softplus=True),
                                  dict(delta_softplus=True, delta_clip=(0.05, 0.4),
                                       delta_b_mean=True)])
@pytest.mark.parametrize("channels", [
    6,      # one block, 10 spare lanes; rows staged one at a time
    39,     # blocks of 16, 16 and 7; groups of 13 channels span blocks (gathered B/C)
])
def test_public_api_numba_engine(bc, opts, channels):
    rng = np.random.default_rng(17)
    args = make_case(rng, batch=2, seq_len=70, channels=channels, state=16, bc=bc, groups=3)
    W = rng.standard_normal(args["u"].shape)
    Wh = rng.standard_normal(args["initial_state"].shape)
    res = {}
    for engine in ("numpy", "numba"):
        out, h, saved = selective_scan_forward(**args, **opts, engine=engine)
        res[engine] = (out, h, selective_scan_backward(W, Wh, saved))
    (o0, h0, g0), (o1, h1, g1) = res["numpy"], res["numba"]
    assert normwise_error(o1, o0) <= SCAN
    assert normwise_error(h1, h0) <= SCAN
    for k in API_KEYS:
        err = normwise_error(g1[k], g0[k])
        assert err <= SCAN, f"d{k}: {err:.2e}"


# --------------------------------------------------------------------------
# Extreme regimes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dt_value", [1e-8, 1e3])
def test_extreme_step_sizes(dt_value):
    """dt = 1e3: A_bar = exp(-1e3 ...) underflows to exactly 0; dt = 1e-8: A_bar ~ 1."""
    rng = np.random.default_rng(1)
    args = list(_core_case(rng, 2, 50, 3, 16, "variable", "variable"))
    args[1] = np.full_like(args[1], dt_value)
    args[2] = np.full_like(args[2], dt_value)
    y, h, s = numba_seq.scan_core_forward(*args)
    g = numba_seq.scan_core_backward(rng.standard_normal(y.shape), rng.standard_normal(h.shape), s)
    assert np.isfinite(y).all() and np.isfinite(h).all()
    assert all(np.isfinite(v).all() for v in g.values())
    _check_core(args, rng)


def test_long_sequence_with_abar_near_one():
    """A_bar = exp(-1e-5 ...) over 100000 steps: against the NumPy engine and a closed form.

    Against the NumPy engine (forward and backward): <= 1e-12 (measured: the
    forward is bit-for-bit equal, gradients <= 4e-16). Against the exact
    closed form both engines differ by the same 1.9e-12: the float64
    recurrence itself rounds ``h`` in the same direction at every step of
    this constant-input case, an error bounded by ``L * eps`` (1.1e-11), which
    is that check's budget.
    """
    L = 100_000
    rng = np.random.default_rng(3)
    A = -np.array([[1.0, 0.5], [2.0, 0.25]])                     # [channels=2, state=2]
    dt = np.full((1, L, 2), 1e-5)
    u = np.ones((1, L, 2))
    B4 = np.ones((1, 1, 2, 2))
    C4 = np.ones((1, 1, 2, 2))
    h0 = np.zeros((1, 2, 2))
    args = (u, dt, dt, A, B4, C4, h0)
    y, h, s = numba_seq.scan_core_forward(*args)
    y_ref, h_ref, s_ref = numpy_seq.scan_core_forward(*args)
    assert np.isfinite(y).all() and np.isfinite(h).all()
    assert normwise_error(y, y_ref) <= SCAN
    assert normwise_error(h, h_ref) <= SCAN
    dy = rng.standard_normal(y.shape)
    g = numba_seq.scan_core_backward(dy, None, s)
    g_ref = numpy_seq.scan_core_backward(dy, None, s_ref)
    for k in CORE_KEYS:
        assert np.isfinite(g[k]).all()
        assert normwise_error(g[k], g_ref[k]) <= SCAN, k
    # closed form of h[t] = a h[t-1] + dt with the same a = fexp(dt * A)
    a = fexp_array((1e-5 * A).ravel()).reshape(A.shape)
    t = np.arange(1, L + 1)[:, None, None]
    h_exact = 1e-5 * (-np.expm1(t * np.log(a))) / (1.0 - a)     # [L, channels, state]
    budget = L * np.finfo(np.float64).eps / 2
    assert normwise_error(y[0], h_exact.sum(axis=-1)) <= budget
    assert normwise_error(h[0], h_exact[-1]) <= budget


# --------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------
#: Measured normwise error of the float32 fused engine against the float64
#: NumPy engine on the case below (seq_len 2048, state 16, dt in [1e-3, 1e-1]),
#: worst over 8 seeds: y 2.2e-7, h 3.3e-7; gradients <= 3.8e-7 except dA
#: 1.2e-6 (a sum over batch and time). Budgets: about 6x and 8x that.
F32_BUDGET_Y = 2e-6
F32_BUDGET_GRAD = 1e-5


def test_float32_error_against_float64():
    rng = np.random.default_rng(32)
    args64 = _core_case(rng, 2, 2048, 8, 16, "variable", "variable", dt_range=(1e-3, 1e-1))
    args32 = [a.astype(np.float32) for a in args64]
    y64, h64, s64 = numpy_seq.scan_core_forward(*args64)
    y32, h32, s32 = numba_seq.scan_core_forward(*args32)
    assert y32.dtype == np.float32 and h32.dtype == np.float32
    err_y = normwise_error(y32, y64)
    err_h = normwise_error(h32, h64)
    dy = rng.standard_normal(y64.shape)
    g64 = numpy_seq.scan_core_backward(dy, None, s64)
    g32 = numba_seq.scan_core_backward(dy.astype(np.float32), None, s32)
    errs = {k: normwise_error(g32[k], g64[k]) for k in CORE_KEYS}
    print(f"float32 vs float64: y {err_y:.2e}, h {err_h:.2e}, "
          + ", ".join(f"d{k} {v:.2e}" for k, v in errs.items()))
    assert err_y <= F32_BUDGET_Y and err_h <= F32_BUDGET_Y
    assert all(g32[k].dtype == np.float32 for k in CORE_KEYS)
    assert max(errs.values()) <= F32_BUDGET_GRAD, errs


@pytest.mark.parametrize("channels", [6, 39])
def test_float32_fused_api_against_float64(channels):
    """float32 through the fused prologue/epilogue, in partial and full channel blocks."""
    rng = np.random.default_rng(channels)
    args = make_case(rng, batch=2, seq_len=70, channels=channels, state=16, bc="grouped",
                     groups=3)
    args32 = {k: (None if v is None else v.astype(np.float32)) for k, v in args.items()}
    out64, h64, _ = selective_scan_forward(**args, delta_softplus=True, engine="numpy")
    out32, h32, _ = selective_scan_forward(**args32, delta_softplus=True, engine="numba")
    assert out32.dtype == np.float32
    assert normwise_error(out32, out64) <= F32_BUDGET_Y
    assert normwise_error(h32, h64) <= F32_BUDGET_Y


def test_stale_cache_guards():
    """Modules whose cached kernels inline code from other files record its fingerprint."""
    from refssm.models import mamba_stepper
    from refssm.scan import _fastexp, numba_logdepth

    assert numba_logdepth._DEPS_FINGERPRINT == _fastexp.deps_fingerprint(
        numba_seq._vector_loop_codegen, numba_seq._loop_intrinsic, numba_seq._check_loop_args,
        numba_seq._step_size, numba_seq._flag, numba_seq._splat, numba_seq._step_size_grad,
        numba_seq._halving_sum, numba_seq._dt_prime, numba_seq._gate, numba_seq._gate_grads)
    assert mamba_stepper._DEPS_FINGERPRINT == _fastexp.deps_fingerprint(
        numba_seq._forward_step_body, numba_seq._vector_loop_codegen,
        numba_seq._loop_intrinsic, numba_seq._check_loop_args, numba_seq._halving_sum)
    assert numba_seq._FEXP_FINGERPRINT == _fastexp.ir_fingerprint()
    with pytest.raises(ImportError, match="set the recorded fingerprint"):
        _fastexp.check_fingerprint("m", "old", "new")
