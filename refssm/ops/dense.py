"""Dense (fully connected) layer, Axon layout: ``y = x @ kernel + bias``.

``kernel`` is ``[in, out]`` (Axon / Keras layout; torch's ``nn.Linear.weight``
is its transpose ``[out, in]``), ``bias`` is ``[out]`` or absent. The leading
axes of ``x`` are any (``[batch, in]``, ``[batch, seq_len, in]``, ...).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

__all__ = ["DenseSaved", "dense_forward", "dense_backward"]


class DenseSaved(NamedTuple):
    """What :func:`dense_forward` keeps for the backward.

    Attributes
    ----------
    x : ndarray ``[..., in]``
        The input (needed for ``d kernel``).
    kernel : ndarray ``[in, out]``
        Needed for ``d x``.
    has_bias : bool
    """

    x: np.ndarray
    kernel: np.ndarray
    has_bias: bool


def dense_forward(x: np.ndarray, kernel: np.ndarray,
                  bias: Optional[np.ndarray] = None) -> tuple[np.ndarray, DenseSaved]:
    """``y = x @ kernel + bias``.

    Parameters
    ----------
    x : ndarray ``[..., in]``
    kernel : ndarray ``[in, out]``
    bias : ndarray ``[out]``, optional

    Returns
    -------
    y : ndarray ``[..., out]``
    saved : DenseSaved

    Examples
    --------
    >>> x = np.array([[1.0, 2.0]]); kernel = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    >>> y, _ = dense_forward(x, kernel, np.array([0.5, 0.5, 0.5]))
    >>> y
    array([[1.5, 2.5, 3.5]])
    """
    if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"dense: expected x [..., {kernel.shape[0] if kernel.ndim == 2 else 'in'}] "
                         f"and kernel [in, out], got x {x.shape} and kernel {kernel.shape}")
    y = x @ kernel
    if bias is not None:
        if bias.shape != (kernel.shape[1],):
            raise ValueError(f"dense: expected bias shape ({kernel.shape[1]},) [out], got {bias.shape}")
        y = y + bias
    return y, DenseSaved(x, kernel, bias is not None)


def dense_backward(dy: np.ndarray, saved: DenseSaved) -> dict:
    """Backward of :func:`dense_forward`.

    ``dx = dy @ kernel^T``, ``d kernel = sum over rows of x^T dy``,
    ``d bias = sum over rows of dy``.

    Parameters
    ----------
    dy : ndarray ``[..., out]``
    saved : DenseSaved

    Returns
    -------
    dict
        ``x [..., in]``, ``kernel [in, out]``, ``bias [out]`` (None without bias).

    Examples
    --------
    >>> x = np.ones((2, 3)); kernel = np.ones((3, 4))
    >>> _, saved = dense_forward(x, kernel)
    >>> g = dense_backward(np.ones((2, 4)), saved)
    >>> g["x"].shape, g["kernel"].shape, g["bias"]
    ((2, 3), (3, 4), None)
    """
    x, kernel, has_bias = saved
    dx = dy @ kernel.T
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    dkernel = x2.T @ dy2
    dbias = dy2.sum(axis=0) if has_bias else None
    return {"x": dx, "kernel": dkernel, "bias": dbias}
