"""The State Space Transformer (preset mamba_ssm) against a torch transcription
(float64): torch's own layer_norm, conv1d, softplus, gelu and
scaled_dot_product_attention(is_causal=True), with the selective scan as a
literal loop. Budget: the step-vs-full budget (two float64 computations of the
same formula), <= 1e-12.
"""
from __future__ import annotations

import numpy as np
import pytest

from refssm.models import ss_transformer as S
from refssm.verify.metrics import BUDGETS, normwise_error

from conftest import require_peer

pytestmark = pytest.mark.peers


def torch_sst(torch, params, x, cfg):
    F = torch.nn.functional
    T = lambda a: torch.tensor(a, dtype=torch.float64)                     # noqa: E731
    P = {layer: {k: T(v) for k, v in names.items()} for layer, names in params.items()}

    def dense(v, layer):
        w = layer["kernel"]
        return F.linear(v, w.T, layer.get("bias"))

    def ln(v, layer):
        return F.layer_norm(v, (v.shape[-1],), layer["gamma"], layer["beta"], eps=cfg.norm_eps)

    batch, L = x.shape[0], x.shape[1]
    E, N, K, R = cfg.inner_size, cfg.state_size, cfg.conv_size, cfg.dt_rank_size
    nh, hd = cfg.num_heads, cfg.head_dim
    h = T(x)
    if "input_projection" in P:
        h = dense(h, P["input_projection"])
    for i in range(1, cfg.num_layers + 1):
        b = f"sst_block_{i}"
        u = ln(h, P[f"{b}_norm"])
        xz = dense(u, P[f"{b}_ssm_in_proj"])
        xs, z = xz[..., :E], xz[..., E:]
        conv = P[f"{b}_ssm_conv"]                                          # kernel [K, 1, E]
        weight = conv["kernel"].permute(2, 1, 0)                           # torch [E, 1, K]
        xs = F.conv1d(xs.transpose(1, 2), weight, conv["bias"], padding=K - 1,
                      groups=E)[..., :L].transpose(1, 2)
        xs = F.silu(xs)
        xd = dense(xs, P[f"{b}_ssm_x_proj"])
        dlow, B, C = xd[..., :R], xd[..., R:R + N], xd[..., R + N:]
        delta = F.softplus(dense(dlow, P[f"{b}_ssm_dt_proj"]), threshold=1000)
        A = -torch.exp(P[f"{b}_ssm"]["A_log"])
        st = torch.zeros(batch, E, N, dtype=torch.float64)
        ys = []
        for t in range(L):
            st = (torch.exp(delta[:, t, :, None] * A) * st
                  + delta[:, t, :, None] * B[:, t, None, :] * xs[:, t, :, None])
            ys.append((st * C[:, t, None, :]).sum(-1))
        y = torch.stack(ys, 1) + P[f"{b}_ssm"]["D"] * xs
        s = dense(y * F.silu(z), P[f"{b}_ssm_out_proj"])
        heads = lambda v: v.reshape(batch, L, nh, hd).transpose(1, 2)       # noqa: E731
        q, k, v = (heads(dense(u, P[f"{b}_attn_{p}"])) for p in "qkv")
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = dense(att.transpose(1, 2).reshape(batch, L, nh * hd), P[f"{b}_attn_out_proj"])
        g = torch.sigmoid(dense(u, P[f"{b}_gate_proj"]))
        h = h + g * s + (1 - g) * a
        f = F.gelu(dense(ln(h, P[f"{b}_ffn_norm"]), P[f"{b}_ffn_up"]), approximate="none")
        h = h + dense(f, P[f"{b}_ffn_down"])
    return ln(h, P["final_norm"]).numpy()


@pytest.mark.parametrize("heads,head_dim,embed_dim", [(2, 5, 5), (4, 4, 16), (1, 24, 7)])
def test_mamba_ssm_preset_vs_torch(heads, head_dim, embed_dim):
    torch = require_peer("torch")
    c = S.SSTransformerConfig(embed_dim=embed_dim, hidden_size=16, state_size=4, num_layers=2,
                              num_heads=heads, head_dim=head_dim)
    params = S.random_params(c, seed=1)
    x = np.random.default_rng(2).standard_normal((2, 23, embed_dim))
    ours = S.forward(params, x, c, return_sequence=True).output
    err = normwise_error(ours, torch_sst(torch, params, x, c))
    assert err <= BUDGETS["step_vs_full"], err


def test_the_built_model_vs_torch():
    torch = require_peer("torch")
    c = S.SSTransformerConfig(embed_dim=6, hidden_size=32, state_size=8, num_layers=2)
    model = S.build(c, seed=3)
    x = np.random.default_rng(4).standard_normal((1, 12, 6))
    err = normwise_error(model(x, return_sequence=True), torch_sst(torch, model.params, x, c))
    assert err <= BUDGETS["step_vs_full"], err
