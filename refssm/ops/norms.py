"""Normalisation over the last axis: LayerNorm and RMSNorm.

* LayerNorm (Ba, Kiros & Hinton 2016), as ``Axon.layer_norm`` (Edifice's
  blocks): ``y = (x - mean) / sqrt(var + eps) * gamma + beta`` with the biased
  variance ``mean((x - mean)^2)``, ``eps = 1e-5``.
* RMSNorm (Zhang & Sennrich 2019), as the official Mamba model
  (``mamba_ssm/ops/triton/layer_norm.py``, ``rms_norm_ref``) and transformers'
  ``MambaRMSNorm``: ``y = x / sqrt(mean(x^2) + eps) * gamma``, ``eps = 1e-5``.

Shapes: ``x [..., features]``, ``gamma``/``beta`` ``[features]``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["LayerNormSaved", "RMSNormSaved", "layer_norm_forward", "layer_norm_backward",
           "rms_norm_forward", "rms_norm_backward"]


class LayerNormSaved(NamedTuple):
    """Saved by :func:`layer_norm_forward`.

    Attributes
    ----------
    x_hat : ndarray ``[..., features]``
        The normalised input ``(x - mean) * rstd``.
    rstd : ndarray ``[..., 1]``
        ``1 / sqrt(var + eps)``.
    gamma : ndarray ``[features]``
    """

    x_hat: np.ndarray
    rstd: np.ndarray
    gamma: np.ndarray


class RMSNormSaved(NamedTuple):
    """Saved by :func:`rms_norm_forward`.

    Attributes
    ----------
    x_hat : ndarray ``[..., features]``
        ``x * rstd``.
    rstd : ndarray ``[..., 1]``
        ``1 / sqrt(mean(x^2) + eps)``.
    gamma : ndarray ``[features]``
    """

    x_hat: np.ndarray
    rstd: np.ndarray
    gamma: np.ndarray


def _check(x, gamma, name):
    if gamma.shape != (x.shape[-1],):
        raise ValueError(f"{name}: expected gamma shape ({x.shape[-1]},) [features], "
                         f"got {gamma.shape} for x {x.shape}")


def _check_moment(m, x, name, what):
    """Refuse a non-finite second moment ``m`` ``[..., 1]``: ``x * x`` overflowed.

    A finite row whose entries exceed ~1.3e154 (float64; ~1.8e19 in float32), or
    whose squares add up past the largest float, makes ``mean(x^2)`` infinite,
    ``rstd = 0``, and the norm would silently return ``beta`` (LayerNorm) or 0
    (RMSNorm) whatever ``x`` is.
    """
    if not np.all(np.isfinite(m)):
        finite = np.isfinite(x)
        got = ("non-finite entries (NaN/inf)" if not finite.all() else
               f"max |x| = {np.max(np.abs(x)):.3g}: the squares or their sum overflow "
               f"{x.dtype}")
        raise ValueError(f"{name}: expected rows whose {what} is finite, got {got}; "
                         f"no exact normalisation can be returned")


def layer_norm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
                       eps: float = 1e-5) -> tuple[np.ndarray, LayerNormSaved]:
    """LayerNorm over the last axis.

    Parameters
    ----------
    x : ndarray ``[..., features]``
    gamma, beta : ndarray ``[features]``
    eps : float

    Returns
    -------
    y : ndarray ``[..., features]``
    saved : LayerNormSaved

    Examples
    --------
    >>> y, _ = layer_norm_forward(np.array([[1.0, 3.0]]), np.ones(2), np.zeros(2), eps=0.0)
    >>> y
    array([[-1.,  1.]])
    """
    _check(x, gamma, "layer_norm")
    if beta.shape != gamma.shape:
        raise ValueError(f"layer_norm: expected beta shape {gamma.shape}, got {beta.shape}")
    mean = x.mean(axis=-1, keepdims=True)
    xc = x - mean
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    _check_moment(var, x, "layer_norm", "variance mean((x - mean)^2)")
    rstd = 1.0 / np.sqrt(var + eps)
    x_hat = xc * rstd
    return x_hat * gamma + beta, LayerNormSaved(x_hat, rstd, gamma)


def layer_norm_backward(dy: np.ndarray, saved: LayerNormSaved) -> dict:
    """Backward of :func:`layer_norm_forward`.

    With ``g = dy * gamma``: ``dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))``,
    ``d gamma = sum(dy * x_hat)``, ``d beta = sum(dy)`` over the leading axes.

    Returns
    -------
    dict
        ``x [..., features]``, ``gamma [features]``, ``beta [features]``.

    Examples
    --------
    >>> _, s = layer_norm_forward(np.array([[1.0, 3.0]]), np.ones(2), np.zeros(2))
    >>> sorted(layer_norm_backward(np.ones((1, 2)), s))
    ['beta', 'gamma', 'x']
    """
    x_hat, rstd, gamma = saved
    g = dy * gamma
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    lead = tuple(range(dy.ndim - 1))
    return {"x": dx, "gamma": np.sum(dy * x_hat, axis=lead), "beta": np.sum(dy, axis=lead)}


def rms_norm_forward(x: np.ndarray, gamma: np.ndarray,
                     eps: float = 1e-5) -> tuple[np.ndarray, RMSNormSaved]:
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + eps) * gamma``.

    Parameters
    ----------
    x : ndarray ``[..., features]``
    gamma : ndarray ``[features]``
        The scale (``norm.weight`` in the official / transformers checkpoints).
    eps : float

    Returns
    -------
    y : ndarray ``[..., features]``
    saved : RMSNormSaved

    Examples
    --------
    >>> y, _ = rms_norm_forward(np.array([[3.0, 4.0]]), np.ones(2), eps=0.0)
    >>> np.round(y, 6)     # rms = sqrt(12.5)
    array([[0.848528, 1.131371]])
    """
    _check(x, gamma, "rms_norm")
    ms = np.mean(x * x, axis=-1, keepdims=True)
    _check_moment(ms, x, "rms_norm", "mean square mean(x^2)")
    rstd = 1.0 / np.sqrt(ms + eps)
    x_hat = x * rstd
    return x_hat * gamma, RMSNormSaved(x_hat, rstd, gamma)


def rms_norm_backward(dy: np.ndarray, saved: RMSNormSaved) -> dict:
    """Backward of :func:`rms_norm_forward`.

    With ``g = dy * gamma``: ``dx = rstd * (g - x_hat * mean(g * x_hat))``,
    ``d gamma = sum(dy * x_hat)`` over the leading axes.

    Returns
    -------
    dict
        ``x [..., features]``, ``gamma [features]``.

    Examples
    --------
    >>> _, s = rms_norm_forward(np.array([[3.0, 4.0]]), np.ones(2))
    >>> sorted(rms_norm_backward(np.ones((1, 2)), s))
    ['gamma', 'x']
    """
    x_hat, rstd, gamma = saved
    g = dy * gamma
    dx = rstd * (g - x_hat * np.mean(g * x_hat, axis=-1, keepdims=True))
    lead = tuple(range(dy.ndim - 1))
    return {"x": dx, "gamma": np.sum(dy * x_hat, axis=lead)}
