"""The selective scan: meaning, gradients, engines, extremes, bad input (float64)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refssm.ssm.selective_scan import (
    ENGINES,
    selective_scan,
    selective_scan_backward,
    selective_scan_fn,
    selective_scan_forward,
    softplus,
)
from refssm.verify.metrics import BUDGETS, normwise_error

from _scan_cases import make_case

SCAN = BUDGETS["scan"]
GRAD_FD = BUDGETS["grad_fd"]
GRAD_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


# --------------------------------------------------------------------------
# An independent computation: an LTI system is a convolution
# --------------------------------------------------------------------------
def test_lti_case_equals_convolution_kernel():
    """Constant dt, B, C: y = sum_k K_k u[t-k] with K_k = sum_n C A_bar^k dt B.

    A second algorithm (explicit kernel, no recurrence) for the same numbers.
    """
    rng = np.random.default_rng(3)
    L, ch, N = 40, 3, 5
    A = -rng.uniform(0.1, 2.0, (ch, N))
    Bc = rng.standard_normal((ch, N))
    Cc = rng.standard_normal((ch, N))
    dt = rng.uniform(0.05, 0.5, ch)
    u = rng.standard_normal((1, L, ch))
    delta = np.broadcast_to(dt, (1, L, ch)).copy()
    out, _ = selective_scan(u, delta, A, Bc, Cc)
    k = np.arange(L)[:, None, None]
    K = np.sum(Cc * np.exp(k * dt[:, None] * A) * dt[:, None] * Bc, axis=-1)   # [L, ch]
    ref = np.stack([np.convolve(u[0, :, c], K[:, c])[:L] for c in range(ch)], axis=-1)
    assert normwise_error(out[0], ref) <= SCAN


def test_matches_official_semantics_loop():
    """A literal transcription of selective_scan_ref's loop, [batch, channels, seq_len]."""
    rng = np.random.default_rng(5)
    b, ch, L, N = 2, 4, 11, 3
    u = rng.standard_normal((b, ch, L))
    delta = rng.standard_normal((b, ch, L))
    A = -np.exp(rng.standard_normal((ch, N)))
    B = rng.standard_normal((b, N, L))
    C = rng.standard_normal((b, N, L))
    D = rng.standard_normal(ch)
    z = rng.standard_normal((b, ch, L))
    bias = rng.standard_normal(ch)
    out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, return_last_state=True)
    dt = np.logaddexp(0, delta + bias[:, None])
    x = np.zeros((b, ch, N))
    ys = []
    for i in range(L):
        x = np.exp(dt[:, :, i, None] * A) * x + dt[:, :, i, None] * B[:, None, :, i] * u[:, :, i, None]
        ys.append(np.einsum("bdn,bn->bd", x, C[:, :, i]))
    ref = (np.stack(ys, axis=2) + u * D[:, None]) * z / (1 + np.exp(-z))
    assert normwise_error(out, ref) <= SCAN
    assert normwise_error(last, x) <= SCAN


# --------------------------------------------------------------------------
# Gradients against central finite differences
# --------------------------------------------------------------------------
def _fd_gradient(loss, args, key, eps=1e-6):
    v = args[key]
    fd = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        a2 = dict(args)
        a2[key] = v.copy()
        a2[key][idx] += eps
        fp = loss(a2)
        a2[key][idx] -= 2 * eps
        fd[idx] = (fp - loss(a2)) / (2 * eps)
    return fd


@pytest.mark.parametrize("bc", ["variable", "grouped", "constant"])
@pytest.mark.parametrize("edifice_flags", [False, True])
def test_backward_matches_finite_differences(bc, edifice_flags):
    rng = np.random.default_rng(11)
    args = make_case(rng, batch=2, seq_len=6, channels=4, state=3, bc=bc)
    opts = dict(delta_softplus=True)
    if edifice_flags:
        # clip range chosen so some dt are inside and some outside, none at the edge
        opts.update(delta_clip=(0.15, 0.6), delta_b_mean=True)
    W = rng.standard_normal(args["u"].shape)
    Wh = rng.standard_normal(args["initial_state"].shape)

    def loss(a):
        out, h, _ = selective_scan_forward(**a, **opts)
        return float(np.sum(W * out) + np.sum(Wh * h))

    _, _, saved = selective_scan_forward(**args, **opts)
    grads = selective_scan_backward(W, Wh, saved)
    if edifice_flags:
        dt = softplus(args["delta"] + args["delta_bias"])
        inside = (dt > 0.15) & (dt < 0.6)
        assert 0.2 < inside.mean() < 0.9, "the clip must bind on some steps only"
    for key in GRAD_KEYS:
        err = normwise_error(grads[key], _fd_gradient(loss, args, key))
        assert err <= GRAD_FD, f"{key}: {err:.2e}"


# --------------------------------------------------------------------------
# Engines agree, forward and backward (hypothesis grid)
# --------------------------------------------------------------------------
def _run(args, opts, engine, W, Wh):
    out, h, saved = selective_scan_forward(**args, **opts, engine=engine)
    grads = selective_scan_backward(W, Wh, saved)
    return out, h, grads


def _assert_engines_agree(args, opts, rng):
    W = rng.standard_normal(args["u"].shape)
    Wh = rng.standard_normal((args["u"].shape[0], args["u"].shape[2], args["A"].shape[1]))
    ref = _run(args, opts, "numpy", W, Wh)
    for engine in ENGINES[1:]:
        got = _run(args, opts, engine, W, Wh)
        assert normwise_error(got[0], ref[0]) <= SCAN, engine
        assert normwise_error(got[1], ref[1]) <= SCAN, engine
        for key in GRAD_KEYS:
            if ref[2][key] is None:
                assert got[2][key] is None
                continue
            err = normwise_error(got[2][key], ref[2][key])
            assert err <= SCAN, f"{engine} d{key}: {err:.2e}"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seq_len=st.sampled_from([1, 2, 3, 7, 33, 64, 65, 129]),
    state=st.sampled_from([1, 2, 16]),
    batch=st.integers(1, 3),
    bc=st.sampled_from(["variable", "grouped", "constant"]),
    with_D=st.booleans(), with_z=st.booleans(), with_bias=st.booleans(),
    with_h0=st.booleans(), softplus_=st.booleans(), edifice=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_engines_agree_grid(seq_len, state, batch, bc, with_D, with_z, with_bias, with_h0,
                            softplus_, edifice, seed):
    rng = np.random.default_rng(seed)
    args = make_case(rng, batch=batch, seq_len=seq_len, channels=4, state=state, bc=bc,
                     with_D=with_D, with_z=with_z, with_bias=with_bias, with_h0=with_h0,
                     delta_range=(-3.0, 0.5) if softplus_ else (1e-3, 0.5))
    opts = dict(delta_softplus=softplus_)
    if edifice:
        opts.update(delta_clip=(0.05, 0.4), delta_b_mean=True)
    _assert_engines_agree(args, opts, rng)


def test_engines_agree_long_sequence():
    rng = np.random.default_rng(7)
    args = make_case(rng, batch=1, seq_len=4097, channels=3, state=16, bc="variable")
    _assert_engines_agree(args, dict(delta_softplus=True), rng)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("split", [1, 5, 31])
def test_chunked_continuation_equals_one_call(engine, split):
    rng = np.random.default_rng(split)
    args = make_case(rng, batch=2, seq_len=40, channels=4, state=5, bc="variable", with_h0=False)
    full, h_full = selective_scan(**args, delta_softplus=True, engine=engine)
    first = {k: (v[:, :split] if k in ("u", "delta", "B", "C", "z") else v) for k, v in args.items()}
    rest = {k: (v[:, split:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in args.items()}
    out1, h1 = selective_scan(**first, delta_softplus=True, engine=engine)
    rest["initial_state"] = h1
    out2, h2 = selective_scan(**rest, delta_softplus=True, engine=engine)
    assert normwise_error(np.concatenate([out1, out2], axis=1), full) <= SCAN
    assert normwise_error(h2, h_full) <= SCAN


# --------------------------------------------------------------------------
# Extreme regimes
# --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dt_value", [1e-8, 1e3])
def test_extreme_step_sizes(engine, dt_value):
    rng = np.random.default_rng(1)
    args = make_case(rng, batch=2, seq_len=50, channels=3, state=16, with_bias=False,
                     with_z=False)
    args["delta"] = np.full_like(args["u"], dt_value)
    W = rng.standard_normal(args["u"].shape)
    out, h, saved = selective_scan_forward(**args, engine=engine)
    grads = selective_scan_backward(W, None, saved)
    assert np.isfinite(out).all() and np.isfinite(h).all()
    assert all(np.isfinite(g).all() for g in grads.values() if g is not None)
    ref_out, ref_h, ref_saved = selective_scan_forward(**args, engine="numpy")
    assert normwise_error(out, ref_out) <= SCAN
    if dt_value == 1e3:
        # A_bar = exp(-1e3 * |A|) underflows to 0: the state forgets at once and
        # h[t] = dt * B[t] * u[t] exactly.
        expect = dt_value * args["B"][:, -1, None, :] * args["u"][:, -1, :, None]
        assert normwise_error(h, expect) <= SCAN


@pytest.mark.parametrize("engine", ENGINES)
def test_long_sequence_with_abar_near_one(engine):
    """|A_bar| = exp(-1e-6) over 100000 steps: the state carries the whole sequence.

    Constant input: closed form h_L = h_inf * (1 - a^L) with a = exp(dt A),
    h_inf = dt B u / (1 - a).
    """
    L, N = 100_000, 4
    A = -np.array([[1.0, 2.0, 5.0, 10.0]])
    dt = 1e-6
    u = np.ones((1, L, 1))
    B = np.array([[0.5, -1.0, 2.0, 0.25]])
    C = np.ones((1, N))
    out, h = selective_scan(u, np.full((1, L, 1), dt), A, B, C, engine=engine)
    expect = dt * B[0] / -np.expm1(dt * A[0]) * -np.expm1(L * dt * A[0])
    assert np.isfinite(out).all()
    # measured (numpy engine): 7.7e-13 on h, 1.0e-13 on the output
    assert normwise_error(h[0, 0], expect) <= SCAN
    assert normwise_error(out[0, -1, 0], expect.sum()) <= SCAN


# --------------------------------------------------------------------------
# float32
# --------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_float32_error_is_documented(engine):
    """float32 against float64 on seq_len 2048, state 16: the figure in the module docstring."""
    rng = np.random.default_rng(2)
    args = make_case(rng, batch=1, seq_len=2048, channels=8, state=16, bc="variable",
                     delta_range=(1e-3, 0.1), with_bias=False)
    out64, _ = selective_scan(**args, engine="numpy")
    args32 = {k: (None if v is None else v.astype(np.float32)) for k, v in args.items()}
    out32, h32 = selective_scan(**args32, engine=engine)
    assert out32.dtype == np.float32 and h32.dtype == np.float32
    assert normwise_error(out32, out64) <= 2e-6


# --------------------------------------------------------------------------
# Bad input: a clear error, never a wrong number
# --------------------------------------------------------------------------
def _good():
    return make_case(np.random.default_rng(0), batch=2, seq_len=5, channels=4, state=3)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(delta=a["delta"][:, :4]), r"delta: expected shape \(2, 5, 4\).*got \(2, 4, 4\)"),
    (lambda a: a.update(A=a["A"][:3]), r"A: expected shape \(4, state\).*got \(3, 3\)"),
    (lambda a: a.update(B=a["B"][..., :2]), r"B: expected shape \(2, 5, 3\).*got \(2, 5, 2\)"),
    (lambda a: a.update(C=np.zeros((2, 5, 3, 3))), r"C: groups must divide channels=4"),
    (lambda a: a.update(D=np.ones(5)), r"D: expected shape \(4,\).*got \(5,\)"),
    (lambda a: a.update(initial_state=np.zeros((2, 4, 2))), r"initial_state: expected shape \(2, 4, 3\)"),
    (lambda a: a.update(u=a["u"].astype(np.int64)), r"u: expected a floating-point array.*got dtype int64"),
    (lambda a: a.update(B=a["B"].astype(np.complex128)), r"B: expected a floating-point array.*complex128"),
    (lambda a: a["u"].__setitem__((0, 1, 2), np.nan), r"u: expected finite values, got 1 NaN/inf.*\(0, 1, 2\)"),
    (lambda a: a["delta"].__setitem__((1, 0, 0), np.inf), r"delta: expected finite values"),
    (lambda a: a.update(u=a["u"][0]), r"u: expected 3 dimensions, got shape \(5, 4\)"),
])
def test_bad_input_is_a_clear_error(mutate, match):
    args = _good()
    mutate(args)
    with pytest.raises(ValueError, match=match):
        selective_scan(**args)


def test_bad_engine_and_clip():
    args = _good()
    with pytest.raises(ValueError, match=r"engine: expected one of .*got 'cuda'"):
        selective_scan(**args, engine="cuda")
    for clip in ((0.1, 0.01), 0.1, (0.0, 0.1, 0.2), ("a", 1.0), (0.0, float("inf")), "12",
                 (True, True), (0, 10 ** 400)):
        with pytest.raises(ValueError, match=r"delta_clip: expected \(lo, hi\), two finite "
                                             r"numbers with lo <= hi, got"):
            selective_scan(**args, delta_clip=clip)     # 0.1 was a TypeError, 3 values unpacking


@pytest.mark.parametrize("which, shape, match", [
    ("delta", (2, 4, 6), r"delta: expected shape \(2, 4, 5\) \[batch, channels, seq_len\] \(as u\), "
                         r"got \(2, 4, 6\)"),
    ("z", (2, 5, 4), r"z: expected shape \(2, 4, 5\)"),
    ("B", (2, 3, 6), r"B: expected shape \(2, 3, 5\) \[batch, state, seq_len\] \(variable\), "
                     r"got \(2, 3, 6\)"),
    ("C", (2, 3, 3, 5), r"C: expected \[batch, groups, state, seq_len\] with groups dividing "
                        r"channels=4, got shape \(2, 3, 3, 5\) \(3 groups\)"),
    ("C", (2, 2, 3, 6), r"C: expected shape \(2, 2, 3, 5\) \[batch, groups, state, seq_len\]"),
    ("B", (4, 2), r"B: expected shape \(4, 3\) \[channels, state\] \(constant\)"),
    ("A", (3, 3), r"A: expected shape \(4, state\)"),
])
def test_drop_in_errors_speak_its_own_layout(which, shape, match):
    # the drop-in takes [batch, channels, seq_len]; its errors used to describe (and print
    # transposed) shapes of the internal [batch, seq_len, channels] layout
    rng = np.random.default_rng(3)
    args = dict(u=rng.standard_normal((2, 4, 5)), delta=rng.uniform(0.01, 0.1, (2, 4, 5)),
                A=-np.ones((4, 3)), B=rng.standard_normal((2, 3, 5)),
                C=rng.standard_normal((2, 3, 5)), z=rng.standard_normal((2, 4, 5)))
    assert selective_scan_fn(**args).shape == (2, 4, 5)
    args[which] = rng.standard_normal(shape)
    with pytest.raises(ValueError, match=match):
        selective_scan_fn(**args)


def test_drop_in_reports_a_nan_at_its_own_index():
    rng = np.random.default_rng(4)
    u = rng.standard_normal((1, 2, 6))
    u[0, 1, 5] = np.nan                              # [batch, channels, seq_len]
    with pytest.raises(ValueError, match=r"u: expected finite values, got 1 NaN/inf entries "
                                         r"\(first at index \(0, 1, 5\)"):
        selective_scan_fn(u, np.full((1, 2, 6), 0.1), -np.ones((2, 3)),
                          rng.standard_normal((1, 3, 6)), rng.standard_normal((1, 3, 6)))
