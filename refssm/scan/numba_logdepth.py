r"""The log-depth engine: the selective scan as a Blelloch parallel prefix scan.

Same core, signatures and return conventions as :mod:`refssm.scan.numpy_seq`
(read its docstrings for the math and the ``[bB, LB, G, N]`` layout of B/C);
only the order of the floating-point operations differs.

The recurrence ``h[t] = a[t] * h[t-1] + b[t]`` with ``a = exp(dt * A)`` and
``b = dtB * B * u`` is a scan under the associative operator::

    (a1, b1) o (a2, b2) = (a1 * a2,  a2 * b1 + b2)      identity I = (1, 0)

("first apply step 1, then step 2"). It is evaluated with the work-efficient
up-sweep / down-sweep of Blelloch (1990, "Prefix sums and their
applications", CMU-CS-90-190, section 1.3): ``2 (L_pad - 1)`` combines in
``2 log2 L_pad`` levels. Martin & Cundy (2018, "Parallelizing linear
recurrent neural nets over sequence length", ICLR) scan linear recurrences
with the same operator. The tree for ``L = 8`` (``[i:j]`` is
``x_i o ... o x_j``; every buffer has one extra row, ``L_pad``, for the total)::

    x0   x1   x2   x3   x4   x5   x6   x7
     \___/     \___/     \___/     \___/          d = 1
     [0:1]     [2:3]     [4:5]     [6:7]
         \_________/         \_________/          d = 2
            [0:3]               [4:7]
                \___________________/             d = 4
                        [0:7]

    up-sweep (reduce): at level d, row i = 2d k + 2d - 1 := row (i - d) o row i

        row:        0     1     2     3     4     5     6     7  |  8
        input:      x0    x1    x2    x3    x4    x5    x6    x7  |
        d = 1:      x0  [0:1]   x2  [2:3]   x4  [4:5]   x6  [6:7] |
        d = 2:      x0  [0:1]   x2  [0:3]   x4  [4:5]   x6  [4:7] |
        d = 4:      x0  [0:1]   x2  [0:3]   x4  [4:5]   x6  [0:7] |

    down-sweep (distribute): move the total to row 8 and clear the root to I;
    at level d the left child (row i - d) takes the parent's prefix (row i)
    and row i becomes prefix o left-subtree total

        clear root: x0  [0:1]   x2  [0:3]   x4  [4:5]   x6    I   | [0:7]
        d = 4:      x0  [0:1]   x2    I     x4  [4:5]   x6  [0:3] |
        d = 2:      x0    I     x2  [0:1]   x4  [0:3]   x6  [0:5] |
        d = 1:      I     x0  [0:1] [0:2] [0:3] [0:4] [0:5] [0:6] | [0:7]

Row ``t`` then holds the exclusive prefix ``[0:t-1]``, i.e. ``h[t-1]``, and
row ``t + 1`` holds ``h[t]`` (row ``L_pad``: the total). Any ``seq_len`` is
handled by padding to ``L_pad`` = the next power of two with ``I`` in the
local buffer. The initial state is folded into the first element,
``b[0] += a[0] * h0``, so ``[0:t]`` *is* ``h[t]``.

Only the ``b`` half of the down-sweep is computed: the right child's new
``b`` is ``a_left_total * b_prefix + b_left_total``, which reads the ``a``
of a left-subtree total (the down-sweep leaves ``xa`` as the up-sweep made
it) but never the ``a`` of a prefix: those products would be dead values.

Backward: the adjoint ``g[t] = dL/dh[t]`` obeys
``g[t] = a[t+1] g[t+1] + C[t] dy[t]`` with ``g[L-1] = C[L-1] dy[L-1] + dh_last``,
the same linear recurrence in reversed time ``s = L_pad-1-t``: element ``s`` is
``(a[t+1], C[t] dy[t])``, ``dh_last`` folded into that of ``t = L-1`` (whose
``a`` is never used: set to 1), and the ``L_pad - L`` elements before it the
identity. Padded at the start (the forward's padding is at the end), the
adjoint's row of step ``t`` lies in the segment that mirrors the forward's
segment of ``t`` (see below), and ``g[t]`` is row ``L_pad - t`` of its scan.
The forward states are recomputed inside the backward (one more
scan per work item) instead of being stored; then the local formulas of
:func:`refssm.scan.numpy_seq.scan_core_backward` give every gradient.

Parallelism and memory: ``prange`` over ``N_PARTS`` (8) fixed *partitions*
of the flattened ``batch x channel blocks`` work items (blocks of ``cb`` = 8
channels in float64, 16 in float32: 64 bytes of each input per step; batch 1
still uses every thread). A block's ``[batch, L, channels]`` inputs are
first copied into ``[cb, seq_len + 64 / itemsize]`` columns (each cache line
and memory page read once for the block's channels, instead of once per
channel and step), its channels are scanned from there (one by one, or side
by side segment by segment for long sequences, see below), and their outputs
go back the same way. Each partition owns ``[L_pad + 1, state]`` scratch
buffers (two in the forward, four in the backward; for long sequences
instead segments of them and ``[cb, K + 1, state]`` segment totals), the
columns (``5 x cb x (seq_len + 64 bytes)``; 7 in the backward) and, in the
backward, private float64 accumulators for the ``A``, ``B4`` and ``C4``
gradients (sums over channels, batch and, when constant, time), added up
after the parallel loop: race-free, extra memory ``partitions x (|A| + |B4|
+ |C4|)``. The partitions depend on the shapes only, not on the thread
count, so neither do the results (to the bit). Nothing of size ``batch x
seq_len x channels x state`` is ever allocated.

Vector code: the loops over the state of the tree levels, of the
discretisation and of ``y = C . h`` are LLVM vector IR (the intrinsics of
:mod:`refssm.scan.numba_seq`, whose fixed summation order they share). The
three lowest levels of each sweep touch only rows within blocks of 8: the
up-sweep's are done in the same pass as the discretisation (``A_bar =
fexp(dt A)`` for 8 rows at a time, 8 independent chains for the core;
:func:`_fill_first3`, and :func:`_adjoint_first3` for the backward's
reversed-time elements), the down-sweep's block by block
(:func:`_downsweep_last3`), each block's rows loaded and stored once. Each
element and tree node is computed by the same operations as the operator
above (``_combine_body``), in the same tree: the order of rounding is the
algorithm's. :func:`fused_forward` applies Mamba's prologue
(``clip(softplus(delta + bias))``) and epilogue (``(y + D u) silu(z)``) to
each staged column instead of reading a stored ``dt`` or writing ``y``;
:func:`fused_backward` does the same for their backward.

Cache: a tree of ``L_pad`` rows is walked a *segment* of ``S`` rows at a time
(``S N itemsize <=`` :data:`SEGMENT_BYTES`, :func:`_segment_rows`): each
segment's elements and its own up-sweep levels while its rows are in the
core's cache, then the levels above the segments (:func:`_sweeps_above`, a
scan of the segments' totals), then each segment's down-sweep followed at once
by what reads its rows (``y = C . h``; in the backward, the local gradient
formulas, the adjoint's segments from the last so that ``t`` still increases).
It is the same tree and the same node operations, walked in another order, so
the same bits (``tests/test_logdepth.py::test_segmented_walk_is_the_same_tree``);
it matters when ``L_pad`` rows no longer fit in the cache (``seq_len`` 65536:
8 MiB per buffer). Past :data:`TREE_BYTES` per buffer the forward stores no
tree at all (:func:`_forward_block`): it computes each segment's elements and
up-sweep twice, once for the segments' totals and once, after the tree of the
totals, for the segment's down-sweep, with the block's channels side by side
so that each segment's rows of ``B`` and ``C`` are read once for all of them
(same bits again, ``test_forward_without_stored_tree_is_the_same_bits``).
Past :data:`BACKWARD_TREE_BYTES` the backward, too, stores no tree
(:func:`_backward_block`): a first pass over the segments (from the last)
computes both trees' segment totals (the adjoint's elements read the forward
segment's ``A_bar``; the gate's ``dy = d_out silu(z)`` needs no ``y``), then
the trees of the totals, then a second pass recomputes each forward segment
and its mirrored adjoint segment, down-swept from their prefixes, for ``dz``
and the local gradients (same bits,
``test_backward_without_stored_trees_is_the_same_bits``).

Precision: no ``fastmath``; the scan runs in the dtype of the inputs
(float32 or float64); per-step sums over ``state`` and the gradient
accumulators are float64. ``a`` comes from :func:`refssm.scan._fastexp.fexp`
(branch-free, so the fill loop vectorises; <= 1 ulp from ``np.exp``, and
unbiased near 1: measured mean error +0.0005 ulp for ``x`` in
``[-1e-5, -1e-7]``). NumPy's SIMD float64 ``np.exp``, used by the NumPy
engine, is biased there (measured: 10 % of results 1 ulp low, mean -0.1 ulp),
which over ~1e5 steps with ``a ~ 1 - 1e-6`` moves the NumPy engine itself by
~1e-12 (see ``tests/test_logdepth.py::test_long_sequence_with_abar_near_one``).

Unstable systems (``A > 0``, so ``A_bar > 1``): the tree multiplies the
``A_bar`` of whole subtrees, which can overflow where the sequential engines'
step-by-step values stay finite, and ``inf * 0`` then gives NaN. A review's
random search (1,500 cases with ``A > 0``, seq_len <= 40, a third float32)
found 26 of the 1,148 that the NumPy engine keeps finite turned NaN by the
forward tree (here since the first log-depth engine), and 3 more (float32)
whose gradients the adjoint's tree turns NaN since its padding moved to the
start. The log-depth engine is meant for stable systems (Mamba's ``A =
-exp(A_log)``, Edifice's ``-(1..N)``), where no product exceeds 1.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from . import numba_seq as _ns
from ._fastexp import _const, build_fexp, build_sigmoid, check_fingerprint, deps_fingerprint
from .numba_seq import _loop_intrinsic

#: :func:`refssm.scan._fastexp.deps_fingerprint` of the code inlined into the cached
#: kernels below from other files: ``fexp`` and ``numba_seq``'s vector loops (Numba keys
#: their cache on this file only; see ``_fastexp``'s caveat).
_DEPS_FINGERPRINT = "1df1a49302316e6a52be7ee754a4b4538672ea84decc63675ed20fd769164e5e"
check_fingerprint(__name__, _DEPS_FINGERPRINT, deps_fingerprint(
    _ns._vector_loop_codegen, _ns._loop_intrinsic, _ns._check_loop_args, _ns._step_size,
    _ns._flag, _ns._splat, _ns._step_size_grad, _ns._halving_sum, _ns._dt_prime, _ns._gate,
    _ns._gate_grads))

__all__ = ["LogDepthSaved", "scan_core_forward", "scan_core_backward", "fused_forward",
           "fused_backward", "linear_scan", "padded_length"]


# --------------------------------------------------------------------------
# Vector loops over the state (rows of N values), as LLVM IR
# --------------------------------------------------------------------------
# The same operations as the scalar formulas beside them, one row per call
# (``numba_seq._loop_intrinsic``: 8 (float64) or 16 (float32) lanes, then a
# scalar tail; sums in its fixed order). LLVM does not vectorise these short
# loops itself (run-time alias checks; sums need ``fastmath``).

def _combine_body(builder, v, s):
    # arrays: a_j, a_i, b_j, b_i.  row i := row j o row i = (a_j a_i, a_i b_j + b_i)
    aj, ai, bj, bi = v
    return {1: builder.fmul(aj, ai), 3: builder.fadd(builder.fmul(ai, bj), bi)}, []


def _distribute_body(builder, v, s):
    # arrays: a_j, b_j, b_i.  b_j := b_i (left child: the parent's prefix);
    # b_i := a_j b_i + b_j (right child: prefix o left-subtree total)
    aj, bj, bi = v
    return {1: bi, 2: builder.fadd(builder.fmul(aj, bi), bj)}, []


def _discretize_body(builder, v, s):
    # arrays: A_c, B_t, xa, xb; scalars: dt, dtB u.  xa = dt A (exponentiated later), xb = (dtB u) B
    A, B, _, _ = v
    dtv, buv = s
    return {2: builder.fmul(dtv, A), 3: builder.fmul(buv, B)}, []


def _dot_body(builder, v, s):
    # arrays: C_t, h_t.  sum C h
    return {}, [builder.fmul(v[0], v[1])]


def _i64(builder, v):
    return v if v.type.width == 64 else builder.sext(v, ir.IntType(64))


def _level_intrinsic(name, body, rows):
    """``f(xa, xb, d, lo, hi, N)``: ``body`` on the row pairs of one tree level, in one IR loop.

    For ``i = lo + 2d - 1, lo + 4d - 1, ... < hi`` and ``j = i - d``, the state
    loop of ``body`` over the rows ``rows`` (``"aj"``, ``"ai"``, ``"bj"``,
    ``"bi"``: row ``j`` or ``i`` of ``xa`` or ``xb``), as
    :func:`numba_seq._loop_intrinsic` would run it for one pair; the loop over
    pairs is in the same IR (no call and set-up per pair). ``[lo, hi)`` is the
    whole tree (``0, L_pad``) or one segment of it (:func:`_segment_rows`).
    """
    def typer(typingctx, xa, xb, d, lo, hi, N):
        for a in (xa, xb):
            if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                    and isinstance(a.dtype, types.Float) and a.dtype == xa.dtype):
                raise TypeError(f"{name}: expected two 1-D C-contiguous float arrays")

        def codegen(context, builder, sig, args):
            b = builder
            xa_, xb_ = args[0], args[1]
            d_, lo_, hi_, N_ = (_i64(b, v) for v in args[2:])
            two_d = b.mul(d_, ir.Constant(ir.IntType(64), 2))
            start = b.add(lo_, b.sub(two_d, ir.Constant(ir.IntType(64), 1)))
            with cgutils.for_range_slice(b, start, hi_, two_d) as (i, _):
                j = b.sub(i, d_)
                pick = {"aj": (xa_, j), "ai": (xa_, i), "bj": (xb_, j), "bi": (xb_, i)}
                arrays = [pick[r][0] for r in rows]
                offs = [b.mul(pick[r][1], N_) for r in rows]
                tys = [sig.args[0] if r[0] == "a" else sig.args[1] for r in rows]
                _ns._vector_loop_codegen(context, b, arrays, tys, offs, [], N_, body, 0)
            return context.get_dummy_value()

        return types.void(xa, xb, d, lo, hi, N), codegen

    typer.__name__ = name
    return intrinsic(typer)


#: ``_upsweep_level(xa, xb, d, lo, hi, N)``: ``row i := row j o row i`` for the level's pairs.
_upsweep_level = _level_intrinsic("_upsweep_level", _combine_body, ("aj", "ai", "bj", "bi"))
#: ``_downsweep_level(xa, xb, d, lo, hi, N)``: the down-sweep's step (``b`` half) for the level.
_downsweep_level = _level_intrinsic("_downsweep_level", _distribute_body, ("aj", "bj", "bi"))


def _up8_tree(builder, a, x):
    """The up-sweep's levels d = 1, 2, 4 on the lists ``a``, ``x`` of 8 rows, in place.

    Pairs as in :func:`_upsweep`: ``row i := row i - d o row i`` (``_combine_body``).
    """
    b = builder
    for d in (1, 2, 4):
        for i in range(2 * d - 1, 8, 2 * d):
            j = i - d
            a[i], x[i] = b.fmul(a[j], a[i]), b.fadd(b.fmul(a[i], x[j]), x[i])


def _up8_body(builder, v, s):
    # arrays: xa rows r0 .. r0+7, then xb rows r0 .. r0+7: the up-sweep's levels d = 1, 2, 4
    # inside the block, with the values in registers
    a, x = list(v[:8]), list(v[8:])
    _up8_tree(builder, a, x)
    return {**{r: a[r] for r in (1, 3, 5, 7)}, **{8 + r: x[r] for r in (1, 3, 5, 7)}}, []


def _down8_body(builder, v, s):
    # arrays: xa rows r0 .. r0+7, then xb rows r0 .. r0+7: the down-sweep's levels d = 4, 2, 1
    b = builder
    a, x = list(v[:8]), list(v[8:])
    for d in (4, 2, 1):
        for i in range(2 * d - 1, 8, 2 * d):
            j = i - d
            x[j], x[i] = x[i], b.fadd(b.fmul(a[j], x[i]), x[j])
    return {8 + r: x[r] for r in range(8)}, []


def _block8_intrinsic(name, body):
    """``f(xa, xb, lo, hi, N)``: ``body`` on every block of 8 rows ``8k .. 8k+7`` in ``[lo, hi)``.

    The three lowest tree levels touch only rows within such blocks: done
    there, each block's rows are loaded and stored once for the three.
    """
    def typer(typingctx, xa, xb, lo, hi, N):
        def codegen(context, builder, sig, args):
            b = builder
            lo_, hi_, N_ = (_i64(b, v) for v in args[2:])
            with cgutils.for_range_slice(b, lo_, hi_, ir.Constant(ir.IntType(64), 8)) as (r0, _):
                offs = [b.mul(b.add(r0, ir.Constant(ir.IntType(64), r)), N_) for r in range(8)]
                _ns._vector_loop_codegen(context, b, [args[0]] * 8 + [args[1]] * 8,
                                         [sig.args[0]] * 8 + [sig.args[1]] * 8, offs + offs,
                                         [], N_, body, 0)
            return context.get_dummy_value()

        return types.void(xa, xb, lo, hi, N), codegen

    typer.__name__ = name
    return intrinsic(typer)


def _fill_first3_intrinsic(name, keep_abar):
    """Discretisation, ``fexp``, ``h0`` folding and the up-sweep's levels 1, 2, 4 in one pass.

    ``f(A, oA, B, oB0, sB, dtc, dtBc, uc, h0, oh0, xa, xb, ab, L, lo, hi, N, fold)`` (flat
    1-D arrays): block by block of 8 rows ``t`` in ``[lo, hi)``, each loaded once: ``xa[t] =
    fexp(dt[t] A)``, ``xb[t] = (dtB[t] u[t]) B[oB0 + t sB]``, ``xb[0] += xa[0] h0`` (if
    ``fold``),
    then the three lowest tree levels (as :func:`_up8_body`). Rows ``t >= L`` up
    get the identity ``(1, 0)`` (``dt = 0``, ``dtB u = 0``; their ``B``
    row is clamped to ``L - 1``). With ``keep_abar`` the ``A_bar`` rows are also
    stored into ``ab`` (the backward needs them). The 8 rows' ``fexp`` are 8
    independent chains for the core to interleave.
    """
    def typer(typingctx, A, oA, B, oB0, sB, dtc, dtBc, uc, h0, oh0, xa, xb, ab, L, lo, hi, N,
              fold):
        arrays = (A, B, dtc, dtBc, uc, h0, xa, xb, ab)
        for a in arrays:
            if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == A.dtype
                    and isinstance(a.dtype, types.Float)):
                raise TypeError(f"{name}: expected 1-D float arrays of one dtype")

        def codegen(context, builder, sig, args):
            b = builder
            ta = sig.args
            i64 = ir.IntType(64)
            (A_, oA_, B_, oB0_, sB_, dtc_, dtBc_, uc_, h0_, oh0_, xa_, xb_, ab_,
             L_, lo_, hi_, N_, fold_) = args
            oA_, oB0_, sB_, oh0_, L_, lo_, hi_, N_, fold_ = (
                _i64(b, v) for v in (oA_, oB0_, sB_, oh0_, L_, lo_, hi_, N_, fold_))
            fty = context.get_value_type(ta[0].dtype)
            zero = ir.Constant(fty, 0.0)
            Lm1 = b.sub(L_, ir.Constant(i64, 1))
            c = lambda v: ir.Constant(i64, v)              # noqa: E731

            def load(k, arr, i):
                return b.load(b.gep(context.make_array(ta[k])(context, b, arr).data, [i]))

            with cgutils.for_range_slice(b, lo_, hi_, c(8)) as (r0, _):
                first = b.and_(b.icmp_unsigned("==", r0, c(0)),
                               b.icmp_unsigned("!=", fold_, c(0)))
                dts, bus, boffs, roffs = [], [], [], []
                for r in range(8):
                    t = b.add(r0, c(r))
                    valid = b.icmp_signed("<", t, L_)
                    tt = b.select(valid, t, Lm1)
                    dts.append(b.select(valid, load(5, dtc_, tt), zero))
                    bus.append(b.select(valid, b.fmul(load(6, dtBc_, tt), load(7, uc_, tt)),
                                        zero))
                    boffs.append(b.add(oB0_, b.mul(tt, sB_)))
                    roffs.append(b.mul(t, N_))

                def body(bb, v, sc):
                    Av, Bs, h0v = v[0], v[1:9], v[-1]
                    a = [build_fexp(bb, bb.fmul(sc[r], Av)) for r in range(8)]
                    x = [bb.fmul(sc[8 + r], Bs[r]) for r in range(8)]
                    x[0] = bb.select(first, bb.fadd(x[0], bb.fmul(a[0], h0v)), x[0])
                    stores = {}
                    if keep_abar:
                        stores.update({25 + r: a[r] for r in range(8)})
                    _up8_tree(bb, a, x)
                    stores.update({9 + r: a[r] for r in range(8)})
                    stores.update({17 + r: x[r] for r in range(8)})
                    return stores, []

                arrs = [A_] + [B_] * 8 + [xa_] * 8 + [xb_] * 8 + ([ab_] * 8 if keep_abar else [])
                tys = [ta[0]] + [ta[2]] * 8 + [ta[10]] * 8 + [ta[11]] * 8 + (
                    [ta[12]] * 8 if keep_abar else [])
                offs = [oA_] + boffs + roffs + roffs + (roffs if keep_abar else [])
                _ns._vector_loop_codegen(context, b, arrs + [h0_], tys + [ta[8]], offs + [oh0_],
                                         dts + bus, N_, body, 0)
            return context.get_dummy_value()

        return (types.void(A, oA, B, oB0, sB, dtc, dtBc, uc, h0, oh0, xa, xb, ab, L, lo, hi, N,
                           fold), codegen)

    typer.__name__ = name
    return intrinsic(typer)


#: ``_fill_first3(A, oA, B, oB0, sB, dtc, dtBc, uc, h0, oh0, xa, xb, ab, L, lo, hi, N, fold)``
#: (``ab`` unused) and ``_fill_first3_keep``, which stores ``A_bar`` into ``ab``.
_fill_first3 = _fill_first3_intrinsic("_fill_first3", False)
_fill_first3_keep = _fill_first3_intrinsic("_fill_first3_keep", True)


@intrinsic
def _adjoint_first3(typingctx, ab, abase, C, oC0, sC, dyc, dh, odh, xa, G, L, Lp, lo, hi, base,
                    N):
    """The adjoint's elements, in reversed time, and the up-sweep's levels 1, 2, 4: one pass.

    Row ``s = L_pad - 1 - t`` of the adjoint's tree is ``(A_bar[t + 1], C[t] dy[t])``
    (``A_bar[t + 1]`` from row ``t + 1 - abase`` of ``ab``, ``C`` rows from ``oC0 + t
    sC``), except ``t = L - 1``: ``(1, C[L-1] dy[L-1] + dh)``; rows ``s < L_pad - L``
    (``t >= L``) are the identity ``(1, 0)``. Then, block by block of 8 rows, the
    three lowest tree levels (as :func:`_up8_body`). Rows ``s`` in ``[lo, hi)`` only
    (the tree or a segment of it), stored at row ``s - base`` of ``(xa, G)``.
    """
    for a in (ab, C, dyc, dh, xa, G):
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.dtype == ab.dtype
                and isinstance(a.dtype, types.Float)):
            raise TypeError("_adjoint_first3: expected 1-D float arrays of one dtype")

    def codegen(context, builder, sig, args):
        b = builder
        ta = sig.args
        i64 = ir.IntType(64)
        (ab_, abase_, C_, oC0_, sC_, dyc_, dh_, odh_, xa_, G_, L_, Lp_, lo_, hi_, base_,
         N_) = args
        abase_, oC0_, sC_, odh_, L_, Lp_, lo_, hi_, base_, N_ = (
            _i64(b, v) for v in (abase_, oC0_, sC_, odh_, L_, Lp_, lo_, hi_, base_, N_))
        fty = context.get_value_type(ta[0].dtype)
        c = lambda v: ir.Constant(i64, v)                  # noqa: E731
        Lm1 = b.sub(L_, c(1))
        Lpm1 = b.sub(Lp_, c(1))
        with cgutils.for_range_slice(b, lo_, hi_, c(8)) as (r0, _):
            dys, aoffs, coffs, roffs, ident, last = [], [], [], [], [], []
            for r in range(8):
                srow = b.add(r0, c(r))
                t = b.sub(Lpm1, srow)
                valid = b.icmp_signed("<", t, L_)
                t = b.select(valid, t, Lm1)
                p = b.gep(context.make_array(ta[5])(context, b, dyc_).data, [t])
                dys.append(b.select(valid, b.load(p), ir.Constant(fty, 0.0)))
                aoffs.append(b.mul(b.sub(b.add(t, c(1)), abase_), N_))
                coffs.append(b.add(oC0_, b.mul(t, sC_)))
                roffs.append(b.mul(b.sub(srow, base_), N_))
                last.append(b.and_(valid, b.icmp_signed("==", t, Lm1)))
                ident.append(b.or_(b.not_(valid), last[r]))

            def body(bb, v, sc):
                As, Cs, dhv = v[0:8], v[8:16], v[-1]
                one = _const(As[0].type, 1.0)
                a = [bb.select(ident[r], one, As[r]) for r in range(8)]
                x = [bb.fmul(Cs[r], sc[r]) for r in range(8)]
                x = [bb.select(last[r], bb.fadd(x[r], dhv), x[r]) for r in range(8)]
                _up8_tree(bb, a, x)
                stores = {16 + r: a[r] for r in range(8)}
                stores.update({24 + r: x[r] for r in range(8)})
                return stores, []

            _ns._vector_loop_codegen(
                context, b, [ab_] * 8 + [C_] * 8 + [xa_] * 8 + [G_] * 8 + [dh_],
                [ta[0]] * 8 + [ta[2]] * 8 + [ta[8]] * 8 + [ta[9]] * 8 + [ta[6]],
                aoffs + coffs + roffs + roffs + [odh_], dys, N_, body, 0)
        return context.get_dummy_value()

    return (types.void(ab, abase, C, oC0, sC, dyc, dh, odh, xa, G, L, Lp, lo, hi, base, N),
            codegen)


#: ``_upsweep_first3(xa, xb, lo, hi, N)``: the up-sweep's levels 1, 2, 4.
_upsweep_first3 = _block8_intrinsic("_upsweep_first3", _up8_body)
#: ``_downsweep_last3(xa, xb, lo, hi, N)``: the down-sweep's levels 4, 2, 1.
_downsweep_last3 = _block8_intrinsic("_downsweep_last3", _down8_body)


def _column_prologue_body(builder, v, s):
    # arrays: a column of delta (in place); scalars: its channel's bias, softplus?, lo, hi
    bias, sp, lo, hi = s
    return {0: _ns._step_size(builder, builder.fadd(v[0], bias), sp, lo, hi)[1]}, []


def _column_epilogue_body(builder, v, s):
    # arrays: y (becomes out), u, z; scalars: D_c, D?, z?.  out = (y + D u) silu(z), the
    # operations of numba_seq's _store_forward_body
    y, u, z = v
    Dc, hasD, hasz = s
    return {0: _ns._gate(builder, y, Dc, u, z, hasD, hasz)}, []


def _column_gate_backward_body(builder, v, s):
    # arrays: d_out (becomes dy), y_core (becomes dz), u, z; scalars: D_c, D?, z?.
    # dy = d_out z sigma(z), dz = d_out (y + D u) silu'(z): numba_seq's _epilogue_backward_body
    dout, yc, u, z = v
    Dc, hasD, hasz = s
    dy, dz = _ns._gate_grads(builder, dout, yc, Dc, u, z, build_sigmoid(builder, z), hasD, hasz)
    return {0: dy, 1: dz}, []


def _column_gate_dy_body(builder, v, s):
    # arrays: d_out, dy (written), z; scalars: z?.  The dy half of _column_gate_backward_body:
    # the same numba_seq._gate_grads (its dz, unused here, is given dummies for y, D, u)
    dout, _, z = v
    (hasz,) = s
    dy, _ = _ns._gate_grads(builder, dout, dout, hasz, dout, z, build_sigmoid(builder, z),
                            hasz, hasz)
    return {1: dy}, []


def _column_gate_dz_body(builder, v, s):
    # arrays: d_out (becomes dz), y_core, u, z; scalars: D_c, D?.  The dz half
    dout, yc, u, z = v
    Dc, hasD = s
    _, dz = _ns._gate_grads(builder, dout, yc, Dc, u, z, build_sigmoid(builder, z), hasD, hasD)
    return {0: dz}, []


def _column_finish_body(builder, v, s):
    # arrays: d dt (becomes d delta), d dtB, delta, du (core's; becomes du), dy; scalars: bias_c,
    # softplus?, lo, hi, D_c, D?.  numba_seq's _finish_body for one channel: d delta =
    # (d dt + d dtB) dt'(delta + bias), du += dy D; sum: d delta (for d delta_bias)
    b = builder
    ddt, ddtB, delta, duc, dy = v
    bias, sp, lo, hi, Dc, hasD = s
    dd = b.fmul(b.fadd(ddt, ddtB), _ns._dt_prime(b, delta, bias, sp, lo, hi))
    return {0: dd, 3: _ns._flag(b, hasD, b.fadd(duc, b.fmul(dy, Dc)), duc)}, [dd]


#: ``_column_finish(ddt, o, ddtB, o, delta, o, du, o, dy, o, bias_c, sp, lo, hi, D_c, hasD, n)
#: -> sum of d delta``.
_column_finish = _loop_intrinsic("_column_finish", 5, 6, _column_finish_body, 1, unroll=4)
#: ``_column_epilogue(y, o, u, o, z, o, D_c, hasD, hasz, n)``: ``y := (y + D u) silu(z)``.
_column_epilogue = _loop_intrinsic("_column_epilogue", 3, 3, _column_epilogue_body, 0, unroll=4)
#: ``_column_gate_backward(dout, o, y, o, u, o, z, o, D_c, hasD, hasz, n)``: ``dout := dy``,
#: ``y := dz``.
_column_gate_backward = _loop_intrinsic("_column_gate_backward", 4, 3,
                                        _column_gate_backward_body, 0, unroll=4)
#: ``_column_gate_dy(dout, o, dy, o, z, o, hasz, n)``: ``dy :=`` the ``dy`` half of
#: :data:`_column_gate_backward` (``d_out`` kept).
_column_gate_dy = _loop_intrinsic("_column_gate_dy", 3, 1, _column_gate_dy_body, 0, unroll=4)
#: ``_column_gate_dz(dout, o, y, o, u, o, z, o, D_c, hasD, n)``: ``dout := dz``, the other half.
_column_gate_dz = _loop_intrinsic("_column_gate_dz", 4, 2, _column_gate_dz_body, 0, unroll=4)
#: ``_column_prologue(col, o, bias_c, sp, lo, hi, n)``: ``col = clip(softplus(col + bias_c))``.
_column_prologue = _loop_intrinsic("_column_prologue", 1, 4, _column_prologue_body, 0, unroll=4)


@intrinsic
def _discretize_rows(typingctx, A, oA, B, oB, sB, dtc, dtBc, uc, xa, xb, L, N):
    """``xa[t, n] = dt[t] A[n]``, ``xb[t, n] = (dtB[t] u[t]) B[oB + t sB + n]`` for ``t < L``.

    Flat 1-D arrays; ``A`` from ``oA``; ``sB`` is 0 for a constant ``B``. One
    IR loop over time around the state loop of ``numba_seq._loop_intrinsic``.
    """
    arrays = (A, B, dtc, dtBc, uc, xa, xb)
    for a in arrays:
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout in "CA"
                and isinstance(a.dtype, types.Float) and a.dtype == A.dtype):
            raise TypeError("_discretize_rows: expected 1-D float arrays of one dtype")

    def codegen(context, builder, sig, args):
        b = builder
        A_, oA_, B_, oB_, sB_, dtc_, dtBc_, uc_, xa_, xb_, L_, N_ = args
        oA_, oB_, sB_, L_, N_ = (_i64(b, v) for v in (oA_, oB_, sB_, L_, N_))
        ta = sig.args
        ptr = lambda k, arr, i: b.gep(context.make_array(ta[k])(context, b, arr).data, [i])  # noqa
        with cgutils.for_range(b, L_) as loop:
            t = loop.index
            dtv = b.load(ptr(5, dtc_, t))
            buv = b.fmul(b.load(ptr(6, dtBc_, t)), b.load(ptr(7, uc_, t)))
            o = b.mul(t, N_)
            _ns._vector_loop_codegen(
                context, b, [A_, B_, xa_, xb_], [ta[0], ta[2], ta[8], ta[9]],
                [oA_, b.add(oB_, b.mul(t, sB_)), o, o], [dtv, buv], N_, _discretize_body, 0)
        return context.get_dummy_value()

    sig = types.void(A, oA, B, oB, sB, dtc, dtBc, uc, xa, xb, L, N)
    return sig, codegen


#: ``_dot(C, oC, h, oh, N) -> sum_n C[n] h[n]``.
_dot = _loop_intrinsic("_dot", 2, 0, _dot_body, 1)


@intrinsic
def _fexp_inplace(typingctx, x, n):
    """``x[i] = fexp(x[i])`` for ``i < n`` (1-D C-contiguous float array).

    In IR vectors of 64 (float64) or 128 (float32) values: LLVM splits each
    into 8 machine vectors and interleaves them, so the ~30 dependent
    operations of one ``fexp`` do not leave the core waiting on latency. Then
    a scalar tail. Elementwise: the same IR as the scalar ``fexp``, same bits.
    """
    if not (isinstance(x, types.Array) and x.ndim == 1 and x.layout == "C"
            and isinstance(x.dtype, types.Float) and isinstance(n, types.Integer)):
        raise TypeError("_fexp_inplace: expected a 1-D C-contiguous float array and a length")

    def codegen(context, builder, sig, args):
        b = builder
        data = context.make_array(sig.args[0])(context, b, args[0]).data
        i64 = ir.IntType(64)
        cnt = args[1] if args[1].type.width == 64 else b.sext(args[1], i64)
        width = 4096 // sig.args[0].dtype.bitwidth                 # 512 bytes
        vty = ir.VectorType(data.type.pointee, width)
        al = sig.args[0].dtype.bitwidth // 8
        nblk = b.udiv(cnt, ir.Constant(i64, width))
        with cgutils.for_range(b, nblk) as loop:
            p = b.bitcast(b.gep(data, [b.mul(loop.index, ir.Constant(i64, width))]),
                          vty.as_pointer())
            b.store(build_fexp(b, b.load(p, align=al)), p, align=al)
        with cgutils.for_range_slice(b, b.mul(nblk, ir.Constant(i64, width)), cnt,
                                     ir.Constant(i64, 1)) as (i, _):
            p = b.gep(data, [i])
            b.store(build_fexp(b, b.load(p)), p)
        return context.get_dummy_value()

    return types.void(x, n), codegen


@intrinsic
def _local_gradients(typingctx, G, oG, H, ohp, oh, ab, oa, A, oA, B, oB, dA, odA, dB, odB,
                     dC, odC, dtv, dtBv, uv, dyv, N):
    """The local formulas of the backward at one step ``t``, over the state in vector IR.

    ``G``, ``H``, ``ab``, ``A``, ``B`` in the inputs' dtype; ``dA``, ``dB``,
    ``dC`` float64 accumulators (rows from their offsets). With ``g = G[oG + n]``,
    ``hp = H[ohp + n]`` (``h[t-1]``), ``h = H[oh + n]``, ``a = ab[oa + n]``::

        d_dtA = (g hp) a;   dA += d_dtA dt;   dB += (g dtB) u;   dC += dy h
        returns  (sum d_dtA A,  sum (g B) u,  sum (g dtB) B)    (float64)

    Products in the inputs' dtype, accumulation and sums in float64 (as the
    scalar formulas of :func:`refssm.scan.numpy_seq.scan_core_backward` ran in
    this kernel before), summed in ``numba_seq``'s fixed order: 8 lanes,
    halved, then the tail.
    """
    ins = (G, H, ab, A, B)
    accs = (dA, dB, dC)
    if not (all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == G.dtype
                and isinstance(a.dtype, types.Float) for a in ins)
            and all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float64
                    for a in accs)
            and all(sc == G.dtype for sc in (dtv, dtBv, uv, dyv))):
        raise TypeError("_local_gradients: expected 1-D float arrays of one dtype, float64 "
                        "accumulators and scalars of the arrays' dtype")

    def codegen(context, builder, sig, args):
        b = builder
        ta = sig.args
        i64 = ir.IntType(64)
        (Gv, oG, Hv, ohp, oh, av, oa, Av, oA, Bv, oB, dAv, odA, dBv, odB, dCv, odC,
         dt, dtB, u, dy, n) = args
        oG, ohp, oh, oa, oA, oB, odA, odB, odC, n = (
            _i64(b, v) for v in (oG, ohp, oh, oa, oA, oB, odA, odB, odC, n))
        dty = ir.DoubleType()
        W = 8
        wide = not isinstance(context.get_value_type(ta[0].dtype), ir.DoubleType)

        def ext(v):                      # to float64 (a no-op for float64 inputs)
            if not wide:
                return v
            return b.fpext(v, ir.VectorType(dty, W) if isinstance(v.type, ir.VectorType) else dty)

        def run(i, vec):
            def ld(k, arr, off):         # (pointer, value): element or W elements at off + i
                p = b.gep(context.make_array(ta[k])(context, b, arr).data, [b.add(off, i)])
                if vec:
                    p = b.bitcast(p, ir.VectorType(p.type.pointee, W).as_pointer())
                return p, b.load(p, align=ta[k].dtype.bitwidth // 8)

            sp = (lambda x: _ns._splat(b, x, W)) if vec else (lambda x: x)   # noqa: E731
            g = ld(0, Gv, oG)[1]
            hp = ld(2, Hv, ohp)[1]
            h = ld(2, Hv, oh)[1]
            a = ld(5, av, oa)[1]
            Ac = ld(7, Av, oA)[1]
            Bt = ld(9, Bv, oB)[1]
            d_dtA = b.fmul(b.fmul(g, hp), a)
            for k, arr, off, term in ((11, dAv, odA, b.fmul(d_dtA, sp(dt))),
                                      (13, dBv, odB, b.fmul(b.fmul(g, sp(dtB)), sp(u))),
                                      (15, dCv, odC, b.fmul(sp(dy), h))):
                p, cur = ld(k, arr, off)
                b.store(b.fadd(cur, ext(term)), p, align=8)
            return [ext(b.fmul(d_dtA, Ac)), ext(b.fmul(b.fmul(g, Bt), sp(u))),
                    ext(b.fmul(b.fmul(g, sp(dtB)), Bt))]

        vty = ir.VectorType(dty, W)
        accs = [cgutils.alloca_once_value(b, _const(vty, -0.0)) for _ in range(3)]
        nb = b.udiv(n, ir.Constant(i64, W))
        with cgutils.for_range(b, nb) as loop:
            for acc, term in zip(accs, run(b.mul(loop.index, ir.Constant(i64, W)), True)):
                b.store(b.fadd(b.load(acc), term), acc)
        tots = []
        for acc in accs:
            tots.append(cgutils.alloca_once_value(b, _ns._halving_sum(b, b.load(acc))))
        with cgutils.for_range_slice(b, b.mul(nb, ir.Constant(i64, W)), n,
                                     ir.Constant(i64, 1)) as (i, _):
            for tot, term in zip(tots, run(i, False)):
                b.store(b.fadd(b.load(tot), term), tot)
        return context.make_tuple(b, sig.return_type, [b.load(t) for t in tots])

    sig = types.UniTuple(types.float64, 3)(G, oG, H, ohp, oh, ab, oa, A, oA, B, oB, dA, odA,
                                          dB, odB, dC, odC, dtv, dtBv, uv, dyv, N)
    return sig, codegen


class LogDepthSaved(NamedTuple):
    """What :func:`scan_core_forward` keeps for the backward: its inputs only.

    The states ``h`` are *not* saved; the backward recomputes them with one
    more log-depth scan. All arrays are the caller's (no copies).

    Attributes
    ----------
    u, dt, dtB : ndarray ``[batch, seq_len, channels]``
    A : ndarray ``[channels, state]``
    B4, C4 : ndarray ``[bB, LB, G, state]``
    h0 : ndarray ``[batch, channels, state]``
    """

    u: np.ndarray
    dt: np.ndarray
    dtB: np.ndarray
    A: np.ndarray
    B4: np.ndarray
    C4: np.ndarray
    h0: np.ndarray


# --------------------------------------------------------------------------
# The scan itself: operator, up-sweep, down-sweep (time on axis 0, state on 1)
# --------------------------------------------------------------------------

@njit(cache=True)
def padded_length(L):
    """Smallest power of two ``>= L`` (``L >= 1``)."""
    p = 1
    while p < L:
        p *= 2
    return p


@njit(cache=True)
def _upsweep_rows(af, bf, d, lo, hi, N):
    """Blelloch reduce, levels ``d, 2d, ...`` on the rows ``[lo, hi)`` of a flat tree.

    ``af, bf`` are ``xa, xb`` ``[Lp+1, N]`` flattened; ``hi - lo`` is a power of
    two and ``lo`` a multiple of it (the whole tree, or a segment). After it,
    row ``lo + k 2e - 1`` holds the total of its subtree of ``2e`` rows for every
    level ``e``; row ``hi - 1`` the segment's total (see the module docstring).
    """
    while d < hi - lo:
        # for i in range(lo + 2 d - 1, hi, 2 d): row i := row (i - d) o row i  (_combine_body)
        _upsweep_level(af, bf, d, lo, hi, N)
        d *= 2


@njit(cache=True)
def _downsweep_rows(af, bf, d, last, lo, hi, N):
    """Blelloch distribute (``b`` half), levels ``d, d/2, ... >= last`` on rows ``[lo, hi)``.

    Row ``hi - 1`` must hold its subtree's prefix already (the identity at the
    root of the tree; a segment's prefix from the levels above it).
    """
    while d >= last:
        # for i in range(lo + 2 d - 1, hi, 2 d), j = i - d (the end of the left subtree; i is
        # the parent's row): the left child takes the parent's prefix, xb[j] = xb[i]; the right
        # child prefix o left total, xb[i] = xa[j] xb[i] + (old) xb[j] (the a half is dead,
        # see the module doc)
        _downsweep_level(af, bf, d, lo, hi, N)
        d //= 2


@njit(cache=True)
def _clear_root(xa, xb, Lp):
    """Move the total (row ``Lp - 1``) to row ``Lp`` and clear the root's prefix to the identity."""
    for n in range(xa.shape[1]):
        xa[Lp, n] = xa[Lp - 1, n]
        xb[Lp, n] = xb[Lp - 1, n]
        xb[Lp - 1, n] = 0.0          # the root's prefix: identity (its a is never read)


@njit(cache=True)
def _upsweep(xa, xb, Lp):
    """Blelloch reduce, in place on rows ``0 .. Lp-1`` of ``xa, xb`` ``[Lp+1, N]``.

    After it, row ``k 2d - 1`` holds the total of its subtree of ``2d`` rows;
    row ``Lp - 1`` holds the total of everything (see the module docstring).
    """
    N = xa.shape[1]
    af, bf = xa.reshape(-1), xb.reshape(-1)
    d = 1
    if Lp >= 8:                      # levels 1, 2, 4 block by block
        _upsweep_first3(af, bf, 0, Lp, N)
        d = 8
    _upsweep_rows(af, bf, d, 0, Lp, N)


@njit(cache=True)
def _downsweep(xa, xb, Lp):
    """Blelloch distribute, ``b`` half only: exclusive prefixes in ``xb``.

    Moves the total to row ``Lp``, clears the root to the identity and walks
    the tree down. Afterwards ``xb[t]`` is the ``b`` of ``[0:t-1]`` for
    ``t = 0 .. Lp`` (``xb[0] = 0``, ``xb[Lp]`` the total). ``xa`` keeps the
    up-sweep's subtree totals, which are all the down-sweep reads.
    """
    N = xa.shape[1]
    _clear_root(xa, xb, Lp)
    af, bf = xa.reshape(-1), xb.reshape(-1)
    _downsweep_rows(af, bf, Lp // 2, 8 if Lp >= 8 else 1, 0, Lp, N)
    if Lp >= 8:                      # levels 4, 2, 1 block by block
        _downsweep_last3(af, bf, 0, Lp, N)


#: Bytes of one ``[S, N]`` segment of a scan buffer: the tree is walked a segment at a
#: time (:func:`_segment_rows`) so that its rows stay in the core's L2 cache.
SEGMENT_BYTES = 1 << 17


@njit(cache=True)
def _segment_rows(Lp, N, itemsize, nbytes):
    """Rows ``S`` of a segment: a power of two, ``8 <= S <= max(Lp, 8)``, ``S N itemsize
    <= nbytes`` (:data:`SEGMENT_BYTES`, or :data:`BACKWARD_SEGMENT_BYTES`) where it can be
    (trees of ``Lp < 8`` rows are not segmented: their callers take another path)."""
    S = 8
    while S < Lp and 2 * S * N * itemsize <= nbytes:
        S *= 2
    return S


@njit(cache=True)
def _sweeps_above(xa, xb, Lp, S):
    """The tree's levels above its segments of ``S`` rows: up, clear the root, down.

    After each segment's own up-sweep (its total in its last row), this scans
    the segments' totals: up-sweep levels ``S .. Lp/2``, :func:`_clear_root`,
    down-sweep levels ``Lp/2 .. S``. Each segment's last row then holds the
    segment's prefix, from which its own down-sweep continues
    (:func:`_downsweep_segment`). The same tree and node operations as
    :func:`_upsweep` then :func:`_downsweep`, walked in another order: the
    same bits.
    """
    N = xa.shape[1]
    af, bf = xa.reshape(-1), xb.reshape(-1)
    _upsweep_rows(af, bf, S, 0, Lp, N)
    _clear_root(xa, xb, Lp)
    _downsweep_rows(af, bf, Lp // 2, S, 0, Lp, N)


@njit(cache=True)
def _downsweep_segment(af, bf, lo, S, N):
    """The down-sweep's levels inside the segment of rows ``[lo, lo + S)`` (``S >= 8``)."""
    _downsweep_rows(af, bf, S // 2, 8, lo, lo + S, N)
    _downsweep_last3(af, bf, lo, lo + S, N)


@njit(cache=True)
def _scan(xa, xb, L):
    """Pad rows ``L .. Lp-1`` with the identity, then up-sweep + down-sweep.

    Parameters
    ----------
    xa, xb : ndarray ``[Lp + 1, N]``
        Rows ``0 .. L-1`` hold the elements ``(a[t], b[t])`` on entry.
    L : int

    On return ``xb[t + 1]`` is the inclusive scan ``[0:t]`` for ``t < L``.
    """
    Lp = xa.shape[0] - 1
    N = xa.shape[1]
    for t in range(L, Lp):
        for n in range(N):
            xa[t, n] = 1.0
            xb[t, n] = 0.0
    _upsweep(xa, xb, Lp)
    _downsweep(xa, xb, Lp)


@njit(cache=True)
def linear_scan(a, b):
    """``h[t] = a[t] h[t-1] + b[t]`` with ``h[-1] = 0``, by :func:`_scan`.

    Parameters
    ----------
    a, b : ndarray ``[L, N]``

    Returns
    -------
    h : ndarray ``[L, N]``

    The bare kernel (one work item), for tests.
    """
    L, N = a.shape
    Lp = padded_length(L)
    xa = np.empty((Lp + 1, N), dtype=a.dtype)
    xb = np.empty((Lp + 1, N), dtype=a.dtype)
    h = np.empty((L, N), dtype=a.dtype)
    for t in range(L):
        for n in range(N):
            xa[t, n] = a[t, n]
            xb[t, n] = b[t, n]
    _scan(xa, xb, L)
    for t in range(L):
        for n in range(N):
            h[t, n] = xb[t + 1, n]
    return h


# --------------------------------------------------------------------------
# Forward / backward kernels
# --------------------------------------------------------------------------

@njit(cache=True)
def _bc_rows(M4, b, c, gs, N):
    """``(o0, s)``: work item ``(b, c)``'s row of ``M4`` (``B4`` or ``C4``, ``[bM, LM, G,
    N]``, ``gs`` channels per group) at time ``t`` starts at ``o0 + t s`` of the flat
    array (``s = 0`` when constant over time; batch 0 when shared over batch)."""
    bM = b if M4.shape[0] > 1 else 0
    LM, GM = M4.shape[1], M4.shape[2]
    return (bM * LM * GM + c // gs) * N, (GM * N if LM > 1 else 0)


@njit(cache=True)
def _fill_forward(xa, xb, uc, dtc, dtBc, A, B4, h0, b, c, gsB):
    """Discretise work item ``(b, c)`` into rows ``0 .. L-1``; fold ``h0`` into row 0.

    ``uc, dtc, dtBc`` ``[L]`` are the item's ``u, dt, dtB`` over time
    (staged by :func:`_gather_columns`). ``xa[t] = exp(dt[t] A[c])``
    (``fexp``) and ``xb[t] = (dtB[t] u[t]) B[t]``: first the products, a row
    per step, then ``fexp`` over all ``L N`` of them in one pass of wide
    vectors (:func:`_fexp_inplace`).
    """
    L = uc.shape[0]
    N = A.shape[1]
    oB0, sB = _bc_rows(B4, b, c, gsB, N)
    Af, Bf, af, bf = A.reshape(-1), B4.reshape(-1), xa.reshape(-1), xb.reshape(-1)
    # for each t: xa[t] = dt[t] A[c], xb[t] = (dtB[t] u[t]) B[t]
    _discretize_rows(Af, c * N, Bf, oB0, sB, dtc, dtBc, uc, af, bf, L, N)
    _fexp_inplace(af, L * N)
    for n in range(N):
        xb[0, n] += xa[0, n] * h0[b, c, n]


@njit(cache=True)
def _read_out(Cf, oC0, sC, bf, yc, lo, hi, L, N):
    """``yc[r - 1] = C[r - 1] . xb[r]`` (``= C[t] . h[t]``) for the rows ``r`` in
    ``[lo, hi)`` with ``r <= L``; ``C[t]`` at ``Cf[oC0 + t sC]``."""
    for r in range(lo, min(hi, L + 1)):
        yc[r - 1] = _dot(Cf, oC0 + (r - 1) * sC, bf, r * N, N)


@njit(cache=True)
def _fill_and_scan(xa, xb, ab, keep, uc, dtc, dtBc, A, B4, h0, b, c, gsB, C4, gsC, yc, read,
                   seg_bytes):
    """Discretise work item ``(b, c)``, fold ``h0``, scan (``xb[t + 1] = h[t]``) and,
    with ``read``, read out ``yc[t] = C[t] . h[t]``.

    With ``keep``, ``ab[t] = A_bar[t]`` too. For ``L_pad >= 8`` the discretisation
    and the first three tree levels are one pass (:func:`_fill_first3`), and the
    tree is walked a segment at a time (:func:`_segment_rows`): each segment's
    elements and up-sweep, the levels above (:func:`_sweeps_above`), then each
    segment's down-sweep and the ``y`` of its rows while they are in cache.
    Otherwise :func:`_fill_forward` then :func:`_scan`.
    """
    L = uc.shape[0]
    N = A.shape[1]
    Lp = xa.shape[0] - 1
    Cf = C4.reshape(-1)
    oC0, sC = _bc_rows(C4, b, c, gsC, N)           # C[t] at Cf[oC0 + t sC]
    if Lp < 8:
        _fill_forward(xa, xb, uc, dtc, dtBc, A, B4, h0, b, c, gsB)
        if keep:
            for t in range(L):
                for n in range(N):
                    ab[t, n] = xa[t, n]
        _scan(xa, xb, L)
        if read:
            _read_out(Cf, oC0, sC, xb.reshape(-1), yc, 1, L + 1, L, N)
        return
    Af, Bf, h0f, af, bf, abf = (A.reshape(-1), B4.reshape(-1), h0.reshape(-1), xa.reshape(-1),
                                xb.reshape(-1), ab.reshape(-1))
    oB0, sB = _bc_rows(B4, b, c, gsB, N)
    oh0 = (b * A.shape[0] + c) * N
    S = _segment_rows(Lp, N, xa.itemsize, seg_bytes)
    for lo in range(0, Lp, S):       # each segment: its elements and its own up-sweep
        if keep:
            _fill_first3_keep(Af, c * N, Bf, oB0, sB, dtc, dtBc, uc, h0f, oh0, af, bf, abf, L,
                              lo, lo + S, N, 1)
        else:
            _fill_first3(Af, c * N, Bf, oB0, sB, dtc, dtBc, uc, h0f, oh0, af, bf, abf, L,
                         lo, lo + S, N, 1)
        _upsweep_rows(af, bf, 8, lo, lo + S, N)
    _sweeps_above(xa, xb, Lp, S)
    for lo in range(0, Lp, S):
        _downsweep_segment(af, bf, lo, S, N)
        if read:
            _read_out(Cf, oC0, sC, bf, yc, max(lo, 1), lo + S, L, N)
    if read:
        _read_out(Cf, oC0, sC, bf, yc, Lp, Lp + 1, L, N)


#: Above this many bytes per ``[L_pad, N]`` buffer, the forward does not store the tree
#: (:func:`_forward_block`). Measured in alternating runs, state 16, 2 threads, forward
#: (at stop 13; stop 11's figures were taken while the segment size could not reach the
#: kernels): recomputing was slower at 4 MiB (W4 float32: 255 against 192 ms) and at
#: 8 MiB (W4 float64: 536-557 against 471-528 ms; seq_len 131072 float32: 317-319
#: against 291-302 ms), faster at 16 MiB (seq_len 131072 float64: 602-612 against
#: 664-693 ms).
TREE_BYTES = 1 << 23


@njit(cache=True)
def _scan_rows(L, N, itemsize, tree_bytes, segment_bytes):
    """``(S, K)``: the rows of a kernel's scan buffers and its number of segments;
    ``(L_pad, 0)`` when it stores the whole tree (``L_pad N itemsize <= tree_bytes``:
    :data:`TREE_BYTES` for the forward, :data:`BACKWARD_TREE_BYTES` for the backward),
    else ``K`` segments of ``S`` rows (:func:`_segment_rows` of ``segment_bytes``;
    :func:`_forward_block`, :func:`_backward_block`)."""
    Lp = padded_length(L)
    S = _segment_rows(Lp, N, itemsize, segment_bytes)
    if S >= Lp or Lp * N * itemsize <= tree_bytes:
        return Lp, 0
    return S, Lp // S


@njit(cache=True)
def _forward_block(xa, xb, Ta, Tb, cols, L, dtB_row, nb, A, B4, h0, b, c0, gsB, C4, gsC,
                   h_last, seg_bytes):
    """The forward of the ``nb`` channels ``c0 + l`` of a block: ``cols[3, l, t] = C[t] . h[t]``,
    ``h_last[b, c0 + l] = h[L - 1]`` (``cols[0]``, ``cols[1]``, ``cols[dtB_row]``: ``u``,
    ``dt``, ``dtB``).

    When the tree is small (``Ta`` has one row), channel by channel
    :func:`_fill_and_scan` in ``xa, xb`` ``[L_pad + 1, N]``. Otherwise ``xa,
    xb`` hold one segment (``[S + 1, N]``) and ``Ta, Tb`` ``[cb, K + 1, N]``
    the segments' totals; no tree is stored, and each segment's rows of ``B``
    and ``C`` serve the block's channels one after the other while in cache
    (at ``seq_len`` 65536 they are 8 MiB each, read once per channel otherwise):

    1. each segment, each channel: elements and up-sweep (:func:`_segment_up`);
       its total (last row) to ``Ta, Tb``;
    2. each channel, the tree of its totals, up and down (:func:`_upsweep`,
       :func:`_downsweep`): ``Tb[l, k]`` is then segment ``k``'s prefix,
       ``Tb[l, K]`` the total;
    3. each segment, each channel again: the same elements and up-sweep, its
       down-sweep from its prefix (:func:`_segment_down`), ``y`` of its rows.

    Steps 1-2 are the whole tree's up-sweep and levels above the segments,
    step 3 its segments' down-sweeps: the same nodes and operations as
    :func:`_fill_and_scan`, so the same bits, for twice the elements and
    up-sweeps.
    """
    N = A.shape[1]
    K = Ta.shape[1] - 1
    if K == 0:
        for l in range(nb):
            _fill_and_scan(xa, xb, xa, False, cols[0, l, :L], cols[1, l, :L],
                           cols[dtB_row, l, :L], A, B4, h0, b, c0 + l, gsB, C4, gsC,
                           cols[3, l, :L], True, seg_bytes)
            for n in range(N):
                h_last[b, c0 + l, n] = xb[L, n]
        return
    S = xa.shape[0] - 1
    Cf, bf = C4.reshape(-1), xb.reshape(-1)
    for step in range(2):
        for k in range(K):
            lo = k * S
            for l in range(nb):
                c = c0 + l
                if lo >= L:              # all padding: the identity, exactly
                    if step == 0:
                        for n in range(N):
                            Ta[l, k, n] = 1.0
                            Tb[l, k, n] = 0.0
                    continue
                _segment_up(xa, xb, xa, False, cols, L, dtB_row, l, k, A, B4, h0, b, c, gsB)
                if step == 0:
                    for n in range(N):
                        Ta[l, k, n] = xa[S - 1, n]
                        Tb[l, k, n] = xb[S - 1, n]
                    continue
                _segment_down(xa, xb, Tb[l], k)
                oC0, sC = _bc_rows(C4, b, c, gsC, N)
                _read_out(Cf, oC0 + lo * sC, sC, bf, cols[3, l, lo:], 1, S + 1, L - lo, N)
                if L - lo <= S:
                    for n in range(N):
                        h_last[b, c, n] = xb[L - lo, n]
        if step == 0:
            for l in range(nb):
                _upsweep(Ta[l], Tb[l], K)
                _downsweep(Ta[l], Tb[l], K)


@njit(cache=True)
def _block_channels(itemsize):
    """Channels of a work item: 64 bytes of each input per time step, 8 in float64 and 16
    in float32 (with 8, a float32 block reads half of each cache line and the next block
    the other half, long after: at seq_len 65536 each line came from memory twice, and
    staging took twice as long). One line when the input is 64-byte aligned; NumPy's
    large arrays here start 16 bytes into a line, so a block's 64 bytes straddle two,
    which staged one W4 float32 input in 14.4 ms instead of 12.2 (single thread)."""
    return 64 // itemsize


@njit(cache=True)
def _column_length(L, itemsize):
    """Row length of the staged columns ``[rows, channels of a block, .]``: ``L`` and one
    64-byte line more, so that a block's 8 or 16 columns do not start on the same set of
    the L1 cache (which with ``L`` a multiple of 1024 they all would, 4 KiB apart, more
    streams than the cache's 8 ways: 16 float32 columns gathered 4x slower)."""
    return L + 64 // itemsize


@njit(cache=True)
def _gather_columns(x, b, c0, nb, out):
    """``out[l, t] = x[b, t, c0 + l]`` for ``l < nb``: a block's channels, time contiguous.

    The work items read their inputs along time; straight from ``[batch, L,
    channels]`` that is one cache line and one memory page per step for each
    channel. Read for a block of channels at once, each line and page serves
    ``nb`` of them. A full block is one straight run of 8 (float64) or 16
    (float32) loads per step, 64 bytes.
    """
    L, C = x.shape[1], x.shape[2]
    xf = x.reshape(-1)
    r = (b * L) * C + c0
    if nb == 8:
        o0, o1, o2, o3, o4, o5, o6, o7 = (out[0], out[1], out[2], out[3], out[4], out[5],
                                          out[6], out[7])
        for t in range(L):
            o0[t], o1[t], o2[t], o3[t] = xf[r], xf[r + 1], xf[r + 2], xf[r + 3]
            o4[t], o5[t], o6[t], o7[t] = xf[r + 4], xf[r + 5], xf[r + 6], xf[r + 7]
            r += C
        return
    if nb == 16:
        o0, o1, o2, o3, o4, o5, o6, o7 = (out[0], out[1], out[2], out[3], out[4], out[5],
                                          out[6], out[7])
        o8, o9, o10, o11, o12, o13, o14, o15 = (out[8], out[9], out[10], out[11], out[12],
                                                out[13], out[14], out[15])
        for t in range(L):
            o0[t], o1[t], o2[t], o3[t] = xf[r], xf[r + 1], xf[r + 2], xf[r + 3]
            o4[t], o5[t], o6[t], o7[t] = xf[r + 4], xf[r + 5], xf[r + 6], xf[r + 7]
            o8[t], o9[t], o10[t], o11[t] = xf[r + 8], xf[r + 9], xf[r + 10], xf[r + 11]
            o12[t], o13[t], o14[t], o15[t] = xf[r + 12], xf[r + 13], xf[r + 14], xf[r + 15]
            r += C
        return
    for t in range(L):
        for l in range(nb):
            out[l, t] = xf[r + l]
        r += C


@njit(cache=True)
def _scatter_columns(src, b, c0, nb, x):
    """``x[b, t, c0 + l] = src[l, t]`` for ``l < nb`` (the inverse of :func:`_gather_columns`)."""
    L, C = x.shape[1], x.shape[2]
    xf = x.reshape(-1)
    r = (b * L) * C + c0
    if nb == 8:
        s0, s1, s2, s3, s4, s5, s6, s7 = (src[0], src[1], src[2], src[3], src[4], src[5],
                                          src[6], src[7])
        for t in range(L):
            xf[r], xf[r + 1], xf[r + 2], xf[r + 3] = s0[t], s1[t], s2[t], s3[t]
            xf[r + 4], xf[r + 5], xf[r + 6], xf[r + 7] = s4[t], s5[t], s6[t], s7[t]
            r += C
        return
    if nb == 16:
        s0, s1, s2, s3, s4, s5, s6, s7 = (src[0], src[1], src[2], src[3], src[4], src[5],
                                          src[6], src[7])
        s8, s9, s10, s11, s12, s13, s14, s15 = (src[8], src[9], src[10], src[11], src[12],
                                                src[13], src[14], src[15])
        for t in range(L):
            xf[r], xf[r + 1], xf[r + 2], xf[r + 3] = s0[t], s1[t], s2[t], s3[t]
            xf[r + 4], xf[r + 5], xf[r + 6], xf[r + 7] = s4[t], s5[t], s6[t], s7[t]
            xf[r + 8], xf[r + 9], xf[r + 10], xf[r + 11] = s8[t], s9[t], s10[t], s11[t]
            xf[r + 12], xf[r + 13], xf[r + 14], xf[r + 15] = s12[t], s13[t], s14[t], s15[t]
            r += C
        return
    for t in range(L):
        for l in range(nb):
            xf[r + l] = src[l, t]
        r += C


@njit(cache=True)
def _local_range(t0, t1, Gf, Hf, abf, Af, Bf, dAf, dBf, dCf, dtc, dtBc, uc, dyc, c, oB0, sB,
                 oC0, sC, gtop, hbase, N):
    """The local gradient formulas of :func:`refssm.scan.numpy_seq.scan_core_backward`
    for the steps ``t0 <= t < t1`` of channel ``c``, in increasing ``t``.

    ``g[t]`` in row ``gtop - t`` of ``G``, ``h[t-1]`` in row ``t - hbase`` of ``H``
    and ``A_bar[t]`` in that of ``abar`` (flat ``[rows, N]`` buffers: the whole trees,
    ``gtop = L_pad`` and ``hbase = 0``, or segments of them); ``B[t]``, ``C[t]`` and their
    float64 accumulators at ``oB0 + t sB``, ``oC0 + t sC``. ``dtc, dtBc, uc`` receive
    ``d dt, d dtB, d u`` in place.
    """
    for t in range(t0, t1):
        # with g = G[gtop - t], Bv = B[t], elementwise over n:
        #   d_dtA = g H[t] abar[t]                      (dL/d(dt A))
        #   s_dt += d_dtA A[c];   dA[c] += d_dtA dt
        #   s_dtB += g Bv u;   s_u += g dtB Bv;   dB[t] += g dtB u
        #   dC[t] += dy H[t + 1]
        oB = oB0 + t * sB
        oC = oC0 + t * sC
        r = t - hbase
        s_dt, s_dtB, s_u = _local_gradients(
            Gf, (gtop - t) * N, Hf, r * N, (r + 1) * N, abf, r * N, Af, c * N, Bf, oB,
            dAf, c * N, dBf, oB, dCf, oC, dtc[t], dtBc[t], uc[t], dyc[t], N)
        dtc[t] = s_dt                       # d dt, d dtB, d u (in place)
        dtBc[t] = s_dtB
        uc[t] = s_u


#: Parallel partitions of the work items (fixed, not the thread count: the backward's
#: per-partition gradient sums, and so its results, depend on the shapes only).
N_PARTS = 8


def _partitions(batch, channels, itemsize):
    """How many parallel partitions to split the work items (``batch x`` blocks of
    :func:`_block_channels` channels) into: at most :data:`N_PARTS`."""
    work = batch * -(-channels // _block_channels(itemsize))
    return max(1, min(N_PARTS, work))


@njit(parallel=True, cache=True)
def _forward_kernel(u, dt, dtB, A, B4, C4, h0, y, h_last, P, bias, fl, z, D, tree_bytes,
                    seg_bytes):
    """Fill ``y`` ``[batch, L, channels]`` and ``h_last`` ``[batch, channels, N]``.

    Work items are blocks ``w = b * nblk + k`` of ``cb`` channels (:func:`_block_channels`);
    partition ``p`` of ``P`` takes ``[p W / P, (p+1) W / P)``. Per block: its
    ``u, dt, dtB`` are staged along time (:func:`_gather_columns`); its
    channels are discretised and scanned, and ``y[t] = C[t] . h[t]`` read out
    (:func:`_forward_block`: the tree stored when ``L_pad N itemsize <=
    tree_bytes``, else recomputed segment by segment); then the block's ``y``
    goes back (:func:`_scatter_columns`).

    ``fl = [raw?, softplus?, lo, hi, epilogue?, D?, z?]``: when ``raw``,
    ``dt`` holds the raw ``delta`` and each staged column becomes
    ``clip(softplus(delta + bias[c]))`` (``dtB`` is unused: it is ``dt``), the
    prologue of :func:`refssm.scan.numba_seq.prologue` with the same
    operations. When ``epilogue``, each ``y`` column becomes ``(y + D[c] u)
    silu(z)`` before it goes back (``y`` is then ``out``), as
    :func:`refssm.scan.numba_seq.epilogue` computes it.
    """
    batch, L, channels = u.shape
    N = A.shape[1]
    gsB = channels // B4.shape[2]
    gsC = channels // C4.shape[2]
    cb = _block_channels(u.itemsize)
    nblk = (channels + cb - 1) // cb
    W = batch * nblk
    S, K = _scan_rows(L, N, u.itemsize, tree_bytes, seg_bytes)
    for p in prange(P):
        xa = np.empty((S + 1, N), dtype=u.dtype)         # the tree, or one segment of it
        xb = np.empty((S + 1, N), dtype=u.dtype)
        Ta = np.empty((cb, K + 1, N), dtype=u.dtype)     # the segments' totals
        Tb = np.empty((cb, K + 1, N), dtype=u.dtype)
        # u, dt, dtB, y, z of a block
        cols = np.empty((5, cb, _column_length(L, u.itemsize)), dtype=u.dtype)
        for w in range((p * W) // P, ((p + 1) * W) // P):
            b = w // nblk
            c0 = (w - b * nblk) * cb
            nb = min(cb, channels - c0)
            _gather_columns(u, b, c0, nb, cols[0])
            _gather_columns(dt, b, c0, nb, cols[1])
            if fl[0] > 0:                                    # the prologue, column by column
                for l in range(nb):
                    _column_prologue(cols[1, l], 0, bias[c0 + l], fl[1], fl[2], fl[3], L)
            else:
                _gather_columns(dtB, b, c0, nb, cols[2])
            _forward_block(xa, xb, Ta, Tb, cols, L, 1 if fl[0] > 0 else 2, nb, A, B4, h0, b,
                           c0, gsB, C4, gsC, h_last, seg_bytes)
            if fl[4] > 0:                                    # the epilogue, column by column
                if fl[6] > 0:
                    _gather_columns(z, b, c0, nb, cols[4])
                for l in range(nb):
                    _column_epilogue(cols[3, l], 0, cols[0, l], 0, cols[4, l], 0, D[c0 + l],
                                     fl[5], fl[6], L)
            _scatter_columns(cols[3], b, c0, nb, y)


#: Above this many bytes per ``[L_pad, N]`` buffer, the backward does not store its four
#: trees (:func:`_backward_block`); its segments are then of :data:`BACKWARD_SEGMENT_BYTES`.
#: Measured at state 16, 128 channels, 2 threads: at seq_len 16384 (2 MiB trees in
#: float64) storing was 13-20% faster in both dtypes, at 32768 28% (float64) and 18%
#: (float32) slower; at 65536 (W4) not storing took the float64 backward from 1754 to
#: 1180 ms and float32's from 895 to 760 (16 KiB segments).
BACKWARD_TREE_BYTES = 1 << 21
#: The backward keeps five segments. At W4 (2 threads), 8 to 128 KiB measured within the
#: run-to-run noise (~10%); 64 KiB was never slower than 16 KiB in either dtype.
BACKWARD_SEGMENT_BYTES = 1 << 16


@njit(cache=True)
def _gate_backward(cols, l, c, D, fl, lo, hi):
    """The gate's backward for channel ``c = c0 + l`` of a block, steps ``[lo, hi)``:
    ``cols[3, l]`` (``d out``) becomes the core's ``dy``, ``cols[5, l]`` (the core's
    ``y``) becomes ``dz`` (numba_seq's ``epilogue_backward``, elementwise)."""
    _column_gate_backward(cols[3, l], lo, cols[5, l], lo, cols[0, l], lo, cols[4, l], lo, D[c],
                          fl[1], fl[2], hi - lo)


@njit(cache=True)
def _backward_channel(abar, H, xa, G, cols, L, l, A, B4, C4, h0, dh_last, b, c0, gsB, gsC,
                      dA, dB, dC, dh0, gate, D, fl, raw, dD_rows, seg_bytes):
    """The backward of channel ``c = c0 + l`` of a block, with its four trees stored
    (``[L_pad + 1, N]`` each):

    1. the forward scan again: ``H[t] = h[t-1]`` (``H[0] = h0``), ``abar[t] = A_bar[t]``;
       with the ``gate``, also ``y = C . h`` and the gate's backward
       (:func:`_gate_backward`; with ``raw``, ``dD_rows[b, c] = sum_t dy u``);
    2. the adjoint scan in reversed time, ``G[L_pad - t] = g[t]``;
    3. the local gradient formulas (:func:`_local_range`), a segment at a time right
       after the adjoint's down-sweep of that segment.
    """
    N = A.shape[1]
    Lp = padded_length(L)
    channels = A.shape[0]
    c = c0 + l
    uc, dtc, dtBc, dyc = cols[0, l, :L], cols[1, l, :L], cols[2, l, :L], cols[3, l, :L]
    Gf, Hf, abf, xaf = G.reshape(-1), H.reshape(-1), abar.reshape(-1), xa.reshape(-1)
    Af, Bf, C4f, dhf = A.reshape(-1), B4.reshape(-1), C4.reshape(-1), dh_last.reshape(-1)
    oB0, sB = _bc_rows(B4, b, c, gsB, N)
    oC0, sC = _bc_rows(C4, b, c, gsC, N)
    # 1. recompute the forward states with the log-depth scan
    _fill_and_scan(xa, H, abar, True, uc, dtc, dtBc, A, B4, h0, b, c, gsB, C4, gsC,
                   cols[5, l, :L], gate, seg_bytes)   # with the gate, y[t] = C[t] . h[t]
    if gate:
        _gate_backward(cols, l, c, D, fl, 0, L)
        if raw:
            dD_rows[b, c] = _dot(dyc, 0, uc, 0, L)
    for n in range(N):
        H[0, n] = h0[b, c, n]        # was the identity (b = 0): now H[t] = h[t-1] for all t
    grad_args = (Gf, Hf, abf, Af, Bf, dA.reshape(-1), dB.reshape(-1), dC.reshape(-1), dtc,
                 dtBc, uc, dyc, c, oB0, sB, oC0, sC, Lp, 0, N)
    # 2. the adjoint: reversed time s = L_pad-1-t, element s = (a[t+1], C[t] dy[t]), with
    #    dh_last folded into that of t = L-1 (whose a is never used: set to 1), the
    #    identity before it (s < L_pad - L)
    odh = (b * channels + c) * N
    if Lp >= 8:          # segment by segment: the elements and the up-sweep (as forward)
        S = _segment_rows(Lp, N, xa.itemsize, seg_bytes)
        for lo in range(0, Lp, S):
            _adjoint_first3(abf, 0, C4f, oC0, sC, dyc, dhf, odh, xaf, Gf, L, Lp, lo, lo + S,
                            0, N)
            _upsweep_rows(xaf, Gf, 8, lo, lo + S, N)
        _sweeps_above(xa, G, Lp, S)
        # 3. t = 0 (row L_pad, the total), then each segment's down-sweep, from the
        #    last, and the local gradients of its rows r (t = L_pad - r) while they are
        #    in cache: t ascending overall
        _local_range(0, 1, *grad_args)
        for lo in range(Lp - S, -1, -S):
            _downsweep_segment(xaf, Gf, lo, S, N)
            _local_range(Lp - lo - S + 1, min(Lp - lo + 1, L), *grad_args)
    else:
        for s in range(Lp):
            t = Lp - 1 - s
            for n in range(N):
                xa[s, n] = 1.0
                G[s, n] = 0.0
            if t < L:
                oC = oC0 + t * sC
                dyv = dyc[t]
                for n in range(N):
                    G[s, n] = C4f[oC + n] * dyv
                    if t < L - 1:
                        xa[s, n] = abar[t + 1, n]
                    else:
                        G[s, n] += dh_last[b, c, n]
        _upsweep(xa, G, Lp)
        _downsweep(xa, G, Lp)
        _local_range(0, L, *grad_args)     # 3. the local gradients
    for n in range(N):
        dh0[b, c, n] = abar[0, n] * G[Lp, n]


@njit(cache=True)
def _backward_block(F, Gs, Tf, Tg, Afirst, ybuf, cols, L, nb, A, B4, C4, h0, dh_last, b, c0,
                    gsB, gsC, dA, dB, dC, dh0, gate, D, fl, raw, dD_rows):
    """The backward of the ``nb`` channels ``c0 + l`` of a block without stored trees:
    what :func:`_backward_channel` computes, to the bit, from segments of ``S`` rows.

    ``F`` ``[3, S + 1, N]`` holds one segment of the forward tree (scratch ``a``,
    ``H``, ``abar``), ``Gs`` ``[2, S + 1, N]`` one of the adjoint's (scratch ``a``,
    ``G``); ``Tf``, ``Tg`` ``[2, cb, K + 1, N]`` the segments' totals. The adjoint's
    rows are ``s = L_pad - 1 - t``, so its segment ``K - 1 - k`` holds the steps of
    the forward's segment ``k``; its elements need ``A_bar[t + 1]``: the forward
    segment's rows 1 .. S and the next segment's row 0, kept in ``Afirst[l, k + 1]``
    (``[cb, K + 1, N]``). With the ``gate``, ``cols[3]`` holds ``d out``: the core's
    ``dy = d_out silu(z)`` goes to ``cols[5]`` (it needs no ``y``) and ``dz`` to
    ``cols[3]``.

    1. Segments ``k`` from the last, each channel: the forward segment's elements and
       up-sweep (its total to ``Tf[:, l, k]``), the ``dy`` of its steps, then the
       adjoint segment's elements and up-sweep (its total to ``Tg[:, l, K - 1 - k]``).
       Then each channel's trees of these totals: ``Tf[1, l, k]``, ``Tg[1, l, j]``
       become the segments' prefixes. With ``raw``, ``dD_rows[b, c] = sum_t dy u``.
    2. Segments ``k`` in order, each channel: the forward segment again, down from its
       prefix (``H`` rows; with the gate, ``y = C . h`` of its steps and then their
       ``dz``), the adjoint segment again, down from its prefix, then the local
       gradients of the segment's steps (:func:`_local_range`).

    Every node of both trees is computed by the same operations as in the stored
    trees, and every gradient is summed in the same order (``t`` ascending; for
    each ``t``, channel by channel), so the results are the same bits. The block's
    channels go side by side per segment: each segment's rows of ``B``, ``C`` and
    of their float64 gradient sums serve all of them while in cache (at ``seq_len``
    65536 they are 8 MiB each), and no tree streams through memory.
    """
    N = A.shape[1]
    channels = A.shape[0]
    S = F.shape[1] - 1
    K = Tf.shape[2] - 1
    Lp = S * K
    dyr = 5 if gate else 3
    Cf, dhf = C4.reshape(-1), dh_last.reshape(-1)
    fh, fab = F[1].reshape(-1), F[2].reshape(-1)
    ga, gb = Gs[0].reshape(-1), Gs[1].reshape(-1)

    def adjoint_up(l, k):
        # the adjoint segment of the forward's segment k (steps kS .. kS + S - 1; F holds
        # its A_bar) for channel l: elements and up-sweep into Gs
        c = c0 + l
        oC0, sC = _bc_rows(C4, b, c, gsC, N)
        for n in range(N):
            F[2, S, n] = Afirst[l, k + 1, n]         # A_bar[kS + S]
        lo = Lp - (k + 1) * S
        _adjoint_first3(fab, k * S, Cf, oC0, sC, cols[dyr, l], dhf, (b * channels + c) * N,
                        ga, gb, L, Lp, lo, lo + S, lo, N)
        _upsweep_rows(ga, gb, 8, 0, S, N)

    # 1. segments from the last: both trees' segment totals (and dy)
    for k in range(K - 1, -1, -1):
        lo = k * S
        j = K - 1 - k
        for l in range(nb):
            if lo >= L:                  # all padding: the identity, exactly
                for n in range(N):
                    Tf[0, l, k, n] = Tg[0, l, j, n] = 1.0
                    Tf[1, l, k, n] = Tg[1, l, j, n] = 0.0
                continue
            _segment_up(F[0], F[1], F[2], True, cols, L, 2, l, k, A, B4, h0, b, c0 + l, gsB)
            for n in range(N):
                Tf[0, l, k, n] = F[0, S - 1, n]
                Tf[1, l, k, n] = F[1, S - 1, n]
                Afirst[l, k, n] = F[2, 0, n]
            if gate:                     # dy = d_out silu(z) of the segment's steps
                _column_gate_dy(cols[3, l], lo, cols[5, l], lo, cols[4, l], lo, fl[2],
                                min(S, L - lo))
            adjoint_up(l, k)
            for n in range(N):
                Tg[0, l, j, n] = Gs[0, S - 1, n]
                Tg[1, l, j, n] = Gs[1, S - 1, n]
    for l in range(nb):
        for T in (Tf, Tg):
            _upsweep(T[0, l], T[1, l], K)
            _downsweep(T[0, l], T[1, l], K)
        if raw:
            dD_rows[b, c0 + l] = _dot(cols[dyr, l], 0, cols[0, l], 0, L)
    # 2. segments in order: dz and the local gradients of their steps
    Af, Bf = A.reshape(-1), B4.reshape(-1)
    dAf, dBf, dCf = dA.reshape(-1), dB.reshape(-1), dC.reshape(-1)
    for k in range(K):
        lo = k * S
        if lo >= L:
            break
        j = K - 1 - k
        n_t = min(S, L - lo)
        for l in range(nb):
            c = c0 + l
            oB0, sB = _bc_rows(B4, b, c, gsB, N)
            oC0, sC = _bc_rows(C4, b, c, gsC, N)
            _segment_up(F[0], F[1], F[2], True, cols, L, 2, l, k, A, B4, h0, b, c, gsB)
            _segment_down(F[0], F[1], Tf[1, l], k)      # F[1, r] = h[kS + r - 1]
            if gate:                     # y = C . h, then dz (over d_out in cols[3])
                _read_out(Cf, oC0 + lo * sC, sC, fh, ybuf, 1, S + 1, n_t, N)
                _column_gate_dz(cols[3, l], lo, ybuf, 0, cols[0, l], lo, cols[4, l], lo, D[c],
                                fl[1], n_t)
            if k == 0:
                for n in range(N):
                    F[1, 0, n] = h0[b, c, n]         # H[0] = h0 (was the identity)
            adjoint_up(l, k)
            _segment_down(Gs[0], Gs[1], Tg[1, l], j)
            _local_range(lo, lo + n_t, gb, fh, fab, Af, Bf, dAf, dBf, dCf, cols[1, l],
                         cols[2, l], cols[0, l], cols[dyr, l], c, oB0, sB, oC0, sC, lo + S, lo,
                         N)
            if k == 0:                   # dh0 = A_bar[0] g[0]
                for n in range(N):
                    dh0[b, c, n] = F[2, 0, n] * Gs[1, S, n]


@njit(cache=True)
def _segment_up(xa, xb, ab, keep, cols, L, dtB_row, l, k, A, B4, h0, b, c, gsB):
    """Segment ``k`` of channel ``c = c0 + l``'s forward tree into ``xa, xb`` ``[S + 1,
    N]``: its elements (``h0`` folded into segment 0; with ``keep``, ``A_bar`` also
    into ``ab``) and its own up-sweep, its total in row ``S - 1`` (the no-store paths,
    :func:`_forward_block` and :func:`_backward_block`; ``cols[0]``, ``cols[1]``,
    ``cols[dtB_row]``: ``u``, ``dt``, ``dtB`` of ``L`` steps)."""
    N = A.shape[1]
    S = xa.shape[0] - 1
    lo = k * S
    oB0, sB = _bc_rows(B4, b, c, gsB, N)
    af, bf = xa.reshape(-1), xb.reshape(-1)
    fold = 1 if k == 0 else 0
    if keep:
        _fill_first3_keep(A.reshape(-1), c * N, B4.reshape(-1), oB0 + lo * sB, sB,
                          cols[1, l, lo:], cols[dtB_row, l, lo:], cols[0, l, lo:],
                          h0.reshape(-1), (b * A.shape[0] + c) * N, af, bf, ab.reshape(-1),
                          L - lo, 0, S, N, fold)
    else:
        _fill_first3(A.reshape(-1), c * N, B4.reshape(-1), oB0 + lo * sB, sB,
                     cols[1, l, lo:], cols[dtB_row, l, lo:], cols[0, l, lo:], h0.reshape(-1),
                     (b * A.shape[0] + c) * N, af, bf, af, L - lo, 0, S, N, fold)
    _upsweep_rows(af, bf, 8, 0, S, N)


@njit(cache=True)
def _segment_down(xa, xb, Tb, k):
    """Segment ``k``'s down-sweep in ``xa, xb`` ``[S + 1, N]`` (after :func:`_segment_up`),
    from the prefixes in ``Tb`` ``[K + 1, N]`` (the tree of the segments' totals, swept):
    row ``S - 1`` takes segment ``k``'s prefix, row ``S`` the next one's (the state at the
    segment's last row); then row ``r`` holds the prefix of the segment's row ``r - 1``."""
    S = xa.shape[0] - 1
    N = xa.shape[1]
    for n in range(N):
        xb[S - 1, n] = Tb[k, n]
        xb[S, n] = Tb[k + 1, n]
    _downsweep_segment(xa.reshape(-1), xb.reshape(-1), 0, S, N)


@njit(parallel=True, cache=True)
def _backward_kernel(dy, dh_last, u, dt, dtB, A, B4, C4, h0,
                     du, ddt, ddtB, dh0, dA_p, dB_p, dC_p, P, fl, z, D, dy_out, dz, bias,
                     dD_rows, db_rows, tree_bytes, seg_bytes, bseg_bytes):
    """Fill ``du, ddt, ddtB`` ``[batch, L, channels]``, ``dh0`` ``[batch, channels, N]``
    and partition ``p``'s slices of the accumulators ``dA_p`` ``[P, channels, N]``,
    ``dB_p`` ``[P, *B4.shape]``, ``dC_p`` ``[P, *C4.shape]`` (float64, zeroed).

    Per work item (a block of ``cb`` channels, staged as in the forward):
    when ``L_pad N itemsize <= tree_bytes``, channel by channel with its four
    trees stored (:func:`_backward_channel`); otherwise without stored trees,
    the block's channels side by side, segment by segment
    (:func:`_backward_block`). The same bits either way.

    ``fl = [gate?, D?, z?, raw?, softplus?, lo, hi]``: with ``gate``, ``dy``
    holds ``d out`` of :func:`fused_forward`'s epilogue and step (1) also
    gives ``y = C . h``, from which the gate's backward (numba_seq's
    ``epilogue_backward``) makes the core's ``dy``, written to ``dy_out``,
    and ``dz`` (when ``z?``). With ``raw`` too, ``dt`` holds the raw
    ``delta``: each column's ``dt = dtB`` is made by the prologue (as in the
    forward), and the kernel finishes the gradients itself (numba_seq's
    ``finish_backward`` per column): ``du`` gets ``dy D``, ``ddt`` receives
    ``d delta``, and ``dD_rows`` / ``db_rows`` ``[batch, channels]`` the sums
    over time of ``dy u`` and ``d delta``; ``dy_out`` and ``ddtB`` are unused.
    """
    batch, L, channels = u.shape
    N = A.shape[1]
    gsB = channels // B4.shape[2]
    gsC = channels // C4.shape[2]
    cb = _block_channels(u.itemsize)
    nblk = (channels + cb - 1) // cb
    W = batch * nblk
    S, K = _scan_rows(L, N, u.itemsize, tree_bytes, bseg_bytes)
    R = S + 1 if K == 0 else 1           # the stored trees' rows (none without them)
    gate = fl[0] > 0
    raw = gate and fl[3] > 0
    for p in prange(P):
        abar = np.empty((R, N), dtype=u.dtype)        # a[t] (kept: the scan overwrites xa)
        H = np.empty((R, N), dtype=u.dtype)           # H[t] = h[t-1], H[t+1] = h[t]
        xa = np.empty((R, N), dtype=u.dtype)          # scan scratch (a half)
        G = np.empty((R, N), dtype=u.dtype)           # G[L_pad - t] = g[t] = dL/dh[t]
        # without stored trees: a segment of each tree per channel, the segments' totals
        F = np.empty((3, S + 1 if K else 0, N), dtype=u.dtype)
        Gs = np.empty((2, S + 1 if K else 0, N), dtype=u.dtype)
        Tf = np.empty((2, cb, K + 1, N), dtype=u.dtype)
        Tg = np.empty((2, cb, K + 1, N), dtype=u.dtype)
        Afirst = np.empty((cb, K + 1, N), dtype=u.dtype)
        ybuf = np.empty(S if K else 0, dtype=u.dtype)   # y of a segment's steps
        # a block's u, dt, dtB, dy along time; the gradients du, ddt, ddtB of a
        # channel replace its u, dt, dtB once read
        # ... and z, y (then dz) for the gate, and the raw delta
        cols = np.empty((7, cb, _column_length(L, u.itemsize)), dtype=u.dtype)
        for w in range((p * W) // P, ((p + 1) * W) // P):
            b = w // nblk
            c0 = (w - b * nblk) * cb
            nb = min(cb, channels - c0)
            _gather_columns(u, b, c0, nb, cols[0])
            if raw:
                _gather_columns(dt, b, c0, nb, cols[6])
                for l in range(nb):  # dt = dtB = clip(softplus(delta + bias)), as the forward
                    cols[1, l] = cols[6, l]
                    _column_prologue(cols[1, l], 0, bias[c0 + l], fl[4], fl[5], fl[6], L)
                    cols[2, l] = cols[1, l]
            else:
                _gather_columns(dt, b, c0, nb, cols[1])
                _gather_columns(dtB, b, c0, nb, cols[2])
            _gather_columns(dy, b, c0, nb, cols[3])
            if gate and fl[2] > 0:
                _gather_columns(z, b, c0, nb, cols[4])
            if K == 0:
                for l in range(nb):
                    _backward_channel(abar, H, xa, G, cols, L, l, A, B4, C4, h0, dh_last, b, c0,
                                      gsB, gsC, dA_p[p], dB_p[p], dC_p[p], dh0, gate, D, fl,
                                      raw, dD_rows, seg_bytes)
            else:
                _backward_block(F, Gs, Tf, Tg, Afirst, ybuf, cols, L, nb, A, B4, C4, h0,
                                dh_last, b, c0, gsB, gsC, dA_p[p], dB_p[p], dC_p[p], dh0, gate,
                                D, fl, raw, dD_rows)
            dyr = 5 if gate and K > 0 else 3     # the core's dy (and dz in the other one)
            if raw:              # d delta into dtc, du += dy D (and sum_t d delta)
                for l in range(nb):
                    c = c0 + l
                    db_rows[b, c] = _column_finish(cols[1, l], 0, cols[2, l], 0, cols[6, l], 0,
                                                   cols[0, l], 0, cols[dyr, l], 0, bias[c],
                                                   fl[4], fl[5], fl[6], D[c], fl[1], L)
            if gate:
                if not raw:
                    _scatter_columns(cols[dyr], b, c0, nb, dy_out)
                if fl[2] > 0:
                    _scatter_columns(cols[8 - dyr], b, c0, nb, dz)
            _scatter_columns(cols[0], b, c0, nb, du)
            _scatter_columns(cols[1], b, c0, nb, ddt)
            if not raw:
                _scatter_columns(cols[2], b, c0, nb, ddtB)


# --------------------------------------------------------------------------
# Public core API (same as numpy_seq)
# --------------------------------------------------------------------------

def _check_layout(u, dt, dtB, A, B4, C4, h0):
    """Raise ``ValueError`` on shapes the kernels would index out of bounds.

    The public API has validated already; this guards direct calls of the core
    (Numba does not bounds-check).
    """
    if u.ndim != 3 or dt.shape != u.shape or dtB.shape != u.shape:
        raise ValueError(f"u, dt, dtB: expected one shape [batch, seq_len, channels], got "
                         f"{u.shape}, {dt.shape}, {dtB.shape}")
    batch, seq_len, channels = u.shape
    if min(u.shape) < 1 or A.ndim != 2 or A.shape[0] != channels or A.shape[1] < 1:
        raise ValueError(f"A: expected [channels={channels}, state >= 1] with a non-empty u, "
                         f"got A {A.shape}, u {u.shape}")
    state = A.shape[1]
    for name, M in (("B4", B4), ("C4", C4)):
        if (M.ndim != 4 or M.shape[0] not in (1, batch) or M.shape[1] not in (1, seq_len)
                or M.shape[2] < 1 or channels % M.shape[2] != 0 or M.shape[3] != state):
            raise ValueError(f"{name}: expected [1 or {batch}, 1 or {seq_len}, G dividing "
                             f"{channels}, {state}], got {M.shape}")
    if h0.shape != (batch, channels, state):
        raise ValueError(f"h0: expected {(batch, channels, state)}, got {h0.shape}")


def scan_core_forward(u, dt, dtB, A, B4, C4, h0):
    """Selective scan core by a log-depth (Blelloch) scan over time.

    Parameters and returns as :func:`refssm.scan.numpy_seq.scan_core_forward`:
    ``u, dt, dtB`` ``[batch, seq_len, channels]``, ``A`` ``[channels, state]``,
    ``B4, C4`` ``[bB, LB, G, state]``, ``h0`` ``[batch, channels, state]``,
    all of one dtype (float32 or float64).

    Returns
    -------
    y : ndarray ``[batch, seq_len, channels]``
        ``y[t] = C[t] . h[t]``.
    h_last : ndarray ``[batch, channels, state]``
    saved : LogDepthSaved
        The inputs; no states.

    Examples
    --------
    >>> u = np.ones((1, 3, 1)); dt = np.full((1, 3, 1), 0.5)
    >>> A = -np.ones((1, 1)); B4 = np.ones((1, 1, 1, 1)); C4 = np.ones((1, 1, 1, 1))
    >>> y, h, _ = scan_core_forward(u, dt, dt, A, B4, C4, np.zeros((1, 1, 1)))
    >>> np.round(y[0, :, 0], 4)
    array([0.5   , 0.8033, 0.9872])
    """
    u = np.ascontiguousarray(u)
    dt, dtB, A, B4, C4, h0 = (np.ascontiguousarray(x, dtype=u.dtype)
                              for x in (dt, dtB, A, B4, C4, h0))
    _check_layout(u, dt, dtB, A, B4, C4, h0)
    batch, _, channels = u.shape
    y = np.empty_like(u)
    h_last = np.empty((batch, channels, A.shape[1]), dtype=u.dtype)
    _forward_kernel(u, dt, dtB, A, B4, C4, h0, y, h_last,
                    _partitions(batch, channels, u.itemsize), A[:, 0], np.zeros(7, u.dtype), u,
                    A[:, 0], TREE_BYTES, SEGMENT_BYTES)
    return y, h_last, LogDepthSaved(u, dt, dtB, A, B4, C4, h0)


def fused_forward(u, delta, delta_bias, delta_softplus, delta_clip, A, B4, C4, h0, D, z,
                  dt=None, dtB=None):
    """The scan with its prologue and epilogue applied to each work item's staged columns.

    ``out = (y + D u) silu(z)`` with ``y`` the core of :func:`scan_core_forward`
    of ``dt = clip(softplus(delta + delta_bias))`` (each part optional), as
    the passes :func:`refssm.scan.numba_seq.prologue` / ``epilogue`` compute
    it (same operations, same bits), without storing ``dt`` or ``y``. For
    ``delta_b_mean``, whose channel mean needs every channel of a step, pass
    ``dt`` and ``dtB`` from ``prologue`` instead.

    Parameters
    ----------
    u, delta : ndarray ``[batch, seq_len, channels]``
    delta_bias, D : ndarray ``[channels]`` or None
    delta_softplus : bool
    delta_clip : (float, float) or None
    A, B4, C4, h0 : as :func:`scan_core_forward`
    z : ndarray ``[batch, seq_len, channels]`` or None
    dt, dtB : ndarray ``[batch, seq_len, channels]``, optional

    Returns
    -------
    out : ndarray ``[batch, seq_len, channels]``
    h_last : ndarray ``[batch, channels, state]``
    saved : LogDepthSaved
        Its ``dt``, ``dtB`` are None unless given: :func:`fused_backward`
        needs them (e.g. from ``prologue``).
    """
    u = np.ascontiguousarray(u)
    delta, A, B4, C4, h0 = (np.ascontiguousarray(x, dtype=u.dtype)
                            for x in (delta, A, B4, C4, h0))
    raw = dt is None
    if raw:
        dt = dtB = delta
    dt, dtB = (np.ascontiguousarray(x, dtype=u.dtype) for x in (dt, dtB))
    _check_layout(u, dt, dtB, A, B4, C4, h0)
    batch, _, channels = u.shape
    zero = np.zeros(channels, u.dtype)
    bias = zero if delta_bias is None else np.ascontiguousarray(delta_bias, dtype=u.dtype)
    lo, hi = delta_clip if delta_clip is not None else (-np.inf, np.inf)
    fl = np.array([raw, bool(delta_softplus), lo, hi, True, D is not None, z is not None],
                  dtype=u.dtype)
    out = np.empty_like(u)
    h_last = np.empty((batch, channels, A.shape[1]), dtype=u.dtype)
    _forward_kernel(u, dt, dtB, A, B4, C4, h0, out, h_last,
                    _partitions(batch, channels, u.itemsize), bias, fl,
                    u if z is None else np.ascontiguousarray(z, dtype=u.dtype),
                    zero if D is None else np.ascontiguousarray(D, dtype=u.dtype), TREE_BYTES,
                    SEGMENT_BYTES)
    saved = LogDepthSaved(u, None if raw else dt, None if raw else dtB, A, B4, C4, h0)
    return out, h_last, saved


def scan_core_backward(dy, dh_last, saved: LogDepthSaved):
    """Manual backward of :func:`scan_core_forward`: a reverse-time log-depth scan.

    Formulas of :func:`refssm.scan.numpy_seq.scan_core_backward`; the states
    are recomputed by a forward scan per work item, the adjoint ``g`` by a
    scan over reversed time (see the module docstring).

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, channels]``
    dh_last : ndarray ``[batch, channels, state]`` or None
    saved : LogDepthSaved

    Returns
    -------
    dict
        ``u, dt, dtB`` ``[batch, seq_len, channels]``; ``A`` ``[channels, state]``;
        ``B4, C4`` ``[bB, LB, G, state]``; ``h0`` ``[batch, channels, state]``.
    """
    u, dt, dtB, A, B4, C4, h0 = saved
    dtype = u.dtype
    dy = np.ascontiguousarray(dy, dtype=dtype)
    dh_last = _dh_last(dh_last, h0)
    if dy.shape != u.shape or dh_last.shape != h0.shape:
        raise ValueError(f"dy, dh_last: expected {u.shape} and {h0.shape}, got {dy.shape} "
                         f"and {dh_last.shape}")
    ddtB = np.empty_like(u)
    du, ddt, g = _run_backward(dy, dh_last, u, dt, dtB, A, B4, C4, h0, np.zeros(7, dtype),
                               u, A[:, 0], A[:, 0], ddtB, None, None)
    del g["dD_rows"], g["db_rows"]
    g.update(u=du, dt=ddt, dtB=ddtB)
    return g


def _dh_last(dh_last, h0):
    """``dh_last`` in ``h0``'s dtype, C-contiguous; zeros when None."""
    return np.zeros_like(h0) if dh_last is None else np.ascontiguousarray(dh_last, h0.dtype)


def _run_backward(dy, dh_last, u, dt, dtB, A, B4, C4, h0, fl, z, D, bias, ddtB, dy_out, dz):
    """:func:`_backward_kernel` with the rest of its outputs allocated, and its
    per-partition sums added up.

    Returns ``du``, ``ddt`` and a dict with ``A``, ``B4``, ``C4`` (summed
    over the partitions: private float64 accumulators, even for float32
    inputs, since they are sums of up to ``batch x seq_len x channels``
    terms), ``h0`` and the rows ``dD_rows``, ``db_rows`` ``[batch,
    channels]`` of the fused backward's finish (zeros otherwise). The outputs
    ``ddtB``, ``dy_out``, ``dz`` that ``fl`` leaves unwritten may be None.
    """
    batch, _, channels = u.shape
    P = _partitions(batch, channels, u.itemsize)
    du = np.empty_like(u)
    ddtB, dy_out, dz = (du if x is None else x for x in (ddtB, dy_out, dz))   # placeholders
    ddt = np.empty_like(u)
    dh0 = np.empty_like(h0)
    dA_p = np.zeros((P,) + A.shape)
    dB_p = np.zeros((P,) + B4.shape)
    dC_p = np.zeros((P,) + C4.shape)
    dD_rows = np.zeros((batch, channels), u.dtype)
    db_rows = np.zeros((batch, channels), u.dtype)
    _backward_kernel(dy, dh_last, u, dt, dtB, A, B4, C4, h0, du, ddt, ddtB, dh0, dA_p, dB_p,
                     dC_p, P, fl, z, D, dy_out, dz, bias, dD_rows, db_rows, BACKWARD_TREE_BYTES,
                     SEGMENT_BYTES, BACKWARD_SEGMENT_BYTES)
    dtype = u.dtype
    return du, ddt, {"A": dA_p.sum(axis=0).astype(dtype), "B4": dB_p.sum(axis=0).astype(dtype),
                     "C4": dC_p.sum(axis=0).astype(dtype), "h0": dh0, "dD_rows": dD_rows,
                     "db_rows": db_rows}


def fused_backward(d_out, dh_last, saved: LogDepthSaved, D, z, delta=None, delta_bias=None,
                   delta_softplus=False, delta_clip=None):
    """Backward of :func:`fused_forward`: the scan, the gate and (given ``delta``) the prologue.

    :func:`scan_core_backward` whose ``dy`` is made inside the kernel: each
    work item's recomputed states give ``y = C . h``, and the gate's backward
    (that of :func:`refssm.scan.numba_seq.epilogue_backward`, same
    operations) gives ``dy`` and ``dz`` from ``d_out``.

    With ``delta`` (and ``delta_bias``, ``delta_softplus``, ``delta_clip``;
    not for ``delta_b_mean``), ``dt`` is recomputed on the staged columns and
    the gradients are finished there too, as
    :func:`refssm.scan.numba_seq.finish_backward` would: the result has
    ``u``, ``delta``, ``D``, ``delta_bias`` (each final; ``D`` and
    ``delta_bias`` summed over batch and time) besides ``A``, ``B4``,
    ``C4``, ``h0`` and ``dz``. Without ``delta``, ``saved`` must hold ``dt``
    and ``dtB``, and the result is :func:`scan_core_backward`'s plus ``dy``
    (the core's ``dy``) and ``dz`` (None without a gate).
    """
    u, dt, dtB, A, B4, C4, h0 = saved
    raw = delta is not None
    if raw:
        dt = dtB = np.ascontiguousarray(delta, dtype=u.dtype)
    elif dt is None or dtB is None:
        raise ValueError("fused_backward: pass delta, or saved values with dt and dtB")
    dtype = u.dtype
    d_out = np.ascontiguousarray(d_out, dtype=dtype)
    dh_last = _dh_last(dh_last, h0)
    if d_out.shape != u.shape or dh_last.shape != h0.shape or dt.shape != u.shape:
        raise ValueError(f"d_out, dh_last, delta: expected {u.shape}, {h0.shape} and "
                         f"{u.shape}, got {d_out.shape}, {dh_last.shape} and {dt.shape}")
    ddtB = None if raw else np.empty_like(u)       # None: not written (see _run_backward)
    dy = None if raw else np.empty_like(u)
    dz = np.empty_like(u) if z is not None else None
    zero = np.zeros(u.shape[2], dtype)
    lo, hi = delta_clip if delta_clip is not None else (-np.inf, np.inf)
    fl = np.array([1.0, D is not None, z is not None, raw, bool(delta_softplus), lo, hi],
                  dtype=dtype)
    du, ddt, g = _run_backward(
        d_out, dh_last, u, dt, dtB, A, B4, C4, h0, fl,
        u if z is None else np.ascontiguousarray(z, dtype=dtype),
        zero if D is None else np.ascontiguousarray(D, dtype=dtype),
        zero if delta_bias is None else np.ascontiguousarray(delta_bias, dtype=dtype),
        ddtB, dy, dz)
    dD_rows, db_rows = g.pop("dD_rows"), g.pop("db_rows")
    g["dz"] = dz
    if raw:
        g.update(u=du, delta=ddt, D=dD_rows.sum(axis=0), delta_bias=db_rows.sum(axis=0))
    else:
        g.update(u=du, dt=ddt, dtB=ddtB, dy=dy)
    return g


