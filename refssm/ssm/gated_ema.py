"""The gated EMA core of GatedSSM (DESIGN.md section 1.2): two sigmoid gates and an
exponential moving average over time, forward and manual backward, on a NumPy
engine (the readable ground truth) and a Numba engine.

GatedSSM is *not* Mamba: where Mamba runs the selective scan, Edifice's
``GatedSSM.build_selective_ssm`` (``selective_scan_impl`` and
``cumulative_ema``) gates the input and mixes in a moving context. With
``x [batch, seq_len, inner]`` (the SSM input after conv + SiLU), the step
sizes ``delta [batch, seq_len, inner]`` (after softplus) and ``B, C [batch,
seq_len, N]``::

    g_t    = sigmoid(mean_c delta_t[c])                 [batch, seq_len, 1]   selection gate
    s_t    = sigmoid(sum_n B_t[n] C_t[n])               [batch, seq_len, 1]   B.C gate
    gx_t   = g_t s_t x_t                                [batch, seq_len, inner]
    ctx_t  = alpha ctx_{t-1} + (1 - alpha) gx_t         scan_mode "causal" (ctx_{-1} = 0 or carried)
    ctx_t  = w_t gx_t,  w_t = alpha^(L-1-t) / sum_s alpha^(L-1-s)      scan_mode "legacy"
    y_t    = gx_t + (1 - g_t) ctx_t                     [batch, seq_len, inner]

``alpha = 0.9`` in Edifice. ``"legacy"`` is Edifice's formula verbatim: a
per-position weight, normalised over the *whole* sequence, multiplying the
current frame only (despite its name it sums nothing over time). Its output
at ``t`` therefore depends on the sequence length ``L``: the same prefix gives
different numbers inside a longer sequence, and no carried state can
reproduce it, so it cannot be stepped or chunked. ``"causal"`` is the
recurrence the comments of Edifice's code describe ("exponential moving
average along sequence"): causal, a carried context ``[batch, inner]``, one
frame at a time with :func:`gated_ema_step` giving the full forward's numbers.

Backward (:func:`gated_ema_backward`), with ``a_t = dL/d ctx_t`` (complete)::

    causal: a_t = dy_t (1 - g_t) + alpha a_{t+1},   a_{L-1} includes d last_context
            d gx_t = dy_t + (1 - alpha) a_t,        d ctx_{-1} = alpha a_0
    legacy: d gx_t = dy_t (1 + (1 - g_t) w_t)
    d g_t  = sum_c d gx_t s_t x_t - sum_c dy_t ctx_t        d s_t = sum_c d gx_t g_t x_t
    d x    = d gx g s
    d delta_t[c] = d g_t g_t (1 - g_t) / inner              (every c)
    d B_t = d s_t s_t (1 - s_t) C_t,   d C_t = d s_t s_t (1 - s_t) B_t

Engines (``engine=``): ``"numpy"`` (a loop over time, vectorised over batch
and channels) and ``"numba"`` (``@njit(parallel=True, cache=True)``, no
fastmath: ``prange`` over (batch row, block of channels) for the scans, over
(batch row, time) for the gates and their gradients; every sum is taken in a
fixed order inside one ``prange`` item, so results do not depend on the thread
count). They agree to ~1e-16 (``tests/test_gated_ssm_core.py``).

dtype: float32 if every input is float32, else float64. float32 against
float64: normwise ~2e-7 on the output (seq_len 256, inner 32, N 8; both
engines; ``tests/test_gated_ssm_core.py::test_float32_error_is_documented``
holds it to 1e-6).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .._validate import as_float_array, check_shape, result_dtype
from ..ops.activations import sigmoid

__all__ = ["ENGINES", "SCAN_MODES", "GatedEMASaved", "selection_gate", "bc_gate",
           "legacy_weights", "ema_scan", "gated_ema_forward", "gated_ema_backward",
           "gated_ema_step"]

ENGINES = ("numpy", "numba")
SCAN_MODES = ("causal", "legacy")

#: Channels per ``prange`` item in the Numba scans.
CHANNEL_BLOCK = 64


# ---------------------------------------------------------------------------
# The equations, one function each (NumPy engine)
# ---------------------------------------------------------------------------

def selection_gate(delta: np.ndarray) -> np.ndarray:
    """``g = sigmoid(mean_c delta)``: ``[..., inner]`` -> ``[..., 1]``.

    Since ``delta = softplus(.) > 0``, ``g > 1/2``.

    Examples
    --------
    >>> selection_gate(np.zeros((1, 2, 3)))[0, :, 0]
    array([0.5, 0.5])
    """
    return sigmoid(delta.mean(axis=-1, keepdims=True))


def bc_gate(B: np.ndarray, C: np.ndarray) -> np.ndarray:
    """``s = sigmoid(sum_n B[n] C[n])``: ``[..., N]`` x ``[..., N]`` -> ``[..., 1]``.

    Examples
    --------
    >>> float(bc_gate(np.ones((1, 2)), np.zeros((1, 2)))[0, 0])
    0.5
    """
    return sigmoid(np.sum(B * C, axis=-1, keepdims=True))


def legacy_weights(seq_len: int, alpha: float, dtype=np.float64) -> np.ndarray:
    """Edifice's ``cumulative_ema`` weights ``w_t = alpha^(L-1-t) / sum_s alpha^(L-1-s)``, ``[seq_len]``.

    They depend on ``seq_len``: that is why the legacy mode cannot be stepped.

    Examples
    --------
    >>> np.round(legacy_weights(3, 0.5), 4)        # 1/4, 2/4, 4/4 over 7/4
    array([0.1429, 0.2857, 0.5714])
    >>> float(legacy_weights(4, 0.5)[0]) != float(legacy_weights(3, 0.5)[0])
    True
    """
    w = np.power(float(alpha), np.arange(seq_len - 1, -1, -1, dtype=np.float64))
    return (w / w.sum()).astype(dtype, copy=False)


def ema_scan(gx: np.ndarray, alpha: float, context0: np.ndarray) -> np.ndarray:
    """``ctx_t = alpha ctx_{t-1} + (1 - alpha) gx_t``, a loop over time.

    Parameters
    ----------
    gx : ndarray ``[batch, seq_len, inner]``
    alpha : float
    context0 : ndarray ``[batch, inner]``
        ``ctx_{-1}``.

    Returns
    -------
    ndarray ``[batch, seq_len, inner]``
        Every ``ctx_t``.

    Examples
    --------
    >>> ema_scan(np.ones((1, 3, 1)), 0.5, np.zeros((1, 1)))[0, :, 0]
    array([0.5  , 0.75 , 0.875])
    """
    ctx = np.empty_like(gx)
    c = context0
    for t in range(gx.shape[1]):
        c = alpha * c + (1.0 - alpha) * gx[:, t]
        ctx[:, t] = c
    return ctx


class GatedEMASaved(NamedTuple):
    """What :func:`gated_ema_forward` keeps for :func:`gated_ema_backward`.

    Attributes
    ----------
    engine, scan_mode : str
    alpha : float
    x : ndarray ``[batch, seq_len, inner]``
    B, C : ndarray ``[batch, seq_len, N]``
    g, s : ndarray ``[batch, seq_len, 1]``
        The two gates.
    context : ndarray ``[batch, seq_len, inner]``
        ``ctx_t`` (needed for ``d g``).
    """

    engine: str
    scan_mode: str
    alpha: float
    x: np.ndarray
    B: np.ndarray
    C: np.ndarray
    g: np.ndarray
    s: np.ndarray
    context: np.ndarray


def _prepare(x, delta, B, C, alpha, scan_mode, initial_context, engine):
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    if scan_mode not in SCAN_MODES:
        raise ValueError(f"scan_mode: expected one of {SCAN_MODES}, got {scan_mode!r}")
    try:
        if isinstance(alpha, (bool, np.bool_, str, bytes)):
            raise TypeError
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
    x = as_float_array(x, "x", ndim=3)
    batch, seq_len, inner = x.shape
    if batch < 1 or seq_len < 1 or inner < 1:
        raise ValueError(f"x: expected non-empty [batch, seq_len, inner], got {x.shape}")
    delta = as_float_array(delta, "delta", ndim=3)
    check_shape(delta, x.shape, "delta", "[batch, seq_len, inner] (as x)")
    B = as_float_array(B, "B", ndim=3)
    C = as_float_array(C, "C", ndim=3)
    if B.shape[:2] != (batch, seq_len) or B.shape[2] < 1:
        raise ValueError(f"B: expected shape ({batch}, {seq_len}, N) [batch, seq_len, state], "
                         f"got {B.shape}")
    check_shape(C, B.shape, "C", "[batch, seq_len, state] (as B)")
    if initial_context is not None:
        if scan_mode == "legacy":
            raise ValueError("initial_context: the legacy scan has no carried context (its "
                             "weights are normalised over the whole sequence), expected None")
        initial_context = as_float_array(initial_context, "initial_context", ndim=2)
        check_shape(initial_context, (batch, inner), "initial_context", "[batch, inner]")
    dtype = result_dtype(x, delta, B, C, initial_context)
    cast = lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return cast(x), cast(delta), cast(B), cast(C), alpha, cast(initial_context)


def gated_ema_forward(x, delta, B, C, *, alpha: float = 0.9, scan_mode: str = "causal",
                      initial_context=None, engine: str = "numpy"):
    """The gated core over a sequence: gates, EMA context, output.

    Parameters
    ----------
    x : ndarray ``[batch, seq_len, inner]``
    delta : ndarray ``[batch, seq_len, inner]``
        Step sizes (after softplus).
    B, C : ndarray ``[batch, seq_len, N]``
    alpha : float, default 0.9
        EMA decay, in ``[0, 1]``.
    scan_mode : {"causal", "legacy"}
    initial_context : ndarray ``[batch, inner]``, optional
        ``ctx_{-1}`` (zeros if omitted); causal mode only. Pass a previous
        call's ``last_context`` to continue a sequence (chunks equal one call).
    engine : {"numpy", "numba"}

    Returns
    -------
    y : ndarray ``[batch, seq_len, inner]``
    last_context : ndarray ``[batch, inner]`` or None
        ``ctx_{L-1}`` (None in legacy mode: nothing carries).
    saved : GatedEMASaved

    Raises
    ------
    ValueError
        Wrong shapes, NaN/inf, ``alpha`` outside ``[0, 1]``, an unknown mode or
        engine, an ``initial_context`` in legacy mode.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((2, 6, 3)); delta = rng.uniform(0.1, 1.0, (2, 6, 3))
    >>> B, C = rng.standard_normal((2, 2, 6, 4))
    >>> y, ctx, _ = gated_ema_forward(x, delta, B, C)
    >>> y1, c1, _ = gated_ema_forward(x[:, :4], delta[:, :4], B[:, :4], C[:, :4])
    >>> y2, _, _ = gated_ema_forward(x[:, 4:], delta[:, 4:], B[:, 4:], C[:, 4:], initial_context=c1)
    >>> bool(np.allclose(np.concatenate([y1, y2], 1), y, rtol=0, atol=1e-15))
    True
    """
    x, delta, B, C, alpha, ctx0 = _prepare(x, delta, B, C, alpha, scan_mode, initial_context,
                                          engine)
    batch, seq_len, inner = x.shape
    causal = scan_mode == "causal"
    if causal and ctx0 is None:
        ctx0 = np.zeros((batch, inner), dtype=x.dtype)
    if engine == "numpy":
        g = selection_gate(delta)                                     # [b, L, 1]
        s = bc_gate(B, C)                                             # [b, L, 1]
        gx = g * s * x                                                # [b, L, inner]
        if causal:
            ctx = ema_scan(gx, alpha, ctx0)
        else:
            ctx = gx * legacy_weights(seq_len, alpha, x.dtype)[:, None]
        y = gx + (1.0 - g) * ctx
    else:
        g = np.empty((batch, seq_len, 1), dtype=x.dtype)
        s = np.empty((batch, seq_len, 1), dtype=x.dtype)
        _nb_gates(delta, B, C, g, s)
        w = legacy_weights(seq_len, alpha, x.dtype)
        y = np.empty_like(x)
        ctx = np.empty_like(x)
        if ctx0 is None:
            ctx0 = np.zeros((batch, inner), dtype=x.dtype)
        _nb_forward_scan(x, g, s, alpha, causal, w, ctx0, y, ctx, CHANNEL_BLOCK)
    last = ctx[:, -1].copy() if causal else None
    return y, last, GatedEMASaved(engine, scan_mode, alpha, x, B, C, g, s, ctx)


def gated_ema_backward(dy, d_last_context, saved: GatedEMASaved) -> dict:
    """Manual backward of :func:`gated_ema_forward` (a reverse-time scan in causal mode).

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, inner]``
        Gradient of the loss with respect to ``y``.
    d_last_context : ndarray ``[batch, inner]`` or None
        Gradient with respect to ``last_context`` (causal mode; None: zero).
    saved : GatedEMASaved

    Returns
    -------
    dict
        ``x``, ``delta`` ``[batch, seq_len, inner]``; ``B``, ``C`` ``[batch,
        seq_len, N]``; ``initial_context`` ``[batch, inner]`` (None in legacy
        mode).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 5, 2)); delta = rng.uniform(0.1, 1.0, (1, 5, 2))
    >>> B, C = rng.standard_normal((2, 1, 5, 3))
    >>> y, ctx, saved = gated_ema_forward(x, delta, B, C)
    >>> g = gated_ema_backward(np.ones_like(y), None, saved)
    >>> sorted(k for k, v in g.items() if v is not None)
    ['B', 'C', 'delta', 'initial_context', 'x']
    """
    engine, scan_mode, alpha, x, B, C, g, s, ctx = saved
    batch, seq_len, inner = x.shape
    causal = scan_mode == "causal"
    dy = as_float_array(dy, "dy", ndim=3)
    check_shape(dy, x.shape, "dy", "[batch, seq_len, inner] (as y)")
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    if d_last_context is not None:
        if not causal:
            raise ValueError("d_last_context: the legacy scan returns no context, expected None")
        d_last_context = as_float_array(d_last_context, "d_last_context", ndim=2)
        check_shape(d_last_context, (batch, inner), "d_last_context", "[batch, inner]")
    carry = (np.zeros((batch, inner), dtype=x.dtype) if d_last_context is None
             else np.array(d_last_context, dtype=x.dtype))
    if engine == "numpy":
        # --- the context: d gx_t (reverse-time scan in causal mode) ---------
        if causal:
            dgx = np.empty_like(dy)
            for t in range(seq_len - 1, -1, -1):
                a = dy[:, t] * (1.0 - g[:, t]) + carry                  # dL/d ctx_t, complete
                dgx[:, t] = dy[:, t] + (1.0 - alpha) * a
                carry = alpha * a                                       # to ctx_{t-1}
            d_ctx0 = carry
        else:
            w = legacy_weights(seq_len, alpha, x.dtype)[:, None]
            dgx = dy * (1.0 + (1.0 - g) * w)
            d_ctx0 = None
        # --- the gates ------------------------------------------------------
        dg = np.sum(dgx * s * x, axis=-1, keepdims=True) - np.sum(dy * ctx, axis=-1, keepdims=True)
        ds = np.sum(dgx * g * x, axis=-1, keepdims=True)
        dx = dgx * g * s
        ddelta = np.broadcast_to(dg * g * (1.0 - g) / inner, x.shape).copy()
        dq = ds * s * (1.0 - s)                                         # d (sum_n B C)
        dB, dC = dq * C, dq * B
    else:
        w = legacy_weights(seq_len, alpha, x.dtype)
        dgx = np.empty_like(dy)
        dx = np.empty_like(dy)
        d_ctx0 = np.empty((batch, inner), dtype=x.dtype)
        _nb_backward_scan(dy, g, s, alpha, causal, w, carry, dgx, dx, d_ctx0, CHANNEL_BLOCK)
        ddelta = np.empty_like(dy)
        dB = np.empty_like(B)
        dC = np.empty_like(C)
        _nb_backward_gates(dy, dgx, x, ctx, B, C, g, s, ddelta, dB, dC)
        if not causal:
            d_ctx0 = None
    return {"x": dx, "delta": ddelta, "B": dB, "C": dC, "initial_context": d_ctx0}


def gated_ema_step(x, delta, B, C, context, alpha: float = 0.9):
    """One frame of the causal mode: ``[batch, inner]`` in, ``[batch, inner]`` out.

    Parameters
    ----------
    x, delta : ndarray ``[batch, inner]``
    B, C : ndarray ``[batch, N]``
    context : ndarray ``[batch, inner]``
        ``ctx_{t-1}``.
    alpha : float

    Returns
    -------
    y : ndarray ``[batch, inner]``
    context : ndarray ``[batch, inner]``
        ``ctx_t``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((1, 4, 2)); delta = rng.uniform(0.1, 1.0, (1, 4, 2))
    >>> B, C = rng.standard_normal((2, 1, 4, 3))
    >>> full, _, _ = gated_ema_forward(x, delta, B, C)
    >>> ctx = np.zeros((1, 2))
    >>> for t in range(4):
    ...     y, ctx = gated_ema_step(x[:, t], delta[:, t], B[:, t], C[:, t], ctx)
    >>> bool(np.allclose(y, full[:, -1], rtol=0, atol=1e-15))
    True
    """
    x, delta, B, C, context = (as_float_array(v, name, ndim=2) for v, name in (
        (x, "x"), (delta, "delta"), (B, "B"), (C, "C"), (context, "context")))
    check_shape(delta, x.shape, "delta", "[batch, inner] (as x)")
    check_shape(context, x.shape, "context", "[batch, inner] (as x)")
    if B.shape[0] != x.shape[0]:
        raise ValueError(f"B: expected shape ({x.shape[0]}, N) [batch, state], got {B.shape}")
    check_shape(C, B.shape, "C", "[batch, state] (as B)")
    # the sequence's own checks (dtype, NaN, alpha) on a sequence of one step
    x1, d1, B1, C1, alpha, context = _prepare(x[:, None], delta[:, None], B[:, None],
                                              C[:, None], alpha, "causal", context, "numpy")
    x, delta, B, C = x1[:, 0], d1[:, 0], B1[:, 0], C1[:, 0]
    g = selection_gate(delta)                                          # [b, 1]
    s = bc_gate(B, C)                                                  # [b, 1]
    gx = g * s * x
    context = alpha * context + (1.0 - alpha) * gx
    return gx + (1.0 - g) * context, context


# ---------------------------------------------------------------------------
# Numba engine
# ---------------------------------------------------------------------------

@njit(cache=True)
def _nb_sigmoid(z):
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


@njit(parallel=True, cache=True)
def _nb_gates(delta, B, C, g, s):
    """``g [b, L, 1]`` and ``s [b, L, 1]``; one ``prange`` item per (batch row, time)."""
    batch, L, inner = delta.shape
    N = B.shape[2]
    for item in prange(batch * L):
        b = item // L
        t = item - b * L
        acc = 0.0
        for c in range(inner):
            acc += delta[b, t, c]
        g[b, t, 0] = _nb_sigmoid(acc / inner)
        acc = 0.0
        for n in range(N):
            acc += B[b, t, n] * C[b, t, n]
        s[b, t, 0] = _nb_sigmoid(acc)


@njit(parallel=True, cache=True)
def _nb_forward_scan(x, g, s, alpha, causal, w, ctx0, y, ctx, cblk):
    """``y`` and ``ctx`` ``[b, L, inner]``; one ``prange`` item per (batch row, channel block)."""
    batch, L, inner = x.shape
    nblk = (inner + cblk - 1) // cblk
    for item in prange(batch * nblk):
        b = item // nblk
        c0 = (item - b * nblk) * cblk
        c1 = min(c0 + cblk, inner)
        state = ctx0[b, c0:c1].copy()
        for t in range(L):
            gs = g[b, t, 0] * s[b, t, 0]
            keep = 1.0 - g[b, t, 0]
            for c in range(c0, c1):
                gx = gs * x[b, t, c]
                if causal:
                    state[c - c0] = alpha * state[c - c0] + (1.0 - alpha) * gx
                    cv = state[c - c0]
                else:
                    cv = gx * w[t]
                ctx[b, t, c] = cv
                y[b, t, c] = gx + keep * cv


@njit(parallel=True, cache=True)
def _nb_backward_scan(dy, g, s, alpha, causal, w, d_last, dgx, dx, d_ctx0, cblk):
    """``d gx``, ``d x`` ``[b, L, inner]`` and ``d ctx_{-1}`` ``[b, inner]`` (reverse time)."""
    batch, L, inner = dy.shape
    nblk = (inner + cblk - 1) // cblk
    for item in prange(batch * nblk):
        b = item // nblk
        c0 = (item - b * nblk) * cblk
        c1 = min(c0 + cblk, inner)
        carry = d_last[b, c0:c1].copy()
        for t in range(L - 1, -1, -1):
            gs = g[b, t, 0] * s[b, t, 0]
            keep = 1.0 - g[b, t, 0]
            for c in range(c0, c1):
                if causal:
                    a = dy[b, t, c] * keep + carry[c - c0]
                    d = dy[b, t, c] + (1.0 - alpha) * a
                    carry[c - c0] = alpha * a
                else:
                    d = dy[b, t, c] * (1.0 + keep * w[t])
                dgx[b, t, c] = d
                dx[b, t, c] = d * gs
        for c in range(c0, c1):
            d_ctx0[b, c] = carry[c - c0]


@njit(parallel=True, cache=True)
def _nb_backward_gates(dy, dgx, x, ctx, B, C, g, s, ddelta, dB, dC):
    """``d delta [b, L, inner]``, ``d B``, ``d C`` ``[b, L, N]``; one item per (batch row, time)."""
    batch, L, inner = x.shape
    N = B.shape[2]
    for item in prange(batch * L):
        b = item // L
        t = item - b * L
        sx = 0.0                                   # sum_c d gx * x
        yc = 0.0                                   # sum_c dy * ctx
        for c in range(inner):
            sx += dgx[b, t, c] * x[b, t, c]
            yc += dy[b, t, c] * ctx[b, t, c]
        gt = g[b, t, 0]
        st = s[b, t, 0]
        dg = sx * st - yc
        dd = dg * gt * (1.0 - gt) / inner
        for c in range(inner):
            ddelta[b, t, c] = dd
        dq = sx * gt * st * (1.0 - st)
        for n in range(N):
            dB[b, t, n] = dq * C[b, t, n]
            dC[b, t, n] = dq * B[b, t, n]
