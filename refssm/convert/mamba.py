"""Mamba parameters to and from the official / transformers ``state_dict``.

NumPy arrays in and out (no torch import): pass ``{k: v.detach().cpu().numpy()
for k, v in model.state_dict().items()}``; load the result back with
``torch.from_numpy``.

Name and layout map, layer ``i`` (0-based in the checkpoint, ``mamba_block_{i+1}``
here); torch ``nn.Linear.weight`` is ``[out, in]``, the transpose of Axon's
``kernel [in, out]``::

    layers.{i}.norm.weight           [H]             mamba_block_{i+1}_norm / gamma
    layers.{i}.mixer.in_proj.weight  [2E, H]         mamba_block_{i+1}_in_proj / kernel [H, 2E]
    layers.{i}.mixer.in_proj.bias    [2E]            .. / bias          (use_bias=True only)
    layers.{i}.mixer.conv1d.weight   [E, 1, K]       mamba_block_{i+1}_conv_dw_conv / kernel [K, 1, E]
    layers.{i}.mixer.conv1d.bias     [E]             .. / bias          (conv bias only)
    layers.{i}.mixer.x_proj.weight   [R + 2N, E]     mamba_block_{i+1}_ssm_x_proj / kernel [E, R + 2N]
                                                     (rows [dt; B; C] -> columns [dt; B; C])
    layers.{i}.mixer.dt_proj.weight  [E, R]          mamba_block_{i+1}_ssm_dt_proj / kernel [R, E]
    layers.{i}.mixer.dt_proj.bias    [E]             .. / bias
    layers.{i}.mixer.A_log           [E, N]          mamba_block_{i+1}_ssm / A_log
    layers.{i}.mixer.D               [E]             mamba_block_{i+1}_ssm / D
    layers.{i}.mixer.out_proj.weight [H, E]          mamba_block_{i+1}_out_proj / kernel [E, H]
    layers.{i}.mixer.out_proj.bias   [H]             .. / bias          (use_bias=True only)
    norm_f.weight                    [H]             final_norm / gamma

The official ``MambaLMHeadModel`` prefixes these with ``backbone.``; its
``backbone.embedding.weight`` / transformers' ``embeddings.weight`` and
``lm_head.weight`` are not part of the sequence model (it takes
``inputs_embeds``, so ``embed_dim == hidden_size``) and are ignored on the way in.

Only the official layout converts: RMSNorm with ``norm_f``, learned ``A_log``,
``D``, a fused ``x_proj`` (any ``dt_rank``), no input projection; other flag
combinations (the ``edifice`` preset) have no official counterpart and raise.

The transformers cache keeps the conv state as ``[batch, E, K]`` (the last
``K`` inputs); refssm keeps only the ``K - 1`` the next frame needs
(:func:`cache_from_official`, :func:`cache_to_official`).
"""
from __future__ import annotations

import math
import re

import numpy as np

from ..models.mamba import MambaCache, MambaConfig, as_config, param_shapes
from ..models._common import check_params

__all__ = ["to_official_state_dict", "from_official_state_dict", "config_from_official_state_dict",
           "cache_from_official", "cache_to_official"]

_IGNORED = ("embedding.weight", "embeddings.weight", "lm_head.weight")


def _check_official(c: MambaConfig):
    want = dict(norm="rms", final_norm=True, a_param="learned", d_skip=True, x_proj="fused")
    wrong = {k: getattr(c, k) for k, v in want.items() if getattr(c, k) != v}
    if c.delta_clip is not None:
        wrong["delta_clip"] = c.delta_clip
    if c.b_bar != "per_channel":
        wrong["b_bar"] = c.b_bar
    if wrong:
        raise ValueError(f"official state_dict: expected the official layout {want} with "
                         f"delta_clip=None, b_bar='per_channel'; this config has {wrong}")
    if c.embed_dim != c.hidden_size:
        raise ValueError(f"official state_dict: has no input projection, so expected "
                         f"embed_dim == hidden_size, got embed_dim={c.embed_dim}, "
                         f"hidden_size={c.hidden_size}")


def to_official_state_dict(params: dict, config, prefix: str = "") -> dict:
    """refssm parameters -> official / transformers ``state_dict`` (numpy arrays).

    Parameters
    ----------
    params : dict
        The tree of a config with the official layout (``mamba_ssm`` preset,
        ``embed_dim == hidden_size``; biases as ``proj_bias``/``conv_bias`` say).
    config : MambaConfig or dict
    prefix : str
        Prepended to every key (``"backbone."`` for the official
        ``MambaLMHeadModel``; ``""`` for transformers' ``MambaModel``).

    Returns
    -------
    dict
        ``{key: ndarray}`` in torch layouts (contiguous copies).

    Examples
    --------
    >>> from refssm.models.mamba import build
    >>> m = build(embed_dim=16, hidden_size=16, state_size=4, num_layers=1)
    >>> sd = to_official_state_dict(m.params, m.config)
    >>> sd["layers.0.mixer.conv1d.weight"].shape, sd["layers.0.mixer.x_proj.weight"].shape
    ((32, 1, 4), (9, 32))
    """
    c = as_config(config)
    _check_official(c)
    params = check_params(params, param_shapes(c))
    out = {}
    T = lambda a: np.ascontiguousarray(np.asarray(a).T)                # noqa: E731
    for i in range(c.num_layers):
        b = f"mamba_block_{i + 1}"
        k = f"{prefix}layers.{i}."
        out[k + "norm.weight"] = params[f"{b}_norm"]["gamma"].copy()
        m = k + "mixer."
        out[m + "A_log"] = params[f"{b}_ssm"]["A_log"].copy()
        out[m + "D"] = params[f"{b}_ssm"]["D"].copy()
        conv = params[f"{b}_conv_dw_conv"]
        out[m + "conv1d.weight"] = np.ascontiguousarray(conv["kernel"].transpose(2, 1, 0))
        if "bias" in conv:
            out[m + "conv1d.bias"] = conv["bias"].copy()
        out[m + "in_proj.weight"] = T(params[f"{b}_in_proj"]["kernel"])
        if "bias" in params[f"{b}_in_proj"]:
            out[m + "in_proj.bias"] = params[f"{b}_in_proj"]["bias"].copy()
        out[m + "x_proj.weight"] = T(params[f"{b}_ssm_x_proj"]["kernel"])
        out[m + "dt_proj.weight"] = T(params[f"{b}_ssm_dt_proj"]["kernel"])
        out[m + "dt_proj.bias"] = params[f"{b}_ssm_dt_proj"]["bias"].copy()
        out[m + "out_proj.weight"] = T(params[f"{b}_out_proj"]["kernel"])
        if "bias" in params[f"{b}_out_proj"]:
            out[m + "out_proj.bias"] = params[f"{b}_out_proj"]["bias"].copy()
    out[f"{prefix}norm_f.weight"] = params["final_norm"]["gamma"].copy()
    return out


def _strip(state_dict: dict) -> dict:
    """Drop a common ``backbone.`` prefix and the embedding / LM head entries."""
    sd = {}
    for key, value in state_dict.items():
        k = key[len("backbone."):] if key.startswith("backbone.") else key
        if k in _IGNORED:
            continue
        sd[k] = np.asarray(value)
    return sd


def config_from_official_state_dict(state_dict: dict, **opts) -> MambaConfig:
    """Infer the :class:`MambaConfig` of an official / transformers ``state_dict``.

    Sizes come from the shapes (``hidden`` from ``norm_f``, ``inner`` and ``N``
    from ``A_log``, ``conv_size`` from ``conv1d``, ``dt_rank`` from ``dt_proj``),
    biases from which keys exist; ``embed_dim = hidden_size`` (``inputs_embeds``).
    ``opts`` override anything (e.g. ``norm_eps``, which a ``state_dict`` does
    not hold: transformers' ``layer_norm_epsilon``, 1e-5 by default).

    Examples
    --------
    >>> from refssm.models.mamba import build
    >>> m = build(embed_dim=40, hidden_size=40, state_size=3, num_layers=3)
    >>> cfg = config_from_official_state_dict(to_official_state_dict(m.params, m.config))
    >>> cfg == m.config
    True
    """
    sd = _strip(state_dict)
    layers = sorted({int(m.group(1)) for k in sd for m in [re.match(r"layers\.(\d+)\.", k)] if m})
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"official state_dict: expected layers.0 .. layers.(n-1), got layer "
                         f"indices {layers}")
    if "norm_f.weight" not in sd:
        raise ValueError("official state_dict: expected 'norm_f.weight' (the final RMSNorm), "
                         f"got keys {sorted(sd)[:6]}...")
    need = ["mixer.A_log", "mixer.conv1d.weight", "mixer.dt_proj.weight"]
    for n in need:
        if f"layers.0.{n}" not in sd:
            raise ValueError(f"official state_dict: expected 'layers.0.{n}', missing")
    H = sd["norm_f.weight"].shape[0]
    E, N = sd["layers.0.mixer.A_log"].shape
    K = sd["layers.0.mixer.conv1d.weight"].shape[-1]
    R = sd["layers.0.mixer.dt_proj.weight"].shape[1]
    if E % H != 0:
        raise ValueError(f"official state_dict: expected inner (A_log rows, {E}) to be a "
                         f"multiple of hidden ({H})")
    values = dict(embed_dim=H, hidden_size=H, state_size=N, expand_factor=E // H, conv_size=K,
                  num_layers=len(layers), preset="mamba_ssm",
                  dt_rank="ceil" if R == math.ceil(H / 16) else R,
                  proj_bias="layers.0.mixer.in_proj.bias" in sd,
                  conv_bias="layers.0.mixer.conv1d.bias" in sd)
    values.update(opts)
    return MambaConfig(**values)


def from_official_state_dict(state_dict: dict, config=None, **opts):
    """Official / transformers ``state_dict`` (numpy arrays) -> ``(params, config)``.

    Parameters
    ----------
    state_dict : dict
        ``{key: array}``; a ``backbone.`` prefix and the embedding / LM head
        entries are ignored.
    config : MambaConfig or dict, optional
        Inferred from the shapes if omitted (:func:`config_from_official_state_dict`,
        with ``opts``).

    Returns
    -------
    params : dict
        refssm tree (float arrays in the ``state_dict``'s dtype).
    config : MambaConfig

    Raises
    ------
    ValueError
        Missing or unexpected keys, or shapes that do not match ``config``.

    Examples
    --------
    >>> from refssm.models.mamba import build
    >>> m = build(embed_dim=16, hidden_size=16, state_size=4, num_layers=2)
    >>> params, cfg = from_official_state_dict(to_official_state_dict(m.params, m.config))
    >>> all(np.array_equal(params[l][n], m.params[l][n]) for l in m.params for n in m.params[l])
    True
    """
    sd = _strip(state_dict)
    c = config_from_official_state_dict(sd, **opts) if config is None else as_config(config, **opts)
    _check_official(c)
    T = lambda a: np.ascontiguousarray(a.T)                             # noqa: E731
    used = set()

    def take(key):
        if key not in sd:
            raise ValueError(f"official state_dict: expected key {key!r} for this config, missing")
        used.add(key)
        return sd[key]

    params = {}
    for i in range(c.num_layers):
        b = f"mamba_block_{i + 1}"
        m = f"layers.{i}.mixer."
        params[f"{b}_norm"] = {"gamma": take(f"layers.{i}.norm.weight").copy()}
        params[f"{b}_in_proj"] = {"kernel": T(take(m + "in_proj.weight"))}
        if c.proj_bias:
            params[f"{b}_in_proj"]["bias"] = take(m + "in_proj.bias").copy()
        w = take(m + "conv1d.weight")
        if w.ndim != 3 or w.shape[1] != 1:
            raise ValueError(f"official state_dict: expected {m}conv1d.weight [inner, 1, "
                             f"conv_size], got shape {w.shape}")
        params[f"{b}_conv_dw_conv"] = {"kernel": np.ascontiguousarray(w.transpose(2, 1, 0))}
        if c.conv_bias:
            params[f"{b}_conv_dw_conv"]["bias"] = take(m + "conv1d.bias").copy()
        params[f"{b}_ssm_x_proj"] = {"kernel": T(take(m + "x_proj.weight"))}
        params[f"{b}_ssm_dt_proj"] = {"kernel": T(take(m + "dt_proj.weight")),
                                      "bias": take(m + "dt_proj.bias").copy()}
        params[f"{b}_ssm"] = {"A_log": take(m + "A_log").copy(), "D": take(m + "D").copy()}
        params[f"{b}_out_proj"] = {"kernel": T(take(m + "out_proj.weight"))}
        if c.proj_bias:
            params[f"{b}_out_proj"]["bias"] = take(m + "out_proj.bias").copy()
    params["final_norm"] = {"gamma": take("norm_f.weight").copy()}
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"official state_dict: unexpected keys for this config {unused}")
    return check_params(params, param_shapes(c), "converted params"), c


def cache_from_official(conv_states, ssm_states) -> MambaCache:
    """transformers / official per-layer cache -> :class:`MambaCache`.

    Parameters
    ----------
    conv_states : sequence of ndarray ``[batch, inner, K]``
        One per layer: the last ``K`` inputs of the conv (oldest first).
    ssm_states : sequence of ndarray ``[batch, inner, N]``

    Returns
    -------
    MambaCache
        ``h [batch, L, inner, N]``, ``conv [batch, L, K-1, inner]`` (the last ``K-1``).

    Examples
    --------
    >>> cache = cache_from_official([np.zeros((2, 6, 4))], [np.zeros((2, 6, 3))])
    >>> cache.h.shape, cache.conv.shape
    ((2, 1, 6, 3), (2, 1, 3, 6))
    """
    conv_states = [np.asarray(c) for c in conv_states]
    ssm_states = [np.asarray(s) for s in ssm_states]
    if not conv_states or len(conv_states) != len(ssm_states):
        raise ValueError(f"cache_from_official: expected one conv state and one ssm state per "
                         f"layer (at least one), got {len(conv_states)} and {len(ssm_states)}")
    c0, s0 = conv_states[0], ssm_states[0]
    if c0.ndim != 3 or s0.ndim != 3 or c0.shape[:2] != s0.shape[:2] or c0.shape[2] < 1:
        raise ValueError(f"cache_from_official: expected conv states [batch, inner, K >= 1] and "
                         f"ssm states [batch, inner, N] of the same batch and inner, got "
                         f"{c0.shape} and {s0.shape}")
    for i, (c, s) in enumerate(zip(conv_states, ssm_states)):
        if c.shape != c0.shape or s.shape != s0.shape:
            raise ValueError(f"cache_from_official: expected every layer's states to have the "
                             f"shapes of layer 0, {c0.shape} and {s0.shape}; layer {i} has "
                             f"{c.shape} and {s.shape}")
    conv = np.stack([c[:, :, 1:].transpose(0, 2, 1) for c in conv_states], axis=1)
    h = np.stack(ssm_states, axis=1)
    return MambaCache(h=h, conv=conv)


def cache_to_official(cache: MambaCache):
    """:class:`MambaCache` -> per-layer ``(conv_states [batch, inner, K], ssm_states [batch, inner, N])``.

    The oldest of the ``K`` conv frames is never read by the next step
    (``causal_conv1d_update`` keeps the last ``K`` of ``K + 1``); it is zero.

    Examples
    --------
    >>> convs, hs = cache_to_official(MambaCache(np.zeros((2, 1, 6, 3)), np.ones((2, 1, 3, 6))))
    >>> convs[0].shape, float(convs[0][0, 0, 0]), float(convs[0][0, 0, 1])
    ((2, 6, 4), 0.0, 1.0)
    """
    h, conv = cache
    batch, L, Km1, E = conv.shape
    convs = [np.concatenate([np.zeros((batch, E, 1), dtype=conv.dtype),
                             conv[:, i].transpose(0, 2, 1)], axis=2) for i in range(L)]
    return convs, [np.ascontiguousarray(h[:, i]) for i in range(L)]
