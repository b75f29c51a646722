"""The selective scan (Mamba's S6): public API, prologue, epilogue, engines.

Same meaning as the official ``selective_scan_ref`` of state-spaces/mamba
(``mamba_ssm/ops/selective_scan_interface.py``), in the layout of the original
API, ``[batch, seq_len, channels]``::

    dt       = delta + delta_bias                      (if delta_bias)
    dt       = softplus(dt)                            (if delta_softplus)
    dt       = clip(dt, lo, hi)                        (if delta_clip; Edifice)
    dtB      = dt, or mean_c(dt) broadcast             (delta_b_mean; Edifice)
    A_bar[t] = exp(dt[t] * A)                          Gu & Dao 2023, eq. 4
    h[t]     = A_bar[t] * h[t-1] + dtB[t] * B[t] * u[t]          eq. 2a
    y[t]     = C[t] . h[t] + D * u[t]                            eq. 2b
    out[t]   = y[t] * silu(z[t])                       (if z; Mamba's gate)

``B``/``C`` are each one of

* *variable*: ``[batch, seq_len, state]`` (input dependent, the selective case),
* *grouped*: ``[batch, seq_len, groups, state]``, channel ``c`` reading group
  ``c // (channels // groups)``,
* *constant*: ``[channels, state]`` (an LTI system, as in S4D).

Three engines compute the same core (``engine=``):

``"numpy"``
    :mod:`refssm.scan.numpy_seq`, the readable loop over time; the ground truth.
``"numba"``
    :mod:`refssm.scan.numba_seq`, fused sequential scan (discretisation on the
    fly, never allocates ``[batch, seq_len, channels, state]``); it also fuses
    the prologue and epilogue below into its kernels
    (:func:`refssm.scan.numba_seq.fused_forward`), so no ``dt`` or ``y`` is
    allocated either.
``"logdepth"``
    :mod:`refssm.scan.numba_logdepth`, Blelloch up-sweep/down-sweep over time.

Every engine has ``*_forward`` returning the output and what it saves, and a
``*_backward`` taking that; :func:`selective_scan_forward` /
:func:`selective_scan_backward` wrap them with the prologue/epilogue written
here in NumPy (the numpy and logdepth engines) or fused (numba).

Saved values are references to the inputs (``u``, ``z``, ``D``; for the numba
and logdepth engines also ``delta`` and ``delta_bias``, from which they
recompute ``dt``): do not modify them in place between forward and backward.

The clip's kinks: at ``dt`` exactly on a bound the derivative is taken from
inside (``[lo, hi]`` inclusive), in every engine. The numba and logdepth
engines compute softplus within 3 ulp of NumPy's, so a step whose softplus
lands within those few ulp of a bound can fall on the other side of the kink
there, and its ``d delta`` is then 0 in one engine and not in the other. The
engines agree to 1e-12 away from the kinks (the hypothesis-tested grid),
where float64 can carry the answer that far: with ``A_bar`` within ~1e-5 of 1
over 1e5 steps, every engine, the NumPy one included, is ~2.5e-12 from the
exact answer (a review measured 2.2e-12 to 2.8e-12 against long double, one
channel, state 16), so such cases are tested against an extended-precision run
(``tests/test_logdepth.py::test_long_sequence_with_abar_near_one``).

dtype: the computation runs in float32 if every real input is float32, else
in float64 (the oracle). The float32 error against float64 is measured in
``tests/test_selective_scan.py::test_float32_error_is_documented``:
normwise <= 2e-6 on the output over seq_len 2048 (state 16, dt in
[1e-3, 1e-1]); see that test for the exact figure. It is not a general
bound: with larger steps (softplus, dt up to ~1.3) a review measured 9e-6.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .._validate import as_float_array, check_shape, result_dtype

__all__ = [
    "selective_scan",
    "selective_scan_forward",
    "selective_scan_backward",
    "selective_scan_fn",
    "SelectiveScanSaved",
    "ENGINES",
    "normalise_bc",
    "softplus",
]

ENGINES = ("numpy", "numba", "logdepth")


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))`` without overflow, ``[...]`` -> ``[...]``.

    Written ``max(x, 0) + log1p(exp(-|x|))``: no overflow, no cancellation, and
    about 1.6x faster than ``np.logaddexp(0, x)``. Exact form (no threshold):
    torch's ``F.softplus`` returns ``x`` for ``x > 20``, a relative difference
    below ``1e-10``.

    Examples
    --------
    >>> float(softplus(np.array(0.0)))
    0.6931471805599453
    """
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x):
    """Logistic function ``1 / (1 + exp(-x))``.

    For ``x < -709`` ``exp(-x)`` overflows to inf and the result is the exact
    limit 0 (the warning is silenced). Within 2 ulp of a 60-digit mpmath
    reference over [-700, 40] (the former ``exp(-logaddexp(0, -x))`` form was
    30 ulp and 5x slower).
    """
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _silu(x):
    """``x * sigmoid(x)`` (the SiLU / swish gate of Mamba)."""
    return x * _sigmoid(x)


def _silu_grad(x):
    """``d silu(x) / dx = s (1 + x (1 - s))`` with ``s = sigmoid(x)``."""
    s = _sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _engine_module(engine: str):
    if engine == "numpy":
        from ..scan import numpy_seq as mod
    elif engine == "numba":
        from ..scan import numba_seq as mod
    elif engine == "logdepth":
        from ..scan import numba_logdepth as mod
    else:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    return mod


def normalise_bc(M: np.ndarray, name: str, batch: int, seq_len: int, channels: int,
                 state: Optional[int]) -> tuple[np.ndarray, str]:
    """Bring ``B`` or ``C`` to the one layout the engines read, ``[bB, LB, G, state]``.

    Parameters
    ----------
    M : ndarray
        ``[batch, seq_len, state]`` (variable), ``[batch, seq_len, groups,
        state]`` (grouped) or ``[channels, state]`` (constant).
    name : str
        ``"B"`` or ``"C"``, for error messages.
    batch, seq_len, channels : int
    state : int or None
        Expected state size (from ``A``).

    Returns
    -------
    M4 : ndarray ``[bB, LB, G, state]``
        A view where possible.
    kind : str
        ``"variable"``, ``"grouped"`` or ``"constant"``.

    Examples
    --------
    >>> M4, kind = normalise_bc(np.zeros((2, 5, 4)), "B", 2, 5, 6, 4)
    >>> M4.shape, kind
    ((2, 5, 1, 4), 'variable')
    """
    if M.ndim == 2:
        check_shape(M, (channels, state), name, "[channels, state] (constant)")
        return M[None, None], "constant"
    if M.ndim == 3:
        check_shape(M, (batch, seq_len, state), name, "[batch, seq_len, state] (variable)")
        return M[:, :, None, :], "variable"
    if M.ndim == 4:
        groups = M.shape[2]
        if groups < 1 or channels % groups != 0:
            raise ValueError(
                f"{name}: groups must divide channels={channels}, got shape {M.shape} "
                f"({groups} groups)")
        check_shape(M, (batch, seq_len, groups, state), name,
                    "[batch, seq_len, groups, state] (grouped)")
        return M, "grouped"
    raise ValueError(
        f"{name}: expected [batch, seq_len, state], [batch, seq_len, groups, state] or "
        f"[channels, state], got shape {M.shape}")


@dataclass
class SelectiveScanSaved:
    """Named values :func:`selective_scan_forward` keeps for the backward.

    Attributes
    ----------
    engine : str
    core : object
        The engine's own saved values (see its ``scan_core_forward``; for
        ``"numba"``, :func:`refssm.scan.numba_seq.fused_forward`'s, which cover
        the prologue and epilogue too: then ``delta_pre``, ``dt`` and
        ``y_core`` are None, recomputed by its backward).
    delta_pre : ndarray ``[batch, seq_len, channels]`` or None
        ``delta + delta_bias`` before softplus (needed for its derivative).
    dt : ndarray ``[batch, seq_len, channels]`` or None
        After softplus and clip (before the channel mean). None for
        ``"numba"`` and for ``"logdepth"`` without ``delta_b_mean`` (its
        kernel applies the prologue to the columns it stages; the backward
        recomputes ``dt``, and ``core.dt`` is None until then).
    u, D, z, y_core : the epilogue's inputs (``y_core = C . h``; or None).
    delta, delta_bias : ndarray or None
        The raw step and its bias, kept (instead of ``delta_pre``) by the
        ``"logdepth"`` engine, whose prologue backward recomputes from them.
    flags : dict
        ``delta_softplus, delta_clip, delta_b_mean, has_bias, B_kind, C_kind,
        B_shape, C_shape, state``.
    """

    engine: str
    core: Any
    delta_pre: np.ndarray
    dt: np.ndarray
    u: np.ndarray
    D: Optional[np.ndarray]
    z: Optional[np.ndarray]
    y_core: np.ndarray
    flags: dict
    delta: Optional[np.ndarray] = None
    delta_bias: Optional[np.ndarray] = None


def _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_clip):
    """Validate every argument; return them as arrays of one dtype."""
    u = as_float_array(u, "u", ndim=3)
    batch, seq_len, channels = u.shape
    if seq_len < 1 or channels < 1 or batch < 1:
        raise ValueError(f"u: expected non-empty [batch, seq_len, channels], got {u.shape}")
    delta = as_float_array(delta, "delta", ndim=3)
    check_shape(delta, u.shape, "delta", "[batch, seq_len, channels] (as u)")
    A = as_float_array(A, "A", ndim=2)
    if A.shape[0] != channels:
        raise ValueError(f"A: expected shape ({channels}, state) [channels, state], got {A.shape}")
    state = A.shape[1]
    if state < 1:
        raise ValueError(f"A: expected state >= 1, got shape {A.shape}")
    B = as_float_array(B, "B", ndim=(2, 3, 4))
    C = as_float_array(C, "C", ndim=(2, 3, 4))
    if D is not None:
        D = as_float_array(D, "D", ndim=1)
        check_shape(D, (channels,), "D", "[channels]")
    if z is not None:
        z = as_float_array(z, "z", ndim=3)
        check_shape(z, u.shape, "z", "[batch, seq_len, channels] (as u)")
    if delta_bias is not None:
        delta_bias = as_float_array(delta_bias, "delta_bias", ndim=1)
        check_shape(delta_bias, (channels,), "delta_bias", "[channels]")
    if initial_state is not None:
        initial_state = as_float_array(initial_state, "initial_state", ndim=3)
        check_shape(initial_state, (batch, channels, state), "initial_state",
                    "[batch, channels, state]")
    if delta_clip is not None:
        try:
            if isinstance(delta_clip, (str, bytes)) or len(delta_clip) != 2 or any(
                    isinstance(v, (bool, np.bool_, str, bytes)) for v in delta_clip):
                raise TypeError
            lo, hi = (float(v) for v in delta_clip)
        except (TypeError, ValueError, OverflowError):
            lo = hi = float("nan")
        if not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise ValueError(f"delta_clip: expected (lo, hi), two finite numbers with lo <= hi, "
                             f"got {delta_clip!r}")
        delta_clip = (lo, hi)
    dtype = result_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    cast = (lambda a: None if a is None else np.ascontiguousarray(a, dtype=dtype))
    B4, B_kind = normalise_bc(B, "B", batch, seq_len, channels, state)
    C4, C_kind = normalise_bc(C, "C", batch, seq_len, channels, state)
    return (cast(u), cast(delta), cast(A), cast(B4), B_kind, B.shape, cast(C4), C_kind,
            C.shape, cast(D), cast(z), cast(delta_bias), cast(initial_state), delta_clip)


def selective_scan_forward(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                           delta_softplus=False, initial_state=None, *,
                           delta_clip=None, delta_b_mean=False, engine="numpy"):
    """Selective scan forward; returns ``(out, last_state, saved)``.

    Parameters
    ----------
    u : ndarray ``[batch, seq_len, channels]``
        Input sequence.
    delta : ndarray ``[batch, seq_len, channels]``
        Raw step size (``dt_proj`` output in Mamba).
    A : ndarray ``[channels, state]``
        Diagonal continuous-time state matrix, real (``-exp(A_log)``).
    B, C : ndarray
        ``[batch, seq_len, state]``, ``[batch, seq_len, groups, state]`` or
        ``[channels, state]``.
    D : ndarray ``[channels]``, optional
        Skip connection ``D * u``.
    z : ndarray ``[batch, seq_len, channels]``, optional
        Gate: the output is multiplied by ``silu(z)``.
    delta_bias : ndarray ``[channels]``, optional
        Added to ``delta`` before the softplus.
    delta_softplus : bool
        Apply ``softplus`` to ``delta (+ delta_bias)``.
    initial_state : ndarray ``[batch, channels, state]``, optional
        ``h[-1]``; zeros if omitted. Pass a previous call's ``last_state`` to
        continue a sequence in chunks (equal to one call).
    delta_clip : (float, float), optional
        Clip ``dt`` to ``[lo, hi]`` after the softplus (Edifice: ``(1e-3, 0.1)``).
    delta_b_mean : bool
        Use the channel mean of ``dt`` in ``B_bar = dt * B`` (Edifice), while
        ``A_bar`` keeps the per-channel ``dt``.
    engine : {"numpy", "numba", "logdepth"}

    Returns
    -------
    out : ndarray ``[batch, seq_len, channels]``
    last_state : ndarray ``[batch, channels, state]``
        ``h`` after the last step.
    saved : SelectiveScanSaved

    Raises
    ------
    ValueError
        Wrong shapes, non-float or complex arrays, NaN/inf, a bad clip range or
        an unknown engine; the message names what was expected and what came.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 8, 3)); delta = np.full((1, 8, 3), 0.1)
    >>> A = -np.tile(np.arange(1.0, 5.0), (3, 1))     # [channels=3, state=4]
    >>> B = rng.standard_normal((1, 8, 4)); C = rng.standard_normal((1, 8, 4))
    >>> out, h, saved = selective_scan_forward(u, delta, A, B, C, D=np.ones(3))
    >>> out.shape, h.shape
    ((1, 8, 3), (1, 3, 4))
    """
    mod = _engine_module(engine)
    (u, delta, A, B4, B_kind, B_shape, C4, C_kind, C_shape, D, z, delta_bias, h0,
     delta_clip) = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_clip)
    batch, seq_len, channels = u.shape
    flags = dict(delta_softplus=bool(delta_softplus), delta_clip=delta_clip,
                 delta_b_mean=bool(delta_b_mean), has_bias=delta_bias is not None,
                 B_kind=B_kind, C_kind=C_kind, B_shape=tuple(B_shape), C_shape=tuple(C_shape),
                 state=A.shape[1])
    if h0 is None:
        h0 = np.zeros((batch, channels, A.shape[1]), dtype=u.dtype)
    if engine == "numba":      # prologue, scan and epilogue in one fused kernel
        out, last_state, core = mod.fused_forward(u, delta, delta_bias, delta_softplus,
                                                  delta_clip, delta_b_mean, A, B4, C4, D, z, h0)
        return out, last_state, SelectiveScanSaved(engine, core, None, None, u, D, z, None, flags)
    if engine == "logdepth":   # its scan kernel, prologue and epilogue on its staged columns
        from ..scan import numba_seq as fast
        dt = dtB = None
        if delta_b_mean:        # the channel mean needs whole rows: a pass of its own
            dt, dtB = fast.prologue(delta, delta_bias, delta_softplus, delta_clip, True)
        out, last_state, core = mod.fused_forward(u, delta, delta_bias, delta_softplus,
                                                  delta_clip, A, B4, C4, h0, D, z, dt, dtB)
        return out, last_state, SelectiveScanSaved(engine, core, None, dt, u, D, z, None,
                                                   flags, delta, delta_bias)
    # --- prologue: the step size --------------------------------------------
    delta_pre = delta + delta_bias if delta_bias is not None else delta
    dt = softplus(delta_pre) if delta_softplus else delta_pre
    if delta_clip is not None:
        dt = np.clip(dt, delta_clip[0], delta_clip[1])
    dtB = np.broadcast_to(dt.mean(axis=-1, keepdims=True), dt.shape) if delta_b_mean else dt
    dtB = np.ascontiguousarray(dtB)
    # --- the core: discretise + scan + read out ------------------------------
    y_core, last_state, core = mod.scan_core_forward(u, dt, dtB, A, B4, C4, h0)
    # --- epilogue: skip and gate (eq. 2b's D term, Mamba's silu(z) branch) ---
    y = y_core + D * u if D is not None else y_core
    out = y * _silu(z) if z is not None else y
    saved = SelectiveScanSaved(engine, core, delta_pre, dt, u, D, z, y_core, flags)
    return out, last_state, saved


def selective_scan_backward(d_out, d_last_state, saved: SelectiveScanSaved) -> dict:
    """Manual backward of :func:`selective_scan_forward`.

    Parameters
    ----------
    d_out : ndarray ``[batch, seq_len, channels]``
        Gradient of the loss with respect to ``out``.
    d_last_state : ndarray ``[batch, channels, state]`` or None
        Gradient with respect to ``last_state`` (None: zero).
    saved : SelectiveScanSaved

    Returns
    -------
    dict
        Gradients keyed ``u, delta, A, B, C, D, z, delta_bias, initial_state``,
        each in the shape of the argument (``None`` where it was not given;
        ``initial_state`` is always returned).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 5, 2)); delta = np.full((1, 5, 2), 0.3)
    >>> A = -np.ones((2, 3)); B = rng.standard_normal((1, 5, 3)); C = B.copy()
    >>> out, h, saved = selective_scan_forward(u, delta, A, B, C)
    >>> g = selective_scan_backward(np.ones_like(out), None, saved)
    >>> sorted(k for k, v in g.items() if v is not None)
    ['A', 'B', 'C', 'delta', 'initial_state', 'u']
    """
    mod = _engine_module(saved.engine)
    f = saved.flags
    u, D, z, y_core = saved.u, saved.D, saved.z, saved.y_core
    d_out = as_float_array(d_out, "d_out", ndim=3)
    check_shape(d_out, u.shape, "d_out", "[batch, seq_len, channels] (as out)")
    d_out = d_out.astype(u.dtype, copy=False)
    if d_last_state is not None:
        d_last_state = as_float_array(d_last_state, "d_last_state", ndim=3)
        check_shape(d_last_state, (u.shape[0], u.shape[2], f["state"]), "d_last_state",
                    "[batch, channels, state]")
        d_last_state = np.ascontiguousarray(d_last_state, dtype=u.dtype)
    if saved.engine == "numba":    # the fused kernel's backward: all three parts in one
        g = mod.fused_backward(d_out, d_last_state, saved.core)
        return _gradients(f, g, g["u"], g["delta"], g["D"] if D is not None else None, g["z"],
                          g["delta_bias"] if f["has_bias"] else None)
    if saved.engine == "logdepth":  # scan, gate (and prologue) backward in its kernel
        core = saved.core
        if core.dt is None:     # the prologue ran on the kernel's columns: so does its backward
            g = mod.fused_backward(d_out, d_last_state, core, D, z, saved.delta,
                                   saved.delta_bias, f["delta_softplus"], f["delta_clip"])
            return _gradients(f, g, g["u"], g["delta"], g["D"] if D is not None else None,
                              g["dz"], g["delta_bias"] if f["has_bias"] else None)
        from ..scan import numba_seq as fast          # delta_b_mean: the rows' passes
        g = mod.fused_backward(d_out, d_last_state, core, D, z)
        ddelta, du, dD, dbias = fast.finish_backward(
            g["dt"], g["dtB"], g["u"], g["dy"], u, D, saved.delta, saved.delta_bias,
            f["delta_softplus"], f["delta_clip"], f["delta_b_mean"])
        return _gradients(f, g, du, ddelta, dD if D is not None else None, g["dz"],
                          dbias if f["has_bias"] else None)
    # --- epilogue backward ---------------------------------------------------
    if z is not None:
        y = y_core + D * u if D is not None else y_core
        dz = d_out * y * _silu_grad(z)
        dy = d_out * _silu(z)
    else:
        dz, dy = None, d_out
    dD = np.sum(dy * u, axis=(0, 1)) if D is not None else None
    # --- core backward (the reverse-time scan) -------------------------------
    g = mod.scan_core_backward(np.ascontiguousarray(dy), d_last_state, saved.core)
    du = g["u"] + dy * D if D is not None else g["u"]
    # --- prologue backward ---------------------------------------------------
    ddt = g["dt"]
    if f["delta_b_mean"]:
        ddt = ddt + g["dtB"].mean(axis=-1, keepdims=True)   # d mean_c / d dt_c = 1/channels
    else:
        ddt = ddt + g["dtB"]
    if f["delta_clip"] is not None:
        lo, hi = f["delta_clip"]
        dt_unclipped = softplus(saved.delta_pre) if f["delta_softplus"] else saved.delta_pre
        ddt = ddt * ((dt_unclipped >= lo) & (dt_unclipped <= hi))
    ddelta = ddt * _sigmoid(saved.delta_pre) if f["delta_softplus"] else ddt
    ddelta_bias = ddelta.sum(axis=(0, 1)) if f["has_bias"] else None
    return _gradients(f, g, du, ddelta, dD, dz, ddelta_bias)


def _gradients(f, g, du, ddelta, dD, dz, ddelta_bias) -> dict:
    """The backward's result: the 9 gradients, ``B``/``C`` in their arguments' shapes."""
    return {
        "u": du,
        "delta": ddelta,
        "A": g["A"],
        "B": g["B4"].reshape(f["B_shape"]),
        "C": g["C4"].reshape(f["C_shape"]),
        "D": dD,
        "z": dz,
        "delta_bias": ddelta_bias,
        "initial_state": g["h0"],
    }


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, *, delta_clip=None, delta_b_mean=False, engine="numpy"):
    """Selective scan, forward only: returns ``(out, last_state)``.

    Same arguments as :func:`selective_scan_forward`.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> u = rng.standard_normal((2, 6, 4)); delta = rng.uniform(0.01, 0.1, (2, 6, 4))
    >>> A = -np.tile(np.arange(1.0, 3.0), (4, 1)); B = rng.standard_normal((2, 6, 2))
    >>> out1, h = selective_scan(u[:, :3], delta[:, :3], A, B[:, :3], B[:, :3])
    >>> out2, _ = selective_scan(u[:, 3:], delta[:, 3:], A, B[:, 3:], B[:, 3:], initial_state=h)
    >>> full, _ = selective_scan(u, delta, A, B, B)
    >>> bool(np.allclose(np.concatenate([out1, out2], axis=1), full, rtol=0, atol=1e-14))
    True
    """
    out, last, _ = selective_scan_forward(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
        delta_clip=delta_clip, delta_b_mean=delta_b_mean, engine=engine)
    return out, last


def _check_official_shapes(u, delta, A, B, C, z):
    """The shapes of :func:`selective_scan_fn`, said in its own (official) layout.

    The time-major arrays are also checked as floats without NaN/inf here, so that a bad
    entry is reported at its index in this layout; the rest (``A``, ``D``, ``delta_bias``
    values) is checked by :func:`selective_scan`, whose messages hold no layout-dependent
    index for those.
    """
    u, delta, A = np.asarray(u), np.asarray(delta), np.asarray(A)
    for name, x in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if x is not None:
            as_float_array(x, name)                # dtype and NaN/inf, indices as given
    if u.ndim != 3:
        raise ValueError(f"u: expected [batch, channels, seq_len], got shape {u.shape}")
    batch, channels, seq_len = u.shape
    for name, x in (("delta", delta), ("z", z)):
        if x is not None and np.shape(x) != u.shape:
            raise ValueError(f"{name}: expected shape {u.shape} [batch, channels, seq_len] "
                             f"(as u), got {np.shape(x)}")
    if A.ndim != 2 or A.shape[0] != channels:
        raise ValueError(f"A: expected shape ({channels}, state) [channels, state], "
                         f"got {A.shape}")
    state = A.shape[1]
    for name, M in (("B", B), ("C", C)):
        shape = np.shape(M)
        if len(shape) == 2:
            want, layout = (channels, state), "[channels, state] (constant)"
        elif len(shape) == 3:
            want, layout = (batch, state, seq_len), "[batch, state, seq_len] (variable)"
        elif len(shape) == 4:
            G = shape[1]
            if G < 1 or channels % G:
                raise ValueError(f"{name}: expected [batch, groups, state, seq_len] with groups "
                                 f"dividing channels={channels}, got shape {shape} "
                                 f"({G} groups)")
            want, layout = (batch, G, state, seq_len), "[batch, groups, state, seq_len]"
        else:
            raise ValueError(f"{name}: expected [channels, state], [batch, state, seq_len] or "
                             f"[batch, groups, state, seq_len], got shape {shape}")
        if shape != want:
            raise ValueError(f"{name}: expected shape {want} {layout}, got {shape}")


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                      delta_softplus=False, return_last_state=False, *, engine="numpy"):
    """Drop-in for the official ``selective_scan_fn`` / ``selective_scan_ref``.

    Same argument order and layout as state-spaces/mamba, so CPU tests of other
    projects can call refssm as their oracle.

    Parameters
    ----------
    u, delta : ndarray ``[batch, channels, seq_len]``
    A : ndarray ``[channels, state]`` (real)
    B, C : ndarray
        ``[channels, state]`` (constant), ``[batch, state, seq_len]``
        (variable) or ``[batch, groups, state, seq_len]`` (grouped).
    D : ndarray ``[channels]``, optional
    z : ndarray ``[batch, channels, seq_len]``, optional
    delta_bias : ndarray ``[channels]``, optional
    delta_softplus : bool
    return_last_state : bool

    Returns
    -------
    out : ndarray ``[batch, channels, seq_len]``
    last_state : ndarray ``[batch, channels, state]``
        Only if ``return_last_state``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> u = rng.standard_normal((1, 3, 7)); delta = rng.uniform(0.01, 0.2, (1, 3, 7))
    >>> A = -np.ones((3, 2)); B = rng.standard_normal((1, 2, 7)); C = rng.standard_normal((1, 2, 7))
    >>> selective_scan_fn(u, delta, A, B, C).shape
    (1, 3, 7)
    """
    _check_official_shapes(u, delta, A, B, C, z)

    def to_blc(x, name):
        if x is None:
            return None
        return np.swapaxes(np.asarray(x), 1, 2)

    def bc(x, name):
        x = np.asarray(x)
        if x.ndim == 3:    # [batch, state, seq_len] -> [batch, seq_len, state]
            return np.swapaxes(x, 1, 2)
        if x.ndim == 4:    # [batch, groups, state, seq_len] -> [batch, seq_len, groups, state]
            return np.transpose(x, (0, 3, 1, 2))
        return x

    out, last = selective_scan(to_blc(u, "u"), to_blc(delta, "delta"), A, bc(B, "B"), bc(C, "C"),
                               D, to_blc(z, "z"), delta_bias, delta_softplus, engine=engine)
    out = np.ascontiguousarray(np.swapaxes(out, 1, 2))
    return (out, last) if return_last_state else out
