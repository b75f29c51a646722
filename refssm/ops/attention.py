"""Causal multi-head scaled dot-product attention (Vaswani et al. 2017, eq. 1), forward and backward.

Per batch row and head, with ``d = head_dim``::

    S      = Q K^T / sqrt(d)                              scores      [Lq, Lk]
    S[i,j] = -inf  where j > i + (Lk - Lq)                causal mask (query i sees keys up to its own time)
    m_i    = max_j S[i, j]                                 over the visible keys
    E[i,j] = exp(S[i, j] - m_i)                            exactly 0 where masked
    P[i,j] = E[i, j] / (sum_j E[i, j] + eps)               softmax; eps = 0 is the true softmax
    O      = P V                                           output      [Lq, d]

``eps = softmax_eps`` is 0 by default; Edifice's ``SSTransformer``
(``causal_attention_impl``) adds ``1e-8`` to the denominator, so its weights
sum to ``S / (S + 1e-8)``, slightly below 1, and its output depends on the max
``m_i`` subtracted (``P = exp(S) / (sum exp(S) + eps exp(m))``): the backward
below carries that dependence exactly (the gradient through ``m_i`` goes to
the key that attains the max, the first one on a tie).

Queries and keys are aligned at their *ends* (``Lk >= Lq``): the last query
is at the same time as the last key. With ``Lk == Lq`` this is the usual
causal mask (``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``);
with ``Lk > Lq`` the first ``Lk - Lq`` keys are a cache of earlier frames (the
State Space Transformer's step and chunked forward), so a chunk attends to the
whole past exactly as the full sequence does.

Layouts: ``q [batch, heads, Lq, d]``, ``k, v [batch, heads, Lk, d]``;
:func:`split_heads` / :func:`merge_heads` convert from and to the projections'
``[batch, seq_len, heads * d]`` (head ``h`` is columns ``h*d .. h*d + d - 1``,
as Edifice's ``reshape {batch, seq, heads, d}`` + transpose).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from .._validate import as_float_array

__all__ = ["AttentionSaved", "split_heads", "merge_heads", "causal_mask", "masked_softmax",
           "causal_attention_forward", "causal_attention_backward"]


def split_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """``[batch, seq_len, heads * d]`` -> ``[batch, heads, seq_len, d]``.

    Examples
    --------
    >>> split_heads(np.arange(12.0).reshape(1, 2, 6), 3)[0, 1]      # head 1: columns 2, 3
    array([[2., 3.],
           [8., 9.]])
    """
    batch, seq_len, width = x.shape
    if num_heads < 1 or width % num_heads:
        raise ValueError(f"split_heads: expected the last axis ({width}) to be a multiple of "
                         f"num_heads={num_heads}, got shape {x.shape}")
    return x.reshape(batch, seq_len, num_heads, width // num_heads).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """``[batch, heads, seq_len, d]`` -> ``[batch, seq_len, heads * d]`` (inverse of :func:`split_heads`).

    Examples
    --------
    >>> x = np.arange(12.0).reshape(1, 2, 6)
    >>> bool(np.array_equal(merge_heads(split_heads(x, 3)), x))
    True
    """
    batch, heads, seq_len, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(batch, seq_len, heads * d)


def causal_mask(q_len: int, k_len: int) -> np.ndarray:
    """``[Lq, Lk]`` booleans, True where query ``i`` may see key ``j``: ``j <= i + (Lk - Lq)``.

    Examples
    --------
    >>> causal_mask(2, 3).astype(int)           # one cached key before two new frames
    array([[1, 1, 0],
           [1, 1, 1]])
    """
    offset = k_len - q_len
    return np.arange(k_len)[None, :] <= np.arange(q_len)[:, None] + offset


class AttentionSaved(NamedTuple):
    """What :func:`causal_attention_forward` keeps for its backward.

    Attributes
    ----------
    q : ndarray ``[batch, heads, Lq, d]``
    k, v : ndarray ``[batch, heads, Lk, d]``
    weights : ndarray ``[batch, heads, Lq, Lk]``
        ``P``, exactly 0 at masked positions.
    eps_share : ndarray ``[batch, heads, Lq, 1]`` or None
        ``eps / (sum_j E + eps)``, the part of the denominator that is ``eps``
        (None when ``eps == 0``).
    argmax : ndarray ``[batch, heads, Lq]`` (int) or None
        The key attaining ``m_i`` (None when ``eps == 0``: the softmax does
        not depend on ``m_i`` then).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    weights: np.ndarray
    eps_share: Optional[np.ndarray]
    argmax: Optional[np.ndarray]


def _check(q, k, v, softmax_eps):
    q = as_float_array(q, "q", ndim=4)
    k = as_float_array(k, "k", ndim=4)
    v = as_float_array(v, "v", ndim=4)
    if k.shape != v.shape:
        raise ValueError(f"attention: expected k and v of one shape [batch, heads, Lk, d], "
                         f"got k {k.shape} and v {v.shape}")
    b, h, lq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        raise ValueError(f"attention: expected k [batch={b}, heads={h}, Lk, d={d}] to match "
                         f"q {q.shape}, got {k.shape}")
    if lq < 1 or d < 1 or k.shape[2] < lq:
        raise ValueError(f"attention: expected 1 <= Lq <= Lk and d >= 1 (queries aligned with "
                         f"the last keys), got q {q.shape} and k {k.shape}")
    eps = float(softmax_eps)
    if not (math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"attention: expected softmax_eps a finite number >= 0, got {softmax_eps!r}")
    return q, k, v, eps


def masked_softmax(scores: np.ndarray, mask: np.ndarray, eps: float = 0.0):
    """``P = exp(S - m) / (sum exp(S - m) + eps)`` over the visible keys (last axis).

    Parameters
    ----------
    scores : ndarray ``[..., Lq, Lk]``
    mask : ndarray ``[Lq, Lk]`` (bool), every row with at least one True
    eps : float

    Returns
    -------
    weights : ndarray ``[..., Lq, Lk]``
        Exactly 0 where ``mask`` is False.
    denom : ndarray ``[..., Lq, 1]``
        ``sum exp(S - m)`` (before ``+ eps``).
    argmax : ndarray ``[..., Lq]`` (int)
        Index of ``m`` (first on a tie).

    Examples
    --------
    >>> w, _, _ = masked_softmax(np.zeros((2, 2)), causal_mask(2, 2))
    >>> w
    array([[1. , 0. ],
           [0.5, 0.5]])
    """
    s = np.where(mask, scores, -np.inf)
    argmax = np.argmax(s, axis=-1)
    m = np.take_along_axis(s, argmax[..., None], axis=-1)           # [..., Lq, 1]
    e = np.exp(s - m)                                                # exp(-inf) = 0: masked
    denom = e.sum(axis=-1, keepdims=True)
    return e / (denom + eps), denom, argmax


def causal_attention_forward(q, k, v, *, softmax_eps: float = 0.0):
    """Causal scaled dot-product attention, every head at once.

    Parameters
    ----------
    q : ndarray ``[batch, heads, Lq, d]``
    k, v : ndarray ``[batch, heads, Lk, d]``, ``Lk >= Lq``
        The first ``Lk - Lq`` keys/values are frames before the queries' (a cache).
    softmax_eps : float, default 0.0
        Added to the softmax denominator (Edifice: ``1e-8``).

    Returns
    -------
    out : ndarray ``[batch, heads, Lq, d]``
    saved : AttentionSaved
        ``saved.weights`` are the attention weights ``P``.

    Raises
    ------
    ValueError
        Shapes that do not match (naming expected and actual), ``Lk < Lq``,
        NaN/inf, a negative ``softmax_eps``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 4, 3)) for _ in range(3))
    >>> out, saved = causal_attention_forward(q, k, v)
    >>> out.shape, bool(np.all(saved.weights[..., 0, 1:] == 0))       # frame 0 sees only itself
    ((1, 2, 4, 3), True)
    >>> bool(np.allclose(out[..., 0, :], v[..., 0, :], rtol=0, atol=1e-15))
    True
    """
    q, k, v, eps = _check(q, k, v, softmax_eps)
    d = q.shape[-1]
    scores = (q @ k.swapaxes(-1, -2)) / math.sqrt(d)                  # [b, h, Lq, Lk]
    weights, denom, argmax = masked_softmax(scores, causal_mask(q.shape[2], k.shape[2]), eps)
    out = weights @ v                                                 # [b, h, Lq, d]
    if eps > 0.0:
        saved = AttentionSaved(q, k, v, weights, eps / (denom + eps), argmax)
    else:
        saved = AttentionSaved(q, k, v, weights, None, None)
    return out, saved


def causal_attention_backward(d_out, saved: AttentionSaved) -> dict:
    """Manual backward of :func:`causal_attention_forward`.

    With ``dP = dO V^T``, the softmax's Jacobian ``dP_j/dS_k = P_j (delta_jk - P_k)``
    (true also with ``eps``, the max held fixed) gives::

        dV    = P^T dO
        dS    = P * (dP - rowsum(dP * P))                  0 at masked keys (P = 0 there)
        dS[i, argmax_i] -= rowsum(dP * P) * eps / (sum E + eps)     the path through m_i (eps > 0)
        dQ    = dS K / sqrt(d),   dK = dS^T Q / sqrt(d)

    Parameters
    ----------
    d_out : ndarray ``[batch, heads, Lq, d]``
    saved : AttentionSaved

    Returns
    -------
    dict
        ``q [batch, heads, Lq, d]``, ``k``, ``v`` ``[batch, heads, Lk, d]``.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> q, k, v = (rng.standard_normal((1, 1, 3, 2)) for _ in range(3))
    >>> out, saved = causal_attention_forward(q, k, v)
    >>> g = causal_attention_backward(np.ones_like(out), saved)
    >>> float(g["v"].sum())              # each query's weights sum to 1, two columns of ones
    6.0
    """
    q, k, v, P, eps_share, argmax = saved
    d_out = as_float_array(d_out, "d_out", ndim=4)
    if d_out.shape != q.shape:
        raise ValueError(f"attention backward: expected d_out shape {q.shape} "
                         f"[batch, heads, Lq, d], got {d_out.shape}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    dV = P.swapaxes(-1, -2) @ d_out                                   # [b, h, Lk, d]
    dP = d_out @ v.swapaxes(-1, -2)                                   # [b, h, Lq, Lk]
    row = np.sum(dP * P, axis=-1, keepdims=True)                      # [b, h, Lq, 1]
    dS = P * (dP - row)
    if eps_share is not None:                                         # through m_i = S[i, argmax_i]
        np.put_along_axis(dS, argmax[..., None],
                          np.take_along_axis(dS, argmax[..., None], axis=-1) - row * eps_share,
                          axis=-1)
    dQ = (dS @ k) * scale
    dK = (dS.swapaxes(-1, -2) @ q) * scale
    return {"q": dQ, "k": dK, "v": dV}
