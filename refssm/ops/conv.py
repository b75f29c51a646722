"""Causal depthwise 1-D convolution (Mamba's short convolution).

Every channel ``c`` has its own ``K``-tap filter; the input is left-padded by
``K - 1`` frames so that output ``t`` sees inputs ``t - K + 1 .. t`` only::

    x_pad = [buffer ; x]                                 # [batch, K-1+L, C]
    y[t, c] = sum_k kernel[k, 0, c] * x_pad[t + k, c] + bias[c]

``buffer`` holds the ``K - 1`` frames before ``x`` (zeros at the start of a
sequence: the causal zero padding), so a long sequence can be processed in
chunks or one frame at a time (:func:`causal_depthwise_conv1d_step`) with the
same numbers. This is a cross-correlation (no kernel flip), as
``torch.nn.Conv1d(groups=C, padding=K-1)`` truncated to the first ``L``
outputs (official Mamba) and ``Axon.conv(feature_group_size: C, padding:
[{K-1, 0}])`` (Edifice): ``kernel[K-1]`` multiplies the current frame.

Layouts: ``kernel [K, 1, C]`` (Axon's depthwise layout; torch stores the same
numbers as ``weight [C, 1, K]``), ``bias [C]``, ``x [batch, seq_len, C]``,
``buffer [batch, K-1, C]`` (oldest frame first).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

__all__ = ["ConvSaved", "causal_depthwise_conv1d_forward", "causal_depthwise_conv1d_backward",
           "causal_depthwise_conv1d_step"]


class ConvSaved(NamedTuple):
    """Saved by :func:`causal_depthwise_conv1d_forward`.

    Attributes
    ----------
    x_pad : ndarray ``[batch, K-1+seq_len, C]``
        Buffer and input, concatenated in time (for ``d kernel``).
    kernel : ndarray ``[K, 1, C]``
        For ``d x``.
    has_bias : bool
    """

    x_pad: np.ndarray
    kernel: np.ndarray
    has_bias: bool


def _check(x, kernel, bias, buffer):
    if kernel.ndim != 3 or kernel.shape[1] != 1:
        raise ValueError(f"conv1d: expected kernel [conv_size, 1, channels], got shape {kernel.shape}")
    K, _, C = kernel.shape
    if x.shape[-1] != C:
        raise ValueError(f"conv1d: expected input channels {C} (kernel {kernel.shape}), "
                         f"got input shape {x.shape}")
    if bias is not None and bias.shape != (C,):
        raise ValueError(f"conv1d: expected bias shape ({C},) [channels], got {bias.shape}")
    if buffer is not None and buffer.shape != (x.shape[0], K - 1, C):
        raise ValueError(f"conv1d: expected buffer shape {(x.shape[0], K - 1, C)} "
                         f"[batch, conv_size-1, channels], got {buffer.shape}")


def causal_depthwise_conv1d_forward(x: np.ndarray, kernel: np.ndarray,
                                    bias: Optional[np.ndarray] = None,
                                    buffer: Optional[np.ndarray] = None):
    """Causal depthwise convolution of a whole sequence (or a chunk of one).

    Parameters
    ----------
    x : ndarray ``[batch, seq_len, C]``
    kernel : ndarray ``[K, 1, C]``
    bias : ndarray ``[C]``, optional
    buffer : ndarray ``[batch, K-1, C]``, optional
        The ``K - 1`` frames before ``x`` (zeros if omitted: a fresh sequence).

    Returns
    -------
    y : ndarray ``[batch, seq_len, C]``
    new_buffer : ndarray ``[batch, K-1, C]``
        The last ``K - 1`` frames of ``[buffer ; x]``, to continue the sequence.
    saved : ConvSaved

    Examples
    --------
    >>> x = np.arange(1.0, 5.0).reshape(1, 4, 1)            # 1, 2, 3, 4
    >>> kernel = np.array([1.0, 10.0]).reshape(2, 1, 1)     # K = 2: y[t] = x[t-1] + 10 x[t]
    >>> y, buf, _ = causal_depthwise_conv1d_forward(x, kernel)
    >>> y[0, :, 0], buf[0, :, 0]
    (array([10., 21., 32., 43.]), array([4.]))
    """
    _check(x, kernel, bias, buffer)
    batch, seq_len, C = x.shape
    K = kernel.shape[0]
    if buffer is None:
        buffer = np.zeros((batch, K - 1, C), dtype=np.result_type(x, kernel))
    x_pad = np.concatenate([buffer, x], axis=1)                     # [batch, K-1+L, C]
    w = kernel[:, 0, :]                                             # [K, C]
    y = np.zeros((batch, seq_len, C), dtype=np.result_type(x_pad, w))
    for k in range(K):                                              # tap k sees x[t - (K-1) + k]
        y += w[k] * x_pad[:, k:k + seq_len]
    if bias is not None:
        y += bias
    new_buffer = x_pad[:, seq_len:].copy()                          # last K-1 frames
    return y, new_buffer, ConvSaved(x_pad, kernel, bias is not None)


def causal_depthwise_conv1d_backward(dy: np.ndarray, d_new_buffer: Optional[np.ndarray],
                                     saved: ConvSaved) -> dict:
    """Backward of :func:`causal_depthwise_conv1d_forward`.

    ``d x_pad[t + k] += kernel[k] * dy[t]``; ``d kernel[k] = sum_{b,t} dy[t] * x_pad[t + k]``;
    ``d bias = sum_{b,t} dy``; the gradient of ``new_buffer`` (the last ``K-1``
    frames of ``x_pad``) is added to those frames.

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, C]``
    d_new_buffer : ndarray ``[batch, K-1, C]`` or None
    saved : ConvSaved

    Returns
    -------
    dict
        ``x [batch, seq_len, C]``, ``kernel [K, 1, C]``, ``bias [C]`` (None
        without bias), ``buffer [batch, K-1, C]``.

    Examples
    --------
    >>> x = np.ones((1, 3, 2)); kernel = np.ones((2, 1, 2))
    >>> y, buf, s = causal_depthwise_conv1d_forward(x, kernel, np.zeros(2))
    >>> g = causal_depthwise_conv1d_backward(np.ones_like(y), None, s)
    >>> g["x"][0, :, 0], g["kernel"][:, 0, 0]
    (array([2., 2., 1.]), array([2., 3.]))
    """
    x_pad, kernel, has_bias = saved
    K = kernel.shape[0]
    seq_len = dy.shape[1]
    w = kernel[:, 0, :]
    dx_pad = np.zeros_like(x_pad)
    dw = np.zeros_like(w)
    for k in range(K):
        dx_pad[:, k:k + seq_len] += w[k] * dy
        dw[k] = np.sum(dy * x_pad[:, k:k + seq_len], axis=(0, 1))
    if d_new_buffer is not None:
        dx_pad[:, seq_len:] += d_new_buffer
    return {"x": dx_pad[:, K - 1:], "kernel": dw[:, None, :],
            "bias": dy.sum(axis=(0, 1)) if has_bias else None, "buffer": dx_pad[:, :K - 1]}


def causal_depthwise_conv1d_step(frame: np.ndarray, buffer: np.ndarray, kernel: np.ndarray,
                                 bias: Optional[np.ndarray] = None):
    """One frame of the causal depthwise convolution: O(1) in the sequence length.

    Same taps in the same order as :func:`causal_depthwise_conv1d_forward`, so
    stepping frame by frame gives the full forward's numbers.

    Parameters
    ----------
    frame : ndarray ``[batch, C]``
    buffer : ndarray ``[batch, K-1, C]``
        The previous ``K - 1`` frames, oldest first.
    kernel : ndarray ``[K, 1, C]``
    bias : ndarray ``[C]``, optional

    Returns
    -------
    y : ndarray ``[batch, C]``
    new_buffer : ndarray ``[batch, K-1, C]``
        The buffer slid by one: oldest frame dropped, ``frame`` appended.

    Examples
    --------
    >>> kernel = np.array([1.0, 10.0]).reshape(2, 1, 1)
    >>> y, buf = causal_depthwise_conv1d_step(np.array([[2.0]]), np.array([[[1.0]]]), kernel)
    >>> float(y[0, 0]), float(buf[0, 0, 0])
    (21.0, 2.0)
    """
    _check(frame[:, None, :], kernel, bias, buffer)
    window = np.concatenate([buffer, frame[:, None, :]], axis=1)    # [batch, K, C]
    w = kernel[:, 0, :]
    y = np.zeros(frame.shape, dtype=np.result_type(window, w))
    for k in range(kernel.shape[0]):
        y += w[k] * window[:, k]
    if bias is not None:
        y += bias
    return y, window[:, 1:].copy()
