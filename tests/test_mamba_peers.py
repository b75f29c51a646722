"""The ``mamba_ssm`` preset against a real peer: transformers' ``MambaModel``.

A tiny random ``MambaModel`` (built offline from a ``MambaConfig``, never
downloaded), its ``state_dict`` through :mod:`refssm.convert.mamba`,
``inputs_embeds`` in: the same ``last_hidden_state``, per-layer hidden states
and cache after the prefill, and the same single-frame steps from its cache.

Precision. The model is converted to float64 (``.double()``,
``residual_in_fp32=False``), but transformers' Mamba code deliberately rounds
some values to float32 for half-precision training: ``MambaRMSNorm`` computes
in float32, and the scan and the step call ``.float()`` on ``A_log``, ``B``,
``dt``, the input and the state. So two checks:

* the peer as shipped, to 1e-6 (what float32 rounding inside allows);
* the same peer with those float32 casts turned into no-ops for float64
  tensors (``_no_float32_downcast``: ``Tensor.float()`` and
  ``Tensor.to(torch.float32)`` leave a float64 tensor as it is; the peer's
  code and math are untouched), to 1e-12: every formula and layout agrees.
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pytest

from conftest import require_peer
from refssm.convert.mamba import (
    cache_from_official,
    config_from_official_state_dict,
    from_official_state_dict,
    to_official_state_dict,
)
from refssm.models import mamba as M
from refssm.verify.metrics import normwise_error

AS_SHIPPED = 1e-6        # float32 rounding inside the peer
FLOAT64 = 1e-12          # the peer with its float32 casts disabled
PREFILL, STEPS = 25, 12


@contextlib.contextmanager
def _no_float32_downcast(torch):
    """Within: ``x.float()`` and ``x.to(torch.float32)`` return float64 ``x`` unchanged."""
    orig_float, orig_to = torch.Tensor.float, torch.Tensor.to

    def float_(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else orig_float(self, *args, **kwargs)

    def to_(self, *args, **kwargs):
        if self.dtype == torch.float64:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
        return orig_to(self, *args, **kwargs)

    torch.Tensor.float, torch.Tensor.to = float_, to_
    try:
        yield
    finally:
        torch.Tensor.float, torch.Tensor.to = orig_float, orig_to


def _peer(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch = require_peer("torch")
    transformers = require_peer("transformers")
    cfg = transformers.MambaConfig(
        vocab_size=8, hidden_size=40, state_size=5, num_hidden_layers=3, expand=2,
        conv_kernel=4, use_bias=False, use_conv_bias=True, residual_in_fp32=False,
        layer_norm_epsilon=1e-5)
    torch.manual_seed(0)
    model = transformers.MambaModel(cfg).double().eval()
    # Random values everywhere a mapping bug could hide (norm scales of 1, D of 1,
    # A_log = log(1..N), zero conv bias would all be symmetric).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("norm.weight") or name == "norm_f.weight":
                p.copy_(1.0 + 0.2 * r)
            elif name.endswith("A_log"):
                p.add_(0.3 * r)
            elif name.endswith(".D"):
                p.copy_(1.0 + 0.5 * r)
            elif name.endswith("conv1d.bias"):
                p.copy_(0.1 * r)
            elif name.endswith("dt_proj.bias"):        # softplus(bias) in [0.005, 0.04]
                u = torch.rand(p.shape, generator=g, dtype=p.dtype)
                dt = torch.exp(np.log(0.005) + u * (np.log(0.04) - np.log(0.005)))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
    return torch, cfg, model


def _ours(model):
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    params, cfg = from_official_state_dict(sd)
    return params, cfg, sd


def _run_peer(torch, model, x):
    """Prefill ``PREFILL`` frames with a cache, then feed ``STEPS`` frames one at a time."""
    xt = torch.from_numpy(x)
    with torch.no_grad():
        full = model(inputs_embeds=xt, output_hidden_states=True, use_cache=False)
        pre = model(inputs_embeds=xt[:, :PREFILL], use_cache=True)
        # transformers 5.24 renamed cache_params to cache (the old name warns until 5.40)
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "cache_params"
        cache = getattr(pre, name)
        layers = range(len(model.layers))
        pre_conv = [cache.get_conv_state(i).clone().numpy() for i in layers]
        pre_ssm = [cache.get_recurrent_state(i).clone().numpy() for i in layers]
        steps = []
        for t in range(PREFILL, PREFILL + STEPS):
            out = model(inputs_embeds=xt[:, t:t + 1], use_cache=True, **{name: cache})
            cache = getattr(out, name)
            steps.append(out.last_hidden_state[:, 0].numpy())
    return dict(last=full.last_hidden_state.numpy(),
                hidden=[h.numpy() for h in full.hidden_states],
                pre_conv=pre_conv, pre_ssm=pre_ssm, steps=np.stack(steps, axis=1))


def _compare(peer, params, cfg, x):
    """Worst normwise error of refssm against every peer output."""
    res = M.forward(params, x, cfg, return_sequence=True)
    errs = {"last_hidden_state": normwise_error(res.output, peer["last"])}
    L = cfg.num_layers
    assert len(peer["hidden"]) == L + 1         # transformers 5: block outputs, then norm_f(last)
    for i in range(L):
        errs[f"hidden_states[{i}]"] = normwise_error(res.hidden_states[i + 1], peer["hidden"][i])
    errs[f"hidden_states[{L}]"] = normwise_error(res.output, peer["hidden"][L])
    # each block's own output (the mixer), not drowned by the residual stream (~7% of it here)
    prev_peer, prev_ours = x, res.hidden_states[0]
    for i in range(L):
        errs[f"block_output[{i}]"] = normwise_error(res.hidden_states[i + 1] - prev_ours,
                                                    peer["hidden"][i] - prev_peer)
        prev_peer, prev_ours = peer["hidden"][i], res.hidden_states[i + 1]
    pre = M.forward(params, x[:, :PREFILL], cfg)
    peer_cache = cache_from_official(peer["pre_conv"], peer["pre_ssm"])
    errs["cache.h"] = normwise_error(pre.state.h, peer_cache.h)
    errs["cache.conv"] = normwise_error(pre.state.conv, peer_cache.conv)
    cache, ys = pre.state, []
    for t in range(PREFILL, PREFILL + STEPS):
        y, cache = M.step(params, cache, x[:, t], cfg)
        ys.append(y)
    errs["steps"] = normwise_error(np.stack(ys, axis=1), peer["steps"])
    return errs


@pytest.fixture(scope="module")
def inputs():
    return np.random.default_rng(7).standard_normal((2, PREFILL + STEPS, 40))


@pytest.mark.peers
def test_converter_reads_the_peer_state_dict(monkeypatch):
    torch, pcfg, model = _peer(monkeypatch)
    params, cfg, sd = _ours(model)
    assert (cfg.hidden_size, cfg.state_size, cfg.inner_size, cfg.conv_size, cfg.num_layers) == \
        (40, 5, 80, 4, 3)
    assert cfg.dt_rank_size == pcfg.time_step_rank == 3 and cfg.preset == "mamba_ssm"
    assert not cfg.proj_bias and cfg.conv_bias
    back = to_official_state_dict(params, cfg)
    expected = {k for k in sd if not k.startswith("embeddings.")}
    assert set(back) == expected
    for k in expected:
        assert back[k].shape == sd[k].shape
        np.testing.assert_array_equal(back[k], sd[k])
    # and a refssm model goes into the peer: load_state_dict accepts it, strict
    ours = M.build(cfg, seed=3)
    model.load_state_dict({**{k: torch.from_numpy(v) for k, v in
                              to_official_state_dict(ours.params, cfg).items()},
                           "embeddings.weight": model.embeddings.weight.detach().clone()})
    x = np.random.default_rng(8).standard_normal((1, 9, 40))
    with torch.no_grad(), _no_float32_downcast(torch):
        y = model(inputs_embeds=torch.from_numpy(x)).last_hidden_state.numpy()
    assert normwise_error(ours(x, return_sequence=True), y) <= FLOAT64


@pytest.mark.peers
def test_transformers_as_shipped(monkeypatch, inputs):
    torch, _, model = _peer(monkeypatch)
    params, cfg, _ = _ours(model)
    errs = _compare(_run_peer(torch, model, inputs), params, cfg, inputs)
    worst = max(errs.values())
    assert worst <= AS_SHIPPED, errs
    assert worst > 1e-12, "the peer ran in float64 throughout: tighten this test"


@pytest.mark.peers
def test_transformers_in_float64(monkeypatch, inputs):
    torch, _, model = _peer(monkeypatch)
    params, cfg, _ = _ours(model)
    with _no_float32_downcast(torch):
        peer = _run_peer(torch, model, inputs)
    errs = _compare(peer, params, cfg, inputs)
    assert max(errs.values()) <= FLOAT64, errs


@pytest.mark.peers
def test_teeth_a_wrong_mapping_is_caught(monkeypatch, inputs):
    """Swapping B and C in x_proj, or reading conv1d without the flip, breaks agreement."""
    torch, _, model = _peer(monkeypatch)
    params, cfg, sd = _ours(model)
    with _no_float32_downcast(torch):
        peer = _run_peer(torch, model, inputs)
    R, N = cfg.dt_rank_size, cfg.state_size
    k = params["mamba_block_1_ssm_x_proj"]["kernel"]
    swapped = {**params, "mamba_block_1_ssm_x_proj": {
        "kernel": np.concatenate([k[:, :R], k[:, R + N:], k[:, R:R + N]], axis=1)}}
    conv = params["mamba_block_1_conv_dw_conv"]
    flipped = {**params, "mamba_block_1_conv_dw_conv": {**conv, "kernel": conv["kernel"][::-1]}}
    for wrong in (swapped, flipped):
        errs = _compare(peer, wrong, cfg, inputs)
        # far above both budgets (1e-6 as shipped, 1e-12 in float64); the SSM term C.h is a
        # few % of y = C.h + D x here, so the state itself shows the B/C swap the most
        assert errs["cache.h"] > 1e-2 and errs["block_output[0]"] > 1e-3, errs


# --- converters alone (numpy only, no peer needed) ---------------------------
def test_config_inference_with_biases():
    """use_bias=True checkpoints: in/out_proj biases map to proj_bias (numpy only, no peer)."""
    c = M.MambaConfig(embed_dim=16, hidden_size=16, state_size=3, num_layers=2, proj_bias=True,
                      conv_bias=False)
    model = M.build(c, seed=1)
    sd = to_official_state_dict(model.params, c, prefix="backbone.")
    assert "backbone.layers.1.mixer.in_proj.bias" in sd and "backbone.layers.0.mixer.conv1d.bias" not in sd
    sd["backbone.embedding.weight"] = np.zeros((5, 16))
    sd["lm_head.weight"] = np.zeros((5, 16))
    params, c2 = from_official_state_dict(sd)
    assert c2 == c and config_from_official_state_dict(sd) == c
    for layer in model.params:
        for name in model.params[layer]:
            np.testing.assert_array_equal(params[layer][name], model.params[layer][name])


def test_converter_rejects_non_official_layouts():
    e = M.MambaConfig(embed_dim=16, hidden_size=16, preset="edifice")
    with pytest.raises(ValueError, match="expected the official layout"):
        to_official_state_dict(M.build(e).params, e)
    c = M.MambaConfig(embed_dim=5, hidden_size=16)
    with pytest.raises(ValueError, match="expected embed_dim == hidden_size"):
        to_official_state_dict(M.build(c).params, c)
    good = M.MambaConfig(embed_dim=16, hidden_size=16, num_layers=1)
    sd = to_official_state_dict(M.build(good).params, good)
    sd["layers.0.mixer.mystery"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"unexpected keys for this config \['layers.0.mixer.mystery'\]"):
        from_official_state_dict(sd)
    del sd["layers.0.mixer.mystery"], sd["layers.0.mixer.D"]
    with pytest.raises(ValueError, match=r"expected key 'layers.0.mixer.D'"):
        from_official_state_dict(sd)
