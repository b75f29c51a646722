"""S5 (Smith, Warrington & Linderman 2023, "Simplified State Space Layers for
Sequence Modeling", ICLR; code: lindermanlab/S5), the whole model: config,
parameters, forward, O(1) stepping, exact parameter count.

The model, in the original API's layout (Edifice ``Edifice.SSM.S5``; DESIGN.md
sections 1 and 1.3)::

    x [batch, seq_len, embed_dim]
      -> input_projection                     dense embed_dim -> H (only if they differ)
      -> s5_block_i, i = 1 .. num_layers:
           x = x + dropout(act(SSM(LayerNorm(x))))            build_mimo_ssm  (s5_block_i_ssm_*)
           x = x + dropout(SwiGLU(LayerNorm(x)))              build_ffn       (s5_block_i_ffn_*)
      -> final_norm                           LayerNorm
      -> last timestep [batch, H]             (or the whole sequence)

    SwiGLU(u) = (silu(u W_gate + b_gate) * (u W_up + b_up)) W_down + b_down,   H -> 4H -> H

Two conventions ("presets"; each a bundle of plain flags, see :data:`PRESETS`):

``s5`` (default): the paper's S5 SSM
    :mod:`refssm.ssm.s5`: diagonal complex ``Lambda`` (HiPPO-N init),
    ``B_tilde = V^-1 B``, ``C_tilde = C V``, ``D``, one learned step per
    state, ZOH, conjugate symmetry, then GELU (the paper's "S5 layer"
    activation, ``activation="gelu"``). Parameters of the SSM in the layer
    ``s5_block_i_ssm_ssm``: ``Lambda_re, Lambda_im [Ps]``, ``B [Ps, H, 2]``,
    ``C [H, Ps, 2]`` (``C1``, ``C2`` when bidirectional), ``D [H]``,
    ``log_step [Ps]``, ``Ps = state_size / 2`` with conjugate symmetry.
``edifice``: Edifice v0.2's own S5 code (``lib/edifice/ssm/s5.ex``)
    Not the paper's SSM: ``B``, ``C`` and ``D`` are projected from the input
    (``b_proj``, ``c_proj``: ``H -> N``; ``d_proj``: ``H -> H``; all with
    bias), ``A = -(1..N)/N`` and ``dt = 0.1`` are fixed, one real state
    ``[H, N]`` per layer::

        h_t[c, n] = exp(0.1 A_n) h_{t-1}[c, n] + 0.1 b_t[n] u_t[c]
        y_t[c]    = sum_n c_t[n] h_t[c, n] + d_t[c]

    and no activation after the SSM. Computed with a stable scan
    (:func:`refssm.ssm.selective_scan.selective_scan_forward`), where Edifice
    divides by cumulative products of ``A_bar`` (``h = cumprod * cumsum(bu /
    (cumprod + 1e-10))`` with ``cumprod = exp(cumsum(log(A_bar + 1e-10)))``):
    mathematically the same recurrence, numerically not. Transcribed
    literally and run in float64 (``tests/test_s5_model.py``), Edifice's
    formula is off by 8e-10 relative at 40 steps and 5e-9 at 60 (its
    ``+1e-10`` terms), and wrong beyond ~200 steps (3e-3 at 200, 0.26 at
    300): once the cumulative product of the fastest state
    (``exp(-0.1 t)``) falls below the ``1e-10`` it is added to, the division
    no longer undoes it. This preset computes what the formula means.

``state_size`` means the paper's ``P`` for ``s5`` (``P/2`` stored complex
states with conjugate symmetry) and Edifice's ``N`` (real states per feature)
for ``edifice``.

Parameters are ``params[layer][name]`` with the original API's layer names
and Axon layouts (dense ``kernel [in, out]``, ``bias [out]``; LayerNorm
``gamma``, ``beta``); see :func:`param_shapes`. Dense layers start as Axon's
(glorot-uniform kernels, zero biases), LayerNorm as ``gamma = 1, beta = 0``.

The carried state (:class:`S5Cache`) holds one state *per layer*:
``h [batch, num_layers, Ps]`` complex (``s5``) or ``[batch, num_layers, H,
N]`` real (``edifice``; Edifice's ``init_cache`` has ``[batch, N]`` per layer,
which cannot hold its own state). :func:`forward` takes and returns it, so
chunks equal one call; :func:`step` advances it one frame with the same
numbers as the full forward (``tests/test_s5_model.py``). A bidirectional SSM
is not causal: it has no carried state and cannot be stepped.

Manual backward (llm.c-style, as :mod:`refssm.models.mamba`):
:func:`forward_with_saved` runs the same layer functions as :func:`forward`
(``*_forward_with_saved``; :func:`forward` is the same computation without the
saved values) and :func:`backward` runs their ``*_backward`` in reverse, giving
the gradients of ``x``, of every parameter (real, in the tree's layout) and of
the carried state (complex ``dL/dRe(h) + i dL/dIm(h)`` for ``s5``), for every
engine (``tests/test_s5_backward.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import numpy as np
import scipy.special

from .._validate import as_float_array
from ..ops.activations import silu_backward, silu_forward
from ..ops.dense import DenseSaved, dense_backward, dense_forward
from ..ops.dropout import DropoutSaved, dropout_backward, dropout_forward
from ..ops.norms import LayerNormSaved, layer_norm_backward, layer_norm_forward
from ..ssm import s5 as core
from ..ssm.selective_scan import (SelectiveScanSaved, selective_scan_backward,
                                  selective_scan_forward)
from ._common import (_bool, _choice, _merge_grads, _positive_int, _rng, check_params,
                      count_params, dense_layer_backward, dense_layer_forward, glorot_uniform,
                      grad_tree, output_gradient, state_gradients)

__all__ = [
    "S5Config", "PRESETS", "FLAGS", "S5Cache", "S5Output", "S5Model",
    "gelu_forward", "gelu_backward", "swiglu_forward", "swiglu_backward",
    "build", "build_s5_block", "build_mimo_ssm", "build_ffn", "random_params",
    "forward", "s5_block_forward", "mimo_ssm_forward", "ffn_forward",
    "init_cache", "step", "output_size", "param_count", "param_count_breakdown",
    "original_param_count", "original_param_count_terms", "param_shapes",
    "recommended_defaults", "as_config",
    "EDIFICE_DT",
    # manual backward (llm.c-style)
    "forward_with_saved", "backward", "S5ModelSaved", "S5Grads",
    "s5_block_forward_with_saved", "s5_block_backward", "S5BlockSaved",
    "mimo_ssm_forward_with_saved", "mimo_ssm_backward", "MimoSsmSaved",
    "ffn_forward_with_saved", "ffn_backward", "FfnSaved",
    "norm_forward", "norm_backward", "s5_core_forward", "s5_core_backward",
    "edifice_ssm_forward", "edifice_ssm_backward", "EdificeSsmSaved",
    "activation_forward", "activation_backward",
]

# ---------------------------------------------------------------------------
# Ops the model needs that refssm.ops does not have (yet): GELU, SwiGLU
# ---------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class GeluSaved(NamedTuple):
    """Saved by :func:`gelu_forward`: the input ``x [...]`` and the variant."""

    x: np.ndarray
    approximate: bool


def gelu_forward(x: np.ndarray, approximate: bool = False):
    r"""GELU (Hendrycks & Gimpel 2016), ``[...]`` -> ``[...]``.

    Exact: ``x Phi(x) = x/2 (1 + erf(x / sqrt 2))`` (Axon's ``gelu``, torch's
    default). ``approximate=True``: the tanh form
    ``x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (flax's ``nn.gelu``
    default, used by lindermanlab/S5). They differ by up to ~5e-4.

    Examples
    --------
    >>> y, _ = gelu_forward(np.array([-1.0, 0.0, 1.0]))
    >>> np.round(y, 6)
    array([-0.158655,  0.      ,  0.841345])
    >>> np.round(gelu_forward(np.array([1.0]), approximate=True)[0], 6)
    array([0.841192])
    """
    if approximate:
        y = 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3)))
    else:
        y = 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))
    return y, GeluSaved(x, bool(approximate))


def gelu_backward(dy: np.ndarray, saved: GeluSaved) -> dict:
    r"""Backward of :func:`gelu_forward`.

    Exact: ``Phi(x) + x phi(x)``. Tanh form: with ``t = tanh(s)``,
    ``s = sqrt(2/pi)(x + 0.044715 x^3)``:
    ``(1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi)(1 + 3 * 0.044715 x^2)``.

    Returns
    -------
    dict
        ``x [...]``.

    Examples
    --------
    >>> _, s = gelu_forward(np.array([0.0]))
    >>> gelu_backward(np.array([1.0]), s)["x"]
    array([0.5])
    """
    x, approximate = saved
    if approximate:
        t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)
    else:
        cdf = 0.5 * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))
        d = cdf + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return {"x": dy * d}


class SwigluSaved(NamedTuple):
    """Saved by :func:`swiglu_forward`.

    Attributes
    ----------
    gate, up, down : DenseSaved
    silu : ActivationSaved
    g, v : ndarray ``[..., inner]``
        ``silu(gate)`` and ``up``.
    """

    gate: object
    up: object
    down: object
    silu: object
    g: np.ndarray
    v: np.ndarray


def swiglu_forward(x: np.ndarray, p_gate: dict, p_up: dict, p_down: dict):
    """SwiGLU (Shazeer 2020), as Edifice's ``SwiGLU.layer`` with ``activation: :silu``.

    ``(silu(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down``.

    Parameters
    ----------
    x : ndarray ``[..., H]``
    p_gate, p_up : dict
        ``{"kernel": [H, inner], "bias": [inner]}``.
    p_down : dict
        ``{"kernel": [inner, H], "bias": [H]}``.

    Returns
    -------
    y : ndarray ``[..., H]``
    saved : SwigluSaved

    Examples
    --------
    >>> x = np.ones((1, 2)); p = {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}
    >>> d = {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}
    >>> y, _ = swiglu_forward(x, p, p, d)               # 3 * silu(2) * 2
    >>> np.round(y, 6)
    array([[10.569565, 10.569565]])
    """
    a, s_gate = dense_forward(x, p_gate["kernel"], p_gate.get("bias"))
    g, s_silu = silu_forward(a)
    v, s_up = dense_forward(x, p_up["kernel"], p_up.get("bias"))
    y, s_down = dense_forward(g * v, p_down["kernel"], p_down.get("bias"))
    return y, SwigluSaved(s_gate, s_up, s_down, s_silu, g, v)


def swiglu_backward(dy: np.ndarray, saved: SwigluSaved) -> dict:
    """Backward of :func:`swiglu_forward`.

    Returns
    -------
    dict
        ``x [..., H]``, ``gate``, ``up``, ``down`` (each ``{"kernel", "bias"}``).

    Examples
    --------
    >>> x = np.ones((1, 2)); p = {"kernel": np.ones((2, 3)), "bias": np.zeros(3)}
    >>> _, s = swiglu_forward(x, p, p, {"kernel": np.ones((3, 2)), "bias": np.zeros(2)})
    >>> sorted(swiglu_backward(np.ones((1, 2)), s))
    ['down', 'gate', 'up', 'x']
    """
    gd = dense_backward(dy, saved.down)
    dh = gd["x"]
    ga = silu_backward(dh * saved.v, saved.silu)
    gg = dense_backward(ga["x"], saved.gate)
    gu = dense_backward(dh * saved.g, saved.up)
    strip = lambda g: {"kernel": g["kernel"], "bias": g["bias"]}   # noqa: E731
    return {"x": gg["x"] + gu["x"], "gate": strip(gg), "up": strip(gu), "down": strip(gd)}


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

#: The presets: named bundles of flags.
PRESETS = {
    "s5": dict(ssm="s5", activation="gelu"),
    "edifice": dict(ssm="edifice", activation="none"),
}

#: Every flag with its meaning (first value: the ``s5`` preset's).
FLAGS = {
    "ssm": "'s5' (the paper's diagonal complex MIMO SSM) or 'edifice' (input-projected "
           "B, C, D; fixed A = -(1..N)/N, dt = 0.1)",
    "activation": "after the SSM: 'gelu' (erf), 'gelu_tanh' (flax's default, as "
                  "lindermanlab/S5) or 'none' (Edifice)",
}

#: Edifice's fixed step.
EDIFICE_DT = 0.1

_SIZES = dict(hidden_size=256, state_size=64, num_layers=4)
_OTHER = dict(dropout=0.1, window_size=60, seq_len=None, norm_eps=1e-5, ffn_expand=4,
              blocks=1, conj_sym=True, discretization="zoh", C_init="trunc_standard_normal",
              clip_eigs=False, bidirectional=False, dt_min=1e-3, dt_max=1e-1, step_rescale=1.0)


def _float(value, name, lo=None, hi=None, lo_open=False, hi_open=False):
    """As :func:`refssm.models._common._float`, but an open bound reads ``-inf``/``inf``.

    Kept apart because the other models' messages print ``None`` there (pinned
    by their tests); one of the two messages should change for them to merge.
    """
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    bad = not math.isfinite(v)
    bad |= lo is not None and (v <= lo if lo_open else v < lo)
    bad |= hi is not None and (v >= hi if hi_open else v > hi)
    if bad:
        hi_s = "inf)" if hi is None else f"{hi}{')' if hi_open else ']'}"
        rng = f"{'(' if lo_open else '['}{'-inf' if lo is None else lo}, {hi_s}"
        raise ValueError(f"{name}: expected a finite number in {rng}, got {value!r}")
    return v

@dataclass(frozen=True, init=False)
class S5Config:
    """S5 options: the original API's names and defaults, the preset flags, the S5 SSM's options.

    Parameters
    ----------
    embed_dim : int
        Size of each input frame (required).
    hidden_size : int, default 256
        ``H``, the model width.
    state_size : int, default 64
        ``s5``: the paper's ``P`` (``P/2`` complex states are stored with
        ``conj_sym``); ``edifice``: ``N`` real states per feature.
    num_layers : int, default 4
    dropout : float, default 0.1
        Rate of the dropout after the SSM and after the SwiGLU (training only).
    window_size : int, default 60
    seq_len : int, optional
        Defaults to ``window_size`` (informational: any length is accepted).
    preset : {"s5", "edifice"}, default "s5"
    ssm, activation
        The flags (:data:`FLAGS`); each overrides its preset value.
    norm_eps : float, default 1e-5
        LayerNorm epsilon (Axon's).
    ffn_expand : int, default 4
        SwiGLU inner size ``ffn_expand * H`` (the original API's ``4H``).
    blocks : int, default 1
        ``J``, HiPPO-N blocks of the initialisation (``s5`` only).
    conj_sym : bool, default True
        Conjugate symmetry (``s5`` only).
    discretization : {"zoh", "bilinear"}, default "zoh"
    C_init : {"trunc_standard_normal", "lecun_normal", "complex_normal"}
    clip_eigs : bool, default False
        ``Re(Lambda) <= -1e-4``.
    bidirectional : bool, default False
        Non-causal SSM (``C1``, ``C2``); no stepping, no carried state.
    dt_min, dt_max : float, default 1e-3, 1e-1
        ``log_step`` initialised uniform in ``[log dt_min, log dt_max]``.
    step_rescale : float, default 1.0

    Raises
    ------
    ValueError
        A missing ``embed_dim``, an unknown option, a bad value (for example
        an odd ``state_size`` with conjugate symmetry); the message names
        what was expected and what came.

    Examples
    --------
    >>> c = S5Config(embed_dim=287)
    >>> c.hidden_size, c.state_size, c.num_layers, c.dropout, c.ssm_states, c.ffn_inner
    (256, 64, 4, 0.1, 32, 1024)
    >>> S5Config(embed_dim=4, state_size=7)
    Traceback (most recent call last):
    ...
    ValueError: state_size: expected an even state_size with conj_sym=True (P/2 complex states, one per conjugate pair), got 7
    """

    embed_dim: int
    hidden_size: int
    state_size: int
    num_layers: int
    dropout: float
    window_size: int
    seq_len: int
    preset: str
    ssm: str
    activation: str
    norm_eps: float
    ffn_expand: int
    blocks: int
    conj_sym: bool
    discretization: str
    C_init: str
    clip_eigs: bool
    bidirectional: bool
    dt_min: float
    dt_max: float
    step_rescale: float

    def __init__(self, embed_dim=None, *, preset="s5", **opts):
        known = {f.name for f in fields(S5Config)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown S5 option(s) {unknown}; expected some of {sorted(known)}")
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
        if embed_dim is None:
            raise ValueError("embed_dim: required (the size of each input frame), got None")
        v = {**_SIZES, **_OTHER, **PRESETS[preset], **opts}
        set_ = lambda k, val: object.__setattr__(self, k, val)   # noqa: E731  (frozen dataclass)
        set_("embed_dim", _positive_int(embed_dim, "embed_dim"))
        for k in _SIZES:
            set_(k, _positive_int(v[k], k))
        set_("dropout", _float(v["dropout"], "dropout", 0.0, 1.0, hi_open=True))
        set_("window_size", _positive_int(v["window_size"], "window_size"))
        set_("seq_len", self.window_size if v["seq_len"] is None
             else _positive_int(v["seq_len"], "seq_len"))
        set_("preset", preset)
        set_("ssm", _choice(v["ssm"], "ssm", ("s5", "edifice")))
        set_("activation", _choice(v["activation"], "activation", ("gelu", "gelu_tanh", "none")))
        set_("norm_eps", _float(v["norm_eps"], "norm_eps", 0.0, lo_open=True))
        set_("ffn_expand", _positive_int(v["ffn_expand"], "ffn_expand"))
        set_("blocks", _positive_int(v["blocks"], "blocks"))
        set_("conj_sym", _bool(v["conj_sym"], "conj_sym"))
        set_("discretization", _choice(v["discretization"], "discretization",
                                       core.DISCRETIZATIONS))
        set_("C_init", _choice(v["C_init"], "C_init", core.C_INITS))
        set_("clip_eigs", _bool(v["clip_eigs"], "clip_eigs"))
        set_("bidirectional", _bool(v["bidirectional"], "bidirectional"))
        set_("dt_min", _float(v["dt_min"], "dt_min", 0.0, lo_open=True))
        set_("dt_max", _float(v["dt_max"], "dt_max", self.dt_min))
        set_("step_rescale", _float(v["step_rescale"], "step_rescale", 0.0, lo_open=True))
        if self.ssm == "s5":
            N, J = self.state_size, self.blocks
            if self.conj_sym and N % 2:
                raise ValueError(f"state_size: expected an even state_size with conj_sym=True "
                                 f"(P/2 complex states, one per conjugate pair), got {N}")
            if N % J:
                raise ValueError(f"blocks: expected a divisor of state_size {N}, got {J}")
            if self.conj_sym and (N // J) % 2:
                raise ValueError(f"blocks: conjugate symmetry needs an even block size "
                                 f"state_size / blocks, got {N} / {J} = {N // J}")
        elif self.bidirectional:
            raise ValueError("bidirectional: the edifice SSM is causal only; expected "
                             "bidirectional=False with ssm='edifice', got True")

    @property
    def ssm_states(self) -> int:
        """Stored states per layer: ``state_size / 2`` (complex, ``conj_sym``), else ``state_size``."""
        return self.state_size // 2 if (self.ssm == "s5" and self.conj_sym) else self.state_size

    @property
    def ffn_inner(self) -> int:
        """SwiGLU inner size, ``ffn_expand * hidden_size``."""
        return self.ffn_expand * self.hidden_size

    def to_dict(self) -> dict:
        """Every option by name (``S5Config(**cfg.to_dict())`` rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "S5Config":
        """A copy with ``changes``; a new ``preset`` re-fills the flags not given.

        Examples
        --------
        >>> S5Config(embed_dim=4).replace(preset="edifice").activation
        'none'
        """
        opts = self.to_dict()
        if "preset" in changes and changes["preset"] != self.preset:
            for flag in FLAGS:
                opts.pop(flag)
        opts.update(changes)
        return S5Config(**opts)


def as_config(config=None, **opts) -> S5Config:
    """An :class:`S5Config` from a config, a dict of options, or keyword options.

    Examples
    --------
    >>> as_config({"embed_dim": 3}).state_size
    64
    """
    if isinstance(config, S5Config):
        return config.replace(**opts) if opts else config
    if config is None:
        return S5Config(**opts)
    if isinstance(config, dict):
        return S5Config(**{**config, **opts})
    raise ValueError(f"config: expected an S5Config or a dict of options, got "
                     f"{type(config).__name__}")


def recommended_defaults() -> dict:
    """The original API's 60 fps real-time profile.

    Examples
    --------
    >>> recommended_defaults()
    {'hidden_size': 256, 'state_size': 64, 'num_layers': 4, 'window_size': 60, 'dropout': 0.1}
    """
    return dict(hidden_size=256, state_size=64, num_layers=4, window_size=60, dropout=0.1)


def output_size(config=None, **opts) -> int:
    """Size of the model's output frame, ``hidden_size``.

    Examples
    --------
    >>> output_size(), output_size(hidden_size=64)
    (256, 64)
    """
    if isinstance(config, S5Config):
        return config.hidden_size
    opts = {**(config or {}), **opts}
    opts.setdefault("embed_dim", 1)
    return as_config(**opts).hidden_size


# ---------------------------------------------------------------------------
# Parameter names, shapes and exact count
# ---------------------------------------------------------------------------

def _block_name(i: int) -> str:
    return f"s5_block_{i}"


def param_shapes(config) -> dict:
    """``{layer: {name: shape}}`` of the parameter tree for ``config``.

    Examples
    --------
    >>> shapes = param_shapes(S5Config(embed_dim=3, hidden_size=4, state_size=6, num_layers=1))
    >>> sorted(shapes)
    ['final_norm', 'input_projection', 's5_block_1_ffn_down', 's5_block_1_ffn_gate', 's5_block_1_ffn_norm', 's5_block_1_ffn_up', 's5_block_1_ssm_norm', 's5_block_1_ssm_ssm']
    >>> shapes["s5_block_1_ssm_ssm"]["B"]
    (3, 4, 2)
    """
    c = as_config(config)
    H, N, F = c.hidden_size, c.state_size, c.ffn_inner
    dense = lambda i, o: {"kernel": (i, o), "bias": (o,)}     # noqa: E731
    norm = {"gamma": (H,), "beta": (H,)}
    shapes = {}
    if c.embed_dim != H:
        shapes["input_projection"] = dense(c.embed_dim, H)
    for i in range(1, c.num_layers + 1):
        b = _block_name(i)
        shapes[f"{b}_ssm_norm"] = dict(norm)
        if c.ssm == "s5":
            shapes[f"{b}_ssm_ssm"] = core.s5_param_shapes(H, N, conj_sym=c.conj_sym,
                                                          bidirectional=c.bidirectional)
        else:
            shapes[f"{b}_ssm_b_proj"] = dense(H, N)
            shapes[f"{b}_ssm_c_proj"] = dense(H, N)
            shapes[f"{b}_ssm_d_proj"] = dense(H, H)
        shapes[f"{b}_ffn_norm"] = dict(norm)
        shapes[f"{b}_ffn_gate"] = dense(H, F)
        shapes[f"{b}_ffn_up"] = dense(H, F)
        shapes[f"{b}_ffn_down"] = dense(F, H)
    shapes["final_norm"] = dict(norm)
    return shapes


def param_count_breakdown(config) -> dict:
    """The exact parameter count term by term (closed form).

    Per layer, with ``H = hidden``, ``N = state_size``, ``Ps`` stored states,
    ``F = ffn_expand * H``::

        ssm_norm   2H
        ssm        s5:      2Ps (Lambda) + 2 Ps H (B) + 2 H Ps per C (1, or 2 bidirectional)
                            + H (D) + Ps (log_step)
                   edifice: 2 (H N + N) (b_proj, c_proj) + H^2 + H (d_proj)
        ffn_norm   2H
        ffn        2 (H F + F) (gate, up) + F H + H (down)

    plus ``input_projection`` (``embed*H + H`` if ``embed != H``) and
    ``final_norm`` (``2H``).

    Examples
    --------
    >>> param_count_breakdown(S5Config(embed_dim=4, hidden_size=4, state_size=2, num_layers=1))["ssm"]
    23
    """
    c = as_config(config)
    H, N, F, L, Ps = c.hidden_size, c.state_size, c.ffn_inner, c.num_layers, c.ssm_states
    if c.ssm == "s5":
        n_C = 2 if c.bidirectional else 1
        ssm = 2 * Ps + 2 * Ps * H + n_C * 2 * H * Ps + H + Ps
    else:
        ssm = 2 * (H * N + N) + H * H + H
    return {
        "input_projection": (c.embed_dim * H + H) if c.embed_dim != H else 0,
        "ssm_norm": L * 2 * H,
        "ssm": L * ssm,
        "ffn_norm": L * 2 * H,
        "ffn": L * (2 * (H * F + F) + F * H + H),
        "final_norm": 2 * H,
    }


def param_count(config=None, **opts) -> int:
    """Exact number of parameters: equals the scalars in :func:`build`'s tree.

    Examples
    --------
    >>> cfg = S5Config(embed_dim=8, hidden_size=16, state_size=4, num_layers=2)
    >>> param_count(cfg) == build(cfg).param_count_tree()
    True
    """
    return int(sum(param_count_breakdown(as_config(config, **opts)).values()))


def original_param_count_terms(config=None, **opts) -> dict:
    """The original API's *approximate* formula (Edifice ``S5.param_count/1``), term by term.

    The terms of ``lib/edifice/ssm/s5.ex``'s formula, each summed over the
    layers, with ``H = hidden``, ``N = state_size`` and a fixed ``4H`` FFN::

        input_projection   embed*H        only if embed != H; no bias
        encoder            HN             "Encoder: hidden * state": a dense
                                          H -> N that Edifice's S5 no longer
                                          builds (nor does this model)
        bc_proj            2HN            b_proj and c_proj kernels
        d_proj             H^2            kernel only
        ffn_gate_up        2H(4H)         SwiGLU gate and up kernels
        ffn_down           (4H)H          kernel only

    It is Edifice's SSM whatever the preset (the paper's ``s5`` SSM has other
    parameters), and counts no bias, no LayerNorm and no final norm
    (``refssm.verify.models.compare_count_terms`` sets these beside the exact
    :func:`param_count_breakdown`). Edifice reads the input size under the same
    key its ``build`` takes (``:embed_dim``, or ``:embed_size`` in the versions
    whose ``build`` takes that), falling back to 287 when none is given; here it
    is always given. The values sum to :func:`original_param_count`.

    Examples
    --------
    >>> t = original_param_count_terms(embed_dim=287)
    >>> t["encoder"], t["bc_proj"]
    (65536, 131072)
    """
    c = as_config(config, **opts)
    H, N, L = c.hidden_size, c.state_size, c.num_layers
    F = 4 * H
    return {
        "input_projection": c.embed_dim * H if c.embed_dim != H else 0,
        "encoder": L * H * N,
        "bc_proj": L * 2 * H * N,
        "d_proj": L * H * H,
        "ffn_gate_up": L * 2 * H * F,
        "ffn_down": L * F * H,
    }


def original_param_count(config=None, **opts) -> int:
    """The original API's *approximate* count (Edifice ``S5.param_count/1``).

    Per layer ``H N`` ("encoder") ``+ 2 H N`` (B, C projections) ``+ H^2``
    (D projection) ``+ 2 H (4H) + 4H H`` (SwiGLU), plus ``embed H`` if
    ``embed != H``: the sum of :func:`original_param_count_terms`. It counts an
    encoder that does not exist, leaves out every bias, the LayerNorms and the
    final norm, and is the Edifice SSM's count, not the paper's
    (:func:`param_count_breakdown` has the exact terms).

    Examples
    --------
    >>> original_param_count(embed_dim=287)
    3677952
    """
    return int(sum(original_param_count_terms(config, **opts).values()))


# ---------------------------------------------------------------------------
# Builders (initialised parameters)
# ---------------------------------------------------------------------------

def _dense_params(rng, n_in, n_out):
    """Axon's ``dense``: glorot-uniform kernel ``[in, out]``, zero bias ``[out]``."""
    return {"kernel": glorot_uniform(rng, (n_in, n_out)), "bias": np.zeros(n_out)}


def _norm_params(H):
    return {"gamma": np.ones(H), "beta": np.zeros(H)}


def build_mimo_ssm(config, name: str = "mimo_ssm", rng=None) -> dict:
    """Parameters of the SSM sub-layer ``{name}_*`` (``name`` is ``s5_block_i_ssm`` in a model).

    ``s5``: ``{name}_norm`` and ``{name}_ssm`` (the S5 SSM,
    :func:`refssm.ssm.s5.init_s5_ssm`: HiPPO-N, ``V^-1 B``, ``C V``, ...).
    ``edifice``: ``{name}_norm``, ``{name}_b_proj``, ``{name}_c_proj``,
    ``{name}_d_proj``.

    Examples
    --------
    >>> sorted(build_mimo_ssm(S5Config(embed_dim=4, hidden_size=4, state_size=4), "s", rng=0))
    ['s_norm', 's_ssm']
    >>> sorted(build_mimo_ssm(S5Config(embed_dim=4, hidden_size=4, preset="edifice"), "s", rng=0))
    ['s_b_proj', 's_c_proj', 's_d_proj', 's_norm']
    """
    c = as_config(config)
    rng = _rng(rng)
    H, N = c.hidden_size, c.state_size
    p = {f"{name}_norm": _norm_params(H)}
    if c.ssm == "s5":
        p[f"{name}_ssm"] = core.init_s5_ssm(H, N, blocks=c.blocks, conj_sym=c.conj_sym,
                                            C_init=c.C_init, dt_min=c.dt_min, dt_max=c.dt_max,
                                            bidirectional=c.bidirectional, rng=rng)
    else:
        p[f"{name}_b_proj"] = _dense_params(rng, H, N)
        p[f"{name}_c_proj"] = _dense_params(rng, H, N)
        p[f"{name}_d_proj"] = _dense_params(rng, H, H)
    return p


def build_ffn(config, name: str = "ffn", rng=None) -> dict:
    """Parameters of the feed-forward sub-layer: ``{name}_norm``, ``_gate``, ``_up``, ``_down``.

    Examples
    --------
    >>> p = build_ffn(S5Config(embed_dim=2, hidden_size=2), "f", rng=0)
    >>> {k: v["kernel"].shape for k, v in p.items() if "kernel" in v}
    {'f_gate': (2, 8), 'f_up': (2, 8), 'f_down': (8, 2)}
    """
    c = as_config(config)
    rng = _rng(rng)
    H, F = c.hidden_size, c.ffn_inner
    return {f"{name}_norm": _norm_params(H), f"{name}_gate": _dense_params(rng, H, F),
            f"{name}_up": _dense_params(rng, H, F), f"{name}_down": _dense_params(rng, F, H)}


def build_s5_block(config, layer_idx: int = 1, rng=None, name: Optional[str] = None) -> dict:
    """Parameters of block ``layer_idx``: its SSM (``{name}_ssm_*``) and FFN (``{name}_ffn_*``).

    Examples
    --------
    >>> len(build_s5_block(S5Config(embed_dim=2, hidden_size=2, state_size=2), 3, rng=0))
    6
    """
    c = as_config(config)
    rng = _rng(rng)
    name = name or _block_name(_positive_int(layer_idx, "layer_idx"))
    return {**build_mimo_ssm(c, f"{name}_ssm", rng), **build_ffn(c, f"{name}_ffn", rng)}


class S5Model:
    """A config and its parameters, with the model's functions as methods.

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=4, num_layers=2, seed=0)
    >>> model(np.ones((2, 5, 3))).shape
    (2, 8)
    """

    def __init__(self, config, params: dict):
        self.config = as_config(config)
        self.params = params

    def __call__(self, x, **kwargs):
        return forward(self.params, x, self.config, **kwargs).output

    def forward(self, x, **kwargs) -> "S5Output":
        return forward(self.params, x, self.config, **kwargs)

    def forward_with_saved(self, x, **kwargs):
        """:func:`forward_with_saved` with this model's parameters and config."""
        return forward_with_saved(self.params, x, self.config, **kwargs)

    def backward(self, d_out, saved, **kwargs) -> "S5Grads":
        """:func:`backward` (the parameters are in ``saved``)."""
        return backward(d_out, saved, **kwargs)

    def init_cache(self, batch_size: int = 1) -> "S5Cache":
        return init_cache(self.config, batch_size)

    def step(self, cache: "S5Cache", frame):
        return step(self.params, cache, frame, self.config)

    def param_count(self) -> int:
        """Closed-form count (:func:`param_count`)."""
        return param_count(self.config)

    def param_count_tree(self) -> int:
        """Scalars in ``self.params``."""
        return count_params(self.params)

    def __repr__(self):
        return f"S5Model({self.config!r}, {self.param_count_tree()} parameters)"


def build(config=None, *, seed=0, **opts) -> S5Model:
    """Config -> model with initialised parameters (the original API's ``build``).

    Parameters
    ----------
    config : S5Config or dict, optional
    seed : int or numpy Generator
    **opts
        Options of :class:`S5Config` (``embed_dim`` required).

    Examples
    --------
    >>> model = build(embed_dim=287, seed=0)
    >>> model.param_count() == model.param_count_tree()
    True
    """
    c = as_config(config, **opts)
    rng = _rng(seed)
    params = {}
    if c.embed_dim != c.hidden_size:
        params["input_projection"] = _dense_params(rng, c.embed_dim, c.hidden_size)
    for i in range(1, c.num_layers + 1):
        params.update(build_s5_block(c, i, rng))
    params["final_norm"] = _norm_params(c.hidden_size)
    return S5Model(c, params)


def random_params(config=None, seed=0, **opts) -> dict:
    """Parameters *with teeth*, for tests and golden fixtures (not an initialisation).

    The paper's initialisation (:func:`build`) with everything it leaves at
    a value that would hide a bug moved off it: LayerNorm ``gamma = 1 +
    0.2 N(0,1)``, ``beta = 0.2 N(0,1)``, biases ``0.1 N(0,1)``, and
    ``Re(Lambda)`` spread over ``-0.5 * U[0.2, 2]`` (HiPPO-N puts every
    eigenvalue at ``-1/2``). Steps stay in ``[1e-3, 1e-1]``, so
    ``|Lambda_bar|`` is between 0.9 and 0.9999: the state carries.

    Examples
    --------
    >>> cfg = S5Config(embed_dim=3, hidden_size=8, state_size=4, num_layers=1)
    >>> sorted(random_params(cfg)) == sorted(param_shapes(cfg))
    True
    """
    c = as_config(config, **opts)
    rng = _rng(seed)
    params = build(c, seed=rng).params
    for layer, p in params.items():
        for name in p:
            if name == "gamma":
                p[name] = 1.0 + 0.2 * rng.standard_normal(p[name].shape)
            elif name == "beta":
                p[name] = 0.2 * rng.standard_normal(p[name].shape)
            elif name == "bias":
                p[name] = 0.1 * rng.standard_normal(p[name].shape)
            elif name == "Lambda_re":
                p[name] = p[name] * rng.uniform(0.2, 2.0, p[name].shape)
    return params


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------

class S5Cache(NamedTuple):
    """The carried state, one per layer.

    Attributes
    ----------
    h : ndarray
        ``s5``: ``[batch, num_layers, Ps]`` complex; ``edifice``:
        ``[batch, num_layers, H, N]`` real.
    """

    h: np.ndarray


class S5Output(NamedTuple):
    """What :func:`forward` returns.

    Attributes
    ----------
    output : ndarray ``[batch, hidden]`` or ``[batch, seq_len, hidden]``
    state : S5Cache or None
        State after the last frame (None for a bidirectional model).
    hidden_states : tuple of ndarray ``[batch, seq_len, hidden]``
        The residual stream after the input projection and after every block
        (before the final norm).
    """

    output: np.ndarray
    state: Optional[S5Cache]
    hidden_states: tuple


def _state_shape(c: S5Config, batch: int) -> tuple:
    if c.ssm == "s5":
        return (batch, c.num_layers, c.ssm_states)
    return (batch, c.num_layers, c.hidden_size, c.state_size)


def init_cache(config=None, batch_size: int = 1, **opts) -> S5Cache:
    """Zero state for :func:`step` / :func:`forward` (one state per layer).

    Raises
    ------
    ValueError
        For a bidirectional model (not causal: it cannot be stepped).

    Examples
    --------
    >>> init_cache(embed_dim=3, hidden_size=8, state_size=4, num_layers=2, batch_size=2).h.shape
    (2, 2, 2)
    >>> init_cache(embed_dim=3, hidden_size=8, state_size=4, preset="edifice").h.shape
    (1, 4, 8, 4)
    """
    c = as_config(config, **opts)
    batch_size = _positive_int(batch_size, "batch_size")
    if c.bidirectional:
        raise ValueError("init_cache: a bidirectional S5 is not causal (its backward pass reads "
                         "the future), so it has no state to carry; expected bidirectional=False")
    dtype = np.complex128 if c.ssm == "s5" else np.float64
    return S5Cache(np.zeros(_state_shape(c, batch_size), dtype=dtype))


def _check_cache(cache, c: S5Config, batch: int) -> S5Cache:
    if not (isinstance(cache, tuple) and len(cache) == 1):
        raise ValueError(f"state: expected an S5Cache (h,), got {type(cache).__name__}")
    h = as_float_array(cache[0], "state.h", allow_complex=(c.ssm == "s5"))
    want = _state_shape(c, batch)
    if h.shape != want:
        layout = ("[batch, num_layers, Ps]" if c.ssm == "s5"
                  else "[batch, num_layers, hidden, state]")
        raise ValueError(f"state.h: expected shape {want} {layout} for this config and batch "
                         f"{batch}, got {h.shape} (a state from another config or batch?)")
    return S5Cache(h.astype(np.complex128 if c.ssm == "s5" else np.float64))


def _dense(p: dict, x: np.ndarray) -> np.ndarray:
    """``x @ kernel + bias`` of one dense layer's dict (the step's frame-by-frame path)."""
    return dense_forward(x, p["kernel"], p.get("bias"))[0]


def _layer_norm(p: dict, x: np.ndarray, c: S5Config) -> np.ndarray:
    """LayerNorm with one norm layer's dict (the step's frame-by-frame path)."""
    return layer_norm_forward(x, p["gamma"], p["beta"], c.norm_eps)[0]


def _activation(y: np.ndarray, c: S5Config) -> np.ndarray:
    return activation_forward(y, c)[0]


def _edifice_A(c: S5Config) -> np.ndarray:
    """Edifice's fixed ``A = -(1..N)/N``, as ``[H, N]``."""
    a = -np.arange(1.0, c.state_size + 1) / c.state_size
    return np.tile(a, (c.hidden_size, 1))


def _ssm_engine_ok(c: S5Config, engine: str):
    allowed = core.ENGINES if c.ssm == "s5" else ("numpy", "numba", "logdepth")
    if engine not in allowed:
        why = "" if c.ssm == "s5" else " (the edifice SSM is time-varying: no FFT engine)"
        raise ValueError(f"engine: expected one of {allowed}{why}, got {engine!r}")


# ---------------------------------------------------------------------------
# The layers, each forward with its manual backward (llm.c-style; DESIGN.md
# section 3, "Manual backprop"). The model's forward runs these same
# functions, so the backward differentiates exactly what forward computes.
# ---------------------------------------------------------------------------
#
# Notation of block i, with H = hidden, N = state_size, Ps stored states,
# F = ffn_inner, L = seq_len:
#
#   SSM sub-layer (name = s5_block_{i}_ssm), mimo_ssm_forward_with_saved:
#     u   = LayerNorm(x)                        norm_forward            [b, L, H]
#     y   = SSM(u; h0)                          s5_core_forward          [b, L, H]
#                                               (edifice: edifice_ssm_forward)
#     a   = act(y)                              activation_forward       [b, L, H]
#     x'  = x + dropout(a)                      (training only)          [b, L, H]
#   FFN sub-layer (name = s5_block_{i}_ffn), ffn_forward_with_saved:
#     v   = LayerNorm(x')                       norm_forward             [b, L, H]
#     f   = SwiGLU(v)                           swiglu_forward           [b, L, H] (inner F)
#     out = x' + dropout(f)                                              [b, L, H]
#
# Every ``*_backward`` takes the gradient of its forward's outputs and the
# forward's saved values and returns the gradient of its inputs and a
# *fragment* ``{layer: {name: grad}}`` of the parameter-gradient tree (the
# layer names of ``params``); :func:`backward` merges them. Saved values are
# references to arrays the forward computes anyway (the ops' own ``*Saved``
# tuples), not copies. The sub-layers include their residual, so their
# backwards return ``dx = d_out + d(branch)/dx``.
#
# Complex values (the ``s5`` state) follow the SSM core's convention: the
# gradient of a complex ``z`` is ``dL/dRe(z) + i dL/dIm(z)``.

def norm_forward(params: dict, x: np.ndarray, config, name: str):
    """``u = LayerNorm(x)`` over ``hidden`` (``gamma``, ``beta``, epsilon ``config.norm_eps``).

    Parameters
    ----------
    params : dict
        Reads ``params[name]`` (``s5_block_{i}_ssm_norm``, ``s5_block_{i}_ffn_norm``
        or ``final_norm``).
    x : ndarray ``[..., hidden]``
    config : S5Config
    name : str

    Returns
    -------
    u : ndarray ``[..., hidden]``
    saved : LayerNormSaved
        ``x_hat``, ``rstd``, ``gamma``.

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=2, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4))
    >>> u, s = norm_forward(p, x, c, "final_norm")
    >>> dx, frag = norm_backward(np.ones_like(u), s, "final_norm")
    >>> dx.shape, sorted(frag["final_norm"])
    ((2, 3, 4), ['beta', 'gamma'])
    """
    c = as_config(config)
    p = params[name]
    return layer_norm_forward(x, p["gamma"], p["beta"], c.norm_eps)


def norm_backward(du: np.ndarray, saved: LayerNormSaved, name: str):
    """Backward of :func:`norm_forward`.

    With ``g = du * gamma``: ``dx = rstd (g - mean(g) - x_hat mean(g x_hat))``,
    ``d gamma = sum du x_hat``, ``d beta = sum du`` (sums over the leading axes).

    Parameters
    ----------
    du : ndarray ``[..., hidden]``
    saved : LayerNormSaved
    name : str

    Returns
    -------
    dx : ndarray ``[..., hidden]``
    fragment : dict
        ``{name: {"gamma": [hidden], "beta": [hidden]}}``.

    Examples
    --------
    See :func:`norm_forward`.
    """
    g = layer_norm_backward(du, saved)
    return g["x"], {name: {"gamma": g["gamma"], "beta": g["beta"]}}


def s5_core_forward(params: dict, u: np.ndarray, config, name: str,
                    h0: Optional[np.ndarray] = None, *, engine: str = "numpy"):
    """``y = SSM(u)``: the paper's S5 SSM of the layer ``{name}_ssm`` (``s5`` preset).

    :func:`refssm.ssm.s5.s5_ssm_forward` with the config's options::

        Lambda_bar = exp(Lambda Delta),  B_bar = (Lambda_bar - 1) / Lambda B_tilde   (ZOH)
        h_k = Lambda_bar * h_{k-1} + B_bar u_k                             [b, Ps] complex
        y_k = Re(C_tilde h_k) (x2 with conj_sym) + D * u_k                  [b, H]

    Parameters
    ----------
    params : dict
        Reads ``params[f"{name}_ssm"]``: ``Lambda_re, Lambda_im [Ps]``,
        ``B [Ps, H, 2]``, ``C [H, Ps, 2]`` (``C1``, ``C2`` bidirectional),
        ``D [H]``, ``log_step [Ps]``.
    u : ndarray ``[batch, seq_len, H]``
    config : S5Config
    name : str
        ``s5_block_{i}_ssm``.
    h0 : ndarray ``[batch, Ps]`` complex, optional
        State before the first frame (zeros if omitted).
    engine : {"numpy", "numba", "logdepth", "fft", "fft_dense"}

    Returns
    -------
    y : ndarray ``[batch, seq_len, H]``
    h_last : ndarray ``[batch, Ps]`` complex, or None
        The state after the last frame (None if bidirectional).
    saved : refssm.ssm.s5.S5Saved

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=4, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> u = np.random.default_rng(0).standard_normal((2, 5, 4))
    >>> y, h, s = s5_core_forward(p, u, c, "s5_block_1_ssm")
    >>> du, dh0, frag = s5_core_backward(np.ones_like(y), None, s, "s5_block_1_ssm")
    >>> y.shape, h.shape, du.shape, dh0.dtype
    ((2, 5, 4), (2, 2), (2, 5, 4), dtype('complex128'))
    >>> sorted(frag["s5_block_1_ssm_ssm"])
    ['B', 'C', 'D', 'Lambda_im', 'Lambda_re', 'log_step']
    """
    c = as_config(config)
    y, h_last, saved = core.s5_ssm_forward(
        params[f"{name}_ssm"], u, discretization=c.discretization, conj_sym=c.conj_sym,
        bidirectional=c.bidirectional, clip_eigs=c.clip_eigs, step_rescale=c.step_rescale,
        initial_state=h0, engine=engine)
    return y, (None if c.bidirectional else h_last), saved


def s5_core_backward(dy: np.ndarray, d_h_last: Optional[np.ndarray], saved, name: str):
    """Backward of :func:`s5_core_forward`: :func:`refssm.ssm.s5.s5_ssm_backward`.

    The reverse-time scan of the forward's engine, then the discretisation
    and the parameterisation (``d log_step = d Delta * Delta``, ``d Lambda_re``
    zero where clipped, ``B``, ``C`` as ``[..., (re, im)]``).

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, H]``
    d_h_last : ndarray ``[batch, Ps]`` complex, or None
        ``dL/dRe(h_last) + i dL/dIm(h_last)`` (None: zero).
    saved : refssm.ssm.s5.S5Saved
    name : str
        ``s5_block_{i}_ssm``.

    Returns
    -------
    du : ndarray ``[batch, seq_len, H]``
    d_h0 : ndarray ``[batch, Ps]`` complex, or None
        Gradient of the incoming state (None if bidirectional: it has none).
    fragment : dict
        ``{f"{name}_ssm": {Lambda_re, Lambda_im, B, C (or C1, C2), D, log_step}}``,
        real, in the parameters' shapes.

    Examples
    --------
    See :func:`s5_core_forward`.
    """
    g = core.s5_ssm_backward(dy, d_h_last, saved)
    grads = {k: v for k, v in g.items() if k not in ("u", "initial_state")}
    d_h0 = None if saved.flags["bidirectional"] else g["initial_state"]
    return g["u"], d_h0, {f"{name}_ssm": grads}


class EdificeSsmSaved(NamedTuple):
    """Saved by :func:`edifice_ssm_forward`.

    Attributes
    ----------
    b_proj, c_proj, d_proj : DenseSaved
        ``u [b, L, H] -> B, C [b, L, N]`` and ``-> d [b, L, H]``.
    scan : SelectiveScanSaved
        The selective scan's own saved values.
    """

    b_proj: DenseSaved
    c_proj: DenseSaved
    d_proj: DenseSaved
    scan: SelectiveScanSaved


def edifice_ssm_forward(params: dict, u: np.ndarray, config, name: str,
                        h0: Optional[np.ndarray] = None, *, engine: str = "numpy"):
    """``y = SSM(u)``: Edifice's input-projected SSM (``edifice`` preset)::

        B_t = b_proj(u_t),  C_t = c_proj(u_t)          [b, L, N]
        d_t = d_proj(u_t)                              [b, L, H]
        h_t[c, n] = exp(0.1 A_n) h_{t-1}[c, n] + 0.1 B_t[n] u_t[c]      A = -(1..N)/N
        y_t[c]    = sum_n C_t[n] h_t[c, n] + d_t[c]

    (the recurrence by :func:`refssm.ssm.selective_scan.selective_scan_forward`).

    Parameters
    ----------
    params : dict
        Reads ``{name}_b_proj``, ``{name}_c_proj`` (``kernel [H, N]``,
        ``bias [N]``) and ``{name}_d_proj`` (``kernel [H, H]``, ``bias [H]``).
    u : ndarray ``[batch, seq_len, H]``
    config : S5Config
    name : str
        ``s5_block_{i}_ssm``.
    h0 : ndarray ``[batch, H, N]``, optional
        State before the first frame (zeros if omitted).
    engine : {"numpy", "numba", "logdepth"}

    Returns
    -------
    y : ndarray ``[batch, seq_len, H]``
    h_last : ndarray ``[batch, H, N]``
    saved : EdificeSsmSaved

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=3, num_layers=1, preset="edifice")
    >>> p = random_params(c, seed=0)
    >>> u = np.random.default_rng(0).standard_normal((2, 5, 4))
    >>> y, h, s = edifice_ssm_forward(p, u, c, "s5_block_1_ssm")
    >>> du, dh0, frag = edifice_ssm_backward(np.ones_like(y), None, s, "s5_block_1_ssm")
    >>> y.shape, h.shape, du.shape, dh0.shape
    ((2, 5, 4), (2, 4, 3), (2, 5, 4), (2, 4, 3))
    >>> sorted(frag)
    ['s5_block_1_ssm_b_proj', 's5_block_1_ssm_c_proj', 's5_block_1_ssm_d_proj']
    """
    c = as_config(config)
    B, s_b = dense_layer_forward(params, u, f"{name}_b_proj")             # [batch, L, N]
    C, s_c = dense_layer_forward(params, u, f"{name}_c_proj")             # [batch, L, N]
    d, s_d = dense_layer_forward(params, u, f"{name}_d_proj")             # [batch, L, H]
    delta = np.full(u.shape, EDIFICE_DT)
    y, h_last, s_scan = selective_scan_forward(u, delta, _edifice_A(c), B, C,
                                               initial_state=h0, engine=engine)
    return y + d, h_last, EdificeSsmSaved(s_b, s_c, s_d, s_scan)


def edifice_ssm_backward(dy: np.ndarray, d_h_last: Optional[np.ndarray],
                         saved: EdificeSsmSaved, name: str):
    """Backward of :func:`edifice_ssm_forward`.

    The scan's reverse-time backward gives ``du`` (through the recurrence),
    ``dB``, ``dC`` and ``d h0``; ``A`` and the step are fixed (their
    gradients are dropped). ``u`` feeds the scan and the three projections,
    so ``du`` is the sum of the four; ``d d = dy``.

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, H]``
    d_h_last : ndarray ``[batch, H, N]`` or None
        Gradient of the returned state (None: zero).
    saved : EdificeSsmSaved
    name : str
        ``s5_block_{i}_ssm``.

    Returns
    -------
    du : ndarray ``[batch, seq_len, H]``
    d_h0 : ndarray ``[batch, H, N]``
    fragment : dict
        ``{name}_b_proj``, ``{name}_c_proj``, ``{name}_d_proj``: ``{"kernel", "bias"}``.

    Examples
    --------
    See :func:`edifice_ssm_forward`.
    """
    g = selective_scan_backward(dy, d_h_last, saved.scan)
    frag = {}
    du_b, f = dense_layer_backward(g["B"], saved.b_proj, f"{name}_b_proj")
    _merge_grads(frag, f)
    du_c, f = dense_layer_backward(g["C"], saved.c_proj, f"{name}_c_proj")
    _merge_grads(frag, f)
    du_d, f = dense_layer_backward(dy, saved.d_proj, f"{name}_d_proj")
    _merge_grads(frag, f)
    return g["u"] + du_b + du_c + du_d, g["initial_state"], frag


def activation_forward(y: np.ndarray, config):
    """``a = act(y)`` after the SSM: GELU (erf), its tanh form, or none (``config.activation``).

    Parameters
    ----------
    y : ndarray ``[...]``
    config : S5Config

    Returns
    -------
    a : ndarray ``[...]``
    saved : GeluSaved or None
        None for ``activation="none"`` (the identity).

    Examples
    --------
    >>> a, s = activation_forward(np.array([0.0, 1.0]), S5Config(embed_dim=1))
    >>> activation_backward(np.ones(2), s)
    array([0.5       , 1.08331547])
    """
    c = as_config(config)
    if c.activation == "none":
        return y, None
    return gelu_forward(y, approximate=(c.activation == "gelu_tanh"))


def activation_backward(da: np.ndarray, saved: Optional[GeluSaved]) -> np.ndarray:
    """Backward of :func:`activation_forward`: ``dy = da * act'(y)`` (``[...]``).

    Examples
    --------
    See :func:`activation_forward`.
    """
    return da if saved is None else gelu_backward(da, saved)["x"]


def _dropout(y: np.ndarray, c: S5Config, rng):
    """``dropout(y)`` at ``config.dropout`` when ``rng`` is given (training), else ``y``."""
    if rng is None:
        return y, None
    return dropout_forward(y, c.dropout, training=True, rng=rng)


def _dropout_backward(dy: np.ndarray, saved: Optional[DropoutSaved]) -> np.ndarray:
    return dy if saved is None else dropout_backward(dy, saved)["x"]


class MimoSsmSaved(NamedTuple):
    """Saved by :func:`mimo_ssm_forward_with_saved`, by equation.

    Attributes
    ----------
    name : str
        ``s5_block_{i}_ssm``.
    norm : LayerNormSaved
        ``u = LayerNorm(x)``.
    ssm : refssm.ssm.s5.S5Saved or EdificeSsmSaved
        ``y = SSM(u)``.
    activation : GeluSaved or None
        ``a = act(y)``.
    dropout : DropoutSaved or None
        ``dropout(a)`` (None when no dropout was applied); ``scale`` is the
        mask divided by ``1 - rate``.
    """

    name: str
    norm: LayerNormSaved
    ssm: object
    activation: Optional[GeluSaved]
    dropout: Optional[DropoutSaved]


def mimo_ssm_forward_with_saved(params: dict, x: np.ndarray, config, name: str, h0=None, *,
                                engine: str = "numpy", rng=None):
    """:func:`mimo_ssm_forward` that also returns what :func:`mimo_ssm_backward` needs.

    ``out = x + dropout(act(SSM(LayerNorm(x))))``.

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, H]``
    config : S5Config
    name : str
        ``s5_block_{i}_ssm``.
    h0 : ndarray, optional
        ``[batch, Ps]`` complex (``s5``) or ``[batch, H, N]`` (``edifice``).
    engine : str
    rng : numpy Generator, optional
        Dropout source (training); None: no dropout.

    Returns
    -------
    out : ndarray ``[batch, seq_len, H]``
    h_last : ndarray or None
        The SSM state after the last frame (None if bidirectional).
    saved : MimoSsmSaved

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=4, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4))
    >>> out, h, s = mimo_ssm_forward_with_saved(p, x, c, "s5_block_1_ssm")
    >>> dx, dh0, frag = mimo_ssm_backward(np.ones_like(out), None, s, c)
    >>> dx.shape, dh0.shape, sorted(frag)
    ((2, 3, 4), (2, 2), ['s5_block_1_ssm_norm', 's5_block_1_ssm_ssm'])
    """
    c = as_config(config)
    u, s_norm = norm_forward(params, x, c, f"{name}_norm")               # [batch, L, H]
    if c.ssm == "s5":
        y, h_last, s_ssm = s5_core_forward(params, u, c, name, h0, engine=engine)
    else:
        y, h_last, s_ssm = edifice_ssm_forward(params, u, c, name, h0, engine=engine)
    a, s_act = activation_forward(y, c)
    r, s_drop = _dropout(a, c, rng)
    return x + r, h_last, MimoSsmSaved(name, s_norm, s_ssm, s_act, s_drop)


def mimo_ssm_backward(d_out: np.ndarray, d_h_last: Optional[np.ndarray], saved: MimoSsmSaved,
                      config):
    """Backward of :func:`mimo_ssm_forward_with_saved`, the equations in reverse order.

    Dropout (the saved mask), the activation, the SSM, the LayerNorm; the
    residual adds ``d_out`` to ``dx``.

    Parameters
    ----------
    d_out : ndarray ``[batch, seq_len, H]``
    d_h_last : ndarray or None
        Gradient of the returned state (None: zero); complex for ``s5``.
    saved : MimoSsmSaved
    config : S5Config

    Returns
    -------
    dx : ndarray ``[batch, seq_len, H]``
        Gradient of the sub-layer's input, residual included.
    d_h0 : ndarray or None
        Gradient of the incoming state (None if bidirectional).
    fragment : dict
        ``{name}_norm`` and the SSM's layers.

    Examples
    --------
    See :func:`mimo_ssm_forward_with_saved`.
    """
    c = as_config(config)
    name = saved.name
    da = _dropout_backward(d_out, saved.dropout)
    dy = activation_backward(da, saved.activation)
    if c.ssm == "s5":
        du, d_h0, frag = s5_core_backward(dy, d_h_last, saved.ssm, name)
    else:
        du, d_h0, frag = edifice_ssm_backward(dy, d_h_last, saved.ssm, name)
    dx, g = norm_backward(du, saved.norm, f"{name}_norm")
    _merge_grads(frag, g)
    return d_out + dx, d_h0, frag


class FfnSaved(NamedTuple):
    """Saved by :func:`ffn_forward_with_saved`.

    Attributes
    ----------
    name : str
        ``s5_block_{i}_ffn``.
    norm : LayerNormSaved
        ``v = LayerNorm(x)``.
    swiglu : SwigluSaved
        ``f = SwiGLU(v)``.
    dropout : DropoutSaved or None
        ``dropout(f)`` (None when no dropout was applied).
    """

    name: str
    norm: LayerNormSaved
    swiglu: SwigluSaved
    dropout: Optional[DropoutSaved]


def ffn_forward_with_saved(params: dict, x: np.ndarray, config, name: str, *, rng=None):
    """:func:`ffn_forward` that also returns what :func:`ffn_backward` needs.

    ``out = x + dropout(SwiGLU(LayerNorm(x)))``.

    Parameters
    ----------
    params : dict
        Reads ``{name}_norm``, ``{name}_gate``, ``{name}_up``, ``{name}_down``.
    x : ndarray ``[..., H]``
    config : S5Config
    name : str
        ``s5_block_{i}_ffn``.
    rng : numpy Generator, optional
        Dropout source (training); None: no dropout.

    Returns
    -------
    out : ndarray ``[..., H]``
    saved : FfnSaved

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=4, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4))
    >>> out, s = ffn_forward_with_saved(p, x, c, "s5_block_1_ffn")
    >>> dx, frag = ffn_backward(np.ones_like(out), s)
    >>> dx.shape, sorted(frag), frag["s5_block_1_ffn_down"]["kernel"].shape
    ((2, 3, 4), ['s5_block_1_ffn_down', 's5_block_1_ffn_gate', 's5_block_1_ffn_norm', 's5_block_1_ffn_up'], (16, 4))
    """
    c = as_config(config)
    v, s_norm = norm_forward(params, x, c, f"{name}_norm")                # [..., H]
    f, s_swiglu = swiglu_forward(v, params[f"{name}_gate"], params[f"{name}_up"],
                                 params[f"{name}_down"])                  # [..., H]
    r, s_drop = _dropout(f, c, rng)
    return x + r, FfnSaved(name, s_norm, s_swiglu, s_drop)


def ffn_backward(d_out: np.ndarray, saved: FfnSaved):
    """Backward of :func:`ffn_forward_with_saved`: dropout, SwiGLU, LayerNorm, plus the residual.

    Parameters
    ----------
    d_out : ndarray ``[..., H]``
    saved : FfnSaved

    Returns
    -------
    dx : ndarray ``[..., H]``
        Gradient of the sub-layer's input, residual included.
    fragment : dict
        ``{name}_norm`` (``gamma``, ``beta``) and ``{name}_gate``, ``{name}_up``,
        ``{name}_down`` (``kernel``, ``bias``).

    Examples
    --------
    See :func:`ffn_forward_with_saved`.
    """
    name = saved.name
    df = _dropout_backward(d_out, saved.dropout)
    g = swiglu_backward(df, saved.swiglu)
    frag = {f"{name}_gate": g["gate"], f"{name}_up": g["up"], f"{name}_down": g["down"]}
    dx, f = norm_backward(g["x"], saved.norm, f"{name}_norm")
    _merge_grads(frag, f)
    return d_out + dx, frag


class S5BlockSaved(NamedTuple):
    """Saved by :func:`s5_block_forward_with_saved`.

    Attributes
    ----------
    layer_idx : int
        1-based (the layer names ``s5_block_{layer_idx}_*``).
    ssm : MimoSsmSaved
    ffn : FfnSaved
    """

    layer_idx: int
    ssm: MimoSsmSaved
    ffn: FfnSaved


def s5_block_forward_with_saved(params: dict, x: np.ndarray, config, layer_idx: int, h0=None,
                                *, engine: str = "numpy", rng=None):
    """:func:`s5_block_forward` that also returns what :func:`s5_block_backward` needs.

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, H]``
    config : S5Config
    layer_idx : int
        1-based.
    h0 : ndarray, optional
        This layer's state (see :func:`mimo_ssm_forward`).
    engine : str
    rng : numpy Generator, optional
        Dropout source (training): the SSM sub-layer's mask, then the FFN's.

    Returns
    -------
    out : ndarray ``[batch, seq_len, H]``
    h_last : ndarray or None
    saved : S5BlockSaved

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=3, num_layers=2, preset="edifice")
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 4))
    >>> out, h, s = s5_block_forward_with_saved(p, x, c, 2)
    >>> bool(np.array_equal(out, s5_block_forward(p, x, c, 2)[0]))
    True
    >>> dx, dh0, frag = s5_block_backward(np.ones_like(out), None, s, c)
    >>> dx.shape, dh0.shape, len(frag)
    ((2, 5, 4), (2, 4, 3), 8)
    """
    b = _block_name(layer_idx)
    x, h_last, s_ssm = mimo_ssm_forward_with_saved(params, x, config, f"{b}_ssm", h0,
                                                   engine=engine, rng=rng)
    out, s_ffn = ffn_forward_with_saved(params, x, config, f"{b}_ffn", rng=rng)
    return out, h_last, S5BlockSaved(int(layer_idx), s_ssm, s_ffn)


def s5_block_backward(d_out: np.ndarray, d_h_last: Optional[np.ndarray], saved: S5BlockSaved,
                      config):
    """Backward of :func:`s5_block_forward_with_saved`: the FFN sub-layer, then the SSM's.

    Parameters
    ----------
    d_out : ndarray ``[batch, seq_len, H]``
    d_h_last : ndarray or None
        Gradient of the returned state (None: zero).
    saved : S5BlockSaved
    config : S5Config

    Returns
    -------
    dx : ndarray ``[batch, seq_len, H]``
        Gradient of the block's input (residuals included).
    d_h0 : ndarray or None
        Gradient of the incoming state (None if bidirectional).
    fragment : dict
        The block's layers of the parameter-gradient tree.

    Examples
    --------
    See :func:`s5_block_forward_with_saved`.
    """
    dx, frag = ffn_backward(d_out, saved.ffn)
    dx, d_h0, g = mimo_ssm_backward(dx, d_h_last, saved.ssm, config)
    _merge_grads(frag, g)
    return dx, d_h0, frag


def mimo_ssm_forward(params: dict, x: np.ndarray, config, name: str, h0=None, *,
                     engine: str = "numpy", rng=None):
    """The SSM sub-layer over a sequence, with its residual: ``(x + dropout(act(SSM(LN(x)))), h_last)``.

    :func:`mimo_ssm_forward_with_saved` without the saved values.

    Parameters
    ----------
    params : dict
        The model's tree (layers ``{name}_*``).
    x : ndarray ``[batch, seq_len, H]``
    config : S5Config
    name : str
        ``s5_block_{i}_ssm``.
    h0 : ndarray, optional
        ``[batch, Ps]`` complex (``s5``) or ``[batch, H, N]`` (``edifice``).
    engine : str
    rng : numpy Generator, optional
        Dropout source (training); None: no dropout.

    Returns
    -------
    out : ndarray ``[batch, seq_len, H]``
    h_last : ndarray
        The SSM state after the last frame (None if bidirectional).

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=4, num_layers=1)
    >>> params = build(c, seed=0).params
    >>> out, h = mimo_ssm_forward(params, np.ones((2, 3, 4)), c, "s5_block_1_ssm")
    >>> out.shape, h.shape
    ((2, 3, 4), (2, 2))
    """
    out, h_last, _ = mimo_ssm_forward_with_saved(params, x, config, name, h0, engine=engine,
                                                 rng=rng)
    return out, h_last


def ffn_forward(params: dict, x: np.ndarray, config, name: str, *, rng=None) -> np.ndarray:
    """The feed-forward sub-layer with its residual: ``x + dropout(SwiGLU(LN(x)))``.

    :func:`ffn_forward_with_saved` without the saved values.

    Parameters
    ----------
    x : ndarray ``[..., H]``
    name : str
        ``s5_block_{i}_ffn``.

    Returns
    -------
    ndarray ``[..., H]``

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=4, num_layers=1)
    >>> ffn_forward(build(c, seed=0).params, np.ones((2, 4)), c, "s5_block_1_ffn").shape
    (2, 4)
    """
    return ffn_forward_with_saved(params, x, config, name, rng=rng)[0]


def s5_block_forward(params: dict, x: np.ndarray, config, layer_idx: int, h0=None, *,
                     engine: str = "numpy", rng=None):
    """One S5 block (SSM sub-layer then FFN sub-layer, each with its residual).

    :func:`s5_block_forward_with_saved` without the saved values.

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, H]``
    config : S5Config
    layer_idx : int
        1-based.
    h0 : ndarray, optional
        This layer's state (see :func:`mimo_ssm_forward`).

    Returns
    -------
    out : ndarray ``[batch, seq_len, H]``
    h_last : ndarray or None

    Examples
    --------
    >>> c = S5Config(embed_dim=4, hidden_size=4, state_size=4, num_layers=2)
    >>> out, h = s5_block_forward(build(c, seed=0).params, np.ones((1, 3, 4)), c, 2)
    >>> out.shape
    (1, 3, 4)
    """
    out, h_last, _ = s5_block_forward_with_saved(params, x, config, layer_idx, h0,
                                                 engine=engine, rng=rng)
    return out, h_last


def _check_x(x, c: S5Config, name="x"):
    x = as_float_array(x, name, ndim=3)
    if x.shape[2] != c.embed_dim:
        raise ValueError(f"{name}: expected last axis embed_dim={c.embed_dim} "
                         f"([batch, seq_len, embed_dim]), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected batch >= 1 and seq_len >= 1, got shape {x.shape}")
    return x.astype(np.float64, copy=False)


# ---------------------------------------------------------------------------
# The model: forward, forward_with_saved, backward
# ---------------------------------------------------------------------------

class S5ModelSaved(NamedTuple):
    """What :func:`forward_with_saved` keeps for :func:`backward`.

    (Named apart from :class:`refssm.ssm.s5.S5Saved`, the SSM core's.)

    Attributes
    ----------
    config : S5Config
    input_projection : DenseSaved or None
        None when ``embed_dim == hidden_size`` (no projection).
    blocks : tuple of S5BlockSaved
        One per layer, in order (each with its dropout masks, if any).
    final_norm : LayerNormSaved
    batch, seq_len : int
    return_sequence : bool
        The output was ``[batch, seq_len, hidden]`` (else the last timestep).
    has_state : bool
        A carried ``state`` was given (then :func:`backward` returns its gradient).
    """

    config: S5Config
    input_projection: Optional[DenseSaved]
    blocks: tuple
    final_norm: LayerNormSaved
    batch: int
    seq_len: int
    return_sequence: bool
    has_state: bool


class S5Grads(NamedTuple):
    """What :func:`backward` returns.

    Attributes
    ----------
    x : ndarray ``[batch, seq_len, embed_dim]``
        Gradient of the model input.
    params : dict
        ``{layer: {name: grad}}``, exactly the layers, names, order, shapes
        and (real) dtype of the parameter tree (:func:`param_shapes`).
    state : S5Cache or None
        Gradient of the carried initial ``state``: ``h [batch, num_layers,
        Ps]`` complex, ``dL/dRe(h) + i dL/dIm(h)`` (``s5``), or ``[batch,
        num_layers, H, N]`` real (``edifice``); None when
        :func:`forward_with_saved` was called without one.
    """

    x: np.ndarray
    params: dict
    state: Optional[S5Cache]


def _forward(params: dict, x, c: S5Config, state, return_sequence: bool, training: bool, seed,
             engine: str, caller: str):
    """The model over a sequence: ``(S5Output, S5ModelSaved)``; :func:`forward` and
    :func:`forward_with_saved` are this one function."""
    _ssm_engine_ok(c, engine)
    x = _check_x(x, c)
    params = check_params(params, param_shapes(c))
    batch, seq_len = x.shape[:2]
    if c.bidirectional:
        if state is not None:
            raise ValueError("state: a bidirectional S5 is not causal and carries no state; "
                             "expected state=None")
        h = None
    else:
        h = init_cache(c, batch).h if state is None else _check_cache(state, c, batch).h
    rng = None
    if training and c.dropout > 0:
        if seed is None:
            raise ValueError(f"{caller}: training=True with dropout > 0 needs seed (int or "
                             f"numpy Generator), got None")
        rng = _rng(seed)
    s_input = None
    if "input_projection" in params:
        x, s_input = dense_layer_forward(params, x, "input_projection")   # [batch, L, H]
    hidden_states = [x]
    new_h = None if h is None else np.empty_like(h)
    blocks = []
    for i in range(1, c.num_layers + 1):
        x, h_last, s_block = s5_block_forward_with_saved(
            params, x, c, i, None if h is None else h[:, i - 1], engine=engine, rng=rng)
        blocks.append(s_block)
        if new_h is not None:
            new_h[:, i - 1] = h_last                                       # this layer's own state
        hidden_states.append(x)
    x, s_final = norm_forward(params, x, c, "final_norm")
    output = x if return_sequence else x[:, -1]
    result = S5Output(output, None if new_h is None else S5Cache(new_h), tuple(hidden_states))
    saved = S5ModelSaved(c, s_input, tuple(blocks), s_final, batch, seq_len,
                         bool(return_sequence), state is not None)
    return result, saved


def forward(params: dict, x, config=None, *, state: Optional[S5Cache] = None,
            return_sequence: bool = False, training: bool = False, seed=None,
            engine: str = "numpy") -> S5Output:
    """The model over a sequence (or a chunk of one, given the previous ``state``).

    Parameters
    ----------
    params : dict
        The parameter tree (:func:`param_shapes`).
    x : ndarray ``[batch, seq_len, embed_dim]``
    config : S5Config or dict
    state : S5Cache, optional
        State after the frames before ``x`` (fresh if omitted). Chunks, each
        with the previous call's state, give the numbers of one call.
    return_sequence : bool
        Return ``[batch, seq_len, hidden]`` instead of the last timestep.
    training : bool
        Apply dropout (rate ``config.dropout``, after each SSM and each
        SwiGLU); needs ``seed``. Off by default.
    seed : int or numpy Generator
        Source of the dropout masks (drawn in order, per call).
    engine : {"numpy", "numba", "logdepth", "fft", "fft_dense"}
        The S5 core's engine (``edifice``: the selective scan's
        ``numpy``/``numba``/``logdepth``).

    Returns
    -------
    S5Output
        ``(output, state, hidden_states)``.

    Raises
    ------
    ValueError
        Wrong ``x`` shape, parameters not matching the config, a state from
        another config, a state for a bidirectional model, training without a
        seed, an unknown engine.

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=4, num_layers=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((1, 7, 3))
    >>> full = forward(model.params, x, model.config, return_sequence=True)
    >>> a = forward(model.params, x[:, :4], model.config, return_sequence=True)
    >>> b = forward(model.params, x[:, 4:], model.config, state=a.state, return_sequence=True)
    >>> bool(np.allclose(np.concatenate([a.output, b.output], 1), full.output, rtol=0, atol=1e-13))
    True
    """
    return _forward(params, x, as_config(config), state, return_sequence, training, seed,
                    engine, "forward")[0]


def forward_with_saved(params: dict, x, config=None, *, state: Optional[S5Cache] = None,
                       return_sequence: bool = False, training: bool = False, seed=None,
                       engine: str = "numpy"):
    """:func:`forward` that also keeps, per layer, the named values :func:`backward` needs.

    Same arguments and the same numbers as :func:`forward` (it is the same
    computation; dropout included: the same ``seed`` draws the same masks,
    and the masks are saved).

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, embed_dim]``
    config : S5Config or dict
    state : S5Cache, optional
        Carried state (then :func:`backward` also returns its gradient).
    return_sequence : bool
    training : bool
        Dropout after each SSM and each SwiGLU (rate ``config.dropout``, needs
        ``seed``); its masks are saved and used by the backward.
    seed : int or numpy Generator
    engine : {"numpy", "numba", "logdepth", "fft", "fft_dense"}
        The SSM's engine (``edifice``: ``numpy``/``numba``/``logdepth``); its
        backward is used by :func:`backward`.

    Returns
    -------
    result : S5Output
        ``(output, state, hidden_states)``, as :func:`forward`.
    saved : S5ModelSaved

    Raises
    ------
    ValueError
        As :func:`forward`.

    Examples
    --------
    The gradient of the scalar loss ``sum(W * output)``:

    >>> c = S5Config(embed_dim=3, hidden_size=8, state_size=4, num_layers=2)
    >>> params = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 3))
    >>> res, saved = forward_with_saved(params, x, c)
    >>> W = np.random.default_rng(1).standard_normal(res.output.shape)
    >>> grads = backward(W, saved)
    >>> grads.x.shape, grads.state, list(grads.params) == list(params)
    ((2, 5, 3), None, True)
    >>> grads.params["s5_block_1_ssm_ssm"]["B"].shape, grads.params["s5_block_1_ssm_ssm"]["B"].dtype
    ((2, 8, 2), dtype('float64'))

    It agrees with a central finite difference of :func:`forward` along a direction ``V``:

    >>> V = np.random.default_rng(2).standard_normal(x.shape)
    >>> loss = lambda x_: float(np.sum(W * forward(params, x_, c).output))
    >>> fd = (loss(x + 1e-6 * V) - loss(x - 1e-6 * V)) / 2e-6
    >>> bool(abs(fd - np.sum(grads.x * V)) <= 1e-8 * abs(fd))
    True

    and along a direction in the SSM's eigenvalues (``Lambda_re``, real parameters: the
    complex ``Lambda`` is stored as ``Lambda_re``, ``Lambda_im``):

    >>> v = np.random.default_rng(3).standard_normal(2)
    >>> def loss_lam(t):
    ...     p = {k: dict(d) for k, d in params.items()}
    ...     p["s5_block_1_ssm_ssm"]["Lambda_re"] = params["s5_block_1_ssm_ssm"]["Lambda_re"] + t * v
    ...     return float(np.sum(W * forward(p, x, c).output))
    >>> fd = (loss_lam(1e-4) - loss_lam(-1e-4)) / 2e-4
    >>> bool(abs(fd - np.sum(grads.params["s5_block_1_ssm_ssm"]["Lambda_re"] * v)) <= 1e-7 * abs(fd))
    True
    """
    return _forward(params, x, as_config(config), state, return_sequence, training, seed,
                    engine, "forward_with_saved")


def _check_d_state(d_state, c: S5Config, batch: int):
    """``d_state`` as the ``h`` gradient (or None), with the cache's shape."""
    if d_state is not None and c.bidirectional:
        raise ValueError("d_state: a bidirectional S5 returns no state, so there is no "
                         "gradient of it to take; expected d_state=None")
    layout = ("[batch, num_layers, Ps] (complex: dL/dRe + i dL/dIm)" if c.ssm == "s5"
              else "[batch, num_layers, hidden, state]")
    (h,) = state_gradients(d_state, "an S5Cache (h,)", (("h", _state_shape(c, batch), layout),),
                           allow_complex=(c.ssm == "s5"))
    return h


def backward(d_out, saved: S5ModelSaved, *, d_state: Optional[S5Cache] = None) -> S5Grads:
    """Manual backward of the whole model: gradients of a scalar loss from those of the outputs.

    Given ``d_out = dLoss/d output`` (and optionally ``d_state = dLoss/d
    state``, the returned carried state, for a loss on it or to backpropagate
    through the next chunk), returns ``dLoss/dx``, ``dLoss/dparams`` in the
    tree's layout, and ``dLoss/d state_in`` when a carried state was given.
    Runs the forward's equations in reverse: final norm, then per block (last
    first) the FFN sub-layer and the SSM sub-layer (each: dropout with the
    saved mask, the branch, the LayerNorm, plus the residual), then the input
    projection.

    Complex quantities (the ``s5`` state and its gradients) use
    ``dL/dRe(h) + i dL/dIm(h)``; the parameter gradients are real, as the
    parameters (``Lambda_re``, ``Lambda_im``; ``B``, ``C`` as ``[..., (re, im)]``).

    Parameters
    ----------
    d_out : ndarray
        ``[batch, hidden]`` (last timestep) or ``[batch, seq_len, hidden]``
        (``return_sequence``), as the forward's output.
    saved : S5ModelSaved
        From :func:`forward_with_saved` (its engine's backward is used).
    d_state : S5Cache, optional
        Gradient of the returned state: ``h [batch, num_layers, Ps]``
        complex (``s5``) or ``[batch, num_layers, H, N]`` (``edifice``); None
        (or ``h`` None) means zero. Not for a bidirectional model.

    Returns
    -------
    S5Grads
        ``(x, params, state)``: ``x [batch, seq_len, embed_dim]``; ``params``
        with exactly the layers and names of the parameter tree; ``state``
        an :class:`S5Cache` of gradients, or None without a carried state.

    Raises
    ------
    ValueError
        ``saved`` not from :func:`forward_with_saved`; ``d_out`` or
        ``d_state`` of the wrong shape, or not finite.

    Examples
    --------
    Processing in chunks and backpropagating through the carried state gives
    the one-call gradients:

    >>> c = S5Config(embed_dim=3, hidden_size=8, state_size=4, num_layers=2)
    >>> params = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((1, 6, 3))
    >>> W = np.random.default_rng(1).standard_normal((1, 6, 8))
    >>> full, s = forward_with_saved(params, x, c, return_sequence=True)
    >>> g = backward(W, s)
    >>> a, sa = forward_with_saved(params, x[:, :4], c, return_sequence=True)
    >>> b, sb = forward_with_saved(params, x[:, 4:], c, state=a.state, return_sequence=True)
    >>> gb = backward(W[:, 4:], sb)
    >>> ga = backward(W[:, :4], sa, d_state=gb.state)
    >>> dx = np.concatenate([ga.x, gb.x], axis=1)
    >>> bool(np.allclose(dx, g.x, rtol=0, atol=1e-13))
    True
    >>> gb.state.h.shape, gb.state.h.dtype
    ((1, 2, 2), dtype('complex128'))
    """
    dx = output_gradient(d_out, saved, S5ModelSaved)  # [batch, L, H]
    c = saved.config
    batch = saved.batch
    d_h = _check_d_state(d_state, c, batch)
    dparams = {}
    # --- output ---------------------------------------------------------------
    dx, g = norm_backward(dx, saved.final_norm, "final_norm")
    _merge_grads(dparams, g)
    # --- blocks, last first: x_i = block_i(x_{i-1}) (residuals inside) -------
    dh0 = None
    if saved.has_state:
        dh0 = np.zeros(_state_shape(c, batch), np.complex128 if c.ssm == "s5" else np.float64)
    for i in range(c.num_layers, 0, -1):
        dx, d_h0_i, g = s5_block_backward(dx, None if d_h is None else d_h[:, i - 1],
                                          saved.blocks[i - 1], c)
        _merge_grads(dparams, g)
        if dh0 is not None:
            dh0[:, i - 1] = d_h0_i
    if saved.input_projection is not None:
        dx, g = dense_layer_backward(dx, saved.input_projection, "input_projection")
        _merge_grads(dparams, g)
    tree = grad_tree(dparams, param_shapes(c))                            # the params' order
    return S5Grads(dx, tree, None if dh0 is None else S5Cache(dh0))


# ---------------------------------------------------------------------------
# Step: one frame, O(1) in the sequence length
# ---------------------------------------------------------------------------

def _mimo_ssm_step(params: dict, frame: np.ndarray, h: np.ndarray, c: S5Config, name: str):
    """One frame of the SSM sub-layer: ``[batch, H]`` in, ``(out [batch, H], h)``."""
    u = _layer_norm(params[f"{name}_norm"], frame, c)
    if c.ssm == "s5":
        y, h = core.s5_ssm_step(params[f"{name}_ssm"], u, h, discretization=c.discretization,
                                conj_sym=c.conj_sym, clip_eigs=c.clip_eigs,
                                step_rescale=c.step_rescale)
    else:
        B = _dense(params[f"{name}_b_proj"], u)                         # [batch, N]
        C = _dense(params[f"{name}_c_proj"], u)
        d = _dense(params[f"{name}_d_proj"], u)                         # [batch, H]
        A_bar = np.exp(EDIFICE_DT * _edifice_A(c))                      # [H, N]
        h = A_bar * h + (EDIFICE_DT * B)[:, None, :] * u[:, :, None]    # [batch, H, N]
        y = np.sum(C[:, None, :] * h, axis=-1) + d
    return frame + _activation(y, c), h


def step(params: dict, cache: S5Cache, frame, config=None):
    """Advance the model by one frame: ``[batch, embed_dim]`` in, ``[batch, hidden]`` out.

    O(1) in the sequence length: reads and writes only ``cache`` (each
    layer's own SSM state). Stepping through a sequence gives, at every
    frame, the full :func:`forward`'s output at that timestep.

    Parameters
    ----------
    params : dict
    cache : S5Cache
        From :func:`init_cache`, a previous :func:`step` or :func:`forward`'s ``state``.
    frame : ndarray ``[batch, embed_dim]``
    config : S5Config or dict

    Returns
    -------
    y : ndarray ``[batch, hidden]``
    cache : S5Cache
        The new state (the input cache is not modified).

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=4, num_layers=3, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 3))
    >>> cache = model.init_cache(batch_size=2)
    >>> for t in range(5):
    ...     y, cache = model.step(cache, x[:, t])
    >>> bool(np.allclose(y, model(x), rtol=0, atol=1e-13))
    True
    """
    c = as_config(config)
    if c.bidirectional:
        raise ValueError("step: a bidirectional S5 is not causal (its backward pass reads the "
                         "future) and cannot be stepped; expected bidirectional=False")
    frame = as_float_array(frame, "frame", ndim=2).astype(np.float64, copy=False)
    if frame.shape[1] != c.embed_dim:
        raise ValueError(f"frame: expected shape (batch, {c.embed_dim}) [batch, embed_dim], "
                         f"got {frame.shape}")
    params = check_params(params, param_shapes(c))
    cache = _check_cache(cache, c, frame.shape[0])
    x = _dense(params["input_projection"], frame) if "input_projection" in params else frame
    new_h = np.empty_like(cache.h)
    for i in range(1, c.num_layers + 1):
        b = _block_name(i)
        x, new_h[:, i - 1] = _mimo_ssm_step(params, x, cache.h[:, i - 1], c, f"{b}_ssm")
        x = ffn_forward(params, x, c, f"{b}_ffn")
    return _layer_norm(params["final_norm"], x, c), S5Cache(new_h)
