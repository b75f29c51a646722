"""The S5 SSM core (float64): HiPPO-N initialisation, discretisation, conjugate
symmetry, the five engines, manual backward, bad input.

Independent references: ``numpy.linalg.eigvals`` of the dense HiPPO-N matrix,
``scipy.linalg.expm`` of the dense system, a dense real-coefficient recurrence,
the conjugate-completed full system, the dense convolution kernel, mpmath, and
central finite differences. Error measure: normwise ``max|a-b| / max|b|``
(:func:`refssm.verify.metrics.normwise_error`). Budgets: DESIGN.md section 4.
"""
from __future__ import annotations

import math
import zlib

import mpmath
import numpy as np
import pytest
import scipy.linalg

from refssm.ssm import s5 as S
from refssm.ssm.discretize import bilinear_dense, zoh_dense
from refssm.verify.metrics import BUDGETS, normwise_error

SCAN = BUDGETS["scan"]                 # 1e-12
DISC = BUDGETS["discretization"]       # 1e-12
FD = BUDGETS["grad_fd"]                # 1e-6
FAST = ("numba", "logdepth", "fft", "fft_dense")


def figure(name, value):
    """Print a measured figure (``pytest -s`` shows them; the report quotes them)."""
    print(f"FIGURE {name}: {value:.3e}")


def random_params(rng, H, N, *, conj_sym=True, bidirectional=False, near_one=False,
                  C_init="lecun_normal"):
    """Parameters with teeth: Re(Lambda) spread over [-1, -1e-4], fast rotations, steps to 0.5."""
    p = S.init_s5_ssm(H, N, conj_sym=conj_sym, bidirectional=bidirectional, C_init=C_init,
                      rng=rng)
    P = p["Lambda_re"].size
    p["Lambda_re"] = -np.exp(rng.uniform(math.log(1e-4), 0.0, P))
    p["Lambda_im"] = p["Lambda_im"] * rng.uniform(0.5, 3.0, P)
    p["log_step"] = rng.uniform(math.log(1e-3), math.log(0.5), P)
    p["D"] = rng.standard_normal(H)
    if near_one:      # |Lambda_bar| = exp(Re(Lambda) Delta) within 1e-8 .. 1e-6 of 1
        p["Lambda_re"] = -rng.uniform(1e-5, 1e-4, P)
        p["log_step"] = rng.uniform(math.log(1e-3), math.log(1e-2), P)
    return p


def complex_normal(rng, shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


# ===========================================================================
# HiPPO-N initialisation
# ===========================================================================

def test_hippo_legs_matches_its_definition():
    N = 7
    A = S.make_hippo(N)
    for n in range(N):
        for k in range(N):
            want = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1) if n > k else (
                -(n + 1) if n == k else 0.0)
            assert A[n, k] == pytest.approx(want, rel=1e-15, abs=0)
    S_ = S.make_normal_hippo(N)
    A2, p, b = S.make_nplr_hippo(N)
    assert np.array_equal(A2, A)
    assert normwise_error(S_, A + np.outer(p, p)) <= 1e-15          # S = A + p p^T
    assert np.all(np.diag(S_) == -0.5)


@pytest.mark.parametrize("N", [1, 2, 7, 16, 64])
def test_hippo_n_eigenvalues_real_part_and_direct_eig(N):
    """Re = -1/2 exactly; the eigenvalues equal numpy.linalg.eigvals of the dense HiPPO-N."""
    S_ = S.make_normal_hippo(N)
    assert np.allclose(S_ @ S_.T, S_.T @ S_, rtol=0, atol=1e-12 * N * N)       # normal
    Lam, V = S.hippo_n_eig(N)
    assert np.all(Lam.real == -0.5)
    direct = np.linalg.eigvals(S_)                                              # independent
    err_re = float(np.max(np.abs(direct.real + 0.5)) / np.max(np.abs(direct)))
    order = np.argsort(direct.imag)
    err = normwise_error(Lam, direct[order])
    figure(f"hippo_n eig vs numpy.eigvals N={N}", err)
    figure(f"hippo_n Re(eig)+1/2 direct N={N}", err_re)
    assert err <= 1e-13 and err_re <= 1e-13
    assert normwise_error(V.conj().T @ V, np.eye(N)) <= 1e-13                   # unitary
    assert normwise_error(V @ np.diag(Lam) @ V.conj().T, S_) <= 1e-13
    # ascending imaginary parts; the first half is one of every conjugate pair
    assert np.all(np.diff(Lam.imag) > 0) or N == 1
    if N % 2 == 0:
        h = N // 2
        assert np.allclose(Lam[:h], np.conj(Lam[h:][::-1]), rtol=0, atol=1e-12 * N)
        assert np.all(Lam[:h].imag < 0)


def test_block_diagonal_init():
    Lam, V, Vinv = S.init_block_diagonal(12, blocks=3, conj_sym=True)
    L4, V4 = S.hippo_n_eig(4)
    assert Lam.shape == (6,) and V.shape == (12, 6) and Vinv.shape == (6, 12)
    assert np.array_equal(Lam, np.tile(L4[:2], 3))
    assert np.array_equal(V[4:8, 2:4], V4[:, :2]) and np.all(V[:4, 2:] == 0)
    assert np.array_equal(Vinv, V.conj().T)
    # the kept half plus its conjugate spans the whole block: 2 Re(V V^H) = I
    assert normwise_error(2 * np.real(V @ Vinv), np.eye(12)) <= 1e-13
    Lf, Vf, Vif = S.init_block_diagonal(12, blocks=3, conj_sym=False)
    assert Lf.shape == (12,) and normwise_error(Vif @ Vf, np.eye(12)) <= 1e-13


@pytest.mark.parametrize("C_init", S.C_INITS)
@pytest.mark.parametrize("conj_sym", [True, False])
def test_init_s5_ssm_distributions(C_init, conj_sym):
    """B_tilde = V^-1 B, C_tilde = C V with lindermanlab's fans; log_step in range."""
    H, N = 48, 64
    p = S.init_s5_ssm(H, N, conj_sym=conj_sym, C_init=C_init, rng=1)
    Lam, V, Vinv = S.init_block_diagonal(N, 1, conj_sym)
    assert np.array_equal(p["Lambda_re"], Lam.real) and np.array_equal(p["Lambda_im"], Lam.imag)
    B_t = p["B"][..., 0] + 1j * p["B"][..., 1]
    C_t = p["C"][..., 0] + 1j * p["C"][..., 1]
    # back to the real B [N, H]: 2 Re(V B_tilde) with conjugate symmetry, V B_tilde without
    B = 2 * np.real(V @ B_t) if conj_sym else V @ B_t
    assert np.max(np.abs(np.imag(B))) <= 1e-12
    B = np.real(B)
    lecun_bound = 2.0 / 0.87962566103423978
    assert abs(B.std() * math.sqrt(N) - 1) < 0.05 and np.abs(B).max() <= lecun_bound / math.sqrt(N)
    if C_init == "complex_normal":
        assert abs(p["C"].std() - math.sqrt(0.5)) < 0.03
    elif not conj_sym:
        C = C_t @ V.conj().T                                      # C_tilde V^H = C
        fan_in = N if C_init == "trunc_standard_normal" else N * H
        z = np.concatenate([C.real.ravel(), C.imag.ravel()]) * math.sqrt(fan_in)
        assert abs(z.std() - 1) < 0.05 and np.abs(z).max() <= lecun_bound + 1e-9
    step = np.exp(p["log_step"])
    assert np.all((step >= 1e-3) & (step <= 1e-1))
    assert abs(np.log(step).mean() - 0.5 * (math.log(1e-3) + math.log(1e-1))) < 0.7
    assert abs(p["D"].std() - 1) < 0.4


# ===========================================================================
# Discretisation
# ===========================================================================

@pytest.mark.parametrize("N", [8, 32])
def test_zoh_matches_expm_of_dense_system(N):
    """V diag(Lambda_bar) V^H = expm(Delta S) and V diag(coef) V^H B = zoh_dense's B_bar."""
    rng = np.random.default_rng(N)
    S_ = S.make_normal_hippo(N)
    Lam, V = S.hippo_n_eig(N)
    B = rng.standard_normal((N, 5))
    worst = 0.0
    for delta in (1e-3, 0.05, 0.7):
        Lb, Bb, _ = S.discretize_forward(Lam, V.conj().T @ B, np.full(N, delta))
        A_dense = scipy.linalg.expm(delta * S_)
        _, B_dense = zoh_dense(S_, B, delta)
        e1 = normwise_error(V @ np.diag(Lb) @ V.conj().T, A_dense)
        e2 = normwise_error(V @ Bb, B_dense)
        worst = max(worst, e1, e2)
    figure(f"ZOH vs expm(dense HiPPO-N) N={N}", worst)
    assert worst <= DISC


def test_zoh_per_state_matches_expm_of_van_loan_block():
    """Each state with its own step: expm([[lambda D, D], [0, 0]]) = [[Lambda_bar, coef], [0, 1]]."""
    rng = np.random.default_rng(3)
    P = 40
    Lam = -np.exp(rng.uniform(-9, 1, P)) + 1j * rng.uniform(-50, 50, P)
    Lam[:3] = [-1e-9 + 1e-9j, -0.5 + 0j, -1e-4 + 0j]            # tiny |Lambda Delta| too
    step = np.exp(rng.uniform(math.log(1e-4), math.log(1.0), P))
    Lb, Bb, saved = S.discretize_forward(Lam, np.ones((P, 1)), step)
    worst = 0.0
    for p in range(P):
        E = scipy.linalg.expm(np.array([[Lam[p] * step[p], step[p]], [0, 0]]))
        worst = max(worst, abs(Lb[p] - E[0, 0]) / abs(E[0, 0]), abs(Bb[p, 0] - E[0, 1]) / abs(E[0, 1]))
    figure("ZOH per state vs expm Van Loan", worst)
    assert worst <= DISC


def test_bilinear_matches_dense_solve():
    rng = np.random.default_rng(4)
    P, H = 12, 3
    Lam = -np.exp(rng.uniform(-4, 1, P)) + 1j * rng.uniform(-20, 20, P)
    Bt = complex_normal(rng, (P, H))
    for delta in (1e-3, 0.1, 1.0):
        Lb, Bb, _ = S.discretize_forward(Lam, Bt, np.full(P, delta), "bilinear")
        A_d, B_d = bilinear_dense(np.diag(Lam), Bt, delta)
        assert normwise_error(np.diag(Lb), A_d) <= DISC
        assert normwise_error(Bb, B_d) <= DISC


def _mp_derivs(lam, step, method):
    """mpmath reference of (dLambda_bar/dLambda, dLambda_bar/dstep, dcoef/dLambda, dcoef/dstep)."""
    mpmath.mp.dps = 40
    lam, step = mpmath.mpc(lam.real, lam.imag), mpmath.mpf(step)
    if method == "zoh":
        Lb = lambda l, s: mpmath.exp(l * s)                                  # noqa: E731
        cf = lambda l, s: mpmath.expm1(l * s) / l                            # noqa: E731
    else:
        Lb = lambda l, s: (1 + s * l / 2) / (1 - s * l / 2)                  # noqa: E731
        cf = lambda l, s: s / (1 - s * l / 2)                                # noqa: E731
    out = []
    for f in (Lb, cf):
        out.append(complex(mpmath.diff(lambda l: f(l, step), lam)))
        out.append(complex(mpmath.diff(lambda s: f(lam, s), step)))
    return out[0], out[1], out[2], out[3]


@pytest.mark.parametrize("method", S.DISCRETIZATIONS)
def test_discretize_backward_against_mpmath(method):
    """The chain-rule factors, including |Lambda Delta| down to 1e-10 (phi_2's series)."""
    rng = np.random.default_rng(5)
    cases = [(-0.5 + 3j, 0.05), (-1e-4 + 0j, 1e-3), (-2e-8 + 1e-8j, 5e-3), (-3 + 40j, 0.4),
             (-0.5 - 12j, 0.04)]
    worst = 0.0
    for lam, step in cases:
        Lam = np.array([lam])
        Bt = complex_normal(rng, (1, 2))
        Lb, Bb, saved = S.discretize_forward(Lam, Bt, np.array([step]), method)
        dLb_dL, dLb_ds, dc_dL, dc_ds = _mp_derivs(Lam[0], step, method)
        # probe: d_Lambda_bar = 1 (then i) and d_B_bar = 0, and the other way round
        for dLb, dBb, want_L, want_s in (
            (1.0, 0.0, np.conj(dLb_dL), np.real(np.conj(dLb_ds))),
            (0.0, 1.0, np.conj(dc_dL) * np.sum(np.conj(Bt)),
             np.real(np.conj(dc_ds) * np.sum(np.conj(Bt))))):
            g = S.discretize_backward(np.array([dLb + 0j]), np.full((1, 2), dBb + 0j), saved)
            worst = max(worst, abs(g["Lambda"][0] - want_L) / abs(want_L),
                        abs(g["step"][0] - want_s) / abs(want_s))
    figure(f"discretize_backward vs mpmath ({method})", worst)
    assert worst <= 1e-12


# ===========================================================================
# Conjugate symmetry
# ===========================================================================

@pytest.mark.parametrize("bidirectional", [False, True])
def test_conj_sym_half_system_equals_full_system(bidirectional):
    """2 Re(half) = Re(full) with [Lambda, conj Lambda], [B; conj B], [C, conj C]; full is real."""
    rng = np.random.default_rng(6)
    H, N, L = 4, 12, 50
    half = random_params(rng, H, N, bidirectional=bidirectional)
    full = S.expand_conj_sym(half, bidirectional=bidirectional)
    u = rng.standard_normal((2, L, H))
    x0 = None if bidirectional else complex_normal(rng, (2, N // 2))
    x0_full = None if x0 is None else np.concatenate([x0, np.conj(x0)], axis=1)
    y_half, x_half, _ = S.s5_ssm_forward(half, u, conj_sym=True, bidirectional=bidirectional,
                                         initial_state=x0)
    y_full, x_full, saved = S.s5_ssm_forward(full, u, conj_sym=False,
                                             bidirectional=bidirectional, initial_state=x0_full)
    err = normwise_error(y_half, y_full)
    figure(f"conj_sym half x2 vs full system (bidirectional={bidirectional})", err)
    assert err <= SCAN
    assert normwise_error(x_full[:, :N // 2], x_half) <= SCAN
    # the full system is a real one: C x has no imaginary part
    C = S.ssm_matrices(full, bidirectional=bidirectional)[2]
    imag = np.imag(saved.core.states @ C[:, :N].T)
    assert np.max(np.abs(imag)) <= 1e-13 * np.max(np.abs(y_full))


@pytest.mark.parametrize("blocks", [1, 2])
def test_conj_sym_equals_dense_real_coefficient_system(blocks):
    """HiPPO-N, equal steps: 2 Re(C V_h x) equals x_k = expm(D S) x_{k-1} + B_bar u_k, all real."""
    rng = np.random.default_rng(7)
    H, N, L, delta = 3, 16, 300, 0.05
    Lam, V, Vinv = S.init_block_diagonal(N, blocks, conj_sym=True)
    S_dense = scipy.linalg.block_diag(*([S.make_normal_hippo(N // blocks)] * blocks))
    B, C, D = rng.standard_normal((N, H)), rng.standard_normal((H, N)), rng.standard_normal(H)
    B_t, C_t = Vinv @ B, C @ V
    params = {"Lambda_re": Lam.real, "Lambda_im": Lam.imag,
              "B": np.stack([B_t.real, B_t.imag], -1), "C": np.stack([C_t.real, C_t.imag], -1),
              "D": D, "log_step": np.full(N // 2, math.log(delta))}
    u = rng.standard_normal((2, L, H))
    y, _, _ = S.s5_ssm_forward(params, u)
    A_d, B_d = zoh_dense(S_dense, B, delta)                          # real, scipy expm
    x = np.zeros((2, N))
    y_ref = np.empty_like(y)
    for k in range(L):
        x = x @ A_d.T + u[:, k] @ B_d.T
        y_ref[:, k] = x @ C.T + D * u[:, k]
    err = normwise_error(y, y_ref)
    figure(f"conj_sym S5 vs dense real system (J={blocks})", err)
    assert err <= SCAN


# ===========================================================================
# The engines: one meaning
# ===========================================================================

ENGINE_CASES = [(L, cs, bd) for L in (1, 2, 7, 64, 4097) for cs in (True, False)
                for bd in (False, True)]


@pytest.mark.parametrize("L,conj_sym,bidirectional", ENGINE_CASES)
def test_engines_agree_forward_and_backward(L, conj_sym, bidirectional):
    rng = np.random.default_rng(1000 + L + 10 * conj_sym + 100 * bidirectional)
    H, N = 5, 12
    params = random_params(rng, H, N, conj_sym=conj_sym, bidirectional=bidirectional)
    P = params["Lambda_re"].size
    u = rng.standard_normal((2, L, H))
    x0 = None if bidirectional else complex_normal(rng, (2, P))
    dy, dx = rng.standard_normal(u.shape), complex_normal(rng, (2, P))
    kw = dict(conj_sym=conj_sym, bidirectional=bidirectional, initial_state=x0)
    y, x, saved = S.s5_ssm_forward(params, u, **kw)
    g = S.s5_ssm_backward(dy, dx, saved)
    worst = {}
    for engine in FAST:
        y2, x2, saved2 = S.s5_ssm_forward(params, u, engine=engine, **kw)
        g2 = S.s5_ssm_backward(dy, dx, saved2)
        errs = {"y": normwise_error(y2, y), "last_state": normwise_error(x2, x)}
        errs.update({f"d{k}": normwise_error(g2[k], g[k]) for k in g})
        name = max(errs, key=errs.get)
        worst[engine] = (errs[name], name)
        assert errs[name] <= SCAN, f"{engine} {name}: {errs[name]:.2e}"
    e = max(worst.values())
    figure(f"engines vs numpy L={L} conj_sym={conj_sym} bidir={bidirectional} "
           f"(worst {e[1]} of {max(worst, key=worst.get)})", e[0])


@pytest.mark.parametrize("engine", ("numpy",) + FAST)
def test_near_one_and_bilinear_engines(engine):
    """|Lambda_bar| within 1e-6 of 1 over 4097 steps, bilinear, clip_eigs: engines still agree."""
    rng = np.random.default_rng(11)
    H, N, L = 4, 8, 4097
    params = random_params(rng, H, N, near_one=True)
    u = rng.standard_normal((1, L, H))
    kw = dict(discretization="bilinear", clip_eigs=True, step_rescale=0.7)
    y, x, saved = S.s5_ssm_forward(params, u, **kw)
    g = S.s5_ssm_backward(u, None, saved)
    y2, x2, saved2 = S.s5_ssm_forward(params, u, engine=engine, **kw)
    g2 = S.s5_ssm_backward(u, None, saved2)
    errs = [normwise_error(y2, y), normwise_error(x2, x)] + [normwise_error(g2[k], g[k])
                                                             for k in g]
    figure(f"near-one bilinear clip 4097 {engine} vs numpy", max(errs))
    assert max(errs) <= SCAN


def test_fft_engines_refuse_a_growing_kernel_the_scans_do_not():
    """An unstable eigenvalue (|Lambda_bar| = e^0.05, growth e^10 over 201 steps): the FFT's
    rounding, at the scale of the largest kernel value, swamped the early outputs (a review
    measured 7.7e+71 relative at growth e^200), so the FFT engines refuse; the scans agree."""
    rng = np.random.default_rng(12)
    H, N, L = 3, 4, 201
    params = random_params(rng, H, N)
    params["Lambda_re"][0], params["log_step"][0] = 0.5, math.log(0.1)
    u = rng.standard_normal((2, L, H))
    for engine in ("fft", "fft_dense"):
        with pytest.raises(ValueError, match=rf"{engine}: expected a stable system, .* got "
                                             r"2\.2e\+04 .* seq_len 201"):
            S.s5_ssm_forward(params, u, engine=engine)
    y, _, _ = S.s5_ssm_forward(params, u)
    for engine in ("numba", "logdepth"):
        y2 = S.s5_ssm_forward(params, u, engine=engine)[0]
        early = max(normwise_error(y2[:, k], y[:, k]) for k in range(10))
        assert early <= SCAN, f"{engine}: {early:.2e}"
    from refssm.scan import s5_engines as E
    lam = np.array([np.nan + 0j, 0.5 + 0j])
    with pytest.raises(ValueError, match=r"Lambda_bar: expected finite values, got 1 NaN"):
        E.linear_scan_fft(lam, np.ones((1, 3, 2), complex), np.zeros((1, 2), complex))
    # growth 1.5 (<= FFT_MAX_GROWTH): accepted, and as exact as for a stable system
    params["Lambda_re"][0] = math.log(1.5) / (0.1 * (L - 1))
    y, _, _ = S.s5_ssm_forward(params, u)
    for engine in ("fft", "fft_dense"):
        err = normwise_error(S.s5_ssm_forward(params, u, engine=engine)[0], y)
        figure(f"{engine} vs numpy, kernel growth 1.5", err)
        assert err <= SCAN


@pytest.mark.parametrize("engine", ["numba", "logdepth"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_parallel_and_serial_kernels_agree(engine, bidirectional, monkeypatch):
    """The prange kernels (used from PARALLEL_MIN_WORK updates up) against the one-thread ones."""
    from refssm.scan import s5_engines
    rng = np.random.default_rng(15)
    params = random_params(rng, 4, 10, conj_sym=False, bidirectional=bidirectional)  # P = 5
    u = rng.standard_normal((3, 37, 4))
    dy = rng.standard_normal(u.shape)
    results = []
    for threshold in (0, 1 << 62):
        monkeypatch.setattr(s5_engines, "PARALLEL_MIN_WORK", threshold)
        y, x, saved = S.s5_ssm_forward(params, u, engine=engine, conj_sym=False,
                                       bidirectional=bidirectional)
        results.append((y, x, S.s5_ssm_backward(dy, None, saved)))
    (y0, x0, g0), (y1, x1, g1) = results
    ref_y, _, ref_saved = S.s5_ssm_forward(params, u, conj_sym=False, bidirectional=bidirectional)
    assert np.array_equal(y0, y1) and np.array_equal(x0, x1)       # same ops, same order
    assert all(np.array_equal(g0[k], g1[k]) for k in g0)
    assert normwise_error(y0, ref_y) <= SCAN


@pytest.mark.parametrize("engine", ("numpy",) + FAST)
def test_chunks_equal_one_call(engine):
    rng = np.random.default_rng(12)
    params = random_params(rng, 3, 8)
    u = rng.standard_normal((2, 40, 3))
    y, x, _ = S.s5_ssm_forward(params, u, engine=engine)
    parts, state = [], None
    for a, b in ((0, 1), (1, 14), (14, 15), (15, 40)):
        yc, state, _ = S.s5_ssm_forward(params, u[:, a:b], engine=engine, initial_state=state)
        parts.append(yc)
    assert normwise_error(np.concatenate(parts, 1), y) <= SCAN
    assert normwise_error(state, x) <= SCAN


def test_step_equals_full_forward():
    rng = np.random.default_rng(13)
    params = random_params(rng, 3, 8)
    u = rng.standard_normal((2, 30, 3))
    y, _, _ = S.s5_ssm_forward(params, u)
    x = np.zeros((2, 4), complex)
    for k in range(30):
        yk, x = S.s5_ssm_step(params, u[:, k], x)
        assert normwise_error(yk, y[:, k]) <= SCAN


def test_lambda_powers_and_kernel_check_their_input():
    lam = np.array([0.5 + 0.1j, 0.9 + 0j])
    with pytest.raises(ValueError, match=r"Lambda_bar: expected 1 dimensions?"):
        S.lambda_powers(lam[None], 3)                       # was accepted, a wrong shape out
    with pytest.raises(ValueError, match=r"n: expected an integer >= 0, got -1"):
        S.lambda_powers(lam, -1)
    with pytest.raises(ValueError, match=r"s5_kernel: expected B_bar \[P, H\] and C_tilde "
                                         r"\[H, P\] with P = 2"):
        S.s5_kernel(lam, np.ones((3, 4)) + 0j, np.ones((4, 2)) + 0j, 5)


def test_kernel_is_the_impulse_response():
    """K_k[:, j] = response at lag k to a unit impulse on input j (K_k = Re(C Lambda_bar^k B_bar))."""
    rng = np.random.default_rng(14)
    H, N, L = 3, 8, 25
    p = random_params(rng, H, N)
    Lam, Bt, Ct, D, log_step = S.ssm_matrices(p)
    Lb, Bb, _ = S.discretize_forward(Lam, Bt, np.exp(log_step))
    K = S.s5_kernel(Lb, Bb, Ct, L, conj_sym=True)
    u = np.zeros((H, L, H))
    u[np.arange(H), 0, np.arange(H)] = 1.0                     # batch j: impulse on input j
    y, _, _ = S.scan_forward(u, Lb, Bb, Ct)
    assert normwise_error(np.transpose(y, (1, 2, 0)), K) <= SCAN
    # and by hand at lag 3, state by state
    K3 = 2 * np.real(sum(np.outer(Ct[:, q], Bb[q]) * Lb[q] ** 3 for q in range(N // 2)))
    assert normwise_error(K[3], K3) <= SCAN


# ===========================================================================
# Gradients: finite differences and torch autograd
# ===========================================================================

def _fd_errors(params, u, x0, kw, engine, rng, h=1e-6):
    """Relative error of <grad, v> against a central difference, per argument."""
    P = params["Lambda_re"].size
    Wy = rng.standard_normal(u.shape)
    Wx = complex_normal(rng, (u.shape[0], P))

    def loss(p, u_, x0_):
        y, x, _ = S.s5_ssm_forward(p, u_, initial_state=x0_, engine=engine, **kw)
        return float(np.sum(y * Wy) + np.sum(np.real(np.conj(Wx) * x)))

    y, x, saved = S.s5_ssm_forward(params, u, initial_state=x0, engine=engine, **kw)
    g = S.s5_ssm_backward(Wy, Wx, saved)
    errs = {}
    for k in params:
        v = rng.standard_normal(params[k].shape)
        plus, minus = dict(params), dict(params)
        plus[k], minus[k] = params[k] + h * v, params[k] - h * v
        fd = (loss(plus, u, x0) - loss(minus, u, x0)) / (2 * h)
        an = float(np.sum(g[k] * v))
        errs[k] = abs(fd - an) / max(abs(an), 1e-300)
    v = rng.standard_normal(u.shape)
    fd = (loss(params, u + h * v, x0) - loss(params, u - h * v, x0)) / (2 * h)
    errs["u"] = abs(fd - np.sum(g["u"] * v)) / abs(np.sum(g["u"] * v))
    if x0 is not None:
        v = complex_normal(rng, x0.shape)
        fd = (loss(params, u, x0 + h * v) - loss(params, u, x0 - h * v)) / (2 * h)
        an = float(np.sum(np.real(np.conj(g["initial_state"]) * v)))
        errs["initial_state"] = abs(fd - an) / abs(an)
    return errs


FD_CASES = [
    dict(discretization="zoh"),
    dict(discretization="bilinear"),
    dict(discretization="zoh", conj_sym=False),
    dict(discretization="zoh", bidirectional=True),
    dict(discretization="bilinear", bidirectional=True, conj_sym=False),
    dict(discretization="zoh", clip_eigs=True, near_one=True),
    dict(discretization="bilinear", clip_eigs=True, near_one=True),
    dict(discretization="zoh", near_one=True, step_rescale=2.5),
]


@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("engine", ["numpy", "fft_dense", "logdepth"])
def test_backward_matches_finite_differences(case, engine):
    rng = np.random.default_rng(zlib.crc32(repr(sorted(case.items())).encode()))
    case = dict(case)
    near_one = case.pop("near_one", False)
    bidirectional = case.get("bidirectional", False)
    conj_sym = case.get("conj_sym", True)
    H, N, L = 3, 8, 19
    params = random_params(rng, H, N, conj_sym=conj_sym, bidirectional=bidirectional,
                           near_one=near_one)
    if case.get("clip_eigs"):                     # some clipped, some not
        params["Lambda_re"][0] = -2e-5
        params["Lambda_re"][1] = -3e-4
    P = params["Lambda_re"].size
    u = rng.standard_normal((2, L, H))
    x0 = None if bidirectional else complex_normal(rng, (2, P))
    errs = _fd_errors(params, u, x0, case, engine, rng)
    name = max(errs, key=errs.get)
    figure(f"grad vs FD {engine} {case} near_one={near_one} (worst d{name})", errs[name])
    assert errs[name] <= FD, f"d{name}: {errs[name]:.2e}"


def _torch_s5(torch, t, u, x0, Wy, Wx, discretization, conj_sym, bidirectional, clip_eigs,
              step_rescale):
    """Independent transcription of lindermanlab's S5SSM + apply_ssm, one step at a time."""
    re = torch.clamp(t["Lambda_re"], max=-1e-4) if clip_eigs else t["Lambda_re"]
    Lam = torch.complex(re, t["Lambda_im"])
    B = torch.complex(t["B"][..., 0], t["B"][..., 1])
    Cs = ["C1", "C2"] if bidirectional else ["C"]
    C = torch.cat([torch.complex(t[c][..., 0], t[c][..., 1]) for c in Cs], dim=1)
    step = step_rescale * torch.exp(t["log_step"])
    if discretization == "zoh":
        Lb = torch.exp(Lam * step)
        Bb = ((Lb - 1) / Lam)[:, None] * B
    else:
        BL = 1 / (1 - step / 2 * Lam)
        Lb = BL * (1 + step / 2 * Lam)
        Bb = (BL * step)[:, None] * B
    P = Lam.shape[0]
    uc = u.to(torch.complex128)
    Bu = uc @ Bb.T                                                 # [batch, L, P]
    x = x0
    xs = []
    for k in range(u.shape[1]):
        x = Lb * x + Bu[:, k]
        xs.append(x)
    X = torch.stack(xs, 1)
    if bidirectional:
        xb = torch.zeros_like(x0)
        xbs = [None] * u.shape[1]
        for k in range(u.shape[1] - 1, -1, -1):
            xb = Lb * xb + Bu[:, k]
            xbs[k] = xb
        X = torch.cat([X, torch.stack(xbs, 1)], -1)
    y = (X @ C.T).real * (2 if conj_sym else 1) + t["D"] * u
    return (y * Wy).sum() + (torch.conj(Wx) * x).real.sum()


@pytest.mark.peers
@pytest.mark.parametrize("case", FD_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_backward_matches_torch_autograd(case):
    from conftest import require_peer
    torch = require_peer("torch")
    rng = np.random.default_rng(21)
    case = dict(case)
    near_one = case.pop("near_one", False)
    kw = dict(discretization="zoh", conj_sym=True, bidirectional=False, clip_eigs=False,
              step_rescale=1.0)
    kw.update(case)
    H, N, L = 4, 8, 23
    params = random_params(rng, H, N, conj_sym=kw["conj_sym"], bidirectional=kw["bidirectional"],
                           near_one=near_one)
    if kw["clip_eigs"]:
        params["Lambda_re"][0] = -2e-5
    P = params["Lambda_re"].size
    u = rng.standard_normal((2, L, H))
    x0 = None if kw["bidirectional"] else complex_normal(rng, (2, P))
    Wy, Wx = rng.standard_normal(u.shape), complex_normal(rng, (2, P))
    y, x, saved = S.s5_ssm_forward(params, u, initial_state=x0, **kw)
    g = S.s5_ssm_backward(Wy, Wx, saved)
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    tu = torch.tensor(u, requires_grad=True)
    x0v = np.zeros((2, P), complex) if x0 is None else x0
    tx0 = {"re": torch.tensor(x0v.real, requires_grad=True),
           "im": torch.tensor(x0v.imag, requires_grad=True)}
    loss = _torch_s5(torch, t, tu, torch.complex(tx0["re"], tx0["im"]), torch.tensor(Wy),
                     torch.tensor(Wx), **kw)
    loss.backward()
    errs = {k: normwise_error(g[k], t[k].grad.numpy()) for k in params}
    errs["u"] = normwise_error(g["u"], tu.grad.numpy())
    if x0 is not None:
        errs["initial_state"] = normwise_error(
            g["initial_state"], tx0["re"].grad.numpy() + 1j * tx0["im"].grad.numpy())
    name = max(errs, key=errs.get)
    figure(f"grad vs torch autograd {kw} near_one={near_one} (worst d{name})", errs[name])
    assert errs[name] <= BUDGETS["grad_autograd"], f"d{name}: {errs[name]:.2e}"


# ===========================================================================
# Bad input
# ===========================================================================

def _ok():
    return S.init_s5_ssm(3, 4, rng=0), np.zeros((2, 5, 3))


def test_odd_state_size_with_conjugate_symmetry():
    with pytest.raises(ValueError, match=r"state_size: expected an even state_size .* got 7"):
        S.init_s5_ssm(3, 7)
    with pytest.raises(ValueError, match=r"even block size .* 12 / blocks 4 = 3"):
        S.init_block_diagonal(12, blocks=4, conj_sym=True)
    with pytest.raises(ValueError, match=r"blocks: expected a divisor of state_size 12, got 5"):
        S.init_block_diagonal(12, blocks=5)
    S.init_s5_ssm(3, 7, conj_sym=False)                        # fine without


def test_non_positive_step():
    params, u = _ok()
    with pytest.raises(ValueError, match=r"step_rescale: expected a finite number > 0 .* got 0"):
        S.s5_ssm_forward(params, u, step_rescale=0)
    with pytest.raises(ValueError, match=r"step_rescale: .* got -1.0"):
        S.s5_ssm_forward(params, u, step_rescale=-1.0)
    bad = dict(params, log_step=np.array([-800.0, -3.0]))      # exp underflows to 0
    with pytest.raises(ValueError, match=r"step: expected every step size Delta > 0, got 0.0 at state 0"):
        S.s5_ssm_forward(bad, u)
    with pytest.raises(ValueError, match=r"step: expected every step size Delta > 0, got -0.1"):
        S.discretize_forward(np.array([-1 + 0j]), np.ones((1, 2)), np.array([-0.1]))
    with pytest.raises(ValueError, match=r"log_step.*expected finite values"):
        S.s5_ssm_forward(dict(params, log_step=np.array([-np.inf, 0.0])), u)


def test_wrong_shapes_name_expected_and_actual():
    params, u = _ok()
    with pytest.raises(ValueError, match=r"u: expected shape \(batch, seq_len, 3\) .* got \(2, 5, 4\)"):
        S.s5_ssm_forward(params, np.zeros((2, 5, 4)))
    with pytest.raises(ValueError, match=r"u: expected 3 dimensions, got shape \(5, 3\)"):
        S.s5_ssm_forward(params, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"u: expected a non-empty"):
        S.s5_ssm_forward(params, np.zeros((2, 0, 3)))
    with pytest.raises(ValueError, match=r"params\['B'\]: expected shape \(2, 3, 2\) .* got \(2, 3\)"):
        S.s5_ssm_forward(dict(params, B=np.zeros((2, 3))), u)
    with pytest.raises(ValueError, match=r"params\['C'\]: expected shape \(3, 2, 2\) .* got \(2, 3, 2\)"):
        S.s5_ssm_forward(dict(params, C=np.zeros((2, 3, 2))), u)
    with pytest.raises(ValueError, match=r"params: expected exactly .*C1.*C2.*bidirectional"):
        S.s5_ssm_forward(params, u, bidirectional=True)
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(2, 2\) .* got \(1, 2\)"):
        S.s5_ssm_forward(params, u, initial_state=np.zeros((1, 2), complex))
    with pytest.raises(ValueError, match=r"u: expected finite values"):
        S.s5_ssm_forward(params, np.full((2, 5, 3), np.nan))
    with pytest.raises(ValueError, match=r"u: expected a floating-point array"):
        S.s5_ssm_forward(params, np.zeros((2, 5, 3), dtype=int))
    y, x, saved = S.s5_ssm_forward(params, u)
    with pytest.raises(ValueError, match=r"d_y: expected shape \(2, 5, 3\) .* got \(2, 4, 3\)"):
        S.s5_ssm_backward(np.zeros((2, 4, 3)), None, saved)
    with pytest.raises(ValueError, match=r"d_last_state: expected shape \(2, 2\)"):
        S.s5_ssm_backward(np.zeros((2, 5, 3)), np.zeros(2), saved)
    with pytest.raises(ValueError, match=r"B_tilde: expected shape \(1, H\)"):
        S.discretize_forward(np.array([-1 + 0j]), np.ones((2, 2)), np.array([0.1]))


def test_bad_options():
    params, u = _ok()
    with pytest.raises(ValueError, match=r"engine: expected one of .* got 'gpu'"):
        S.s5_ssm_forward(params, u, engine="gpu")
    with pytest.raises(ValueError, match=r"discretization: expected one of \('zoh', 'bilinear'\), got 'euler'"):
        S.s5_ssm_forward(params, u, discretization="euler")
    with pytest.raises(ValueError, match=r"C_init: expected one of"):
        S.init_s5_ssm(3, 4, C_init="normal")
    bi = S.init_s5_ssm(3, 4, bidirectional=True, rng=0)
    with pytest.raises(ValueError, match=r"initial_state: a bidirectional SSM has no carried state"):
        S.s5_ssm_forward(bi, u, bidirectional=True, initial_state=np.zeros((2, 2), complex))
    with pytest.raises(ValueError, match=r"bidirectional .* cannot be stepped"):
        S.s5_ssm_step(bi, u[:, 0], np.zeros((2, 2), complex))
