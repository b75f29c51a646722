"""Inverted dropout (Srivastava et al. 2014), as ``Axon.dropout``.

At training time every element is kept with probability ``1 - rate`` and the
kept ones are scaled by ``1 / (1 - rate)``, so the expectation is unchanged;
outside training it is the identity. The mask comes from an explicit
``numpy.random.Generator`` (or seed), so a run is reproducible.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

__all__ = ["DropoutSaved", "dropout_forward", "dropout_backward"]


class DropoutSaved(NamedTuple):
    """Saved by :func:`dropout_forward`.

    Attributes
    ----------
    scale : ndarray ``[...]`` or None
        ``mask / (1 - rate)`` (0 where dropped); None when nothing was dropped
        (not training, or ``rate == 0``).
    """

    scale: Optional[np.ndarray]


def dropout_forward(x: np.ndarray, rate: float, *, training: bool = False,
                    rng=None) -> tuple[np.ndarray, DropoutSaved]:
    """Inverted dropout, ``[...]`` -> ``[...]``.

    Parameters
    ----------
    x : ndarray ``[...]``
    rate : float
        Probability of dropping an element, ``0 <= rate < 1``.
    training : bool
        Only then is anything dropped.
    rng : numpy.random.Generator or int
        Source of the mask (required when ``training`` and ``rate > 0``).

    Returns
    -------
    y : ndarray ``[...]``
    saved : DropoutSaved

    Examples
    --------
    >>> y, _ = dropout_forward(np.ones(4), 0.5)                  # not training: identity
    >>> y
    array([1., 1., 1., 1.])
    >>> y, _ = dropout_forward(np.ones(6), 0.5, training=True, rng=0)
    >>> set(y.tolist()) <= {0.0, 2.0}                            # dropped, or kept and scaled
    True
    """
    rate = float(rate)
    if not (0.0 <= rate < 1.0):
        raise ValueError(f"dropout: expected 0 <= rate < 1, got {rate!r}")
    if not training or rate == 0.0:
        return x, DropoutSaved(None)
    if rng is None:
        raise ValueError("dropout: training with rate > 0 needs rng (a numpy Generator or an int "
                         "seed), got None")
    rng = np.random.default_rng(rng)
    keep = 1.0 - rate
    scale = (rng.random(x.shape) < keep) / keep
    return x * scale, DropoutSaved(scale)


def dropout_backward(dy: np.ndarray, saved: DropoutSaved) -> dict:
    """Backward of :func:`dropout_forward`: ``dx = dy * mask / (1 - rate)``.

    Returns
    -------
    dict
        ``x [...]``.

    Examples
    --------
    >>> _, s = dropout_forward(np.ones(3), 0.5)
    >>> dropout_backward(np.ones(3), s)["x"]
    array([1., 1., 1.])
    """
    return {"x": dy if saved.scale is None else dy * saved.scale}
