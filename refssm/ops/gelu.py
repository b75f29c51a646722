"""GELU (Hendrycks & Gimpel 2016, "Gaussian Error Linear Units"), exact (erf) form.

``gelu(x) = x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))``, ``Phi`` the
standard normal CDF. This is ``Axon.Activations.gelu`` (Edifice's FFN, the
State Space Transformer's feed-forward) and ``torch.nn.functional.gelu`` with
``approximate="none"``; not the tanh approximation.

``Phi`` is computed as ``erfc(-x / sqrt 2) / 2``: the same function, without
the cancellation of ``1 + erf`` for negative ``x`` (elementwise relative error
~1e-16 everywhere; Axon and torch write ``1 + erf``, which differs from this
by round-off of the order of ``1e-16 * |x|``, absolute).

Shapes: elementwise, ``[...]`` -> ``[...]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy.special import erfc

__all__ = ["GeluSaved", "gelu_forward", "gelu_backward"]

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class GeluSaved(NamedTuple):
    """Saved by :func:`gelu_forward`: its input ``x [...]``."""

    x: np.ndarray


def gelu_forward(x: np.ndarray) -> tuple[np.ndarray, GeluSaved]:
    """``gelu(x) = 0.5 x (1 + erf(x / sqrt 2))``, ``[...]`` -> ``[...]``.

    Examples
    --------
    >>> y, _ = gelu_forward(np.array([-1.0, 0.0, 1.0]))
    >>> np.round(y, 6)
    array([-0.158655,  0.      ,  0.841345])
    """
    return 0.5 * x * erfc(-x * _INV_SQRT2), GeluSaved(x)


def gelu_backward(dy: np.ndarray, saved: GeluSaved) -> dict:
    """``d gelu / dx = Phi(x) + x phi(x)``, ``phi(x) = exp(-x^2/2) / sqrt(2 pi)``.

    Returns
    -------
    dict
        ``x [...]``.

    Examples
    --------
    >>> _, s = gelu_forward(np.array([0.0]))
    >>> gelu_backward(np.array([2.0]), s)["x"]          # Phi(0) = 1/2
    array([1.])
    """
    x = saved.x
    cdf = 0.5 * erfc(-x * _INV_SQRT2)
    pdf = np.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return {"x": dy * (cdf + x * pdf)}
