"""GELU (refssm.ops.gelu), the State Space Transformer's FFN activation, float64:
values from the math library's erf, backward vs central finite differences,
and against torch's exact GELU (peers).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from refssm.ops.gelu import gelu_backward, gelu_forward
from refssm.verify.metrics import BUDGETS, normwise_error

from conftest import require_peer

X = np.concatenate([np.linspace(-8, 8, 161), [-40.0, -1e-8, 0.0, 1e-8, 40.0]])


def test_gelu_equals_x_phi_of_x():
    """Against mpmath at 40 digits, elementwise (no cancellation for negative x)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(40):
        ref = np.array([float(mpmath.mpf(v) * mpmath.ncdf(mpmath.mpf(v))) for v in X])
        dref = np.array([float(mpmath.ncdf(mpmath.mpf(v)) + mpmath.mpf(v) * mpmath.npdf(mpmath.mpf(v)))
                         for v in X])
    y, saved = gelu_forward(X)
    rel = np.abs(y - ref) / np.maximum(np.abs(ref), 1e-300)
    assert np.max(rel[ref != 0]) <= 1e-14 and np.all(y[ref == 0] == 0)
    d = gelu_backward(np.ones_like(X), saved)["x"]
    assert np.max(np.abs(d - dref) / np.maximum(np.abs(dref), 1e-300)) <= 1e-13
    # the erf form of Axon / torch agrees to round-off
    erf_form = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in X])
    assert normwise_error(y, erf_form) <= 1e-16


def test_gelu_is_not_the_tanh_approximation():
    y, _ = gelu_forward(X)
    tanh = 0.5 * X * (1 + np.tanh(math.sqrt(2 / math.pi) * (X + 0.044715 * X ** 3)))
    assert normwise_error(y, tanh) > 1e-5


def test_gelu_backward_vs_finite_differences():
    x = np.random.default_rng(0).standard_normal((3, 7)) * 3
    dy = np.random.default_rng(1).standard_normal(x.shape)
    _, saved = gelu_forward(x)
    g = gelu_backward(dy, saved)["x"]
    h = 1e-6
    fd = dy * (gelu_forward(x + h)[0] - gelu_forward(x - h)[0]) / (2 * h)
    assert normwise_error(g, fd) <= BUDGETS["grad_fd"]


@pytest.mark.peers
def test_gelu_vs_torch():
    torch = require_peer("torch")
    t = torch.tensor(X, requires_grad=True)
    out = torch.nn.functional.gelu(t, approximate="none")
    dy = np.random.default_rng(2).standard_normal(X.shape)
    (out * torch.tensor(dy)).sum().backward()
    y, saved = gelu_forward(X)
    assert normwise_error(y, out.detach().numpy()) <= 1e-15
    assert normwise_error(gelu_backward(dy, saved)["x"], t.grad.numpy()) <= 1e-14
