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
from ..ops.dense import DenseSaved, dense_backward, dense_forward

__all__ = ["glorot_uniform", "torch_uniform", "count_params", "check_params", "tree_shapes",
           "dense_layer_forward", "dense_layer_backward", "grad_tree", "output_gradient",
           "state_gradients"]


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


# --- manual backward: shared by the four models' forward_with_saved/backward ------
#
# Every ``*_backward`` of a model takes the gradient of its forward's outputs and
# the forward's saved values and returns the gradient of its inputs and a
# *fragment* ``{layer: {name: grad}}`` of the parameter-gradient tree; the
# model's ``backward`` merges them (:func:`_merge_grads`) and orders them as the
# parameter tree (:func:`grad_tree`).

def _merge_grads(tree: dict, fragment: dict) -> dict:
    """Add a gradient fragment ``{layer: {name: grad}}`` to ``tree`` (each entry exactly once)."""
    for layer, grads in fragment.items():
        dst = tree.setdefault(layer, {})
        for name, g in grads.items():
            if name in dst:      # every parameter is used once per forward: a repeat is a bug here
                raise AssertionError(f"gradient of {layer}.{name} produced twice")
            dst[name] = g
    return tree


def dense_layer_forward(params: dict, x: np.ndarray, name: str):
    """``y = x @ kernel + bias`` of layer ``name`` (``input_projection``, ``*_out_proj``).

    Parameters
    ----------
    params : dict
        The model's tree; reads ``params[name]`` (``kernel [in, out]``, ``bias [out]`` if any).
    x : ndarray ``[..., in]``
    name : str

    Returns
    -------
    y : ndarray ``[..., out]``
    saved : DenseSaved

    Examples
    --------
    >>> p = {"lin": {"kernel": np.eye(2), "bias": np.ones(2)}}
    >>> y, s = dense_layer_forward(p, np.array([[1.0, 2.0]]), "lin")
    >>> y
    array([[2., 3.]])
    >>> dx, frag = dense_layer_backward(np.ones((1, 2)), s, "lin")
    >>> dx, frag["lin"]["kernel"], frag["lin"]["bias"]
    (array([[1., 1.]]), array([[1., 1.],
           [2., 2.]]), array([1., 1.]))
    """
    p = params[name]
    return dense_forward(x, p["kernel"], p.get("bias"))


def dense_layer_backward(dy: np.ndarray, saved: DenseSaved, name: str):
    """Backward of :func:`dense_layer_forward`.

    ``dx = dy kernel^T``, ``d kernel = x^T dy``, ``d bias = sum dy`` (over the leading axes).

    Parameters
    ----------
    dy : ndarray ``[..., out]``
    saved : DenseSaved
    name : str

    Returns
    -------
    dx : ndarray ``[..., in]``
    fragment : dict
        ``{name: {"kernel": [in, out], "bias": [out]}}`` (no ``bias`` if the layer has none).

    Examples
    --------
    See :func:`dense_layer_forward`.
    """
    g = dense_backward(dy, saved)
    grads = {"kernel": g["kernel"]}
    if g["bias"] is not None:
        grads["bias"] = g["bias"]
    return g["x"], {name: grads}


def grad_tree(dparams: dict, shapes: Mapping) -> dict:
    """The merged gradient fragments as a tree with exactly the layers, names and order of ``shapes``.

    Examples
    --------
    >>> grad_tree({"b": {"w": 1}, "a": {"w": 2}}, {"a": {"w": ()}, "b": {"w": ()}})
    {'a': {'w': 2}, 'b': {'w': 1}}
    """
    extra = {(layer, name) for layer, g in dparams.items() for name in g} - \
            {(layer, name) for layer, names in shapes.items() for name in names}
    if extra:                                                             # internal consistency
        raise AssertionError(f"gradients for parameters not in the tree: {sorted(extra)}")
    missing = [(layer, name) for layer, names in shapes.items() for name in names
               if name not in dparams.get(layer, {})]
    if missing:
        raise AssertionError(f"no gradient computed for parameters {missing}")
    return {layer: {name: dparams[layer][name] for name in names}
            for layer, names in shapes.items()}


def output_gradient(d_out, saved, saved_type) -> np.ndarray:
    """The start of every model's ``backward``: ``dLoss/d output`` as ``dx [batch, seq_len, hidden]``.

    Checks that ``saved`` is the ``saved_type`` of ``forward_with_saved`` and
    that ``d_out`` has the shape of the forward's output (``[batch, hidden]``
    for the last timestep, ``[batch, seq_len, hidden]`` with
    ``return_sequence``), finite; returns it in float64 over the whole
    sequence (zero except at the last timestep for a last-timestep output).

    Examples
    --------
    >>> from collections import namedtuple
    >>> S = namedtuple("S", "config batch seq_len return_sequence")
    >>> cfg = namedtuple("C", "hidden_size")(2)
    >>> output_gradient(np.ones((1, 2)), S(cfg, 1, 3, False), S)[0]
    array([[0., 0.],
           [0., 0.],
           [1., 1.]])
    """
    if not isinstance(saved, saved_type):
        raise ValueError(f"saved: expected the {saved_type.__name__} of forward_with_saved, got "
                         f"{type(saved).__name__}")
    batch, seq_len, H = saved.batch, saved.seq_len, saved.config.hidden_size
    want = (batch, seq_len, H) if saved.return_sequence else (batch, H)
    d_out = as_float_array(d_out, "d_out", ndim=len(want))
    if d_out.shape != want:
        axes = "[batch, seq_len, hidden]" if saved.return_sequence else "[batch, hidden]"
        raise ValueError(f"d_out: expected shape {want} (as the forward's output, {axes}), "
                         f"got {d_out.shape}")
    if saved.return_sequence:
        return np.array(d_out, dtype=np.float64)
    dx = np.zeros((batch, seq_len, H))
    dx[:, -1] = d_out
    return dx


def state_gradients(d_state, cache: str, fields, *, allow_complex: bool = False) -> tuple:
    """Check ``d_state``, the gradients of a model's returned cache, field by field.

    Parameters
    ----------
    d_state : tuple or None
        The cache-shaped tuple of gradients; any field may be None (zero).
    cache : str
        How to name the expected tuple, e.g. ``"a MambaCache (h, conv)"``.
    fields : sequence of (name, shape, axes)
        Per field its name, expected shape and axes (for the message).
    allow_complex : bool
        Accept complex gradients (S5's complex state).

    Returns
    -------
    tuple
        One array or None per field (all None when ``d_state`` is None).

    Examples
    --------
    >>> state_gradients((np.ones((2, 3)), None), "a C (h, conv)",
    ...                 [("h", (2, 3), "[b, n]"), ("conv", (2, 1), "[b, k]")])[1] is None
    True
    """
    if d_state is None:
        return (None,) * len(fields)
    if not (isinstance(d_state, tuple) and len(d_state) == len(fields)):
        raise ValueError(f"d_state: expected {cache} of gradients (any may be None), got "
                         f"{type(d_state).__name__}")
    out = []
    for value, (name, want, axes) in zip(d_state, fields):
        if value is not None:
            value = as_float_array(value, f"d_state.{name}", ndim=len(want),
                                   allow_complex=allow_complex)
            if value.shape != want:
                raise ValueError(f"d_state.{name}: expected shape {want} {axes} (as the returned "
                                 f"state), got {value.shape}")
        out.append(value)
    return tuple(out)
