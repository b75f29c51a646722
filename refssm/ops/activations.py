"""Elementwise activations: sigmoid, SiLU (swish) and softplus, with backwards.

* ``silu(x) = x * sigmoid(x)`` -- Mamba's gate and post-conv activation.
* ``softplus(x) = log(1 + exp(x))`` -- Mamba's step size ``delta``; computed
  as ``logaddexp(0, x)``, exact for every ``x`` (no threshold: torch's
  ``F.softplus`` returns ``x`` itself above 20, a relative difference below
  ``1e-9``).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["sigmoid", "ActivationSaved", "silu_forward", "silu_backward",
           "softplus_forward", "softplus_backward", "inverse_softplus"]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function ``1 / (1 + exp(-x))``, without overflow for large ``|x|``.

    Examples
    --------
    >>> float(sigmoid(np.array(0.0)))
    0.5
    """
    return np.exp(-np.logaddexp(0.0, -x))


class ActivationSaved(NamedTuple):
    """Saved by an elementwise activation: its input ``x [...]``."""

    x: np.ndarray


def silu_forward(x: np.ndarray) -> tuple[np.ndarray, ActivationSaved]:
    """SiLU ``x * sigmoid(x)`` (Elfwing et al. 2018; "swish"), ``[...]`` -> ``[...]``.

    Examples
    --------
    >>> y, _ = silu_forward(np.array([0.0, 1.0]))
    >>> np.round(y, 6)
    array([0.      , 0.731059])
    """
    return x * sigmoid(x), ActivationSaved(x)


def silu_backward(dy: np.ndarray, saved: ActivationSaved) -> dict:
    """``d silu / dx = s * (1 + x * (1 - s))`` with ``s = sigmoid(x)``.

    Returns
    -------
    dict
        ``x [...]``.

    Examples
    --------
    >>> _, s = silu_forward(np.array([0.0]))
    >>> silu_backward(np.array([1.0]), s)["x"]
    array([0.5])
    """
    x = saved.x
    s = sigmoid(x)
    return {"x": dy * s * (1.0 + x * (1.0 - s))}


def softplus_forward(x: np.ndarray) -> tuple[np.ndarray, ActivationSaved]:
    """Softplus ``log(1 + exp(x))``, ``[...]`` -> ``[...]``.

    Examples
    --------
    >>> y, _ = softplus_forward(np.array([0.0, 800.0]))      # no overflow
    >>> float(y[0]), float(y[1])
    (0.6931471805599453, 800.0)
    """
    return np.logaddexp(0.0, x), ActivationSaved(x)


def softplus_backward(dy: np.ndarray, saved: ActivationSaved) -> dict:
    """``d softplus / dx = sigmoid(x)``.

    Returns
    -------
    dict
        ``x [...]``.

    Examples
    --------
    >>> _, s = softplus_forward(np.array([0.0]))
    >>> softplus_backward(np.array([2.0]), s)["x"]
    array([1.])
    """
    return {"x": dy * sigmoid(saved.x)}


def inverse_softplus(y: np.ndarray) -> np.ndarray:
    """``x`` with ``softplus(x) = y`` for ``y > 0``: ``y + log(-expm1(-y))``.

    The form of the official Mamba initialisation of ``dt_proj.bias``
    (``mamba_simple.py``; pytorch/pytorch#72759), accurate for small ``y``.

    Examples
    --------
    >>> y = np.array([1e-3, 0.1, 5.0])
    >>> bool(np.allclose(softplus_forward(inverse_softplus(y))[0], y, rtol=1e-14, atol=0))
    True
    """
    y = np.asarray(y, dtype=np.float64)
    if np.any(y <= 0):
        raise ValueError(f"inverse_softplus: expected values > 0, got min {y.min()!r}")
    return y + np.log(-np.expm1(-y))
