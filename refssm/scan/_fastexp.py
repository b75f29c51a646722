"""A branch-free, vectorisable ``exp`` for Numba loops (float64 and float32).

Why: this numba/llvmlite build has no SVML, so ``math.exp`` / ``np.exp`` in a
``@njit`` loop is a scalar libm call that also stops LLVM from vectorising the
loop around it. :func:`fexp` is plain arithmetic (no calls, no branches, no
table look-ups), so an inner loop ``for n in range(N): a[n] = fexp(dt * A[n])``
becomes SIMD code. The arithmetic is defined once, as LLVM IR, in
:func:`build_fexp`; the scalar :func:`fexp` (Numba code) and the vector loops of
:mod:`refssm.scan.numba_seq` both emit it, so they agree to the bit.

Algorithm (Cody & Waite range reduction + polynomial + exponent bits)::

    x  <- clamp(x, lo, hi)                  (NaN passes through)
    k  = rint(x / ln2)                      ("shifter" trick: t = x/ln2 + 1.5*2^m,
                                             the low mantissa bits of t hold k)
    r  = (x - k*ln2_hi) - k*ln2_lo          |r| <= ln2/2; k*ln2_hi is exact
    e^r ~ 1 + (r + r^2 * q(r))              q: Chebyshev (near-minimax) fit of
                                             (e^r - 1 - r)/r^2, degree 9 (float64)
                                             or 4 (float32), fitted with mpmath
    e^x = (e^r * 2^k1) * 2^k2               k1 = clamp(k, emin+1, emax), k2 = k - k1;
                                             e^r * 2^k1 by adding k1 to the exponent
                                             field of e^r (exact: the result is normal),
                                             2^k2 built from exponent bits (a bit
                                             cast); only the last product rounds, once:
                                             subnormal results are correctly rounded
                                             from e^r, underflow gives +0.0, overflow
                                             +inf, NaN gives NaN, never garbage.

Clamping: float64 ``[-800, 800]``, float32 ``[-120, 100]`` - beyond those the
result is already 0 or inf (``exp(-745.14) == 0`` in float64, ``exp(-103.98)
== 0`` in float32), the clamp only keeps ``k`` in range.

No ``fastmath`` anywhere: the operation order is the one written, and the
fused multiply-adds are explicit ``llvm.fma`` calls (one rounding, IEEE
``fusedMultiplyAdd``), never a contraction the compiler may or may not do, so
the results are the same on every machine (a CPU without FMA gets libm's
exact, slow ``fma``).

Measured accuracy (``tests/test_numba_seq.py::test_fastexp_ulp_float64`` and
``..._float32``; 3.3 million arguments: a dense grid of 2,000,001 points and
1,000,000 uniform random points over the range, plus 100,000 small arguments
and dense grids across the normal/subnormal and subnormal/zero edges; ulp
distance = distance of the bit patterns, so subnormals count in units of the
smallest subnormal):

=======  ===========  ===================================================
dtype    range        max distance to the reference
=======  ===========  ===================================================
float64  [-760, 0]    1 ulp against ``np.exp`` (10.0 % of points differ by
                      1 ulp, the rest are equal); subnormal results
                      (``x < -708.4``): <= 1 unit; exactly ``0.0``
                      wherever ``np.exp`` gives 0; real-valued error
                      <= 1.05 ulp (against long double)
float32  [-110, 0]    1 ulp against the correctly rounded value
                      (``np.exp`` in float64, rounded to float32; 7.9 %
                      of points differ); subnormals <= 1 unit; exact 0
                      where that is 0. Against numpy's own float32
                      ``np.exp``: <= 3 ulp, because that one is itself up
                      to 2 ulp off on this machine (AVX-512 SIMD path)
=======  ===========  ===================================================

The tests assert <= 2 ulp (float64 against ``np.exp``, float32 against the
correctly rounded value) and exact zeros. Throughput (one core, 10^7
arguments, ``fexp_array``): float64 ~0.75 ns, float32 ~0.3 ns per value
(``np.exp``: 0.85 / 0.46 ns); a libm ``math.exp`` in a Numba loop: 7.6 / 4.0 ns.
Positive arguments also work (overflow gives ``inf``).

The same file defines, as IR built on ``fexp``, what the fused kernels need
besides: :func:`build_flog1p` (``log1p`` on ``[0, 1]``, an atanh series),
:func:`build_softplus` (``max(x, 0) + log1p(exp(-|x|))``, the NumPy engine's
form) and :func:`build_sigmoid` (``1 / (1 + exp(-x))``). Measured
(``tests/test_numba_seq.py::test_flog1p_softplus_sigmoid_ulp``, float64):
``log1p`` <= 2 ulp against 40-digit mpmath (``np.log1p``: 1); softplus <= 2 ulp
against mpmath, <= 3 against NumPy's form; sigmoid <= 2 against mpmath (as
NumPy's), <= 4 against NumPy's. float32: <= 3 ulp against the correctly
rounded value. Below ``x = -708`` softplus is subnormal and off by at most 2
units of the smallest subnormal.

Caching caveat: the kernels of :mod:`refssm.scan.numba_seq` inline
:func:`build_fexp` and are cached (``cache=True``) keyed on the content of
*their* source file only. So ``numba_seq`` records :func:`ir_fingerprint` and
refuses to import when it differs: after changing the arithmetic here, update
``_FEXP_FINGERPRINT`` there (that edit is what makes Numba recompile them).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic, overload

__all__ = ["fexp", "fexp64", "fexp32", "fexp_array", "build_fexp", "build_flog1p",
           "build_softplus", "build_sigmoid", "fsoftplus_array", "fsigmoid_array",
           "flog1p_array", "ir_fingerprint", "deps_fingerprint", "check_fingerprint"]

# ---------------------------------------------------------------- float64 constants
_INV_LN2_64 = 1.4426950408889634            # 1/ln2
_SHIFT_64 = 6755399441055744.0              # 1.5 * 2**52: t = y + SHIFT rounds y to int
_LN2_HI_64 = 6.93147180369123816490e-01     # 0x3fe62e42fee00000: 32 significant bits
_LN2_LO_64 = 1.90821492927058770002e-10     # ln2 - LN2_HI
_MLN2_HI_64 = -_LN2_HI_64
_MLN2_LO_64 = -_LN2_LO_64
_LO_64 = -800.0
_HI_64 = 800.0
# q(r) ~ (e^r - 1 - r) / r^2 on [-ln2/2, ln2/2]: degree 9 Chebyshev fit (mpmath),
# approximation error of e^r: 1.8e-17 relative (0.08 ulp).
_Q64 = (0.5000000000000001, 0.16666666666666669, 0.041666666666624164,
        0.008333333333330065, 0.0013888888917196719, 0.00019841269863040545,
        2.4801521322368692e-05, 2.7557268480310024e-06, 2.7620075879983367e-07,
        2.5100375832561234e-08)
_Q64_0, _Q64_1, _Q64_2, _Q64_3, _Q64_4, _Q64_5, _Q64_6, _Q64_7, _Q64_8, _Q64_9 = _Q64

# ---------------------------------------------------------------- float32 constants
_f32 = np.float32
_INV_LN2_32 = _f32(1.4426950408889634)
_SHIFT_32 = _f32(12582912.0)                # 1.5 * 2**23
_LN2_HI_32 = _f32(0.693359375)              # 9 significant bits: k * LN2_HI exact
_LN2_LO_32 = _f32(-2.12194440e-4)           # ln2 - LN2_HI
_MLN2_HI_32 = -_LN2_HI_32
_MLN2_LO_32 = -_LN2_LO_32
_LO_32 = _f32(-120.0)
_HI_32 = _f32(100.0)
# degree 4 Chebyshev fit of q; approximation error of e^r: 1.1e-8 relative (0.2 ulp).
_Q32_0 = _f32(0.5)
_Q32_1 = _f32(0.16666577756404877)
_Q32_2 = _f32(0.041666556149721146)
_Q32_3 = _f32(0.008363173343241215)
_Q32_4 = _f32(0.0013926175888627768)


def _const(ty, value):
    """An LLVM constant of float/int type ``ty`` or a splat of it for a vector type."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


def _fma(builder, a, b, c):
    """``llvm.fma`` (one rounding) for a float or a vector of floats."""
    ty = a.type
    if isinstance(ty, ir.VectorType):
        elt = "f64" if isinstance(ty.element, ir.DoubleType) else "f32"
        name = f"llvm.fma.v{ty.count}{elt}"
    else:
        name = "llvm.fma.f64" if isinstance(ty, ir.DoubleType) else "llvm.fma.f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
    return builder.call(fn, [a, b, c])


def build_fexp(builder, x):
    """Emit LLVM IR for ``fexp(x)``; ``x`` a float/double value or a vector of them.

    The single definition of the function: :func:`fexp64` / :func:`fexp32`
    (scalar, through an intrinsic) and the fused scan kernels of
    :mod:`refssm.scan.numba_seq` (vectors) all call this, so they agree to
    the bit. Operation by operation (all IEEE, ``fma`` fused, nothing left
    to ``fastmath``)::

        x  = x < LO ? LO : x;  x = x > HI ? HI : x      (NaN passes)
        t  = fma(x, 1/ln2, SHIFT);  kf = t - SHIFT      (kf = rint(x / ln2))
        r  = fma(kf, -LN2_HI, x);   r = fma(kf, -LN2_LO, r)
        q  = Horner in r (fma), degree 9 (float64) or 4 (float32)
        er = 1 + fma(r * r, q, r)
        k  = bits(t) - bits(SHIFT);  k1 = clamp(k, emin + 1, emax);  k2 = k - k1
        return (er * 2**k1) * 2**k2     (2**k1: integer add to er's exponent
                                         field, exact; 2**k2 built from bits;
                                         NaN in gives NaN out)
    """
    ty = x.type
    elt = ty.element if isinstance(ty, ir.VectorType) else ty
    if isinstance(elt, ir.DoubleType):
        ielt, npf, npi = ir.IntType(64), np.float64, np.int64
        inv, shift, mhi, mlo, lo, hi = (_INV_LN2_64, _SHIFT_64, _MLN2_HI_64, _MLN2_LO_64,
                                         _LO_64, _HI_64)
        qs = _Q64
        bias, mant, kmin, kmax = 1023, 52, -1021, 1023
    elif isinstance(elt, ir.FloatType):
        ielt, npf, npi = ir.IntType(32), np.float32, np.int32
        inv, shift, mhi, mlo, lo, hi = (_INV_LN2_32, _SHIFT_32, _MLN2_HI_32, _MLN2_LO_32,
                                         _LO_32, _HI_32)
        qs = (_Q32_0, _Q32_1, _Q32_2, _Q32_3, _Q32_4)
        bias, mant, kmin, kmax = 127, 23, -125, 127
    else:  # pragma: no cover
        raise TypeError(f"build_fexp: float or double expected, got {ty}")
    ity = ir.VectorType(ielt, ty.count) if isinstance(ty, ir.VectorType) else ielt
    f = lambda v: _const(ty, float(npf(v)))          # noqa: E731  exact in the format
    i = lambda v: _const(ity, int(v))                # noqa: E731
    b = builder
    x = b.select(b.fcmp_ordered("<", x, f(lo)), f(lo), x)
    x = b.select(b.fcmp_ordered(">", x, f(hi)), f(hi), x)
    t = _fma(b, x, f(inv), f(shift))
    kf = b.fsub(t, f(shift))
    r = _fma(b, kf, f(mhi), x)
    r = _fma(b, kf, f(mlo), r)
    q = f(qs[-1])
    for c in qs[-2::-1]:
        q = _fma(b, q, r, f(c))
    er = b.fadd(f(1.0), _fma(b, b.fmul(r, r), q, r))
    k = b.sub(b.bitcast(t, ity), i(npf(shift).view(npi)))
    k1 = b.select(b.icmp_signed("<", k, i(kmin)), i(kmin), k)
    k1 = b.select(b.icmp_signed(">", k1, i(kmax)), i(kmax), k1)
    k2 = b.sub(k, k1)
    # er * 2**k1 by adding k1 to er's exponent field: exact, and normal and finite
    # for er in [0.70, 1.42] and emin + 1 <= k1 <= emax
    p = b.bitcast(b.add(b.bitcast(er, ity), b.shl(k1, i(mant))), ty)
    s2 = b.bitcast(b.shl(b.add(k2, i(bias)), i(mant)), ty)
    res = b.fmul(p, s2)
    return b.select(b.fcmp_unordered("uno", x, x), x, res)   # NaN in, NaN out


# log1p on [0, 1]: log1p(t) = 2 atanh(s), s = t / (2 + t) in [0, 1/3], and
# 2 atanh(s) = 2s + 2s * s^2 * q(s^2), q(w) = sum_{k>=1} w^(k-1) / (2k + 1).
# Truncating after k = K leaves < (1/9)^(K+1) / (2K + 3) relative: K = 16 (float64,
# 2e-18) and K = 7 (float32, 2e-9). The coefficients are 1/(2k+1) rounded once.
_L64 = tuple(1.0 / (2 * k + 1) for k in range(1, 17))
_L32 = tuple(float(np.float32(1.0 / (2 * k + 1))) for k in range(1, 8))


def build_flog1p(builder, t):
    """Emit IR for ``log1p(t)``, ``t`` in ``[0, 1]`` (scalar or vector; float or double).

    The domain softplus needs (``t = exp(-|x|)``); outside it the series is not
    accurate. Operation by operation::

        s  = t / (2 + t)                 (two roundings: |error| <= ~1 ulp of s)
        w  = s * s
        q  = Horner in w (fma) of sum_{k=1..K} w^(k-1) / (2k + 1)
        s2 = s + s                       (exact)
        return fma(s2 * w, q, s2)        (2s + 2s w q: the series' tail enters once)

    Error (``tests/test_numba_seq.py::test_flog1p_softplus_sigmoid_ulp``) is
    dominated by that of ``s``; see the module docstring for the figures.
    """
    ty = t.type
    elt = ty.element if isinstance(ty, ir.VectorType) else ty
    npf = np.float64 if isinstance(elt, ir.DoubleType) else np.float32
    cs = _L64 if npf is np.float64 else _L32
    f = lambda v: _const(ty, float(npf(v)))          # noqa: E731
    b = builder
    s = b.fdiv(t, b.fadd(f(2.0), t))
    w = b.fmul(s, s)
    q = f(cs[-1])
    for c in cs[-2::-1]:
        q = _fma(b, q, w, f(c))
    s2 = b.fadd(s, s)
    return _fma(b, b.fmul(s2, w), q, s2)


def _fabs(builder, x):
    """``|x|`` (select; ``-0.0`` gives ``-0.0``, which only ever feeds ``exp(-|x|)``)."""
    zero = _const(x.type, 0.0)
    return builder.select(builder.fcmp_ordered("<", x, zero), builder.fsub(zero, x), x)


def build_softplus(builder, x):
    """Emit IR for ``softplus(x) = max(x, 0) + log1p(fexp(-|x|))`` (the NumPy engine's form)."""
    b = builder
    zero = _const(x.type, 0.0)
    mx = b.select(b.fcmp_ordered(">", x, zero), x, zero)
    return b.fadd(mx, build_flog1p(b, build_fexp(b, b.fsub(zero, _fabs(b, x)))))


def build_sigmoid(builder, x):
    """Emit IR for ``sigmoid(x) = 1 / (1 + fexp(-x))`` (exactly 0 where ``fexp`` overflows)."""
    b = builder
    one = _const(x.type, 1.0)
    return b.fdiv(one, b.fadd(one, build_fexp(b, b.fsub(_const(x.type, 0.0), x))))


def ir_fingerprint() -> str:
    """SHA-256 of the code and constants that define the IR of :func:`build_fexp`.

    :mod:`refssm.scan.numba_seq` records it and refuses to import when it
    changes, because Numba's cache of its kernels is keyed on that module's
    own source only (see the caching caveat in the module docstring).
    """
    import hashlib
    import inspect

    parts = [inspect.getsource(f) for f in (_const, _fma, build_fexp, build_flog1p, _fabs,
                                            build_softplus, build_sigmoid)]
    parts.append(repr([_INV_LN2_64, _SHIFT_64, _MLN2_HI_64, _MLN2_LO_64, _LO_64, _HI_64, _Q64,
                       _INV_LN2_32, _SHIFT_32, _MLN2_HI_32, _MLN2_LO_32, _LO_32, _HI_32,
                       _Q32_0, _Q32_1, _Q32_2, _Q32_3, _Q32_4, _L64, _L32]))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def deps_fingerprint(*funcs) -> str:
    """:func:`ir_fingerprint` combined with the source of ``funcs`` (SHA-256, hex).

    For a module whose cached (``cache=True``) kernels inline code defined in
    other files: Numba keys a cache on the caller's file only, so such a
    module records this value and refuses to import when it changes (see the
    caching caveat above).
    """
    import hashlib
    import inspect

    parts = [ir_fingerprint()] + [inspect.getsource(f) for f in funcs]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def check_fingerprint(module: str, recorded: str, actual: str):
    """Refuse to import ``module`` whose cached kernels were built from other code."""
    if recorded != actual:  # pragma: no cover - a developer's reminder
        raise ImportError(
            f"code inlined into the cached Numba kernels of {module} changed (fingerprint "
            f"{actual!r}): set the recorded fingerprint in {module} to it, so that Numba "
            f"recompiles them instead of loading stale machine code from its cache")


@intrinsic
def _fexp_scalar(typingctx, x):
    """Scalar :func:`build_fexp` for Numba code."""
    if not (isinstance(x, types.Float) and x.bitwidth in (32, 64)):
        raise TypingError(f"fexp: expected float32 or float64, got {x}")

    def codegen(context, builder, signature, args):
        return build_fexp(builder, args[0])

    return x(x), codegen


@njit(inline="always", cache=True)
def fexp64(x):
    """``exp(x)`` for a float64 scalar, branch-free (<= 1 ulp measured, see module doc)."""
    return _fexp_scalar(x)


@njit(inline="always", cache=True)
def fexp32(x):
    """``exp(x)`` for a float32 scalar, float32 throughout."""
    return _fexp_scalar(x)


def fexp(x):
    """``exp(x)`` in the precision of ``x`` (float32 or float64), for Numba code.

    Inside ``@njit`` code this compiles to :func:`build_fexp`'s IR for the
    argument's type (what :func:`fexp64` / :func:`fexp32` also are). Called
    from Python it evaluates the same arithmetic (through :func:`fexp_array`).

    Examples
    --------
    >>> float(fexp(np.float64(-1.0))) == float(np.exp(-1.0))
    True
    """
    a = np.asarray(x)
    return fexp_array(a.reshape(-1)).reshape(a.shape)[()]


@overload(fexp)
def _fexp_overload(x):
    if isinstance(x, types.Float) and x.bitwidth in (32, 64):
        return lambda x: _fexp_scalar(x)
    raise TypingError(f"fexp: expected float32 or float64, got {x}")


@njit(cache=True)
def fexp_array(x):
    """Elementwise :func:`fexp` of a 1-D float32/float64 array (a new array)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = fexp(x[i])
    return out


def _unary_intrinsic(build, name):
    def typer(typingctx, x):
        if not (isinstance(x, types.Float) and x.bitwidth in (32, 64)):
            raise TypingError(f"{name}: expected float32 or float64, got {x}")

        def codegen(context, builder, signature, args):
            return build(builder, args[0])

        return x(x), codegen
    typer.__name__ = name
    return intrinsic(typer)


_flog1p_scalar = _unary_intrinsic(build_flog1p, "flog1p")
_fsoftplus_scalar = _unary_intrinsic(build_softplus, "fsoftplus")
_fsigmoid_scalar = _unary_intrinsic(build_sigmoid, "fsigmoid")


@njit(cache=True)
def flog1p_array(x):
    """Elementwise :func:`build_flog1p` of a 1-D float array with values in ``[0, 1]``."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _flog1p_scalar(x[i])
    return out


@njit(cache=True)
def fsoftplus_array(x):
    """Elementwise :func:`build_softplus` of a 1-D float array (a new array).

    Examples
    --------
    >>> float(fsoftplus_array(np.array([0.0]))[0])
    0.6931471805599453
    """
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _fsoftplus_scalar(x[i])
    return out


@njit(cache=True)
def fsigmoid_array(x):
    """Elementwise :func:`build_sigmoid` of a 1-D float array (a new array)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _fsigmoid_scalar(x[i])
    return out
