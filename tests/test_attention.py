"""Causal multi-head attention (refssm.ops.attention), float64: the mask, causality,
cached keys, manual backward against central finite differences, and the
forward/backward against torch's ``scaled_dot_product_attention(is_causal=True)``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from refssm.ops.attention import (causal_attention_backward, causal_attention_forward,
                                  causal_mask, masked_softmax, merge_heads, split_heads)
from refssm.verify.metrics import BUDGETS, normwise_error

from conftest import require_peer

FD = BUDGETS["grad_fd"]
AUTOGRAD = BUDGETS["grad_autograd"]
EPSILONS = (0.0, 1e-8, 0.5)          # true softmax, Edifice's, and one large enough to see


def qkv(seed, batch=2, heads=3, q_len=6, k_len=None, d=4):
    rng = np.random.default_rng(seed)
    k_len = q_len if k_len is None else k_len
    q = rng.standard_normal((batch, heads, q_len, d))
    k = rng.standard_normal((batch, heads, k_len, d))
    v = rng.standard_normal((batch, heads, k_len, d))
    return q, k, v


def reference_attention(q, k, v, eps=0.0):
    """Independent: one query at a time, visible keys only, plain Python softmax."""
    b, h, lq, d = q.shape
    lk = k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                last = i + (lk - lq)                       # keys 0..last are visible
                s = [float(np.dot(q[bi, hi, i], k[bi, hi, j])) / math.sqrt(d)
                     for j in range(last + 1)]
                m = max(s)
                e = [math.exp(x - m) for x in s]
                tot = sum(e) + eps
                out[bi, hi, i] = sum(e[j] / tot * v[bi, hi, j] for j in range(last + 1))
    return out


# --------------------------------------------------------------------------
# Forward: the mask, causality, cached keys
# --------------------------------------------------------------------------
@pytest.mark.parametrize("eps", EPSILONS)
def test_forward_equals_the_reference(eps):
    q, k, v = qkv(0)
    out, _ = causal_attention_forward(q, k, v, softmax_eps=eps)
    assert normwise_error(out, reference_attention(q, k, v, eps)) <= 1e-14


@pytest.mark.parametrize("eps", EPSILONS)
def test_masked_positions_have_exactly_zero_weight(eps):
    q, k, v = qkv(1, q_len=7)
    _, saved = causal_attention_forward(q, k, v, softmax_eps=eps)
    W = saved.weights
    future = ~causal_mask(7, 7)
    assert np.all(W[..., future] == 0.0)                   # exactly, not approximately
    assert np.all(W[..., ~future] > 0.0)
    row = W.sum(-1)
    if eps == 0.0:
        assert np.max(np.abs(row - 1.0)) <= 1e-15
    else:                                                  # Edifice's eps: rows sum to S / (S + eps) < 1
        assert np.all(row < 1.0) and np.min(row) > 1.0 - 2 * eps


@pytest.mark.parametrize("eps", EPSILONS)
def test_output_at_t_unchanged_by_any_future_input(eps):
    q, k, v = qkv(2, q_len=8)
    out, _ = causal_attention_forward(q, k, v, softmax_eps=eps)
    rng = np.random.default_rng(3)
    for t in range(8):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        for a in (q2, k2, v2):
            a[:, :, t + 1:] = 1e3 * rng.standard_normal(a[:, :, t + 1:].shape)
        out2, _ = causal_attention_forward(q2, k2, v2, softmax_eps=eps)
        assert np.array_equal(out2[:, :, :t + 1], out[:, :, :t + 1]), t
        if t < 7:                                          # teeth: the future does change later rows
            assert normwise_error(out2[:, :, t + 1:], out[:, :, t + 1:]) > 1e-2


@pytest.mark.parametrize("eps", EPSILONS)
def test_queries_after_cached_keys_equal_the_full_rows(eps):
    """Lk > Lq: the queries are the last frames; their rows equal the full computation's."""
    q, k, v = qkv(4, q_len=9)
    full, _ = causal_attention_forward(q, k, v, softmax_eps=eps)
    for start in (0, 1, 5, 8):
        part, _ = causal_attention_forward(q[:, :, start:], k, v, softmax_eps=eps)
        assert normwise_error(part, full[:, :, start:]) <= 1e-15, start
    # frame by frame (the SSTransformer's step): one query against the keys so far
    for t in range(9):
        one, _ = causal_attention_forward(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1],
                                          softmax_eps=eps)
        assert normwise_error(one, full[:, :, t:t + 1]) <= 1e-15, t


def test_first_frame_is_its_own_value_and_heads_are_independent():
    q, k, v = qkv(5)
    out, _ = causal_attention_forward(q, k, v)
    assert normwise_error(out[:, :, 0], v[:, :, 0]) <= 1e-16
    v2 = v.copy()
    v2[:, 1] += 1.0                                        # change head 1 only
    out2, _ = causal_attention_forward(q, k, v2)
    assert np.array_equal(out2[:, [0, 2]], out[:, [0, 2]])


def test_split_and_merge_heads_layout():
    """Head h is columns h*d .. h*d+d-1 (Edifice's reshape {b, L, heads, d} + transpose)."""
    x = np.random.default_rng(6).standard_normal((2, 5, 12))
    s = split_heads(x, 3)
    assert s.shape == (2, 3, 5, 4)
    assert np.array_equal(s[:, 1], x[:, :, 4:8])
    assert np.array_equal(merge_heads(s), x)


def test_softmax_eps_changes_the_output_by_its_size():
    q, k, v = qkv(7)
    a, _ = causal_attention_forward(q, k, v)
    b, _ = causal_attention_forward(q, k, v, softmax_eps=1e-8)
    err = normwise_error(b, a)
    assert 1e-11 < err < 1e-7


# --------------------------------------------------------------------------
# Backward: central finite differences
# --------------------------------------------------------------------------
def _fd_gradient(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp = x.copy(); xp[i] += h
        xm = x.copy(); xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("k_len", [5, 7])          # Lk = Lq, and two cached keys
def test_backward_vs_finite_differences(eps, k_len):
    q, k, v = qkv(8, batch=1, heads=2, q_len=5, k_len=k_len, d=3)
    W = np.random.default_rng(9).standard_normal(q.shape)
    out, saved = causal_attention_forward(q, k, v, softmax_eps=eps)
    g = causal_attention_backward(W, saved)
    args = {"q": q, "k": k, "v": v}
    for name in args:
        def loss(a, name=name):
            kw = {**args, name: a}
            return float(np.sum(W * causal_attention_forward(**kw, softmax_eps=eps)[0]))
        err = normwise_error(g[name], _fd_gradient(loss, args[name]))
        assert err <= FD, (name, err)


def test_backward_needs_the_path_through_the_max_when_eps_is_positive():
    """Teeth: with eps > 0 the softmax depends on the max it subtracts; dropping that
    term from the gradient is caught by finite differences."""
    eps = 0.5
    q, k, v = qkv(10, batch=1, heads=1, q_len=4, d=3)
    W = np.random.default_rng(11).standard_normal(q.shape)
    _, saved = causal_attention_forward(q, k, v, softmax_eps=eps)
    P = saved.weights
    dP = W @ v.swapaxes(-1, -2)
    dS_without = P * (dP - np.sum(dP * P, -1, keepdims=True))
    dq_without = dS_without @ k / math.sqrt(3)

    def loss(a):
        return float(np.sum(W * causal_attention_forward(a, k, v, softmax_eps=eps)[0]))

    fd = _fd_gradient(loss, q)
    assert normwise_error(dq_without, fd) > 1e-2
    assert normwise_error(causal_attention_backward(W, saved)["q"], fd) <= FD


def test_masked_softmax_rows():
    w, denom, argmax = masked_softmax(np.array([[3.0, 9.0], [1.0, 2.0]]), causal_mask(2, 2))
    assert w[0, 1] == 0.0 and w[0, 0] == 1.0 and argmax.tolist() == [0, 1]
    assert denom[0, 0] == 1.0


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
def test_bad_inputs_name_expected_and_actual():
    q, k, v = qkv(12)
    with pytest.raises(ValueError, match=r"k and v of one shape"):
        causal_attention_forward(q, k, v[:, :, :-1])
    with pytest.raises(ValueError, match=r"1 <= Lq <= Lk"):
        causal_attention_forward(q, k[:, :, :-1], v[:, :, :-1])
    with pytest.raises(ValueError, match=r"expected k \[batch=2, heads=3, Lk, d=4\]"):
        causal_attention_forward(q, k[:, :2], v[:, :2])
    with pytest.raises(ValueError, match=r"q: expected 4 dimensions, got shape"):
        causal_attention_forward(q[0], k, v)
    with pytest.raises(ValueError, match=r"softmax_eps a finite number >= 0, got -1"):
        causal_attention_forward(q, k, v, softmax_eps=-1)
    bad = q.copy(); bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"q: expected finite values"):
        causal_attention_forward(bad, k, v)
    _, saved = causal_attention_forward(q, k, v)
    with pytest.raises(ValueError, match=r"expected d_out shape \(2, 3, 6, 4\)"):
        causal_attention_backward(np.ones((2, 3, 5, 4)), saved)
    with pytest.raises(ValueError, match=r"multiple of num_heads=5"):
        split_heads(np.ones((1, 2, 12)), 5)


# --------------------------------------------------------------------------
# Peer: torch's scaled_dot_product_attention (float64)
# --------------------------------------------------------------------------
@pytest.mark.peers
@pytest.mark.parametrize("shape", [(2, 3, 7, 4), (1, 1, 1, 5), (3, 2, 16, 8)])
def test_forward_and_backward_vs_torch_sdpa(shape):
    torch = require_peer("torch")
    F = torch.nn.functional
    b, h, L, d = shape
    q, k, v = qkv(13, batch=b, heads=h, q_len=L, d=d)
    W = np.random.default_rng(14).standard_normal(q.shape)
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    t_out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    (t_out * torch.tensor(W)).sum().backward()
    out, saved = causal_attention_forward(q, k, v)
    g = causal_attention_backward(W, saved)
    assert normwise_error(out, t_out.detach().numpy()) <= 1e-12
    for name, t in (("q", tq), ("k", tk), ("v", tv)):
        err = normwise_error(g[name], t.grad.numpy())
        assert err <= AUTOGRAD, (name, err)
