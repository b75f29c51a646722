"""The ``edifice`` preset computes Edifice v0.2's formulas (float64).

The reference below is a separate transcription of Edifice's CPU path
(``lib/edifice/ssm/common.ex``: ``build_model``, ``build_block``,
``build_ssm_projections``, ``discretize_ssm``, ``sequential_scan``,
``compute_ssm_output``) in plain NumPy: it materialises ``A_bar`` and
``B_bar x`` as ``[batch, seq_len, inner, N]`` like Edifice does, and shares no
code with refssm's model. Each deviation from the official Mamba has a test
that fails if the deviation is removed from refssm:

1. refssm's ``edifice`` preset equals the reference;
2. refssm with that one flag switched equals the reference with that one
   deviation switched (so the flag is honoured, both ways);
3. the two references differ by a clear margin on these inputs (teeth): the
   inputs keep delta inside the clip, except in the clip's own test.
"""
from __future__ import annotations

import numpy as np
import pytest

from refssm.models import mamba as M
from refssm.verify.metrics import BUDGETS, normwise_error

EXACT = BUDGETS["step_vs_full"]      # two float64 computations of the same formula
MARGIN = 1e-3                        # "clearly different"


# --------------------------------------------------------------------------
# The reference: Edifice's CPU forward, with each deviation a switch
# --------------------------------------------------------------------------
def _softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _axon_dense(x, layer, use_bias=True):
    y = np.einsum("...i,io->...o", x, layer["kernel"])
    return y + layer["bias"] if use_bias and "bias" in layer else y


def _layer_norm(x, layer, eps=1e-5):          # Axon.Layers.layer_norm
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * layer["gamma"] + layer["beta"]


def _rms_norm(x, layer, eps=1e-5):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * layer["gamma"]


def _axon_causal_depthwise_conv(x, layer):
    """Axon.conv(feature_group_size: C, padding: [{K-1, 0}]), kernel [K, 1, C]: cross-correlation."""
    K = layer["kernel"].shape[0]
    L = x.shape[1]
    xp = np.pad(x, ((0, 0), (K - 1, 0), (0, 0)))
    out = np.stack([np.einsum("bkc,kc->bc", xp[:, t:t + K], layer["kernel"][:, 0])
                    for t in range(L)], axis=1)
    return out + layer["bias"]


def edifice_reference(params, x, cfg, *, clip=True, mean_dt=True, A=None, D=None,
                      norm="layer", proj_bias=True):
    """Edifice's Mamba forward, the whole sequence ``[batch, seq_len, hidden]``.

    Switches (the Edifice value first): ``clip`` dt to [0.001, 0.1];
    ``mean_dt`` in B_bar; ``A`` (None: -(1..N)); ``D`` (None: no skip);
    ``norm`` "layer"/"rms"; ``proj_bias`` on in_proj/out_proj.
    """
    N, E = cfg.state_size, cfg.inner_size
    h = _axon_dense(x, params["input_projection"]) if "input_projection" in params else x
    for i in range(1, cfg.num_layers + 1):
        name = f"mamba_block_{i}"
        normed = (_layer_norm if norm == "layer" else _rms_norm)(h, params[f"{name}_norm"])
        xz = _axon_dense(normed, params[f"{name}_in_proj"], proj_bias)
        x_branch, z_branch = xz[..., :E], xz[..., E:]
        x_act = _silu(_axon_causal_depthwise_conv(x_branch, params[f"{name}_conv_dw_conv"]))
        # build_ssm_projections
        bc = _axon_dense(x_act, params[f"{name}_ssm_bc_proj"])
        b, c = bc[..., :N], bc[..., N:]
        dt = _softplus(_axon_dense(_axon_dense(x_act, params[f"{name}_ssm_dt_rank"]),
                                   params[f"{name}_ssm_dt_proj"]))
        # discretize_ssm
        if clip:
            dt = np.clip(dt, 0.001, 0.1)
        a_diag = -(np.arange(N) + 1.0) if A is None else A                  # [N] or [E, N]
        a_bar = np.exp(dt[..., None] * a_diag)                              # [b, L, E, N]
        dt_for_b = dt.mean(-1, keepdims=True)[..., None] if mean_dt else dt[..., None]
        b_bar = dt_for_b * b[:, :, None, :]                                 # [b, L, 1 or E, N]
        bx = b_bar * x_act[..., None]                                       # [b, L, E, N]
        # sequential_scan: h[0] = bx[0]; h[t] = a_bar[t] h[t-1] + bx[t]
        hs = [bx[:, 0]]
        for t in range(1, x.shape[1]):
            hs.append(a_bar[:, t] * hs[-1] + bx[:, t])
        hs = np.stack(hs, axis=1)
        y = np.sum(c[:, :, None, :] * hs, axis=-1)                          # compute_ssm_output
        if D is not None:
            y = y + D * x_act
        gated = y * _silu(z_branch)
        h = h + _axon_dense(gated, params[f"{name}_out_proj"], proj_bias)   # residual
    return h                                                                # no final norm


# --------------------------------------------------------------------------
# Shared case
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def case():
    cfg = M.MambaConfig(embed_dim=5, hidden_size=40, state_size=4, num_layers=2, conv_size=4,
                        preset="edifice")
    params = M.random_params(cfg, seed=101)
    x = np.random.default_rng(102).standard_normal((2, 40, 5))
    return cfg, params, x


def ours(params, x, cfg):
    return M.forward(params, x, cfg, return_sequence=True).output


def test_preset_equals_edifice_reference(case):
    cfg, params, x = case
    err = normwise_error(ours(params, x, cfg), edifice_reference(params, x, cfg))
    assert err <= EXACT, err


def test_delta_not_saturated(case):
    """Teeth for the deviations below: delta inside (0.001, 0.1), spread across channels."""
    cfg, params, x = case
    h = M._dense(params["input_projection"], x)
    for i in (1, 2):
        out, _, _, saved = M.mamba_block_forward(params, h, cfg, i)
        dt = saved.dt
        assert 0.002 < dt.min() and dt.max() < 0.09
        assert np.std(np.log(dt), axis=-1).mean() > 0.3          # channels differ from their mean
        h = h + out


def _three_way(case, flags, ref_switch, params=None):
    """(1) preset == reference, (2) switched == switched reference, (3) references differ."""
    cfg, base_params, x = case
    params = base_params if params is None else params
    ref = edifice_reference(base_params, x, cfg)
    switched_ref = edifice_reference(base_params, x, cfg, **ref_switch)
    assert normwise_error(ours(base_params, x, cfg), ref) <= EXACT
    e2 = normwise_error(ours(params, x, cfg.replace(**flags)), switched_ref)
    assert e2 <= EXACT, e2
    gap = normwise_error(switched_ref, ref)
    assert gap > MARGIN, f"inputs too weak to tell the deviation: {gap:.2e}"
    return gap


def test_fixed_A(case):
    """A = -(1..N), no parameter; a learned A_log (here away from log(1..N)) is used when asked."""
    cfg, params, x = case
    assert not any("A_log" in p for p in params.values())
    rng = np.random.default_rng(103)
    A = -np.arange(1.0, 5.0) * np.exp(0.4 * rng.standard_normal((cfg.inner_size, 4)))
    learned = {**params, **{f"mamba_block_{i}_ssm": {"A_log": np.log(-A)} for i in (1, 2)}}
    _three_way(case, {"a_param": "learned"}, {"A": A}, learned)


def test_delta_clip(case):
    """clip(softplus(.), 0.001, 0.1): inputs where part of delta exceeds 0.1."""
    cfg, _, x = case
    params = M.random_params(cfg, seed=104, delta_range=(0.03, 0.5))
    h = M._dense(params["input_projection"], x)
    dt = M.mamba_block_forward(params, h, cfg, 1)[3].dt
    assert np.mean(dt == 0.1) > 0.2 and np.mean(dt < 0.1) > 0.2
    _three_way((cfg, params, x), {"delta_clip": None}, {"clip": False})


def test_channel_mean_delta_in_B_bar(case):
    _three_way(case, {"b_bar": "per_channel"}, {"mean_dt": False})


def test_no_D(case):
    cfg, params, x = case
    assert not any("D" in p for p in params.values())
    D = 1.0 + 0.5 * np.random.default_rng(105).standard_normal(cfg.inner_size)
    with_D = {**params, **{f"mamba_block_{i}_ssm": {"D": D} for i in (1, 2)}}
    _three_way(case, {"d_skip": True}, {"D": D}, with_D)


def test_layer_norm(case):
    cfg, params, x = case
    rms = {k: ({"gamma": v["gamma"]} if k.endswith("_norm") else v) for k, v in params.items()}
    _three_way(case, {"norm": "rms"}, {"norm": "rms"}, rms)


def test_in_out_projection_biases(case):
    cfg, params, x = case
    assert all("bias" in params[f"mamba_block_{i}_{n}"] for i in (1, 2) for n in ("in_proj", "out_proj"))
    no_bias = {k: ({"kernel": v["kernel"]} if k.endswith(("_in_proj", "_out_proj")) else v)
               for k, v in params.items()}
    _three_way(case, {"proj_bias": False}, {"proj_bias": False}, no_bias)


def test_split_projections_biases_and_dt_rank(case):
    """bc_proj (inner -> 2N) and dt_rank (inner -> max(hidden div 16, 1)), both with bias."""
    cfg, params, x = case
    assert cfg.dt_rank_size == 2 and M.MambaConfig(embed_dim=1, hidden_size=40).dt_rank_size == 3
    assert params["mamba_block_1_ssm_dt_rank"]["kernel"].shape == (80, 2)
    assert params["mamba_block_1_ssm_bc_proj"]["kernel"].shape == (80, 8)
    ref = edifice_reference(params, x, cfg)
    zeroed = {k: ({**v, "bias": np.zeros_like(v["bias"])}
                  if k.endswith(("_bc_proj", "_dt_rank")) else v) for k, v in params.items()}
    assert normwise_error(edifice_reference(zeroed, x, cfg), ref) > MARGIN
    assert normwise_error(ours(zeroed, x, cfg), edifice_reference(zeroed, x, cfg)) <= EXACT
