"""Manual backward of the selective scan against torch autograd (float64).

The torch side is an independent transcription of the math of
``selective_scan_ref`` (state-spaces/mamba) in refssm's layout
(:func:`refssm.verify.peers.torch_selective_scan`, shared with ``refssm
verify``), differentiated by autograd; budget <= 1e-10 (DESIGN.md section 4).
"""
from __future__ import annotations

import numpy as np
import pytest

from refssm.ssm.selective_scan import ENGINES, selective_scan_backward, selective_scan_forward
from refssm.verify.metrics import BUDGETS, normwise_error
from refssm.verify.peers import torch_selective_scan

from _scan_cases import make_case
from conftest import require_peer

pytestmark = pytest.mark.peers


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
