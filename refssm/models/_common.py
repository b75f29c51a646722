"""Helpers shared by the architectures: initialisers, the parameter tree.

Parameter trees are ``params[layer][name] -> ndarray`` (DESIGN.md section 2).
Two families of initialisers reproduce the two conventions' *distributions*
(not their random streams, which belong to torch and Nx):

* ``torch_*``: PyTorch's defaults, as the official Mamba module gets them:
  ``nn.Linear`` and ``nn.Conv1d`` draw ``kaiming_uniform_(a=sqrt(5))``, i.e.
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the weight and the bias alike.
* ``glorot_uniform``: Axon's default kernel initialiser
  (``Axon.Initializers.glorot_uniform``: variance scaling, ``fan_avg``,
  uniform), with Axon's fans: for a kernel of rank >= 3 the last two axes are
  ``in`` and ``out`` and the rest is the receptive field. Axon's biases start
  at zero.
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .._validate import as_float_array

__all__ = ["glorot_uniform", "torch_uniform", "count_params", "check_params", "tree_shapes"]


def glorot_uniform(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Axon's Glorot (Xavier) uniform: ``U(-l, l)``, ``l = sqrt(3 / max((fan_in + fan_out)/2, 1))``.

    Fans as ``Axon.Initializers`` computes them: ``[in, out]`` for a dense
    kernel; for rank >= 3, ``in = shape[-2]``, ``out = shape[-1]``, both
    multiplied by the receptive field (the product of the other axes). A
    depthwise conv kernel ``[K, 1, C]`` has ``fan_in = K``, ``fan_out = K C``.

    Examples
    --------
    >>> w = glorot_uniform(np.random.default_rng(0), (4, 1, 6))
    >>> bool(np.all(np.abs(w) <= np.sqrt(6.0 / (4 * (1 + 6)))))
    True
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        fan_in = fan_out = shape[0]
    else:
        fin, fout = shape[-2], shape[-1]
        receptive = math.prod(shape) // (fin * fout) if fin * fout else 0
        fan_in, fan_out = fin * receptive, fout * receptive
    limit = math.sqrt(3.0 / max((fan_in + fan_out) / 2.0, 1.0))
    return rng.uniform(-limit, limit, shape)


def torch_uniform(rng: np.random.Generator, shape: tuple, fan_in: int) -> np.ndarray:
    """PyTorch's default ``nn.Linear`` / ``nn.Conv1d`` draw: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.

    (``kaiming_uniform_(a=sqrt(5))`` for weights, the same bound for biases.)

    Examples
    --------
    >>> w = torch_uniform(np.random.default_rng(0), (3, 4), fan_in=9)
    >>> bool(np.all(np.abs(w) <= 1 / 3))
    True
    """
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, tuple(shape))


def count_params(params: Mapping) -> int:
    """Number of scalars in a parameter tree ``params[layer][name]``.

    Examples
    --------
    >>> count_params({"a": {"kernel": np.zeros((2, 3)), "bias": np.zeros(3)}})
    9
    """
    return int(sum(np.asarray(a).size for layer in params.values() for a in layer.values()))


def tree_shapes(params: Mapping) -> dict:
    """``{layer: {name: shape}}`` of a parameter tree.

    Examples
    --------
    >>> tree_shapes({"a": {"bias": np.zeros(3)}})
    {'a': {'bias': (3,)}}
    """
    return {layer: {name: tuple(np.shape(a)) for name, a in p.items()} for layer, p in params.items()}


def check_params(params, expected: Mapping, what: str = "params") -> dict:
    """Check a tree against ``expected[layer][name] -> shape``; return it as float arrays.

    Raises
    ------
    ValueError
        A layer or parameter missing or unexpected, a wrong shape, a
        non-float array or NaN/inf; the message names expected and actual.

    Examples
    --------
    >>> check_params({"a": {"bias": np.zeros(2)}}, {"a": {"bias": (3,)}})
    Traceback (most recent call last):
    ...
    ValueError: params['a']['bias']: expected shape (3,), got (2,)
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"{what}: expected a dict of layers, got {type(params).__name__}")
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(f"{what}: layers do not match the config: missing {missing}, "
                         f"unexpected {extra} (expected {sorted(expected)})")
    out = {}
    for layer, names in expected.items():
        p = params[layer]
        if not isinstance(p, Mapping):
            raise ValueError(f"{what}[{layer!r}]: expected a dict of arrays, got {type(p).__name__}")
        if set(p) != set(names):
            raise ValueError(f"{what}[{layer!r}]: expected parameters {sorted(names)}, "
                             f"got {sorted(p)}")
        out[layer] = {}
        for name, shape in names.items():
            a = as_float_array(p[name], f"{what}[{layer!r}][{name!r}]")
            if a.shape != tuple(shape):
                raise ValueError(f"{what}[{layer!r}][{name!r}]: expected shape {tuple(shape)}, "
                                 f"got {a.shape}")
            out[layer][name] = a
    return out


# ---------------------------------------------------------------------------
# Config validation, shared by the four architectures' configs
# ---------------------------------------------------------------------------

def _positive_int(value, name, minimum=1):
    """``value`` as an int ``>= minimum`` (bools refused), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _choice(value, name, choices):
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _bool(value, name):
    """``value`` as a bool (only True/False accepted)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _float(value, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """``value`` as a finite float in ``[lo, hi]`` (ends open on request; None = no bound)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    bad = not math.isfinite(v)
    bad |= lo is not None and (v <= lo if lo_open else v < lo)
    bad |= hi is not None and (v >= hi if hi_open else v > hi)
    if bad:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a finite number in {rng}, got {value!r}")
    return v


def _rng(rng):
    """A numpy Generator: ``rng`` itself, or one seeded with it."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
