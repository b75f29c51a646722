"""Tests of refssm.ssm.discretize against scipy (expm, cont2discrete) and series.

Error measure everywhere: normwise ``max|a - b| / max(max|b|, tiny)``.
float64 budget: 1e-12 against scipy; 1e-14 against the tiny-delta series.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
from hypothesis import given, settings
from hypothesis import strategies as st

from refssm.ssm.discretize import (
    bilinear,
    bilinear_dense,
    euler,
    euler_dense,
    mamba_discretize,
    zoh,
    zoh_dense,
)

TINY = np.finfo(np.float64).tiny
BUDGET = 1e-12
DIAGONAL = {"zoh": zoh, "bilinear": bilinear, "euler": euler}
DENSE = {"zoh": zoh_dense, "bilinear": bilinear_dense, "euler": euler_dense}


def relerr(a, b) -> float:
    """Normwise relative error ``max|a - b| / max(max|b|, tiny)``."""
    a = np.asarray(a, dtype=np.complex128)
    b = np.asarray(b, dtype=np.complex128)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), TINY))


def stable_diagonal(rng, n, kind):
    """Diagonal of a stable A: Re in -[1e-2, 1e1] log-uniform; Im in [-100, 100] if complex."""
    re = -(10.0 ** rng.uniform(-2, 1, n))
    if kind == "real":
        return re
    return re + 1j * rng.uniform(-100, 100, n)


def log_uniform_delta(rng, lo=1e-4, hi=1e1):
    return float(10.0 ** rng.uniform(np.log10(lo), np.log10(hi)))


def random_b(rng, shape, complex_):
    b = rng.standard_normal(shape)
    return b + 1j * rng.standard_normal(shape) if complex_ else b


def stable_dense(rng, n):
    """A = -(M M^T + eps I) + (S - S^T): symmetric part negative definite."""
    M = rng.standard_normal((n, n))
    S = rng.standard_normal((n, n))
    return -(M @ M.T + 1e-2 * np.eye(n)) + (S - S.T)


def cont2discrete(A_dense, B, dt, method):
    n, m = B.shape
    C = np.zeros((1, n), dtype=A_dense.dtype)
    D = np.zeros((1, m))
    Ad, Bd, *_ = scipy.signal.cont2discrete((A_dense, B, C, D), dt, method=method)
    return Ad, Bd


# --------------------------------------------------------------------------
# diagonal A against scipy
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["real", "complex"])
def test_diagonal_zoh_A_bar_vs_expm(kind):
    rng = np.random.default_rng(1 if kind == "real" else 2)
    worst = 0.0
    for _ in range(100):
        n = int(rng.integers(1, 17))
        A = stable_diagonal(rng, n, kind)
        delta = log_uniform_delta(rng)
        A_bar, _ = zoh(A, np.ones(n), delta)
        ref = scipy.linalg.expm(delta * np.diag(A))
        worst = max(worst, relerr(np.diag(A_bar), ref))
    assert worst <= BUDGET, worst


@pytest.mark.parametrize("kind", ["real", "complex"])
@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler"])
def test_diagonal_vs_cont2discrete(kind, method):
    """Diagonal rules (MIMO B) against cont2discrete on diag(A); cont2discrete takes complex."""
    rng = np.random.default_rng(
        [("real", "complex").index(kind), ("zoh", "bilinear", "euler").index(method)])
    worst_a = worst_b = 0.0
    for _ in range(60):
        n, m = int(rng.integers(1, 13)), int(rng.integers(1, 5))
        A = stable_diagonal(rng, n, kind)
        B = random_b(rng, (n, m), kind == "complex")
        delta = log_uniform_delta(rng)
        A_bar, B_bar = DIAGONAL[method](A, B, delta)
        Ad, Bd = cont2discrete(np.diag(A), B, delta, method)
        worst_a = max(worst_a, relerr(np.diag(A_bar), Ad))
        worst_b = max(worst_b, relerr(B_bar, Bd))
    assert worst_a <= BUDGET, worst_a
    assert worst_b <= BUDGET, worst_b


@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler"])
def test_diagonal_per_column_delta_matches_cont2discrete(method):
    """Batched: A [C, N], delta [C, 1], B [C, N] (SISO) — each channel its own system."""
    rng = np.random.default_rng(7)
    C, n = 5, 6
    A = np.stack([stable_diagonal(rng, n, "complex") for _ in range(C)])
    delta = np.array([[log_uniform_delta(rng)] for _ in range(C)])
    B = random_b(rng, (C, n), True)
    A_bar, B_bar = DIAGONAL[method](A, B, delta)
    assert A_bar.shape == (C, n) and B_bar.shape == (C, n)
    for c in range(C):
        Ad, Bd = cont2discrete(np.diag(A[c]), B[c][:, None], float(delta[c, 0]), method)
        assert relerr(np.diag(A_bar[c]), Ad) <= BUDGET
        assert relerr(B_bar[c], Bd[:, 0]) <= BUDGET


def test_diagonal_zoh_vs_mpmath():
    """An independent, exact reference (mpmath, 40 digits) for diagonal ZOH.

    Two bounds. The algorithm (exp, expm1/z or its series) against the exact
    functions at the rounded product ``z = fl(delta * A)``: a few ulps. The
    whole result against the exact product ``delta * A``: ``exp`` has
    condition number ``|z|``, so rounding the product alone costs
    ``eps |z| / 2``; the bound is ``4 eps (|z| + 1)``.
    """
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    eps = np.finfo(np.float64).eps
    rng = np.random.default_rng(11)
    for kind in ("real", "complex"):
        A = stable_diagonal(rng, 60, kind)
        delta = 10.0 ** rng.uniform(-10, 1, 60)
        A_bar, B_bar = zoh(A, np.ones(60), delta)
        for a, d, ab, bb in zip(A, delta, A_bar, B_bar):
            zf = complex(d * a)                          # the product as rounded in float64
            zm = mpmath.mpc(zf.real, zf.imag)
            alg_a = complex(mpmath.exp(zm))
            alg_b = complex(mpmath.mpf(d) * mpmath.expm1(zm) / zm)
            assert abs(ab - alg_a) <= 4 * eps * abs(alg_a)
            assert abs(bb - alg_b) <= 4 * eps * abs(alg_b)
            am = mpmath.mpc(a.real, a.imag)
            exact_a = complex(mpmath.exp(mpmath.mpf(d) * am))
            exact_b = complex(mpmath.expm1(mpmath.mpf(d) * am) / am)
            bound = 4 * eps * (abs(zf) + 1)
            assert abs(ab - exact_a) <= bound * abs(exact_a)
            assert abs(bb - exact_b) <= bound * abs(exact_b)


# --------------------------------------------------------------------------
# dense A against scipy
# --------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler"])
def test_dense_vs_cont2discrete(method):
    rng = np.random.default_rng({"zoh": 3, "bilinear": 4, "euler": 5}[method])
    worst_a = worst_b = 0.0
    for _ in range(60):
        n, m = int(rng.integers(1, 9)), int(rng.integers(1, 4))
        A = stable_dense(rng, n)
        B = rng.standard_normal((n, m))
        delta = log_uniform_delta(rng)
        A_bar, B_bar = DENSE[method](A, B, delta)
        Ad, Bd = cont2discrete(A, B, delta, method)
        worst_a = max(worst_a, relerr(A_bar, Ad))
        worst_b = max(worst_b, relerr(B_bar, Bd))
    assert worst_a <= BUDGET, worst_a
    assert worst_b <= BUDGET, worst_b


def test_dense_zoh_vs_mpmath():
    """Dense ZOH (Van Loan) against mpmath's expm of the same block at 40 digits."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(12)
    for _ in range(4):
        n, m = int(rng.integers(2, 6)), 2
        A = stable_dense(rng, n)
        B = rng.standard_normal((n, m))
        delta = log_uniform_delta(rng, 1e-4, 1.0)
        A_bar, B_bar = zoh_dense(A, B, delta)
        block = np.zeros((n + m, n + m))
        block[:n, :n], block[:n, n:] = A, B
        E = mpmath.expm(mpmath.matrix(block.tolist()) * mpmath.mpf(delta))
        E = np.array(E.tolist(), dtype=np.float64)
        assert relerr(A_bar, E[:n, :n]) <= BUDGET
        assert relerr(B_bar, E[:n, n:]) <= BUDGET


@pytest.mark.parametrize("method", ["zoh", "bilinear", "euler"])
def test_diagonal_equals_dense_on_diag(method):
    rng = np.random.default_rng(9)
    for kind in ("real", "complex"):
        A = stable_diagonal(rng, 6, kind)
        B = random_b(rng, (6, 3), kind == "complex")
        delta = 0.37
        A_bar, B_bar = DIAGONAL[method](A, B, delta)
        Ad, Bd = DENSE[method](np.diag(A), B, delta)
        assert relerr(np.diag(A_bar), Ad) <= BUDGET
        assert relerr(B_bar, Bd) <= BUDGET


def test_dense_vector_B_and_real_A_complex_B():
    rng = np.random.default_rng(13)
    A = stable_dense(rng, 4)
    b = rng.standard_normal(4) + 1j * rng.standard_normal(4)
    for method, f in DENSE.items():
        A_bar, B_bar = f(A, b, 0.3)
        assert B_bar.shape == (4,) and np.iscomplexobj(B_bar)
        assert not np.iscomplexobj(A_bar)
        Ad, Bd = cont2discrete(A.astype(complex), b[:, None], 0.3, method)
        assert relerr(A_bar, Ad) <= BUDGET
        assert relerr(B_bar, Bd[:, 0]) <= BUDGET


# --------------------------------------------------------------------------
# tiny delta: the regime a naive (exp(dA) - 1)/A gets wrong
# --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["real", "complex"])
def test_zoh_tiny_delta_matches_series(kind):
    rng = np.random.default_rng(21)
    delta = 1e-10
    A = stable_diagonal(rng, 64, kind)
    B = random_b(rng, 64, kind == "complex")
    _, B_bar = zoh(A, B, delta)
    series = delta * B * (1 + delta * A / 2)     # next term (dA)^2/6 <= 2e-17 relative
    assert relerr(B_bar, series) <= 1e-14
    # the test discriminates: the textbook formula is ~1e-7 off here
    naive = (np.exp(delta * A) - 1) / A * B
    assert relerr(naive, series) > 1e-10


def test_zoh_A_zero_and_underflow_limit():
    """A == 0 gives the limit delta*B exactly; so does a delta*A that underflows."""
    A = np.array([0.0, -1e-300, -1.0])
    B = np.array([2.0, 3.0, 5.0])
    A_bar, B_bar = zoh(A, B, 0.25)
    assert A_bar[0] == 1.0 and B_bar[0] == 0.25 * 2.0
    assert B_bar[1] == 0.25 * 3.0
    # complex: NumPy's complex division returns 0.9999999999999999 for
    # (-2.5e-301)/(-2.5e-301) and inf+nanj for subnormal divisors; phi_1 must not divide there
    Az = np.array([0j, -1e-300 + 0j, -1e-300 + 1e-300j, -1e-310 + 0j, 1e-320j])
    eps = np.finfo(np.float64).eps
    for d in (0.25, 1e-10):
        A_bar, B_bar = zoh(Az, np.ones(5), d)
        z = d * Az
        assert np.all(np.isfinite(B_bar))
        assert relerr(A_bar, 1 + z) <= eps                  # exp(z) = 1 + z here
        assert relerr(B_bar, d * (1 + z / 2)) <= eps        # delta phi_1(z) = delta (1 + z/2)
        assert np.all(B_bar.real == d)


def test_phi1_branches_agree_at_threshold():
    """The series and quotient branches of phi_1 meet without a jump (complex and real)."""
    from refssm.ssm.discretize import _expm1_over_z

    thr = np.finfo(np.float64).eps ** (1 / 3)
    r = thr * np.array([0.999999, 1.000001])
    for z in (-r, r * np.exp(0.7j), r * np.exp(2.5j)):
        p = _expm1_over_z(z)
        ref = 1 + z / 2 + z**2 / 6 + z**3 / 24
        assert relerr(p, ref) <= 4 * np.finfo(np.float64).eps


# --------------------------------------------------------------------------
# Mamba's convention
# --------------------------------------------------------------------------

def _mamba_inputs(rng, batch=2, L=5, C=3, N=4, dt=(1e-3, 1e-1), dtype=np.float64):
    A = -np.tile(np.arange(1, N + 1, dtype=np.float64), (C, 1)) * rng.uniform(0.5, 2, (C, 1))
    delta = 10.0 ** rng.uniform(np.log10(dt[0]), np.log10(dt[1]), (batch, L, C))
    B = rng.standard_normal((batch, L, N))
    return A.astype(dtype), B.astype(dtype), delta.astype(dtype)


def test_mamba_shapes_A_bar_and_B_bar():
    rng = np.random.default_rng(31)
    A, B, delta = _mamba_inputs(rng)
    A_bar, B_bar = mamba_discretize(A, B, delta)
    assert A_bar.shape == B_bar.shape == (2, 5, 3, 4)
    A_zoh, B_zoh = zoh(A, B[..., None, :], delta[..., None])
    assert A_zoh.shape == (2, 5, 3, 4) and B_zoh.shape == (2, 5, 3, 4)
    assert relerr(A_bar, A_zoh) <= 1e-15
    assert np.array_equal(B_bar, delta[..., None] * B[..., None, :])
    # element check against the loop definition
    b, t, c, n = 1, 3, 2, 1
    assert A_bar[b, t, c, n] == np.exp(delta[b, t, c] * A[c, n])
    assert B_bar[b, t, c, n] == delta[b, t, c] * B[b, t, n]


@pytest.mark.parametrize("kind", ["real", "complex"])
def test_mamba_gap_to_zoh_is_half_delta_A(kind):
    """|delta B - B_zoh| / |B_zoh| = |delta A| / 2 + O((delta A)^2), per element."""
    rng = np.random.default_rng(32)
    A, B, delta = _mamba_inputs(rng, dt=(1e-6, 1e-4))
    if kind == "complex":
        A = A + 1j * rng.uniform(-20, 20, A.shape)
    _, B_bar = mamba_discretize(A, B, delta)
    _, B_zoh = zoh(A, B[..., None, :], delta[..., None])
    dA = np.abs(delta[..., None] * A)
    assert dA.max() < 1e-2
    ratio = (np.abs(B_bar - B_zoh) / np.abs(B_zoh)) / dA
    assert 0.4 <= ratio.min() and ratio.max() <= 0.6, (ratio.min(), ratio.max())


def test_mamba_step_shapes():
    """One recurrent step: delta [batch, C], B [batch, N]."""
    rng = np.random.default_rng(33)
    A, B, delta = _mamba_inputs(rng)
    A_bar, B_bar = mamba_discretize(A, B[:, 0], delta[:, 0])
    full_A, full_B = mamba_discretize(A, B, delta)
    assert np.array_equal(A_bar, full_A[:, 0]) and np.array_equal(B_bar, full_B[:, 0])


# --------------------------------------------------------------------------
# property tests (hypothesis): shapes, dtypes, float32 vs float64, identities
# --------------------------------------------------------------------------

def _f32(x):
    return x.astype(np.complex64 if np.iscomplexobj(x) else np.float32)


def _f64(x):
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


@settings(max_examples=60, deadline=None)
@given(
    method=st.sampled_from(["zoh", "bilinear", "euler"]),
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 6),
    m=st.one_of(st.none(), st.integers(1, 3)),
    complex_A=st.booleans(),
    complex_B=st.booleans(),
    log_delta=st.floats(-4, 1),
    per_element_delta=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_diagonal_shapes_and_float32(method, lead, n, m, complex_A, complex_B,
                                              log_delta, per_element_delta, seed):
    rng = np.random.default_rng(seed)
    shape = tuple(lead) + (n,)
    re = -(10.0 ** rng.uniform(-2, 1, shape))
    A = re + 1j * rng.uniform(-10, 10, shape) if complex_A else re
    B = random_b(rng, shape + ((m,) if m else ()), complex_B)
    if per_element_delta:
        delta = 10.0 ** (log_delta + rng.uniform(-0.5, 0.5, tuple(lead) + (1,)))
    else:
        delta = np.array(10.0 ** log_delta)
    f = DIAGONAL[method]

    A32, B32, d32 = _f32(A), _f32(B), _f32(delta)
    Ab32, Bb32 = f(A32, B32, d32)
    Ab64, Bb64 = f(_f64(A32), _f64(B32), _f64(d32))      # same (rounded) inputs in float64
    assert Ab64.shape == Ab32.shape == shape
    assert Bb64.shape == Bb32.shape == B.shape
    assert Ab32.dtype == (np.complex64 if complex_A else np.float32)
    assert Bb32.dtype == (np.complex64 if complex_A or complex_B else np.float32)
    assert Ab64.dtype == (np.complex128 if complex_A else np.float64)
    assert relerr(Ab32, Ab64) <= 1e-5
    assert relerr(Bb32, Bb64) <= 1e-5
    # the contract: single-precision results are the double results rounded once
    assert np.array_equal(Ab32, Ab64.astype(Ab32.dtype))
    assert np.array_equal(Bb32, Bb64.astype(Bb32.dtype))
    # mixed precision runs and returns double
    assert f(A32, B, d32)[1].dtype in (np.float64, np.complex128)


def test_python_float_delta_keeps_float32():
    A32, B32 = np.array([-1.0, -2.0], np.float32), np.ones(2, np.float32)
    for f in (zoh, bilinear, euler):
        assert f(A32, B32, 0.1)[0].dtype == np.float32
        assert f(A32, B32, np.float64(0.1))[0].dtype == np.float64     # a NumPy float64 is strong
    assert zoh_dense(-np.eye(2, dtype=np.float32), B32, 0.1)[1].dtype == np.float32
    Am, Bm, dm = _mamba_inputs(np.random.default_rng(0), dtype=np.float32)
    assert mamba_discretize(Am, Bm, dm)[0].dtype == np.float32


@settings(max_examples=30, deadline=None)
@given(
    method=st.sampled_from(["zoh", "bilinear", "euler"]),
    n=st.integers(1, 6),
    m=st.integers(1, 3),
    log_delta=st.floats(-4, 0),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_dense_float32(method, n, m, log_delta, seed):
    rng = np.random.default_rng(seed)
    A = stable_dense(rng, n)
    B = rng.standard_normal((n, m))
    delta = np.float32(10.0 ** log_delta)
    f = DENSE[method]
    Ab32, Bb32 = f(A.astype(np.float32), B.astype(np.float32), delta)
    Ab64, Bb64 = f(A.astype(np.float32).astype(np.float64),
                   B.astype(np.float32).astype(np.float64), np.float64(delta))
    assert Ab32.dtype == Bb32.dtype == np.float32
    assert relerr(Ab32, Ab64) <= 1e-5
    assert relerr(Bb32, Bb64) <= 1e-5
    assert np.array_equal(Ab32, Ab64.astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), complex_A=st.booleans(),
       log_d1=st.floats(-4, 1), log_d2=st.floats(-4, 1), seed=st.integers(0, 2**32 - 1))
def test_property_zoh_semigroup(n, complex_A, log_d1, log_d2, seed):
    """Exact ZOH composes: steps d1 then d2 equal one step d1 + d2."""
    rng = np.random.default_rng(seed)
    A = stable_diagonal(rng, n, "complex" if complex_A else "real")
    B = rng.standard_normal((n, 2))
    d1, d2 = 10.0 ** log_d1, 10.0 ** log_d2
    A1, B1 = zoh(A, B, d1)
    A2, B2 = zoh(A, B, d2)
    A12, B12 = zoh(A, B, d1 + d2)
    assert relerr(A2 * A1, A12) <= BUDGET
    assert relerr(A2[:, None] * B1 + B2, B12) <= BUDGET


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), log_delta=st.floats(-4, 1), seed=st.integers(0, 2**32 - 1))
def test_property_bilinear_stable_and_invertible(n, log_delta, seed):
    rng = np.random.default_rng(seed)
    A = stable_diagonal(rng, n, "complex")
    delta = 10.0 ** log_delta
    A_bar, _ = bilinear(A, np.ones(n), delta)
    assert np.all(np.abs(A_bar) < 1)
    # invert the Moebius map: A = (2/delta) (A_bar - 1) / (A_bar + 1)
    back = (2 / delta) * (A_bar - 1) / (A_bar + 1)
    assert relerr(back, A) <= 1e-9   # conditioning of the inverse map ~ |delta A|^2 / 4


# --------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------

def _bad_cases():
    ok1 = np.array([-1.0, -2.0])
    sq = -np.eye(2)
    col = np.ones((2, 1))
    nan = np.array([-1.0, np.nan])
    A_m, B_m, d_m = -np.ones((3, 4)), np.ones((2, 5, 4)), np.full((2, 5, 3), 0.1)
    return [
        # non-finite
        ("nan A", lambda: zoh(nan, ok1, 0.1), r"A: expected finite values, got 1 NaN/inf"),
        ("inf B", lambda: bilinear(ok1, np.array([1.0, np.inf]), 0.1),
         r"B: expected finite values, got 1 NaN/inf"),
        ("nan delta", lambda: euler(ok1, ok1, np.nan), r"delta: expected finite values, got 1"),
        ("inf dense", lambda: zoh_dense(np.array([[np.inf, 0], [0, 1.0]]), col, 0.1),
         r"A: expected finite values, got 1"),
        # integer / wrong kind
        ("int A", lambda: zoh(np.array([-1, -2]), ok1, 0.1),
         r"A: expected a floating-point or complex array.*got dtype int64"),
        ("int delta", lambda: zoh(ok1, ok1, 1),
         r"delta: expected a floating-point array .*got dtype int64"),
        ("complex delta", lambda: zoh(ok1, ok1, 0.1 + 0j),
         r"delta: expected a floating-point array .*got dtype complex128"),
        ("int dense B", lambda: euler_dense(sq, np.ones((2, 1), dtype=np.int32), 0.1),
         r"B: expected a floating-point or complex array.*got dtype int32"),
        ("int mamba", lambda: mamba_discretize(A_m, B_m, np.ones((2, 5, 3), dtype=int)),
         r"delta: expected a floating-point array .*got dtype int64"),
        # delta <= 0
        ("zero delta", lambda: zoh(ok1, ok1, 0.0), r"delta: expected every step size > 0, got 0\.0"),
        ("negative delta", lambda: bilinear(ok1, ok1, np.array([0.1, -0.2])),
         r"delta: expected every step size > 0, got -0\.2 at index \(1,\)"),
        ("negative dense delta", lambda: bilinear_dense(sq, col, -1.0),
         r"delta: expected every step size > 0, got -1\.0"),
        ("zero mamba delta", lambda: mamba_discretize(A_m, B_m, np.zeros((2, 5, 3))),
         r"delta: expected every step size > 0, got 0\.0 at index \(0, 0, 0\)"),
        # dense shapes
        ("non-square A", lambda: zoh_dense(np.ones((2, 3)), col, 0.1),
         r"A: expected a square 2-D matrix \[N, N\], got shape \(2, 3\)"),
        ("1-D dense A", lambda: euler_dense(ok1, ok1, 0.1),
         r"A: expected a square 2-D matrix \[N, N\], got shape \(2,\)"),
        ("B rows dense", lambda: bilinear_dense(sq, np.ones((3, 1)), 0.1),
         r"B: expected shape \(2, 1\).*got \(3, 1\)"),
        ("B 3-D dense", lambda: zoh_dense(sq, np.ones((2, 1, 1)), 0.1),
         r"B: expected 1 or 2 dimensions, got shape \(2, 1, 1\)"),
        ("array dense delta", lambda: zoh_dense(sq, col, np.array([0.1, 0.2])),
         r"delta: expected a scalar step size \(shape \(\)\).*got shape \(2,\)"),
        # diagonal shapes
        ("B rows MIMO", lambda: zoh(ok1, np.ones((3, 4)), 0.1),
         r"B: expected MIMO shape \[\.\.\., N, M\] with N = 2 rows.*got shape \(3, 4\)"),
        ("B SISO mismatch", lambda: euler(ok1, np.ones(3), 0.1),
         r"B: expected a shape broadcastable with \(2,\).*got \(3,\)"),
        ("delta mismatch", lambda: zoh(-np.ones((3, 4)), np.ones((3, 4)), np.full(3, 0.1)),
         r"delta: expected a shape broadcastable with A \(3, 4\).*got \(3,\)"),
        ("delta widens state", lambda: zoh(np.array([-1.0]), np.ones(1), np.full(3, 0.1)),
         r"delta: expected a trailing axis of size 1 or N = 1.*got shape \(3,\)"),
        ("scalar A", lambda: zoh(np.float64(-1.0), 1.0, 0.1),
         r"A: expected the diagonal of A as an array \[\.\.\., N\].*got shape \(\)"),
        # mamba shapes
        ("mamba A 1-D", lambda: mamba_discretize(-np.ones(4), B_m, d_m),
         r"A: expected shape \[channels, state\] \(2-D\), got shape \(4,\)"),
        ("mamba channels", lambda: mamba_discretize(-np.ones((5, 4)), B_m, d_m),
         r"delta: expected shape \[batch, seq_len, channels\] with channels = 5.*got \(2, 5, 3\)"),
        ("mamba B", lambda: mamba_discretize(A_m, np.ones((2, 4, 4)), d_m),
         r"B: expected shape \(2, 5, 4\).*got \(2, 4, 4\)"),
        # singular bilinear
        ("bilinear pole", lambda: bilinear(np.array([-1.0, 4.0]), ok1, 0.5),
         r"bilinear: expected delta\*A != 2.*got 1 - delta\*A/2 == 0 at index \(1,\)"),
        ("bilinear_dense singular", lambda: bilinear_dense(4.0 * np.eye(2), col, 0.5),
         r"bilinear_dense: expected I - delta/2\*A nonsingular \(condition number < 1/eps.*"
         r"got condition number inf"),
        # overflow
        ("zoh overflow", lambda: zoh(np.array([800.0]), np.ones(1), 1.0),
         r"zoh: expected a finite A_bar, got 1 inf/NaN.*max Re\(delta\*A\) = 800.*expected below"),
        ("zoh_dense overflow", lambda: zoh_dense(np.array([[800.0]]), np.ones(1), 1.0),
         r"zoh_dense: expected a finite exp\(delta\*\[\[A, B\], \[0, 0\]\]\), got"),
    ]


@pytest.mark.parametrize("name,call,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises(name, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bilinear_dense_near_singular_raises():
    """An eigenvalue of delta*A at 2 up to rounding: singular to working precision."""
    rng = np.random.default_rng(41)
    Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    A = Q @ np.diag([4.0, -1.0, -2.0]) @ Q.T        # eigenvalue 4 = 2 / delta
    with pytest.raises(ValueError, match=r"expected I - delta/2\*A nonsingular.*got condition"):
        bilinear_dense(A, np.ones((3, 1)), 0.5)
