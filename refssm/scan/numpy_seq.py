"""The NumPy sequential engine: the readable ground truth of the selective scan.

This is the selective state-space recurrence of Mamba (Gu & Dao 2023,
Algorithm 2 "SSM + Selection (S6)", eqs. 2a-2b with the discretization of
eq. 4), written as a plain loop over time. Every other engine (Numba fused,
Numba log-depth) is tested against this one, never the other way round.

The *core* computed here is, for every batch ``b``, channel ``c`` and state
``n`` (the prologue that turns the raw ``delta`` into ``dt``/``dtB`` and the
epilogue that adds ``D * u`` and the ``silu(z)`` gate live in
:mod:`refssm.ssm.selective_scan`)::

    A_bar[t, c, n] = exp(dt[t, c] * A[c, n])                     # ZOH of A
    h[t, c, n]     = A_bar[t, c, n] * h[t-1, c, n]
                     + dtB[t, c] * B[t, g(c), n] * u[t, c]      # B_bar * u
    y[t, c]        = sum_n C[t, g(c), n] * h[t, c, n]

``B`` and ``C`` arrive in one normalised 4-D layout ``[bB, LB, G, N]`` (see
:func:`refssm.ssm.selective_scan.normalise_bc`): ``bB`` is ``batch`` or 1,
``LB`` is ``seq_len`` or 1 (constant in time) and channel ``c`` reads group
``g(c) = c // (channels // G)``.

The readable path keeps every state ``h[t]`` for the backward pass, i.e. it
materialises ``[batch, seq_len, channels, state]``; the Numba engines do not.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["CoreSaved", "scan_core_forward", "scan_core_backward",
           "expand_groups", "reduce_groups"]


class CoreSaved(NamedTuple):
    """What the NumPy core forward keeps for its backward (all named).

    Attributes
    ----------
    u, dt, dtB : ndarray ``[batch, seq_len, channels]``
    A : ndarray ``[channels, state]``
    B4, C4 : ndarray ``[bB, LB, G, state]``
    h0 : ndarray ``[batch, channels, state]``
        State before the first step.
    states : ndarray ``[batch, seq_len, channels, state]``
        ``h[t]`` after every step (the readable path's only big saved value).
    """

    u: np.ndarray
    dt: np.ndarray
    dtB: np.ndarray
    A: np.ndarray
    B4: np.ndarray
    C4: np.ndarray
    h0: np.ndarray
    states: np.ndarray


def expand_groups(M4: np.ndarray, t: int, channels: int) -> np.ndarray:
    """``B`` or ``C`` at time ``t`` for every channel.

    Parameters
    ----------
    M4 : ndarray ``[bB, LB, G, state]``
    t : int
        Time index (ignored when ``LB == 1``: constant in time).
    channels : int

    Returns
    -------
    ndarray ``[bB, channels, state]``
        Row ``c`` is group ``c // (channels // G)``.
    """
    Mt = M4[:, t if M4.shape[1] > 1 else 0]                # [bB, G, N]
    return np.repeat(Mt, channels // M4.shape[2], axis=1)  # [bB, channels, N]


def reduce_groups(per_channel: np.ndarray, shape4: tuple) -> np.ndarray:
    """Adjoint of :func:`expand_groups` at one time step.

    Parameters
    ----------
    per_channel : ndarray ``[batch, channels, state]``
        Gradient with respect to the per-channel copy.
    shape4 : tuple ``(bB, LB, G, state)``

    Returns
    -------
    ndarray ``[bB, G, state]``
        Summed over the channels of each group, and over the batch if ``bB == 1``.
    """
    bB, _, G, N = shape4
    batch, channels, _ = per_channel.shape
    g = per_channel.reshape(batch, G, channels // G, N).sum(axis=2)
    if bB == 1 and batch > 1:
        g = g.sum(axis=0, keepdims=True)
    return g


def scan_core_forward(u, dt, dtB, A, B4, C4, h0):
    """Selective scan core, one time step after another (Gu & Dao 2023, Alg. 2).

    Parameters
    ----------
    u : ndarray ``[batch, seq_len, channels]``
        Input to the SSM (after Mamba's conv + SiLU).
    dt : ndarray ``[batch, seq_len, channels]``
        Step size used in ``A_bar = exp(dt * A)``.
    dtB : ndarray ``[batch, seq_len, channels]``
        Step size used in ``B_bar = dtB * B`` (``dt`` itself in Mamba; its
        channel mean in the Edifice convention).
    A : ndarray ``[channels, state]``
        Continuous-time diagonal state matrix (negative for stability).
    B4, C4 : ndarray ``[bB, LB, G, state]``
    h0 : ndarray ``[batch, channels, state]``

    Returns
    -------
    y : ndarray ``[batch, seq_len, channels]``
        ``y[t] = C[t] . h[t]`` (no ``D`` skip, no gate).
    h_last : ndarray ``[batch, channels, state]``
    saved : CoreSaved

    Examples
    --------
    >>> import numpy as np
    >>> u = np.ones((1, 3, 1)); dt = np.full((1, 3, 1), 0.5)
    >>> A = -np.ones((1, 1)); B4 = np.ones((1, 1, 1, 1)); C4 = np.ones((1, 1, 1, 1))
    >>> y, h, _ = scan_core_forward(u, dt, dt, A, B4, C4, np.zeros((1, 1, 1)))
    >>> np.round(y[0, :, 0], 4)    # 0.5, then 0.5 + e^-0.5 * 0.5, ...
    array([0.5   , 0.8033, 0.9872])
    """
    batch, seq_len, channels = u.shape
    states = np.empty((batch, seq_len, channels, A.shape[1]), dtype=u.dtype)
    y = np.empty_like(u)
    h = h0.copy()
    for t in range(seq_len):
        A_bar = np.exp(dt[:, t, :, None] * A)                          # [batch, channels, N]
        B_bar_u = dtB[:, t, :, None] * expand_groups(B4, t, channels) * u[:, t, :, None]
        h = A_bar * h + B_bar_u                                        # eq. 2a
        states[:, t] = h
        y[:, t] = np.sum(expand_groups(C4, t, channels) * h, axis=-1)  # eq. 2b
    return y, h, CoreSaved(u, dt, dtB, A, B4, C4, h0, states)


def scan_core_backward(dy, dh_last, saved: CoreSaved):
    """Manual backward of :func:`scan_core_forward`: a reverse-time scan.

    With ``g[t] = dL/dh[t]`` (the adjoint state), the chain rule through
    ``h[t] = A_bar[t] h[t-1] + dtB[t] B[t] u[t]`` and ``y[t] = C[t] . h[t]`` is
    itself a linear recurrence running backwards in time::

        g[t]     = C[t] * dy[t] + A_bar[t+1] * g[t+1]      (g[L] = dh_last)
        d dt[t]  = sum_n g[t] * h[t-1] * A_bar[t] * A
        d A      = sum_{b,t} g[t] * h[t-1] * A_bar[t] * dt[t]
        d dtB[t] = sum_n g[t] * B[t] * u[t]
        d u[t]   = sum_n g[t] * dtB[t] * B[t]
        d B[t]   = sum_{c in group} g[t] * dtB[t] * u[t]
        d C[t]   = sum_{c in group} dy[t] * h[t]
        d h0     = A_bar[0] * g[0]

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, channels]``
        Gradient of the loss with respect to ``y``.
    dh_last : ndarray ``[batch, channels, state]`` or None
        Gradient with respect to the returned final state.
    saved : CoreSaved

    Returns
    -------
    dict
        ``u, dt, dtB`` ``[batch, seq_len, channels]``; ``A`` ``[channels, state]``;
        ``B4, C4`` ``[bB, LB, G, state]``; ``h0`` ``[batch, channels, state]``.
    """
    u, dt, dtB, A, B4, C4, h0, states = saved
    batch, seq_len, channels = u.shape
    du = np.zeros_like(u)
    ddt = np.zeros_like(dt)
    ddtB = np.zeros_like(dtB)
    dA = np.zeros_like(A)
    dB4 = np.zeros_like(B4)
    dC4 = np.zeros_like(C4)
    g = np.zeros_like(h0) if dh_last is None else dh_last.astype(u.dtype, copy=True)
    for t in range(seq_len - 1, -1, -1):
        Bt = expand_groups(B4, t, channels)                       # [bB, channels, N]
        Ct = expand_groups(C4, t, channels)
        h_t = states[:, t]
        h_prev = states[:, t - 1] if t > 0 else h0
        g = g + Ct * dy[:, t, :, None]                            # dL/dh[t], complete
        A_bar = np.exp(dt[:, t, :, None] * A)
        d_dtA = g * h_prev * A_bar                                # dL/d(dt*A)
        ddt[:, t] = np.sum(d_dtA * A, axis=-1)
        dA += np.sum(d_dtA * dt[:, t, :, None], axis=0)
        ddtB[:, t] = np.sum(g * Bt * u[:, t, :, None], axis=-1)
        du[:, t] = np.sum(g * dtB[:, t, :, None] * Bt, axis=-1)
        tB = t if B4.shape[1] > 1 else 0
        tC = t if C4.shape[1] > 1 else 0
        dB4[:, tB] += reduce_groups(g * dtB[:, t, :, None] * u[:, t, :, None], B4.shape)
        dC4[:, tC] += reduce_groups(dy[:, t, :, None] * h_t, C4.shape)
        g = g * A_bar                                             # carry to h[t-1]
    return {"u": du, "dt": ddt, "dtB": ddtB, "A": dA, "B4": dB4, "C4": dC4, "h0": g}
