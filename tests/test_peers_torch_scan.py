"""Manual backward of the selective scan against torch autograd (float64).

The torch side is an independent transcription of the math of
``selective_scan_ref`` (state-spaces/mamba) in refssm's layout, differentiated
by autograd; budget <= 1e-10 (DESIGN.md section 4).
"""
from __future__ import annotations

import numpy as np
import pytest

from refssm.ssm.selective_scan import ENGINES, selective_scan_backward, selective_scan_forward
from refssm.verify.metrics import BUDGETS, normwise_error

from _scan_cases import make_case
from conftest import require_peer

pytestmark = pytest.mark.peers


def torch_selective_scan(torch, u, delta, A, B, C, D, z, delta_bias, h0, softplus,
                         clip=None, b_mean=False):
    """Literal loop, [batch, seq_len, channels]; B/C variable [b, L, N] or constant [ch, N]."""
    dt = delta + delta_bias if delta_bias is not None else delta
    if softplus:
        dt = torch.logaddexp(torch.zeros_like(dt), dt)
    if clip is not None:
        dt = torch.clamp(dt, clip[0], clip[1])
    dtB = dt.mean(dim=-1, keepdim=True).expand_as(dt) if b_mean else dt
    h = h0
    ys = []
    for t in range(u.shape[1]):
        Bt = B[:, t, None, :] if B.dim() == 3 else B[None]
        Ct = C[:, t, None, :] if C.dim() == 3 else C[None]
        h = torch.exp(dt[:, t, :, None] * A) * h + dtB[:, t, :, None] * Bt * u[:, t, :, None]
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, h


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bc", ["variable", "constant"])
@pytest.mark.parametrize("edifice", [False, True])
def test_backward_matches_torch_autograd(engine, bc, edifice):
    torch = require_peer("torch")
    rng = np.random.default_rng(17)
    args = make_case(rng, batch=2, seq_len=23, channels=5, state=4, bc=bc)
    opts = dict(delta_softplus=True)
    if edifice:
        opts.update(delta_clip=(0.15, 0.6), delta_b_mean=True)
    W = rng.standard_normal(args["u"].shape)
    Wh = rng.standard_normal(args["initial_state"].shape)
    out, h, saved = selective_scan_forward(**args, **opts, engine=engine)
    grads = selective_scan_backward(W, Wh, saved)

    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in args.items()}
    t_out, t_h = torch_selective_scan(
        torch, t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"],
        t["initial_state"], True, opts.get("delta_clip"), opts.get("delta_b_mean", False))
    loss = (t_out * torch.tensor(W)).sum() + (t_h * torch.tensor(Wh)).sum()
    loss.backward()
    budget = BUDGETS["grad_autograd"]
    assert normwise_error(out, t_out.detach().numpy()) <= BUDGETS["scan"]
    assert normwise_error(h, t_h.detach().numpy()) <= BUDGETS["scan"]
    for key, tv in t.items():
        err = normwise_error(grads[key], tv.grad.numpy())
        assert err <= budget, f"{engine} d{key}: {err:.2e}"
