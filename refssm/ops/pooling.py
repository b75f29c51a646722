"""Causal window mean (the GatedSSM's "convolution": mean pooling, then a dense layer).

Every output frame is the mean of the last ``K`` input frames, zeros before
the start of the sequence (``K - 1`` frames of zero left padding)::

    x_pad   = [buffer ; x]                                   # [batch, K-1+L, C]
    y[t, c] = (x_pad[t, c] + x_pad[t+1, c] + ... + x_pad[t+K-1, c]) / K

as Edifice's ``GatedSSM.build_causal_conv1d`` (``Nx.window_mean`` over a
``{1, K, 1}`` window of the zero-padded input, ``padding: :valid``). Near the
start the zeros count in the mean (``y[0] = x[0] / K``), as in Edifice.

``buffer [batch, K-1, C]`` holds the ``K - 1`` frames before ``x`` (oldest
first; zeros at the start of a sequence), so a sequence can be processed in
chunks or frame by frame (:func:`causal_mean_step`) with the same numbers:
the window is always summed oldest frame first, then divided by ``K``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

__all__ = ["CausalMeanSaved", "causal_mean_forward", "causal_mean_backward", "causal_mean_step"]


class CausalMeanSaved(NamedTuple):
    """Saved by :func:`causal_mean_forward`: only sizes (the op is linear).

    Attributes
    ----------
    window : int
        ``K``.
    seq_len : int
    """

    window: int
    seq_len: int


def _check(x, window, buffer):
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"causal_mean: expected window an integer >= 1, got {window!r}")
    if x.ndim != 3:
        raise ValueError(f"causal_mean: expected x [batch, seq_len, channels], got shape {x.shape}")
    want = (x.shape[0], int(window) - 1, x.shape[2])
    if buffer is not None and buffer.shape != want:
        raise ValueError(f"causal_mean: expected buffer shape {want} [batch, window-1, channels], "
                         f"got {buffer.shape}")


def causal_mean_forward(x: np.ndarray, window: int, buffer: Optional[np.ndarray] = None):
    """Mean of the last ``window`` frames, causally.

    Parameters
    ----------
    x : ndarray ``[batch, seq_len, C]``
    window : int
        ``K`` (the original API's ``conv_size``).
    buffer : ndarray ``[batch, K-1, C]``, optional
        The ``K - 1`` frames before ``x`` (zeros if omitted: a fresh sequence).

    Returns
    -------
    y : ndarray ``[batch, seq_len, C]``
    new_buffer : ndarray ``[batch, K-1, C]``
        The last ``K - 1`` frames of ``[buffer ; x]``.
    saved : CausalMeanSaved

    Examples
    --------
    >>> x = np.array([3.0, 6.0, 9.0, 12.0]).reshape(1, 4, 1)
    >>> y, buf, _ = causal_mean_forward(x, 3)
    >>> y[0, :, 0], buf[0, :, 0]                # zeros before the start count
    (array([1., 3., 6., 9.]), array([ 9., 12.]))
    """
    _check(x, window, buffer)
    batch, seq_len, C = x.shape
    K = int(window)
    if buffer is None:
        buffer = np.zeros((batch, K - 1, C), dtype=x.dtype)
    x_pad = np.concatenate([buffer, x], axis=1)                      # [batch, K-1+L, C]
    total = x_pad[:, 0:seq_len].copy()
    for k in range(1, K):                                            # oldest frame first
        total += x_pad[:, k:k + seq_len]
    return total / K, x_pad[:, seq_len:].copy(), CausalMeanSaved(K, seq_len)


def causal_mean_backward(dy: np.ndarray, d_new_buffer: Optional[np.ndarray],
                         saved: CausalMeanSaved) -> dict:
    """Backward of :func:`causal_mean_forward` (its transpose).

    ``d x_pad[t + k] += dy[t] / K`` for ``k = 0 .. K-1``; the gradient of the
    returned buffer (the last ``K - 1`` frames of ``x_pad``) is added to them.

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, C]``
    d_new_buffer : ndarray ``[batch, K-1, C]`` or None
    saved : CausalMeanSaved

    Returns
    -------
    dict
        ``x [batch, seq_len, C]``, ``buffer [batch, K-1, C]``.

    Examples
    --------
    >>> y, _, s = causal_mean_forward(np.ones((1, 3, 1)), 2)
    >>> causal_mean_backward(np.ones_like(y), None, s)["x"][0, :, 0]
    array([1. , 1. , 0.5])
    """
    K, seq_len = saved
    batch, _, C = dy.shape
    dx_pad = np.zeros((batch, K - 1 + seq_len, C), dtype=dy.dtype)
    for k in range(K):
        dx_pad[:, k:k + seq_len] += dy / K
    if d_new_buffer is not None:
        dx_pad[:, seq_len:] += d_new_buffer
    return {"x": dx_pad[:, K - 1:], "buffer": dx_pad[:, :K - 1]}


def causal_mean_step(frame: np.ndarray, buffer: np.ndarray, window: int):
    """One frame of :func:`causal_mean_forward`.

    Parameters
    ----------
    frame : ndarray ``[batch, C]``
    buffer : ndarray ``[batch, K-1, C]``
        The previous ``K - 1`` frames, oldest first.
    window : int

    Returns
    -------
    y : ndarray ``[batch, C]``
    new_buffer : ndarray ``[batch, K-1, C]``

    Examples
    --------
    >>> y, buf = causal_mean_step(np.array([[6.0]]), np.array([[[0.0], [3.0]]]), 3)
    >>> float(y[0, 0]), buf[0, :, 0]
    (3.0, array([3., 6.]))
    """
    _check(frame[:, None, :], window, buffer)
    K = int(window)
    win = np.concatenate([buffer, frame[:, None, :]], axis=1)        # [batch, K, C]
    total = win[:, 0].copy()
    for k in range(1, K):                                            # same order as the forward
        total += win[:, k]
    return total / K, win[:, 1:].copy()
