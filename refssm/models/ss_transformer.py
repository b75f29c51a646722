"""The State Space Transformer (Edifice ``Edifice.SSM.SSTransformer``; cf. Hymba,
Dong et al. 2024, and Mamba-2, Dao & Gu 2024), the whole model: config,
parameters, forward, O(1)-state stepping with a key/value cache, exact
parameter count.

Every block runs an SSM path and a causal attention path side by side on the
same normalised input and mixes them with a learned per-feature gate
(DESIGN.md sections 1 and 1.4)::

    x [batch, seq_len, embed_dim]
      -> input_projection                   dense embed_dim -> hidden (only if they differ)
      -> x = sst_block_i(x)                 i = 1 .. num_layers (dropout between blocks, training only)
      -> final_norm                         LayerNorm
      -> last timestep [batch, hidden]      (or the whole sequence)

    sst_block(x):                                                    shapes
        u     = LayerNorm(x)                                         [batch, L, H]
        s     = ssm_out_proj(ssm_path(u) * silu(z))                  [batch, L, H]   (below)
        a     = attn_out_proj(causal_mha(q(u), k(u), v(u)))          heads x head_dim, softmax(Q K^T / sqrt(d))
        g     = sigmoid(gate_proj(u))                                [batch, L, H]   per feature
        x     = x + g * s + (1 - g) * a
        x     = x + ffn_down(gelu(ffn_up(LayerNorm(x))))             H -> 4H -> H, GELU (erf)

    ssm_path(u), preset mamba_ssm (default): the Mamba S6 mixer (DESIGN.md 1.1)
        xs, z  = split(ssm_in_proj(u))                               [batch, L, E], E = expand * H
        xs     = silu(causal_depthwise_conv1d(xs))                   kernel conv_size
        dt, B, C = split(ssm_x_proj(xs))                             dt_rank = ceil(H / 16), N
        delta  = softplus(ssm_dt_proj(dt))                           [batch, L, E]
        h_t    = exp(delta_t A) h_{t-1} + delta_t B_t xs_t           A = -exp(A_log)  [E, N]
        y_t    = C_t . h_t + D xs_t

    ssm_path(u), preset edifice: Edifice's "simplified gating-based SSM approximation"
        xs, z  as above;  B = ssm_b_proj(xs), C = ssm_c_proj(xs)      [batch, L, N] each
        delta  = softplus(ssm_dt_proj(xs))                           E -> E (no low rank)
        g_t    = sigmoid(mean_c delta_t),  s_t = sigmoid(sum_n B_t C_t)      [batch, L, 1]
        y_t    = g_t y_{t-1} + (1 - g_t) g_t s_t xs_t                an EMA whose forget factor is g_t

The attention is :mod:`refssm.ops.attention`: ``num_heads x head_dim`` need
not equal ``hidden_size`` (q/k/v project ``H -> heads * head_dim``, the output
projection back to ``H``).

Conventions ("presets", each a bundle of plain flags, every flag also
settable on its own; see :data:`PRESETS`):

``mamba_ssm`` (default): DESIGN.md 1.4
    The SSM path is the official Mamba mixer (state-spaces/mamba
    ``mamba_simple.py``): one ``x_proj`` without bias, ``dt_proj`` with bias,
    learned ``A_log``, ``D`` skip, no bias on ``ssm_in_proj``/``ssm_out_proj``;
    the true softmax. Initialisation as torch / the official module.
``edifice``: Edifice v0.2's ``ss_transformer.ex``
    The EMA path above (not a selective scan); the softmax denominator plus
    ``1e-8``; biases on every dense layer; Axon's glorot-uniform kernels and
    zero biases.

The carried state (:class:`SSTransformerCache`) holds, per layer, the SSM
state (``[inner, N]`` selective, ``[inner]`` EMA), the conv buffer
``[conv_size-1, inner]`` and the keys/values of every frame seen so far
``[heads, T, head_dim]`` (growing by one per frame). :func:`forward` takes and
returns it, so chunks equal one call; :func:`step` advances one frame with the
full forward's numbers (``tests/test_ss_transformer.py``).

Edifice's ``SSTransformer`` has no ``param_count``, ``init_cache`` or
``step``: :func:`param_count` here is exact, :func:`original_param_count`
returns None.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import numpy as np

from .._validate import as_float_array
from ..ops.activations import inverse_softplus, sigmoid, silu_forward, softplus_forward
from ..ops.attention import causal_attention_forward, merge_heads, split_heads
from ..ops.conv import causal_depthwise_conv1d_forward, causal_depthwise_conv1d_step
from ..ops.dense import dense_forward
from ..ops.dropout import dropout_forward
from ..ops.gelu import gelu_forward
from ..ops.norms import layer_norm_forward
from ..ssm.gated_ema import bc_gate, selection_gate
from ..ssm.selective_scan import ENGINES, selective_scan_forward
from ._common import (_bool, _choice, _float, _positive_int, _rng, check_params, count_params,
                      glorot_uniform, torch_uniform)
from .mamba import _dense_params

__all__ = [
    "SSTransformerConfig", "PRESETS", "FLAGS", "SSTransformerCache", "SSTransformerOutput",
    "SSTransformerModel", "FFN_EXPANSION",
    "build", "build_sst_block", "build_ssm_path", "build_attention_path", "build_ffn",
    "forward", "sst_block_forward", "ssm_path_forward", "attention_path_forward",
    "ffn_forward", "ema_ssm_forward",
    "init_cache", "step", "sst_block_step", "ssm_path_step", "attention_path_step",
    "output_size", "param_count", "param_count_breakdown", "original_param_count",
    "original_param_count_terms",
    "param_shapes", "random_params", "recommended_defaults", "as_config",
]

#: The FFN's inner width is ``FFN_EXPANSION * hidden_size`` (Edifice ``FFN.layer``'s default).
FFN_EXPANSION = 4

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

#: The presets: named bundles of flags.
PRESETS = {
    "mamba_ssm": dict(ssm_path="selective", softmax_eps=0.0, ssm_proj_bias=False,
                      init="official"),
    "edifice": dict(ssm_path="ema", softmax_eps=1e-8, ssm_proj_bias=True, init="glorot"),
}

#: Every flag with its meaning (values: first the ``mamba_ssm`` one).
FLAGS = {
    "ssm_path": "'selective' (the Mamba S6 mixer: x_proj, dt_proj, A_log, D) or 'ema' "
                "(Edifice: b_proj, c_proj, dt_proj E->E; y_t = g_t y_{t-1} + (1-g_t) g_t s_t xs_t)",
    "softmax_eps": "float >= 0 added to the softmax denominator (0.0, or Edifice's 1e-8)",
    "ssm_proj_bias": "bool: biases on ssm_in_proj and ssm_out_proj",
    "init": "'official' (torch nn.Linear / Conv1d defaults, Mamba's dt/A/D init) or 'glorot' "
            "(Axon: glorot-uniform kernels, zero biases)",
}

_SIZES = dict(hidden_size=256, state_size=16, num_layers=6, num_heads=4, head_dim=64,
              expand_factor=2, conv_size=4)
_OTHER = dict(dropout=0.1, window_size=60, seq_len=None, norm_eps=1e-5,
              dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4)


@dataclass(frozen=True, init=False)
class SSTransformerConfig:
    """State Space Transformer options: the original API's names and defaults, plus the flags.

    Parameters
    ----------
    embed_dim : int
        Size of each input frame (required).
    hidden_size : int, default 256
    state_size : int, default 16
    num_layers : int, default 6
    num_heads : int, default 4
    head_dim : int, default 64
        ``num_heads * head_dim`` is the attention width; it need not equal
        ``hidden_size``.
    expand_factor : int, default 2
        ``inner = expand_factor * hidden_size`` (the SSM path's width).
    conv_size : int, default 4
    dropout : float, default 0.1
        Between blocks, only when ``training=True``.
    window_size : int, default 60
    seq_len : int, optional
        Defaults to ``window_size``. Informational.
    preset : {"mamba_ssm", "edifice"}, default "mamba_ssm"
    ssm_path, softmax_eps, ssm_proj_bias, init
        The flags (see :data:`FLAGS`); each overrides its preset value.
    norm_eps : float, default 1e-5
    dt_min, dt_max, dt_init_floor : float
        Official initialisation of the selective path's ``dt_proj.bias``.

    Raises
    ------
    ValueError
        Missing ``embed_dim``, an unknown option or preset, a bad value (a
        non-positive or non-integer ``num_heads`` / ``head_dim``, ...); the
        message names what was expected and what came.

    Examples
    --------
    >>> cfg = SSTransformerConfig(embed_dim=8, hidden_size=32, num_heads=3, head_dim=5)
    >>> cfg.attn_dim, cfg.inner_size, cfg.dt_rank_size, cfg.ssm_path
    (15, 64, 2, 'selective')
    >>> SSTransformerConfig(embed_dim=8, num_heads=0)
    Traceback (most recent call last):
    ...
    ValueError: num_heads: expected an integer >= 1, got 0
    """

    embed_dim: int
    hidden_size: int
    state_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    expand_factor: int
    conv_size: int
    dropout: float
    window_size: int
    seq_len: int
    preset: str
    ssm_path: str
    softmax_eps: float
    ssm_proj_bias: bool
    init: str
    norm_eps: float
    dt_min: float
    dt_max: float
    dt_init_floor: float

    def __init__(self, embed_dim=None, *, preset="mamba_ssm", **opts):
        known = {f.name for f in fields(SSTransformerConfig)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown SSTransformer option(s) {unknown}; expected some of "
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
        set_("ssm_path", _choice(values["ssm_path"], "ssm_path", ("selective", "ema")))
        set_("softmax_eps", _float(values["softmax_eps"], "softmax_eps", 0.0))
        set_("ssm_proj_bias", _bool(values["ssm_proj_bias"], "ssm_proj_bias"))
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
    def attn_dim(self) -> int:
        """``num_heads * head_dim``, the width of q, k, v."""
        return self.num_heads * self.head_dim

    @property
    def dt_rank_size(self) -> int:
        """``ceil(hidden_size / 16)``, the selective path's low-rank ``dt`` (official Mamba)."""
        return math.ceil(self.hidden_size / 16)

    def to_dict(self) -> dict:
        """Every option by name (``SSTransformerConfig(**cfg.to_dict())`` rebuilds it)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes) -> "SSTransformerConfig":
        """A copy with ``changes``; a new ``preset`` re-fills the flags not given.

        Examples
        --------
        >>> SSTransformerConfig(embed_dim=4).replace(preset="edifice").softmax_eps
        1e-08
        """
        opts = self.to_dict()
        if "preset" in changes and changes["preset"] != self.preset:
            for flag in FLAGS:
                opts.pop(flag)
        opts.update(changes)
        return SSTransformerConfig(**opts)


def as_config(config=None, **opts) -> SSTransformerConfig:
    """A :class:`SSTransformerConfig` from a config, a dict of options, or keyword options.

    Examples
    --------
    >>> as_config({"embed_dim": 3}).num_layers
    6
    """
    if isinstance(config, SSTransformerConfig):
        return config.replace(**opts) if opts else config
    if config is None:
        return SSTransformerConfig(**opts)
    if isinstance(config, dict):
        return SSTransformerConfig(**{**config, **opts})
    raise ValueError(f"config: expected a SSTransformerConfig or a dict of options, got "
                     f"{type(config).__name__}")


def recommended_defaults() -> dict:
    """The original API's recommended defaults (plus ``window_size`` 60, the 60 fps profile).

    Examples
    --------
    >>> d = recommended_defaults()
    >>> d["hidden_size"], d["num_layers"], d["num_heads"], d["head_dim"], d["dropout"], d["window_size"]
    (256, 6, 4, 64, 0.1, 60)
    """
    return dict(hidden_size=256, state_size=16, num_layers=6, num_heads=4, head_dim=64,
                expand_factor=2, conv_size=4, dropout=0.1, window_size=60)


def output_size(config=None, **opts) -> int:
    """Size of the model's output frame, ``hidden_size`` (``embed_dim`` not needed).

    Examples
    --------
    >>> output_size(hidden_size=64), output_size()
    (64, 256)
    """
    if isinstance(config, SSTransformerConfig):
        return config.hidden_size
    opts = {**(config or {}), **opts}
    opts.setdefault("embed_dim", 1)
    return as_config(**opts).hidden_size


# ---------------------------------------------------------------------------
# Parameter names, shapes and exact count
# ---------------------------------------------------------------------------

def _block_name(i: int) -> str:
    return f"sst_block_{i}"


def param_shapes(config) -> dict:
    """``{layer: {name: shape}}`` of the parameter tree for ``config``.

    Examples
    --------
    >>> shapes = param_shapes(SSTransformerConfig(embed_dim=4, hidden_size=8, state_size=2,
    ...                                           num_layers=1, num_heads=2, head_dim=3))
    >>> shapes["sst_block_1_attn_q"], shapes["sst_block_1_ssm_x_proj"]
    ({'kernel': (8, 6), 'bias': (6,)}, {'kernel': (16, 5)})
    """
    c = as_config(config)
    H, E, N, K, R, A = (c.hidden_size, c.inner_size, c.state_size, c.conv_size,
                        c.dt_rank_size, c.attn_dim)
    dense = lambda i, o, bias=True: {"kernel": (i, o), **({"bias": (o,)} if bias else {})}  # noqa: E731
    norm = {"gamma": (H,), "beta": (H,)}
    shapes = {}
    if c.embed_dim != H:
        shapes["input_projection"] = dense(c.embed_dim, H)
    for i in range(1, c.num_layers + 1):
        b = _block_name(i)
        shapes[f"{b}_norm"] = dict(norm)
        shapes[f"{b}_ssm_in_proj"] = dense(H, 2 * E, c.ssm_proj_bias)
        shapes[f"{b}_ssm_conv"] = {"kernel": (K, 1, E), "bias": (E,)}
        if c.ssm_path == "selective":
            shapes[f"{b}_ssm_x_proj"] = dense(E, R + 2 * N, False)
            shapes[f"{b}_ssm_dt_proj"] = dense(R, E)
            shapes[f"{b}_ssm"] = {"A_log": (E, N), "D": (E,)}
        else:
            shapes[f"{b}_ssm_b_proj"] = dense(E, N)
            shapes[f"{b}_ssm_c_proj"] = dense(E, N)
            shapes[f"{b}_ssm_dt_proj"] = dense(E, E)
        shapes[f"{b}_ssm_out_proj"] = dense(E, H, c.ssm_proj_bias)
        for proj in ("q", "k", "v"):
            shapes[f"{b}_attn_{proj}"] = dense(H, A)
        shapes[f"{b}_attn_out_proj"] = dense(A, H)
        shapes[f"{b}_gate_proj"] = dense(H, H)
        shapes[f"{b}_ffn_norm"] = dict(norm)
        shapes[f"{b}_ffn_up"] = dense(H, FFN_EXPANSION * H)
        shapes[f"{b}_ffn_down"] = dense(FFN_EXPANSION * H, H)
    shapes["final_norm"] = dict(norm)
    return shapes


def param_count_breakdown(config) -> dict:
    """The exact parameter count term by term (closed form, one entry per parameter group).

    Per layer, with ``H = hidden``, ``E = inner``, ``N = state``, ``K = conv``,
    ``R = ceil(H/16)``, ``A = heads * head_dim``, ``F = 4H``::

        norm, ffn_norm   2H each             LayerNorm gamma, beta
        ssm_in_proj      2HE (+ 2E bias)
        ssm_conv         KE + E
        ssm_x_proj       E(R + 2N)           selective, no bias
        ssm_dt_proj      RE + E              selective;  E^2 + E  ema (E -> E)
        A_log, D         EN, E               selective
        ssm_b_proj, ssm_c_proj   EN + N each ema
        ssm_out_proj     EH (+ H bias)
        attn_qkv         3(HA + A)
        attn_out_proj    AH + H
        gate_proj        H^2 + H
        ffn_up, ffn_down HF + F, FH + H

    plus ``input_projection`` (``embed*H + H``, only if ``embed != H``) and the
    ``final_norm`` (``2H``). Totals are summed over layers.

    Examples
    --------
    >>> b = param_count_breakdown(SSTransformerConfig(embed_dim=8, hidden_size=8, num_layers=1,
    ...                                               num_heads=2, head_dim=3))
    >>> b["attn_qkv"], b["gate_proj"], b["final_norm"]
    (162, 72, 16)
    """
    c = as_config(config)
    H, E, N, K, R, A, L = (c.hidden_size, c.inner_size, c.state_size, c.conv_size,
                           c.dt_rank_size, c.attn_dim, c.num_layers)
    F = FFN_EXPANSION * H
    sel = c.ssm_path == "selective"
    pb = c.ssm_proj_bias
    return {
        "input_projection": (c.embed_dim * H + H) if c.embed_dim != H else 0,
        "norm": L * 2 * H,
        "ssm_in_proj": L * (H * 2 * E + (2 * E if pb else 0)),
        "ssm_conv": L * (K * E + E),
        "ssm_x_proj": L * E * (R + 2 * N) if sel else 0,
        "ssm_b_proj": 0 if sel else L * (E * N + N),
        "ssm_c_proj": 0 if sel else L * (E * N + N),
        "ssm_dt_proj": L * ((R * E + E) if sel else (E * E + E)),
        "A_log": L * E * N if sel else 0,
        "D": L * E if sel else 0,
        "ssm_out_proj": L * (E * H + (H if pb else 0)),
        "attn_qkv": L * 3 * (H * A + A),
        "attn_out_proj": L * (A * H + H),
        "gate_proj": L * (H * H + H),
        "ffn_norm": L * 2 * H,
        "ffn_up": L * (H * F + F),
        "ffn_down": L * (F * H + H),
        "final_norm": 2 * H,
    }


def param_count(config=None, **opts) -> int:
    """Exact number of parameters: equals the scalars in :func:`build`'s tree.

    Examples
    --------
    >>> cfg = SSTransformerConfig(embed_dim=8, hidden_size=16, state_size=4, num_layers=2,
    ...                           num_heads=2, head_dim=4)
    >>> param_count(cfg) == build(cfg).param_count_tree()
    True
    """
    return int(sum(param_count_breakdown(as_config(config, **opts)).values()))


def original_param_count_terms(config=None, **opts) -> None:
    """The original API's approximate formula term by term: **none exists**, so None.

    Edifice v0.2's ``Edifice.SSM.SSTransformer`` has no ``param_count/1``
    (see :func:`original_param_count`); :func:`param_count_breakdown` has the
    exact terms.

    Examples
    --------
    >>> original_param_count_terms(embed_dim=32) is None
    True
    """
    as_config(config, **opts)                      # still validate the options
    return None


def original_param_count(config=None, **opts) -> None:
    """The original API's approximate count: **none exists**, so this returns None.

    Edifice v0.2's ``Edifice.SSM.SSTransformer`` offers only ``build/1``,
    ``output_size/1`` and ``recommended_defaults/0`` (no ``param_count/1``);
    there is no formula to reproduce. :func:`param_count` is exact and
    :func:`param_count_breakdown` explains it term by term.

    Examples
    --------
    >>> original_param_count(embed_dim=32) is None
    True
    """
    as_config(config, **opts)                      # still validate the options
    return None


# ---------------------------------------------------------------------------
# Builders (initialised parameters)
# ---------------------------------------------------------------------------

def _conv_params(rng, K, E, init):
    """Depthwise conv ``{kernel [K, 1, E], bias [E]}``: torch ``Conv1d(groups=E)`` or Axon."""
    if init == "official":
        return {"kernel": torch_uniform(rng, (K, 1, E), fan_in=K),
                "bias": torch_uniform(rng, (E,), fan_in=K)}
    return {"kernel": glorot_uniform(rng, (K, 1, E)), "bias": np.zeros(E)}


def _norm_params(H):
    return {"gamma": np.ones(H), "beta": np.zeros(H)}


def build_ssm_path(config, name: str, rng=None) -> dict:
    """Parameters of one block's SSM path (layers ``{name}_ssm_*``).

    Selective: ``ssm_in_proj``, ``ssm_conv``, ``ssm_x_proj`` (columns ``[dt;
    B; C]``), ``ssm_dt_proj``, ``{name}_ssm`` (``A_log``, ``D``), ``ssm_out_proj``.
    Official init (``mamba_simple.py``): ``dt_proj.kernel`` uniform in
    ``+-dt_rank^-0.5``, ``dt_proj.bias = softplus^-1(dt)`` with ``dt``
    log-uniform in ``[dt_min, dt_max]`` floored at ``dt_init_floor``, ``A_log =
    log(1..N)``, ``D = 1`` (the last two also with ``init='glorot'``).
    EMA: ``ssm_in_proj``, ``ssm_conv``, ``ssm_b_proj``, ``ssm_c_proj``,
    ``ssm_dt_proj`` (``E -> E``), ``ssm_out_proj``.

    Examples
    --------
    >>> cfg = SSTransformerConfig(embed_dim=4, hidden_size=4, state_size=3)
    >>> p = build_ssm_path(cfg, "sst_block_1", rng=0)
    >>> sorted(p)[:3], np.exp(p["sst_block_1_ssm"]["A_log"][0])
    (['sst_block_1_ssm', 'sst_block_1_ssm_conv', 'sst_block_1_ssm_dt_proj'], array([1., 2., 3.]))
    """
    c = as_config(config)
    rng = _rng(rng)
    H, E, N, R = c.hidden_size, c.inner_size, c.state_size, c.dt_rank_size
    p = {f"{name}_ssm_in_proj": _dense_params(rng, H, 2 * E, c.ssm_proj_bias, c.init),
         f"{name}_ssm_conv": _conv_params(rng, c.conv_size, E, c.init)}
    if c.ssm_path == "selective":
        p[f"{name}_ssm_x_proj"] = _dense_params(rng, E, R + 2 * N, False, c.init)
        if c.init == "official":
            dt = np.exp(rng.uniform(0.0, 1.0, E) * (math.log(c.dt_max) - math.log(c.dt_min))
                        + math.log(c.dt_min))
            dt = np.maximum(dt, c.dt_init_floor)
            p[f"{name}_ssm_dt_proj"] = {"kernel": rng.uniform(-R ** -0.5, R ** -0.5, (R, E)),
                                        "bias": inverse_softplus(dt)}
        else:
            p[f"{name}_ssm_dt_proj"] = _dense_params(rng, R, E, True, c.init)
        p[f"{name}_ssm"] = {"A_log": np.log(np.tile(np.arange(1.0, N + 1), (E, 1))),
                            "D": np.ones(E)}
    else:
        p[f"{name}_ssm_b_proj"] = _dense_params(rng, E, N, True, c.init)
        p[f"{name}_ssm_c_proj"] = _dense_params(rng, E, N, True, c.init)
        p[f"{name}_ssm_dt_proj"] = _dense_params(rng, E, E, True, c.init)
    p[f"{name}_ssm_out_proj"] = _dense_params(rng, E, H, c.ssm_proj_bias, c.init)
    return p


def build_attention_path(config, name: str, rng=None) -> dict:
    """Parameters of one block's attention: ``{name}_attn_q/k/v`` (``H -> heads*head_dim``)
    and ``{name}_attn_out_proj`` (``heads*head_dim -> H``), all with bias.

    Examples
    --------
    >>> cfg = SSTransformerConfig(embed_dim=4, hidden_size=4, num_heads=2, head_dim=5)
    >>> {k: v["kernel"].shape for k, v in build_attention_path(cfg, "b", rng=0).items()}
    {'b_attn_q': (4, 10), 'b_attn_k': (4, 10), 'b_attn_v': (4, 10), 'b_attn_out_proj': (10, 4)}
    """
    c = as_config(config)
    rng = _rng(rng)
    H, A = c.hidden_size, c.attn_dim
    p = {f"{name}_attn_{proj}": _dense_params(rng, H, A, True, c.init) for proj in "qkv"}
    p[f"{name}_attn_out_proj"] = _dense_params(rng, A, H, True, c.init)
    return p


def build_ffn(config, name: str, rng=None) -> dict:
    """Parameters of the feed-forward: ``{name}_up`` (``H -> 4H``) and ``{name}_down`` (``4H -> H``).

    Examples
    --------
    >>> p = build_ffn(SSTransformerConfig(embed_dim=4, hidden_size=4), "sst_block_1_ffn", rng=0)
    >>> {k: v["kernel"].shape for k, v in p.items()}
    {'sst_block_1_ffn_up': (4, 16), 'sst_block_1_ffn_down': (16, 4)}
    """
    c = as_config(config)
    rng = _rng(rng)
    H, F = c.hidden_size, FFN_EXPANSION * c.hidden_size
    return {f"{name}_up": _dense_params(rng, H, F, True, c.init),
            f"{name}_down": _dense_params(rng, F, H, True, c.init)}


def build_sst_block(config, layer_idx: int = 1, rng=None, name: Optional[str] = None) -> dict:
    """Parameters of block ``layer_idx`` (layers ``sst_block_{i}_*``).

    Examples
    --------
    >>> p = build_sst_block(SSTransformerConfig(embed_dim=4, hidden_size=4, preset="edifice"), 2,
    ...                     rng=0)
    >>> sorted(p)[:4]
    ['sst_block_2_attn_k', 'sst_block_2_attn_out_proj', 'sst_block_2_attn_q', 'sst_block_2_attn_v']
    """
    c = as_config(config)
    rng = _rng(rng)
    layer_idx = _positive_int(layer_idx, "layer_idx")
    name = name or _block_name(layer_idx)
    H = c.hidden_size
    p = {f"{name}_norm": _norm_params(H)}
    p.update(build_ssm_path(c, name, rng))
    p.update(build_attention_path(c, name, rng))
    p[f"{name}_gate_proj"] = _dense_params(rng, H, H, True, c.init)
    p[f"{name}_ffn_norm"] = _norm_params(H)
    p.update(build_ffn(c, f"{name}_ffn", rng))
    return p


def random_params(config=None, seed=0, *, delta_range=None, **opts) -> dict:
    """Parameters *with teeth*, for tests and golden fixtures (not an initialisation).

    Every parameter random and away from the value that would hide a bug in
    its path: LayerNorm ``gamma = 1 + 0.2 N(0,1)``, ``beta = 0.2 N(0,1)``,
    biases ``0.1 N(0,1)``, ``A_log = log(1..N) + 0.3 N(0,1)``, ``D = 1 + 0.5
    N(0,1)``, kernels ``U(+-sqrt(3/fan_in))`` (unit-variance outputs: attention
    scores of order 1, weights neither uniform nor one-hot), except:

    * ``ssm_dt_proj``: ``bias = softplus^-1(dt)``, ``dt`` log-uniform in
      ``delta_range``, and a small kernel, plus (EMA path) a component shared
      by each row, so that the channel mean of ``delta`` moves from frame to
      frame. Defaults: selective ``(0.005, 0.04)`` -- ``exp(delta A)`` decays
      over ~100 frames, the state carries far beyond the conv window;
      EMA ``(1.0, 3.0)`` -- the forget gate ``g = sigmoid(mean delta)`` moves
      within about 0.6-0.96 (neither 1/2 nor 1): the context carries ~10 frames.
    * ``ssm_x_proj``'s ``B``/``C`` columns and ``ssm_b_proj``/``ssm_c_proj``:
      scaled by ``N^-1/4`` (times 1.2 for the EMA's gate ``sigmoid(B . C)``),
      so ``B . C`` is of order 1;
    * ``gate_proj``: kernel scaled by 0.6, so the fusion gate spreads over
      ``(0, 1)`` (typically 0.1-0.9) and both paths count.

    Examples
    --------
    >>> cfg = SSTransformerConfig(embed_dim=3, hidden_size=8, state_size=2, num_layers=1,
    ...                           num_heads=2, head_dim=3, preset="edifice")
    >>> sorted(random_params(cfg, seed=0)) == sorted(param_shapes(cfg))
    True
    """
    c = as_config(config, **opts)
    rng = _rng(seed)
    sel = c.ssm_path == "selective"
    if delta_range is None:
        delta_range = (0.005, 0.04) if sel else (1.0, 3.0)
    lo, hi = (float(v) for v in delta_range)
    if not 0 < lo <= hi:
        raise ValueError(f"delta_range: expected 0 < lo <= hi, got {delta_range!r}")
    N, R = c.state_size, c.dt_rank_size
    params = {}
    for layer, names in param_shapes(c).items():
        p = {}
        for name, shape in names.items():
            if layer.endswith("_ssm_dt_proj"):
                if name == "kernel":
                    k = rng.uniform(-1.0, 1.0, shape)
                    if sel:
                        p[name] = 0.35 * k / math.sqrt(shape[0])
                    else:
                        shared = rng.standard_normal((shape[0], 1))
                        p[name] = (0.3 * k + 1.0 * shared) / math.sqrt(shape[0])
                else:
                    p[name] = inverse_softplus(np.exp(rng.uniform(math.log(lo), math.log(hi),
                                                                  shape)))
            elif name == "gamma":
                p[name] = 1.0 + 0.2 * rng.standard_normal(shape)
            elif name == "beta":
                p[name] = 0.2 * rng.standard_normal(shape)
            elif name == "bias":
                p[name] = 0.1 * rng.standard_normal(shape)
            elif name == "A_log":
                p[name] = np.log(np.arange(1.0, shape[1] + 1)) + 0.3 * rng.standard_normal(shape)
            elif name == "D":
                p[name] = 1.0 + 0.5 * rng.standard_normal(shape)
            else:                                  # kernels: dense [in, out], conv [K, 1, C]
                k = rng.uniform(-1.0, 1.0, shape) * math.sqrt(3.0 / shape[0])
                if layer.endswith("_ssm_x_proj"):
                    k[:, R:] *= N ** -0.25
                elif layer.endswith(("_ssm_b_proj", "_ssm_c_proj")):
                    k *= 1.2 * N ** -0.25
                elif layer.endswith("_gate_proj"):
                    k *= 0.6
                p[name] = k
        params[layer] = p
    return params


class SSTransformerModel:
    """A config and its parameters, with the model's functions as methods.

    ``model(x)`` is :func:`forward`'s output; ``model.forward(x, ...)`` the full
    :class:`SSTransformerOutput`; ``model.step(cache, frame)`` is :func:`step`.

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=2, num_layers=1, num_heads=2,
    ...               head_dim=4, seed=0)
    >>> model(np.ones((2, 5, 3))).shape
    (2, 8)
    """

    def __init__(self, config, params: dict):
        self.config = as_config(config)
        self.params = params

    def __call__(self, x, **kwargs):
        return forward(self.params, x, self.config, **kwargs).output

    def forward(self, x, **kwargs) -> "SSTransformerOutput":
        return forward(self.params, x, self.config, **kwargs)

    def init_cache(self, batch_size: int = 1) -> "SSTransformerCache":
        return init_cache(self.config, batch_size)

    def step(self, cache: "SSTransformerCache", frame):
        return step(self.params, cache, frame, self.config)

    def param_count(self) -> int:
        """The exact formula :func:`param_count` for this config."""
        return param_count(self.config)

    def param_count_tree(self) -> int:
        """The scalars actually in ``self.params``."""
        return count_params(self.params)

    def __repr__(self):
        return f"SSTransformerModel({self.config!r})"


def build(config=None, *, seed=0, **opts) -> SSTransformerModel:
    """Build a State Space Transformer: config -> :class:`SSTransformerModel` with initialised
    parameters.

    Parameters
    ----------
    config : SSTransformerConfig or dict, optional
        Or give the options as keywords (``embed_dim`` required).
    seed : int or numpy Generator

    Raises
    ------
    ValueError
        An inconsistent config (see :class:`SSTransformerConfig`).

    Examples
    --------
    >>> model = build(embed_dim=287, hidden_size=32, state_size=4, num_heads=2, head_dim=8)
    >>> sorted(model.params)[:2], model.params["sst_block_1_attn_q"]["kernel"].shape
    (['final_norm', 'input_projection'], (32, 16))
    """
    c = as_config(config, **opts)
    rng = _rng(seed)
    params = {}
    if c.embed_dim != c.hidden_size:
        params["input_projection"] = _dense_params(rng, c.embed_dim, c.hidden_size, True, c.init)
    for i in range(1, c.num_layers + 1):
        params.update(build_sst_block(c, i, rng))
    params["final_norm"] = _norm_params(c.hidden_size)
    return SSTransformerModel(c, params)


# ---------------------------------------------------------------------------
# Forward (whole sequence or chunk)
# ---------------------------------------------------------------------------

class SSTransformerCache(NamedTuple):
    """The carried state: everything needed to continue a sequence.

    Attributes
    ----------
    ssm : ndarray
        SSM state of every layer: ``[batch, num_layers, inner, N]`` (selective
        path) or ``[batch, num_layers, inner]`` (EMA path).
    conv : ndarray ``[batch, num_layers, conv_size-1, inner]``
        The last ``conv_size - 1`` inputs of every layer's conv (oldest first).
    k, v : ndarray ``[batch, num_layers, num_heads, T, head_dim]``
        Keys and values of the ``T`` frames seen so far (grows by one per frame).
    """

    ssm: np.ndarray
    conv: np.ndarray
    k: np.ndarray
    v: np.ndarray


class SSTransformerOutput(NamedTuple):
    """What :func:`forward` returns.

    Attributes
    ----------
    output : ndarray
        ``[batch, hidden]`` (last timestep) or ``[batch, seq_len, hidden]``,
        after the final norm.
    state : SSTransformerCache
        The state after the last frame (pass it as ``state=`` to continue).
    hidden_states : tuple of ndarray ``[batch, seq_len, hidden]``
        Entry 0 is the input of block 1 (after the input projection), entry
        ``i`` the output of block ``i`` (after dropout); before the final norm.
    """

    output: np.ndarray
    state: SSTransformerCache
    hidden_states: tuple


def _ssm_state_shape(c: SSTransformerConfig, batch: int) -> tuple:
    if c.ssm_path == "selective":
        return (batch, c.num_layers, c.inner_size, c.state_size)
    return (batch, c.num_layers, c.inner_size)


def init_cache(config=None, batch_size: int = 1, dtype=np.float64, **opts) -> SSTransformerCache:
    """Zero state for a fresh sequence: zero SSM states and conv buffers, empty key/value caches.

    Examples
    --------
    >>> cfg = SSTransformerConfig(embed_dim=4, hidden_size=4, state_size=3, num_layers=2,
    ...                           num_heads=2, head_dim=5)
    >>> cache = init_cache(cfg, batch_size=2)
    >>> cache.ssm.shape, cache.conv.shape, cache.k.shape
    ((2, 2, 8, 3), (2, 2, 3, 8), (2, 2, 2, 0, 5))
    """
    c = as_config(config, **opts)
    batch_size = _positive_int(batch_size, "batch_size")
    kv = (batch_size, c.num_layers, c.num_heads, 0, c.head_dim)
    return SSTransformerCache(
        ssm=np.zeros(_ssm_state_shape(c, batch_size), dtype=dtype),
        conv=np.zeros((batch_size, c.num_layers, c.conv_size - 1, c.inner_size), dtype=dtype),
        k=np.zeros(kv, dtype=dtype), v=np.zeros(kv, dtype=dtype))


def _check_cache(cache, c: SSTransformerConfig, batch: int) -> SSTransformerCache:
    if not (isinstance(cache, tuple) and len(cache) == 4):
        raise ValueError(f"cache: expected a SSTransformerCache (ssm, conv, k, v), got "
                         f"{type(cache).__name__}")
    want_ssm = _ssm_state_shape(c, batch)
    ssm = as_float_array(cache[0], "cache.ssm", ndim=len(want_ssm))
    conv = as_float_array(cache[1], "cache.conv", ndim=4)
    k = as_float_array(cache[2], "cache.k", ndim=5)
    v = as_float_array(cache[3], "cache.v", ndim=5)
    layout = "[batch, num_layers, inner, N]" if len(want_ssm) == 4 else "[batch, num_layers, inner]"
    if ssm.shape != want_ssm:
        raise ValueError(f"cache.ssm: expected shape {want_ssm} {layout} for this config and "
                         f"batch {batch}, got {ssm.shape}")
    want_conv = (batch, c.num_layers, c.conv_size - 1, c.inner_size)
    if conv.shape != want_conv:
        raise ValueError(f"cache.conv: expected shape {want_conv} [batch, num_layers, "
                         f"conv_size-1, inner], got {conv.shape}")
    T = k.shape[3]
    want_kv = (batch, c.num_layers, c.num_heads, T, c.head_dim)
    for name, a in (("k", k), ("v", v)):
        if a.shape != want_kv:
            raise ValueError(f"cache.{name}: expected shape {want_kv} [batch, num_layers, "
                             f"num_heads, T, head_dim], got {a.shape}")
    return SSTransformerCache(ssm, conv, k, v)


def _dense(p: dict, x: np.ndarray) -> np.ndarray:
    return dense_forward(x, p["kernel"], p.get("bias"))[0]


def _layer_norm(p: dict, x: np.ndarray, c: SSTransformerConfig) -> np.ndarray:
    return layer_norm_forward(x, p["gamma"], p["beta"], c.norm_eps)[0]


def ema_ssm_forward(params: dict, xs: np.ndarray, name: str,
                    context0: Optional[np.ndarray] = None):
    """Edifice's SSM approximation: an EMA whose forget factor is the selection gate.

    ::

        delta = softplus(ssm_dt_proj(xs))                        [batch, L, E]
        g_t   = sigmoid(mean_c delta_t)                          [batch, L, 1]
        s_t   = sigmoid(sum_n B_t C_t),  B, C = ssm_b_proj(xs), ssm_c_proj(xs)
        y_t   = g_t y_{t-1} + (1 - g_t) (g_t s_t xs_t)           y_{-1} = context0 (0)

    Parameters
    ----------
    xs : ndarray ``[batch, seq_len, inner]``
    name : str
        ``sst_block_{i}``.
    context0 : ndarray ``[batch, inner]``, optional

    Returns
    -------
    y : ndarray ``[batch, seq_len, inner]``
    last : ndarray ``[batch, inner]``
    """
    delta = softplus_forward(_dense(params[f"{name}_ssm_dt_proj"], xs))[0]
    B = _dense(params[f"{name}_ssm_b_proj"], xs)
    C = _dense(params[f"{name}_ssm_c_proj"], xs)
    g = selection_gate(delta)                                         # [b, L, 1]
    gx = g * bc_gate(B, C) * xs                                       # [b, L, E]
    y = np.empty_like(gx)
    h = np.zeros_like(gx[:, 0]) if context0 is None else context0
    for t in range(xs.shape[1]):
        h = g[:, t] * h + (1.0 - g[:, t]) * gx[:, t]
        y[:, t] = h
    return y, h


def ssm_path_forward(params: dict, u: np.ndarray, config, name: str,
                     conv_buffer: Optional[np.ndarray] = None, state0: Optional[np.ndarray] = None,
                     *, engine: str = "numpy"):
    """One block's SSM path over a sequence: ``ssm_out_proj(ssm(conv(xs)) * silu(z))``.

    Parameters
    ----------
    u : ndarray ``[batch, seq_len, hidden]``
        The block's normalised input.
    name : str
        ``sst_block_{i}``.
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``, optional
    state0 : ndarray ``[batch, inner, N]`` (selective) or ``[batch, inner]`` (EMA), optional
    engine : {"numpy", "numba", "logdepth"}
        Selective-scan engine (the EMA path is NumPy).

    Returns
    -------
    s : ndarray ``[batch, seq_len, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    state : ndarray
        The SSM state after the last frame.
    """
    c = as_config(config)
    E = c.inner_size
    xz = _dense(params[f"{name}_ssm_in_proj"], u)                          # [b, L, 2E]
    xs, z = xz[..., :E], xz[..., E:]
    conv = params[f"{name}_ssm_conv"]
    xs, conv_buffer, _ = causal_depthwise_conv1d_forward(xs, conv["kernel"], conv["bias"],
                                                         conv_buffer)
    xs = silu_forward(xs)[0]                                               # [b, L, E]
    if c.ssm_path == "selective":
        N, R = c.state_size, c.dt_rank_size
        x_dbl = _dense(params[f"{name}_ssm_x_proj"], xs)                  # [b, L, R + 2N]
        dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
        dt_proj = params[f"{name}_ssm_dt_proj"]
        delta_raw = dense_forward(dt_low, dt_proj["kernel"])[0]           # bias added in the scan
        ssm = params[f"{name}_ssm"]
        y, state, _ = selective_scan_forward(
            xs, delta_raw, -np.exp(ssm["A_log"]), B, C, ssm["D"], z, delta_bias=dt_proj["bias"],
            delta_softplus=True, initial_state=state0, engine=engine)
    else:
        y, state = ema_ssm_forward(params, xs, name, state0)
        y = y * silu_forward(z)[0]
    return _dense(params[f"{name}_ssm_out_proj"], y), conv_buffer, state


def attention_path_forward(params: dict, u: np.ndarray, config, name: str,
                           past_k: Optional[np.ndarray] = None,
                           past_v: Optional[np.ndarray] = None):
    """One block's causal multi-head attention over a sequence (after ``past_k``/``past_v``).

    Parameters
    ----------
    u : ndarray ``[batch, seq_len, hidden]``
    name : str
        ``sst_block_{i}``.
    past_k, past_v : ndarray ``[batch, heads, T, head_dim]``, optional
        Keys and values of the ``T`` frames before ``u``.

    Returns
    -------
    a : ndarray ``[batch, seq_len, hidden]``
        ``attn_out_proj(merge_heads(softmax(Q K^T / sqrt(d)) V))``.
    k, v : ndarray ``[batch, heads, T + seq_len, head_dim]``
        The past and the new keys/values.
    """
    c = as_config(config)
    q = split_heads(_dense(params[f"{name}_attn_q"], u), c.num_heads)    # [b, h, L, d]
    k = split_heads(_dense(params[f"{name}_attn_k"], u), c.num_heads)
    v = split_heads(_dense(params[f"{name}_attn_v"], u), c.num_heads)
    if past_k is not None:
        k = np.concatenate([past_k, k], axis=2)
        v = np.concatenate([past_v, v], axis=2)
    out, _ = causal_attention_forward(q, k, v, softmax_eps=c.softmax_eps)
    return _dense(params[f"{name}_attn_out_proj"], merge_heads(out)), k, v


def ffn_forward(params: dict, x: np.ndarray, name: str) -> np.ndarray:
    """``ffn_down(gelu(ffn_up(x)))``, ``[..., H]`` -> ``[..., H]`` (Edifice ``FFN.layer``).

    Parameters
    ----------
    name : str
        ``sst_block_{i}_ffn``.
    """
    return _dense(params[f"{name}_down"], gelu_forward(_dense(params[f"{name}_up"], x))[0])


def _fuse(x, u, s, a, params, b, c):
    """``x + g s + (1 - g) a`` with ``g = sigmoid(gate_proj(u))``, then ``+ FFN(LayerNorm(.))``."""
    g = sigmoid(_dense(params[f"{b}_gate_proj"], u))                       # per feature
    x = x + (g * s + (1.0 - g) * a)
    return x + ffn_forward(params, _layer_norm(params[f"{b}_ffn_norm"], x, c), f"{b}_ffn")


def sst_block_forward(params: dict, x: np.ndarray, config, layer_idx: int,
                      conv_buffer=None, ssm_state=None, past_k=None, past_v=None, *,
                      engine: str = "numpy"):
    """One block over a sequence, residuals included (as Edifice's ``build_ss_block``).

    Parameters
    ----------
    x : ndarray ``[batch, seq_len, hidden]``
    layer_idx : int
        1-based.
    conv_buffer, ssm_state, past_k, past_v : optional
        The layer's state before ``x`` (see :class:`SSTransformerCache`).

    Returns
    -------
    x : ndarray ``[batch, seq_len, hidden]``
    conv_buffer, ssm_state, k, v : the layer's state after ``x``
    """
    c = as_config(config)
    b = _block_name(layer_idx)
    u = _layer_norm(params[f"{b}_norm"], x, c)
    s, conv_buffer, ssm_state = ssm_path_forward(params, u, c, b, conv_buffer, ssm_state,
                                                 engine=engine)
    a, k, v = attention_path_forward(params, u, c, b, past_k, past_v)
    return _fuse(x, u, s, a, params, b, c), conv_buffer, ssm_state, k, v


def _check_x(x, c: SSTransformerConfig, name="x"):
    x = as_float_array(x, name, ndim=3)
    if x.shape[2] != c.embed_dim:
        raise ValueError(f"{name}: expected last axis embed_dim={c.embed_dim} "
                         f"([batch, seq_len, embed_dim]), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected batch >= 1 and seq_len >= 1, got shape {x.shape}")
    return x


def forward(params: dict, x, config=None, *, state: Optional[SSTransformerCache] = None,
            return_sequence: bool = False, training: bool = False, seed=None,
            engine: str = "numpy") -> SSTransformerOutput:
    """The model over a sequence (or a chunk of one, given the previous ``state``).

    Parameters
    ----------
    params : dict
        The parameter tree (:func:`param_shapes`).
    x : ndarray ``[batch, seq_len, embed_dim]``
    config : SSTransformerConfig or dict
    state : SSTransformerCache, optional
        State after the frames before ``x`` (a fresh sequence if omitted):
        chunks, each with the previous call's state, give the same numbers as
        one call (the attention sees the cached keys/values).
    return_sequence : bool
        Return every timestep ``[batch, seq_len, hidden]`` instead of the last.
    training : bool
        Dropout (rate ``config.dropout``) between blocks; needs ``seed``.
    seed : int or numpy Generator
    engine : {"numpy", "numba", "logdepth"}
        Selective-scan engine; "numpy" is the ground truth.

    Returns
    -------
    SSTransformerOutput
        ``(output, state, hidden_states)``.

    Raises
    ------
    ValueError
        ``x`` of the wrong shape or not finite, parameters not matching the
        config (e.g. attention kernels of another ``num_heads * head_dim``), a
        state from another config, training without a seed, an unknown engine.

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=2, num_layers=2, num_heads=2,
    ...               head_dim=4, seed=0)
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
    state = init_cache(c, batch) if state is None else _check_cache(state, c, batch)
    rng = None
    if training and c.dropout > 0:
        if seed is None:
            raise ValueError("forward: training=True with dropout > 0 needs seed (int or numpy "
                             "Generator), got None")
        rng = _rng(seed)
    if "input_projection" in params:
        x = _dense(params["input_projection"], x)                             # [batch, L, H]
    hidden_states = [x]
    ssm, conv, ks, vs = [], [], [], []
    for i in range(1, c.num_layers + 1):
        x, conv_i, ssm_i, k_i, v_i = sst_block_forward(
            params, x, c, i, state.conv[:, i - 1], state.ssm[:, i - 1], state.k[:, i - 1],
            state.v[:, i - 1], engine=engine)
        if rng is not None and i < c.num_layers:                              # between blocks
            x = dropout_forward(x, c.dropout, training=True, rng=rng)[0]
        hidden_states.append(x)
        for store, value in ((ssm, ssm_i), (conv, conv_i), (ks, k_i), (vs, v_i)):
            store.append(value)
    out = _layer_norm(params["final_norm"], x, c)
    output = out if return_sequence else out[:, -1]
    new_state = SSTransformerCache(np.stack(ssm, 1), np.stack(conv, 1), np.stack(ks, 1),
                                   np.stack(vs, 1))
    return SSTransformerOutput(output, new_state, tuple(hidden_states))


# ---------------------------------------------------------------------------
# Step: one frame (the SSM state and conv buffer are O(1); the key/value cache grows)
# ---------------------------------------------------------------------------

def ssm_path_step(params: dict, u: np.ndarray, conv_buffer: np.ndarray, state: np.ndarray,
                  config, name: str):
    """One frame of :func:`ssm_path_forward`, the recurrence written out.

    Parameters
    ----------
    u : ndarray ``[batch, hidden]``
    conv_buffer : ndarray ``[batch, conv_size-1, inner]``
    state : ndarray ``[batch, inner, N]`` (selective) or ``[batch, inner]`` (EMA)

    Returns
    -------
    s : ndarray ``[batch, hidden]``
    conv_buffer, state : the new state
    """
    c = as_config(config)
    E = c.inner_size
    xz = _dense(params[f"{name}_ssm_in_proj"], u)
    xs, z = xz[..., :E], xz[..., E:]
    conv = params[f"{name}_ssm_conv"]
    xs, conv_buffer = causal_depthwise_conv1d_step(xs, conv_buffer, conv["kernel"], conv["bias"])
    xs = silu_forward(xs)[0]                                               # [b, E]
    if c.ssm_path == "selective":
        N, R = c.state_size, c.dt_rank_size
        x_dbl = _dense(params[f"{name}_ssm_x_proj"], xs)
        dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
        dt_proj = params[f"{name}_ssm_dt_proj"]
        delta = softplus_forward(dense_forward(dt_low, dt_proj["kernel"])[0] + dt_proj["bias"])[0]
        ssm = params[f"{name}_ssm"]
        A_bar = np.exp(delta[..., None] * -np.exp(ssm["A_log"]))          # [b, E, N]
        state = A_bar * state + delta[..., None] * B[:, None, :] * xs[..., None]
        y = np.sum(C[:, None, :] * state, axis=-1) + ssm["D"] * xs
    else:
        delta = softplus_forward(_dense(params[f"{name}_ssm_dt_proj"], xs))[0]
        B = _dense(params[f"{name}_ssm_b_proj"], xs)
        C = _dense(params[f"{name}_ssm_c_proj"], xs)
        g = selection_gate(delta)                                         # [b, 1]
        gx = g * bc_gate(B, C) * xs
        state = g * state + (1.0 - g) * gx
        y = state
    return _dense(params[f"{name}_ssm_out_proj"], y * silu_forward(z)[0]), conv_buffer, state


def attention_path_step(params: dict, u: np.ndarray, past_k: np.ndarray, past_v: np.ndarray,
                        config, name: str):
    """One frame of attention: the new query attends to every cached key and its own.

    Parameters
    ----------
    u : ndarray ``[batch, hidden]``
    past_k, past_v : ndarray ``[batch, heads, T, head_dim]``

    Returns
    -------
    a : ndarray ``[batch, hidden]``
    k, v : ndarray ``[batch, heads, T + 1, head_dim]``
    """
    a, k, v = attention_path_forward(params, u[:, None, :], config, name, past_k, past_v)
    return a[:, 0], k, v


def sst_block_step(params: dict, frame: np.ndarray, conv_buffer, ssm_state, past_k, past_v,
                   config, layer_idx: int):
    """One frame through one block, residuals included.

    Returns
    -------
    x : ndarray ``[batch, hidden]``
    conv_buffer, ssm_state, k, v : the layer's new state
    """
    c = as_config(config)
    b = _block_name(layer_idx)
    u = _layer_norm(params[f"{b}_norm"], frame, c)
    s, conv_buffer, ssm_state = ssm_path_step(params, u, conv_buffer, ssm_state, c, b)
    a, k, v = attention_path_step(params, u, past_k, past_v, c, b)
    return _fuse(frame, u, s, a, params, b, c), conv_buffer, ssm_state, k, v


def step(params: dict, cache: SSTransformerCache, frame, config=None):
    """Advance the model by one frame: ``[batch, embed_dim]`` in, ``[batch, hidden]`` out.

    The SSM state and conv buffer are O(1); the key/value cache grows by one
    frame per call (attention looks at the whole past). At every frame, the
    full :func:`forward`'s output at that timestep.

    Parameters
    ----------
    params : dict
    cache : SSTransformerCache
        From :func:`init_cache`, a previous :func:`step` or :func:`forward`'s ``state``.
    frame : ndarray ``[batch, embed_dim]``
    config : SSTransformerConfig or dict

    Returns
    -------
    y : ndarray ``[batch, hidden]``
        After the final norm.
    cache : SSTransformerCache
        The new state (the input cache is not modified).

    Examples
    --------
    >>> model = build(embed_dim=3, hidden_size=8, state_size=2, num_layers=2, num_heads=2,
    ...               head_dim=4, seed=0)
    >>> x = np.random.default_rng(0).standard_normal((2, 5, 3))
    >>> cache = model.init_cache(batch_size=2)
    >>> for t in range(5):
    ...     y, cache = model.step(cache, x[:, t])
    >>> bool(np.allclose(y, model(x), rtol=0, atol=1e-13)), cache.k.shape
    (True, (2, 2, 2, 5, 4))
    """
    c = as_config(config)
    frame = as_float_array(frame, "frame", ndim=2)
    if frame.shape[1] != c.embed_dim:
        raise ValueError(f"frame: expected shape (batch, {c.embed_dim}) [batch, embed_dim], "
                         f"got {frame.shape}")
    params = check_params(params, param_shapes(c))
    cache = _check_cache(cache, c, frame.shape[0])
    x = _dense(params["input_projection"], frame) if "input_projection" in params else frame
    ssm, conv, ks, vs = [], [], [], []
    for i in range(1, c.num_layers + 1):
        x, conv_i, ssm_i, k_i, v_i = sst_block_step(
            params, x, cache.conv[:, i - 1], cache.ssm[:, i - 1], cache.k[:, i - 1],
            cache.v[:, i - 1], c, i)
        for store, value in ((ssm, ssm_i), (conv, conv_i), (ks, k_i), (vs, v_i)):
            store.append(value)
    y = _layer_norm(params["final_norm"], x, c)
    return y, SSTransformerCache(np.stack(ssm, 1), np.stack(conv, 1), np.stack(ks, 1),
                                 np.stack(vs, 1))
