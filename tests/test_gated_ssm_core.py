"""The gated EMA core of GatedSSM (refssm.ssm.gated_ema) and the causal window mean
(refssm.ops.pooling), float64: an independent transcription, manual backward vs
central finite differences (and torch autograd), Numba engine = NumPy engine,
step = forward, chunks = one call, the legacy mode's length dependence, bad input.
"""
from __future__ import annotations

import numpy as np
import pytest

from refssm.ops.pooling import causal_mean_backward, causal_mean_forward, causal_mean_step
from refssm.ssm.gated_ema import (gated_ema_backward, gated_ema_forward, gated_ema_step,
                                  legacy_weights)
from refssm.verify.metrics import BUDGETS, normwise_error

from conftest import require_peer

FD = BUDGETS["grad_fd"]
SCAN = BUDGETS["scan"]
AUTOGRAD = BUDGETS["grad_autograd"]
MODES = ("causal", "legacy")


def case(seed, batch=2, seq_len=7, inner=5, N=3, scale_bc=0.8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, seq_len, inner))
    delta = rng.uniform(0.05, 2.0, (batch, seq_len, inner))
    B = scale_bc * rng.standard_normal((batch, seq_len, N))
    C = scale_bc * rng.standard_normal((batch, seq_len, N))
    ctx0 = rng.standard_normal((batch, inner))
    return x, delta, B, C, ctx0


def reference(x, delta, B, C, alpha, mode, ctx0=None):
    """Independent transcription, element by element in plain Python floats."""
    import math
    sig = lambda z: 1.0 / (1.0 + math.exp(-z))                          # noqa: E731
    b_, L, E = x.shape
    y = np.zeros_like(x)
    last = np.zeros((b_, E))
    for b in range(b_):
        w = [alpha ** (L - 1 - t) for t in range(L)]
        tot = sum(w)
        ctx = [0.0 if ctx0 is None else float(ctx0[b, c]) for c in range(E)]
        for t in range(L):
            g = sig(sum(float(d) for d in delta[b, t]) / E)
            s = sig(sum(float(B[b, t, n]) * float(C[b, t, n]) for n in range(B.shape[2])))
            for c in range(E):
                gx = g * s * float(x[b, t, c])
                if mode == "causal":
                    ctx[c] = alpha * ctx[c] + (1 - alpha) * gx
                    cv = ctx[c]
                else:
                    cv = gx * w[t] / tot
                y[b, t, c] = gx + (1 - g) * cv
        last[b] = ctx
    return y, last


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.0, 1.0])
def test_forward_equals_the_transcription(engine, mode, alpha):
    x, delta, B, C, ctx0 = case(0)
    ic = ctx0 if mode == "causal" else None
    y, last, _ = gated_ema_forward(x, delta, B, C, alpha=alpha, scan_mode=mode,
                                   initial_context=ic, engine=engine)
    y_ref, last_ref = reference(x, delta, B, C, alpha, mode, ic)
    assert normwise_error(y, y_ref) <= 1e-14
    if mode == "causal":
        assert normwise_error(last, last_ref) <= 1e-14
    else:
        assert last is None


def test_legacy_weights_are_edifices():
    """alpha^(L-1-t) normalised over the sequence; the last frame weighs most."""
    w = legacy_weights(5, 0.9)
    raw = 0.9 ** np.array([4.0, 3, 2, 1, 0])
    assert normwise_error(w, raw / raw.sum()) <= 1e-16
    assert abs(w.sum() - 1.0) <= 1e-15 and np.all(np.diff(w) > 0)


def test_legacy_output_at_t_depends_on_the_length():
    """The documented fact: same frames 0..t, longer sequence -> different output at t."""
    x, delta, B, C, _ = case(1, seq_len=12)
    for mode, changes in (("legacy", True), ("causal", False)):
        full, _, _ = gated_ema_forward(x, delta, B, C, scan_mode=mode)
        short, _, _ = gated_ema_forward(x[:, :6], delta[:, :6], B[:, :6], C[:, :6], scan_mode=mode)
        err = normwise_error(short, full[:, :6])
        if changes:
            assert err > 1e-2, err
        else:
            assert err == 0.0, err


def test_legacy_and_causal_differ():
    x, delta, B, C, _ = case(2, seq_len=10)
    a, _, _ = gated_ema_forward(x, delta, B, C, scan_mode="causal")
    b, _, _ = gated_ema_forward(x, delta, B, C, scan_mode="legacy")
    assert normwise_error(b, a) > 1e-2


@pytest.mark.parametrize("engine", ["numpy", "numba"])
def test_step_equals_forward_and_chunks_equal_one_call(engine):
    x, delta, B, C, ctx0 = case(3, seq_len=20)
    full, last, _ = gated_ema_forward(x, delta, B, C, initial_context=ctx0, engine=engine)
    ctx = ctx0
    ys = []
    for t in range(20):
        y, ctx = gated_ema_step(x[:, t], delta[:, t], B[:, t], C[:, t], ctx)
        ys.append(y)
    assert normwise_error(np.stack(ys, 1), full) <= SCAN
    assert normwise_error(ctx, last) <= SCAN
    ctx, parts = ctx0, []
    for a, b in ((0, 3), (3, 4), (4, 13), (13, 20)):
        y, ctx, _ = gated_ema_forward(x[:, a:b], delta[:, a:b], B[:, a:b], C[:, a:b],
                                      initial_context=ctx, engine=engine)
        parts.append(y)
    assert normwise_error(np.concatenate(parts, 1), full) <= SCAN


def test_the_context_carries():
    """Teeth: in causal mode frame 0 is still felt at frame 20, through ctx only:
    (1 - g) (1 - alpha) alpha^20 g s ~ 0.3 * 0.1 * 0.12 * 0.5 ~ 2e-3 per unit change."""
    x, delta, B, C, _ = case(4, seq_len=21)
    y, _, _ = gated_ema_forward(x, delta, B, C)
    x2 = x.copy(); x2[:, 0] += 1.0
    y2, _, _ = gated_ema_forward(x2, delta, B, C)
    assert normwise_error(y2[:, -1], y[:, -1]) > 3e-4


# --------------------------------------------------------------------------
# Backward: finite differences, Numba engine = NumPy engine
# --------------------------------------------------------------------------
def _fd_gradient(f, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp = x.copy(); xp[i] += h
        xm = x.copy(); xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


@pytest.mark.parametrize("engine", ["numpy", "numba"])
@pytest.mark.parametrize("mode", MODES)
def test_backward_vs_finite_differences(engine, mode):
    x, delta, B, C, ctx0 = case(5, batch=2, seq_len=6, inner=4, N=3)
    causal = mode == "causal"
    rng = np.random.default_rng(6)
    W = rng.standard_normal(x.shape)
    Wl = rng.standard_normal(ctx0.shape) if causal else None
    args = {"x": x, "delta": delta, "B": B, "C": C}
    if causal:
        args["initial_context"] = ctx0

    def loss(**kw):
        y, last, _ = gated_ema_forward(**kw, scan_mode=mode, engine="numpy")
        return float(np.sum(W * y) + (np.sum(Wl * last) if causal else 0.0))

    _, _, saved = gated_ema_forward(**args, scan_mode=mode, engine=engine)
    g = gated_ema_backward(W, Wl, saved)
    for name in args:
        fd = _fd_gradient(lambda a, name=name: loss(**{**args, name: a}), args[name])
        err = normwise_error(g[name], fd)
        assert err <= FD, (name, err)
    if not causal:
        assert g["initial_context"] is None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 9, 70, 3), (1, 1, 1, 1), (3, 130, 5, 16)])
def test_numba_engine_equals_numpy_engine(mode, shape):
    """Forward and backward; 70 channels > one channel block of 64 (two prange items)."""
    batch, L, E, N = shape
    x, delta, B, C, ctx0 = case(7, batch, L, E, N)
    ic = ctx0 if mode == "causal" else None
    y0, l0, s0 = gated_ema_forward(x, delta, B, C, scan_mode=mode, initial_context=ic)
    y1, l1, s1 = gated_ema_forward(x, delta, B, C, scan_mode=mode, initial_context=ic,
                                   engine="numba")
    assert normwise_error(y1, y0) <= SCAN
    if mode == "causal":
        assert normwise_error(l1, l0) <= SCAN
    rng = np.random.default_rng(8)
    dy = rng.standard_normal(y0.shape)
    dl = rng.standard_normal(ctx0.shape) if mode == "causal" else None
    g0 = gated_ema_backward(dy, dl, s0)
    g1 = gated_ema_backward(dy, dl, s1)
    for name, ref in g0.items():
        if ref is None:
            assert g1[name] is None
        else:
            assert normwise_error(g1[name], ref) <= SCAN, name


def test_float32_error_is_documented():
    """float32 in, float32 out; error vs float64 measured (L = 256, inner 32)."""
    x, delta, B, C, _ = case(9, batch=2, seq_len=256, inner=32, N=8)
    y64, _, _ = gated_ema_forward(x, delta, B, C)
    for engine in ("numpy", "numba"):
        y32, _, _ = gated_ema_forward(*(a.astype(np.float32) for a in (x, delta, B, C)),
                                      engine=engine)
        assert y32.dtype == np.float32
        assert normwise_error(y32, y64) <= 1e-6


@pytest.mark.peers
@pytest.mark.parametrize("mode", MODES)
def test_backward_vs_torch_autograd(mode):
    torch = require_peer("torch")
    x, delta, B, C, ctx0 = case(10, batch=2, seq_len=11, inner=6, N=4)
    causal = mode == "causal"
    rng = np.random.default_rng(11)
    W = rng.standard_normal(x.shape)
    Wl = rng.standard_normal(ctx0.shape)
    T = {k: torch.tensor(v, requires_grad=True) for k, v in
         dict(x=x, delta=delta, B=B, C=C, ctx0=ctx0).items()}
    g = torch.sigmoid(T["delta"].mean(-1, keepdim=True))
    s = torch.sigmoid((T["B"] * T["C"]).sum(-1, keepdim=True))
    gx = g * s * T["x"]
    L = x.shape[1]
    if causal:
        ctx, c = [], T["ctx0"]
        for t in range(L):
            c = 0.9 * c + 0.1 * gx[:, t]
            ctx.append(c)
        ctx = torch.stack(ctx, 1)
    else:
        w = 0.9 ** torch.arange(L - 1, -1, -1, dtype=torch.float64)
        ctx = gx * (w / w.sum())[:, None]
    y = gx + (1 - g) * ctx
    loss = (y * torch.tensor(W)).sum() + ((c * torch.tensor(Wl)).sum() if causal else 0)
    loss.backward()
    _, _, saved = gated_ema_forward(x, delta, B, C, scan_mode=mode,
                                    initial_context=ctx0 if causal else None)
    assert normwise_error(saved.context, ctx.detach().numpy()) <= 1e-14
    ours = gated_ema_backward(W, Wl if causal else None, saved)
    for name, key in (("x", "x"), ("delta", "delta"), ("B", "B"), ("C", "C"),
                      ("initial_context", "ctx0")):
        if not causal and name == "initial_context":
            continue
        err = normwise_error(ours[name], T[key].grad.numpy())
        assert err <= AUTOGRAD, (name, err)


# --------------------------------------------------------------------------
# The causal window mean
# --------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 2, 4, 7])
def test_causal_mean_is_the_zero_padded_window_mean(K):
    x = np.random.default_rng(12).standard_normal((2, 9, 3))
    y, buf, _ = causal_mean_forward(x, K)
    xp = np.concatenate([np.zeros((2, K - 1, 3)), x], axis=1)
    ref = np.stack([xp[:, t:t + K].mean(axis=1) for t in range(9)], axis=1)
    assert normwise_error(y, ref) <= 1e-15
    assert np.array_equal(buf, xp[:, 9:]) if K > 1 else buf.shape == (2, 0, 3)


@pytest.mark.parametrize("K", [1, 3, 5])
def test_causal_mean_chunks_and_steps_equal_one_call(K):
    x = np.random.default_rng(13).standard_normal((2, 11, 4))
    y, buf_full, _ = causal_mean_forward(x, K)
    buf, parts = None, []
    for a, b in ((0, 2), (2, 3), (3, 11)):
        p, buf, _ = causal_mean_forward(x[:, a:b], K, buf)
        parts.append(p)
    assert np.array_equal(np.concatenate(parts, 1), y)
    buf, steps = np.zeros((2, K - 1, 4)), []
    for t in range(11):
        s, buf = causal_mean_step(x[:, t], buf, K)
        steps.append(s)
    assert np.array_equal(np.stack(steps, 1), y) and np.array_equal(buf, buf_full)


def test_causal_mean_backward_vs_finite_differences():
    rng = np.random.default_rng(14)
    x, buf0 = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 3, 3))
    W, Wb = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 3, 3))

    def loss(x, buf0):
        y, buf, _ = causal_mean_forward(x, 4, buf0)
        return float(np.sum(W * y) + np.sum(Wb * buf))

    _, _, saved = causal_mean_forward(x, 4, buf0)
    g = causal_mean_backward(W, Wb, saved)
    assert normwise_error(g["x"], _fd_gradient(lambda a: loss(a, buf0), x)) <= FD
    assert normwise_error(g["buffer"], _fd_gradient(lambda a: loss(x, a), buf0)) <= FD


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------
def test_bad_inputs_name_expected_and_actual():
    x, delta, B, C, ctx0 = case(15)
    with pytest.raises(ValueError, match=r"delta: expected shape \(2, 7, 5\)"):
        gated_ema_forward(x, delta[:, :-1], B, C)
    with pytest.raises(ValueError, match=r"B: expected shape \(2, 7, N\)"):
        gated_ema_forward(x, delta, B[:, :-1], C)
    with pytest.raises(ValueError, match=r"C: expected shape \(2, 7, 3\)"):
        gated_ema_forward(x, delta, B, C[..., :2])
    with pytest.raises(ValueError, match=r"initial_context: expected shape \(2, 5\)"):
        gated_ema_forward(x, delta, B, C, initial_context=ctx0[:, :2])
    with pytest.raises(ValueError, match=r"legacy scan has no carried context"):
        gated_ema_forward(x, delta, B, C, scan_mode="legacy", initial_context=ctx0)
    with pytest.raises(ValueError, match=r"alpha: expected a number in \[0, 1\], got 1.5"):
        gated_ema_forward(x, delta, B, C, alpha=1.5)
    with pytest.raises(ValueError, match=r"scan_mode: expected one of \('causal', 'legacy'\)"):
        gated_ema_forward(x, delta, B, C, scan_mode="ema")
    with pytest.raises(ValueError, match=r"engine: expected one of \('numpy', 'numba'\)"):
        gated_ema_forward(x, delta, B, C, engine="cuda")
    with pytest.raises(ValueError, match=r"x: expected 3 dimensions"):
        gated_ema_forward(x[0], delta, B, C)
    bad = x.copy(); bad[1, 2, 3] = np.inf
    with pytest.raises(ValueError, match=r"x: expected finite values"):
        gated_ema_forward(bad, delta, B, C)
    _, _, saved = gated_ema_forward(x, delta, B, C, scan_mode="legacy")
    with pytest.raises(ValueError, match=r"legacy scan returns no context"):
        gated_ema_backward(np.ones_like(x), ctx0, saved)
    with pytest.raises(ValueError, match=r"dy: expected shape \(2, 7, 5\)"):
        gated_ema_backward(np.ones((2, 6, 5)), None, saved)
    with pytest.raises(ValueError, match=r"buffer shape \(2, 2, 5\)"):
        causal_mean_forward(x, 3, np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match=r"window an integer >= 1, got 0"):
        causal_mean_forward(x, 0)


def test_gated_ema_step_checks_its_frame():
    # the public one-frame step checked nothing: alpha 1.5, mismatched shapes, NaN all ran
    from refssm.ssm.gated_ema import gated_ema_step

    x, d = np.ones((2, 3)), np.full((2, 3), 0.5)
    B = C = np.ones((2, 4))
    ctx = np.zeros((2, 3))
    assert gated_ema_step(x, d, B, C, ctx)[0].shape == (2, 3)
    for alpha in (1.5, "0.5", True):
        with pytest.raises(ValueError, match="alpha: expected a number in"):
            gated_ema_step(x, d, B, C, ctx, alpha)
    with pytest.raises(ValueError, match=r"delta: expected shape \(2, 3\) \[batch, inner\]"):
        gated_ema_step(x, np.ones((2, 7)), B, C, ctx)
    with pytest.raises(ValueError, match=r"context: expected shape \(2, 3\) \[batch, inner\]"):
        gated_ema_step(x, d, B, C, np.zeros((2, 1)))
    with pytest.raises(ValueError, match=r"C: expected shape \(2, 4\) \[batch, state\]"):
        gated_ema_step(x, d, B, np.ones((2, 5)), ctx)
    with pytest.raises(ValueError, match="x: expected finite values"):
        gated_ema_step(np.full((2, 3), np.nan), d, B, C, ctx)
