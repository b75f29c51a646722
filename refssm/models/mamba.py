"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", arXiv:2312.00752), the whole model: config, parameters,
forward, O(1) stepping, exact parameter count.

The model (DESIGN.md sections 1 and 1.1)::

    x [batch, seq_len, embed_dim]
      -> input_projection                 dense embed_dim -> hidden (only if they differ)
      -> x = x + mamba_block_i(x)         i = 1 .. num_layers (dropout between blocks, training only)
      -> final_norm                       (mamba_ssm preset: the official norm_f)
      -> last timestep [batch, hidden]    (or the whole sequence)

    mamba_block(x):                                            shapes
        u         = norm(x)                                    [batch, L, hidden]
        xs, z     = split(in_proj(u))                          [batch, L, inner] each, inner = expand*hidden
        xs        = silu(causal_depthwise_conv1d(xs))          kernel conv_size, left-padded
        dt, B, C  = ssm projections of xs                      dt [.., dt_rank], B, C [.., N]
        delta     = softplus(dt_proj(dt))                      [batch, L, inner]   (edifice: clipped)
        A         = -exp(A_log)                                [inner, N]          (edifice: -(1..N))
        A_bar     = exp(delta * A)                             eq. 4 (ZOH of A)
        h_t       = A_bar_t * h_{t-1} + (delta_t * B_t) * xs_t eq. 2a  (edifice: mean_c(delta_t))
        y_t       = C_t . h_t + D * xs_t                       eq. 2b  (edifice: no D)
        out       = out_proj(y * silu(z))                      [batch, L, hidden]

Two conventions ("presets", each a bundle of plain flags, every flag also
settable on its own; see :data:`PRESETS`):

``mamba_ssm`` (default)
    The official module (state-spaces/mamba ``mamba_ssm/modules/mamba_simple.py``)
    inside the official / transformers residual stack (``MambaModel``): RMSNorm
    and a final ``norm_f``, learned ``A_log``, ``D`` skip, one ``x_proj`` without
    bias, ``dt_rank = ceil(hidden/16)``, no bias on ``in_proj``/``out_proj``.
``edifice``
    The Elixir library Edifice v0.2 (``lib/edifice/ssm/common.ex``,
    ``mamba.ex``): LayerNorm and no final norm, fixed ``A = -(1..N)``, no ``D``,
    split ``bc_proj``/``dt_rank`` projections with biases, ``dt_rank =
    max(hidden div 16, 1)``, ``delta`` clipped to ``[0.001, 0.1]``, the channel
    mean of ``delta`` in ``B_bar``, biases everywhere, Axon's initialisers.

Parameters are ``params[layer][name]`` with the original API's layer names
(``mamba_block_1_in_proj``, ...) and Axon's layouts (dense ``kernel [in, out]``,
depthwise conv ``kernel [conv_size, 1, channels]``); see :func:`param_shapes`.
Converters to and from the official / transformers ``state_dict`` live in
:mod:`refssm.convert.mamba`.

The carried state (:class:`MambaCache`) has Edifice's ``init_state`` layout:
``h [batch, num_layers, inner, N]`` and ``conv [batch, num_layers, conv_size-1,
inner]``. :func:`forward` takes one and returns the next, so a long sequence
can be processed in chunks; :func:`step` advances it one frame in O(1) with the
same numbers as the full forward (both checked in ``tests/test_mamba.py``).

Manual backward (llm.c-style, DESIGN.md section 3): :func:`forward_with_saved`
returns the output and, per layer, the minimal named values each equation
keeps (:class:`MambaSaved`); :func:`backward` turns the gradient of the output
(and of the returned state) into the gradients of the input, of every
parameter (in the tree's layout) and of the carried state. Each equation of
the block has its ``*_forward``/``*_backward`` pair side by side
(:func:`norm_forward`, :func:`in_proj_forward`, :func:`conv_silu_forward`,
:func:`ssm_projections_forward`, :func:`ssm_scan_forward`,
:func:`dense_layer_forward`). Checked in ``tests/test_mamba_backward.py``
against central finite differences, torch autograd and across scan engines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import numpy as np

from .._validate import as_float_array
from ._common import (_merge_grads, dense_layer_backward, dense_layer_forward, grad_tree,
                      output_gradient, state_gradients)
from ..ops.activations import (ActivationSaved, inverse_softplus, silu_backward, silu_forward,
                               softplus_forward)
from ..ops.conv import (ConvSaved, causal_depthwise_conv1d_backward,
                        causal_depthwise_conv1d_forward, causal_depthwise_conv1d_step)
from ..ops.dense import DenseSaved, dense_forward
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.norms import layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward
from ..ssm.selective_scan import (ENGINES, SelectiveScanSaved, selective_scan_backward,
                                  selective_scan_forward)
from ._common import (_bool, _choice, _float, _positive_int, _rng, check_params, count_params,
                      glorot_uniform, torch_uniform)

__all__ = [
    "MambaConfig", "PRESETS", "FLAGS", "MambaCache", "MambaOutput", "MambaModel",
    "build", "build_mamba_block", "build_selective_ssm", "build_selective_ssm_parallel",
    "build_depthwise_conv1d",
    "forward", "mamba_block_forward", "selective_ssm_forward",
    "init_cache", "step", "mamba_block_step", "selective_ssm_step",
    "output_size", "param_count", "param_count_breakdown", "original_param_count",
    "original_param_count_terms",
    "param_shapes", "random_params", "recommended_defaults", "as_config",
    # manual backward (llm.c-style)
    "forward_with_saved", "backward", "MambaSaved", "MambaGrads",
    "mamba_block_forward_with_saved", "mamba_block_backward", "MambaBlockSaved",
    "norm_forward", "norm_backward", "in_proj_forward", "in_proj_backward",
    "conv_silu_forward", "conv_silu_backward", "ConvSiluSaved",
    "ssm_projections_forward", "ssm_projections_backward", "ProjectionsSaved",
    "ssm_scan_forward", "ssm_scan_backward", "ScanSaved",
    "dense_layer_forward", "dense_layer_backward",
]

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

#: The presets: named bundles of flags (DESIGN.md section 1.1's table).
PRESETS = {
    "mamba_ssm": dict(norm="rms", final_norm=True, a_param="learned", d_skip=True,
                      x_proj="fused", dt_rank="ceil", delta_clip=None, b_bar="per_channel",
                      proj_bias=False, conv_bias=True, init="official"),
    "edifice": dict(norm="layer", final_norm=False, a_param="fixed", d_skip=False,
                    x_proj="split", dt_rank="floor", delta_clip=(0.001, 0.1),
                    b_bar="channel_mean", proj_bias=True, conv_bias=True, init="glorot"),
}

#: Every flag with its meaning (values: first the ``mamba_ssm`` one).
FLAGS = {
    "norm": "'rms' (RMSNorm, gamma) or 'layer' (LayerNorm, gamma and beta); eps = norm_eps",
    "final_norm": "bool: a norm (of the same kind) after the last block",
    "a_param": "'learned' (A = -exp(A_log), A_log a parameter) or 'fixed' (A = -(1..N))",
    "d_skip": "bool: the D * xs skip of eq. 2b (D a parameter)",
    "x_proj": "'fused' (one x_proj: inner -> dt_rank + 2N, no bias) or "
              "'split' (bc_proj: inner -> 2N and dt_rank: inner -> dt_rank, with biases)",
    "dt_rank": "'ceil' (ceil(hidden/16)), 'floor' (max(hidden div 16, 1)) or a positive int",
    "delta_clip": "None or (lo, hi): delta = clip(softplus(.), lo, hi)",
    "b_bar": "'per_channel' (B_bar = delta_c * B) or 'channel_mean' (B_bar = mean_c(delta) * B)",
    "proj_bias": "bool: biases on in_proj and out_proj",
    "conv_bias": "bool: bias on the depthwise conv",
    "init": "'official' (mamba_simple.py / torch defaults) or 'glorot' (Axon: glorot-uniform "
            "kernels, zero biases)",
}

_SIZES = dict(hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2)
_OTHER = dict(dropout=0.0, window_size=60, seq_len=None, norm_eps=1e-5,
              dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4)


@dataclass(frozen=True, init=False)
class MambaConfig:
    """Mamba options: the original API's names and defaults, plus the preset flags.

    Parameters
    ----------
    embed_dim : int
        Size of each input frame (required).
    hidden_size : int, default 256
        Model width D (the residual stream).
    state_size : int, default 16
        SSM state size N.
    expand_factor : int, default 2
        ``inner = expand_factor * hidden_size``.
    conv_size : int, default 4
        Depthwise conv kernel size.
    num_layers : int, default 2
    dropout : float, default 0.0
        Dropout rate between blocks (applied only when ``training=True``).
    window_size : int, default 60
        Expected sequence length (the original API's JIT hint).
    seq_len : int, optional
        Defaults to ``window_size``, as in the original API. Informational:
        :func:`forward` accepts any length.
    preset : {"mamba_ssm", "edifice"}, default "mamba_ssm"
        Fills every flag of :data:`FLAGS` not given explicitly.
    norm, final_norm, a_param, d_skip, x_proj, dt_rank, delta_clip, b_bar, proj_bias, conv_bias, init
        The flags (see :data:`FLAGS`); each overrides its preset value.
    norm_eps : float, default 1e-5
    dt_min, dt_max, dt_init_floor : float, default 1e-3, 1e-1, 1e-4
        Official initialisation of ``dt_proj.bias``: ``softplus^-1(dt)``, ``dt``
        log-uniform in ``[dt_min, dt_max]`` floored at ``dt_init_floor``.

    Raises
    ------
    ValueError
        Missing ``embed_dim``, an unknown option or preset, or a bad value; the
        message names what was expected and what came.

    Examples
    --------
    >>> cfg = MambaConfig(embed_dim=8, hidden_size=32, preset="edifice", d_skip=True)
    >>> cfg.norm, cfg.d_skip, cfg.inner_size, cfg.dt_rank_size, cfg.seq_len
    ('layer', True, 64, 2, 60)
    >>> MambaConfig(embed_dim=8, presett="edifice")
    Traceback (most recent call last):
    ...
    ValueError: unknown Mamba option(s) ['presett']; expected some of ['a_param', 'b_bar', 'conv_bias', 'conv_size', 'd_skip', 'delta_clip', 'dropout', 'dt_init_floor', 'dt_max', 'dt_min', 'dt_rank', 'embed_dim', 'expand_factor', 'final_norm', 'hidden_size', 'init', 'norm', 'norm_eps', 'num_layers', 'preset', 'proj_bias', 'seq_len', 'state_size', 'window_size', 'x_proj']
    """

    embed_dim: int
    hidden_size: int
    state_size: int
    expand_factor: int
    conv_size: int
    num_layers: int
    dropout: float
    window_size: int
    seq_len: int
    preset: str
    norm: str
    final_norm: bool
    a_param: str
    d_skip: bool
    x_proj: str
    dt_rank: object
    delta_clip: Optional[tuple]
    b_bar: str
    proj_bias: bool
    conv_bias: bool
    init: str
    norm_eps: float
    dt_min: float
    dt_max: float
    dt_init_floor: float

    def __init__(self, embed_dim=None, *, preset="mamba_ssm", **opts):
        known = {f.name for f in fields(MambaConfig)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown Mamba option(s) {unknown}; expected some of {sorted(known)}")
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {tuple(PRESETS)}, got {preset!r}")
        if embed_dim is None:
            raise ValueError("embed_dim: required (the size of each input frame), got None")
        values = {**_SIZES, **_OTHER, **PRESETS[preset], **opts}
        set_ = lambda k, v: object.__setattr__(self, k, v)   # noqa: E731  (frozen dataclass)
        set_("embed_dim", _positive_int(embed_dim, "embed_dim"))
        for k in _SIZES:
            set_(k, _positive_int(values[k], k))
        set_("dropout", _float(values["dropout"], "dropout", 0.0, 1.0, hi_open=True))
        set_("window_size", _positive_int(values["window_size"], "window_size"))
        seq_len = values["seq_len"]
        set_("seq_len", self.window_size if seq_len is None else _positive_int(seq_len, "seq_len"))
        set_("preset", preset)
        set_("norm", _choice(values["norm"], "norm", ("rms", "layer")))
        set_("final_norm", _bool(values["final_norm"], "final_norm"))
        set_("a_param", _choice(values["a_param"], "a_param", ("learned", "fixed")))
        set_("d_skip", _bool(values["d_skip"], "d_skip"))
        set_("x_proj", _choice(values["x_proj"], "x_proj", ("fused", "split")))
        rank = values["dt_rank"]
        if isinstance(rank, str):
            rank = _choice(rank, "dt_rank", ("ceil", "floor"))
        else:
            rank = _positive_int(rank, "dt_rank ('ceil', 'floor' or an integer)")
        set_("dt_rank", rank)
        clip = values["delta_clip"]
        if clip is not None:
            try:
                lo, hi = clip
            except (TypeError, ValueError):
                raise ValueError(f"delta_clip: expected None or (lo, hi), got {clip!r}") from None
            lo = _float(lo, "delta_clip[0]", 0.0)
            hi = _float(hi, "delta_clip[1]", lo)
            clip = (lo, hi)
        set_("delta_clip", clip)
        set_("b_bar", _choice(values["b_bar"], "b_bar", ("per_channel", "channel_mean")))
        set_("proj_bias", _bool(values["proj_bias"], "proj_bias"))
        set_("conv_bias", _bool(values["conv_bias"], "conv_bias"))
        set_("init", _choice(values["init"], "init", ("official", "glorot")))
        set_("norm_eps", _float(values["norm_eps"], "norm_eps", 0.0, lo_open=True))
        set_("dt_min", _float(values["dt_min"], "dt_min", 0.0, lo_open=True))
        set_("dt_max", _float(values["dt_max"], "dt_max", self.dt_min))
        set_("dt_init_floor", _float(values["dt_init_floor"], "dt_init_floor", 0.0))

    # --- derived sizes -----------------------------------------------------
    @property
    def inner_size(self) -> int:
        """``expand_factor * hidden_size``, the width of the SSM path."""
        return self.expand_factor * self.hidden_size

    @property
    def dt_rank_size(self) -> int:
        """The resolved ``dt_rank``: ``ceil(hidden/16)``, ``max(hidden div 16, 1)`` or as given."""
        if self.dt_rank == "ceil":
            return math.ceil(self.hidden_size / 16)
        if self.dt_rank == "floor":
            return max(self.hidden_size // 16, 1)
        return int(self.dt_rank)

    def to_dict(self) -> dict:
        """Every option by name (``MambaConfig(**cfg.to_dict())`` rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "MambaConfig":
        """A copy with ``changes``; a new ``preset`` re-fills the flags not given.

        Examples
        --------
        >>> MambaConfig(embed_dim=4).replace(preset="edifice").norm
        'layer'
        """
        opts = self.to_dict()
        if "preset" in changes and changes["preset"] != self.preset:
            for flag in FLAGS:
                opts.pop(flag)
        opts.update(changes)
        return MambaConfig(**opts)


def as_config(config=None, **opts) -> MambaConfig:
    """A :class:`MambaConfig` from a config, a dict of options, or keyword options.

    Examples
    --------
    >>> as_config({"embed_dim": 3}).hidden_size
    256
    """
    if isinstance(config, MambaConfig):
        return config.replace(**opts) if opts else config
    if config is None:
        return MambaConfig(**opts)
    if isinstance(config, dict):
        return MambaConfig(**{**config, **opts})
    raise ValueError(f"config: expected a MambaConfig or a dict of options, got "
                     f"{type(config).__name__}")


def recommended_defaults() -> dict:
    """The original API's 60 fps real-time profile (``window_size`` 60).

    Examples
    --------
    >>> recommended_defaults()["window_size"]
    60
    """
    return dict(hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
                window_size=60, dropout=0.1)


def output_size(config=None, **opts) -> int:
    """Size of the model's output frame, ``hidden_size`` (``embed_dim`` not needed).

    Examples
    --------
    >>> output_size(hidden_size=64), output_size()
    (64, 256)
    """
    if isinstance(config, MambaConfig):
        return config.hidden_size
    opts = {**(config or {}), **opts}
    opts.setdefault("embed_dim", 1)
    return as_config(**opts).hidden_size


# ---------------------------------------------------------------------------
# Parameter names, shapes and exact count
# ---------------------------------------------------------------------------

def _block_name(i: int) -> str:
    return f"mamba_block_{i}"


def param_shapes(config) -> dict:
    """``{layer: {name: shape}}`` of the parameter tree for ``config``.

    Examples
    --------
    >>> shapes = param_shapes(MambaConfig(embed_dim=4, hidden_size=8, state_size=2, num_layers=1))
    >>> shapes["mamba_block_1_ssm_x_proj"], shapes["mamba_block_1_conv_dw_conv"]
    ({'kernel': (16, 5)}, {'kernel': (4, 1, 16), 'bias': (16,)})
    """
    c = as_config(config)
    H, E, N, K, R = c.hidden_size, c.inner_size, c.state_size, c.conv_size, c.dt_rank_size
    dense = lambda i, o, bias: {"kernel": (i, o), **({"bias": (o,)} if bias else {})}  # noqa: E731
    norm = {"gamma": (H,), "beta": (H,)} if c.norm == "layer" else {"gamma": (H,)}
    shapes = {}
    if c.embed_dim != H:
        shapes["input_projection"] = dense(c.embed_dim, H, True)
    for i in range(1, c.num_layers + 1):
        b = _block_name(i)
        shapes[f"{b}_norm"] = dict(norm)
        shapes[f"{b}_in_proj"] = dense(H, 2 * E, c.proj_bias)
        shapes[f"{b}_conv_dw_conv"] = {"kernel": (K, 1, E), **({"bias": (E,)} if c.conv_bias else {})}
        if c.x_proj == "fused":
            shapes[f"{b}_ssm_x_proj"] = dense(E, R + 2 * N, False)
        else:
            shapes[f"{b}_ssm_bc_proj"] = dense(E, 2 * N, True)
            shapes[f"{b}_ssm_dt_rank"] = dense(E, R, True)
        shapes[f"{b}_ssm_dt_proj"] = dense(R, E, True)
        ssm = {}
        if c.a_param == "learned":
            ssm["A_log"] = (E, N)
        if c.d_skip:
            ssm["D"] = (E,)
        if ssm:
            shapes[f"{b}_ssm"] = ssm
        shapes[f"{b}_out_proj"] = dense(E, H, c.proj_bias)
    if c.final_norm:
        shapes["final_norm"] = dict(norm)
    return shapes


def param_count_breakdown(config) -> dict:
    """The exact parameter count term by term (closed form, one entry per parameter group).

    Per layer, with ``H = hidden``, ``E = inner``, ``N = state``, ``K = conv``,
    ``R = dt_rank``::

        norm       H (RMSNorm) or 2H (LayerNorm)
        in_proj    2HE (+ 2E bias)
        conv       KE (+ E bias)
        x_proj     E(R + 2N)            fused, no bias
                   E*2N + 2N + E*R + R  split: bc_proj and dt_rank, with biases
        dt_proj    RE + E
        A_log      EN                   learned A only
        D          E                    D skip only
        out_proj   EH (+ H bias)

    plus ``input_projection`` (``embed*H + H``, only if ``embed != H``) and
    ``final_norm``. Totals are summed over layers.

    Examples
    --------
    >>> param_count_breakdown(MambaConfig(embed_dim=8, hidden_size=8, state_size=2,
    ...                                   num_layers=1))["conv"]
    80
    """
    c = as_config(config)
    H, E, N, K, R, L = (c.hidden_size, c.inner_size, c.state_size, c.conv_size, c.dt_rank_size,
                        c.num_layers)
    norm = 2 * H if c.norm == "layer" else H
    x_proj = E * (R + 2 * N) if c.x_proj == "fused" else (E * 2 * N + 2 * N) + (E * R + R)
    return {
        "input_projection": (c.embed_dim * H + H) if c.embed_dim != H else 0,
        "norm": L * norm,
        "in_proj": L * (H * 2 * E + (2 * E if c.proj_bias else 0)),
        "conv": L * (K * E + (E if c.conv_bias else 0)),
        "x_proj": L * x_proj,
        "dt_proj": L * (R * E + E),
        "A_log": L * E * N if c.a_param == "learned" else 0,
        "D": L * E if c.d_skip else 0,
        "out_proj": L * (E * H + (H if c.proj_bias else 0)),
        "final_norm": norm if c.final_norm else 0,
    }


def param_count(config=None, **opts) -> int:
    """Exact number of parameters: equals the scalars in :func:`build`'s tree.

    Examples
    --------
    >>> cfg = MambaConfig(embed_dim=8, hidden_size=16, state_size=4, num_layers=2)
    >>> param_count(cfg) == build(cfg).param_count_tree()
    True
    """
    return int(sum(param_count_breakdown(as_config(config, **opts)).values()))


def original_param_count_terms(config=None, **opts) -> dict:
    """The original API's *approximate* formula (Edifice ``Common.param_count/1``), term by term.

    The terms of ``lib/edifice/ssm/common.ex``'s formula, each summed over the
    layers, with ``H = hidden``, ``E = inner``, ``N = state``, ``K = conv`` and
    ``R' = max(H div 16, 1)`` (Edifice's ``dt_rank``, whatever the preset)::

        input_projection   embed*H         only if embed != H; no bias
        in_proj            2HE             kernel only
        conv               KE              depthwise kernel only
        bc_proj            2EN             kernel only
        dt_rank            ER'             kernel only
        dt_proj            R'E             kernel only
        out_proj           EH              kernel only

    Nothing else: no bias, no norm, no final norm, no ``A_log``, no ``D``
    (``refssm.verify.models.compare_count_terms`` sets these beside the exact
    :func:`param_count_breakdown`). Edifice reads ``:embed_dim`` (some versions
    also accept ``:embed_size``), falling back to 287 only when none is given;
    here ``embed_dim`` is always given. The values sum to
    :func:`original_param_count`.

    Examples
    --------
    >>> t = original_param_count_terms(embed_dim=287)
    >>> t["conv"], t["dt_rank"], sum(t.values()) == original_param_count(embed_dim=287)
    (4096, 16384, True)
    """
    c = as_config(config, **opts)
    H, E, N, K, L = c.hidden_size, c.inner_size, c.state_size, c.conv_size, c.num_layers
    R = max(H // 16, 1)
    return {
        "input_projection": c.embed_dim * H if c.embed_dim != H else 0,
        "in_proj": L * H * 2 * E,
        "conv": L * K * E,
        "bc_proj": L * E * 2 * N,
        "dt_rank": L * E * R,
        "dt_proj": L * R * E,
        "out_proj": L * E * H,
    }


def original_param_count(config=None, **opts) -> int:
    """The original API's *approximate* count (Edifice ``Common.param_count/1``).

    Per layer ``2HE + KE + 2EN + 2ER + EH`` with ``R = max(H div 16, 1)``, plus
    ``embed*H`` if ``embed != H``: the sum of :func:`original_param_count_terms`.
    It leaves out every bias, the norms, the final norm, ``A_log`` and ``D``,
    and always uses Edifice's split projections' ``dt_rank``;
    :func:`param_count_breakdown` has the exact terms.

    Examples
    --------
    >>> original_param_count(embed_dim=287)
    929536
    """
    return int(sum(original_param_count_terms(config, **opts).values()))


# ---------------------------------------------------------------------------
# Builders (initialised parameters)
# ---------------------------------------------------------------------------

def _dense_params(rng, n_in, n_out, bias, init):
    """``{kernel [in, out], bias [out]?}``: torch ``nn.Linear`` defaults or Axon's."""
    if init == "official":
        p = {"kernel": torch_uniform(rng, (n_in, n_out), fan_in=n_in)}
        if bias:
            p["bias"] = torch_uniform(rng, (n_out,), fan_in=n_in)
    else:
        p = {"kernel": glorot_uniform(rng, (n_in, n_out))}
        if bias:
            p["bias"] = np.zeros(n_out)
    return p


def _norm_params(config):
    H = config.hidden_size
    if config.norm == "layer":
        return {"gamma": np.ones(H), "beta": np.zeros(H)}
    return {"gamma": np.ones(H)}


def build_depthwise_conv1d(channels: int, kernel_size: int, name: str, *, bias: bool = True,
                           init: str = "official", rng=None) -> dict:
    """Parameters of a causal depthwise conv1d layer ``{name}_dw_conv``.

    Parameters
    ----------
    channels, kernel_size : int
    name : str
        Layer name prefix (``mamba_block_1_conv`` gives ``mamba_block_1_conv_dw_conv``).
    bias : bool
    init : {"official", "glorot"}
        torch ``nn.Conv1d(groups=channels)`` defaults (``U(+-1/sqrt(K))``) or
        Axon's (glorot-uniform kernel, zero bias).
    rng : numpy Generator or int seed

    Returns
    -------
    dict
        ``{f"{name}_dw_conv": {"kernel": [K, 1, channels], "bias": [channels]}}``

    Examples
    --------
    >>> p = build_depthwise_conv1d(6, 4, "blk_conv", rng=0)
    >>> {k: v.shape for k, v in p["blk_conv_dw_conv"].items()}
    {'kernel': (4, 1, 6), 'bias': (6,)}
    """
    channels = _positive_int(channels, "channels")
    kernel_size = _positive_int(kernel_size, "kernel_size")
    _choice(init, "init", ("official", "glorot"))
    rng = _rng(rng)
    shape = (kernel_size, 1, channels)
    if init == "official":      # torch: weight [C, 1, K], fan_in = 1 * K
        p = {"kernel": torch_uniform(rng, shape, fan_in=kernel_size)}
        if bias:
            p["bias"] = torch_uniform(rng, (channels,), fan_in=kernel_size)
    else:
        p = {"kernel": glorot_uniform(rng, shape)}
        if bias:
            p["bias"] = np.zeros(channels)
    return {f"{name}_dw_conv": p}


def build_selective_ssm(config, name: str, rng=None) -> dict:
    """Parameters of the selective SSM of one block (layers ``{name}_*``).

    ``fused``: ``{name}_x_proj`` (``inner -> dt_rank + 2N``, columns ``[dt; B; C]``,
    no bias); ``split``: ``{name}_bc_proj`` (``inner -> 2N``, columns ``[B; C]``)
    and ``{name}_dt_rank`` (``inner -> dt_rank``), both with bias. Always
    ``{name}_dt_proj`` (``dt_rank -> inner``, with bias) and, when the config
    has them, ``{name}`` holding ``A_log [inner, N]`` and ``D [inner]``.

    Official initialisation (``mamba_simple.py``): ``dt_proj.kernel`` uniform in
    ``+-dt_rank^-0.5``, ``dt_proj.bias = softplus^-1(dt)`` with ``dt`` log-uniform
    in ``[dt_min, dt_max]`` floored at ``dt_init_floor``, ``A_log = log(1..N)``
    per channel (S4D-real), ``D = 1``. Glorot (Axon): glorot-uniform kernels,
    zero biases; ``A_log``/``D`` (if a flag asks for them) as official.

    Examples
    --------
    >>> cfg = MambaConfig(embed_dim=4, hidden_size=4, state_size=3)
    >>> p = build_selective_ssm(cfg, "mamba_block_1_ssm", rng=0)
    >>> sorted(p), np.exp(p["mamba_block_1_ssm"]["A_log"][0])
    (['mamba_block_1_ssm', 'mamba_block_1_ssm_dt_proj', 'mamba_block_1_ssm_x_proj'], array([1., 2., 3.]))
    """
    c = as_config(config)
    rng = _rng(rng)
    E, N, R = c.inner_size, c.state_size, c.dt_rank_size
    p = {}
    if c.x_proj == "fused":
        p[f"{name}_x_proj"] = _dense_params(rng, E, R + 2 * N, False, c.init)
    else:
        p[f"{name}_bc_proj"] = _dense_params(rng, E, 2 * N, True, c.init)
        p[f"{name}_dt_rank"] = _dense_params(rng, E, R, True, c.init)
    if c.init == "official":
        std = R ** -0.5
        dt = np.exp(rng.uniform(0.0, 1.0, E) * (math.log(c.dt_max) - math.log(c.dt_min))
                    + math.log(c.dt_min))
        dt = np.maximum(dt, c.dt_init_floor)
        p[f"{name}_dt_proj"] = {"kernel": rng.uniform(-std, std, (R, E)),
                                "bias": inverse_softplus(dt)}
    else:
        p[f"{name}_dt_proj"] = _dense_params(rng, R, E, True, c.init)
    ssm = {}
    if c.a_param == "learned":
        ssm["A_log"] = np.log(np.tile(np.arange(1.0, N + 1), (E, 1)))
    if c.d_skip:
        ssm["D"] = np.ones(E)
    if ssm:
        p[name] = ssm
    return p


#: The original API's name (Edifice ``Mamba.build_selective_ssm_parallel/2``).
build_selective_ssm_parallel = build_selective_ssm


def build_mamba_block(config, layer_idx: int = 1, rng=None, name: Optional[str] = None) -> dict:
    """Parameters of block ``layer_idx`` (layers ``mamba_block_{i}_*``).

    Returns
    -------
    dict
        ``{name}_norm``, ``{name}_in_proj``, ``{name}_conv_dw_conv``, the SSM's
        layers (:func:`build_selective_ssm`) and ``{name}_out_proj``.

    Examples
    --------
    >>> p = build_mamba_block(MambaConfig(embed_dim=4, hidden_size=4, preset="edifice"), 2, rng=0)
    >>> sorted(p)[:3]
    ['mamba_block_2_conv_dw_conv', 'mamba_block_2_in_proj', 'mamba_block_2_norm']
    """
    c = as_config(config)
    rng = _rng(rng)
    layer_idx = _positive_int(layer_idx, "layer_idx")
    name = name or _block_name(layer_idx)
    H, E = c.hidden_size, c.inner_size
    p = {f"{name}_norm": _norm_params(c),
         f"{name}_in_proj": _dense_params(rng, H, 2 * E, c.proj_bias, c.init)}
    p.update(build_depthwise_conv1d(E, c.conv_size, f"{name}_conv", bias=c.conv_bias,
                                    init=c.init, rng=rng))
    p.update(build_selective_ssm(c, f"{name}_ssm", rng))
    p[f"{name}_out_proj"] = _dense_params(rng, E, H, c.proj_bias, c.init)
    return p


def random_params(config=None, seed=0, *, delta_range=(0.005, 0.04), **opts) -> dict:
    """Parameters *with teeth*, for tests and golden fixtures (not an initialisation).

    Every parameter random and away from the value that would hide a bug in
    its path: norm scales ``1 + 0.2 N(0,1)`` and shifts ``0.2 N(0,1)``, biases
    ``0.1 N(0,1)``, ``A_log = log(1..N) + 0.3 N(0,1)``, ``D = 1 + 0.5 N(0,1)``,
    kernels ``U(+-sqrt(3/fan_in))`` (unit-variance outputs); ``dt_proj.bias =
    softplus^-1(dt)`` with ``dt`` log-uniform in ``delta_range`` and a small
    ``dt_proj`` kernel (``U(+-0.35/sqrt(dt_rank))``), so ``delta`` varies from
    frame to frame and channel to channel but stays well inside Edifice's
    clip ``[0.001, 0.1]`` (unless ``delta_range`` says otherwise).

    Examples
    --------
    >>> cfg = MambaConfig(embed_dim=3, hidden_size=8, state_size=2, preset="edifice")
    >>> p = random_params(cfg, seed=0)
    >>> sorted(p) == sorted(param_shapes(cfg))
    True
    """
    c = as_config(config, **opts)
    rng = _rng(seed)
    lo, hi = (float(v) for v in delta_range)
    if not 0 < lo <= hi:
        raise ValueError(f"delta_range: expected 0 < lo <= hi, got {delta_range!r}")
    params = {}
    for layer, names in param_shapes(c).items():
        p = {}
        for name, shape in names.items():
            if layer.endswith("_dt_proj"):
                if name == "kernel":
                    p[name] = rng.uniform(-1.0, 1.0, shape) * 0.35 / math.sqrt(shape[0])
                else:
                    dt = np.exp(rng.uniform(math.log(lo), math.log(hi), shape))
                    p[name] = inverse_softplus(dt)
            elif name == "gamma":
                p[name] = 1.0 + 0.2 * rng.standard_normal(shape)
            elif name in ("beta", "bias"):
                p[name] = (0.2 if name == "beta" else 0.1) * rng.standard_normal(shape)
            elif name == "A_log":
                p[name] = np.log(np.arange(1.0, shape[1] + 1)) + 0.3 * rng.standard_normal(shape)
            elif name == "D":
                p[name] = 1.0 + 0.5 * rng.standard_normal(shape)
            else:                                           # kernels: dense [in, out], conv [K, 1, C]
                fan_in = shape[0]
                p[name] = rng.uniform(-1.0, 1.0, shape) * math.sqrt(3.0 / fan_in)
        params[layer] = p
    return params


class MambaModel:
    """A config and its parameters, with the model's functions as methods.

    ``model(x)`` is :func:`forward`'s output (the last timestep unless
    ``return_sequence=True``); ``model.forward(x, ...)`` returns the full
    :class:`MambaOutput`; ``model.step(cache, frame)`` is :func:`step`.

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=2, num_layers=1, seed=0)
    >>> model(np.ones((2, 5, 3))).shape
    (2, 8)
    """

    def __init__(self, config, params: dict):
        self.config = as_config(config)
        self.params = params

    def __call__(self, x, **kwargs):
        return forward(self.params, x, self.config, **kwargs).output

    def forward(self, x, **kwargs) -> "MambaOutput":
        return forward(self.params, x, self.config, **kwargs)

    def forward_with_saved(self, x, **kwargs):
        """:func:`forward_with_saved` with this model's parameters and config."""
        return forward_with_saved(self.params, x, self.config, **kwargs)

    def backward(self, d_out, saved, **kwargs) -> "MambaGrads":
        """:func:`backward` (``saved`` from :meth:`forward_with_saved`)."""
        return backward(d_out, saved, **kwargs)

    def init_cache(self, batch_size: int = 1) -> "MambaCache":
        return init_cache(self.config, batch_size)

    def step(self, cache: "MambaCache", frame):
        return step(self.params, cache, frame, self.config)

    def stepper(self, dtype=np.float64):
        """:func:`make_stepper`: the compiled step, with a snapshot of the parameters."""
        return make_stepper(self.params, self.config, dtype=dtype)

    def param_count(self) -> int:
        """The exact formula :func:`param_count` for this config."""
        return param_count(self.config)

    def param_count_tree(self) -> int:
        """The scalars actually in ``self.params``."""
        return count_params(self.params)

    def __repr__(self):
        return f"MambaModel({self.config!r})"


def build(config=None, *, seed=0, **opts) -> MambaModel:
    """Build a Mamba model: config -> :class:`MambaModel` with initialised parameters.

    Parameters
    ----------
    config : MambaConfig or dict, optional
        Or give the options as keywords (``embed_dim`` required).
    seed : int or numpy Generator
        Source of the initial parameters.

    Examples
    --------
    >>> model = build(embed_dim=287, hidden_size=32, state_size=4, seed=1)
    >>> sorted(model.params)[:3]
    ['final_norm', 'input_projection', 'mamba_block_1_conv_dw_conv']
    """
    c = as_config(config, **opts)
    rng = _rng(seed)
    params = {}
    if c.embed_dim != c.hidden_size:
        params["input_projection"] = _dense_params(rng, c.embed_dim, c.hidden_size, True, c.init)
    for i in range(1, c.num_layers + 1):
        params.update(build_mamba_block(c, i, rng))
    if c.final_norm:
        params["final_norm"] = _norm_params(c)
    return MambaModel(c, params)


# ---------------------------------------------------------------------------
# Forward (whole sequence or chunk)
# ---------------------------------------------------------------------------

class MambaCache(NamedTuple):
    """The carried state: everything the model needs to continue a sequence.

    Attributes
    ----------
    h : ndarray ``[batch, num_layers, inner, N]``
        SSM state of every layer after the last frame seen.
    conv : ndarray ``[batch, num_layers, conv_size-1, inner]``
        The last ``conv_size - 1`` inputs of every layer's conv (oldest first).
    """

    h: np.ndarray
    conv: np.ndarray


class MambaOutput(NamedTuple):
    """What :func:`forward` returns.

    Attributes
    ----------
    output : ndarray
        ``[batch, hidden]`` (last timestep) or ``[batch, seq_len, hidden]``
        (``return_sequence=True``), after the final norm if any.
    state : MambaCache
        The state after the last frame (pass it as ``state=`` to continue).
    hidden_states : tuple of ndarray ``[batch, seq_len, hidden]``
        The residual stream: entry 0 is the input of block 1 (after the input
        projection), entry ``i`` the output of block ``i`` (after its residual
        add and dropout); ``num_layers + 1`` entries, before the final norm.
    """

    output: np.ndarray
    state: MambaCache
    hidden_states: tuple


def init_cache(config=None, batch_size: int = 1, dtype=np.float64, **opts) -> MambaCache:
    """Zero state for a fresh sequence (Edifice ``init_state``'s layout).

    Zeros are the causal conv's left padding and ``h[-1] = 0``.

    Examples
    --------
    >>> cache = init_cache(MambaConfig(embed_dim=4, hidden_size=4, state_size=3), batch_size=2)
    >>> cache.h.shape, cache.conv.shape
    ((2, 2, 8, 3), (2, 2, 3, 8))
    """
    c = as_config(config, **opts)
    batch_size = _positive_int(batch_size, "batch_size")
    return MambaCache(
        h=np.zeros((batch_size, c.num_layers, c.inner_size, c.state_size), dtype=dtype),
        conv=np.zeros((batch_size, c.num_layers, c.conv_size - 1, c.inner_size), dtype=dtype))


def _check_cache(cache, c: MambaConfig, batch: int) -> MambaCache:
    if not (isinstance(cache, tuple) and len(cache) == 2):
        raise ValueError(f"cache: expected a MambaCache (h, conv), got {type(cache).__name__}")
    h = as_float_array(cache[0], "cache.h", ndim=4)
    conv = as_float_array(cache[1], "cache.conv", ndim=4)
    want_h = (batch, c.num_layers, c.inner_size, c.state_size)
    want_conv = (batch, c.num_layers, c.conv_size - 1, c.inner_size)
    if h.shape != want_h:
        raise ValueError(f"cache.h: expected shape {want_h} [batch, num_layers, inner, state] for "
                         f"this config and batch {batch}, got {h.shape} (a cache from another "
                         f"config or batch?)")
    if conv.shape != want_conv:
        raise ValueError(f"cache.conv: expected shape {want_conv} [batch, num_layers, "
                         f"conv_size-1, inner] for this config and batch {batch}, got "
                         f"{conv.shape} (a cache from another config or batch?)")
    return MambaCache(h, conv)


def _norm_forward(p: dict, x: np.ndarray, c: MambaConfig) -> np.ndarray:
    """The block's / final norm: LayerNorm or RMSNorm over ``hidden``, ``[..., H]`` -> ``[..., H]``."""
    if c.norm == "layer":
        return layer_norm_forward(x, p["gamma"], p["beta"], c.norm_eps)[0]
    return rms_norm_forward(x, p["gamma"], c.norm_eps)[0]


def _dense(p: dict, x: np.ndarray) -> np.ndarray:
    return dense_forward(x, p["kernel"], p.get("bias"))[0]


def _A(params: dict, name: str, c: MambaConfig) -> np.ndarray:
    """The continuous-time ``A [inner, N]``: ``-exp(A_log)`` or Edifice's fixed ``-(1..N)``."""
    if c.a_param == "learned":
        return -np.exp(params[name]["A_log"])
    dtype = params[f"{name}_dt_proj"]["bias"].dtype       # the parameters' (float32 stays so)
    return -np.tile(np.arange(1, c.state_size + 1, dtype=dtype), (c.inner_size, 1))


def _ssm_projections(params: dict, xs: np.ndarray, c: MambaConfig, name: str):
    """``xs [..., inner]`` -> ``delta_raw [..., inner]``, ``B [..., N]``, ``C [..., N]``.

    ``delta_raw = dt_proj.kernel`` applied to the low-rank ``dt``; the
    ``dt_proj.bias`` is added inside the scan, before the softplus (as the
    official ``selective_scan_fn(delta_bias=...)``).
    """
    N, R = c.state_size, c.dt_rank_size
    if c.x_proj == "fused":       # official x_proj: columns [dt (R); B (N); C (N)]
        x_dbl = _dense(params[f"{name}_x_proj"], xs)
        dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    else:                         # Edifice: bc_proj -> [B; C], dt_rank -> dt
        bc = _dense(params[f"{name}_bc_proj"], xs)
        B, C = bc[..., :N], bc[..., N:]
        dt_low = _dense(params[f"{name}_dt_rank"], xs)
    delta_raw = dense_forward(dt_low, params[f"{name}_dt_proj"]["kernel"])[0]
    return delta_raw, B, C


def selective_ssm_forward(params: dict, xs: np.ndarray, z: np.ndarray, config, name: str,
                          h0: Optional[np.ndarray] = None, *, engine: str = "numpy"):
    """The selective SSM of one block over a sequence, gated by ``silu(z)``.

    Parameters
    ----------
    params : dict
        The model's tree (layers ``{name}_*``).
    xs : ndarray ``[batch, seq_len, inner]``
        Input (after conv + SiLU).
    z : ndarray ``[batch, seq_len, inner]``
        Gate branch of ``in_proj``.
    config : MambaConfig
    name : str
        ``mamba_block_{i}_ssm``.
    h0 : ndarray ``[batch, inner, N]``, optional
        State before the first frame (zeros if omitted).
    engine : {"numpy", "numba", "logdepth"}
        Scan engine (:func:`refssm.ssm.selective_scan.selective_scan_forward`).

    Returns
    -------
    y : ndarray ``[batch, seq_len, inner]``
        ``(C . h + D xs) * silu(z)``.
    h_last : ndarray ``[batch, inner, N]``
    saved : SelectiveScanSaved
        The scan's saved values (``saved.dt`` is the ``delta`` used).
    """
    c = as_config(config)
    delta_raw, B, C = _ssm_projections(params, xs, c, name)
    D = params[name]["D"] if c.d_skip else None
    return selective_scan_forward(
        xs, delta_raw, _A(params, name, c), B, C, D, z,
        delta_bias=params[f"{name}_dt_proj"]["bias"], delta_softplus=True, initial_state=h0,
        delta_clip=c.delta_clip, delta_b_mean=(c.b_bar == "channel_mean"), engine=engine)


def mamba_block_forward(params: dict, x: np.ndarray, config, layer_idx: int,
                        conv_buffer: Optional[np.ndarray] = None, h0: Optional[np.ndarray] = None,
                        *, engine: str = "numpy"):
    """One Mamba block over a sequence (without the residual add).

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, hidden]``
    config : MambaConfig
    layer_idx : int
        1-based.
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``, optional
    h0 : ndarray ``[batch, inner, N]``, optional

    Returns
    -------
    out : ndarray ``[batch, seq_len, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    h_last : ndarray ``[batch, inner, N]``
    saved : SelectiveScanSaved
    """
    c = as_config(config)
    b = _block_name(layer_idx)
    E = c.inner_size
    u = _norm_forward(params[f"{b}_norm"], x, c)      # [batch, L, H]
    xz = _dense(params[f"{b}_in_proj"], u)                                # [batch, L, 2E]
    xs, z = xz[..., :E], xz[..., E:]
    conv = params[f"{b}_conv_dw_conv"]
    xs, conv_buffer, _ = causal_depthwise_conv1d_forward(xs, conv["kernel"], conv.get("bias"),
                                                         conv_buffer)
    xs = silu_forward(xs)[0]                                              # [batch, L, E]
    y, h_last, saved = selective_ssm_forward(params, xs, z, c, f"{b}_ssm", h0, engine=engine)
    return _dense(params[f"{b}_out_proj"], y), conv_buffer, h_last, saved


def _check_x(x, c: MambaConfig, name="x"):
    x = as_float_array(x, name, ndim=3)
    if x.shape[2] != c.embed_dim:
        raise ValueError(f"{name}: expected last axis embed_dim={c.embed_dim} "
                         f"([batch, seq_len, embed_dim]), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected batch >= 1 and seq_len >= 1, got shape {x.shape}")
    return x


def forward(params: dict, x, config=None, *, state: Optional[MambaCache] = None,
            return_sequence: bool = False, training: bool = False, seed=None,
            engine: str = "numpy") -> MambaOutput:
    """The model over a sequence (or a chunk of one, given the previous ``state``).

    Parameters
    ----------
    params : dict
        The parameter tree (:func:`param_shapes`).
    x : ndarray ``[batch, seq_len, embed_dim]``
    config : MambaConfig or dict
    state : MambaCache, optional
        State after the frames before ``x`` (a fresh sequence if omitted).
        Processing ``x`` in chunks, each with the previous call's state, gives
        the same numbers as one call.
    return_sequence : bool
        Return every timestep ``[batch, seq_len, hidden]`` instead of the last.
    training : bool
        Apply dropout (rate ``config.dropout``) between blocks; needs ``seed``.
        Off by default: inference.
    seed : int or numpy Generator
        Source of the dropout masks (one draw per block, in order). The masks
        are drawn per call, so in training mode chunks do not equal one call.
    engine : {"numpy", "numba", "logdepth"}
        Selective-scan engine; "numpy" is the ground truth.

    Returns
    -------
    MambaOutput
        ``(output, state, hidden_states)``.

    Raises
    ------
    ValueError
        ``x`` of the wrong shape (``embed_dim``) or not finite, parameters not
        matching the config, a state from another config, training without a
        seed, an unknown engine.

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((1, 6, 3))
    >>> full = forward(model.params, x, model.config, return_sequence=True)
    >>> a = forward(model.params, x[:, :4], model.config, return_sequence=True)
    >>> b = forward(model.params, x[:, 4:], model.config, state=a.state, return_sequence=True)
    >>> bool(np.allclose(np.concatenate([a.output, b.output], 1), full.output, rtol=0, atol=1e-13))
    True
    """
    c = as_config(config)
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    x = _check_x(x, c)
    params = check_params(params, param_shapes(c))
    batch = x.shape[0]
    state = init_cache(c, batch, dtype=x.dtype) if state is None else _check_cache(state, c, batch)
    rng = None
    if training and c.dropout > 0:
        if seed is None:
            raise ValueError("forward: training=True with dropout > 0 needs seed (int or numpy "
                             "Generator), got None")
        rng = _rng(seed)
    if "input_projection" in params:
        x = _dense(params["input_projection"], x)     # [batch, L, H]
    hidden_states = [x]
    new_h = np.empty(state.h.shape, dtype=np.result_type(state.h, x))
    new_conv = np.empty(state.conv.shape, dtype=np.result_type(state.conv, x))
    for i in range(1, c.num_layers + 1):
        out, new_conv[:, i - 1], new_h[:, i - 1], _ = mamba_block_forward(
            params, x, c, i, state.conv[:, i - 1], state.h[:, i - 1], engine=engine)
        x = x + out                                                       # residual
        if rng is not None and i < c.num_layers:                          # between blocks
            x = dropout_forward(x, c.dropout, training=True, rng=rng)[0]
        hidden_states.append(x)
    if c.final_norm:
        x = _norm_forward(params["final_norm"], x, c)
    output = x if return_sequence else x[:, -1]
    return MambaOutput(output, MambaCache(new_h, new_conv), tuple(hidden_states))


# ---------------------------------------------------------------------------
# Step: one frame, O(1) in the sequence length
# ---------------------------------------------------------------------------

def selective_ssm_step(params: dict, xs: np.ndarray, z: np.ndarray, h: np.ndarray, config,
                       name: str):
    """One frame of the selective SSM: the recurrence of eqs. 2a-2b, written out.

    Parameters
    ----------
    xs, z : ndarray ``[batch, inner]``
    h : ndarray ``[batch, inner, N]``
        State after the previous frame.
    config : MambaConfig
    name : str

    Returns
    -------
    y : ndarray ``[batch, inner]``
        ``(C . h_t + D xs) * silu(z)``.
    h : ndarray ``[batch, inner, N]``
        ``h_t``.
    """
    c = as_config(config)
    delta_raw, B, C = _ssm_projections(params, xs, c, name)         # [b, E], [b, N], [b, N]
    delta = softplus_forward(delta_raw + params[f"{name}_dt_proj"]["bias"])[0]
    if c.delta_clip is not None:                                     # Edifice: [0.001, 0.1]
        delta = np.clip(delta, c.delta_clip[0], c.delta_clip[1])
    delta_B = delta.mean(axis=-1, keepdims=True) if c.b_bar == "channel_mean" else delta
    A_bar = np.exp(delta[..., None] * _A(params, name, c))          # eq. 4: [b, E, N]
    h = A_bar * h + delta_B[..., None] * B[:, None, :] * xs[..., None]   # eq. 2a
    y = np.sum(C[:, None, :] * h, axis=-1)                           # eq. 2b
    if c.d_skip:
        y = y + params[name]["D"] * xs
    return y * silu_forward(z)[0], h


def mamba_block_step(params: dict, frame: np.ndarray, conv_buffer: np.ndarray, h: np.ndarray,
                     config, layer_idx: int):
    """One frame through one block (without the residual add).

    Parameters
    ----------
    frame : ndarray ``[batch, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    h : ndarray ``[batch, inner, N]``

    Returns
    -------
    out : ndarray ``[batch, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    h : ndarray ``[batch, inner, N]``
    """
    c = as_config(config)
    b = _block_name(layer_idx)
    E = c.inner_size
    u = _norm_forward(params[f"{b}_norm"], frame, c)
    xz = _dense(params[f"{b}_in_proj"], u)                                # [batch, 2E]
    xs, z = xz[..., :E], xz[..., E:]
    conv = params[f"{b}_conv_dw_conv"]
    xs, conv_buffer = causal_depthwise_conv1d_step(xs, conv_buffer, conv["kernel"], conv.get("bias"))
    xs = silu_forward(xs)[0]
    y, h = selective_ssm_step(params, xs, z, h, c, f"{b}_ssm")
    return _dense(params[f"{b}_out_proj"], y), conv_buffer, h


def step(params: dict, cache: MambaCache, frame, config=None):
    """Advance the model by one frame: ``[batch, embed_dim]`` in, ``[batch, hidden]`` out.

    O(1) in the sequence length: it reads and writes only ``cache`` (per
    layer the conv buffer ``[batch, conv_size-1, inner]`` and the SSM state
    ``[batch, inner, N]``). Stepping through a sequence gives, at every
    frame, the full :func:`forward`'s output at that timestep.

    Parameters
    ----------
    params : dict
    cache : MambaCache
        From :func:`init_cache`, a previous :func:`step` or :func:`forward`'s ``state``.
    frame : ndarray ``[batch, embed_dim]``
    config : MambaConfig or dict

    Returns
    -------
    y : ndarray ``[batch, hidden]``
    cache : MambaCache
        The new state (the input cache is not modified).

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=2, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 3))
    >>> cache = model.init_cache(batch_size=2)
    >>> for t in range(5):
    ...     y, cache = model.step(cache, x[:, t])
    >>> bool(np.allclose(y, model(x), rtol=0, atol=1e-13))
    True
    """
    c = as_config(config)
    frame = as_float_array(frame, "frame", ndim=2)
    if frame.shape[1] != c.embed_dim:
        raise ValueError(f"frame: expected shape (batch, {c.embed_dim}) [batch, embed_dim], "
                         f"got {frame.shape}")
    params = check_params(params, param_shapes(c))
    cache = _check_cache(cache, c, frame.shape[0])
    x = _dense(params["input_projection"], frame) if "input_projection" in params else frame
    new_h = np.empty(cache.h.shape, dtype=np.result_type(cache.h, x))
    new_conv = np.empty(cache.conv.shape, dtype=np.result_type(cache.conv, x))
    for i in range(1, c.num_layers + 1):
        out, new_conv[:, i - 1], new_h[:, i - 1] = mamba_block_step(
            params, x, cache.conv[:, i - 1], cache.h[:, i - 1], c, i)
        x = x + out
    if c.final_norm:
        x = _norm_forward(params["final_norm"], x, c)
    return x, MambaCache(new_h, new_conv)


def make_stepper(params: dict, config=None, *, dtype=np.float64, **opts):
    """The Numba step engine: :func:`step`, compiled, on a validated snapshot of ``params``.

    ``stepper = make_stepper(params, config)``, then ``y, cache =
    stepper.step(cache, frame)`` exactly as :func:`step` (the caches are
    interchangeable). Equal to :func:`step` to round-off (<= 1e-12 normwise);
    several times faster, since the parameters are validated once and a frame
    is one compiled call. See :mod:`refssm.models.mamba_stepper`.

    Examples
    --------
    >>> c = MambaConfig(embed_dim=3, hidden_size=8, state_size=2)
    >>> params = random_params(c, seed=0)
    >>> y, cache = make_stepper(params, c).step(init_cache(c, 1), np.ones((1, 3)))
    >>> y.shape
    (1, 8)
    """
    from .mamba_stepper import make_stepper as _make_stepper

    return _make_stepper(params, config, dtype=dtype, **opts)


# ---------------------------------------------------------------------------
# Manual backward (llm.c-style): every forward keeps minimal named values,
# its backward sits next to it. DESIGN.md section 3, "Manual backprop".
# ---------------------------------------------------------------------------
#
# Notation of the block (DESIGN.md 1.1), shapes with H = hidden, E = inner,
# N = state, R = dt_rank, K = conv_size, L = seq_len:
#
#     u          = norm(x)                              norm_forward           [b, L, H]
#     xs0, z     = split(in_proj(u))                    in_proj_forward        [b, L, E] each
#     xs         = silu(conv1d(xs0))                    conv_silu_forward      [b, L, E]
#     dr, B, C   = dt_proj.kernel(x_proj(xs))           ssm_projections_forward
#                                                         dr [b, L, E]; B, C [b, L, N]
#     y          = scan(xs, dr + dt_proj.bias, A, B, C, D) * silu(z)
#                                                       ssm_scan_forward       [b, L, E]
#     out        = out_proj(y)                          dense_layer_forward    [b, L, H]
#
# Every ``*_backward`` takes the gradient of its forward's outputs and the
# forward's saved values and returns the gradient of its inputs and a
# *fragment* ``{layer: {name: grad}}`` of the parameter-gradient tree (the
# layer names of ``params``); the model's :func:`backward` merges them.
# Saved values are references to arrays the forward computes anyway (the
# ops' own ``*Saved`` tuples), not copies.

def norm_forward(params: dict, x: np.ndarray, config, name: str):
    """``u = norm(x)``: LayerNorm (``gamma``, ``beta``) or RMSNorm (``gamma``) over ``hidden``.

    Parameters
    ----------
    params : dict
        Reads ``params[name]`` (``mamba_block_{i}_norm`` or ``final_norm``).
    x : ndarray ``[batch, seq_len, hidden]``
    config : MambaConfig
        ``config.norm`` picks the norm, ``config.norm_eps`` its epsilon.
    name : str

    Returns
    -------
    u : ndarray ``[batch, seq_len, hidden]``
    saved : LayerNormSaved or RMSNormSaved
        ``x_hat``, ``rstd``, ``gamma``.

    Examples
    --------
    >>> c = MambaConfig(embed_dim=4, hidden_size=4, num_layers=1, preset="edifice")
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4))
    >>> u, s = norm_forward(p, x, c, "mamba_block_1_norm")
    >>> dx, frag = norm_backward(np.ones_like(u), s, c, "mamba_block_1_norm")
    >>> dx.shape, sorted(frag["mamba_block_1_norm"])
    ((2, 3, 4), ['beta', 'gamma'])
    """
    c = as_config(config)
    p = params[name]
    if c.norm == "layer":
        return layer_norm_forward(x, p["gamma"], p["beta"], c.norm_eps)
    return rms_norm_forward(x, p["gamma"], c.norm_eps)


def norm_backward(du: np.ndarray, saved, config, name: str):
    """Backward of :func:`norm_forward`.

    With ``g = du * gamma``: LayerNorm ``dx = rstd (g - mean(g) - x_hat mean(g x_hat))``,
    RMSNorm ``dx = rstd (g - x_hat mean(g x_hat))``; ``d gamma = sum du x_hat``,
    ``d beta = sum du``.

    Parameters
    ----------
    du : ndarray ``[batch, seq_len, hidden]``
    saved : LayerNormSaved or RMSNormSaved
    config : MambaConfig
    name : str

    Returns
    -------
    dx : ndarray ``[batch, seq_len, hidden]``
    fragment : dict
        ``{name: {"gamma": [hidden], "beta": [hidden]}}`` (``beta`` for LayerNorm only).

    Examples
    --------
    See :func:`norm_forward`.
    """
    c = as_config(config)
    if c.norm == "layer":
        g = layer_norm_backward(du, saved)
        return g["x"], {name: {"gamma": g["gamma"], "beta": g["beta"]}}
    g = rms_norm_backward(du, saved)
    return g["x"], {name: {"gamma": g["gamma"]}}


def in_proj_forward(params: dict, u: np.ndarray, config, name: str):
    """``xs0, z = split(in_proj(u))``: the SSM branch and the gate branch.

    Parameters
    ----------
    params : dict
        Reads ``params[name]`` (``mamba_block_{i}_in_proj``: ``kernel [hidden, 2 inner]``,
        ``bias [2 inner]`` with ``proj_bias``).
    u : ndarray ``[batch, seq_len, hidden]``
    config : MambaConfig
    name : str

    Returns
    -------
    xs0 : ndarray ``[batch, seq_len, inner]``
        The first ``inner`` columns (into the conv).
    z : ndarray ``[batch, seq_len, inner]``
        The last ``inner`` columns (the gate).
    saved : DenseSaved

    Examples
    --------
    >>> c = MambaConfig(embed_dim=4, hidden_size=4, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> u = np.random.default_rng(0).standard_normal((2, 3, 4))
    >>> xs0, z, s = in_proj_forward(p, u, c, "mamba_block_1_in_proj")
    >>> du, frag = in_proj_backward(np.ones_like(xs0), np.zeros_like(z), s, c,
    ...                             "mamba_block_1_in_proj")
    >>> xs0.shape, du.shape, frag["mamba_block_1_in_proj"]["kernel"].shape
    ((2, 3, 8), (2, 3, 4), (4, 16))
    """
    c = as_config(config)
    E = c.inner_size
    xz, saved = dense_layer_forward(params, u, name)                     # [b, L, 2E]
    return xz[..., :E], xz[..., E:], saved


def in_proj_backward(dxs0: np.ndarray, dz: np.ndarray, saved: DenseSaved, config, name: str):
    """Backward of :func:`in_proj_forward`: ``d xz = [d xs0 ; d z]``, then the dense backward.

    Parameters
    ----------
    dxs0, dz : ndarray ``[batch, seq_len, inner]``
    saved : DenseSaved
    config : MambaConfig
    name : str

    Returns
    -------
    du : ndarray ``[batch, seq_len, hidden]``
    fragment : dict
        ``{name: {"kernel": [hidden, 2 inner], "bias": [2 inner]}}`` (bias with ``proj_bias``).

    Examples
    --------
    See :func:`in_proj_forward`.
    """
    return dense_layer_backward(np.concatenate([dxs0, dz], axis=-1), saved, name)


class ConvSiluSaved(NamedTuple):
    """Saved by :func:`conv_silu_forward`.

    Attributes
    ----------
    conv : ConvSaved
        ``x_pad [batch, K-1+seq_len, inner]`` (buffer and input), the kernel.
    silu : ActivationSaved
        The conv output ``[batch, seq_len, inner]`` (SiLU's input).
    """

    conv: ConvSaved
    silu: ActivationSaved


def conv_silu_forward(params: dict, xs0: np.ndarray, config, name: str,
                      conv_buffer: Optional[np.ndarray] = None):
    """``xs = silu(causal_depthwise_conv1d(xs0))``, continuing from ``conv_buffer``.

    Parameters
    ----------
    params : dict
        Reads ``params[name]`` (``mamba_block_{i}_conv_dw_conv``: ``kernel [K, 1, inner]``,
        ``bias [inner]`` with ``conv_bias``).
    xs0 : ndarray ``[batch, seq_len, inner]``
    config : MambaConfig
    name : str
    conv_buffer : ndarray ``[batch, K-1, inner]``, optional
        The ``K - 1`` conv inputs before ``xs0`` (zeros: a fresh sequence).

    Returns
    -------
    xs : ndarray ``[batch, seq_len, inner]``
    new_buffer : ndarray ``[batch, K-1, inner]``
        The last ``K - 1`` frames of ``[conv_buffer ; xs0]`` (the carried state).
    saved : ConvSiluSaved

    Examples
    --------
    >>> c = MambaConfig(embed_dim=4, hidden_size=4, conv_size=3, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> xs0 = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> xs, buf, s = conv_silu_forward(p, xs0, c, "mamba_block_1_conv_dw_conv")
    >>> dxs0, dbuf, frag = conv_silu_backward(np.ones_like(xs), None, s, c,
    ...                                       "mamba_block_1_conv_dw_conv")
    >>> buf.shape, dxs0.shape, dbuf.shape, sorted(frag["mamba_block_1_conv_dw_conv"])
    ((2, 2, 8), (2, 5, 8), (2, 2, 8), ['bias', 'kernel'])
    """
    p = params[name]
    pre, new_buffer, conv_saved = causal_depthwise_conv1d_forward(xs0, p["kernel"], p.get("bias"),
                                                                  conv_buffer)
    xs, silu_saved = silu_forward(pre)
    return xs, new_buffer, ConvSiluSaved(conv_saved, silu_saved)


def conv_silu_backward(dxs: np.ndarray, d_new_buffer: Optional[np.ndarray],
                       saved: ConvSiluSaved, config, name: str):
    """Backward of :func:`conv_silu_forward`.

    ``d pre = dxs * silu'(pre)``; then the conv's backward, which adds
    ``d_new_buffer`` to the frames of ``[buffer ; xs0]`` it was taken from.

    Parameters
    ----------
    dxs : ndarray ``[batch, seq_len, inner]``
    d_new_buffer : ndarray ``[batch, K-1, inner]`` or None
        Gradient of the returned buffer (None: zero).
    saved : ConvSiluSaved
    config : MambaConfig
    name : str

    Returns
    -------
    dxs0 : ndarray ``[batch, seq_len, inner]``
    d_buffer : ndarray ``[batch, K-1, inner]``
        Gradient of the incoming ``conv_buffer``.
    fragment : dict
        ``{name: {"kernel": [K, 1, inner], "bias": [inner]}}`` (bias with ``conv_bias``).

    Examples
    --------
    See :func:`conv_silu_forward`.
    """
    d_pre = silu_backward(dxs, saved.silu)["x"]
    g = causal_depthwise_conv1d_backward(d_pre, d_new_buffer, saved.conv)
    grads = {"kernel": g["kernel"]}
    if g["bias"] is not None:
        grads["bias"] = g["bias"]
    return g["x"], g["buffer"], {name: grads}


class ProjectionsSaved(NamedTuple):
    """Saved by :func:`ssm_projections_forward` (the ops' saved values; None where unused).

    Attributes
    ----------
    x_proj : DenseSaved or None
        Fused (``mamba_ssm``): ``xs [b, L, inner] -> [dt_low ; B ; C]``.
    bc_proj, dt_rank : DenseSaved or None
        Split (``edifice``): ``xs -> [B ; C]`` and ``xs -> dt_low``.
    dt_proj : DenseSaved
        ``dt_low [b, L, R] -> delta_raw [b, L, inner]``, kernel only (its bias
        enters the scan as ``delta_bias``).
    """

    x_proj: Optional[DenseSaved]
    bc_proj: Optional[DenseSaved]
    dt_rank: Optional[DenseSaved]
    dt_proj: DenseSaved


def ssm_projections_forward(params: dict, xs: np.ndarray, config, name: str):
    """``dt_low, B, C = x_proj(xs)``; ``delta_raw = dt_low @ dt_proj.kernel``.

    Fused (``x_proj``, columns ``[dt_low (R) ; B (N) ; C (N)]``, no bias) or
    split (``bc_proj`` columns ``[B ; C]`` and ``dt_rank``, both with bias).
    The ``dt_proj.bias`` is added inside the scan, before the softplus
    (:func:`ssm_scan_forward`), as the official ``selective_scan_fn(delta_bias=...)``.

    Parameters
    ----------
    params : dict
        Reads ``{name}_x_proj`` (or ``{name}_bc_proj`` and ``{name}_dt_rank``) and
        ``{name}_dt_proj``.
    xs : ndarray ``[batch, seq_len, inner]``
    config : MambaConfig
    name : str
        ``mamba_block_{i}_ssm``.

    Returns
    -------
    delta_raw : ndarray ``[batch, seq_len, inner]``
    B, C : ndarray ``[batch, seq_len, N]``
    saved : ProjectionsSaved

    Examples
    --------
    >>> c = MambaConfig(embed_dim=4, hidden_size=4, state_size=3, num_layers=1, preset="edifice")
    >>> p = random_params(c, seed=0)
    >>> xs = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> dr, B, C, s = ssm_projections_forward(p, xs, c, "mamba_block_1_ssm")
    >>> dxs, frag = ssm_projections_backward(np.ones_like(dr), np.ones_like(B), np.ones_like(C),
    ...                                      s, c, "mamba_block_1_ssm")
    >>> dr.shape, B.shape, dxs.shape
    ((2, 5, 8), (2, 5, 3), (2, 5, 8))
    >>> sorted(frag)
    ['mamba_block_1_ssm_bc_proj', 'mamba_block_1_ssm_dt_proj', 'mamba_block_1_ssm_dt_rank']
    """
    c = as_config(config)
    N, R = c.state_size, c.dt_rank_size
    x_proj = bc_proj = dt_rank = None
    if c.x_proj == "fused":
        x_dbl, x_proj = dense_layer_forward(params, xs, f"{name}_x_proj")   # [b, L, R + 2N]
        dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    else:
        bc, bc_proj = dense_layer_forward(params, xs, f"{name}_bc_proj")    # [b, L, 2N]
        B, C = bc[..., :N], bc[..., N:]
        dt_low, dt_rank = dense_layer_forward(params, xs, f"{name}_dt_rank")  # [b, L, R]
    delta_raw, dt_proj = dense_forward(dt_low, params[f"{name}_dt_proj"]["kernel"])  # [b, L, E]
    return delta_raw, B, C, ProjectionsSaved(x_proj, bc_proj, dt_rank, dt_proj)


def ssm_projections_backward(d_delta_raw: np.ndarray, dB: np.ndarray, dC: np.ndarray,
                             saved: ProjectionsSaved, config, name: str):
    """Backward of :func:`ssm_projections_forward`.

    ``d dt_low = d delta_raw @ dt_proj.kernel^T``; fused: ``d x_dbl = [d dt_low ;
    dB ; dC]``; split: ``d bc = [dB ; dC]`` and ``d dt_low`` into ``dt_rank``,
    the two ``d xs`` summed.

    Parameters
    ----------
    d_delta_raw : ndarray ``[batch, seq_len, inner]``
    dB, dC : ndarray ``[batch, seq_len, N]``
    saved : ProjectionsSaved
    config : MambaConfig
    name : str

    Returns
    -------
    dxs : ndarray ``[batch, seq_len, inner]``
    fragment : dict
        ``{name}_x_proj`` or ``{name}_bc_proj`` and ``{name}_dt_rank``, and
        ``{name}_dt_proj: {"kernel"}`` (its ``bias`` comes from :func:`ssm_scan_backward`).

    Examples
    --------
    See :func:`ssm_projections_forward`.
    """
    c = as_config(config)
    d_dt_low, frag = dense_layer_backward(d_delta_raw, saved.dt_proj, f"{name}_dt_proj")
    if c.x_proj == "fused":
        dxs, g = dense_layer_backward(np.concatenate([d_dt_low, dB, dC], axis=-1), saved.x_proj,
                                      f"{name}_x_proj")
        _merge_grads(frag, g)
    else:
        dxs, g = dense_layer_backward(np.concatenate([dB, dC], axis=-1), saved.bc_proj,
                                      f"{name}_bc_proj")
        _merge_grads(frag, g)
        dxs_dt, g = dense_layer_backward(d_dt_low, saved.dt_rank, f"{name}_dt_rank")
        _merge_grads(frag, g)
        dxs = dxs + dxs_dt
    return dxs, frag


class ScanSaved(NamedTuple):
    """Saved by :func:`ssm_scan_forward`.

    Attributes
    ----------
    A : ndarray ``[inner, N]``
        The continuous-time ``A`` used (for ``d A_log = d A * A``).
    scan : SelectiveScanSaved
        The selective scan's own saved values (prologue, engine core, epilogue).
    """

    A: np.ndarray
    scan: SelectiveScanSaved


def ssm_scan_forward(params: dict, xs: np.ndarray, z: np.ndarray, delta_raw: np.ndarray,
                     B: np.ndarray, C: np.ndarray, config, name: str,
                     h0: Optional[np.ndarray] = None, *, engine: str = "numpy"):
    """The selective scan of one block, eqs. 2a, 2b and 4, gated by ``silu(z)``::

        A      = -exp(A_log)  (or Edifice's fixed -(1..N))            [E, N]
        delta  = softplus(delta_raw + dt_proj.bias)  (clip: Edifice)  [b, L, E]
        h_t    = exp(delta_t A) h_{t-1} + (delta_t or mean_c delta_t) B_t xs_t
        y_t    = (C_t . h_t + D xs_t) * silu(z_t)                     [b, L, E]

    Parameters
    ----------
    params : dict
        Reads ``{name}_dt_proj.bias`` and ``{name}`` (``A_log``, ``D`` when the config has them).
    xs, z, delta_raw : ndarray ``[batch, seq_len, inner]``
    B, C : ndarray ``[batch, seq_len, N]``
    config : MambaConfig
    name : str
        ``mamba_block_{i}_ssm``.
    h0 : ndarray ``[batch, inner, N]``, optional
        State before the first frame (zeros if omitted).
    engine : {"numpy", "numba", "logdepth"}

    Returns
    -------
    y : ndarray ``[batch, seq_len, inner]``
    h_last : ndarray ``[batch, inner, N]``
    saved : ScanSaved

    Examples
    --------
    >>> c = MambaConfig(embed_dim=4, hidden_size=4, state_size=3, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> rng = np.random.default_rng(0)
    >>> xs, z, dr = rng.standard_normal((3, 2, 5, 8))
    >>> B, C = rng.standard_normal((2, 2, 5, 3))
    >>> y, h, s = ssm_scan_forward(p, xs, z, dr, B, C, c, "mamba_block_1_ssm")
    >>> d, frag = ssm_scan_backward(np.ones_like(y), None, s, c, "mamba_block_1_ssm")
    >>> sorted(d), sorted(frag["mamba_block_1_ssm"]), sorted(frag["mamba_block_1_ssm_dt_proj"])
    (['B', 'C', 'delta_raw', 'h0', 'xs', 'z'], ['A_log', 'D'], ['bias'])
    """
    c = as_config(config)
    A = _A(params, name, c)
    D = params[name]["D"] if c.d_skip else None
    y, h_last, scan_saved = selective_scan_forward(
        xs, delta_raw, A, B, C, D, z, delta_bias=params[f"{name}_dt_proj"]["bias"],
        delta_softplus=True, initial_state=h0, delta_clip=c.delta_clip,
        delta_b_mean=(c.b_bar == "channel_mean"), engine=engine)
    return y, h_last, ScanSaved(A, scan_saved)


def ssm_scan_backward(dy: np.ndarray, d_h_last: Optional[np.ndarray], saved: ScanSaved, config,
                      name: str):
    """Backward of :func:`ssm_scan_forward`: the reverse-time scan, then the parameters.

    The scan's backward (:func:`refssm.ssm.selective_scan.selective_scan_backward`)
    gives ``d A``; with ``A = -exp(A_log)``, ``d A / d A_log = -exp(A_log) = A``,
    so ``d A_log = d A * A``. A fixed ``A`` has no gradient to keep. The
    softplus, the clip (zero gradient where ``delta`` was clipped) and the
    channel mean are differentiated inside the scan's backward.

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, inner]``
    d_h_last : ndarray ``[batch, inner, N]`` or None
        Gradient of the returned ``h_last`` (None: zero).
    saved : ScanSaved
    config : MambaConfig
    name : str

    Returns
    -------
    grads : dict
        ``xs, z, delta_raw [batch, seq_len, inner]``, ``B, C [batch, seq_len, N]``,
        ``h0 [batch, inner, N]``.
    fragment : dict
        ``{name}_dt_proj: {"bias"}`` and ``{name}: {"A_log", "D"}`` (those the config has).

    Examples
    --------
    See :func:`ssm_scan_forward`.
    """
    c = as_config(config)
    g = selective_scan_backward(dy, d_h_last, saved.scan)
    ssm = {}
    if c.a_param == "learned":
        ssm["A_log"] = g["A"] * saved.A                                  # dA/dA_log = A
    if c.d_skip:
        ssm["D"] = g["D"]
    frag = {f"{name}_dt_proj": {"bias": g["delta_bias"]}}
    if ssm:
        frag[name] = ssm
    grads = dict(xs=g["u"], z=g["z"], delta_raw=g["delta"], B=g["B"], C=g["C"],
                 h0=g["initial_state"])
    return grads, frag


class MambaBlockSaved(NamedTuple):
    """What one block's forward keeps for its backward, by equation.

    Attributes
    ----------
    layer_idx : int
        1-based (the layer names ``mamba_block_{layer_idx}_*``).
    norm : LayerNormSaved or RMSNormSaved
        ``u = norm(x)``.
    in_proj : DenseSaved
        ``xs0, z = split(in_proj(u))``.
    conv_silu : ConvSiluSaved
        ``xs = silu(conv1d(xs0))``.
    projections : ProjectionsSaved
        ``delta_raw, B, C`` from ``xs``.
    scan : ScanSaved
        ``y = scan(...) * silu(z)``.
    out_proj : DenseSaved
        ``out = out_proj(y)``.
    """

    layer_idx: int
    norm: object
    in_proj: DenseSaved
    conv_silu: ConvSiluSaved
    projections: ProjectionsSaved
    scan: ScanSaved
    out_proj: DenseSaved


def mamba_block_forward_with_saved(params: dict, x: np.ndarray, config, layer_idx: int,
                                   conv_buffer: Optional[np.ndarray] = None,
                                   h0: Optional[np.ndarray] = None, *, engine: str = "numpy"):
    """One Mamba block over a sequence (without the residual add), keeping what the backward needs.

    The same numbers as :func:`mamba_block_forward`.

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, hidden]``
    config : MambaConfig
    layer_idx : int
        1-based.
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``, optional
    h0 : ndarray ``[batch, inner, N]``, optional
    engine : {"numpy", "numba", "logdepth"}

    Returns
    -------
    out : ndarray ``[batch, seq_len, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    h_last : ndarray ``[batch, inner, N]``
    saved : MambaBlockSaved

    Examples
    --------
    >>> c = MambaConfig(embed_dim=4, hidden_size=4, state_size=3, conv_size=3, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 4))
    >>> out, buf, h, s = mamba_block_forward_with_saved(p, x, c, 1)
    >>> bool(np.array_equal(out, mamba_block_forward(p, x, c, 1)[0]))
    True
    >>> dx, dbuf, dh0, frag = mamba_block_backward(np.ones_like(out), None, None, s, c)
    >>> dx.shape, dbuf.shape, dh0.shape, set(frag) == set(param_shapes(c)) - {"final_norm"}
    ((2, 5, 4), (2, 2, 8), (2, 8, 3), True)
    """
    c = as_config(config)
    b = _block_name(layer_idx)
    u, s_norm = norm_forward(params, x, c, f"{b}_norm")                          # [b, L, H]
    xs0, z, s_in = in_proj_forward(params, u, c, f"{b}_in_proj")                 # [b, L, E] x2
    xs, conv_buffer, s_conv = conv_silu_forward(params, xs0, c, f"{b}_conv_dw_conv",
                                                conv_buffer)                     # [b, L, E]
    delta_raw, B, C, s_proj = ssm_projections_forward(params, xs, c, f"{b}_ssm")  # E; N, N
    y, h_last, s_scan = ssm_scan_forward(params, xs, z, delta_raw, B, C, c, f"{b}_ssm", h0,
                                         engine=engine)                          # [b, L, E]
    out, s_out = dense_layer_forward(params, y, f"{b}_out_proj")                 # [b, L, H]
    saved = MambaBlockSaved(int(layer_idx), s_norm, s_in, s_conv, s_proj, s_scan, s_out)
    return out, conv_buffer, h_last, saved


def mamba_block_backward(d_out: np.ndarray, d_conv_buffer: Optional[np.ndarray],
                         d_h_last: Optional[np.ndarray], saved: MambaBlockSaved, config):
    """Backward of :func:`mamba_block_forward_with_saved`, the equations in reverse order.

    ``xs`` feeds both the projections and the scan (as ``u``), so its gradient
    is the sum of the two.

    Parameters
    ----------
    d_out : ndarray ``[batch, seq_len, hidden]``
    d_conv_buffer : ndarray ``[batch, conv_size-1, inner]`` or None
        Gradient of the returned conv buffer (None: zero).
    d_h_last : ndarray ``[batch, inner, N]`` or None
        Gradient of the returned state (None: zero).
    saved : MambaBlockSaved
    config : MambaConfig

    Returns
    -------
    dx : ndarray ``[batch, seq_len, hidden]``
        Gradient of the block's input (add the residual's yourself).
    d_conv_buffer0 : ndarray ``[batch, conv_size-1, inner]``
        Gradient of the incoming conv buffer.
    d_h0 : ndarray ``[batch, inner, N]``
        Gradient of the incoming state.
    fragment : dict
        The block's layers of the parameter-gradient tree.

    Examples
    --------
    See :func:`mamba_block_forward_with_saved`.
    """
    c = as_config(config)
    b = _block_name(saved.layer_idx)
    frag = {}
    dy, g = dense_layer_backward(d_out, saved.out_proj, f"{b}_out_proj")
    _merge_grads(frag, g)
    d, g = ssm_scan_backward(dy, d_h_last, saved.scan, c, f"{b}_ssm")
    _merge_grads(frag, g)
    dxs_proj, g = ssm_projections_backward(d["delta_raw"], d["B"], d["C"], saved.projections, c,
                                           f"{b}_ssm")
    _merge_grads(frag, g)
    dxs = d["xs"] + dxs_proj                                 # xs -> projections and scan input
    dxs0, d_conv_buffer0, g = conv_silu_backward(dxs, d_conv_buffer, saved.conv_silu, c,
                                                 f"{b}_conv_dw_conv")
    _merge_grads(frag, g)
    du, g = in_proj_backward(dxs0, d["z"], saved.in_proj, c, f"{b}_in_proj")
    _merge_grads(frag, g)
    dx, g = norm_backward(du, saved.norm, c, f"{b}_norm")
    _merge_grads(frag, g)
    return dx, d_conv_buffer0, d["h0"], frag


class MambaSaved(NamedTuple):
    """What :func:`forward_with_saved` keeps for :func:`backward`.

    Attributes
    ----------
    config : MambaConfig
    input_projection : DenseSaved or None
        None when ``embed_dim == hidden_size`` (no projection).
    blocks : tuple of MambaBlockSaved
        One per layer, in order.
    dropouts : tuple of DropoutSaved or None
        After block ``i`` (``i < num_layers``); None entries when no dropout was
        applied (inference, or ``dropout == 0``). ``DropoutSaved.scale`` is
        the mask divided by ``1 - rate``.
    final_norm : LayerNormSaved or RMSNormSaved or None
    batch, seq_len : int
    return_sequence : bool
        The output was ``[batch, seq_len, hidden]`` (else the last timestep).
    has_state : bool
        A carried ``state`` was given (then :func:`backward` returns its gradient).
    """

    config: MambaConfig
    input_projection: Optional[DenseSaved]
    blocks: tuple
    dropouts: tuple
    final_norm: object
    batch: int
    seq_len: int
    return_sequence: bool
    has_state: bool


class MambaGrads(NamedTuple):
    """What :func:`backward` returns.

    Attributes
    ----------
    x : ndarray ``[batch, seq_len, embed_dim]``
        Gradient of the model input.
    params : dict
        ``{layer: {name: grad}}``, exactly the layers, names, order and shapes
        of the parameter tree (:func:`param_shapes`).
    state : MambaCache or None
        Gradient of the carried initial ``state`` (``h [batch, num_layers,
        inner, N]``, ``conv [batch, num_layers, conv_size-1, inner]``); None
        when :func:`forward_with_saved` was called without one.
    """

    x: np.ndarray
    params: dict
    state: Optional[MambaCache]


def forward_with_saved(params: dict, x, config=None, *, state: Optional[MambaCache] = None,
                       return_sequence: bool = False, training: bool = False, seed=None,
                       engine: str = "numpy"):
    """:func:`forward` that also keeps, per layer, the named values :func:`backward` needs.

    Same arguments and the same numbers as :func:`forward` (dropout included:
    the same ``seed`` draws the same masks, and the masks are saved).

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, embed_dim]``
    config : MambaConfig or dict
    state : MambaCache, optional
        Carried state (then :func:`backward` also returns its gradient).
    return_sequence : bool
    training : bool
        Dropout between blocks (rate ``config.dropout``, needs ``seed``); its
        masks are saved and used by the backward.
    seed : int or numpy Generator
    engine : {"numpy", "numba", "logdepth"}
        Selective-scan engine; its backward is used by :func:`backward`.

    Returns
    -------
    result : MambaOutput
        ``(output, state, hidden_states)``, as :func:`forward`.
    saved : MambaSaved

    Raises
    ------
    ValueError
        As :func:`forward`.

    Examples
    --------
    The gradient of the scalar loss ``sum(W * output)``:

    >>> c = MambaConfig(embed_dim=3, hidden_size=8, state_size=2, num_layers=2)
    >>> params = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 3))
    >>> res, saved = forward_with_saved(params, x, c)
    >>> W = np.random.default_rng(1).standard_normal(res.output.shape)
    >>> grads = backward(W, saved)
    >>> grads.x.shape, grads.state, list(grads.params) == list(params)
    ((2, 5, 3), None, True)

    It agrees with a central finite difference of :func:`forward` along a direction ``V``:

    >>> V = np.random.default_rng(2).standard_normal(x.shape)
    >>> loss = lambda x_: float(np.sum(W * forward(params, x_, c).output))
    >>> fd = (loss(x + 1e-5 * V) - loss(x - 1e-5 * V)) / 2e-5
    >>> bool(abs(fd - np.sum(grads.x * V)) <= 1e-8 * abs(fd))
    True
    """
    c = as_config(config)
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    x = _check_x(x, c)
    params = check_params(params, param_shapes(c))
    batch, seq_len = x.shape[:2]
    has_state = state is not None
    state = init_cache(c, batch, dtype=x.dtype) if state is None else _check_cache(state, c, batch)
    rng = None
    if training and c.dropout > 0:
        if seed is None:
            raise ValueError("forward_with_saved: training=True with dropout > 0 needs seed (int "
                             "or numpy Generator), got None")
        rng = _rng(seed)
    s_input = None
    if "input_projection" in params:
        x, s_input = dense_layer_forward(params, x, "input_projection")  # [batch, L, H]
    hidden_states = [x]
    new_h = np.empty(state.h.shape, dtype=np.result_type(state.h, x))
    new_conv = np.empty(state.conv.shape, dtype=np.result_type(state.conv, x))
    blocks, dropouts = [], []
    for i in range(1, c.num_layers + 1):
        out, new_conv[:, i - 1], new_h[:, i - 1], s_block = mamba_block_forward_with_saved(
            params, x, c, i, state.conv[:, i - 1], state.h[:, i - 1], engine=engine)
        blocks.append(s_block)
        x = x + out                                                       # residual
        if i < c.num_layers:
            s_drop = None
            if rng is not None:                                           # between blocks
                x, s_drop = dropout_forward(x, c.dropout, training=True, rng=rng)
            dropouts.append(s_drop)
        hidden_states.append(x)
    s_final = None
    if c.final_norm:
        x, s_final = norm_forward(params, x, c, "final_norm")
    output = x if return_sequence else x[:, -1]
    saved = MambaSaved(c, s_input, tuple(blocks), tuple(dropouts), s_final, batch, seq_len,
                       bool(return_sequence), has_state)
    return MambaOutput(output, MambaCache(new_h, new_conv), tuple(hidden_states)), saved


def _check_d_state(d_state, c: MambaConfig, batch: int):
    """``d_state`` as ``(h or None, conv or None)`` with the cache's shapes."""
    return state_gradients(d_state, "a MambaCache (h, conv)", (
        ("h", (batch, c.num_layers, c.inner_size, c.state_size), "[batch, num_layers, inner, state]"),
        ("conv", (batch, c.num_layers, c.conv_size - 1, c.inner_size),
         "[batch, num_layers, conv_size-1, inner]")))


def backward(d_out, saved: MambaSaved, *, d_state: Optional[MambaCache] = None) -> MambaGrads:
    """Manual backward of the whole model: gradients of a scalar loss from those of the outputs.

    Given ``d_out = dLoss/d output`` (and optionally ``d_state = dLoss/d state``,
    the returned carried state, for a loss on it or to backpropagate through
    the next chunk), returns ``dLoss/dx``, ``dLoss/dparams`` in the tree's
    layout, and ``dLoss/d state_in`` when a carried state was given. Runs the
    forward's equations in reverse: final norm, then per block (last first)
    dropout, residual (``dx += d block_input``), the block's backward, then
    the input projection.

    Parameters
    ----------
    d_out : ndarray
        ``[batch, hidden]`` (last timestep) or ``[batch, seq_len, hidden]``
        (``return_sequence``), as the forward's output.
    saved : MambaSaved
        From :func:`forward_with_saved` (its scan engine's backward is used).
    d_state : MambaCache, optional
        Gradients of the returned state, ``h [batch, num_layers, inner, N]``
        and ``conv [batch, num_layers, conv_size-1, inner]`` (either may be
        None; None means zero).

    Returns
    -------
    MambaGrads
        ``(x, params, state)``: ``x [batch, seq_len, embed_dim]``; ``params``
        with exactly the layers and names of the parameter tree; ``state``
        a :class:`MambaCache` of gradients, or None without a carried state.

    Raises
    ------
    ValueError
        ``d_out`` or ``d_state`` of the wrong shape, or not finite.

    Examples
    --------
    Processing in chunks and backpropagating through the carried state gives
    the one-call gradients:

    >>> c = MambaConfig(embed_dim=3, hidden_size=8, state_size=2, conv_size=3, preset="edifice")
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
    """
    dx = output_gradient(d_out, saved, MambaSaved)  # [batch, L, H]
    c = saved.config
    batch = saved.batch
    d_h, d_conv = _check_d_state(d_state, c, batch)
    dtype = dx.dtype
    dparams = {}
    # --- output ---------------------------------------------------------------
    if saved.final_norm is not None:
        dx, g = norm_backward(dx, saved.final_norm, c, "final_norm")
        _merge_grads(dparams, g)
    # --- blocks, last first: x_i = dropout(x_{i-1} + block_i(x_{i-1})) ------
    dh0 = np.zeros((batch, c.num_layers, c.inner_size, c.state_size), dtype=dtype)
    dconv0 = np.zeros((batch, c.num_layers, c.conv_size - 1, c.inner_size), dtype=dtype)
    for i in range(c.num_layers, 0, -1):
        if i < c.num_layers and saved.dropouts[i - 1] is not None:
            dx = dropout_backward(dx, saved.dropouts[i - 1])["x"]
        d_block_in, dconv0[:, i - 1], dh0[:, i - 1], g = mamba_block_backward(
            dx, None if d_conv is None else d_conv[:, i - 1],
            None if d_h is None else d_h[:, i - 1], saved.blocks[i - 1], c)
        _merge_grads(dparams, g)
        dx = dx + d_block_in                                              # residual
    if saved.input_projection is not None:
        dx, g = dense_layer_backward(dx, saved.input_projection, "input_projection")
        _merge_grads(dparams, g)
    tree = grad_tree(dparams, param_shapes(c))                            # the params' order
    d_state_in = MambaCache(dh0, dconv0) if saved.has_state else None
    return MambaGrads(dx, tree, d_state_in)
