r"""Discretization of continuous-time state-space models.

A continuous linear SSM

.. math::  x'(t) = A x(t) + B u(t)

sampled with step ``delta`` (the input held constant over each step) becomes
the recurrence ``x_k = A_bar x_{k-1} + B_bar u_k``. This module computes
``(A_bar, B_bar)`` by three rules:

=========  ========================================  ==============================================
rule       ``A_bar``                                 ``B_bar``
=========  ========================================  ==============================================
ZOH        ``exp(delta A)``                          ``(delta A)^-1 (exp(delta A) - I) delta B``
bilinear   ``(I - delta/2 A)^-1 (I + delta/2 A)``    ``(I - delta/2 A)^-1 delta B``
Euler      ``I + delta A``                           ``delta B``
=========  ========================================  ==============================================

ZOH (zero-order hold) is exact for piecewise-constant input: Gu & Dao 2023
(Mamba), eq. 4; for a diagonal ``A = diag(Lambda)`` it is S5's
``B_bar = (Lambda_bar - 1) / Lambda * B`` (Smith, Warrington & Linderman 2023,
discretization appendix; ``discretize_zoh`` in lindermanlab/S5). Bilinear is
the Tustin / trapezoid rule, S4 (Gu, Goel & Ré 2022) eq. 3. Euler is forward
Euler. They agree to first order in ``delta``; ``scipy.signal.cont2discrete``
calls them ``'zoh'``, ``'bilinear'`` (= ``'gbt'`` with ``alpha=0.5``) and
``'euler'`` (= ``'gbt'`` with ``alpha=0``) and is the oracle for the tests.

API
---
Two families, because a diagonal and a dense ``A`` have different shape
contracts:

* :func:`zoh`, :func:`bilinear`, :func:`euler` take a **diagonal** ``A`` given
  as the array of its diagonal, ``[..., N]`` (real or complex), with ``delta``
  and ``B`` broadcast against it (batched; S4D, S5, Mamba).
* :func:`zoh_dense`, :func:`bilinear_dense`, :func:`euler_dense` take a
  **dense** square ``A`` ``[N, N]``, ``B`` ``[N]`` or ``[N, M]`` and a scalar
  ``delta`` (HiPPO before diagonalisation, the oracle's reference values).
* :func:`mamba_discretize` is Mamba's own convention, ``exp(delta A)`` with
  ``delta B`` (see its docstring for why and how far that is from ZOH).

Every function returns ``(A_bar, B_bar)`` and rejects bad input with a
``ValueError`` that names what was expected and what came.

Precision: every rule is computed in float64/complex128. If every input is
float32/complex64 (a plain Python ``float`` delta does not count) the
results are rounded to float32/complex64 once, at the end: a single-precision result is the double-precision result of the same
inputs, rounded (the product of two float32 numbers is exact in float64, so
neither ``1 + delta*A`` near ``delta*A = -1`` nor ``exp(delta*A)`` at large
``|delta*A|`` suffers from rounding ``delta*A`` to float32 first). Mixed
inputs give double results. ``A_bar`` is real when ``A`` is real; ``B_bar``
is complex when ``A`` or ``B`` is.

Accuracy (float64, measured against mpmath in ``tests/test_discretize.py``):
the diagonal ZOH is within ~2 ulps of each entry of ``exp(z)`` and
``delta * phi_1(z)`` at the rounded product ``z = fl(delta*A)``, for every
``delta`` (including ``delta * A -> 0``, where the textbook
``(exp(z) - 1) / A`` loses its digits; see :func:`zoh`). Against the exact
product the error is up to ``eps * |delta*A|`` more, because ``exp`` has
condition number ``|delta*A|`` (1e-13 at ``|delta*A| = 1000``); every
implementation that forms ``delta*A`` in floating point shares it.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from refssm._validate import as_float_array, check_shape, result_dtype

__all__ = [
    "zoh",
    "bilinear",
    "euler",
    "zoh_dense",
    "bilinear_dense",
    "euler_dense",
    "mamba_discretize",
]


# --------------------------------------------------------------------------
# input checks and dtype plumbing
# --------------------------------------------------------------------------

def _as_delta(delta) -> np.ndarray:
    """``delta`` as a real floating array with every value > 0, or raise."""
    d = as_float_array(delta, "delta")
    positive = d > 0
    if not positive.all():
        flat = np.atleast_1d(positive)
        bad = np.argwhere(~flat)
        first = tuple(int(i) for i in bad[0])
        value = np.atleast_1d(d)[first]
        where = f" at index {first}" if d.ndim else ""
        raise ValueError(
            f"delta: expected every step size > 0, got {float(value)!r}{where} "
            f"({len(bad)} value(s) <= 0)"
        )
    return d


def _single(A, B, delta, delta_in) -> bool:
    """True if the results are float32/complex64: every input is single precision.

    A plain Python ``float`` delta is "weak" (NumPy 2's rule for Python
    scalars): ``zoh(A32, B32, 0.1)`` stays float32.
    """
    arrays = (A, B) if type(delta_in) is float else (A, B, delta)
    return result_dtype(*arrays) in (np.dtype(np.float32), np.dtype(np.complex64))


def _to_double(x: np.ndarray) -> np.ndarray:
    """float64/complex128 copy (or view) of ``x``, keeping real arrays real.

    Every rule is computed in double precision; for float32 inputs the product
    of two float32 numbers is exact in float64, so e.g. ``1 + delta*A`` and
    ``exp(delta*A)`` are not hurt by rounding ``delta*A`` to float32 first.
    """
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64, copy=False)


def _output(single: bool, *arrays):
    """Round results to float32/complex64 when every input was single precision."""
    if not single:
        return arrays
    return tuple(a.astype(np.complex64 if np.iscomplexobj(a) else np.float32) for a in arrays)


def _check_result(arr: np.ndarray, name: str, rule: str, z=None) -> None:
    """Raise ``ValueError`` if a result overflowed (finite input, inf/NaN out)."""
    finite = np.isfinite(arr)
    if finite.all():
        return
    bad = np.argwhere(~finite)
    first = tuple(int(i) for i in bad[0])
    hint = ""
    if z is not None:
        hint = (f"; max Re(delta*A) = {float(np.max(np.real(z))):.6g}, expected below "
                f"log(max {arr.real.dtype}) = {float(np.log(np.finfo(arr.real.dtype).max)):.6g}")
    raise ValueError(
        f"{rule}: expected a finite {name}, got {len(bad)} inf/NaN entries "
        f"(first at index {first}): the result overflows {arr.dtype}{hint}"
    )


def _prepare_diagonal(A, B, delta, mimo):
    """Check and cast the inputs of the diagonal rules.

    Returns ``A, B, delta`` in double precision, ``mimo`` resolved, and
    whether the results go back to single precision.
    """
    A = as_float_array(A, "A", allow_complex=True)
    B = as_float_array(B, "B", allow_complex=True)
    delta_in, delta = delta, _as_delta(delta)
    if A.ndim < 1:
        raise ValueError(
            "A: expected the diagonal of A as an array [..., N] (ndim >= 1), got shape ()"
        )
    N = A.shape[-1]
    try:
        S = np.broadcast_shapes(A.shape, delta.shape)
    except ValueError:
        raise ValueError(
            f"delta: expected a shape broadcastable with A {A.shape} [..., N] "
            f"(a per-channel delta [..., C] goes in as [..., C, 1]), got {delta.shape}"
        ) from None
    if S[-1] != N:
        raise ValueError(
            f"delta: expected a trailing axis of size 1 or N = {N} (delta may not "
            f"broadcast the state axis of A {A.shape}), got shape {delta.shape}"
        )
    if mimo is None:
        mimo = B.ndim == len(S) + 1
    if mimo:
        if B.ndim < 2 or B.shape[-2] != N:
            raise ValueError(
                f"B: expected MIMO shape [..., N, M] with N = {N} rows (one per "
                f"state), got shape {B.shape}"
            )
        try:
            np.broadcast_shapes(S + (1,), B.shape)
        except ValueError:
            raise ValueError(
                f"B: expected MIMO shape [..., N, M] with leading axes broadcastable "
                f"with {S[:-1]}, got shape {B.shape}"
            ) from None
    else:
        try:
            np.broadcast_shapes(S, B.shape)
        except ValueError:
            raise ValueError(
                f"B: expected a shape broadcastable with {S} [..., N] (one input per "
                f"state), or [..., N, M] of ndim {len(S) + 1} (MIMO), got {B.shape}"
            ) from None
    single = _single(A, B, delta, delta_in)
    return _to_double(A), _to_double(B), _to_double(delta), mimo, single


def _apply(coef: np.ndarray, B: np.ndarray, mimo: bool) -> np.ndarray:
    """``B_bar = coef * B`` per state: ``coef [..., N]``, ``B [..., N]`` or ``[..., N, M]``."""
    return coef[..., None] * B if mimo else coef * B


def _expm1_over_z(z: np.ndarray) -> np.ndarray:
    r"""``phi_1(z) = (exp(z) - 1) / z`` (``phi_1(0) = 1``), accurate for every ``z``.

    ``z`` is float64 or complex128. For ``|z| >= eps^(1/3)`` (6e-6) it is
    ``expm1(z) / z``: ``np.expm1`` is accurate near 0 for real *and* complex
    ``z`` (for ``z = x + iy`` NumPy evaluates ``expm1(x) cos(y) - 2 sin(y/2)^2
    + i exp(x) sin(y)``, which does not cancel), and the quotient of two
    accurate numbers is accurate. Below that it is the Taylor series
    ``1 + z/2 + z^2/6``, whose truncation error ``|z|^3/24 < eps/24``. The
    series branch is needed, not just tidy: NumPy divides complex numbers by
    multiplying with a reciprocal, which loses an ulp at ``|z| ~ 1e-301`` and
    overflows to ``inf+nanj`` for a subnormal ``z``; it also covers ``z == 0``
    (``A == 0``, or ``delta*A`` underflowing) with the exact limit 1.
    """
    small = np.abs(z) < np.finfo(np.float64).eps ** (1 / 3)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        quotient = np.expm1(z) / z
    series = 1 + z * (0.5 + z / 6)
    return np.where(small, series, quotient)


def _prepare_dense(A, B, delta):
    """Check and cast the inputs of the dense rules.

    Returns ``A [N, N]``, ``B2 [N, M]`` (``B`` as a matrix) and ``delta``
    (0-d) in double precision, whether ``B`` was 1-D, and whether the results
    go back to single precision.
    """
    A = as_float_array(A, "A", allow_complex=True)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A: expected a square 2-D matrix [N, N], got shape {A.shape}")
    B = as_float_array(B, "B", allow_complex=True, ndim=(1, 2))
    N = A.shape[0]
    check_shape(B, (N,) + B.shape[1:], "B", "[N] or [N, M] (one row per state)")
    delta_in, delta = delta, _as_delta(delta)
    if delta.ndim != 0:
        raise ValueError(
            f"delta: expected a scalar step size (shape ()) for a dense A, got shape {delta.shape}"
        )
    single = _single(A, B, delta, delta_in)
    A, B = _to_double(A), _to_double(B)
    vector = B.ndim == 1
    B2 = B[:, None] if vector else B
    return A, B2, vector, _to_double(delta), single


def _finish_dense(A, A_bar, B_bar, vector, single):
    """Keep ``A_bar`` real for a real ``A``; give ``B_bar`` back the shape of ``B``."""
    if not np.iscomplexobj(A) and np.iscomplexobj(A_bar):
        # A real, B complex: the A block never meets an imaginary part.
        A_bar = A_bar.real.copy()
    return _output(single, A_bar, B_bar[:, 0] if vector else B_bar)


# --------------------------------------------------------------------------
# diagonal A
# --------------------------------------------------------------------------

_DIAGONAL_SHAPES = """\
    A : ndarray, shape [..., N]
        The diagonal of the state matrix (which is ``diag(A)``), float or
        complex. Stable systems have ``Re(A) < 0``; others are accepted.
    B : ndarray, shape [..., N] or [..., N, M]
        Input matrix. ``[..., N]``: one input per state (SISO per channel,
        S4D / Mamba), multiplied elementwise. ``[..., N, M]``: MIMO (S5's
        ``B_tilde`` ``[P, H]``), row ``n`` scaled by the coefficient of state
        ``n``. Unless ``mimo`` says otherwise, ``B`` is MIMO exactly when
        ``B.ndim`` is one more than the broadcast shape of ``A`` and ``delta``.
    delta : float or ndarray, broadcastable with A
        Step size(s), every value > 0, broadcast with ``A`` under NumPy rules
        aligned at the state axis: a per-channel ``delta`` ``[..., C]`` for
        ``A`` ``[C, N]`` goes in as ``delta[..., None]``.
    mimo : bool, optional
        Force the reading of ``B`` (``True``: ``[..., N, M]``; ``False``:
        ``[..., N]`` broadcast elementwise). Default: inferred as above."""

_DIAGONAL_RETURNS = """\
    A_bar : ndarray, shape broadcast(A, delta) = [..., N]
        Diagonal of the discrete state matrix; real if ``A`` is real.
    B_bar : ndarray, shape broadcast(A_bar, B) or broadcast(A_bar[..., None], B)
        Discrete input matrix, same layout as ``B``."""


def zoh(A, B, delta, *, mimo=None):
    r"""Zero-order-hold discretization of a diagonal SSM.

    Gu & Dao 2023 eq. 4 for the state matrix ``diag(A)``, elementwise (S5's
    form, Smith et al. 2023, discretization appendix):

    .. math::

        \bar A = e^{\Delta A}, \qquad
        \bar B = (\Delta A)^{-1}(e^{\Delta A} - 1)\,\Delta B
               = \frac{\bar A - 1}{A} B .

    The textbook ``(exp(delta*A) - 1) / A`` cancels catastrophically when
    ``|delta*A|`` is small (relative error ``~ eps / |delta*A|``: 1e-7 at
    ``delta*A = 1e-9``) and is 0/0 at ``A = 0``. This function evaluates
    ``B_bar = delta * phi_1(delta*A) * B`` with
    ``phi_1(z) = expm1(z) / z`` (``phi_1(0) = 1``; its Taylor series for
    ``|z| < 6e-6``), which is accurate to ~2 ulps for every real or complex
    ``z`` and gives the limit
    ``B_bar = delta * B`` at ``A = 0`` exactly. Series:
    ``B_bar = delta B (1 + delta A / 2 + (delta A)^2 / 6 + ...)``.

    Parameters
    ----------
{shapes}

    Returns
    -------
{returns}

    Raises
    ------
    ValueError
        On non-floating (e.g. integer), non-finite or mis-shaped input,
        ``delta <= 0``, or when ``exp(delta*A)`` overflows.

    See Also
    --------
    zoh_dense : the same rule for a dense ``A``.
    mamba_discretize : ``exp(delta A)`` with Mamba's ``delta B``.

    Examples
    --------
    >>> import numpy as np
    >>> from refssm.ssm.discretize import zoh
    >>> A = np.array([-1.0, -2.0])
    >>> A_bar, B_bar = zoh(A, np.ones(2), 0.1)
    >>> print(A_bar)                     # exp(0.1 * A)
    [0.90483742 0.81873075]
    >>> print(B_bar)                     # (A_bar - 1) / A
    [0.09516258 0.09063462]

    Tiny steps keep every digit (the naive formula is off in the 8th):

    >>> A_bar, B_bar = zoh(np.array([-1.0]), np.array([1.0]), 1e-10)
    >>> series = 1e-10 * (1 - 0.5e-10)   # delta B (1 + delta A / 2), exact to 1e-21
    >>> print(abs(B_bar[0] / series - 1) < 1e-15)
    True
    >>> naive = (np.exp(-1e-10) - 1) / -1.0
    >>> print(abs(naive / series - 1) > 1e-8)
    True

    MIMO (S5): ``Lambda [P]``, ``B_tilde [P, H]``, one step per state:

    >>> Lam = np.array([-0.5 + 1j, -0.5 - 1j])
    >>> A_bar, B_bar = zoh(Lam, np.ones((2, 3)), np.array([0.1, 0.2]))
    >>> A_bar.shape, B_bar.shape
    ((2,), (2, 3))
    """
    A, B, delta, mimo, single = _prepare_diagonal(A, B, delta, mimo)
    z = delta * A
    with np.errstate(over="ignore"):
        A_bar = np.exp(z)
    coef = delta * _expm1_over_z(z)
    _check_result(A_bar, "A_bar", "zoh", z)
    with np.errstate(over="ignore", invalid="ignore"):
        B_bar = _apply(coef, B, mimo)
    _check_result(B_bar, "B_bar", "zoh", z)
    return _output(single, A_bar, B_bar)


def bilinear(A, B, delta, *, mimo=None):
    r"""Bilinear (Tustin) discretization of a diagonal SSM.

    S4 (Gu, Goel & Ré 2022) eq. 3 for the state matrix ``diag(A)``, elementwise:

    .. math::

        \bar A = \frac{1 + \Delta A / 2}{1 - \Delta A / 2}, \qquad
        \bar B = \frac{\Delta}{1 - \Delta A / 2} B .

    Equals ``scipy.signal.cont2discrete(..., method='bilinear')`` (``'gbt'``
    with ``alpha = 0.5``). ``|A_bar| < 1`` exactly when ``Re(A) < 0``. The
    only singular point is ``delta * A == 2`` (an unstable ``A``); there the
    function raises. Near it the result is as accurate as the rounded
    ``delta * A`` (each entry is one division), so only the exact pole is
    rejected.

    Parameters
    ----------
{shapes}

    Returns
    -------
{returns}

    Raises
    ------
    ValueError
        On non-floating, non-finite or mis-shaped input, ``delta <= 0``, or
        ``1 - delta*A/2 == 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from refssm.ssm.discretize import bilinear
    >>> A_bar, B_bar = bilinear(np.array([-1.0, -2.0]), np.ones(2), 0.1)
    >>> print(A_bar)                     # (1 - 0.05) / (1 + 0.05), (1 - 0.1) / (1 + 0.1)
    [0.9047619  0.81818182]
    >>> print(B_bar)                     # 0.1 / (1 + 0.05), 0.1 / (1 + 0.1)
    [0.0952381  0.09090909]
    """
    A, B, delta, mimo, single = _prepare_diagonal(A, B, delta, mimo)
    half = (0.5 * delta) * A
    denom = 1 - half
    singular = denom == 0
    if singular.any():
        idx = tuple(int(i) for i in np.argwhere(singular)[0])
        raise ValueError(
            f"bilinear: expected delta*A != 2 (the pole of the bilinear map), got "
            f"1 - delta*A/2 == 0 at index {idx} (delta*A = {(2 * half[idx]).item()!r})"
        )
    A_bar = (1 + half) / denom
    coef = delta / denom
    _check_result(A_bar, "A_bar", "bilinear")
    with np.errstate(over="ignore", invalid="ignore"):
        B_bar = _apply(coef, B, mimo)
    _check_result(B_bar, "B_bar", "bilinear")
    return _output(single, A_bar, B_bar)


def euler(A, B, delta, *, mimo=None):
    r"""Forward-Euler discretization of a diagonal SSM.

    .. math::  \bar A = 1 + \Delta A, \qquad \bar B = \Delta B .

    ``scipy.signal.cont2discrete(..., method='euler')`` (``'gbt'`` with
    ``alpha = 0``). First-order accurate; stable only while
    ``|1 + delta*A| < 1``.

    Parameters
    ----------
{shapes}

    Returns
    -------
{returns}

    Raises
    ------
    ValueError
        On non-floating, non-finite or mis-shaped input, or ``delta <= 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from refssm.ssm.discretize import euler
    >>> A_bar, B_bar = euler(np.array([-1.0, -2.0]), np.ones(2), 0.1)
    >>> print(A_bar, B_bar)
    [0.9 0.8] [0.1 0.1]
    """
    A, B, delta, mimo, single = _prepare_diagonal(A, B, delta, mimo)
    z = delta * A
    A_bar = 1 + z
    coef = np.broadcast_to(delta, z.shape).astype(z.dtype)   # complex if A is
    _check_result(A_bar, "A_bar", "euler")
    with np.errstate(over="ignore", invalid="ignore"):
        B_bar = _apply(coef, B, mimo)
    _check_result(B_bar, "B_bar", "euler")
    return _output(single, A_bar, B_bar)


for _f in (zoh, bilinear, euler):
    if _f.__doc__:                               # None under python -OO
        _f.__doc__ = _f.__doc__.replace("{shapes}", _DIAGONAL_SHAPES).replace(
            "{returns}", _DIAGONAL_RETURNS)
del _f


# --------------------------------------------------------------------------
# dense A
# --------------------------------------------------------------------------

def zoh_dense(A, B, delta):
    r"""Zero-order-hold discretization of a dense SSM (Gu & Dao 2023 eq. 4).

    .. math::

        \bar A = e^{\Delta A}, \qquad
        \bar B = \int_0^\Delta e^{sA}\,ds\; B = (\Delta A)^{-1}(e^{\Delta A} - I)\,\Delta B .

    Computed as one matrix exponential of Van Loan's block matrix

    .. math::

        \exp\left(\Delta \begin{bmatrix} A & B \\ 0 & 0 \end{bmatrix}\right)
        = \begin{bmatrix} \bar A & \bar B \\ 0 & I \end{bmatrix}

    (``scipy.linalg.expm``, scaling and squaring, normwise accurate: measured
    <= 3e-15 against mpmath; the same construction as
    ``scipy.signal.cont2discrete(..., method='zoh')``). Unlike
    ``A^-1 (exp(delta A) - I) B`` it needs no inverse of ``A`` (which may be
    singular) and does not cancel when ``delta * A`` is small.

    Parameters
    ----------
    A : ndarray, shape [N, N]
        State matrix, float or complex.
    B : ndarray, shape [N] or [N, M]
        Input matrix.
    delta : float
        Step size, > 0.

    Returns
    -------
    A_bar : ndarray, shape [N, N]
        ``exp(delta A)``; real if ``A`` is real.
    B_bar : ndarray, shape of B

    Raises
    ------
    ValueError
        On non-floating, non-finite input, non-square ``A``, ``B`` without
        ``N`` rows, non-scalar or non-positive ``delta``, or overflow.

    Examples
    --------
    >>> import numpy as np
    >>> from refssm.ssm.discretize import zoh_dense
    >>> A = np.array([[0.0, 1.0], [0.0, 0.0]])      # double integrator
    >>> A_bar, B_bar = zoh_dense(A, np.array([0.0, 1.0]), 0.5)
    >>> print(A_bar)
    [[1.  0.5]
     [0.  1. ]]
    >>> print(B_bar)                                 # [delta^2 / 2, delta]
    [0.125 0.5  ]
    """
    A, B2, vector, delta, single = _prepare_dense(A, B, delta)
    n, m = B2.shape
    dtype = np.result_type(A, B2, delta)
    block = np.zeros((n + m, n + m), dtype=dtype)
    block[:n, :n] = delta * A
    block[:n, n:] = delta * B2
    with np.errstate(over="ignore", invalid="ignore"):
        E = scipy.linalg.expm(block)
    A_bar, B_bar = E[:n, :n].copy(), E[:n, n:].copy()
    _check_result(E, "exp(delta*[[A, B], [0, 0]])", "zoh_dense")
    return _finish_dense(A, A_bar, B_bar, vector, single)


def bilinear_dense(A, B, delta):
    r"""Bilinear (Tustin) discretization of a dense SSM, S4 eq. 3.

    .. math::

        \bar A = (I - \tfrac{\Delta}{2} A)^{-1}(I + \tfrac{\Delta}{2} A), \qquad
        \bar B = (I - \tfrac{\Delta}{2} A)^{-1} \Delta B .

    One LU factorisation of ``I - delta/2 A`` solved for both right-hand
    sides (LAPACK getrf/getrs, as ``scipy.linalg.solve`` and
    ``scipy.signal.cont2discrete(..., method='bilinear')``). If
    ``I - delta/2 A`` is singular to working precision (condition number
    ``>= 1/eps`` in the 1-norm: ``delta * A`` has an eigenvalue at or next
    to 2) the result would be meaningless and a ``ValueError`` is raised
    instead.

    Parameters
    ----------
    A : ndarray, shape [N, N]
    B : ndarray, shape [N] or [N, M]
    delta : float
        Step size, > 0.

    Returns
    -------
    A_bar : ndarray, shape [N, N]
    B_bar : ndarray, shape of B

    Raises
    ------
    ValueError
        As :func:`zoh_dense`, and when ``I - delta/2 A`` is singular.

    Examples
    --------
    >>> import numpy as np
    >>> from refssm.ssm.discretize import bilinear_dense
    >>> A_bar, B_bar = bilinear_dense(-np.eye(2), np.ones((2, 1)), 0.1)
    >>> print(np.round(A_bar, 8))
    [[0.9047619 0.       ]
     [0.        0.9047619]]
    >>> print(np.round(B_bar.ravel(), 8))
    [0.0952381 0.0952381]
    """
    A, B2, vector, delta, single = _prepare_dense(A, B, delta)
    n = A.shape[0]
    dtype = np.result_type(A, B2)                # complex B: factor in complex
    eye = np.eye(n, dtype=dtype)
    half = (0.5 * delta) * A.astype(dtype)
    lhs = eye - half
    # One LU factorisation for both right-hand sides. Its reciprocal condition
    # number (1-norm estimate, LAPACK gecon: the test scipy.linalg.solve warns
    # on) says whether I - delta/2 A is singular to working precision.
    getrf, gecon, getrs = scipy.linalg.get_lapack_funcs(("getrf", "gecon", "getrs"), (lhs,))
    lu, piv, info = getrf(lhs)
    rcond = 1.0
    if n:
        rcond = 0.0 if info > 0 else float(gecon(lu, np.linalg.norm(lhs, 1), norm="1")[0])
    eps = np.finfo(np.float64).eps
    if not rcond >= eps:
        cond = np.inf if rcond == 0 else 1 / rcond
        raise ValueError(
            f"bilinear_dense: expected I - delta/2*A nonsingular (condition number "
            f"< 1/eps = {1 / eps:.3g}), got condition number {cond:.3g}: delta*A "
            f"has an eigenvalue at or next to 2, the pole of the bilinear map"
        )
    rhs = np.concatenate([eye + half, delta * B2], axis=1)    # [I + delta/2 A | delta B]
    X = getrs(lu, piv, rhs)[0] if n else rhs
    A_bar, B_bar = X[:, :n], X[:, n:]
    _check_result(A_bar, "A_bar", "bilinear_dense")
    _check_result(B_bar, "B_bar", "bilinear_dense")
    return _finish_dense(A, A_bar, B_bar, vector, single)


def euler_dense(A, B, delta):
    r"""Forward-Euler discretization of a dense SSM.

    .. math::  \bar A = I + \Delta A, \qquad \bar B = \Delta B .

    As ``scipy.signal.cont2discrete(..., method='euler')``.

    Parameters
    ----------
    A : ndarray, shape [N, N]
    B : ndarray, shape [N] or [N, M]
    delta : float
        Step size, > 0.

    Returns
    -------
    A_bar : ndarray, shape [N, N]
    B_bar : ndarray, shape of B

    Raises
    ------
    ValueError
        As :func:`zoh_dense`.

    Examples
    --------
    >>> import numpy as np
    >>> from refssm.ssm.discretize import euler_dense
    >>> A_bar, B_bar = euler_dense(np.array([[-1.0, 2.0], [0.0, -3.0]]), np.ones(2), 0.1)
    >>> print(A_bar)
    [[0.9 0.2]
     [0.  0.7]]
    >>> print(B_bar)
    [0.1 0.1]
    """
    A, B2, vector, delta, single = _prepare_dense(A, B, delta)
    A_bar = np.eye(A.shape[0], dtype=A.dtype) + delta * A
    B_bar = delta * B2
    _check_result(A_bar, "A_bar", "euler_dense")
    _check_result(B_bar, "B_bar", "euler_dense")
    return _finish_dense(A, A_bar, B_bar, vector, single)


# --------------------------------------------------------------------------
# Mamba's convention
# --------------------------------------------------------------------------

def mamba_discretize(A, B, delta):
    r"""Mamba's discretization: exact ZOH for ``A``, first-order ``delta * B`` for ``B``.

    .. math::

        \bar A_{b,t,c,n} = \exp(\Delta_{b,t,c} A_{c,n}), \qquad
        \bar B_{b,t,c,n} = \Delta_{b,t,c} B_{b,t,n} .

    The paper states the ZOH rule (Gu & Dao 2023 eq. 4), but the official
    code (``selective_scan_ref`` in ``mamba_ssm/ops/selective_scan_interface.py``
    and the CUDA kernel: ``deltaA = exp(delta A)``,
    ``deltaB_u = delta * B * u``) keeps ``exp(delta A)`` and replaces ZOH's
    ``B_bar = delta * phi_1(delta A) * B``, ``phi_1(z) = (e^z - 1)/z``, by
    its first-order (Euler) term ``delta * B``. The authors' reason
    (A. Gu, state-spaces/mamba issue #114): "It makes the implementation
    slightly simpler without affecting empirical performance. One can think
    of it as a mix of ZOH for A and Euler discretization for B." It saves
    the ``expm1`` and the division by ``A`` per ``(batch, t, channel,
    state)`` inside the scan, and is exact as ``delta * A -> 0``. It is
    nonetheless a different model from ZOH, and implementations that must
    match Mamba's numbers must use it. How far it is from ZOH:

    .. math::

        \bar B^{ZOH} = \Delta B \left(1 + \tfrac{\Delta A}{2}
            + \tfrac{(\Delta A)^2}{6} + \dots\right),
        \qquad
        \frac{|\Delta B - \bar B^{ZOH}|}{|\bar B^{ZOH}|}
            = \frac{|\Delta A|}{2} + O((\Delta A)^2) .

    The gap is not small in practice: at the default initialisation
    (``A = -(1..16)``, ``delta`` up to 0.1) ``delta * A`` reaches -1.6,
    where ``phi_1 = 0.499``, so Mamba's ``B_bar`` is twice ZOH's.

    Parameters
    ----------
    A : ndarray, shape [channels, state]
        ``-exp(A_log)`` (real; complex accepted).
    B : ndarray, shape [batch, seq_len, state]
        Input-dependent ``B_t`` (the leading axes may be any, e.g. ``[batch,
        state]`` for one recurrent step, as long as they equal delta's).
    delta : ndarray, shape [batch, seq_len, channels]
        ``softplus(dt_proj(...))``, every value > 0.

    Returns
    -------
    A_bar : ndarray, shape [batch, seq_len, channels, state]
        ``exp(delta[..., :, None] * A)``; bit-identical to
        ``zoh(A, B[..., None, :], delta[..., None])[0]``.
    B_bar : ndarray, shape [batch, seq_len, channels, state]
        ``delta[..., :, None] * B[..., None, :]``.

    Raises
    ------
    ValueError
        On non-floating, non-finite input, ``delta <= 0``, ``A`` not 2-D,
        ``delta``'s last axis not ``channels``, ``B`` not
        ``delta.shape[:-1] + (state,)``, or overflow of ``exp(delta*A)``.

    Notes
    -----
    This readable path materialises both ``[batch, seq_len, channels,
    state]`` arrays (8 bytes each entry in float64: batch 8, seq_len 1024,
    channels 1536, state 16 is 1.6 GB per array). The fast scans
    discretize on the fly and never build them. float32 inputs are computed
    in float64 and rounded, so the peak memory is that of float64.

    Examples
    --------
    >>> import numpy as np
    >>> from refssm.ssm.discretize import mamba_discretize
    >>> A = -np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])   # [channels=3, state=2]
    >>> delta = np.full((1, 4, 3), 0.1)                          # [batch, seq_len, channels]
    >>> B = np.ones((1, 4, 2))                                   # [batch, seq_len, state]
    >>> A_bar, B_bar = mamba_discretize(A, B, delta)
    >>> A_bar.shape, B_bar.shape
    ((1, 4, 3, 2), (1, 4, 3, 2))
    >>> print(A_bar[0, 0, 0], B_bar[0, 0, 0])
    [0.90483742 0.81873075] [0.1 0.1]
    """
    A = as_float_array(A, "A", allow_complex=True)
    if A.ndim != 2:
        raise ValueError(f"A: expected shape [channels, state] (2-D), got shape {A.shape}")
    B = as_float_array(B, "B", allow_complex=True)
    delta_in, delta = delta, _as_delta(delta)
    channels, state = A.shape
    if delta.ndim < 1 or delta.shape[-1] != channels:
        raise ValueError(
            f"delta: expected shape [batch, seq_len, channels] with channels = {channels} "
            f"(A is [channels, state] = {A.shape}), got {delta.shape}"
        )
    check_shape(B, delta.shape[:-1] + (state,), "B",
                "[batch, seq_len, state] (delta's leading axes, A's state)")
    single = _single(A, B, delta, delta_in)
    A, B, delta = _to_double(A), _to_double(B), _to_double(delta)
    d = delta[..., :, None]                      # [batch, seq_len, channels, 1]
    z = d * A                                    # [batch, seq_len, channels, state]
    with np.errstate(over="ignore"):
        A_bar = np.exp(z)
    _check_result(A_bar, "A_bar", "mamba_discretize", z)
    with np.errstate(over="ignore", invalid="ignore"):
        B_bar = d * B[..., None, :]              # [batch, seq_len, channels, state]
    _check_result(B_bar, "B_bar", "mamba_discretize")
    return _output(single, A_bar, B_bar)
