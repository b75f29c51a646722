r"""Fast engines for the S5 core: Numba sequential, Numba log-depth, FFT, dense-kernel FFT.

Same core, signatures and returns as the NumPy ground truth
:func:`refssm.ssm.s5.scan_forward` / :func:`refssm.ssm.s5.scan_backward`
(read their docstrings for the math)::

    x_k = Lambda_bar * x_{k-1} + B_bar u_k        [batch, P] complex
    y_k = Re(C_tilde x_k)  (x 2 with conjugate symmetry)

The S5 system is linear time-invariant, so the work splits into three parts:

1. the input projection ``W_k = B_bar u_k`` for every ``k`` at once, one
   real matrix product ``[batch*L, H] x [H, 2P]`` (BLAS; ``u`` is real, the
   result's (re, im) pairs read as complex);
2. the diagonal recurrence ``x_k = lambda * x_{k-1} + W_k``, independently
   for every batch row and state: **this is what the engines compute
   differently**;
3. the read-out ``y_k = Re(C_tilde x_k)``, again one matrix product.

Step 2, three ways (``scan(lam, W, x0, reverse) -> X``):

``numba``
    :func:`linear_scan_seq`: a sequential loop over time, ``prange`` over
    (batch x blocks of 4 states); the state lives in registers.
``logdepth``
    :func:`linear_scan_logdepth`: Blelloch's work-efficient up-sweep /
    down-sweep (Blelloch 1990, "Prefix sums and their applications") under
    the operator ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``; the parallel
    scan the S5 paper computes with (``jax.lax.associative_scan``). Same tree
    as :mod:`refssm.scan.numba_logdepth` (see its docstring for a picture),
    here over complex numbers.
``fft``
    :func:`linear_scan_fft`: the recurrence is a causal convolution of
    ``W[:, :, p]`` with the geometric kernel ``lambda_p^k``, computed with
    ``scipy.fft`` (zero-padded to a fast length ``>= 2L - 1``), plus
    ``lambda^{k+1} x0``. Together with steps 1 and 3 this *is* the
    convolution with ``K_k = Re(C_tilde Lambda_bar^k B_bar)``, factored
    through the diagonal: ``y = Re(C_tilde (lambda^k * (B_bar u)))``,
    ``O(P L log L)`` instead of ``O(H^2 L log L)``.

The FFT engines need a stable system. Their rounding error is spread evenly over
the outputs, at the scale of the largest kernel value. With ``|lambda| > 1``
the kernel ``lambda^k`` grows over the sequence, and the early outputs,
which are small, lose all their accuracy. A review measured relative errors
of the first outputs of 7.7e+71 at ``|lambda|^L = e^200``, and a model's
normwise error already at 2.5e-12 (budget 1e-12) at ``|lambda|^L = 150``.
So they refuse a ``Lambda_bar`` whose powers grow past
:data:`FFT_MAX_GROWTH` (2) over the sequence (:func:`_check_fft_growth`).
The scans compute such systems step by step, exactly as the recurrence says.

``fft_dense`` does *not* factor: it builds the dense kernel ``K``
``[L, H, H]`` (:func:`refssm.ssm.s5.s5_kernel`) and convolves ``u`` with it
by FFT, its backward going through ``dK``. ``O(L H^2 P)`` work and
``O(L H^2)`` memory: for small sizes, where it is the independent check that
the kernel formula and the scans mean the same thing.

Backward (all but ``fft_dense``): the adjoint ``g_k = dL/dx_k`` obeys the
same recurrence in reversed time with ``conj(lambda)``
(``g_k = conj(lambda) g_{k+1} + c conj(C_tilde)^T dy_k``, ``dx_last`` folded
into the last element), so each engine's backward is its own scan run
backwards; the local gradients (``dLambda_bar = sum conj(x_{k-1}) g_k``, ``dB_bar``,
``dC_tilde``, ``du``) are vectorised NumPy / BLAS.

Memory: ``[batch, L, P]`` complex arrays (W, the states, the adjoint); never
``[batch, L, P, H]``. Precision: complex128 throughout, no ``fastmath``.

:func:`bench_s5` times the engines.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional

import numba
import numpy as np
import scipy.fft
from numba import njit, prange

from ..ssm.s5 import ENGINES, init_s5_ssm, lambda_powers, s5_kernel, s5_ssm_forward

__all__ = [
    "EngineSaved", "DenseSaved",
    "linear_scan_seq", "linear_scan_logdepth", "linear_scan_fft",
    "numba_forward", "numba_backward", "logdepth_forward", "logdepth_backward",
    "fft_forward", "fft_backward", "fft_dense_forward", "fft_dense_backward",
    "ENGINE_FUNCTIONS", "bench_s5", "PARALLEL_MIN_WORK",
]

#: States per Numba work item: 4 complex128 = one 64-byte cache line per time step.
_SB = 4


def _threads() -> int:
    return numba.get_num_threads()


# ===========================================================================
# The three scans: X[b, k, p] = lam[p] X[b, k-1, p] + W[b, k, p]
# ===========================================================================

@njit(cache=True)
def _seq_scan_item(lam, W, x0, X, reverse, b, p0):
    """One work item: batch row ``b``, states ``p0 .. p0 + 3``, every time step."""
    L, P = W.shape[1], W.shape[2]
    n = min(_SB, P - p0)
    x = np.empty(_SB, np.complex128)
    for j in range(n):
        x[j] = x0[b, p0 + j]
    for s in range(L):
        k = L - 1 - s if reverse else s
        for j in range(n):
            x[j] = lam[p0 + j] * x[j] + W[b, k, p0 + j]
            X[b, k, p0 + j] = x[j]


@njit(parallel=True, cache=True)
def _seq_scan_kernel(lam, W, x0, X, reverse):
    batch, P = W.shape[0], W.shape[2]
    nblk = (P + _SB - 1) // _SB
    for item in prange(batch * nblk):                   # batch x blocks of states
        b = item // nblk
        _seq_scan_item(lam, W, x0, X, reverse, b, (item - b * nblk) * _SB)


@njit(cache=True)
def _seq_scan_serial(lam, W, x0, X, reverse):
    batch, P = W.shape[0], W.shape[2]
    nblk = (P + _SB - 1) // _SB
    for item in range(batch * nblk):
        b = item // nblk
        _seq_scan_item(lam, W, x0, X, reverse, b, (item - b * nblk) * _SB)


#: Below this many state updates (batch x L x P) the scans run on one thread:
#: a parallel region costs more than it saves there, and on a small machine
#: its waking threads compete with the BLAS threads of the projections
#: around it (measured on 2 cores: 8 ms instead of 0.5 ms for L = 60, P = 32).
PARALLEL_MIN_WORK = 1 << 21


def linear_scan_seq(lam, W, x0, reverse=False):
    """``X_k = lam * X_{k-1} + W_k`` (``X_{-1} = x0``), one step after another, in Numba.

    ``reverse``: ``X_k = lam * X_{k+1} + W_k`` from ``X_L = x0``. ``prange``
    over (batch x blocks of 4 states) once the work reaches
    :data:`PARALLEL_MIN_WORK` updates; one thread below.

    Parameters
    ----------
    lam : ndarray ``[P]`` complex
    W : ndarray ``[batch, L, P]`` complex
    x0 : ndarray ``[batch, P]`` complex

    Returns
    -------
    X : ndarray ``[batch, L, P]`` complex

    Examples
    --------
    >>> X = linear_scan_seq(np.array([0.5 + 0j]), np.ones((1, 3, 1), complex), np.zeros((1, 1), complex))
    >>> X[0, :, 0].real
    array([1.  , 1.5 , 1.75])
    """
    lam, W, x0 = (np.ascontiguousarray(a, dtype=np.complex128) for a in (lam, W, x0))
    X = np.empty_like(W)
    kernel = _seq_scan_kernel if W.size >= PARALLEL_MIN_WORK else _seq_scan_serial
    kernel(lam, W, x0, X, bool(reverse))
    return X


@njit(cache=True)
def _padded_length(L):
    p = 1
    while p < L:
        p *= 2
    return p


@njit(cache=True)
def _blelloch(pw, xb, Lp, L, p0, n):
    """Up-sweep + down-sweep on rows ``0 .. Lp-1``, columns ``0 .. n-1`` of ``xb [Lp+1, _SB]``.

    Rows ``t >= L`` are padding, the identity ``(1, 0)``. The system is LTI,
    so the ``a`` half of the total of any subtree is ``lambda^m``, ``m`` its
    number of real (non-padding) rows: it is read from the power table
    ``pw [Lp+1, P]`` (``pw[m] = lambda^m`` by repeated multiplication)
    instead of being composed. Composing it by the tree squares ``lambda``
    ``log2 m`` times, and each squaring doubles the relative error: ``m eps / 2``
    at the root, against the ``sqrt(m) eps`` of repeated multiplication
    (the errors of equal subtrees are identical, so they add coherently).
    Measured against an extended-precision scan at ``L = 4097`` with
    ``|lambda|`` down to ``1 - 1.4e-6``: the composed tree was 6x less
    accurate on the states (1.9e-14 against 2.9e-15) and 20x on
    ``dL/dRe(Lambda)`` (8.5e-13 against 4.0e-14). Only the ``b`` half is
    stored.

    On return ``xb[t]`` is the ``b`` of the exclusive prefix ``[0:t-1]``
    (``xb[0] = 0``) and ``xb[Lp]`` the total, so ``xb[t+1]`` is the
    inclusive scan at ``t``.
    """
    d = 1
    while d < Lp:                                        # up-sweep: subtree totals
        for i in range(2 * d - 1, Lp, 2 * d):
            j = i - d                                    # left subtree ends at j, right at i
            m = min(max(L - (j + 1), 0), d)              # real rows of the right subtree
            for c in range(n):
                xb[i, c] = pw[m, p0 + c] * xb[j, c] + xb[i, c]   # (a1, b1) o (a2, b2)
        d *= 2
    for c in range(n):
        xb[Lp, c] = xb[Lp - 1, c]
        xb[Lp - 1, c] = 0.0                              # root's prefix: identity
    d = Lp // 2
    while d >= 1:                                        # down-sweep: prefixes
        for i in range(2 * d - 1, Lp, 2 * d):
            j = i - d
            m = min(max(L - (j - d + 1), 0), d)          # real rows of the left subtree
            for c in range(n):
                left_b = xb[j, c]
                xb[j, c] = xb[i, c]                      # left child: parent's prefix
                xb[i, c] = pw[m, p0 + c] * xb[i, c] + left_b   # right: prefix o left total
        d //= 2


@njit(cache=True)
def _logdepth_item(lam, pw, W, x0, X, reverse, xb, b, p0):
    """One work item (batch row ``b``, states ``p0 .. p0 + 3``) in scratch ``xb [Lp+1, _SB]``."""
    L, P = W.shape[1], W.shape[2]
    Lp = xb.shape[0] - 1
    n = min(_SB, P - p0)
    for t in range(L):
        k = L - 1 - t if reverse else t
        for c in range(n):
            xb[t, c] = W[b, k, p0 + c]
    for c in range(n):
        xb[0, c] = lam[p0 + c] * x0[b, p0 + c] + xb[0, c]       # fold x0 into element 0
    for t in range(L, Lp):
        for c in range(n):
            xb[t, c] = 0.0
    _blelloch(pw, xb, Lp, L, p0, n)
    for t in range(L):
        k = L - 1 - t if reverse else t
        for c in range(n):
            X[b, k, p0 + c] = xb[t + 1, c]


@njit(parallel=True, cache=True)
def _logdepth_scan_kernel(lam, pw, W, x0, X, reverse, nparts):
    batch, L, P = W.shape
    Lp = _padded_length(L)
    nblk = (P + _SB - 1) // _SB
    items = batch * nblk
    for part in prange(nparts):                         # partitions of batch x state blocks
        xb = np.empty((Lp + 1, _SB), np.complex128)
        for item in range((part * items) // nparts, ((part + 1) * items) // nparts):
            b = item // nblk
            _logdepth_item(lam, pw, W, x0, X, reverse, xb, b, (item - b * nblk) * _SB)


@njit(cache=True)
def _logdepth_scan_serial(lam, pw, W, x0, X, reverse):
    batch, L, P = W.shape
    nblk = (P + _SB - 1) // _SB
    xb = np.empty((_padded_length(L) + 1, _SB), np.complex128)
    for item in range(batch * nblk):
        b = item // nblk
        _logdepth_item(lam, pw, W, x0, X, reverse, xb, b, (item - b * nblk) * _SB)


def linear_scan_logdepth(lam, W, x0, reverse=False):
    """As :func:`linear_scan_seq`, by a Blelloch scan over time (``2 log2 L`` levels).

    The ``a`` half of every subtree total is a power of ``lam`` (the system
    is time-invariant), read from a table of powers by repeated
    multiplication rather than composed by the tree (see :func:`_blelloch`).
    Work is partitioned over ``numba.get_num_threads()`` partitions of the
    (batch x state block) items (one thread below :data:`PARALLEL_MIN_WORK`
    updates); each partition owns one ``[L_pad + 1, 4]`` complex scratch
    buffer.

    Examples
    --------
    >>> X = linear_scan_logdepth(np.array([0.5 + 0j]), np.ones((1, 3, 1), complex),
    ...                          np.zeros((1, 1), complex))
    >>> X[0, :, 0].real
    array([1.  , 1.5 , 1.75])
    """
    lam, W, x0 = (np.ascontiguousarray(a, dtype=np.complex128) for a in (lam, W, x0))
    batch, L, P = W.shape
    X = np.empty_like(W)
    items = batch * ((P + _SB - 1) // _SB)
    pw = lambda_powers(lam, L + 1)                  # lambda^m, m = 0 .. L (subtree sizes)
    if W.size >= PARALLEL_MIN_WORK:
        _logdepth_scan_kernel(lam, pw, W, x0, X, bool(reverse), max(1, min(_threads(), items)))
    else:
        _logdepth_scan_serial(lam, pw, W, x0, X, bool(reverse))
    return X


#: Largest ``max_m |Lambda_bar|^m`` (``m < seq_len``) the FFT engines accept (see above).
FFT_MAX_GROWTH = 2.0


def _check_fft_growth(pw, L, name):
    """Refuse an FFT convolution whose kernel grows: ``pw`` ``[>= L, P]`` powers ``lambda^m``.

    Stable systems (``|lambda| <= 1``) have ``max_m |lambda^m| = 1`` (at ``m = 0``).
    """
    growth = float(np.max(np.abs(pw[:L]))) if pw[:L].size else 1.0
    if not growth <= FFT_MAX_GROWTH:
        worst = float(np.max(np.abs(pw[1]))) if L > 1 else float("nan")
        raise ValueError(
            f"{name}: expected a stable system, with max |Lambda_bar|^m over m < seq_len at "
            f"most {FFT_MAX_GROWTH:g}, got {growth:.3g} (max |Lambda_bar| = {worst:.17g}, "
            f"seq_len {L}): the FFT convolution's rounding error grows with it, relative to "
            f"the early outputs; use engine 'numpy', 'numba' or 'logdepth'")


def linear_scan_fft(lam, W, x0, reverse=False):
    """As :func:`linear_scan_seq`, as a causal convolution by FFT.

    ``X_k = sum_{j<=k} lam^{k-j} W_j + lam^{k+1} x0``: the kernel
    ``lam^m`` (:func:`refssm.ssm.s5.lambda_powers`, powers by repeated
    multiplication) and ``W`` are zero-padded to
    ``n = next_fast_len(2L - 1)``, multiplied in the frequency domain and
    transformed back (``scipy.fft``, complex).

    Examples
    --------
    >>> X = linear_scan_fft(np.array([0.5 + 0j]), np.ones((1, 3, 1), complex),
    ...                     np.zeros((1, 1), complex))
    >>> np.round(X[0, :, 0].real, 12)
    array([1.  , 1.5 , 1.75])
    """
    lam = np.asarray(lam, np.complex128)
    W = np.asarray(W, np.complex128)
    x0 = np.asarray(x0, np.complex128)
    L = W.shape[1]
    if reverse:
        W = W[:, ::-1]
    pw = lambda_powers(lam, L + 1)                                   # [L+1, P]
    _check_fft_growth(pw, L, "fft")
    n = scipy.fft.next_fast_len(2 * L - 1)
    workers = _threads()
    kernel_f = scipy.fft.fft(pw[:L], n, axis=0, workers=workers)     # [n, P]
    W_f = scipy.fft.fft(W, n, axis=1, workers=workers)               # [batch, n, P]
    W_f *= kernel_f[None]
    X = scipy.fft.ifft(W_f, n, axis=1, workers=workers, overwrite_x=True)[:, :L]
    X += pw[1:][None] * x0[:, None, :]                               # lam^{k+1} x0
    return np.ascontiguousarray(X[:, ::-1] if reverse else X)


# ===========================================================================
# Shared forward / backward around a scan
# ===========================================================================

class EngineSaved(NamedTuple):
    """What a scan engine's forward keeps (same fields as :class:`refssm.ssm.s5.ScanSaved`).

    Attributes
    ----------
    u : ndarray ``[batch, seq_len, H]``
    Lambda_bar : ndarray ``[P]`` complex
    B_bar : ndarray ``[P, H]`` complex
    C_tilde : ndarray ``[H, P]`` or ``[H, 2P]`` complex
    x0 : ndarray ``[batch, P]`` complex
    states : ndarray ``[batch, seq_len, P]`` complex
    states_bwd : ndarray ``[batch, seq_len, P]`` complex or None
    conj_sym, bidirectional : bool
    """

    u: np.ndarray
    Lambda_bar: np.ndarray
    B_bar: np.ndarray
    C_tilde: np.ndarray
    x0: np.ndarray
    states: np.ndarray
    states_bwd: Optional[np.ndarray]
    conj_sym: bool
    bidirectional: bool


def _interleave(re, im):
    """Rows ``re[0], im[0], re[1], im[1], ...``: ``[P, H]`` twice -> ``[2P, H]``."""
    out = np.empty((2 * re.shape[0],) + re.shape[1:])
    out[0::2], out[1::2] = re, im
    return out


def _as_real(Z):
    """A C-contiguous complex ``[n, P]`` seen as real ``[n, 2P]`` (re, im pairs; no copy)."""
    return np.ascontiguousarray(Z).view(np.float64)


def _project(u2, M):
    """``u2 [n, H]`` real times ``M^T`` (``M [P, H]`` complex): ``[n, P]`` complex.

    One real GEMM against ``[Re M; Im M]`` interleaved by rows, whose result
    read as complex is the product (``u2`` is real, so no complex arithmetic
    and no copy of ``u2`` to complex).
    """
    return np.ascontiguousarray(u2 @ _interleave(M.real, M.imag).T).view(np.complex128)


def _read(X2, C, c):
    """``c Re(X2 C^T)``: ``X2 [n, P]`` complex, ``C [H, P]`` complex -> ``[n, H]``, one real GEMM."""
    return _as_real(X2) @ _interleave(c * C.real.T, -c * C.imag.T)


def _forward(scan, u, Lambda_bar, B_bar, C_tilde, x0, conj_sym, bidirectional):
    batch, L, H = u.shape
    P = Lambda_bar.shape[0]
    c = 2.0 if conj_sym else 1.0
    W = _project(u.reshape(-1, H), B_bar).reshape(batch, L, P)          # B_bar u_k
    X = scan(Lambda_bar, W, x0, False)
    y = _read(X.reshape(-1, P), C_tilde[:, :P], c)
    X_bwd = None
    if bidirectional:
        X_bwd = scan(Lambda_bar, W, np.zeros_like(x0), True)
        y += _read(X_bwd.reshape(-1, P), C_tilde[:, P:], c)
    saved = EngineSaved(u, Lambda_bar, B_bar, C_tilde, x0, X, X_bwd, conj_sym, bidirectional)
    return y.reshape(batch, L, H), X[:, -1].copy(), saved


def _backward(scan, dy, dx_last, saved: EngineSaved) -> dict:
    u, lam, B_bar, C_tilde, x0, X, X_bwd, conj_sym, bidirectional = saved
    batch, L, H = u.shape
    P = lam.shape[0]
    c = 2.0 if conj_sym else 1.0
    dy2 = dy.reshape(-1, H)
    # E_k = c conj(C_tilde)^T dy_k: what y_k sends to x_k
    E = _project(dy2, c * C_tilde[:, :P].T.conj()).reshape(batch, L, P)
    if dx_last is not None:
        E[:, -1] += dx_last
    G = scan(np.conj(lam), E, np.zeros_like(x0), True)                  # g_k = dL/dx_k
    dlam = np.sum(np.conj(X[:, :-1]) * G[:, 1:], axis=(0, 1)) + np.sum(np.conj(x0) * G[:, 0],
                                                                        axis=0)
    dx0 = np.conj(lam) * G[:, 0]
    def d_C(states):                        # c sum_k dy_k conj(x_k)^T, [H, P]
        T = dy2.T @ _as_real(states.reshape(-1, P))                     # [H, 2P]: re, im pairs
        return c * (T[:, 0::2] - 1j * T[:, 1::2])

    dC = np.empty(C_tilde.shape, np.complex128)
    dC[:, :P] = d_C(X)
    dW = G
    if bidirectional:
        E2 = _project(dy2, c * C_tilde[:, P:].T.conj()).reshape(batch, L, P)
        G2 = scan(np.conj(lam), E2, np.zeros_like(x0), False)          # runs forward in time
        dlam += np.sum(np.conj(X_bwd[:, 1:]) * G2[:, :-1], axis=(0, 1))
        dC[:, P:] = d_C(X_bwd)
        dW = G + G2
    dWf = _as_real(dW.reshape(-1, P))                                   # [n, 2P]
    u2 = u.reshape(-1, H)
    T = dWf.T @ u2                                                      # [2P, H]
    dB_bar = T[0::2] + 1j * T[1::2]                                     # sum_k g_k u_k^T
    du = (dWf @ _interleave(B_bar.real, B_bar.imag)).reshape(batch, L, H)   # Re(B_bar^H g_k)
    return {"u": du, "Lambda_bar": dlam, "B_bar": dB_bar, "C_tilde": dC, "x0": dx0}


def _check(u, Lambda_bar, B_bar, C_tilde, x0, bidirectional):
    """Guard direct calls (Numba does not bounds-check)."""
    batch, L, H = u.shape
    P = Lambda_bar.shape[0]
    want_C = (H, 2 * P if bidirectional else P)
    if B_bar.shape != (P, H) or C_tilde.shape != want_C or x0.shape != (batch, P):
        raise ValueError(f"s5 engine: expected B_bar {(P, H)}, C_tilde {want_C}, x0 "
                         f"{(batch, P)}, got {B_bar.shape}, {C_tilde.shape}, {x0.shape}")


def _make_engine(scan, name):
    def forward(u, Lambda_bar, B_bar, C_tilde, x0, *, conj_sym=True, bidirectional=False):
        u = np.ascontiguousarray(u, dtype=np.float64)
        Lambda_bar, B_bar, C_tilde, x0 = (np.asarray(a, np.complex128)
                                          for a in (Lambda_bar, B_bar, C_tilde, x0))
        _check(u, Lambda_bar, B_bar, C_tilde, x0, bidirectional)
        return _forward(scan, u, Lambda_bar, B_bar, C_tilde, x0, bool(conj_sym),
                        bool(bidirectional))

    def backward(dy, dx_last, saved):
        return _backward(scan, np.ascontiguousarray(dy, dtype=np.float64), dx_last, saved)

    forward.__name__, backward.__name__ = f"{name}_forward", f"{name}_backward"
    forward.__doc__ = f"""The S5 core with the ``{name}`` scan: ``(y, x_last, saved)``.

    Arguments and returns as :func:`refssm.ssm.s5.scan_forward`; ``saved`` is
    an :class:`EngineSaved`.

    Examples
    --------
    >>> from refssm.ssm.s5 import scan_forward
    >>> u = np.random.default_rng(0).standard_normal((1, 5, 2))
    >>> lam = np.array([0.9 + 0.2j]); B = np.ones((1, 2)) + 0j; C = np.ones((2, 1)) * (1 - 1j)
    >>> y, x, saved = {name}_forward(u, lam, B, C, np.zeros((1, 1), complex))
    >>> bool(np.allclose(y, scan_forward(u, lam, B, C)[0], rtol=0, atol=1e-14))
    True
    """
    backward.__doc__ = f"""Manual backward of :func:`{name}_forward`.

    The adjoint ``g_k = dL/dx_k`` by the ``{name}`` scan run backwards in time
    with ``conj(Lambda_bar)``, then the local gradients. Returns as
    :func:`refssm.ssm.s5.scan_backward`.

    Examples
    --------
    >>> from refssm.ssm.s5 import scan_forward, scan_backward
    >>> u = np.random.default_rng(0).standard_normal((1, 5, 2))
    >>> lam = np.array([0.9 + 0.2j]); B = np.ones((1, 2)) + 0j; C = np.ones((2, 1)) * (1 - 1j)
    >>> x0 = np.zeros((1, 1), complex); dy = np.ones((1, 5, 2))
    >>> g = {name}_backward(dy, None, {name}_forward(u, lam, B, C, x0)[2])
    >>> ref = scan_backward(dy, None, scan_forward(u, lam, B, C, x0)[2])
    >>> bool(np.allclose(g["Lambda_bar"], ref["Lambda_bar"], rtol=1e-13, atol=0))
    True
    """
    return forward, backward


numba_forward, numba_backward = _make_engine(linear_scan_seq, "numba")
logdepth_forward, logdepth_backward = _make_engine(linear_scan_logdepth, "logdepth")
fft_forward, fft_backward = _make_engine(linear_scan_fft, "fft")


# ===========================================================================
# fft_dense: convolution with the dense kernel K_k = Re(C_tilde Lambda_bar^k B_bar)
# ===========================================================================

class DenseSaved(NamedTuple):
    """What :func:`fft_dense_forward` keeps.

    Attributes
    ----------
    u : ndarray ``[batch, seq_len, H]``
    Lambda_bar, B_bar, C_tilde, x0 : as :class:`EngineSaved`
    conj_sym, bidirectional : bool
    n : int
        FFT length (``>= 2 seq_len - 1``).
    u_f : ndarray ``[batch, n//2 + 1, H]`` complex
        ``rfft(u)``.
    K_f : ndarray ``[n//2 + 1, H, H]`` complex
        ``rfft`` of the causal kernel.
    Kb_f : ndarray ``[n//2 + 1, H, H]`` complex or None
        ``rfft`` of the anti-causal kernel (bidirectional).
    ur_f : ndarray or None
        ``rfft`` of ``u`` reversed in time (bidirectional).
    """

    u: np.ndarray
    Lambda_bar: np.ndarray
    B_bar: np.ndarray
    C_tilde: np.ndarray
    x0: np.ndarray
    conj_sym: bool
    bidirectional: bool
    n: int
    u_f: np.ndarray
    K_f: np.ndarray
    Kb_f: Optional[np.ndarray]
    ur_f: Optional[np.ndarray]


def fft_dense_forward(u, Lambda_bar, B_bar, C_tilde, x0, *, conj_sym=True, bidirectional=False):
    r"""The S5 core as a convolution with the dense kernel: ``(y, x_last, saved)``.

    ::

        y_k    = sum_{m=0}^{k} K_m u_{k-m}  +  c Re(C_tilde Lambda_bar^{k+1} x0)
        K_m    = c Re(C_tilde diag(Lambda_bar^m) B_bar)                [H, H]
        x_last = sum_j Lambda_bar^{L-1-j} B_bar u_j + Lambda_bar^L x0

    The convolution is computed by real FFTs of length ``n >=
    2 seq_len - 1``; bidirectional adds ``sum_{m>=0} K'_m u_{k+m}`` with
    ``K'`` from ``C2``. Arguments as :func:`refssm.ssm.s5.scan_forward`.

    Examples
    --------
    >>> from refssm.ssm.s5 import scan_forward
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 6, 2)); lam = np.array([0.9 + 0.1j])
    >>> B = rng.standard_normal((1, 2)) + 0j; C = rng.standard_normal((2, 1)) + 1j
    >>> a = fft_dense_forward(u, lam, B, C, np.zeros((1, 1), complex))[0]
    >>> b = scan_forward(u, lam, B, C)[0]
    >>> bool(np.allclose(a, b, rtol=0, atol=1e-14))
    True
    """
    u = np.ascontiguousarray(u, dtype=np.float64)
    lam, B_bar, C_tilde, x0 = (np.asarray(a, np.complex128)
                               for a in (Lambda_bar, B_bar, C_tilde, x0))
    _check(u, lam, B_bar, C_tilde, x0, bidirectional)
    batch, L, H = u.shape
    P = lam.shape[0]
    c = 2.0 if conj_sym else 1.0
    n = scipy.fft.next_fast_len(2 * L - 1, real=True)
    pw = lambda_powers(lam, L + 1)
    _check_fft_growth(pw, L, "fft_dense")
    C_f = C_tilde[:, :P]
    K_f = scipy.fft.rfft(s5_kernel(lam, B_bar, C_f, L, conj_sym=conj_sym), n, axis=0)
    u_f = scipy.fft.rfft(u, n, axis=1)
    y = scipy.fft.irfft(np.einsum("fij,bfj->bfi", K_f, u_f), n, axis=1)[:, :L]
    Kb_f = ur_f = None
    if bidirectional:                      # anti-causal: a causal convolution in reversed time
        Kb_f = scipy.fft.rfft(s5_kernel(lam, B_bar, C_tilde[:, P:], L, conj_sym=conj_sym), n,
                              axis=0)
        ur_f = scipy.fft.rfft(u[:, ::-1], n, axis=1)
        y = y + scipy.fft.irfft(np.einsum("fij,bfj->bfi", Kb_f, ur_f), n, axis=1)[:, :L][:, ::-1]
    y = y + c * np.real(np.einsum("hp,kp,bp->bkh", C_f, pw[1:], x0))       # initial state
    x_last = np.einsum("jp,ph,bjh->bp", pw[L - 1::-1], B_bar, u) + pw[L] * x0
    saved = DenseSaved(u, lam, B_bar, C_tilde, x0, bool(conj_sym), bool(bidirectional), n, u_f,
                       K_f, Kb_f, ur_f)
    return np.ascontiguousarray(y), x_last, saved


def fft_dense_backward(dy, dx_last, saved: DenseSaved) -> dict:
    r"""Manual backward of :func:`fft_dense_forward`, through the kernel.

    ``y = K * u`` gives ``du_j = sum_m K_m^T dy_{j+m}`` and ``dK_m = sum_k
    dy_k u_{k-m}^T`` (correlations, by FFT); then from
    ``K_m = c Re(sum_p C_p lambda_p^m B_p)``::

        dC_{hp}   = c sum_{m,j} dK_m[h, j] conj(lambda_p^m B_{pj})
        dB_{pj}   = c sum_{m,h} dK_m[h, j] conj(C_{hp} lambda_p^m)
        dlambda_p = c sum_{m,h,j} dK_m[h, j] conj(C_{hp} m lambda_p^{m-1} B_{pj})

    plus the initial-state and last-state terms. Returns as
    :func:`refssm.ssm.s5.scan_backward`.

    Examples
    --------
    >>> from refssm.ssm.s5 import scan_forward, scan_backward
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 6, 2)); lam = np.array([0.9 + 0.1j])
    >>> B = rng.standard_normal((1, 2)) + 0j; C = rng.standard_normal((2, 1)) + 1j
    >>> x0 = np.ones((1, 1), complex); dy = rng.standard_normal((1, 6, 2))
    >>> g = fft_dense_backward(dy, x0, fft_dense_forward(u, lam, B, C, x0)[2])
    >>> ref = scan_backward(dy, x0, scan_forward(u, lam, B, C, x0)[2])
    >>> all(np.allclose(g[k], ref[k], rtol=0, atol=1e-13) for k in ref)
    True
    """
    u, lam, B_bar, C_tilde, x0, conj_sym, bidirectional, n, u_f, K_f, Kb_f, ur_f = saved
    batch, L, H = u.shape
    P = lam.shape[0]
    c = 2.0 if conj_sym else 1.0
    dy = np.ascontiguousarray(dy, dtype=np.float64)
    pw = lambda_powers(lam, L + 1)                                    # lambda^m
    dpw = np.zeros_like(pw)                                           # m lambda^{m-1}
    dpw[1:] = np.arange(1, L + 1)[:, None] * pw[:-1]
    cpw, cdpw, cB = np.conj(pw), np.conj(dpw), np.conj(B_bar)
    dy_f = scipy.fft.rfft(dy, n, axis=1)

    def kernel_grads(dK, C):
        cC = np.conj(C)
        dC = c * np.einsum("mhj,mp,pj->hp", dK, cpw[:L], cB, optimize=True)
        dB = c * np.einsum("mhj,hp,mp->pj", dK, cC, cpw[:L], optimize=True)
        dl = c * np.einsum("mhj,hp,mp,pj->p", dK, cC, cdpw[:L], cB, optimize=True)
        return dC, dB, dl

    C_f = C_tilde[:, :P]
    du = scipy.fft.irfft(np.einsum("fij,bfi->bfj", np.conj(K_f), dy_f), n, axis=1)[:, :L]
    dK = scipy.fft.irfft(np.einsum("bfi,bfj->fij", dy_f, np.conj(u_f)), n, axis=0)[:L]
    dC = np.zeros(C_tilde.shape, np.complex128)
    dC[:, :P], dB_bar, dlam = kernel_grads(dK, C_f)
    if bidirectional:
        # y_k += sum_m K'_m u_{k+m}:  du_j += sum_m K'_m^T dy_{j-m},  dK'_m = sum_k dy_k u_{k+m}^T
        du = du + scipy.fft.irfft(np.einsum("fij,bfi->bfj", Kb_f, dy_f), n, axis=1)[:, :L]
        dKb = scipy.fft.irfft(np.einsum("bfi,bfj->fij", np.conj(dy_f),
                                        scipy.fft.rfft(u, n, axis=1)), n, axis=0)[:L]
        dC[:, P:], dB2, dl2 = kernel_grads(dKb, C_tilde[:, P:])
        dB_bar, dlam = dB_bar + dB2, dlam + dl2
    # initial state: y_k += c Re(C (lambda^{k+1} x0))
    dC[:, :P] += c * np.einsum("bkh,kp,bp->hp", dy, cpw[1:], np.conj(x0))
    dx0 = c * np.einsum("bkh,hp,kp->bp", dy, np.conj(C_f), cpw[1:])
    dlam = dlam + c * np.einsum("bkh,hp,kp,bp->p", dy, np.conj(C_f), cdpw[1:], np.conj(x0))
    # last state: x_last = sum_j lambda^{L-1-j} W_j + lambda^L x0,  W_j = B_bar u_j
    if dx_last is not None:
        dx_last = np.asarray(dx_last, np.complex128)
        dW = cpw[L - 1::-1][None] * dx_last[:, None, :]                # [batch, L, P]
        dB_bar = dB_bar + np.einsum("bjp,bjh->ph", dW, u)
        du = du + np.real(np.einsum("bjp,ph->bjh", np.conj(dW), B_bar))
        W = np.einsum("bjh,ph->bjp", u, B_bar)
        dlam = dlam + np.einsum("jp,bjp,bp->p", cdpw[L - 1::-1], np.conj(W), dx_last)
        dlam = dlam + np.sum(cdpw[L] * np.conj(x0) * dx_last, axis=0)
        dx0 = dx0 + cpw[L] * dx_last
    return {"u": np.ascontiguousarray(du), "Lambda_bar": dlam, "B_bar": dB_bar, "C_tilde": dC,
            "x0": dx0}


#: ``engine name -> (forward, backward)`` for :func:`refssm.ssm.s5.s5_ssm_forward`.
ENGINE_FUNCTIONS = {
    "numba": (numba_forward, numba_backward),
    "logdepth": (logdepth_forward, logdepth_backward),
    "fft": (fft_forward, fft_backward),
    "fft_dense": (fft_dense_forward, fft_dense_backward),
}


# ===========================================================================
# Benchmark
# ===========================================================================

def bench_s5(hidden_size: int = 256, state_size: int = 64, seq_lens=(60, 4096, 65536), *,
             batch: int = 1, repeats: int = 5, engines=ENGINES, conj_sym: bool = True,
             backward: bool = False, dense_limit_bytes: float = 1e9, seed: int = 0,
             verbose: bool = True) -> list:
    """Time the S5 engines: median of ``repeats`` runs after one warm-up run.

    Times :func:`refssm.ssm.s5.s5_ssm_forward` (discretisation, core and
    ``D`` term) per engine and sequence length, at the paper's
    initialisation. ``fft_dense`` is skipped where its dense kernel
    (about ``3 * 8 seq_len H^2`` bytes) would exceed ``dense_limit_bytes``.

    Parameters
    ----------
    hidden_size, state_size : int
        ``H`` and ``P`` (``P/2`` stored complex states with ``conj_sym``).
    seq_lens : iterable of int
    batch, repeats : int
    engines : iterable of str
    conj_sym : bool
    backward : bool
        Time forward + backward instead of forward only.
    dense_limit_bytes : float
    seed : int
    verbose : bool
        Print the table and where the FFT beats the scans.

    Returns
    -------
    list of dict
        ``{"engine", "seq_len", "median_s", "min_s", "runs"}``;
        ``median_s`` is None for a skipped engine (with ``"skipped"``).

    Examples
    --------
    >>> rows = bench_s5(8, 4, seq_lens=(16,), repeats=1, verbose=False)
    >>> sorted(r["engine"] for r in rows)
    ['fft', 'fft_dense', 'logdepth', 'numba', 'numpy']
    """
    from ..ssm.s5 import s5_ssm_backward
    rng = np.random.default_rng(seed)
    params = init_s5_ssm(hidden_size, state_size, conj_sym=conj_sym, rng=rng)
    rows = []
    for L in seq_lens:
        u = rng.standard_normal((batch, L, hidden_size))
        for engine in engines:
            need = 3 * 8.0 * L * hidden_size ** 2
            if engine == "fft_dense" and need > dense_limit_bytes:
                rows.append(dict(engine=engine, seq_len=L, median_s=None, min_s=None, runs=0,
                                 skipped=f"dense kernel needs ~{need / 1e9:.1f} GB"))
                continue

            def run():
                y, x, saved = s5_ssm_forward(params, u, conj_sym=conj_sym, engine=engine)
                if backward:
                    s5_ssm_backward(np.ones_like(y), None, saved)

            run()                                                 # warm-up (compile, caches)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
            rows.append(dict(engine=engine, seq_len=L, median_s=float(np.median(times)),
                             min_s=float(np.min(times)), runs=repeats))
    if verbose:
        print(_bench_report(rows, hidden_size, state_size, conj_sym, batch, backward))
    return rows


def _bench_report(rows, H, N, conj_sym, batch, backward) -> str:
    lens = sorted({r["seq_len"] for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    cell = {(r["engine"], r["seq_len"]): r for r in rows}
    what = "forward + backward" if backward else "forward"
    lines = [f"S5 core {what}: H={H}, P={N} ({N // 2 if conj_sym else N} complex states), "
             f"batch={batch}, median seconds",
             "engine      " + "".join(f"{'L=' + str(L):>14}" for L in lens)]
    for e in engines:
        vals = []
        for L in lens:
            r = cell.get((e, L))
            vals.append("-" if r is None else "skipped" if r["median_s"] is None
                        else f"{r['median_s']:.4g}")
        lines.append(f"{e:<12}" + "".join(f"{v:>14}" for v in vals))
    for L in lens:
        f = cell.get(("fft", L))
        if f is None or f["median_s"] is None:
            continue
        for scan in ("numpy", "numba", "logdepth"):
            s = cell.get((scan, L))
            if s is None or s["median_s"] is None:
                continue
            ratio = s["median_s"] / f["median_s"]
            verdict = "FFT faster" if ratio > 1 else "scan faster"
            lines.append(f"L={L}: fft vs {scan}: {verdict} ({ratio:.2f}x)")
    return "\n".join(lines)
