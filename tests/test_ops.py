"""The primitives of refssm.ops: forwards against independent computations,
every backward against central finite differences (float64, <= 1e-6 relative).
"""
from __future__ import annotations

import numpy as np
import pytest

from refssm.ops import (
    causal_depthwise_conv1d_backward,
    causal_depthwise_conv1d_forward,
    causal_depthwise_conv1d_step,
    dense_backward,
    dense_forward,
    dropout_backward,
    dropout_forward,
    inverse_softplus,
    layer_norm_backward,
    layer_norm_forward,
    rms_norm_backward,
    rms_norm_forward,
    sigmoid,
    silu_backward,
    silu_forward,
    softplus_backward,
    softplus_forward,
)
from refssm.verify.metrics import BUDGETS, central_difference, normwise_error

GRAD_FD = BUDGETS["grad_fd"]


def check_grads(loss, inputs: dict, grads: dict, rng, n_dirs=3, eps=1e-6):
    """For every input: <grad, v> against the central difference of ``loss`` along ``v``.

    ``loss(**inputs)`` is a scalar. Each input is checked alone (the others
    fixed), along ``n_dirs`` random directions; returns the worst relative error.
    """
    worst = 0.0
    for name, x in inputs.items():
        for _ in range(n_dirs):
            v = rng.standard_normal(x.shape)

            def f(xv, name=name):
                return loss(**{**inputs, name: xv})

            fd = central_difference(f, x, v, eps)
            an = float(np.sum(grads[name] * v))
            err = abs(fd - an) / max(abs(an), abs(fd), 1e-300)
            worst = max(worst, err)
            assert err <= GRAD_FD, f"d/d{name}: analytic {an!r} vs finite difference {fd!r}"
    return worst


# --------------------------------------------------------------------------
# dense
# --------------------------------------------------------------------------
@pytest.mark.parametrize("lead", [(5,), (2, 7)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_forward_and_backward(lead, with_bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, 4))
    kernel = rng.standard_normal((4, 3))
    bias = rng.standard_normal(3) if with_bias else None
    y, saved = dense_forward(x, kernel, bias)
    ref = np.einsum("...i,io->...o", x, kernel) + (0 if bias is None else bias)
    assert normwise_error(y, ref) <= 1e-15
    w = rng.standard_normal(y.shape)
    g = dense_backward(w, saved)
    inputs = {"x": x, "kernel": kernel, **({"bias": bias} if with_bias else {})}

    def loss(x, kernel, bias=None):
        return float(np.sum(w * dense_forward(x, kernel, bias)[0]))

    check_grads(loss, inputs, g, rng)
    assert (g["bias"] is None) == (not with_bias)


def test_dense_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"kernel \[in, out\]"):
        dense_forward(np.ones((2, 3)), np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"expected bias shape \(5,\)"):
        dense_forward(np.ones((2, 4)), np.ones((4, 5)), np.ones(4))


# --------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------
def test_layer_norm_forward_normalises():
    rng = np.random.default_rng(1)
    x = 3.0 + 2.0 * rng.standard_normal((4, 6, 9))
    y, _ = layer_norm_forward(x, np.ones(9), np.zeros(9), eps=0.0)
    assert np.max(np.abs(y.mean(-1))) <= 1e-14
    assert np.max(np.abs(y.var(-1) - 1.0)) <= 1e-13
    gamma, beta = rng.standard_normal(9), rng.standard_normal(9)
    y2, _ = layer_norm_forward(x, gamma, beta, eps=1e-5)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    assert normwise_error(y2, ref) <= 1e-14


def test_rms_norm_forward():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 7))
    gamma = rng.standard_normal(7)
    y, _ = rms_norm_forward(x, gamma, eps=1e-5)
    ref = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-5) * gamma
    assert normwise_error(y, ref) <= 1e-15


def test_layer_norm_backward_fd():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 6))
    gamma, beta = rng.standard_normal(6), rng.standard_normal(6)
    y, saved = layer_norm_forward(x, gamma, beta)
    w = rng.standard_normal(y.shape)

    def loss(x, gamma, beta):
        return float(np.sum(w * layer_norm_forward(x, gamma, beta)[0]))

    check_grads(loss, {"x": x, "gamma": gamma, "beta": beta}, layer_norm_backward(w, saved), rng)


def test_rms_norm_backward_fd():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 6))
    gamma = rng.standard_normal(6)
    y, saved = rms_norm_forward(x, gamma)
    w = rng.standard_normal(y.shape)

    def loss(x, gamma):
        return float(np.sum(w * rms_norm_forward(x, gamma)[0]))

    check_grads(loss, {"x": x, "gamma": gamma}, rms_norm_backward(w, saved), rng)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype,big,ok", [(np.float64, 1e160, 1e150), (np.float32, 1e20, 1e17)])
def test_norms_refuse_rows_whose_square_overflows(dtype, big, ok):
    # |x| past sqrt(max float) makes mean(x^2) inf and rstd 0: LayerNorm returned beta and
    # RMSNorm 0 whatever x was (two different inputs, the same output), with no error
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 6)).astype(dtype)
    gamma, beta = rng.standard_normal(6).astype(dtype), rng.standard_normal(6).astype(dtype)
    with pytest.raises(ValueError, match=rf"layer_norm: .* overflow {np.dtype(dtype).name}"):
        layer_norm_forward(x * dtype(big), gamma, beta)
    with pytest.raises(ValueError, match=rf"rms_norm: .* overflow {np.dtype(dtype).name}"):
        rms_norm_forward(x * dtype(big), gamma)
    with pytest.raises(ValueError, match=r"layer_norm: .* non-finite entries"):
        layer_norm_forward(np.where(x > 1.0, np.inf, x), gamma, beta)
    if dtype == np.float64:                          # squares finite, their sum is not
        with pytest.raises(ValueError, match=r"rms_norm: .* the squares or their sum overflow"):
            rms_norm_forward(np.full((1, 1000), 1e153), np.ones(1000))
    # just below the overflow both are still exact: scale invariant (eps negligible)
    tol = 1e-14 if dtype == np.float64 else 1e-6
    assert normwise_error(layer_norm_forward(x * dtype(ok), gamma, beta, eps=0.0)[0],
                          layer_norm_forward(x, gamma, beta, eps=0.0)[0]) <= tol
    assert normwise_error(rms_norm_forward(x * dtype(ok), gamma, eps=0.0)[0],
                          rms_norm_forward(x, gamma, eps=0.0)[0]) <= tol


def test_norms_reject_wrong_gamma():
    with pytest.raises(ValueError, match=r"expected gamma shape \(4,\)"):
        rms_norm_forward(np.ones((2, 4)), np.ones(3))
    with pytest.raises(ValueError, match=r"expected beta shape \(4,\)"):
        layer_norm_forward(np.ones((2, 4)), np.ones(4), np.ones(5))


# --------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------
def test_activations_stable_at_extremes():
    x = np.array([-800.0, -30.0, 0.0, 30.0, 800.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):   # underflow to 0 is fine
        s = sigmoid(x)
        sp, _ = softplus_forward(x)
        si, _ = silu_forward(x)
    assert s[0] == 0.0 and s[-1] == 1.0 and s[2] == 0.5
    assert sp[-1] == 800.0 and sp[0] == 0.0
    assert abs(sp[1] - np.log1p(np.exp(-30.0))) <= 1e-15 * sp[1]      # relative accuracy kept
    assert si[-1] == 800.0 and si[0] == 0.0


@pytest.mark.parametrize("fwd,bwd", [(silu_forward, silu_backward),
                                     (softplus_forward, softplus_backward)])
def test_activation_backward_fd(fwd, bwd):
    rng = np.random.default_rng(5)
    x = 3.0 * rng.standard_normal((4, 7))
    y, saved = fwd(x)
    w = rng.standard_normal(y.shape)

    def loss(x):
        return float(np.sum(w * fwd(x)[0]))

    check_grads(loss, {"x": x}, bwd(w, saved), rng)


def test_inverse_softplus_roundtrip_and_rejects_nonpositive():
    y = np.exp(np.linspace(np.log(1e-4), np.log(10.0), 50))
    assert normwise_error(softplus_forward(inverse_softplus(y))[0], y) <= 1e-15
    rel = np.abs(softplus_forward(inverse_softplus(y))[0] - y) / y
    assert rel.max() <= 1e-14                       # relative, even at 1e-4
    with pytest.raises(ValueError, match="expected values > 0"):
        inverse_softplus(np.array([0.1, 0.0]))


# --------------------------------------------------------------------------
# causal depthwise conv1d
# --------------------------------------------------------------------------
def _conv_case(rng, batch=2, L=9, C=3, K=4):
    return (rng.standard_normal((batch, L, C)), rng.standard_normal((K, 1, C)),
            rng.standard_normal(C))


@pytest.mark.parametrize("K", [1, 2, 4, 12])
def test_conv_equals_numpy_convolve(K):
    """An independent algorithm: y[:, c] = (x[:, c] * flip(w[:, c]))[:L] (true convolution)."""
    rng = np.random.default_rng(6)
    x, kernel, bias = _conv_case(rng, K=K)
    y, buf, _ = causal_depthwise_conv1d_forward(x, kernel, bias)
    L = x.shape[1]
    ref = np.stack([np.stack([np.convolve(x[b, :, c], kernel[::-1, 0, c])[:L] + bias[c]
                              for c in range(x.shape[2])], -1) for b in range(x.shape[0])])
    assert normwise_error(y, ref) <= 1e-15
    x_pad = np.concatenate([np.zeros((2, K - 1, 3)), x], axis=1)   # causal zero padding
    np.testing.assert_array_equal(buf, x_pad[:, x_pad.shape[1] - (K - 1):])


def test_conv_matches_torch_layout_semantics():
    """kernel[K-1] multiplies the current frame (cross-correlation, as torch/Axon)."""
    x = np.zeros((1, 5, 1)); x[0, 2, 0] = 1.0                      # impulse at t = 2
    kernel = np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1)
    y, _, _ = causal_depthwise_conv1d_forward(x, kernel)
    np.testing.assert_array_equal(y[0, :, 0], [0.0, 0.0, 3.0, 2.0, 1.0])


@pytest.mark.parametrize("split", [1, 2, 3, 5, 8])
def test_conv_chunks_and_steps_equal_one_call(split):
    rng = np.random.default_rng(7)
    x, kernel, bias = _conv_case(rng, L=9, K=4)
    y, buf, _ = causal_depthwise_conv1d_forward(x, kernel, bias)
    y1, b1, _ = causal_depthwise_conv1d_forward(x[:, :split], kernel, bias)
    y2, b2, _ = causal_depthwise_conv1d_forward(x[:, split:], kernel, bias, b1)
    assert normwise_error(np.concatenate([y1, y2], 1), y) <= 1e-15
    np.testing.assert_array_equal(b2, buf)
    buffer = np.zeros((2, 3, 3))
    for t in range(x.shape[1]):
        yt, buffer = causal_depthwise_conv1d_step(x[:, t], buffer, kernel, bias)
        assert normwise_error(yt, y[:, t]) <= 1e-15
    np.testing.assert_array_equal(buffer, buf)


@pytest.mark.parametrize("K,L", [(4, 9), (4, 2), (1, 5)])
def test_conv_backward_fd(K, L):
    rng = np.random.default_rng(8)
    x, kernel, bias = _conv_case(rng, L=L, K=K)
    buffer = rng.standard_normal((2, K - 1, 3))
    y, new_buf, saved = causal_depthwise_conv1d_forward(x, kernel, bias, buffer)
    w = rng.standard_normal(y.shape)
    wb = rng.standard_normal(new_buf.shape)
    g = causal_depthwise_conv1d_backward(w, wb, saved)

    def loss(x, kernel, bias, buffer):
        y, nb, _ = causal_depthwise_conv1d_forward(x, kernel, bias, buffer)
        return float(np.sum(w * y) + np.sum(wb * nb))

    check_grads(loss, {"x": x, "kernel": kernel, "bias": bias, "buffer": buffer}, g, rng)


def test_conv_rejects_bad_shapes():
    x = np.ones((2, 5, 3))
    with pytest.raises(ValueError, match=r"kernel \[conv_size, 1, channels\]"):
        causal_depthwise_conv1d_forward(x, np.ones((3, 4)))
    with pytest.raises(ValueError, match="expected input channels 4"):
        causal_depthwise_conv1d_forward(x, np.ones((2, 1, 4)))
    with pytest.raises(ValueError, match=r"expected buffer shape \(2, 1, 3\)"):
        causal_depthwise_conv1d_forward(x, np.ones((2, 1, 3)), None, np.ones((2, 2, 3)))


# --------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------
def test_dropout_identity_unless_training():
    x = np.random.default_rng(9).standard_normal((3, 4))
    for kwargs in ({}, {"training": False, "rng": 1}, {"training": True, "rng": 1}):
        rate = 0.0 if kwargs.get("training") else 0.5
        y, s = dropout_forward(x, rate, **kwargs)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dropout_backward(np.ones_like(x), s)["x"], np.ones_like(x))


def test_dropout_statistics_and_seed():
    x = np.ones((200, 500))
    y1, s1 = dropout_forward(x, 0.3, training=True, rng=42)
    y2, _ = dropout_forward(x, 0.3, training=True, rng=42)
    np.testing.assert_array_equal(y1, y2)                      # same seed, same mask
    kept = y1 != 0
    assert abs(kept.mean() - 0.7) < 0.01                      # 1e5 draws: sd 0.0015
    assert np.allclose(y1[kept], 1 / 0.7, rtol=0, atol=1e-15)
    assert abs(y1.mean() - 1.0) < 0.02                         # expectation kept
    y3, _ = dropout_forward(x, 0.3, training=True, rng=43)
    assert not np.array_equal(y1, y3)


def test_dropout_backward_fd():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((4, 6))
    y, saved = dropout_forward(x, 0.4, training=True, rng=5)
    w = rng.standard_normal(y.shape)

    def loss(x):
        return float(np.sum(w * dropout_forward(x, 0.4, training=True, rng=5)[0]))

    check_grads(loss, {"x": x}, dropout_backward(w, saved), rng)


def test_dropout_rejects_bad_rate_and_missing_rng():
    with pytest.raises(ValueError, match="expected 0 <= rate < 1, got 1.0"):
        dropout_forward(np.ones(3), 1.0, training=True, rng=0)
    with pytest.raises(ValueError, match="needs rng"):
        dropout_forward(np.ones(3), 0.5, training=True)
