"""GatedSSM (Edifice ``Edifice.SSM.GatedSSM``; no paper), the whole model: config,
parameters, forward, O(1) stepping, exact parameter count, manual backward.

A Mamba-shaped model whose selective scan is replaced by two sigmoid gates and
a moving average: "a simplified gated temporal network inspired by state space
models", *not* Mamba (DESIGN.md sections 1 and 1.2)::

    x [batch, seq_len, embed_dim]
      -> input_projection                 dense embed_dim -> hidden (only if they differ)
      -> x = x + mamba_block_i(x)         i = 1 .. num_layers (dropout between blocks, training only)
      -> last timestep [batch, hidden]    (or the whole sequence); no final norm

    mamba_block(x):                                            shapes
        u      = LayerNorm(x)                                  [batch, L, hidden]
        xs, z  = split(in_proj(u))                             [batch, L, inner] each, inner = expand*hidden
        xs     = silu(conv_proj(causal_mean(xs, conv_size)))   window mean (zero left pad), dense inner->inner
        B, C   = split(bc_proj(xs))                            [batch, L, N] each
        delta  = softplus(dt_proj(dt_rank(xs)))                inner -> dt_rank -> inner, dt_rank = hidden div N
        g      = sigmoid(mean_c delta)                         [batch, L, 1]
        s      = sigmoid(sum_n B * C)                          [batch, L, 1]
        gx     = g * s * xs
        ctx_t  = alpha ctx_{t-1} + (1 - alpha) gx_t            scan_mode "causal" (alpha = 0.9)
        y      = gx + (1 - g) * ctx
        out    = out_proj(y * silu(z))                         [batch, L, hidden]

The gated core (``g``, ``s``, the context, ``y``) with its manual backward and
a Numba engine is :mod:`refssm.ssm.gated_ema`. Every layer of the block has a
``*_forward`` returning its saved values and a ``*_backward`` next to it;
:func:`forward_with_saved` and :func:`backward` give the gradients of the
whole model (input, every parameter, the carried state), in both scan modes.

``scan_mode`` (a flag; the presets set it):

``"causal"`` (preset ``causal``, the default)
    The EMA recurrence above. Causal, a carried context ``[batch, inner]`` per
    layer: :func:`step` gives the full forward's numbers frame by frame and
    :func:`forward` continues a sequence from a previous call's state.
``"legacy"`` (preset ``edifice``: Edifice v0.2's forward, verbatim)
    ``ctx_t = gx_t * alpha^(L-1-t) / sum_s alpha^(L-1-s)``: each frame scaled
    by a weight normalised over the *whole* sequence length ``L`` (Edifice's
    ``cumulative_ema``; it sums nothing over time). The output at ``t``
    depends on how long the sequence is, and on nothing before ``t`` but the
    conv window: it is neither a recurrence nor causal in the usual sense
    (extending the sequence changes earlier outputs), so there is no state to
    carry. :func:`init_cache` and :func:`step` refuse it, and so does
    :func:`forward` with a ``state``.

Edifice's own ``GatedSSM.step`` does not compute its forward (it runs a
Mamba-like recurrence with ``A = -1``, ``softplus`` applied as ``dt +
log(1 + exp(dt))``, a mean over the whole batch, and no input projection by
default), so it is not reproduced: here ``step`` is exactly the causal
forward, one frame at a time.

Parameters are ``params[layer][name]`` with the original API's layer names
(``input_projection``, ``mamba_block_i_norm``, ``mamba_block_i_in_proj``,
``mamba_block_i_conv_proj``, ``mamba_block_i_ssm_bc_proj``,
``mamba_block_i_ssm_dt_rank``, ``mamba_block_i_ssm_dt_proj``,
``mamba_block_i_out_proj``) and Axon's layouts and initialisers (dense
``kernel [in, out]`` glorot-uniform, ``bias [out]`` zero; LayerNorm ``gamma``
1, ``beta`` 0); see :func:`param_shapes`.

Examples
--------
The two scan modes, and why only one of them can be stepped:

>>> causal = build(embed_dim=3, hidden_size=8, state_size=2, seed=0)
>>> legacy = GatedSSMModel(causal.config.replace(preset="edifice"), causal.params)
>>> x = np.random.default_rng(0).standard_normal((1, 12, 3))
>>> short, long = x[:, :8], x
>>> # causal: the output at t = 7 is the same whether or not frames 8.. follow
>>> bool(np.allclose(causal(short), causal(long, return_sequence=True)[:, 7], rtol=0, atol=1e-14))
True
>>> # legacy: the weights are normalised over the length, so t = 7 changes
>>> bool(np.allclose(legacy(short), legacy(long, return_sequence=True)[:, 7], rtol=0, atol=1e-4))
False
>>> legacy.init_cache()
Traceback (most recent call last):
...
ValueError: GatedSSM scan_mode 'legacy' cannot be stepped: its context weights alpha^(L-1-t) / sum_s alpha^(L-1-s) are normalised over the whole sequence length L, so the output at t depends on frames not yet seen and no carried state reproduces it; use scan_mode='causal' (the default) to step
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import numpy as np

from .._validate import as_float_array
from ..ops.activations import (ActivationSaved, inverse_softplus, silu_backward, silu_forward,
                               softplus_backward, softplus_forward)
from ..ops.dense import DenseSaved, dense_forward
from ..ops.dropout import dropout_backward, dropout_forward
from ..ops.norms import LayerNormSaved, layer_norm_backward, layer_norm_forward
from ..ops.pooling import (CausalMeanSaved, causal_mean_backward, causal_mean_forward,
                           causal_mean_step)
from ..ssm.gated_ema import (ENGINES, GatedEMASaved, gated_ema_backward, gated_ema_forward,
                             gated_ema_step)
from ._common import (_choice, _float, _merge_grads, _positive_int, _rng, check_params,
                      count_params, dense_layer_backward, dense_layer_forward, grad_tree,
                      output_gradient, state_gradients)
from .mamba import _dense_params

__all__ = [
    "GatedSSMConfig", "PRESETS", "FLAGS", "GatedSSMCache", "GatedSSMOutput", "GatedSSMModel",
    "build", "build_checkpointed", "build_mamba_block", "build_selective_ssm",
    "build_causal_conv1d",
    "forward", "mamba_block_forward", "selective_ssm_forward", "causal_conv1d_forward",
    "init_cache", "step", "mamba_block_step", "selective_ssm_step", "causal_conv1d_step",
    # manual backward: per-layer forward (output + saved values) and backward pairs
    "norm_forward", "norm_backward", "in_proj_forward", "in_proj_backward",
    "CausalConv1dSaved", "causal_conv1d_backward", "ProjectionsSaved",
    "ssm_projections_forward", "ssm_projections_backward", "SelectiveSSMSaved",
    "selective_ssm_backward", "OutputGateSaved", "output_gate_forward", "output_gate_backward",
    "GatedSSMBlockSaved", "mamba_block_forward_with_saved", "mamba_block_backward",
    "GatedSSMSaved", "GatedSSMGrads", "forward_with_saved", "backward",
    "output_size", "param_count", "param_count_breakdown", "original_param_count",
    "original_param_count_terms",
    "param_shapes", "random_params", "recommended_defaults", "as_config",
]

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

#: The presets: named bundles of flags.
PRESETS = {
    "causal": dict(scan_mode="causal"),
    "edifice": dict(scan_mode="legacy"),
}

#: Every flag with its meaning (values: first the ``causal`` preset's).
FLAGS = {
    "scan_mode": "'causal' (ctx_t = alpha ctx_{t-1} + (1 - alpha) gx_t; steps exactly) or "
                 "'legacy' (Edifice: ctx_t = gx_t alpha^(L-1-t) / sum_s alpha^(L-1-s); "
                 "depends on the length, cannot be stepped)",
}

_SIZES = dict(hidden_size=256, state_size=16, expand_factor=2, conv_size=4, num_layers=2,
              checkpoint_every=1)
_OTHER = dict(dropout=0.0, window_size=60, seq_len=None, alpha=0.9, norm_eps=1e-5)

_LEGACY_STEP = ("GatedSSM scan_mode 'legacy' cannot be stepped: its context weights "
                "alpha^(L-1-t) / sum_s alpha^(L-1-s) are normalised over the whole sequence "
                "length L, so the output at t depends on frames not yet seen and no carried "
                "state reproduces it; use scan_mode='causal' (the default) to step")


@dataclass(frozen=True, init=False)
class GatedSSMConfig:
    """GatedSSM options: the original API's names and defaults, plus the flag.

    Parameters
    ----------
    embed_dim : int
        Size of each input frame (required).
    hidden_size : int, default 256
    state_size : int, default 16
        ``N``, the size of ``B`` and ``C``.
    expand_factor : int, default 2
        ``inner = expand_factor * hidden_size``.
    conv_size : int, default 4
        Window of the causal mean.
    num_layers : int, default 2
    dropout : float, default 0.0
        Between blocks, only when ``training=True``.
    window_size : int, default 60
    seq_len : int, optional
        Defaults to ``window_size``. Informational.
    checkpoint_every : int, default 1
        :func:`build_checkpointed`'s option (the same graph). Recorded only:
        :func:`forward_with_saved` keeps every layer's saved values, it does
        not yet recompute layers to save memory.
    preset : {"causal", "edifice"}, default "causal"
    scan_mode : {"causal", "legacy"}
        The flag (see :data:`FLAGS`); overrides the preset's value.
    alpha : float, default 0.9
        EMA decay, in ``[0, 1]`` (Edifice: fixed 0.9).
    norm_eps : float, default 1e-5

    Raises
    ------
    ValueError
        Missing ``embed_dim``, an unknown option or preset, a bad value, or
        ``hidden_size < state_size`` (``dt_rank = hidden_size div state_size``
        would be 0).

    Examples
    --------
    >>> cfg = GatedSSMConfig(embed_dim=8, hidden_size=32, state_size=4)
    >>> cfg.inner_size, cfg.dt_rank_size, cfg.scan_mode, cfg.alpha
    (64, 8, 'causal', 0.9)
    >>> GatedSSMConfig(embed_dim=8, preset="edifice").scan_mode
    'legacy'
    >>> GatedSSMConfig(embed_dim=8, hidden_size=8, state_size=16)
    Traceback (most recent call last):
    ...
    ValueError: dt_rank = hidden_size div state_size: expected >= 1, got 8 div 16 = 0 (need hidden_size >= state_size)
    """

    embed_dim: int
    hidden_size: int
    state_size: int
    expand_factor: int
    conv_size: int
    num_layers: int
    checkpoint_every: int
    dropout: float
    window_size: int
    seq_len: int
    preset: str
    scan_mode: str
    alpha: float
    norm_eps: float

    def __init__(self, embed_dim=None, *, preset="causal", **opts):
        known = {f.name for f in fields(GatedSSMConfig)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown GatedSSM option(s) {unknown}; expected some of "
                             f"{sorted(known)}")
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
        set_("scan_mode", _choice(values["scan_mode"], "scan_mode", ("causal", "legacy")))
        set_("alpha", _float(values["alpha"], "alpha", 0.0, 1.0))
        set_("norm_eps", _float(values["norm_eps"], "norm_eps", 0.0, lo_open=True))
        if self.hidden_size // self.state_size < 1:
            raise ValueError(f"dt_rank = hidden_size div state_size: expected >= 1, got "
                             f"{self.hidden_size} div {self.state_size} = 0 (need hidden_size "
                             f">= state_size)")

    # --- derived sizes -----------------------------------------------------
    @property
    def inner_size(self) -> int:
        """``expand_factor * hidden_size``."""
        return self.expand_factor * self.hidden_size

    @property
    def dt_rank_size(self) -> int:
        """``hidden_size div state_size`` (Edifice's ``dt_rank``)."""
        return self.hidden_size // self.state_size

    def to_dict(self) -> dict:
        """Every option by name (``GatedSSMConfig(**cfg.to_dict())`` rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "GatedSSMConfig":
        """A copy with ``changes``; a new ``preset`` re-fills the flags not given.

        Examples
        --------
        >>> GatedSSMConfig(embed_dim=4).replace(preset="edifice").scan_mode
        'legacy'
        """
        opts = self.to_dict()
        if "preset" in changes and changes["preset"] != self.preset:
            for flag in FLAGS:
                opts.pop(flag)
        opts.update(changes)
        return GatedSSMConfig(**opts)


def as_config(config=None, **opts) -> GatedSSMConfig:
    """A :class:`GatedSSMConfig` from a config, a dict of options, or keyword options.

    Examples
    --------
    >>> as_config({"embed_dim": 3}).hidden_size
    256
    """
    if isinstance(config, GatedSSMConfig):
        return config.replace(**opts) if opts else config
    if config is None:
        return GatedSSMConfig(**opts)
    if isinstance(config, dict):
        return GatedSSMConfig(**{**config, **opts})
    raise ValueError(f"config: expected a GatedSSMConfig or a dict of options, got "
                     f"{type(config).__name__}")


def recommended_defaults() -> dict:
    """The original API's 60 fps real-time profile (``window_size`` 60).

    Examples
    --------
    >>> recommended_defaults()["window_size"], recommended_defaults()["dropout"]
    (60, 0.1)
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
    if isinstance(config, GatedSSMConfig):
        return config.hidden_size
    opts = {**(config or {}), **opts}
    opts.setdefault("embed_dim", 1)
    return as_config(**opts).hidden_size


# ---------------------------------------------------------------------------
# Parameter names, shapes and exact count
# ---------------------------------------------------------------------------

def _block_name(i: int) -> str:
    return f"mamba_block_{i}"


def _dense_shape(n_in, n_out):
    return {"kernel": (n_in, n_out), "bias": (n_out,)}


def param_shapes(config) -> dict:
    """``{layer: {name: shape}}`` of the parameter tree for ``config``.

    Every dense layer has a bias (Axon's default), as in Edifice.

    Examples
    --------
    >>> shapes = param_shapes(GatedSSMConfig(embed_dim=4, hidden_size=8, state_size=2, num_layers=1))
    >>> shapes["mamba_block_1_conv_proj"], shapes["mamba_block_1_ssm_dt_rank"]
    ({'kernel': (16, 16), 'bias': (16,)}, {'kernel': (16, 4), 'bias': (4,)})
    """
    c = as_config(config)
    H, E, N, R = c.hidden_size, c.inner_size, c.state_size, c.dt_rank_size
    shapes = {}
    if c.embed_dim != H:
        shapes["input_projection"] = _dense_shape(c.embed_dim, H)
    for i in range(1, c.num_layers + 1):
        b = _block_name(i)
        shapes[f"{b}_norm"] = {"gamma": (H,), "beta": (H,)}
        shapes[f"{b}_in_proj"] = _dense_shape(H, 2 * E)
        shapes[f"{b}_conv_proj"] = _dense_shape(E, E)
        shapes[f"{b}_ssm_bc_proj"] = _dense_shape(E, 2 * N)
        shapes[f"{b}_ssm_dt_rank"] = _dense_shape(E, R)
        shapes[f"{b}_ssm_dt_proj"] = _dense_shape(R, E)
        shapes[f"{b}_out_proj"] = _dense_shape(E, H)
    return shapes


def param_count_breakdown(config) -> dict:
    """The exact parameter count term by term (closed form, one entry per parameter group).

    Per layer, with ``H = hidden``, ``E = inner``, ``N = state``, ``R = hidden div N``::

        norm        2H                  LayerNorm gamma, beta
        in_proj     2HE + 2E
        conv_proj   E^2 + E             the dense layer after the window mean
        bc_proj     2EN + 2N
        dt_rank     ER + R
        dt_proj     RE + E
        out_proj    EH + H

    plus ``input_projection`` (``embed*H + H``, only if ``embed != H``). No
    final norm. Totals are summed over layers.

    Examples
    --------
    >>> param_count_breakdown(GatedSSMConfig(embed_dim=8, hidden_size=8, state_size=2,
    ...                                      num_layers=1))["conv_proj"]
    272
    """
    c = as_config(config)
    H, E, N, R, L = c.hidden_size, c.inner_size, c.state_size, c.dt_rank_size, c.num_layers
    return {
        "input_projection": (c.embed_dim * H + H) if c.embed_dim != H else 0,
        "norm": L * 2 * H,
        "in_proj": L * (H * 2 * E + 2 * E),
        "conv_proj": L * (E * E + E),
        "bc_proj": L * (E * 2 * N + 2 * N),
        "dt_rank": L * (E * R + R),
        "dt_proj": L * (R * E + E),
        "out_proj": L * (E * H + H),
    }


def param_count(config=None, **opts) -> int:
    """Exact number of parameters: equals the scalars in :func:`build`'s tree.

    Examples
    --------
    >>> cfg = GatedSSMConfig(embed_dim=8, hidden_size=16, state_size=4)
    >>> param_count(cfg) == build(cfg).param_count_tree()
    True
    """
    return int(sum(param_count_breakdown(as_config(config, **opts)).values()))


def original_param_count_terms(config=None, **opts) -> dict:
    """The original API's *approximate* formula (Edifice ``GatedSSM.param_count/1``), term by term.

    The terms of ``lib/edifice/ssm/gated_ssm.ex``'s formula, each summed over
    the layers, with ``H = hidden``, ``E = inner``, ``N = state`` and
    ``R = H div N``::

        input_projection   embed*H   only if embed != H; no bias
        in_proj            2HE       kernel only
        conv               4E        "conv (simplified)": 4 taps per channel, a
                                     literal 4 whatever ``conv_size``; the model
                                     has a dense E x E ``conv_proj`` instead
        bc_proj            2EN       kernel only
        dt_rank            ER        kernel only
        dt_proj            RE        kernel only
        out_proj           EH        kernel only

    No bias and no LayerNorm is counted (``refssm.verify.models.compare_count_terms``
    sets these beside the exact :func:`param_count_breakdown`). Edifice reads
    ``:embed_dim`` with a fallback of 1991 when none is given; here it is
    always given. The values sum to :func:`original_param_count`.

    Examples
    --------
    >>> t = original_param_count_terms(embed_dim=287)
    >>> t["conv"], original_param_count_terms(embed_dim=287, conv_size=3)["conv"]
    (4096, 4096)
    """
    c = as_config(config, **opts)
    H, E, N, L = c.hidden_size, c.inner_size, c.state_size, c.num_layers
    R = H // N
    return {
        "input_projection": c.embed_dim * H if c.embed_dim != H else 0,
        "in_proj": L * H * 2 * E,
        "conv": L * E * 4,
        "bc_proj": L * E * 2 * N,
        "dt_rank": L * E * R,
        "dt_proj": L * R * E,
        "out_proj": L * E * H,
    }


def original_param_count(config=None, **opts) -> int:
    """The original API's *approximate* count (Edifice ``GatedSSM.param_count/1``).

    Per layer ``2HE + 4E + 2EN + ER + RE + EH`` with ``R = H div N``, plus
    ``embed*H`` if ``embed != H``: the sum of :func:`original_param_count_terms`.
    Against the exact count (:func:`param_count_breakdown`) it leaves out every
    bias, the LayerNorms, and takes the conv as ``4E`` ("conv (simplified)": a
    depthwise kernel of 4 taps, whatever ``conv_size``), where the model has a
    dense ``E x E`` projection after the window mean (``E^2 + E``).

    Examples
    --------
    >>> original_param_count(embed_dim=1991)      # Edifice's default embed_dim
    1365760
    """
    return int(sum(original_param_count_terms(config, **opts).values()))


# ---------------------------------------------------------------------------
# Builders (initialised parameters: Axon's glorot-uniform kernels, zero biases)
# ---------------------------------------------------------------------------

def _glorot_dense(rng, n_in, n_out):
    return _dense_params(rng, n_in, n_out, True, "glorot")


def build_causal_conv1d(channels: int, kernel_size: int, name: str, *, rng=None) -> dict:
    """Parameters of the causal "conv": a window mean (no parameters) then ``{name}_proj``.

    Parameters
    ----------
    channels : int
        ``inner``.
    kernel_size : int
        The mean's window (no parameters; checked only).
    name : str
        ``mamba_block_1_conv`` gives the layer ``mamba_block_1_conv_proj``.
    rng : numpy Generator or int seed

    Returns
    -------
    dict
        ``{f"{name}_proj": {"kernel": [channels, channels], "bias": [channels]}}``

    Examples
    --------
    >>> p = build_causal_conv1d(6, 4, "blk_conv", rng=0)
    >>> {k: v.shape for k, v in p["blk_conv_proj"].items()}
    {'kernel': (6, 6), 'bias': (6,)}
    """
    channels = _positive_int(channels, "channels")
    _positive_int(kernel_size, "kernel_size")
    return {f"{name}_proj": _glorot_dense(_rng(rng), channels, channels)}


def build_selective_ssm(config, name: str, rng=None) -> dict:
    """Parameters of the gated SSM of one block: ``{name}_bc_proj`` (``inner -> 2N``,
    columns ``[B; C]``), ``{name}_dt_rank`` (``inner -> dt_rank``), ``{name}_dt_proj``
    (``dt_rank -> inner``), all with bias. The core itself has no parameters.

    Examples
    --------
    >>> p = build_selective_ssm(GatedSSMConfig(embed_dim=4, hidden_size=8, state_size=4),
    ...                         "mamba_block_1_ssm", rng=0)
    >>> {k: v["kernel"].shape for k, v in p.items()}
    {'mamba_block_1_ssm_bc_proj': (16, 8), 'mamba_block_1_ssm_dt_rank': (16, 2), 'mamba_block_1_ssm_dt_proj': (2, 16)}
    """
    c = as_config(config)
    rng = _rng(rng)
    E, N, R = c.inner_size, c.state_size, c.dt_rank_size
    return {f"{name}_bc_proj": _glorot_dense(rng, E, 2 * N),
            f"{name}_dt_rank": _glorot_dense(rng, E, R),
            f"{name}_dt_proj": _glorot_dense(rng, R, E)}


def build_mamba_block(config, layer_idx: int = 1, rng=None, name: Optional[str] = None) -> dict:
    """Parameters of block ``layer_idx`` (layers ``mamba_block_{i}_*``).

    Returns
    -------
    dict
        ``{name}_norm``, ``{name}_in_proj``, ``{name}_conv_proj``, the SSM's
        layers (:func:`build_selective_ssm`) and ``{name}_out_proj``.

    Examples
    --------
    >>> p = build_mamba_block(GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2), 2, rng=0)
    >>> sorted(p)[:3]
    ['mamba_block_2_conv_proj', 'mamba_block_2_in_proj', 'mamba_block_2_norm']
    """
    c = as_config(config)
    rng = _rng(rng)
    layer_idx = _positive_int(layer_idx, "layer_idx")
    name = name or _block_name(layer_idx)
    H, E = c.hidden_size, c.inner_size
    p = {f"{name}_norm": {"gamma": np.ones(H), "beta": np.zeros(H)},
         f"{name}_in_proj": _glorot_dense(rng, H, 2 * E)}
    p.update(build_causal_conv1d(E, c.conv_size, f"{name}_conv", rng=rng))
    p.update(build_selective_ssm(c, f"{name}_ssm", rng))
    p[f"{name}_out_proj"] = _glorot_dense(rng, E, H)
    return p


def random_params(config=None, seed=0, *, delta_range=(0.2, 2.0), **opts) -> dict:
    """Parameters *with teeth*, for tests and golden fixtures (not an initialisation).

    Every parameter random and away from the value that would hide a bug in
    its path: LayerNorm ``gamma = 1 + 0.2 N(0,1)``, ``beta = 0.2 N(0,1)``,
    biases ``0.1 N(0,1)``, kernels ``U(+-sqrt(3/fan_in))`` (unit-variance
    outputs), except:

    * ``dt_proj``: ``bias = softplus^-1(dt)``, ``dt`` log-uniform in
      ``delta_range``; kernel ``(0.5 U(-1, 1) + r) / sqrt(dt_rank)`` with one
      ``r ~ N(0, 1)`` shared by each row, so that ``delta`` varies over
      channels and its channel mean over frames: the selection gate ``g =
      sigmoid(mean delta)`` moves from frame to frame inside ``(1/2, 1)``
      (typically 0.55-0.85), and both ``g x`` and the context term ``(1 - g) ctx``
      count;
    * ``bc_proj``: kernel scaled by ``1.7 N^-1/4``, so that ``sum_n B C`` is of
      order 1 and the gate ``s = sigmoid(B . C)`` spreads over ``(0, 1)``
      (typically 0.1-0.95) without saturating.

    The context decays as ``alpha^t`` (0.9: ~10 frames), well beyond the
    window of the mean (``conv_size``).

    Examples
    --------
    >>> cfg = GatedSSMConfig(embed_dim=3, hidden_size=8, state_size=2)
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
                if name == "kernel":                              # per channel + shared per row
                    shared = rng.standard_normal((shape[0], 1))
                    p[name] = (0.5 * rng.uniform(-1.0, 1.0, shape) + shared) / np.sqrt(shape[0])
                else:
                    p[name] = inverse_softplus(np.exp(rng.uniform(np.log(lo), np.log(hi), shape)))
            elif name == "gamma":
                p[name] = 1.0 + 0.2 * rng.standard_normal(shape)
            elif name == "beta":
                p[name] = 0.2 * rng.standard_normal(shape)
            elif name == "bias":
                p[name] = 0.1 * rng.standard_normal(shape)
            else:                                                  # dense kernel [in, out]
                scale = np.sqrt(3.0 / shape[0])
                if layer.endswith("_bc_proj"):
                    scale *= 1.7 * c.state_size ** -0.25
                p[name] = rng.uniform(-1.0, 1.0, shape) * scale
        params[layer] = p
    return params


class GatedSSMModel:
    """A config and its parameters, with the model's functions as methods.

    ``model(x)`` is :func:`forward`'s output; ``model.forward(x, ...)`` the full
    :class:`GatedSSMOutput`; ``model.step(cache, frame)`` is :func:`step`.

    Attributes
    ----------
    checkpoint_every : int or None
        Set by :func:`build_checkpointed` (the same forward; recorded for a
        memory-saving backward, which :func:`backward` does not do yet).

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=2, num_layers=1, seed=0)
    >>> model(np.ones((2, 5, 3))).shape
    (2, 8)
    """

    def __init__(self, config, params: dict, checkpoint_every: Optional[int] = None):
        self.config = as_config(config)
        self.params = params
        self.checkpoint_every = checkpoint_every

    def __call__(self, x, **kwargs):
        return forward(self.params, x, self.config, **kwargs).output

    def forward(self, x, **kwargs) -> "GatedSSMOutput":
        return forward(self.params, x, self.config, **kwargs)

    def forward_with_saved(self, x, **kwargs):
        """:func:`forward_with_saved` with this model's parameters and config."""
        return forward_with_saved(self.params, x, self.config, **kwargs)

    def backward(self, d_out, saved, **kwargs) -> "GatedSSMGrads":
        """:func:`backward` (``saved`` from :meth:`forward_with_saved`)."""
        return backward(d_out, saved, **kwargs)

    def init_cache(self, batch_size: int = 1) -> "GatedSSMCache":
        return init_cache(self.config, batch_size)

    def step(self, cache: "GatedSSMCache", frame):
        return step(self.params, cache, frame, self.config)

    def param_count(self) -> int:
        """The exact formula :func:`param_count` for this config."""
        return param_count(self.config)

    def param_count_tree(self) -> int:
        """The scalars actually in ``self.params``."""
        return count_params(self.params)

    def __repr__(self):
        ck = "" if self.checkpoint_every is None else f", checkpoint_every={self.checkpoint_every}"
        return f"GatedSSMModel({self.config!r}{ck})"


def build(config=None, *, seed=0, **opts) -> GatedSSMModel:
    """Build a GatedSSM: config -> :class:`GatedSSMModel` with initialised parameters.

    Parameters
    ----------
    config : GatedSSMConfig or dict, optional
        Or give the options as keywords (``embed_dim`` required).
    seed : int or numpy Generator

    Examples
    --------
    >>> model = build(embed_dim=287, hidden_size=32, state_size=4, seed=1)
    >>> sorted(model.params)[:3]
    ['input_projection', 'mamba_block_1_conv_proj', 'mamba_block_1_in_proj']
    """
    c = as_config(config, **opts)
    rng = _rng(seed)
    params = {}
    if c.embed_dim != c.hidden_size:
        params["input_projection"] = _glorot_dense(rng, c.embed_dim, c.hidden_size)
    for i in range(1, c.num_layers + 1):
        params.update(build_mamba_block(c, i, rng))
    return GatedSSMModel(c, params)


def build_checkpointed(config=None, *, seed=0, **opts) -> GatedSSMModel:
    """:func:`build` with gradient checkpointing every ``checkpoint_every`` layers.

    The same graph, parameters and numbers as :func:`build` (in Edifice the
    checkpoint is an identity marker too); the model records
    ``checkpoint_every`` for a memory-saving backward. :func:`backward` does
    not use it yet: :func:`forward_with_saved` keeps every layer's saved
    values (the gradients are the same either way).

    Examples
    --------
    >>> a = build_checkpointed(embed_dim=3, hidden_size=8, state_size=2, checkpoint_every=2)
    >>> b = build(embed_dim=3, hidden_size=8, state_size=2)
    >>> a.checkpoint_every, bool(np.array_equal(a(np.ones((1, 4, 3))), b(np.ones((1, 4, 3)))))
    (2, True)
    """
    model = build(config, seed=seed, **opts)
    model.checkpoint_every = model.config.checkpoint_every
    return model


# ---------------------------------------------------------------------------
# Forward (whole sequence or chunk)
# ---------------------------------------------------------------------------

class GatedSSMCache(NamedTuple):
    """The carried state (causal mode): everything needed to continue a sequence.

    Attributes
    ----------
    context : ndarray ``[batch, num_layers, inner]``
        ``ctx`` of every layer after the last frame seen.
    conv : ndarray ``[batch, num_layers, conv_size-1, inner]``
        The last ``conv_size - 1`` inputs of every layer's window mean (oldest first).
    """

    context: np.ndarray
    conv: np.ndarray


class GatedSSMOutput(NamedTuple):
    """What :func:`forward` returns.

    Attributes
    ----------
    output : ndarray
        ``[batch, hidden]`` (last timestep) or ``[batch, seq_len, hidden]``.
    state : GatedSSMCache or None
        The state after the last frame (None in legacy mode).
    hidden_states : tuple of ndarray ``[batch, seq_len, hidden]``
        Entry 0 is the input of block 1 (after the input projection), entry
        ``i`` the output of block ``i`` (after its residual and dropout).
    """

    output: np.ndarray
    state: Optional[GatedSSMCache]
    hidden_states: tuple


def _refuse_legacy(c: GatedSSMConfig):
    if c.scan_mode == "legacy":
        raise ValueError(_LEGACY_STEP)


def init_cache(config=None, batch_size: int = 1, dtype=np.float64, **opts) -> GatedSSMCache:
    """Zero state for a fresh sequence (causal mode only).

    Raises
    ------
    ValueError
        In legacy mode (it has no state; see the module docstring).

    Examples
    --------
    >>> cache = init_cache(GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2), batch_size=2)
    >>> cache.context.shape, cache.conv.shape
    ((2, 2, 8), (2, 2, 3, 8))
    """
    c = as_config(config, **opts)
    _refuse_legacy(c)
    batch_size = _positive_int(batch_size, "batch_size")
    return GatedSSMCache(
        context=np.zeros((batch_size, c.num_layers, c.inner_size), dtype=dtype),
        conv=np.zeros((batch_size, c.num_layers, c.conv_size - 1, c.inner_size), dtype=dtype))


def _check_cache(cache, c: GatedSSMConfig, batch: int) -> GatedSSMCache:
    if not (isinstance(cache, tuple) and len(cache) == 2):
        raise ValueError(f"cache: expected a GatedSSMCache (context, conv), got "
                         f"{type(cache).__name__}")
    ctx = as_float_array(cache[0], "cache.context", ndim=3)
    conv = as_float_array(cache[1], "cache.conv", ndim=4)
    want_ctx = (batch, c.num_layers, c.inner_size)
    want_conv = (batch, c.num_layers, c.conv_size - 1, c.inner_size)
    if ctx.shape != want_ctx:
        raise ValueError(f"cache.context: expected shape {want_ctx} [batch, num_layers, inner] "
                         f"for this config and batch {batch}, got {ctx.shape}")
    if conv.shape != want_conv:
        raise ValueError(f"cache.conv: expected shape {want_conv} [batch, num_layers, "
                         f"conv_size-1, inner] for this config and batch {batch}, got "
                         f"{conv.shape}")
    return GatedSSMCache(ctx, conv)


def _dense(p: dict, x: np.ndarray) -> np.ndarray:
    return dense_forward(x, p["kernel"], p.get("bias"))[0]


# ---------------------------------------------------------------------------
# The layers of a block: each a forward (its output and its saved values) and
# its backward, side by side
# ---------------------------------------------------------------------------
#
# Notation of the block (DESIGN.md 1.2), shapes with H = hidden, E = inner,
# N = state, R = dt_rank, K = conv_size, L = seq_len:
#
#     u           = LayerNorm(x)                       norm_forward             [b, L, H]
#     xs0, z      = split(in_proj(u))                  in_proj_forward          [b, L, E] each
#     pre         = conv_proj(causal_mean(xs0, K))     causal_conv1d_forward    [b, L, E]
#     xs          = silu(pre)                          silu_forward (the op)    [b, L, E]
#     delta       = softplus(dt_proj(dt_rank(xs)))     ssm_projections_forward  [b, L, E]
#     B, C        = split(bc_proj(xs))                   (same)                 [b, L, N] each
#     y           = gated_ema(xs, delta, B, C)         selective_ssm_forward    [b, L, E]
#                   (projections + the core, refssm.ssm.gated_ema)
#     v           = y * silu(z)                        output_gate_forward      [b, L, E]
#     out         = out_proj(v)                        dense_layer_forward      [b, L, H]
#
# :func:`forward`, :func:`forward_with_saved` and :func:`step` all run these
# functions: there is one copy of the math. Saved values are references to
# arrays the forward computes anyway (the ops' own ``*Saved`` tuples), not
# copies. Every ``*_backward`` takes the gradient of its forward's outputs and
# the forward's saved values and returns the gradient of its inputs and a
# *fragment* ``{layer: {name: grad}}`` of the parameter-gradient tree (the
# layer names of ``params``); the model's :func:`backward` merges them.

def norm_forward(params: dict, x: np.ndarray, config, name: str):
    """``u = LayerNorm(x)`` over ``hidden`` (``gamma``, ``beta``, ``config.norm_eps``).

    Parameters
    ----------
    params : dict
        Reads ``params[name]`` (``mamba_block_{i}_norm``).
    x : ndarray ``[batch, seq_len, hidden]`` (or one frame ``[batch, hidden]``)
    config : GatedSSMConfig
    name : str

    Returns
    -------
    u : ndarray, the shape of ``x``
    saved : LayerNormSaved
        ``x_hat``, ``rstd``, ``gamma``.

    Examples
    --------
    >>> c = GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 3, 4))
    >>> u, s = norm_forward(p, x, c, "mamba_block_1_norm")
    >>> dx, frag = norm_backward(np.ones_like(u), s, c, "mamba_block_1_norm")
    >>> dx.shape, sorted(frag["mamba_block_1_norm"])
    ((2, 3, 4), ['beta', 'gamma'])
    """
    p = params[name]
    return layer_norm_forward(x, p["gamma"], p["beta"], as_config(config).norm_eps)


def norm_backward(du: np.ndarray, saved: LayerNormSaved, config, name: str):
    """Backward of :func:`norm_forward`.

    With ``g = du * gamma``: ``dx = rstd (g - mean(g) - x_hat mean(g x_hat))``;
    ``d gamma = sum du x_hat``, ``d beta = sum du`` (over batch and time).

    Parameters
    ----------
    du : ndarray ``[batch, seq_len, hidden]``
    saved : LayerNormSaved
    config : GatedSSMConfig
    name : str

    Returns
    -------
    dx : ndarray ``[batch, seq_len, hidden]``
    fragment : dict
        ``{name: {"gamma": [hidden], "beta": [hidden]}}``.

    Examples
    --------
    See :func:`norm_forward`.
    """
    g = layer_norm_backward(du, saved)
    return g["x"], {name: {"gamma": g["gamma"], "beta": g["beta"]}}


def in_proj_forward(params: dict, u: np.ndarray, config, name: str):
    """``xs0, z = split(in_proj(u))``: the SSM branch and the gate branch.

    Parameters
    ----------
    params : dict
        Reads ``params[name]`` (``mamba_block_{i}_in_proj``: ``kernel [hidden, 2 inner]``,
        ``bias [2 inner]``).
    u : ndarray ``[batch, seq_len, hidden]`` (or one frame ``[batch, hidden]``)
    config : GatedSSMConfig
    name : str

    Returns
    -------
    xs0 : ndarray ``[batch, seq_len, inner]``
        The first ``inner`` columns (into the causal mean).
    z : ndarray ``[batch, seq_len, inner]``
        The last ``inner`` columns (the output gate).
    saved : DenseSaved

    Examples
    --------
    >>> c = GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> u = np.random.default_rng(0).standard_normal((2, 3, 4))
    >>> xs0, z, s = in_proj_forward(p, u, c, "mamba_block_1_in_proj")
    >>> du, frag = in_proj_backward(np.ones_like(xs0), np.zeros_like(z), s, c,
    ...                             "mamba_block_1_in_proj")
    >>> xs0.shape, du.shape, frag["mamba_block_1_in_proj"]["kernel"].shape
    ((2, 3, 8), (2, 3, 4), (4, 16))
    """
    E = as_config(config).inner_size
    xz, saved = dense_layer_forward(params, u, name)                     # [b, L, 2E]
    return xz[..., :E], xz[..., E:], saved


def in_proj_backward(dxs0: np.ndarray, dz: np.ndarray, saved: DenseSaved, config, name: str):
    """Backward of :func:`in_proj_forward`: ``d xz = [d xs0 ; d z]``, then the dense backward.

    Parameters
    ----------
    dxs0, dz : ndarray ``[batch, seq_len, inner]``
    saved : DenseSaved
    config : GatedSSMConfig
    name : str

    Returns
    -------
    du : ndarray ``[batch, seq_len, hidden]``
    fragment : dict
        ``{name: {"kernel": [hidden, 2 inner], "bias": [2 inner]}}``.

    Examples
    --------
    See :func:`in_proj_forward`.
    """
    return dense_layer_backward(np.concatenate([dxs0, dz], axis=-1), saved, name)


class CausalConv1dSaved(NamedTuple):
    """Saved by :func:`causal_conv1d_forward`.

    Attributes
    ----------
    mean : CausalMeanSaved
        The window and the length (the mean is linear: nothing else).
    proj : DenseSaved
        ``conv_proj``'s input (the window mean ``[batch, seq_len, inner]``) and kernel.
    """

    mean: CausalMeanSaved
    proj: DenseSaved


def causal_conv1d_forward(params: dict, xs: np.ndarray, name: str, window: int,
                          buffer: Optional[np.ndarray] = None):
    """The causal "conv": window mean over ``window`` frames, then the dense ``{name}_proj``.

    ``pre = conv_proj(causal_mean(xs, window))`` (the block's SiLU comes after).

    Parameters
    ----------
    params : dict
        Reads ``params[f"{name}_proj"]`` (``kernel [inner, inner]``, ``bias [inner]``).
    xs : ndarray ``[batch, seq_len, inner]``
    name : str
        ``mamba_block_{i}_conv``.
    window : int
        ``conv_size``.
    buffer : ndarray ``[batch, conv_size-1, inner]``, optional
        The ``conv_size - 1`` frames before ``xs`` (zeros: a fresh sequence).

    Returns
    -------
    pre : ndarray ``[batch, seq_len, inner]``
    buffer : ndarray ``[batch, conv_size-1, inner]``
        The last ``conv_size - 1`` frames of ``[buffer ; xs]`` (the carried state).
    saved : CausalConv1dSaved

    Examples
    --------
    >>> c = GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2, conv_size=3, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> xs0 = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> pre, buf, s = causal_conv1d_forward(p, xs0, "mamba_block_1_conv", 3)
    >>> dxs0, dbuf, frag = causal_conv1d_backward(np.ones_like(pre), None, s, "mamba_block_1_conv")
    >>> buf.shape, dxs0.shape, dbuf.shape, sorted(frag["mamba_block_1_conv_proj"])
    ((2, 2, 8), (2, 5, 8), (2, 2, 8), ['bias', 'kernel'])
    """
    mean, buffer, s_mean = causal_mean_forward(xs, window, buffer)       # [b, L, E]
    pre, s_proj = dense_layer_forward(params, mean, f"{name}_proj")      # [b, L, E]
    return pre, buffer, CausalConv1dSaved(s_mean, s_proj)


def causal_conv1d_backward(d_pre: np.ndarray, d_new_buffer: Optional[np.ndarray],
                           saved: CausalConv1dSaved, name: str):
    """Backward of :func:`causal_conv1d_forward`: the dense backward, then the mean's transpose.

    ``d mean = d pre @ kernel^T``; ``d x_pad[t + k] += d mean[t] / K`` for
    ``k = 0 .. K-1``, with ``d_new_buffer`` added to the frames of ``[buffer ;
    xs]`` the returned buffer was taken from.

    Parameters
    ----------
    d_pre : ndarray ``[batch, seq_len, inner]``
    d_new_buffer : ndarray ``[batch, conv_size-1, inner]`` or None
        Gradient of the returned buffer (None: zero).
    saved : CausalConv1dSaved
    name : str
        ``mamba_block_{i}_conv``.

    Returns
    -------
    dxs : ndarray ``[batch, seq_len, inner]``
    d_buffer : ndarray ``[batch, conv_size-1, inner]``
        Gradient of the incoming ``buffer``.
    fragment : dict
        ``{f"{name}_proj": {"kernel": [inner, inner], "bias": [inner]}}``.

    Examples
    --------
    See :func:`causal_conv1d_forward`.
    """
    d_mean, frag = dense_layer_backward(d_pre, saved.proj, f"{name}_proj")
    g = causal_mean_backward(d_mean, d_new_buffer, saved.mean)
    return g["x"], g["buffer"], frag


class ProjectionsSaved(NamedTuple):
    """Saved by :func:`ssm_projections_forward`.

    Attributes
    ----------
    bc_proj : DenseSaved
        ``xs [b, L, inner] -> [B ; C] [b, L, 2N]``.
    dt_rank : DenseSaved
        ``xs -> dt_low [b, L, R]``.
    dt_proj : DenseSaved
        ``dt_low -> delta_raw [b, L, inner]``.
    softplus : ActivationSaved
        ``delta_raw`` (``delta = softplus(delta_raw)``).
    """

    bc_proj: DenseSaved
    dt_rank: DenseSaved
    dt_proj: DenseSaved
    softplus: ActivationSaved


def ssm_projections_forward(params: dict, xs: np.ndarray, config, name: str):
    """``B, C = split(bc_proj(xs))``; ``delta = softplus(dt_proj(dt_rank(xs)))``.

    Parameters
    ----------
    params : dict
        Reads ``{name}_bc_proj`` (``inner -> 2N``, columns ``[B ; C]``),
        ``{name}_dt_rank`` (``inner -> R``), ``{name}_dt_proj`` (``R -> inner``),
        all with bias.
    xs : ndarray ``[batch, seq_len, inner]`` (or one frame ``[batch, inner]``)
    config : GatedSSMConfig
    name : str
        ``mamba_block_{i}_ssm``.

    Returns
    -------
    delta : ndarray ``[batch, seq_len, inner]``
        After the softplus.
    B, C : ndarray ``[batch, seq_len, N]``
    saved : ProjectionsSaved

    Examples
    --------
    >>> c = GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> xs = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> delta, B, C, s = ssm_projections_forward(p, xs, c, "mamba_block_1_ssm")
    >>> dxs, frag = ssm_projections_backward(np.ones_like(delta), np.ones_like(B),
    ...                                      np.ones_like(C), s, c, "mamba_block_1_ssm")
    >>> delta.shape, B.shape, dxs.shape
    ((2, 5, 8), (2, 5, 2), (2, 5, 8))
    >>> sorted(frag)
    ['mamba_block_1_ssm_bc_proj', 'mamba_block_1_ssm_dt_proj', 'mamba_block_1_ssm_dt_rank']
    """
    N = as_config(config).state_size
    bc, s_bc = dense_layer_forward(params, xs, f"{name}_bc_proj")                 # [..., 2N]
    B, C = bc[..., :N], bc[..., N:]
    dt_low, s_rank = dense_layer_forward(params, xs, f"{name}_dt_rank")           # [..., R]
    delta_raw, s_dt = dense_layer_forward(params, dt_low, f"{name}_dt_proj")      # [..., E]
    delta, s_softplus = softplus_forward(delta_raw)
    return delta, B, C, ProjectionsSaved(s_bc, s_rank, s_dt, s_softplus)


def ssm_projections_backward(d_delta: np.ndarray, dB: np.ndarray, dC: np.ndarray,
                             saved: ProjectionsSaved, config, name: str):
    """Backward of :func:`ssm_projections_forward`.

    ``d delta_raw = d delta * sigmoid(delta_raw)``, through ``dt_proj`` and
    ``dt_rank``; ``d bc = [dB ; dC]`` through ``bc_proj``; the two ``d xs``
    summed (``xs`` feeds both).

    Parameters
    ----------
    d_delta : ndarray ``[batch, seq_len, inner]``
    dB, dC : ndarray ``[batch, seq_len, N]``
    saved : ProjectionsSaved
    config : GatedSSMConfig
    name : str

    Returns
    -------
    dxs : ndarray ``[batch, seq_len, inner]``
    fragment : dict
        ``{name}_bc_proj``, ``{name}_dt_rank``, ``{name}_dt_proj``: ``kernel`` and ``bias`` each.

    Examples
    --------
    See :func:`ssm_projections_forward`.
    """
    frag = {}
    d_delta_raw = softplus_backward(d_delta, saved.softplus)["x"]
    d_dt_low, g = dense_layer_backward(d_delta_raw, saved.dt_proj, f"{name}_dt_proj")
    _merge_grads(frag, g)
    dxs_dt, g = dense_layer_backward(d_dt_low, saved.dt_rank, f"{name}_dt_rank")
    _merge_grads(frag, g)
    dxs_bc, g = dense_layer_backward(np.concatenate([dB, dC], axis=-1), saved.bc_proj,
                                     f"{name}_bc_proj")
    _merge_grads(frag, g)
    return dxs_bc + dxs_dt, frag


class SelectiveSSMSaved(NamedTuple):
    """Saved by :func:`selective_ssm_forward`.

    Attributes
    ----------
    projections : ProjectionsSaved
        ``delta, B, C`` from ``xs``.
    core : GatedEMASaved
        The gated core's own saved values (gates ``g, s``, the context, its engine and mode).
    """

    projections: ProjectionsSaved
    core: GatedEMASaved


def selective_ssm_forward(params: dict, xs: np.ndarray, config, name: str,
                          context0: Optional[np.ndarray] = None, *, engine: str = "numpy"):
    """The gated SSM of one block over a sequence (projections + the gated EMA core).

    Parameters
    ----------
    params : dict
    xs : ndarray ``[batch, seq_len, inner]``
        Input (after the conv + SiLU).
    config : GatedSSMConfig
    name : str
        ``mamba_block_{i}_ssm``.
    context0 : ndarray ``[batch, inner]``, optional
        Context before the first frame (causal mode; zeros if omitted).
    engine : {"numpy", "numba"}

    Returns
    -------
    y : ndarray ``[batch, seq_len, inner]``
        ``gx + (1 - g) ctx`` (before the ``silu(z)`` gate).
    last_context : ndarray ``[batch, inner]`` or None
        None in legacy mode.
    saved : SelectiveSSMSaved

    Examples
    --------
    >>> c = GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> xs = np.random.default_rng(0).standard_normal((2, 5, 8))
    >>> y, last, s = selective_ssm_forward(p, xs, c, "mamba_block_1_ssm")
    >>> dxs, d_ctx0, frag = selective_ssm_backward(np.ones_like(y), None, s, c,
    ...                                            "mamba_block_1_ssm")
    >>> y.shape, last.shape, dxs.shape, d_ctx0.shape
    ((2, 5, 8), (2, 8), (2, 5, 8), (2, 8))
    """
    c = as_config(config)
    delta, B, C, s_proj = ssm_projections_forward(params, xs, c, name)
    y, last, s_core = gated_ema_forward(xs, delta, B, C, alpha=c.alpha, scan_mode=c.scan_mode,
                                        initial_context=context0, engine=engine)
    return y, last, SelectiveSSMSaved(s_proj, s_core)


def selective_ssm_backward(dy: np.ndarray, d_last_context: Optional[np.ndarray],
                           saved: SelectiveSSMSaved, config, name: str):
    """Backward of :func:`selective_ssm_forward`: the core's backward (a reverse-time scan in
    causal mode, :func:`refssm.ssm.gated_ema.gated_ema_backward`), then the projections'.

    ``xs`` feeds both the projections and the core, so its gradient is the sum of the two.

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, inner]``
    d_last_context : ndarray ``[batch, inner]`` or None
        Gradient of the returned ``last_context`` (causal mode; None: zero).
    saved : SelectiveSSMSaved
    config : GatedSSMConfig
    name : str

    Returns
    -------
    dxs : ndarray ``[batch, seq_len, inner]``
    d_context0 : ndarray ``[batch, inner]`` or None
        Gradient of the incoming context (None in legacy mode).
    fragment : dict
        The three projections' ``kernel`` and ``bias`` (the core has no parameters).

    Examples
    --------
    See :func:`selective_ssm_forward`.
    """
    g = gated_ema_backward(dy, d_last_context, saved.core)
    dxs_proj, frag = ssm_projections_backward(g["delta"], g["B"], g["C"], saved.projections,
                                              config, name)
    return g["x"] + dxs_proj, g["initial_context"], frag


class OutputGateSaved(NamedTuple):
    """Saved by :func:`output_gate_forward`.

    Attributes
    ----------
    y : ndarray ``[batch, seq_len, inner]``
        The SSM output.
    silu_z : ndarray ``[batch, seq_len, inner]``
        ``silu(z)``.
    z : ActivationSaved
        ``z`` (for ``silu'``).
    """

    y: np.ndarray
    silu_z: np.ndarray
    z: ActivationSaved


def output_gate_forward(y: np.ndarray, z: np.ndarray):
    """``v = y * silu(z)``: the SSM output gated by the other half of ``in_proj``.

    Parameters
    ----------
    y, z : ndarray ``[batch, seq_len, inner]`` (or one frame ``[batch, inner]``)

    Returns
    -------
    v : ndarray, the shape of ``y``
    saved : OutputGateSaved

    Examples
    --------
    >>> v, s = output_gate_forward(np.array([2.0]), np.array([0.0]))
    >>> v, output_gate_backward(np.array([1.0]), s)
    (array([0.]), (array([0.]), array([1.])))
    """
    silu_z, s_z = silu_forward(z)
    return y * silu_z, OutputGateSaved(y, silu_z, s_z)


def output_gate_backward(dv: np.ndarray, saved: OutputGateSaved):
    """Backward of :func:`output_gate_forward`: ``dy = dv silu(z)``, ``dz = dv y silu'(z)``.

    Parameters
    ----------
    dv : ndarray ``[batch, seq_len, inner]``
    saved : OutputGateSaved

    Returns
    -------
    dy, dz : ndarray ``[batch, seq_len, inner]``

    Examples
    --------
    See :func:`output_gate_forward`.
    """
    return dv * saved.silu_z, silu_backward(dv * saved.y, saved.z)["x"]


class GatedSSMBlockSaved(NamedTuple):
    """What one block's forward keeps for its backward, by equation.

    Attributes
    ----------
    layer_idx : int
        1-based (the layer names ``mamba_block_{layer_idx}_*``).
    norm : LayerNormSaved
        ``u = LayerNorm(x)``.
    in_proj : DenseSaved
        ``xs0, z = split(in_proj(u))``.
    conv : CausalConv1dSaved
        ``pre = conv_proj(causal_mean(xs0))``.
    silu : ActivationSaved
        ``xs = silu(pre)``.
    ssm : SelectiveSSMSaved
        ``y`` from ``xs`` (projections and the gated core).
    gate : OutputGateSaved
        ``v = y * silu(z)``.
    out_proj : DenseSaved
        ``out = out_proj(v)``.
    """

    layer_idx: int
    norm: LayerNormSaved
    in_proj: DenseSaved
    conv: CausalConv1dSaved
    silu: ActivationSaved
    ssm: SelectiveSSMSaved
    gate: OutputGateSaved
    out_proj: DenseSaved


def mamba_block_forward_with_saved(params: dict, x: np.ndarray, config, layer_idx: int,
                                   conv_buffer: Optional[np.ndarray] = None,
                                   context0: Optional[np.ndarray] = None, *,
                                   engine: str = "numpy"):
    """One GatedSSM block over a sequence (without the residual add), keeping what the
    backward needs.

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, hidden]``
    config : GatedSSMConfig
    layer_idx : int
        1-based.
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``, optional
    context0 : ndarray ``[batch, inner]``, optional
        Causal mode only.
    engine : {"numpy", "numba"}

    Returns
    -------
    out : ndarray ``[batch, seq_len, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    last_context : ndarray ``[batch, inner]`` or None
        None in legacy mode.
    saved : GatedSSMBlockSaved

    Examples
    --------
    >>> c = GatedSSMConfig(embed_dim=4, hidden_size=4, state_size=2, conv_size=3, num_layers=1)
    >>> p = random_params(c, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 4))
    >>> out, buf, ctx, s = mamba_block_forward_with_saved(p, x, c, 1)
    >>> dx, dbuf, dctx0, frag = mamba_block_backward(np.ones_like(out), None, None, s, c)
    >>> dx.shape, dbuf.shape, dctx0.shape, set(frag) == set(param_shapes(c))
    ((2, 5, 4), (2, 2, 8), (2, 8), True)
    """
    c = as_config(config)
    b = _block_name(layer_idx)
    u, s_norm = norm_forward(params, x, c, f"{b}_norm")                            # [b, L, H]
    xs0, z, s_in = in_proj_forward(params, u, c, f"{b}_in_proj")                   # [b, L, E] x2
    pre, conv_buffer, s_conv = causal_conv1d_forward(params, xs0, f"{b}_conv", c.conv_size,
                                                     conv_buffer)                  # [b, L, E]
    xs, s_silu = silu_forward(pre)                                                 # [b, L, E]
    y, last, s_ssm = selective_ssm_forward(params, xs, c, f"{b}_ssm", context0,
                                           engine=engine)                          # [b, L, E]
    v, s_gate = output_gate_forward(y, z)                                          # [b, L, E]
    out, s_out = dense_layer_forward(params, v, f"{b}_out_proj")                   # [b, L, H]
    saved = GatedSSMBlockSaved(int(layer_idx), s_norm, s_in, s_conv, s_silu, s_ssm, s_gate,
                               s_out)
    return out, conv_buffer, last, saved


def mamba_block_backward(d_out: np.ndarray, d_conv_buffer: Optional[np.ndarray],
                         d_last_context: Optional[np.ndarray], saved: GatedSSMBlockSaved,
                         config):
    """Backward of :func:`mamba_block_forward_with_saved`, the equations in reverse order.

    Parameters
    ----------
    d_out : ndarray ``[batch, seq_len, hidden]``
    d_conv_buffer : ndarray ``[batch, conv_size-1, inner]`` or None
        Gradient of the returned conv buffer (None: zero).
    d_last_context : ndarray ``[batch, inner]`` or None
        Gradient of the returned context (causal mode; None: zero).
    saved : GatedSSMBlockSaved
    config : GatedSSMConfig

    Returns
    -------
    dx : ndarray ``[batch, seq_len, hidden]``
        Gradient of the block's input (add the residual's yourself).
    d_conv_buffer0 : ndarray ``[batch, conv_size-1, inner]``
        Gradient of the incoming conv buffer.
    d_context0 : ndarray ``[batch, inner]`` or None
        Gradient of the incoming context (None in legacy mode).
    fragment : dict
        The block's layers of the parameter-gradient tree.

    Examples
    --------
    See :func:`mamba_block_forward_with_saved`.
    """
    c = as_config(config)
    b = _block_name(saved.layer_idx)
    frag = {}
    dv, g = dense_layer_backward(d_out, saved.out_proj, f"{b}_out_proj")
    _merge_grads(frag, g)
    dy, dz = output_gate_backward(dv, saved.gate)
    dxs, d_context0, g = selective_ssm_backward(dy, d_last_context, saved.ssm, c, f"{b}_ssm")
    _merge_grads(frag, g)
    d_pre = silu_backward(dxs, saved.silu)["x"]
    dxs0, d_conv_buffer0, g = causal_conv1d_backward(d_pre, d_conv_buffer, saved.conv,
                                                     f"{b}_conv")
    _merge_grads(frag, g)
    du, g = in_proj_backward(dxs0, dz, saved.in_proj, c, f"{b}_in_proj")
    _merge_grads(frag, g)
    dx, g = norm_backward(du, saved.norm, c, f"{b}_norm")
    _merge_grads(frag, g)
    return dx, d_conv_buffer0, d_context0, frag


def mamba_block_forward(params: dict, x: np.ndarray, config, layer_idx: int,
                        conv_buffer: Optional[np.ndarray] = None,
                        context0: Optional[np.ndarray] = None, *, engine: str = "numpy"):
    """One GatedSSM block over a sequence (without the residual add).

    :func:`mamba_block_forward_with_saved`, returning only the gated core's
    saved values (the gates and the context, for tracing and plots).

    Parameters
    ----------
    x : ndarray ``[batch, seq_len, hidden]``
    layer_idx : int
        1-based.
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``, optional
    context0 : ndarray ``[batch, inner]``, optional

    Returns
    -------
    out : ndarray ``[batch, seq_len, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    last_context : ndarray ``[batch, inner]`` or None
    saved : GatedEMASaved
    """
    out, conv_buffer, last, saved = mamba_block_forward_with_saved(
        params, x, config, layer_idx, conv_buffer, context0, engine=engine)
    return out, conv_buffer, last, saved.ssm.core


def _check_x(x, c: GatedSSMConfig, name="x"):
    x = as_float_array(x, name, ndim=3)
    if x.shape[2] != c.embed_dim:
        raise ValueError(f"{name}: expected last axis embed_dim={c.embed_dim} "
                         f"([batch, seq_len, embed_dim]), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected batch >= 1 and seq_len >= 1, got shape {x.shape}")
    return x


def _run(params: dict, x, config, state, return_sequence: bool, training: bool, seed,
         engine: str, caller: str, keep_saved: bool):
    """The model over a sequence, for :func:`forward` and :func:`forward_with_saved`.

    Returns ``(GatedSSMOutput, GatedSSMSaved or None)``; with ``keep_saved``
    False no block's saved values outlive its block.
    """
    c = as_config(config)
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    x = _check_x(x, c)
    params = check_params(params, param_shapes(c))
    batch, seq_len = x.shape[:2]
    causal = c.scan_mode == "causal"
    if state is not None and not causal:
        raise ValueError("state: GatedSSM scan_mode 'legacy' has no carried state (its weights "
                         "are normalised over the whole sequence), expected None")
    has_state = state is not None
    state = (init_cache(c, batch, dtype=x.dtype) if state is None
             else _check_cache(state, c, batch)) \
        if causal else None
    rng = None
    if training and c.dropout > 0:
        if seed is None:
            raise ValueError(f"{caller}: training=True with dropout > 0 needs seed (int or numpy "
                             f"Generator), got None")
        rng = _rng(seed)
    s_input = None
    if "input_projection" in params:
        x, s_input = dense_layer_forward(params, x, "input_projection")      # [batch, L, H]
    hidden_states = [x]
    if causal:
        new_ctx = np.empty(state.context.shape, dtype=np.result_type(state.context, x))
        new_conv = np.empty(state.conv.shape, dtype=np.result_type(state.conv, x))
    blocks, dropouts = [], []
    for i in range(1, c.num_layers + 1):
        conv_in = state.conv[:, i - 1] if causal else None
        ctx_in = state.context[:, i - 1] if causal else None
        out, conv_out, ctx_out, s_block = mamba_block_forward_with_saved(
            params, x, c, i, conv_in, ctx_in, engine=engine)
        if causal:
            new_conv[:, i - 1], new_ctx[:, i - 1] = conv_out, ctx_out
        x = x + out                                                           # residual
        s_drop = None
        if rng is not None and i < c.num_layers:                              # between blocks
            x, s_drop = dropout_forward(x, c.dropout, training=True, rng=rng)
        if keep_saved:
            blocks.append(s_block)
            if i < c.num_layers:
                dropouts.append(s_drop)
        hidden_states.append(x)
    output = x if return_sequence else x[:, -1]
    new_state = GatedSSMCache(new_ctx, new_conv) if causal else None
    result = GatedSSMOutput(output, new_state, tuple(hidden_states))
    if not keep_saved:
        return result, None
    return result, GatedSSMSaved(c, s_input, tuple(blocks), tuple(dropouts), batch, seq_len,
                                 bool(return_sequence), has_state)


def forward(params: dict, x, config=None, *, state: Optional[GatedSSMCache] = None,
            return_sequence: bool = False, training: bool = False, seed=None,
            engine: str = "numpy") -> GatedSSMOutput:
    """The model over a sequence (or, in causal mode, a chunk of one given the previous ``state``).

    Parameters
    ----------
    params : dict
        The parameter tree (:func:`param_shapes`).
    x : ndarray ``[batch, seq_len, embed_dim]``
    config : GatedSSMConfig or dict
    state : GatedSSMCache, optional
        State after the frames before ``x`` (causal mode only). Chunks, each
        with the previous call's state, give the same numbers as one call.
    return_sequence : bool
        Return every timestep ``[batch, seq_len, hidden]`` instead of the last.
    training : bool
        Dropout (rate ``config.dropout``) between blocks; needs ``seed``.
    seed : int or numpy Generator
    engine : {"numpy", "numba"}
        Engine of the gated core; "numpy" is the ground truth.

    Returns
    -------
    GatedSSMOutput
        ``(output, state, hidden_states)``; ``state`` is None in legacy mode.

    Raises
    ------
    ValueError
        ``x`` of the wrong shape or not finite, parameters not matching the
        config, a state from another config, a state in legacy mode, training
        without a seed, an unknown engine.

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
    return _run(params, x, config, state, return_sequence, training, seed, engine,
                caller="forward", keep_saved=False)[0]


# ---------------------------------------------------------------------------
# Step: one frame, O(1) in the sequence length (causal mode)
# ---------------------------------------------------------------------------

def causal_conv1d_step(params: dict, frame: np.ndarray, name: str, window: int,
                       buffer: np.ndarray):
    """One frame of :func:`causal_conv1d_forward`: ``[batch, inner]`` -> ``[batch, inner]``.

    Returns
    -------
    y : ndarray ``[batch, inner]``
    buffer : ndarray ``[batch, conv_size-1, inner]``
    """
    mean, buffer = causal_mean_step(frame, buffer, window)
    return _dense(params[f"{name}_proj"], mean), buffer


def selective_ssm_step(params: dict, xs: np.ndarray, context: np.ndarray, config, name: str):
    """One frame of the gated SSM (causal mode).

    Parameters
    ----------
    xs : ndarray ``[batch, inner]``
    context : ndarray ``[batch, inner]``

    Returns
    -------
    y : ndarray ``[batch, inner]``
    context : ndarray ``[batch, inner]``
    """
    c = as_config(config)
    delta, B, C, _ = ssm_projections_forward(params, xs, c, name)
    return gated_ema_step(xs, delta, B, C, context, c.alpha)


def mamba_block_step(params: dict, frame: np.ndarray, conv_buffer: np.ndarray,
                     context: np.ndarray, config, layer_idx: int):
    """One frame through one block (without the residual add).

    Parameters
    ----------
    frame : ndarray ``[batch, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    context : ndarray ``[batch, inner]``

    Returns
    -------
    out : ndarray ``[batch, hidden]``
    conv_buffer, context : the new state
    """
    c = as_config(config)
    b = _block_name(layer_idx)
    u, _ = norm_forward(params, frame, c, f"{b}_norm")                         # [batch, H]
    xs, z, _ = in_proj_forward(params, u, c, f"{b}_in_proj")                    # [batch, E] x2
    xs, conv_buffer = causal_conv1d_step(params, xs, f"{b}_conv", c.conv_size, conv_buffer)
    xs = silu_forward(xs)[0]
    y, context = selective_ssm_step(params, xs, context, c, f"{b}_ssm")
    out = dense_layer_forward(params, output_gate_forward(y, z)[0], f"{b}_out_proj")[0]
    return out, conv_buffer, context


def step(params: dict, cache: GatedSSMCache, frame, config=None):
    """Advance the model by one frame: ``[batch, embed_dim]`` in, ``[batch, hidden]`` out.

    O(1) in the sequence length; at every frame, the full :func:`forward`'s
    output at that timestep. Causal mode only.

    Parameters
    ----------
    params : dict
    cache : GatedSSMCache
        From :func:`init_cache`, a previous :func:`step` or :func:`forward`'s ``state``.
    frame : ndarray ``[batch, embed_dim]``
    config : GatedSSMConfig or dict

    Returns
    -------
    y : ndarray ``[batch, hidden]``
    cache : GatedSSMCache
        The new state (the input cache is not modified).

    Raises
    ------
    ValueError
        In legacy mode (see the module docstring), or on a frame, parameters
        or cache that do not match the config.

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
    _refuse_legacy(c)
    frame = as_float_array(frame, "frame", ndim=2)
    if frame.shape[1] != c.embed_dim:
        raise ValueError(f"frame: expected shape (batch, {c.embed_dim}) [batch, embed_dim], "
                         f"got {frame.shape}")
    params = check_params(params, param_shapes(c))
    cache = _check_cache(cache, c, frame.shape[0])
    x = _dense(params["input_projection"], frame) if "input_projection" in params else frame
    new_ctx = np.empty(cache.context.shape, dtype=np.result_type(cache.context, x))
    new_conv = np.empty(cache.conv.shape, dtype=np.result_type(cache.conv, x))
    for i in range(1, c.num_layers + 1):
        out, new_conv[:, i - 1], new_ctx[:, i - 1] = mamba_block_step(
            params, x, cache.conv[:, i - 1], cache.context[:, i - 1], c, i)
        x = x + out
    return x, GatedSSMCache(new_ctx, new_conv)


# ---------------------------------------------------------------------------
# Manual backward of the whole model
# ---------------------------------------------------------------------------

class GatedSSMSaved(NamedTuple):
    """What :func:`forward_with_saved` keeps for :func:`backward`.

    Attributes
    ----------
    config : GatedSSMConfig
    input_projection : DenseSaved or None
        None when ``embed_dim == hidden_size`` (no projection).
    blocks : tuple of GatedSSMBlockSaved
        One per layer, in order.
    dropouts : tuple of DropoutSaved or None
        After block ``i`` (``i < num_layers``); None entries when no dropout was
        applied (inference, or ``dropout == 0``). ``DropoutSaved.scale`` is
        the mask divided by ``1 - rate``.
    batch, seq_len : int
    return_sequence : bool
        The output was ``[batch, seq_len, hidden]`` (else the last timestep).
    has_state : bool
        A carried ``state`` was given (causal mode; then :func:`backward`
        returns its gradient).
    """

    config: GatedSSMConfig
    input_projection: Optional[DenseSaved]
    blocks: tuple
    dropouts: tuple
    batch: int
    seq_len: int
    return_sequence: bool
    has_state: bool


class GatedSSMGrads(NamedTuple):
    """What :func:`backward` returns.

    Attributes
    ----------
    x : ndarray ``[batch, seq_len, embed_dim]``
        Gradient of the model input.
    params : dict
        ``{layer: {name: grad}}``, exactly the layers, names, order and shapes
        of the parameter tree (:func:`param_shapes`).
    state : GatedSSMCache or None
        Gradient of the carried initial ``state`` (``context [batch,
        num_layers, inner]``, ``conv [batch, num_layers, conv_size-1,
        inner]``); None when :func:`forward_with_saved` was called without one
        (always in legacy mode, which takes no state).
    """

    x: np.ndarray
    params: dict
    state: Optional[GatedSSMCache]


def forward_with_saved(params: dict, x, config=None, *, state: Optional[GatedSSMCache] = None,
                       return_sequence: bool = False, training: bool = False, seed=None,
                       engine: str = "numpy"):
    """:func:`forward` that also keeps, per layer, the named values :func:`backward` needs.

    Same arguments and, bit for bit, the same numbers as :func:`forward` (the
    same functions run; dropout included: the same ``seed`` draws the same
    masks, and the masks are saved). Both scan modes: the legacy mode's
    backward differentiates the whole-sequence forward (it has no state).

    Parameters
    ----------
    params : dict
    x : ndarray ``[batch, seq_len, embed_dim]``
    config : GatedSSMConfig or dict
    state : GatedSSMCache, optional
        Carried state (causal mode only; then :func:`backward` also returns its gradient).
    return_sequence : bool
    training : bool
        Dropout between blocks (rate ``config.dropout``, needs ``seed``); its
        masks are saved and used by the backward.
    seed : int or numpy Generator
    engine : {"numpy", "numba"}
        Engine of the gated core; its backward is used by :func:`backward`.

    Returns
    -------
    result : GatedSSMOutput
        ``(output, state, hidden_states)``, as :func:`forward`.
    saved : GatedSSMSaved

    Raises
    ------
    ValueError
        As :func:`forward`.

    Examples
    --------
    The gradient of the scalar loss ``sum(W * output)``:

    >>> c = GatedSSMConfig(embed_dim=3, hidden_size=8, state_size=2, num_layers=2)
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

    The legacy scan mode (preset ``edifice``) has a backward too, of the
    whole-sequence forward, here along a direction of ``dt_proj``'s kernel:

    >>> legacy = c.replace(preset="edifice")
    >>> res, saved = forward_with_saved(params, x, legacy, return_sequence=True)
    >>> W = np.random.default_rng(3).standard_normal(res.output.shape)
    >>> g = backward(W, saved).params["mamba_block_1_ssm_dt_proj"]["kernel"]
    >>> V = np.random.default_rng(4).standard_normal(g.shape)
    >>> def loss(eps):
    ...     p = {k: dict(v) for k, v in params.items()}
    ...     p["mamba_block_1_ssm_dt_proj"]["kernel"] = params["mamba_block_1_ssm_dt_proj"]["kernel"] + eps * V
    ...     return float(np.sum(W * forward(p, x, legacy, return_sequence=True).output))
    >>> fd = (loss(1e-5) - loss(-1e-5)) / 2e-5
    >>> bool(abs(fd - np.sum(g * V)) <= 1e-8 * abs(fd)), res.state
    (True, None)
    """
    return _run(params, x, config, state, return_sequence, training, seed, engine,
                caller="forward_with_saved", keep_saved=True)


def _check_d_state(d_state, c: GatedSSMConfig, batch: int):
    """``d_state`` as ``(context or None, conv or None)`` with the cache's shapes."""
    if d_state is not None and c.scan_mode == "legacy":
        raise ValueError("d_state: GatedSSM scan_mode 'legacy' returns no state (its weights are "
                         "normalised over the whole sequence), expected None")
    return state_gradients(d_state, "a GatedSSMCache (context, conv)", (
        ("context", (batch, c.num_layers, c.inner_size), "[batch, num_layers, inner]"),
        ("conv", (batch, c.num_layers, c.conv_size - 1, c.inner_size),
         "[batch, num_layers, conv_size-1, inner]")))


def backward(d_out, saved: GatedSSMSaved, *,
             d_state: Optional[GatedSSMCache] = None) -> GatedSSMGrads:
    """Manual backward of the whole model: gradients of a scalar loss from those of the outputs.

    Given ``d_out = dLoss/d output`` (and optionally, in causal mode,
    ``d_state = dLoss/d state``, the returned carried state, for a loss on it
    or to backpropagate through the next chunk), returns ``dLoss/dx``,
    ``dLoss/dparams`` in the tree's layout, and ``dLoss/d state_in`` when a
    carried state was given. Runs the forward's equations in reverse: per
    block (last first) dropout, residual (``dx += d block_input``), the
    block's backward (:func:`mamba_block_backward`), then the input projection.

    Parameters
    ----------
    d_out : ndarray
        ``[batch, hidden]`` (last timestep) or ``[batch, seq_len, hidden]``
        (``return_sequence``), as the forward's output.
    saved : GatedSSMSaved
        From :func:`forward_with_saved` (its core engine's backward is used).
    d_state : GatedSSMCache, optional
        Causal mode: gradients of the returned state, ``context [batch,
        num_layers, inner]`` and ``conv [batch, num_layers, conv_size-1,
        inner]`` (either may be None; None means zero). Legacy mode returns no
        state: None only.

    Returns
    -------
    GatedSSMGrads
        ``(x, params, state)``: ``x [batch, seq_len, embed_dim]``; ``params``
        with exactly the layers and names of the parameter tree; ``state``
        a :class:`GatedSSMCache` of gradients, or None without a carried state.

    Raises
    ------
    ValueError
        ``d_out`` or ``d_state`` of the wrong shape or not finite, a
        ``d_state`` in legacy mode, ``saved`` not from :func:`forward_with_saved`.

    Examples
    --------
    Processing in chunks and backpropagating through the carried state gives
    the one-call gradients:

    >>> c = GatedSSMConfig(embed_dim=3, hidden_size=8, state_size=2, conv_size=3)
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
    dx = output_gradient(d_out, saved, GatedSSMSaved)  # [batch, L, H]
    c = saved.config
    batch = saved.batch
    d_ctx, d_conv = _check_d_state(d_state, c, batch)
    dtype = dx.dtype
    dparams = {}
    # --- blocks, last first: x_i = dropout(x_{i-1} + block_i(x_{i-1})) ------
    causal = c.scan_mode == "causal"
    dctx0 = np.zeros((batch, c.num_layers, c.inner_size), dtype=dtype)
    dconv0 = np.zeros((batch, c.num_layers, c.conv_size - 1, c.inner_size), dtype=dtype)
    for i in range(c.num_layers, 0, -1):
        if i < c.num_layers and saved.dropouts[i - 1] is not None:
            dx = dropout_backward(dx, saved.dropouts[i - 1])["x"]
        d_block_in, dconv0[:, i - 1], d_ctx_i, g = mamba_block_backward(
            dx, None if d_conv is None else d_conv[:, i - 1],
            None if d_ctx is None else d_ctx[:, i - 1], saved.blocks[i - 1], c)
        if causal:
            dctx0[:, i - 1] = d_ctx_i
        _merge_grads(dparams, g)
        dx = dx + d_block_in                                              # residual
    if saved.input_projection is not None:
        dx, g = dense_layer_backward(dx, saved.input_projection, "input_projection")
        _merge_grads(dparams, g)
    tree = grad_tree(dparams, param_shapes(c))                            # the params' order
    d_state_in = GatedSSMCache(dctx0, dconv0) if saved.has_state else None
    return GatedSSMGrads(dx, tree, d_state_in)
