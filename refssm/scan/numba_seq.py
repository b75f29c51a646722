"""The Numba fused sequential engine: the selective scan without big intermediates.

Same core and same signatures as :mod:`refssm.scan.numpy_seq` (read its module
and function docstrings for the math and the ``[bB, LB, G, N]`` layout of
``B``/``C``)::

    A_bar[t, n] = exp(dt[t] * A[n])
    h[t, n]     = A_bar[t, n] * h[t-1, n] + (dtB[t] * u[t]) * B[t, g(c), n]
    y[t]        = sum_n C[t, g(c), n] * h[t, n]

What differs is *how*:

* **Fused.** No array of size ``batch * seq_len * channels * state`` is ever
  allocated: ``A_bar = fexp(dt * A)`` and ``(dtB * u) * B`` are computed on
  the fly, step by step, from a state held in a small local array.
* **Prologue and epilogue fused too** (:func:`fused_forward`, used by
  ``selective_scan_forward(engine="numba")``): ``dt = clip(softplus(delta +
  delta_bias))``, the channel mean for ``dtB`` and ``out = (y + D u) silu(z)``
  are computed on the staged rows (vector code: :func:`refssm.scan._fastexp.
  build_softplus` / ``build_sigmoid``), and the backward recomputes them, and
  ``y = C . h``, chunk by chunk. :func:`scan_core_forward` is the same kernel
  with an identity prologue and no epilogue (the NumPy engine's contract).
* **Memory access.** ``[batch, L, channels]`` rows of one channel block lie
  ``channels`` elements apart, a new page almost every step, which the
  hardware prefetchers do not follow. So time goes in chunks of ``CHUNK``
  (64) steps: the chunk's ``dt``, ``dtB``, ``u`` (and ``dy``) of the block are
  copied into small local buffers in one burst (software-prefetched one chunk
  ahead), the channels run from there, and the outputs go back the same way.
* **Channels in vector lanes.** One ``prange`` item per batch row and
  block of :data:`LANES` (16) consecutive channels (flattened, so batch 1
  still uses every thread); the block's channels are the lanes of the IR
  vectors of ``_lane_step``, which runs one time step of the block: all
  ``N * 16`` values of ``A_bar`` first, as vectors of 512 bytes, then the
  recurrence one state index at a time. ``fexp`` is ~30 dependent
  operations; computed one short vector at a time the core mostly waits on
  their latency, and the wide vectors give it 4-8 independent chains
  instead. The staging of rows (prologue, epilogue, and their backward)
  takes 4 (float64) or 8 (float32) rows per call for the same reason, and
  the next chunk is prefetched one row per step. (With the state in the
  lanes instead, one channel at a time, the W1 forward took ~47 ms against
  ~31 now, and the forward+backward ~150 against ~105.) A block with fewer
  than 16 channels (the last one) keeps zeros in its spare lanes: ``dt = 0``
  and ``dtB u = 0`` keep their states at 0, ``d out = 0`` their adjoints,
  and they are never stored. LLVM would not vectorise these loops itself
  (run-time alias checks; sums need ``fastmath``). ``A_bar`` is the vector
  form of :func:`refssm.scan._fastexp.fexp` (<= 1 ulp, branch-free, the same
  IR as the scalar form), so every element is the same bits whatever the
  layout or vector width. Sums have one fixed order: over ``n`` increasing
  ``n`` per lane (``y``, ``d dt``, ``sum_n g B``), over the lanes of a block
  by halving (``dB[t]``, ``dC[t]``, see ``_lane_sums_add``): results do not
  depend on the thread count, ``fastmath`` (never used) or the CPU.
  (:func:`refssm.models.mamba_stepper` steps one channel at a time with
  ``_forward_step``, the state in the lanes.)
* **Checkpointed backward.** The forward stores the state entering every
  chunk. The backward walks each block's chunks in reverse: it recomputes
  the chunk's ``A_bar`` and states from the checkpoint with the forward's
  ``_lane_step`` (same bits) into local ``[CHUNK, N, 16]`` buffers, then
  runs the adjoint recurrence of :func:`refssm.scan.numpy_seq.
  scan_core_backward` backwards through them (``_lane_adjoint``),
  accumulating every gradient term of the step in the same pass.
* **Race-free reductions.** ``dB``/``dC`` sum over the channels of a group
  (and over the batch when ``bB == 1``), ``dA`` over the batch. The backward's
  ``prange`` runs over ``N_PARTS`` (32) fixed partitions of consecutive items,
  each processed sequentially. A partition writes straight into ``dB``/``dC``
  the rows of every group it is the first to touch, and into private rows
  those it shares with an earlier partition; these are added in partition
  order after the kernel. ``dA`` is kept per batch row and summed after. The
  partitions depend on the shapes only, not on the number of threads, so the
  results are bit-for-bit reproducible.

Memory (``P = N_PARTS``, ``nc = ceil(seq_len / CHUNK)``): the forward
allocates ``out`` and ``h_last`` (its outputs) and the checkpoints
``[batch, nc, channels, N]`` (``N / CHUNK`` = a quarter of ``u``'s size at
``N = 16``), plus ``dt_mean [batch, seq_len]`` for the channel mean. The
backward allocates its outputs, ``dA``, ``dD``, ``d delta_bias`` per batch
row, per partition ``O(16 * CHUNK * (2 N + 17))`` scratch (264 KiB at
``N = 16`` in float64), and
the shared rows of ``dB``/``dC``: at most ``(P - 1) * LB * N`` values each for
variable/grouped ``B``/``C``, ``(P - 1) * G * N`` for constant ones.

Accuracy (float64, against the NumPy engine; ``tests/test_numba_seq.py``):
normwise <= 1e-12 on everything; differences come only from ``fexp`` (<= 1 ulp
vs ``np.exp``), the fused softplus / sigmoid (<= 3 / 4 ulp vs the NumPy
forms) and the order of roundings.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._fastexp import (_const, build_fexp, build_sigmoid, build_softplus, check_fingerprint,
                       ir_fingerprint)

#: :func:`refssm.scan._fastexp.ir_fingerprint` of the ``fexp`` (and softplus, sigmoid)
#: compiled into the cached kernels below. Numba keys its cache on this file's content
#: only, so a change there must come with a change here (which makes Numba recompile).
_FEXP_FINGERPRINT = "d4861e7a5a7c2a9aa4c15197993078cd4404c17fe938c0cf41dd61b56694b25c"
check_fingerprint(__name__, _FEXP_FINGERPRINT, ir_fingerprint())

__all__ = ["NumbaSaved", "fused_forward", "fused_backward", "scan_core_forward",
           "scan_core_backward", "prologue", "finish_backward", "epilogue",
           "epilogue_backward", "CHUNK", "N_PARTS"]

#: Time steps between two saved states (the backward recomputes one chunk at a time).
CHUNK = 64
#: Number of parallel partitions of the backward (fixed: results do not depend
#: on the thread count).
N_PARTS = 32


class NumbaSaved(NamedTuple):
    """What :func:`fused_forward` / :func:`scan_core_forward` keep for the backward.

    The inputs are kept by reference (no copies); the arrays computed for the
    backward are ``checkpoints`` (and ``dt_mean``, ``[batch, seq_len]``).
    ``dt``, ``dtB``, ``y`` and the gates are recomputed chunk by chunk.

    Attributes
    ----------
    u, delta : ndarray ``[batch, seq_len, channels]``
        ``delta`` is the raw step (``dt`` itself for :func:`scan_core_forward`).
    bias : ndarray ``[channels]``
        ``delta_bias`` (zeros when absent).
    src : ndarray ``[batch, seq_len, channels]``
        ``dtB`` of :func:`scan_core_forward` (else ``delta``, unused).
    dt_mean : ndarray ``[batch, seq_len]``
        ``mean_c dt`` for ``delta_b_mean`` (else zeros, unused).
    D : ndarray ``[channels]``
        (``bias`` when absent, unused.)
    z : ndarray ``[batch, seq_len, channels]``
        (``u`` when absent, unused.)
    fl : ndarray ``[7]``
        The run-time options: softplus?, clip lo, clip hi, channel-mean?,
        ``dtB`` given?, D?, z? (1.0 / 0.0; the clip is ``-inf, inf`` when off).
    A : ndarray ``[channels, state]``
    B4, C4 : ndarray ``[bB, LB, G, state]``
    checkpoints : ndarray ``[batch, ceil(seq_len / chunk), channels, state]``
        ``checkpoints[:, j]`` is the state entering chunk ``j``, i.e.
        ``h[j * chunk - 1]``; ``checkpoints[:, 0]`` is ``h0`` (so ``h0`` is not
        kept separately).
    chunk : int
        Steps per chunk (``CHUNK`` at the time of the forward).
    """

    u: np.ndarray
    delta: np.ndarray
    bias: np.ndarray
    src: np.ndarray
    dt_mean: np.ndarray
    D: np.ndarray
    z: np.ndarray
    fl: np.ndarray
    A: np.ndarray
    B4: np.ndarray
    C4: np.ndarray
    checkpoints: np.ndarray
    chunk: int


# --------------------------------------------------------------------------
# small helpers (inlined)
# --------------------------------------------------------------------------
@intrinsic
def _prefetch(typingctx, flat, idx):
    """Hint the CPU to fetch ``flat[idx]`` into cache (``llvm.prefetch``, read).

    No effect on results. Used one chunk ahead on the ``[batch, L, channels]``
    arrays, whose rows for a block of channels lie ``channels`` elements apart
    (a new page every step or so: the hardware prefetchers do not follow).
    """
    if not (isinstance(flat, types.Array) and flat.ndim == 1 and isinstance(idx, types.Integer)):
        raise TypeError("_prefetch: expected a 1-D array and an integer index")

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(flat, idx), codegen


@njit(inline="always")
def _prefetch_rows(flat, start, stride, rows, width, step):
    """Prefetch ``rows`` rows of ``width`` elements, ``stride`` apart, from ``start``.

    ``step`` is the number of elements per cache line (64 bytes).
    """
    for r in range(rows):
        o = start + r * stride
        for e in range(0, width, step):
            _prefetch(flat, o + e)
        _prefetch(flat, o + width - 1)


# --------------------------------------------------------------------------
# loops over the state dimension, written as LLVM vector IR
# --------------------------------------------------------------------------
# LLVM vectorises a loop over ``n < N`` by itself only when it needs few
# run-time alias checks (else its minimum trip count exceeds N = 16 and the
# loop stays scalar) and never vectorises a float sum without ``fastmath``.
# So each per-time-step loop of the kernels is one intrinsic below: blocks of
# ``W = 512 / bits`` lanes (8 float64, 16 float32) as vectors, then a scalar
# tail. Sums over ``n`` have one fixed order (see ``_vector_loop_codegen``),
# whatever the machine, thread count or vector width of the CPU.

def _lanes(dtype) -> int:
    """Vector lanes of the state loops: 8 for float64, 16 for float32."""
    return 512 // dtype.bitwidth


def _halving_sum(builder, vec):
    """The sum of a vector's lanes, by halving: ``v[:W/2] + v[W/2:]``, then again, to one lane.

    The one order of every sum over the lanes of a vector in these kernels.
    """
    i32 = ir.IntType(32)
    width = vec.type.count
    while width > 1:
        half = width // 2
        lo = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half),
                                                          list(range(half))))
        hi = builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(i32, half),
                                                          list(range(half, width))))
        vec = builder.fadd(lo, hi)
        width = half
    return builder.extract_element(vec, ir.Constant(i32, 0))


def _vector_loop_codegen(context, builder, arrays, array_types, offsets, scalars, n_arg,
                         body, n_sums=0, unroll=1):
    """IR for a loop over ``i < n`` applying ``body`` to ``arrays[k][offsets[k] + i]``.

    ``body(builder, loaded, scalars)`` receives one value per array (element
    ``i``, or a vector of ``W`` elements) and per scalar (splat in the vector
    part) and returns ``(stores, terms)``: ``{array_index: value}`` written
    back at ``i``, and ``n_sums`` values to be summed over ``i``.

    ``unroll`` > 1 makes the blocks ``unroll`` machine vectors wide (LLVM
    interleaves them: for bodies with long dependency chains, as softplus or
    sigmoid, over long rows); it changes the summation order, so sums over the
    state use 1.

    Summation order (the definition of every sum over the state here): each
    vector block's terms are added lane-wise into an accumulator that starts
    at ``-0.0`` (so the first block enters exactly), the accumulator is
    reduced by halving (``acc[:W/2] + acc[W/2:]``, repeated down to one lane),
    then the tail ``i >= W * (n // W)`` is added in increasing ``i``.
    Returns the list of ``n_sums`` scalar sums.
    """
    dtype = array_types[0].dtype
    fty = context.get_value_type(dtype)
    W = _lanes(dtype) * unroll
    i64 = ir.IntType(64)
    i32 = ir.IntType(32)
    n = builder.sext(n_arg, i64) if n_arg.type.width < 64 else n_arg
    datas = []
    for a, t, off in zip(arrays, array_types, offsets):
        d = context.make_array(t)(context, builder, a).data
        off = builder.sext(off, i64) if off.type.width < 64 else off
        datas.append(builder.gep(d, [off]))
    vty = ir.VectorType(fty, W)
    vdatas = [builder.bitcast(d, vty.as_pointer()) for d in datas]
    align = dtype.bitwidth // 8
    splat = ir.Constant(ir.VectorType(i32, W), [0] * W)
    vscalars = [builder.shuffle_vector(
        builder.insert_element(ir.Constant(vty, ir.Undefined), sv, ir.Constant(i32, 0)),
        ir.Constant(vty, ir.Undefined), splat) for sv in scalars]
    accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [ir.Constant(fty, -0.0)] * W))
            for _ in range(n_sums)]
    nb = builder.udiv(n, ir.Constant(i64, W))
    with cgutils.for_range_slice(builder, ir.Constant(i64, 0), nb, ir.Constant(i64, 1)) as (i, _):
        ptrs = [builder.gep(vd, [i]) for vd in vdatas]
        loaded = [builder.load(pt, align=align) for pt in ptrs]
        stores, terms = body(builder, loaded, vscalars)
        for k, val in stores.items():
            builder.store(val, ptrs[k], align=align)
        for acc, term in zip(accs, terms):
            builder.store(builder.fadd(builder.load(acc), term), acc)
    totals = []
    for acc in accs:
        totals.append(cgutils.alloca_once_value(builder, _halving_sum(builder, builder.load(acc))))
    start = builder.mul(nb, ir.Constant(i64, W))
    with cgutils.for_range_slice(builder, start, n, ir.Constant(i64, 1)) as (i, _):
        ptrs = [builder.gep(d, [i]) for d in datas]
        loaded = [builder.load(pt) for pt in ptrs]
        stores, terms = body(builder, loaded, list(scalars))
        for k, val in stores.items():
            builder.store(val, ptrs[k])
        for tot, term in zip(totals, terms):
            builder.store(builder.fadd(builder.load(tot), term), tot)
    return [builder.load(tot) for tot in totals]


def _check_loop_args(name, arrays, scalars, n_len):
    first = arrays[0]
    for a in arrays:
        if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                and isinstance(a.dtype, types.Float) and a.dtype == first.dtype):
            raise TypeError(f"{name}: expected 1-D C-contiguous float arrays of one dtype")
    for sc in scalars:
        if sc != first.dtype:
            raise TypeError(f"{name}: scalars must have the arrays' dtype {first.dtype}, got {sc}")
    if not isinstance(n_len, types.Integer):
        raise TypeError(f"{name}: expected an integer length")


def _loop_intrinsic(name, n_arrays, n_scalars, body, n_sums, unroll=1):
    """Make an intrinsic from a ``_vector_loop_codegen`` body (``unroll``: see there).

    Called as ``f(x0, o0, x1, o1, ..., s0, s1, ..., n)``: each operand is a
    flat 1-D C-contiguous array ``x`` and an element offset ``o`` (the loop
    reads ``x[o + i]`` for ``i < n``; no bounds check, no view to build: the
    kernels pass offsets they computed), then the scalars, then ``n``.
    Returns ``None`` (``n_sums == 0``), the sum (1) or a tuple of sums (> 1).
    """
    def typer_impl(typingctx, *args):
        pairs = args[:2 * n_arrays]
        arrays, offs = list(pairs[0::2]), list(pairs[1::2])
        scalars, n_len = list(args[2 * n_arrays:-1]), args[-1]
        if len(scalars) != n_scalars:
            raise TypeError(f"{name}: expected {n_arrays} (array, offset) pairs, "
                            f"{n_scalars} scalars and n")
        _check_loop_args(name, arrays, scalars, n_len)
        for o in offs:
            if not isinstance(o, types.Integer):
                raise TypeError(f"{name}: offsets must be integers, got {o}")
        dt = arrays[0].dtype
        ret = types.void if n_sums == 0 else (dt if n_sums == 1 else types.UniTuple(dt, n_sums))

        def codegen(context, builder, signature, llargs):
            totals = _vector_loop_codegen(
                context, builder, list(llargs[0:2 * n_arrays:2]),
                list(signature.args[0:2 * n_arrays:2]), list(llargs[1:2 * n_arrays:2]),
                list(llargs[2 * n_arrays:-1]), llargs[-1], body, n_sums, unroll)
            if n_sums == 0:
                return context.get_dummy_value()
            if n_sums == 1:
                return totals[0]
            return context.make_tuple(builder, signature.return_type, totals)

        return ret(*args), codegen

    # @intrinsic needs explicit parameters (no *args)
    params = ", ".join(f"a{k}" for k in range(2 * n_arrays + n_scalars + 1))
    ns = {"typer_impl": typer_impl}
    exec(f"def typer(typingctx, {params}):\n    return typer_impl(typingctx, {params})\n", ns)
    typer = ns["typer"]
    typer.__name__ = name
    return intrinsic(typer)


def _flag(builder, flag, a, b):
    """``a`` where the 0/1 run-time flag (a splatted float scalar) is set, else ``b``."""
    return builder.select(builder.fcmp_ordered(">", flag, _const(flag.type, 0.0)), a, b)


def _step_size(builder, x, sp, lo, hi):
    """The prologue, elementwise: ``raw = softplus(x)`` if ``sp`` else ``x``, ``dt = clip(raw, lo, hi)``.

    ``x = delta + delta_bias``; without a clip ``lo, hi = -inf, inf``. Returns ``(raw, dt)``.
    """
    b = builder
    raw = _flag(b, sp, build_softplus(b, x), x)
    dt = b.select(b.fcmp_ordered("<", raw, lo), lo, raw)
    dt = b.select(b.fcmp_ordered(">", dt, hi), hi, dt)
    return raw, dt


def _step_size_grad(builder, x, raw, sp, lo, hi):
    """``d dt / d x``: the clip's mask (``lo <= raw <= hi``) times ``sigmoid(x)`` if ``sp`` else 1."""
    b = builder
    one, zero = _const(x.type, 1.0), _const(x.type, 0.0)
    inside = b.and_(b.fcmp_ordered(">=", raw, lo), b.fcmp_ordered("<=", raw, hi))
    return b.select(inside, _flag(b, sp, build_sigmoid(b, x), one), zero)


def _dt_prime(builder, delta, bias, sp, lo, hi):
    """``d dt / d x`` at ``x = delta + bias`` (:func:`_step_size_grad` of :func:`_step_size`)."""
    x = builder.fadd(delta, bias)
    raw, _ = _step_size(builder, x, sp, lo, hi)
    return _step_size_grad(builder, x, raw, sp, lo, hi)


def _staged_step(builder, delta, bias, src, dtm, sp, lo, hi, mmean, marr):
    """The prologue at a staged element: ``(x, raw, dt, dtB)``, ``x = delta + bias``.

    ``dtB`` is ``src`` (given as an array), ``dtm`` (the channel mean) or ``dt``.
    """
    b = builder
    x = b.fadd(delta, bias)
    raw, dt = _step_size(b, x, sp, lo, hi)
    return x, raw, dt, _flag(b, marr, src, _flag(b, mmean, dtm, dt))


def _gate(builder, y, D, u, z, hasD, hasz):
    """The epilogue: ``(y + D u) silu(z)`` (each term per its 0/1 flag)."""
    b = builder
    y = _flag(b, hasD, b.fadd(y, b.fmul(D, u)), y)
    return _flag(b, hasz, b.fmul(y, b.fmul(z, build_sigmoid(b, z))), y)


def _gate_grads(builder, dout, yc, D, u, z, sg, hasD, hasz):
    """Backward of :func:`_gate` given ``sg = sigmoid(z)``: ``(dy, dz)``.

    ``dy = d_out z sg`` (``d_out`` without a gate), ``dz = d_out (y + D u) silu'(z)``.
    """
    b = builder
    one = _const(z.type, 1.0)
    y = _flag(b, hasD, b.fadd(yc, b.fmul(D, u)), yc)
    dsilu = b.fmul(sg, b.fadd(one, b.fmul(z, b.fsub(one, sg))))
    return _flag(b, hasz, b.fmul(dout, b.fmul(z, sg)), dout), b.fmul(b.fmul(dout, y), dsilu)


def _stage_backward_values(builder, delta, bias, src, u, z, dout, dtm, sp, lo, hi, mmean, marr):
    """What the backward stages per element: ``dt, dtB, u, z, sigmoid(z), d_out, dt'(x), dtB u``."""
    b = builder
    x, raw, dt, dtB = _staged_step(b, delta, bias, src, dtm, sp, lo, hi, mmean, marr)
    return [dt, dtB, u, z, build_sigmoid(b, z), dout, _step_size_grad(b, x, raw, sp, lo, hi),
            b.fmul(dtB, u)]


def _stage_forward_body(builder, v, s):
    # arrays: delta, bias, src, u, dt_row, bu_row; scalars: sp, lo, hi, mean?, arr?, dt_mean
    # dt = clip(softplus(delta + bias)); dtB = src (arr), dt_mean (mean) or dt; bu = dtB u
    delta, bias, src, u, _, _ = v
    sp, lo, hi, mmean, marr, dtm = s
    _, _, dt, dtB = _staged_step(builder, delta, bias, src, dtm, sp, lo, hi, mmean, marr)
    return {4: dt, 5: builder.fmul(dtB, u)}, []


def _step_sum_body(builder, v, s):
    # arrays: delta, bias; scalars: sp, lo, hi.  Sum over the row of dt (for the channel mean)
    b = builder
    delta, bias = v
    sp, lo, hi = s
    return {}, [_step_size(b, b.fadd(delta, bias), sp, lo, hi)[1]]


def _store_forward_body(builder, v, s):
    # arrays: y_row, D, u, z, out; scalars: D?, z?.  out = (y + D u) * z sigmoid(z)
    y, D, u, z, _ = v
    return {4: _gate(builder, y, D, u, z, *s)}, []


def _stage_backward_body(builder, v, s):
    # arrays: delta, bias, src, u, z, d_out, dt_row, dtB_row, u_row, z_row, sz_row, do_row,
    #         df_row, bu_row; scalars: sp, lo, hi, mean?, arr?, dt_mean
    delta, bias, src, u, z, dout = v[:6]
    sp, lo, hi, mmean, marr, dtm = s
    vals = _stage_backward_values(builder, delta, bias, src, u, z, dout, dtm, sp, lo, hi,
                                  mmean, marr)
    return {6 + k: val for k, val in enumerate(vals)}, []


def _store_backward_body(builder, v, s):
    # arrays: du_row, ddt_row, ddtB_row, df_row, db_row, du, d_delta; scalar: mean?
    # d_delta = (d dt + d dtB) * dt'(x)  (mean: d dtB enters later, summed over channels)
    b = builder
    du, ddt, ddtB, df, db = v[:5]
    (mmean,) = s
    dd = b.fmul(_flag(b, mmean, ddt, b.fadd(ddt, ddtB)), df)
    return {5: du, 6: dd, 4: b.fadd(db, dd)}, [ddtB]


def _store_core_body(builder, v, s):
    # arrays: du_row, ddt_row, ddtB_row, du, ddt, ddtB (the core's three gradients, as they are)
    return {3: v[0], 4: v[1], 5: v[2]}, []


def _mean_fix_body(builder, v, s):
    # arrays: delta, bias, d_delta, db_row; scalars: sp, lo, hi, g (mean of d dtB over channels)
    b = builder
    delta, bias, dd, db = v
    sp, lo, hi, g = s
    add = b.fmul(g, _dt_prime(b, delta, bias, sp, lo, hi))
    return {2: b.fadd(dd, add), 3: b.fadd(db, add)}, []


def _prologue_body(builder, v, s):
    # arrays: delta, bias, dt, dtB; scalars: sp, lo, hi, mean?, dt_mean (the unfused prologue)
    b = builder
    delta, bias, _, _ = v
    sp, lo, hi, mmean, dtm = s
    _, dt = _step_size(b, b.fadd(delta, bias), sp, lo, hi)
    return {2: dt, 3: _flag(b, mmean, dtm, dt)}, []


def _finish_body(builder, v, s):
    # arrays: delta, bias, d dt, d dtB, du_core, dy, u, D, d_delta, du, dD, d_bias (the last
    # two: [channels] sums); scalars: sp, lo, hi, mean?, g (mean of d dtB), D?
    # d_delta = (d dt + d dtB) dt'(x);  du = du_core + dy D;  dD += dy u;  d_bias += d_delta
    b = builder
    delta, bias, ddt, ddtB, duc, dy, u, D, _, _, dD, db = v
    sp, lo, hi, mmean, g, hasD = s
    tot = b.fadd(ddt, _flag(b, mmean, g, ddtB))
    dd = b.fmul(tot, _dt_prime(b, delta, bias, sp, lo, hi))
    return {8: dd, 9: _flag(b, hasD, b.fadd(duc, b.fmul(dy, D)), duc),
            10: b.fadd(dD, b.fmul(dy, u)), 11: b.fadd(db, dd)}, []


def _epilogue_backward_body(builder, v, s):
    # arrays: d_out, y_core, D, u, z, dy, dz; scalars: D?, z?
    # out = (y + D u) silu(z): dz = d_out (y + D u) silu'(z), dy = d_out silu(z)
    dout, y, D, u, z, _, _ = v
    dy, dz = _gate_grads(builder, dout, y, D, u, z, build_sigmoid(builder, z), *s)
    return {5: dy, 6: dz}, []


def _forward_step_body(builder, v, s):
    # arrays: h, A, B, C; scalars: dt, dtB * u.  a = fexp(dt A); h = a h + (dtB u) B; y = sum C h
    h, A, B, C = v
    dtv, buv = s
    a = build_fexp(builder, builder.fmul(dtv, A))
    hn = builder.fadd(builder.fmul(a, h), builder.fmul(buv, B))
    return {0: hn}, [builder.fmul(C, hn)]


# (each array argument below is an (array, offset) pair, see _loop_intrinsic)
#: ``_stage_forward(delta, bias, src, u, dt_row, bu_row, sp, lo, hi, mean, arr, dt_mean, n)``:
#: one time step's row of the prologue (``dt`` and ``dtB * u`` of ``n`` channels).
_stage_forward = _loop_intrinsic("_stage_forward", 6, 6, _stage_forward_body, 0)
#: ``_step_sum(delta, bias, sp, lo, hi, n) -> sum of dt`` over a row (the channel mean).
_step_sum = _loop_intrinsic("_step_sum", 2, 3, _step_sum_body, 1)
#: ``_store_forward(y_row, D, u, z, out, hasD, hasz, n)``: the epilogue of one row.
_store_forward = _loop_intrinsic("_store_forward", 5, 2, _store_forward_body, 0)
#: ``_stage_backward(delta, bias, src, u, z, d_out, <8 rows>, sp, lo, hi, mean, arr, dt_mean, n)``
_stage_backward = _loop_intrinsic("_stage_backward", 14, 6, _stage_backward_body, 0)
#: ``_store_backward(du_row, ddt_row, ddtB_row, df_row, db_row, du, d_delta, mean, n)
#: -> sum of d dtB`` over the row.
_store_backward = _loop_intrinsic("_store_backward", 7, 1, _store_backward_body, 1)
#: ``_store_core(du_row, ddt_row, ddtB_row, du, ddt, ddtB, n)``
_store_core = _loop_intrinsic("_store_core", 6, 0, _store_core_body, 0)
#: ``_mean_fix(delta, bias, d_delta, db_row, sp, lo, hi, g, n)``: adds ``g * dt'(x)``.
_mean_fix = _loop_intrinsic("_mean_fix", 4, 4, _mean_fix_body, 0)
# the passes of engines without the fused kernel run over whole rows of channels:
# blocks of 4 machine vectors (unroll), for 4 independent softplus / sigmoid chains
#: ``_prologue(delta, bias, dt, dtB, sp, lo, hi, mean, dt_mean, n)``: the prologue of a row.
_prologue = _loop_intrinsic("_prologue", 4, 5, _prologue_body, 0, unroll=4)
#: ``_epilogue(y_core, D, u, z, out, hasD, hasz, n)``: ``_store_forward`` as a pass.
_epilogue = _loop_intrinsic("_epilogue", 5, 2, _store_forward_body, 0, unroll=4)
#: ``_finish(delta, bias, ddt, ddtB, du_core, dy, u, D, d_delta, du, dD, d_bias, sp, lo, hi,
#: mean, g, hasD, n)``: see ``_finish_body``.
_finish = _loop_intrinsic("_finish", 12, 6, _finish_body, 0, unroll=4)
#: ``_epilogue_backward(d_out, y_core, D, u, z, dy, dz, hasD, hasz, n)``
_epilogue_backward = _loop_intrinsic("_epilogue_backward", 7, 2, _epilogue_backward_body, 0,
                                     unroll=4)
#: ``_forward_step(h, A_c, B_t, C_t, dt, dtB_u, N) -> y``: one forward step of one channel.
_forward_step = _loop_intrinsic("_forward_step", 4, 2, _forward_step_body, 1)

# --------------------------------------------------------------------------
# the forward in channel lanes: LANES channels side by side in one IR vector
# --------------------------------------------------------------------------
# One time step of a block of LANES channels is one call of ``_lane_step``:
# the ``N * LANES`` values ``A_bar = fexp(dt * A)`` first, computed as IR vectors
# of 512 bytes (LLVM splits each into 8 (float64) or 4 (float32) machine vectors
# and interleaves them: the 30 dependent operations of one ``fexp`` would
# otherwise leave the core waiting on latency), then the recurrence, one state
# index ``n`` at a time, with every channel of the block in a lane. Each lane
# computes exactly what the per-channel code computes element by element (the
# same IEEE operations), so states and checkpoints are bit-identical whichever
# layout computed them; only ``y = sum_n C h`` is summed in another order
# (here: ``n = 0, 1, ..., N - 1``, per lane).

#: Channels per block of the forward kernel: the lanes of its IR vectors (2
#: machine vectors of float64, 1 of float32 with AVX-512).
LANES = 16
#: Bytes per IR vector of the forward's ``fexp`` phase and of its staging rows.
_WIDE_BYTES = 512


def _arg_ptr(context, builder, aty, arr, off):
    """Pointer to element ``off`` of the 1-D array ``arr`` (Numba type ``aty``)."""
    return builder.gep(context.make_array(aty)(context, builder, arr).data, [off])


def _splat(builder, value, width):
    """A vector of ``width`` copies of the scalar ``value``."""
    i32 = ir.IntType(32)
    vty = ir.VectorType(value.type, width)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(i32, 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(i32, width), [0] * width))


def _lane_step_intrinsic(name, gathered):
    """``f(H, oHp, oH, AT, oA, aS, oa, B, oB, C, oC, dtS, buS, yS, oS, N)``: one step of LANES channels.

    ``H`` holds ``[N, LANES]`` states: the step reads them at ``oHp`` and
    writes the new ones at ``oH`` (the same offset in the forward; the
    backward keeps every state of a chunk). ``AT`` and ``aS`` are ``[N,
    LANES]`` too (``A`` transposed; ``A_bar``, kept for the backward); ``dtS``, ``buS``, ``yS`` hold the
    step's row of LANES values at ``oS``. ``B``/``C`` are the group's row of
    ``N`` values at ``oB``/``oC`` (one per ``n``, for every lane), or, when
    ``gathered``, ``[N, LANES]`` rows with each lane's own group::

        aS[n, l] = fexp(dtS[l] * AT[n, l])                    (all n first)
        H[n, l]  = aS[n, l] * H_prev[n, l] + buS[l] * B[n, l]
        yS[l]    = sum_n C[n, l] * H[n, l]                     (n = 0, 1, ...)
    """
    def typer(typingctx, H, oHp, oH, AT, oA, aS, oa, B, oB, C, oC, dtS, buS, yS, oS, N):
        arrays = (H, AT, aS, B, C, dtS, buS, yS)
        for a in arrays:
            if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                    and isinstance(a.dtype, types.Float) and a.dtype == H.dtype):
                raise TypeError(f"{name}: expected 1-D C-contiguous float arrays of one dtype")
        for o in (oHp, oH, oA, oa, oB, oC, oS, N):
            if not isinstance(o, types.Integer):
                raise TypeError(f"{name}: offsets and N must be integers")

        def codegen(context, builder, sig, args):
            b = builder
            Hv, oHp, oH, ATv, oA, aSv, oa, Bv, oB, Cv, oC, dtv, buv, yv, oS, n = (
                b.sext(a, ir.IntType(64)) if isinstance(a.type, ir.IntType) and a.type.width < 64
                else a for a in args)
            ta = sig.args
            dtype = ta[0].dtype
            fty = context.get_value_type(dtype)
            i64 = ir.IntType(64)
            al = dtype.bitwidth // 8
            G = _WIDE_BYTES // (LANES * al)                  # rows of A_bar per fexp vector
            vL = ir.VectorType(fty, LANES)
            vG = ir.VectorType(fty, G * LANES)
            c = lambda v: ir.Constant(i64, v)                # noqa: E731

            def vptr(k, arr, off, vty):
                return b.bitcast(_arg_ptr(context, b, ta[k], arr, off), vty.as_pointer())

            dt = b.load(vptr(11, dtv, oS, vL), align=al)
            bu = b.load(vptr(12, buv, oS, vL), align=al)
            dtG = b.shuffle_vector(dt, dt, ir.Constant(ir.VectorType(ir.IntType(32), G * LANES),
                                                       list(range(LANES)) * G))
            nG = b.udiv(n, c(G))
            with cgutils.for_range(b, nG) as loop:             # A_bar, G rows at a time
                o = b.mul(loop.index, c(G * LANES))
                x = b.fmul(dtG, b.load(vptr(3, ATv, b.add(oA, o), vG), align=al))
                b.store(build_fexp(b, x), vptr(5, aSv, b.add(oa, o), vG), align=al)
            with cgutils.for_range_slice(b, b.mul(nG, c(G)), n, c(1)) as (i, _):
                o = b.mul(i, c(LANES))
                x = b.fmul(dt, b.load(vptr(3, ATv, b.add(oA, o), vL), align=al))
                b.store(build_fexp(b, x), vptr(5, aSv, b.add(oa, o), vL), align=al)
            acc = cgutils.alloca_once_value(b, _const(vL, -0.0))
            with cgutils.for_range(b, n) as loop:              # the recurrence, n by n
                i = loop.index
                o = b.mul(i, c(LANES))
                hp = vptr(0, Hv, b.add(oH, o), vL)
                a = b.load(vptr(5, aSv, b.add(oa, o), vL), align=al)
                hprev = b.load(vptr(0, Hv, b.add(oHp, o), vL), align=al)
                if gathered:
                    Bn = b.load(vptr(7, Bv, b.add(oB, o), vL), align=al)
                    Cn = b.load(vptr(9, Cv, b.add(oC, o), vL), align=al)
                else:
                    Bn = _splat(b, b.load(_arg_ptr(context, b, ta[7], Bv, b.add(oB, i))), LANES)
                    Cn = _splat(b, b.load(_arg_ptr(context, b, ta[9], Cv, b.add(oC, i))), LANES)
                h = b.fadd(b.fmul(a, hprev), b.fmul(bu, Bn))
                b.store(h, hp, align=al)
                b.store(b.fadd(b.load(acc), b.fmul(Cn, h)), acc)
            b.store(b.load(acc), vptr(13, yv, oS, vL), align=al)
            return context.get_dummy_value()

        return types.void(H, oHp, oH, AT, oA, aS, oa, B, oB, C, oC, dtS, buS, yS, oS, N), codegen

    typer.__name__ = name
    return intrinsic(typer)


#: One step of LANES channels of one group of ``B`` and ``C`` (see ``_lane_step_intrinsic``).
_lane_step = _lane_step_intrinsic("_lane_step", False)
#: The same with ``B``/``C`` staged per lane (a block spanning several groups).
_lane_step_gathered = _lane_step_intrinsic("_lane_step_gathered", True)


def _rows_intrinsic(name, n_arrays, n_scalars, body, row_scalars=()):
    """Make an intrinsic applying ``body`` to ``R`` rows of LANES values at once.

    Called as ``f(x0, o0, s0, x1, o1, s1, ..., scalars)``: element ``(r, l)``
    of operand ``k`` is ``xk[ok + r * sk + l]`` (``xk[ok + r * sk]`` for every
    lane when ``k`` is in ``row_scalars``), ``r < R``, ``l < LANES``, with
    ``R * LANES`` values making one IR vector of :data:`_WIDE_BYTES`.
    ``body(builder, loaded, scalars)`` is that of :func:`_vector_loop_codegen`
    (no sums); its stores go back to the same elements. The rows of one
    channel block lie ``channels`` apart in ``[batch, L, channels]`` arrays and
    one row is a short vector: the softplus or sigmoid of R rows interleaved
    keeps the core busy where one row at a time would wait on latency.
    """
    def typer_impl(typingctx, *args):
        arrays = list(args[0:3 * n_arrays:3])
        ints = list(args[1:3 * n_arrays:3]) + list(args[2:3 * n_arrays:3])
        scalars = list(args[3 * n_arrays:])
        _check_loop_args(name, arrays, scalars, types.intp)
        if not all(isinstance(o, types.Integer) for o in ints):
            raise TypeError(f"{name}: offsets and strides must be integers")

        def codegen(context, builder, sig, ll):
            b = builder
            dtype = arrays[0].dtype
            fty = context.get_value_type(dtype)
            al = dtype.bitwidth // 8
            R = _WIDE_BYTES // (LANES * al)
            i32 = ir.IntType(32)
            vL = ir.VectorType(fty, LANES)
            loaded, ptrs = [], []
            for k in range(n_arrays):
                arr, off, st = ll[3 * k], ll[3 * k + 1], ll[3 * k + 2]
                rows, rptrs = [], []
                for r in range(R):
                    p = _arg_ptr(context, b, sig.args[3 * k], arr,
                                 b.add(off, b.mul(st, ir.Constant(st.type, r))))
                    if k in row_scalars:
                        rows.append(_splat(b, b.load(p), LANES))
                    else:
                        p = b.bitcast(p, vL.as_pointer())
                        rows.append(b.load(p, align=al))
                    rptrs.append(p)
                while len(rows) > 1:                         # concatenate the R rows
                    w = 2 * rows[0].type.count
                    rows = [b.shuffle_vector(rows[i], rows[i + 1],
                                             ir.Constant(ir.VectorType(i32, w), list(range(w))))
                            for i in range(0, len(rows), 2)]
                loaded.append(rows[0])
                ptrs.append(rptrs)
            stores, _ = body(b, loaded, [_splat(b, sv, R * LANES) for sv in ll[3 * n_arrays:]])
            for k, val in stores.items():
                for r in range(R):
                    part = b.shuffle_vector(val, val, ir.Constant(
                        ir.VectorType(i32, LANES), list(range(r * LANES, (r + 1) * LANES))))
                    b.store(part, ptrs[k][r], align=al)
            return context.get_dummy_value()

        return types.void(*args), codegen

    params = ", ".join(f"a{k}" for k in range(3 * n_arrays + n_scalars))
    ns = {"typer_impl": typer_impl}
    exec(f"def typer(typingctx, {params}):\n    return typer_impl(typingctx, {params})\n", ns)
    typer = ns["typer"]
    typer.__name__ = name
    return intrinsic(typer)


def _stage_rows_body(builder, v, s):
    # arrays: delta, bias, src, u, dt_mean (one per row), dt_row, bu_row; scalars: sp, lo, hi,
    # mean?, arr?.  _stage_forward_body with the channel mean read per row
    delta, bias, src, u, dtm, _, _ = v
    _, _, dt, dtB = _staged_step(builder, delta, bias, src, dtm, *s)
    return {5: dt, 6: builder.fmul(dtB, u)}, []


#: ``_stage_rows(delta, bias, src, u, dt_mean, dt_row, bu_row (each: array, offset, row
#: stride), sp, lo, hi, mean, arr)``: ``_stage_forward`` of R full rows.
_stage_rows = _rows_intrinsic("_stage_rows", 7, 5, _stage_rows_body, row_scalars=(4,))
#: ``_store_rows(y_row, D, u, z, out (each: array, offset, row stride), hasD, hasz)``:
#: ``_store_forward`` of R full rows.
_store_rows = _rows_intrinsic("_store_rows", 5, 2, _store_forward_body)


def _lane_adjoint_intrinsic(name, gathered):
    """One reverse step of LANES channels: the adjoint of ``_lane_step``.

    ``f(G, Hb, ohp, oh, ab, oa, AT, dA, B, oB, C, oC, PB, PC, dtS, buS, dyS, ddtS, sgbS, oS, N)``,
    every operand ``[N, LANES]`` from its offset (``G``, ``AT``, ``dA``,
    ``PB``, ``PC`` from 0; ``Hb`` the chunk's states: ``h[t-1]`` at ``ohp``,
    ``h[t]`` at ``oh``; ``ab`` its ``A_bar`` at ``oa``) or a row of LANES at
    ``oS``; ``B``/``C`` as in ``_lane_step``. Per ``n`` (increasing), lane by
    lane, the formulas of :func:`refssm.scan.numpy_seq.scan_core_backward`::

        g_t   = G[n] + C[n] dy              (complete dL/dh[t])
        dd    = g_t h[t-1, n] A_bar[n]      (dL/d(dt A))
        G[n]  = g_t A_bar[n]                (on to h[t-1])
        dA[n] += dd dt;   PB[n] = g_t (dtB u);   PC[n] = h[t, n] dy
        ddtS  = sum_n dd A[n];   sgbS = sum_n g_t B[n]

    ``PB``/``PC`` are each lane's share of ``dB[t]``/``dC[t]``, summed over the
    channels by the caller.
    """
    def typer(typingctx, G, Hb, ohp, oh, ab, oa, AT, dA, B, oB, C, oC, PB, PC,
              dtS, buS, dyS, ddtS, sgbS, oS, N):
        arrays = (G, Hb, ab, AT, dA, B, C, PB, PC, dtS, buS, dyS, ddtS, sgbS)
        for a in arrays:
            if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C"
                    and isinstance(a.dtype, types.Float) and a.dtype == G.dtype):
                raise TypeError(f"{name}: expected 1-D C-contiguous float arrays of one dtype")
        for o in (ohp, oh, oa, oB, oC, oS, N):
            if not isinstance(o, types.Integer):
                raise TypeError(f"{name}: offsets and N must be integers")

        def codegen(context, builder, sig, args):
            b = builder
            (Gv, Hv, ohp, oh, av, oa, ATv, dAv, Bv, oB, Cv, oC, PBv, PCv,
             dtv, buv, dyv, ddtv, sgbv, oS, n) = (
                b.sext(a, ir.IntType(64)) if isinstance(a.type, ir.IntType) and a.type.width < 64
                else a for a in args)
            ta = sig.args
            dtype = ta[0].dtype
            fty = context.get_value_type(dtype)
            i64 = ir.IntType(64)
            al = dtype.bitwidth // 8
            vL = ir.VectorType(fty, LANES)

            def vptr(k, arr, off):
                return b.bitcast(_arg_ptr(context, b, ta[k], arr, off), vL.as_pointer())

            def vload(k, arr, off):
                return b.load(vptr(k, arr, off), align=al)

            dt = vload(14, dtv, oS)
            bu = vload(15, buv, oS)
            dy = vload(16, dyv, oS)
            acc_dt = cgutils.alloca_once_value(b, _const(vL, -0.0))
            acc_gb = cgutils.alloca_once_value(b, _const(vL, -0.0))
            with cgutils.for_range(b, n) as loop:
                i = loop.index
                o = b.mul(i, ir.Constant(i64, LANES))
                if gathered:
                    Bn = vload(8, Bv, b.add(oB, o))
                    Cn = vload(10, Cv, b.add(oC, o))
                else:
                    Bn = _splat(b, b.load(_arg_ptr(context, b, ta[8], Bv, b.add(oB, i))), LANES)
                    Cn = _splat(b, b.load(_arg_ptr(context, b, ta[10], Cv, b.add(oC, i))), LANES)
                a = vload(4, av, b.add(oa, o))
                gt = b.fadd(vload(0, Gv, o), b.fmul(Cn, dy))
                dd = b.fmul(b.fmul(gt, vload(1, Hv, b.add(ohp, o))), a)
                b.store(b.fmul(gt, a), vptr(0, Gv, o), align=al)
                b.store(b.fadd(vload(7, dAv, o), b.fmul(dd, dt)), vptr(7, dAv, o), align=al)
                b.store(b.fmul(gt, bu), vptr(12, PBv, o), align=al)
                b.store(b.fmul(vload(1, Hv, b.add(oh, o)), dy), vptr(13, PCv, o), align=al)
                b.store(b.fadd(b.load(acc_dt), b.fmul(dd, vload(6, ATv, o))), acc_dt)
                b.store(b.fadd(b.load(acc_gb), b.fmul(gt, Bn)), acc_gb)
            b.store(b.load(acc_dt), vptr(17, ddtv, oS), align=al)
            b.store(b.load(acc_gb), vptr(18, sgbv, oS), align=al)
            return context.get_dummy_value()

        return types.void(G, Hb, ohp, oh, ab, oa, AT, dA, B, oB, C, oC, PB, PC,
                          dtS, buS, dyS, ddtS, sgbS, oS, N), codegen

    typer.__name__ = name
    return intrinsic(typer)


#: The adjoint of ``_lane_step`` (see ``_lane_adjoint_intrinsic``).
_lane_adjoint = _lane_adjoint_intrinsic("_lane_adjoint", False)
#: The adjoint of ``_lane_step_gathered``.
_lane_adjoint_gathered = _lane_adjoint_intrinsic("_lane_adjoint_gathered", True)


@intrinsic
def _lane_sums_add(typingctx, P, acc, oacc, N):
    """``acc[oacc + n] += sum_l P[n, l]`` for ``n < N``: ``P`` ``[N, LANES]`` summed over lanes.

    The sum over the LANES lanes halves the vector (``v[:8] + v[8:]``, then
    ``[:4] + [4:]``, ...), each ``n`` the same way: a fixed order.
    """
    if not (isinstance(P, types.Array) and isinstance(acc, types.Array) and P.ndim == 1
            and acc.ndim == 1 and P.dtype == acc.dtype and isinstance(P.dtype, types.Float)
            and isinstance(oacc, types.Integer) and isinstance(N, types.Integer)):
        raise TypeError("_lane_sums_add: expected two 1-D float arrays of one dtype, "
                        "an offset and N")

    def codegen(context, builder, sig, args):
        b = builder
        Pv, accv = args[0], args[1]
        oacc, n = (b.sext(a, ir.IntType(64)) if a.type.width < 64 else a for a in args[2:])
        fty = context.get_value_type(sig.args[0].dtype)
        i64 = ir.IntType(64)
        al = sig.args[0].dtype.bitwidth // 8
        vL = ir.VectorType(fty, LANES)
        with cgutils.for_range(b, n) as loop:
            i = loop.index
            p = b.bitcast(_arg_ptr(context, b, sig.args[0], Pv, b.mul(i, ir.Constant(i64, LANES))),
                          vL.as_pointer())
            q = _arg_ptr(context, b, sig.args[1], accv, b.add(oacc, i))
            b.store(b.fadd(b.load(q), _halving_sum(b, b.load(p, align=al))), q)
        return context.get_dummy_value()

    return types.void(P, acc, oacc, N), codegen


def _stage_backward_rows_body(builder, v, s):
    # arrays: delta, bias, src, u, z, d_out, dt_mean (one per row), dt_row, dtB_row, u_row,
    #         z_row, sz_row, do_row, df_row, bu_row; scalars: sp, lo, hi, mean?, arr?
    vals = _stage_backward_values(builder, *v[:7], *s)
    return {7 + k: val for k, val in enumerate(vals)}, []


def _gate_backward_body(builder, v, s):
    # arrays: d_out, y_core, D, u, z, sigmoid(z), dy, dz; scalars: D?, z?
    # out = (y + D u) silu(z): dy = d_out z sigma(z), dz = d_out (y + D u) silu'(z)
    dy, dz = _gate_grads(builder, *v[:6], *s)
    return {6: dy, 7: dz}, []


def _input_grads_body(builder, v, s):
    # arrays: sum g B, dtB, u, dy, D, du, d dtB; scalar: D?.
    # du = (sum g B) dtB + dy D;  d dtB = (sum g B) u
    b = builder
    sgb, dtB, u, dy, D = v[:5]
    (hasD,) = s
    du = b.fmul(sgb, dtB)
    return {5: _flag(b, hasD, b.fadd(du, b.fmul(dy, D)), du), 6: b.fmul(sgb, u)}, []


#: ``_stage_backward_rows(delta, bias, src, u, z, d_out, dt_mean, <8 rows> (each: array,
#: offset, row stride), sp, lo, hi, mean, arr)``: the backward's staging of R full rows.
_stage_backward_rows = _rows_intrinsic("_stage_backward_rows", 15, 5, _stage_backward_rows_body,
                                       row_scalars=(6,))
#: ``_gate_backward(d_out, y_core, D, u, z, sigmoid_z, dy, dz, hasD, hasz, n)`` (one row) and
#: ``_gate_backward_rows`` (R rows, ``(array, offset, row stride)`` operands).
_gate_backward = _loop_intrinsic("_gate_backward", 8, 2, _gate_backward_body, 0)
_gate_backward_rows = _rows_intrinsic("_gate_backward_rows", 8, 2, _gate_backward_body)
#: ``_input_grads(sgb, dtB, u, dy, D, du, ddtB, hasD, n)`` and its R-row form.
_input_grads = _loop_intrinsic("_input_grads", 7, 1, _input_grads_body, 0)
_input_grads_rows = _rows_intrinsic("_input_grads_rows", 7, 1, _input_grads_body)


# Run-time options of the kernels, one float array ``fl`` (the arrays' dtype):
# softplus?, clip lo, clip hi, channel-mean dtB?, dtB given as an array?, D?, z?
_SP, _LO, _HI, _MEAN, _ARR, _HAS_D, _HAS_Z = range(7)


# --------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _step_mean_kernel(delta, bias, fl, dt_mean):
    """``dt_mean[b, t] = mean_c dt[b, t, c]`` (Edifice's channel-mean step for ``B_bar``)."""
    batch, L, ch = delta.shape
    df = delta.reshape(-1)
    for r in prange(batch * L):
        s = _step_sum(df, r * ch, bias, 0, fl[_SP], fl[_LO], fl[_HI], ch)
        dt_mean[r // L, r % L] = s / ch


@njit(inline="always")
def _aligned_zeros(n, like):
    """``n`` zeros of ``like``'s dtype from a 64-byte boundary (a view of a larger array)."""
    size = like.itemsize
    buf = np.zeros(n + 64 // size, dtype=like.dtype)
    return buf[(-buf.ctypes.data % 64) // size:][:n]


@njit(parallel=True, cache=True)
def _forward_kernel(u, delta, bias, src, dt_mean, D, z, fl, A, B4, C4, h0, chunk,
                    out, h_last, ckpt):
    """Fill ``out [batch, L, ch]``, ``h_last [batch, ch, N]``, ``ckpt [batch, nc, ch, N]``.

    One ``prange`` item = one batch row and a block of :data:`LANES`
    consecutive channels, which run side by side in the lanes of IR vectors
    (``_lane_step``; state ``H [N, LANES]``). Time goes chunk by chunk. A
    chunk's rows of the block are first staged into local ``[chunk, LANES]``
    buffers, R rows per vector call (``_stage_rows``): the prologue (``dt =
    clip(softplus(delta + bias))`` and ``dtB * u``) runs there, on rows read
    once as short bursts. Then the block takes the chunk's steps from those
    buffers, software-prefetching one row of the next chunk per step, and the
    epilogue (``(y + D u) silu(z)``, ``_store_rows``) writes the outputs back
    the same way. A block with fewer than LANES channels (the last one) keeps
    zeros in its spare lanes (``dt = 0``, ``dtB u = 0``: they stay at 0) and
    never stores them.
    """
    batch, L, ch = u.shape
    N = A.shape[1]
    nc = ckpt.shape[1]
    bB, LB, GB = B4.shape[0], B4.shape[1], B4.shape[2]
    bC, LC, GC = C4.shape[0], C4.shape[1], C4.shape[2]
    cpgB = ch // GB
    cpgC = ch // GC
    nblk = (ch + LANES - 1) // LANES
    R = _WIDE_BYTES // (LANES * u.itemsize)              # rows per _stage_rows call
    sp, lo, hi, mmean, marr = fl[_SP], fl[_LO], fl[_HI], fl[_MEAN], fl[_ARR]
    hasD, hasz = fl[_HAS_D], fl[_HAS_Z]
    for item in prange(batch * nblk):
        b = item // nblk
        c0 = (item - b * nblk) * LANES
        nb = min(LANES, ch - c0)
        bbB = b if bB > 1 else 0
        bbC = b if bC > 1 else 0
        H = _aligned_zeros(N * LANES, u)           # [N, LANES] states
        AT = _aligned_zeros(N * LANES, u)         # [N, LANES] A of the block
        aS = _aligned_zeros(N * LANES, u)         # [N, LANES] A_bar of one step
        dtS = _aligned_zeros(chunk * LANES, u)    # [chunk, LANES]: dt
        buS = _aligned_zeros(chunk * LANES, u)    # dtB * u
        yS = _aligned_zeros(chunk * LANES, u)     # C . h
        for cc in range(nb):
            for n in range(N):
                H[n * LANES + cc] = h0[b, c0 + cc, n]
                AT[n * LANES + cc] = A[c0 + cc, n]
        # a block within one group of B and of C reads their rows as they are;
        # otherwise each step's rows are gathered per lane into BL / CL
        one_group = (c0 // cpgB == (c0 + nb - 1) // cpgB) and (c0 // cpgC == (c0 + nb - 1) // cpgC)
        BL = _aligned_zeros(N * LANES if not one_group else 0, u)
        CL = _aligned_zeros(N * LANES if not one_group else 0, u)
        Bf = B4.reshape(-1)
        Cf = C4.reshape(-1)
        uf = u.reshape(-1)
        deltaf = delta.reshape(-1)
        srcf = src.reshape(-1)
        zf = z.reshape(-1)
        outf = out.reshape(-1)
        dmf = dt_mean.reshape(-1)
        line = 64 // u.itemsize
        for j in range(nc):
            t0 = j * chunk
            T = min(chunk, L - t0)
            Tn = min(chunk, L - t0 - chunk) if j + 1 < nc else 0
            for cc in range(nb):
                for n in range(N):
                    ckpt[b, j, c0 + cc, n] = H[n * LANES + cc]
            k0 = 0                                  # stage the chunk's inputs (prologue)
            while nb == LANES and k0 + R <= T:
                o = (b * L + t0 + k0) * ch + c0
                _stage_rows(deltaf, o, ch, bias, c0, 0, srcf, o, ch, uf, o, ch,
                            dmf, b * L + t0 + k0, 1, dtS, k0 * LANES, LANES,
                            buS, k0 * LANES, LANES, sp, lo, hi, mmean, marr)
                k0 += R
            for k in range(k0, T):
                o = (b * L + t0 + k) * ch + c0
                _stage_forward(deltaf, o, bias, c0, srcf, o, uf, o, dtS, k * LANES,
                               buS, k * LANES, sp, lo, hi, mmean, marr, dt_mean[b, t0 + k], nb)
            for k in range(T):                      # the chunk's steps
                t = t0 + k
                if k < Tn:                          # row k of the next chunk
                    o = (b * L + t0 + chunk + k) * ch + c0
                    _prefetch_rows(uf, o, ch, 1, nb, line)
                    _prefetch_rows(deltaf, o, ch, 1, nb, line)
                    _prefetch_rows(outf, o, ch, 1, nb, line)
                    if hasz > 0:
                        _prefetch_rows(zf, o, ch, 1, nb, line)
                    if marr > 0:
                        _prefetch_rows(srcf, o, ch, 1, nb, line)
                tB = t if LB > 1 else 0
                tC = t if LC > 1 else 0
                if one_group:
                    oB = ((bbB * LB + tB) * GB + c0 // cpgB) * N     # B4[bbB, tB, g]
                    oC = ((bbC * LC + tC) * GC + c0 // cpgC) * N
                    _lane_step(H, 0, 0, AT, 0, aS, 0, Bf, oB, Cf, oC, dtS, buS, yS, k * LANES, N)
                else:
                    for cc in range(nb):
                        oB = ((bbB * LB + tB) * GB + (c0 + cc) // cpgB) * N
                        oC = ((bbC * LC + tC) * GC + (c0 + cc) // cpgC) * N
                        for n in range(N):
                            BL[n * LANES + cc] = Bf[oB + n]
                            CL[n * LANES + cc] = Cf[oC + n]
                    _lane_step_gathered(H, 0, 0, AT, 0, aS, 0, BL, 0, CL, 0, dtS, buS, yS,
                                        k * LANES, N)
            k0 = 0                                  # write the chunk's outputs (epilogue)
            while nb == LANES and k0 + R <= T:
                o = (b * L + t0 + k0) * ch + c0
                _store_rows(yS, k0 * LANES, LANES, D, c0, 0, uf, o, ch, zf, o, ch,
                            outf, o, ch, hasD, hasz)
                k0 += R
            for k in range(k0, T):
                o = (b * L + t0 + k) * ch + c0
                _store_forward(yS, k * LANES, D, c0, uf, o, zf, o, outf, o, hasD, hasz, nb)
        for cc in range(nb):
            for n in range(N):
                h_last[b, c0 + cc, n] = H[n * LANES + cc]


# --------------------------------------------------------------------------
# the prologue and epilogue alone (for engines without the fused kernel)
# --------------------------------------------------------------------------
# The log-depth engine scans given ``dt``/``dtB`` and returns ``y = C . h``; these
# compute its prologue and epilogue (and their backward) with the fused kernels'
# vector code, one parallel pass over ``[batch, seq_len, channels]`` each.

@njit(parallel=True, cache=True)
def _prologue_kernel(delta, bias, fl, dt_mean, dt, dtB):
    batch, L, ch = delta.shape
    df, dtf, dtBf = delta.reshape(-1), dt.reshape(-1), dtB.reshape(-1)
    for r in prange(batch * L):
        _prologue(df, r * ch, bias, 0, dtf, r * ch, dtBf, r * ch, fl[_SP], fl[_LO], fl[_HI],
                  fl[_MEAN], dt_mean[r // L, r % L], ch)


@njit(parallel=True, cache=True)
def _epilogue_kernel(y, D, u, z, fl, out):
    batch, L, ch = u.shape
    yf, uf, zf, of = y.reshape(-1), u.reshape(-1), z.reshape(-1), out.reshape(-1)
    for r in prange(batch * L):
        _epilogue(yf, r * ch, D, 0, uf, r * ch, zf, r * ch, of, r * ch, fl[_HAS_D],
                  fl[_HAS_Z], ch)


@njit(parallel=True, cache=True)
def _epilogue_backward_kernel(dout, y, D, u, z, fl, dy, dz):
    batch, L, ch = u.shape
    dof, yf, uf, zf = dout.reshape(-1), y.reshape(-1), u.reshape(-1), z.reshape(-1)
    dyf, dzf = dy.reshape(-1), dz.reshape(-1)
    for r in prange(batch * L):
        o = r * ch
        _epilogue_backward(dof, o, yf, o, D, 0, uf, o, zf, o, dyf, o, dzf, o, fl[_HAS_D],
                           fl[_HAS_Z], ch)


@njit(parallel=True, cache=True)
def _finish_kernel(delta, bias, ddt, ddtB, fl, gmean, du_core, dy, u, D, ddelta, du,
                   dD_part, db_part):
    """``_finish`` over every row; partition ``p`` of the rows sums into ``dD_part[p]``,
    ``db_part[p]`` (fixed partitions: the sums do not depend on the thread count)."""
    batch, L, ch = delta.shape
    P = dD_part.shape[0]
    rows = batch * L
    df, f1, f2, f3 = delta.reshape(-1), ddt.reshape(-1), ddtB.reshape(-1), du_core.reshape(-1)
    dyf, uf, of, duf = dy.reshape(-1), u.reshape(-1), ddelta.reshape(-1), du.reshape(-1)
    dDf, dbf = dD_part.reshape(-1), db_part.reshape(-1)
    for p in prange(P):
        for r in range((p * rows) // P, ((p + 1) * rows) // P):
            o = r * ch
            _finish(df, o, bias, 0, f1, o, f2, o, f3, o, dyf, o, uf, o, D, 0, of, o, duf, o,
                    dDf, p * ch, dbf, p * ch, fl[_SP], fl[_LO], fl[_HI], fl[_MEAN],
                    gmean[r // L, r % L], fl[_HAS_D], ch)


def prologue(delta, delta_bias, delta_softplus, delta_clip, delta_b_mean):
    """``dt = clip(softplus(delta + delta_bias))`` and ``dtB`` (``dt`` or its channel mean).

    The fused kernel's prologue as a pass of its own, ``[batch, seq_len,
    channels]`` in and out (C-contiguous, float32 or float64); the same
    meaning as the NumPy prologue of :func:`refssm.ssm.selective_scan.
    selective_scan_forward`, to a few ulp.

    Examples
    --------
    >>> dt, dtB = prologue(np.zeros((1, 1, 2)), None, True, None, False)
    >>> dt
    array([[[0.69314718, 0.69314718]]])
    """
    delta = np.ascontiguousarray(delta)
    batch, L, ch = delta.shape
    fl = _options(delta.dtype, delta_softplus, delta_clip, delta_b_mean, False, False, False)
    bias = np.zeros(ch, delta.dtype) if delta_bias is None else np.ascontiguousarray(delta_bias)
    dt_mean = np.zeros((batch, L), dtype=delta.dtype)
    if delta_b_mean:
        _step_mean_kernel(delta, bias, fl, dt_mean)
    dt = np.empty_like(delta)
    dtB = np.empty_like(delta) if delta_b_mean else dt
    _prologue_kernel(delta, bias, fl, dt_mean, dt, dtB)
    return dt, dtB


def finish_backward(ddt, ddtB, du_core, dy, u, D, delta, delta_bias, delta_softplus, delta_clip,
                    delta_b_mean):
    """The gradients that follow the core's backward, in one pass over the rows.

    Backward of :func:`prologue` (``d delta`` from ``d dt`` and ``d dtB``) and
    of the ``D u`` term of :func:`epilogue`, given the core's ``du_core`` and
    the gate's ``dy`` (:func:`epilogue_backward`)::

        d_delta = (d dt + d dtB) dt'(x)       (d dtB: its channel mean for delta_b_mean)
        du = du_core + dy D;   dD = sum dy u;   d delta_bias = sum d_delta

    Returns ``(d_delta, du, dD, d_delta_bias)``; ``dD`` (``d_delta_bias``) is
    meaningless without ``D`` (``delta_bias``). The sums over batch and time
    are taken per fixed partition of the rows (``N_PARTS``), then over the
    partitions: the same bits whatever the thread count.
    """
    delta = np.ascontiguousarray(delta)
    batch, L, ch = delta.shape
    dtype = delta.dtype
    fl = _options(dtype, delta_softplus, delta_clip, delta_b_mean, False, D is not None, False)
    bias = np.zeros(ch, dtype) if delta_bias is None else np.ascontiguousarray(delta_bias)
    ddt, ddtB, du_core, dy, u = (np.ascontiguousarray(a, dtype=dtype)
                                 for a in (ddt, ddtB, du_core, dy, u))
    gmean = (ddtB.mean(axis=-1) if delta_b_mean else np.zeros((batch, L), dtype=dtype))
    ddelta = np.empty_like(delta)
    du = np.empty_like(delta)
    P = min(N_PARTS, batch * L)
    dD_part = np.zeros((P, ch), dtype=dtype)
    db_part = np.zeros((P, ch), dtype=dtype)
    _finish_kernel(delta, bias, ddt, ddtB, fl, np.ascontiguousarray(gmean), du_core, dy, u,
                   _or(D, bias), ddelta, du, dD_part, db_part)
    return ddelta, du, dD_part.sum(axis=0), db_part.sum(axis=0)


def epilogue(y_core, D, u, z):
    """``out = (y_core + D u) * silu(z)`` (each term optional), one vector pass."""
    u = np.ascontiguousarray(u)
    fl = _options(u.dtype, False, None, False, False, D is not None, z is not None)
    out = np.empty_like(u)
    _epilogue_kernel(np.ascontiguousarray(y_core), _or(D, np.zeros(u.shape[2], u.dtype)), u,
                     _or(z, u), fl, out)
    return out


def epilogue_backward(d_out, y_core, D, u, z):
    """``(dy, dz)``: gradients of :func:`epilogue` with respect to ``y_core`` and ``z``.

    Without a gate ``dy = d_out`` and ``dz`` is None.
    """
    u = np.ascontiguousarray(u)
    d_out = np.ascontiguousarray(d_out, dtype=u.dtype)
    if z is None:
        return d_out, None
    fl = _options(u.dtype, False, None, False, False, D is not None, True)
    dy = np.empty_like(u)
    dz = np.empty_like(u)
    _epilogue_backward_kernel(d_out, np.ascontiguousarray(y_core),
                              _or(D, np.zeros(u.shape[2], u.dtype)), u,
                              np.ascontiguousarray(z), fl, dy, dz)
    return dy, dz


def _or(a, default):
    return default if a is None else np.ascontiguousarray(a)


def _options(dtype, softplus, clip, mean, arr, has_D, has_z):
    lo, hi = clip if clip is not None else (-np.inf, np.inf)
    return np.array([softplus, lo, hi, mean, arr, has_D, has_z], dtype=dtype)


def fused_forward(u, delta, delta_bias, delta_softplus, delta_clip, delta_b_mean,
                  A, B4, C4, D, z, h0):
    """The whole selective scan in one pass: prologue, scan and epilogue fused.

    Computes what :func:`refssm.ssm.selective_scan.selective_scan_forward`
    computes around :func:`refssm.scan.numpy_seq.scan_core_forward`::

        dt  = clip(softplus(delta + delta_bias), lo, hi)   (each step optional)
        dtB = dt, or mean_c dt                              (delta_b_mean)
        y   = scan(u, dt, dtB, A, B, C, h0)
        out = (y + D u) * silu(z)                           (D, z optional)

    without the ``[batch, seq_len, channels]`` temporaries (``dt``, ``y``):
    only ``out``, ``h_last`` and the checkpoints are allocated (plus
    ``dt_mean [batch, seq_len]`` for ``delta_b_mean``). The elementwise
    functions are :func:`refssm.scan._fastexp.build_softplus` and
    :func:`~refssm.scan._fastexp.build_sigmoid` (<= 3 ulp against the NumPy
    forms, see that module).

    Parameters
    ----------
    u, delta : ndarray ``[batch, seq_len, channels]``
    delta_bias : ndarray ``[channels]`` or None
    delta_softplus : bool
    delta_clip : (float, float) or None
    delta_b_mean : bool
    A : ndarray ``[channels, state]``
    B4, C4 : ndarray ``[bB, LB, G, state]``
    D : ndarray ``[channels]`` or None
    z : ndarray ``[batch, seq_len, channels]`` or None
    h0 : ndarray ``[batch, channels, state]``
        All of one float dtype, C-contiguous (as ``selective_scan_forward`` prepares them).

    Returns
    -------
    out : ndarray ``[batch, seq_len, channels]``
    h_last : ndarray ``[batch, channels, state]``
    saved : NumbaSaved
    """
    fl = _options(u.dtype, delta_softplus, delta_clip, delta_b_mean, False, D is not None,
                  z is not None)
    return _forward(u, delta, delta_bias, None, fl, A, B4, C4, D, z, h0)


def _forward(u, delta, bias, src, fl, A, B4, C4, D, z, h0):
    u, delta, A, B4, C4, h0 = (np.ascontiguousarray(x) for x in (u, delta, A, B4, C4, h0))
    batch, seq_len, channels = u.shape
    dtype = u.dtype
    N = A.shape[1]
    bias = np.zeros(channels, dtype) if bias is None else np.ascontiguousarray(bias)
    # stand-ins for absent operands: read (in bounds) but never used
    src_ = delta if src is None else np.ascontiguousarray(src)
    D_ = bias if D is None else np.ascontiguousarray(D)
    z_ = u if z is None else np.ascontiguousarray(z)
    dt_mean = np.zeros((batch, seq_len), dtype=dtype)
    if fl[_MEAN] > 0:
        _step_mean_kernel(delta, bias, fl, dt_mean)
    chunk = CHUNK
    nc = -(-seq_len // chunk)
    out = np.empty_like(u)
    h_last = np.empty_like(h0)
    ckpt = np.empty((batch, nc, channels, N), dtype=dtype)
    _forward_kernel(u, delta, bias, src_, dt_mean, D_, z_, fl, A, B4, C4, h0, chunk,
                    out, h_last, ckpt)
    saved = NumbaSaved(u, delta, bias, src_, dt_mean, D_, z_, fl, A, B4, C4, ckpt, chunk)
    return out, h_last, saved


def scan_core_forward(u, dt, dtB, A, B4, C4, h0):
    """Selective scan core, fused (same contract as :func:`refssm.scan.numpy_seq.scan_core_forward`).

    The kernel of :func:`fused_forward` with an identity prologue (``dt`` as
    given, ``dtB`` read from its array) and no epilogue.

    Parameters
    ----------
    u, dt, dtB : ndarray ``[batch, seq_len, channels]``
    A : ndarray ``[channels, state]``
    B4, C4 : ndarray ``[bB, LB, G, state]``
    h0 : ndarray ``[batch, channels, state]``
        All C-contiguous, all float32 or all float64.

    Returns
    -------
    y : ndarray ``[batch, seq_len, channels]``
    h_last : ndarray ``[batch, channels, state]``
    saved : NumbaSaved

    Examples
    --------
    >>> import numpy as np
    >>> u = np.ones((1, 3, 1)); dt = np.full((1, 3, 1), 0.5)
    >>> A = -np.ones((1, 1)); B4 = np.ones((1, 1, 1, 1)); C4 = np.ones((1, 1, 1, 1))
    >>> y, h, _ = scan_core_forward(u, dt, dt, A, B4, C4, np.zeros((1, 1, 1)))
    >>> np.round(y[0, :, 0], 4)
    array([0.5   , 0.8033, 0.9872])
    """
    fl = _options(np.asarray(u).dtype, False, None, False, True, False, False)
    return _forward(u, dt, None, dtB, fl, A, B4, C4, None, None, h0)


# --------------------------------------------------------------------------
# backward: accumulation plan for dB / dC
# --------------------------------------------------------------------------
class _AccPlan(NamedTuple):
    """Where each ``(batch, channel)`` item adds its ``dB`` (or ``dC``) rows.

    The gradient lives in ``acc[:n_direct]`` viewed as ``[bM, LM, GM, N]``
    (row ``(bb * LM + t) * GM + g``); shared rows in ``acc[n_direct:]``, slot
    ``s`` owning rows ``n_direct + s * LM + t``. Item ``i`` adds row
    ``base[i] + t * stride[i]``.
    """

    base: np.ndarray       # [items] int64
    stride: np.ndarray     # [items] int64
    n_direct: int
    slot_bb: np.ndarray    # [slots] batch row of each shared slot
    slot_g: np.ndarray     # [slots] group of each shared slot


def _partition_bounds(items: int, parts: int) -> np.ndarray:
    """``parts + 1`` bounds splitting ``range(items)`` into near-equal runs."""
    return (np.arange(parts + 1, dtype=np.int64) * items) // parts


def _acc_plan(shape4, batch, channels, part_of_unit) -> _AccPlan:
    """Plan the race-free accumulation of a ``[bM, LM, GM, N]`` gradient.

    ``part_of_unit[b * channels + c]`` is the (non-decreasing) partition that
    processes batch row ``b``, channel ``c``.
    """
    bM, LM, GM, _ = shape4
    items = batch * channels
    idx = np.arange(items, dtype=np.int64)
    b = idx // channels
    c = idx - b * channels
    bb = b if bM > 1 else np.zeros_like(b)
    g = c // (channels // GM)
    key = bb * GM + g
    pair = part_of_unit * (bM * GM) + key              # (partition, key)
    upair = np.unique(pair)                            # sorted by partition, then key
    ukey = upair % (bM * GM)
    # the first partition (in order) touching a key writes it directly
    _, owner_pos = np.unique(ukey, return_index=True)  # first occurrence of each key
    shared = np.ones(upair.size, dtype=bool)
    shared[owner_pos] = False
    slot_of_pair = np.full(upair.size, -1, dtype=np.int64)
    slot_of_pair[shared] = np.arange(int(shared.sum()), dtype=np.int64)
    slot = slot_of_pair[np.searchsorted(upair, pair)]
    n_direct = bM * LM * GM
    direct_base = bb * LM * GM + g
    base = np.where(slot < 0, direct_base, n_direct + slot * LM)
    stride = np.where(slot < 0, GM, 1).astype(np.int64)
    skey = ukey[shared]
    return _AccPlan(base.astype(np.int64), stride, n_direct, skey // GM, skey % GM)


@njit(cache=True)
def _reduce_slots(acc, n_direct, slot_bb, slot_g, LM, GM):
    """Add every shared slot's rows into the gradient rows, in slot order."""
    N = acc.shape[1]
    for s in range(slot_bb.shape[0]):
        src0 = n_direct + s * LM
        dst0 = slot_bb[s] * LM * GM + slot_g[s]
        for t in range(LM):
            for n in range(N):
                acc[dst0 + t * GM, n] += acc[src0 + t, n]


def _finish_acc(acc, plan: _AccPlan, shape4):
    """Reduce the shared slots; return the gradient ``[bM, LM, GM, N]``."""
    bM, LM, GM, N = shape4
    if plan.slot_bb.size:
        _reduce_slots(acc, plan.n_direct, plan.slot_bb, plan.slot_g, LM, GM)
    grad = acc[:plan.n_direct]
    if acc.shape[0] > 2 * plan.n_direct:
        grad = grad.copy()          # do not keep large scratch alive with a small result
    return grad.reshape(bM, LM, GM, N)


# --------------------------------------------------------------------------
# backward kernel
# --------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _backward_kernel(dout, g_last, u, delta, bias, src, dt_mean, D, z, fl, A, B4, C4, ckpt,
                     chunk, bounds, baseB, strideB, accB, baseC, strideC, accC,
                     du, ddelta, ddtB_out, dz, dA_rows, dh0, dD_rows, db_rows, gmean_part):
    """The reverse-time scan with the epilogue's and prologue's backward; see :func:`fused_backward`.

    ``prange`` over partitions ``p``; partition ``p`` processes the items
    (batch row, block of :data:`LANES` channels, as in the forward: channels
    in vector lanes) ``bounds[p] <= item < bounds[p+1]`` one after the other.
    Per item, chunks are walked in reverse. A chunk's rows for the block are
    staged (prologue recomputed: ``dt``, ``dtB``, ``dtB u``, ``dt'(x)``;
    ``sigmoid(z)``) into local ``[chunk, LANES]`` buffers; the chunk's
    ``A_bar`` and states are recomputed from its checkpoint with the
    forward's ``_lane_step`` (kept, ``[chunk, N, LANES]``), then the gate's
    backward gives ``dy`` and ``dz`` for the whole chunk, and the adjoint
    (``_lane_adjoint``) runs backwards through the chunk's steps. Each step's
    shares of ``dB[t]``/``dC[t]`` are summed over the lanes (or, for a block
    spanning groups, added lane by lane) into the accumulation rows.
    """
    batch, L, ch = u.shape
    N = A.shape[1]
    nc = ckpt.shape[1]
    bB, LB, GB = B4.shape[0], B4.shape[1], B4.shape[2]
    bC, LC, GC = C4.shape[0], C4.shape[1], C4.shape[2]
    cpgB = ch // GB
    cpgC = ch // GC
    nblk = (ch + LANES - 1) // LANES
    n_parts = bounds.shape[0] - 1
    R = _WIDE_BYTES // (LANES * u.itemsize)              # rows per *_rows call
    NL = N * LANES
    sp, lo, hi, mmean, marr = fl[_SP], fl[_LO], fl[_HI], fl[_MEAN], fl[_ARR]
    hasD, hasz = fl[_HAS_D], fl[_HAS_Z]
    for p in prange(n_parts):
        Hb = _aligned_zeros((chunk + 1) * NL, u)     # [chunk + 1, N, LANES]: h[t0 - 1 + k]
        ab = _aligned_zeros(chunk * NL, u)           # [chunk, N, LANES]: A_bar
        G = _aligned_zeros(NL, u)                    # [N, LANES] adjoint states
        AT = _aligned_zeros(NL, u)
        dAl = _aligned_zeros(NL, u)
        PB = _aligned_zeros(NL, u)                   # one step's lane shares of dB[t], dC[t]
        PC = _aligned_zeros(NL, u)
        dBl = _aligned_zeros(NL, u)                  # constant B / C: sums over time
        dCl = _aligned_zeros(NL, u)
        BL = _aligned_zeros(NL, u)                   # a step's B / C per lane (mixed groups)
        CL = _aligned_zeros(NL, u)
        Dl = _aligned_zeros(LANES, u)
        dDl = _aligned_zeros(LANES, u)
        dbl = _aligned_zeros(LANES, u)
        S = _aligned_zeros(17 * chunk * LANES, u)    # staged rows, [chunk, LANES] each
        CL_ = chunk * LANES
        dtS, dtBS, uS, zS, szS, doS, dfS, buS = (
            S[0:CL_], S[CL_:2 * CL_], S[2 * CL_:3 * CL_], S[3 * CL_:4 * CL_],
            S[4 * CL_:5 * CL_], S[5 * CL_:6 * CL_], S[6 * CL_:7 * CL_], S[7 * CL_:8 * CL_])
        ycS, dyS, dzS, ddtS, sgbS, duS, ddtBS = (
            S[8 * CL_:9 * CL_], S[9 * CL_:10 * CL_], S[10 * CL_:11 * CL_],
            S[11 * CL_:12 * CL_], S[12 * CL_:13 * CL_], S[13 * CL_:14 * CL_],
            S[14 * CL_:15 * CL_])
        Bf = B4.reshape(-1)
        Cf = C4.reshape(-1)
        accBf = accB.reshape(-1)
        accCf = accC.reshape(-1)
        uf = u.reshape(-1)
        deltaf = delta.reshape(-1)
        srcf = src.reshape(-1)
        zf = z.reshape(-1)
        dof = dout.reshape(-1)
        duf = du.reshape(-1)
        ddf = ddelta.reshape(-1)
        ddtBf = ddtB_out.reshape(-1)
        dzf = dz.reshape(-1)
        dmf = dt_mean.reshape(-1)
        line = 64 // u.itemsize
        for item in range(bounds[p], bounds[p + 1]):
            b = item // nblk
            blk = item - b * nblk
            c0 = blk * LANES
            nb = min(LANES, ch - c0)
            bbB = b if bB > 1 else 0
            bbC = b if bC > 1 else 0
            one_group = ((c0 // cpgB == (c0 + nb - 1) // cpgB)
                         and (c0 // cpgC == (c0 + nb - 1) // cpgC))
            S[:] = 0                                 # spare lanes stay 0 (dt = 0, dy = 0)
            G[:] = 0
            AT[:] = 0
            Dl[:] = 0
            BL[:] = 0
            CL[:] = 0
            for cc in range(nb):
                c = c0 + cc
                Dl[cc] = D[c]
                for n in range(N):
                    G[n * LANES + cc] = g_last[b, c, n]
                    AT[n * LANES + cc] = A[c, n]
            dAl[:] = 0
            dBl[:] = 0
            dCl[:] = 0
            dDl[:] = 0
            dbl[:] = 0
            for j in range(nc - 1, -1, -1):
                t0 = j * chunk
                T = min(chunk, L - t0)
                Tp = chunk if j > 0 else 0              # rows of chunk j - 1
                k0 = 0                                  # stage the chunk's inputs
                while nb == LANES and k0 + R <= T:
                    o = (b * L + t0 + k0) * ch + c0
                    r = k0 * LANES
                    _stage_backward_rows(deltaf, o, ch, bias, c0, 0, srcf, o, ch, uf, o, ch,
                                         zf, o, ch, dof, o, ch, dmf, b * L + t0 + k0, 1,
                                         dtS, r, LANES, dtBS, r, LANES, uS, r, LANES,
                                         zS, r, LANES, szS, r, LANES, doS, r, LANES,
                                         dfS, r, LANES, buS, r, LANES, sp, lo, hi, mmean, marr)
                    k0 += R
                for k in range(k0, T):
                    o = (b * L + t0 + k) * ch + c0
                    r = k * LANES
                    _stage_backward(deltaf, o, bias, c0, srcf, o, uf, o, zf, o, dof, o,
                                    dtS, r, dtBS, r, uS, r, zS, r, szS, r, doS, r, dfS, r,
                                    buS, r, sp, lo, hi, mmean, marr, dt_mean[b, t0 + k], nb)
                # --- the chunk's A_bar, states and y_core, from its checkpoint (spare
                # lanes 0: the buffers are the partition's, used by items before)
                Hb[:NL] = 0
                for cc in range(nb):
                    for n in range(N):
                        Hb[n * LANES + cc] = ckpt[b, j, c0 + cc, n]
                for k in range(T):
                    t = t0 + k
                    if k < Tp:                          # row k of chunk j - 1
                        o = (b * L + t0 - chunk + k) * ch + c0
                        _prefetch_rows(deltaf, o, ch, 1, nb, line)
                        _prefetch_rows(uf, o, ch, 1, nb, line)
                        _prefetch_rows(dof, o, ch, 1, nb, line)
                        if hasz > 0:
                            _prefetch_rows(zf, o, ch, 1, nb, line)
                        if marr > 0:
                            _prefetch_rows(srcf, o, ch, 1, nb, line)
                    tB = t if LB > 1 else 0
                    tC = t if LC > 1 else 0
                    if one_group:
                        oB = ((bbB * LB + tB) * GB + c0 // cpgB) * N
                        oC = ((bbC * LC + tC) * GC + c0 // cpgC) * N
                        _lane_step(Hb, k * NL, (k + 1) * NL, AT, 0, ab, k * NL, Bf, oB, Cf, oC,
                                   dtS, buS, ycS, k * LANES, N)
                    else:
                        _gather_groups(Bf, Cf, BL, CL, bbB, bbC, tB, tC, c0, nb, N, LB, GB,
                                       LC, GC, cpgB, cpgC)
                        _lane_step_gathered(Hb, k * NL, (k + 1) * NL, AT, 0, ab, k * NL,
                                            BL, 0, CL, 0, dtS, buS, ycS, k * LANES, N)
                # --- the gate's backward: dy and dz of the chunk
                k0 = 0
                while nb == LANES and k0 + R <= T:
                    r = k0 * LANES
                    o = (b * L + t0 + k0) * ch + c0
                    if hasz > 0:
                        dzt, odz, sdz = dzf, o, ch
                    else:
                        dzt, odz, sdz = dzS, r, LANES
                    _gate_backward_rows(doS, r, LANES, ycS, r, LANES, Dl, 0, 0, uS, r, LANES,
                                        zS, r, LANES, szS, r, LANES, dyS, r, LANES,
                                        dzt, odz, sdz, hasD, hasz)
                    k0 += R
                for k in range(k0, T):
                    r = k * LANES
                    o = (b * L + t0 + k) * ch + c0
                    if hasz > 0:
                        dzt, odz = dzf, o
                    else:
                        dzt, odz = dzS, r
                    _gate_backward(doS, r, ycS, r, Dl, 0, uS, r, zS, r, szS, r, dyS, r,
                                   dzt, odz, hasD, hasz, nb)
                # --- the adjoint recurrence, backwards through the chunk
                for k in range(T - 1, -1, -1):
                    t = t0 + k
                    tB = t if LB > 1 else 0
                    tC = t if LC > 1 else 0
                    if one_group:
                        oB = ((bbB * LB + tB) * GB + c0 // cpgB) * N
                        oC = ((bbC * LC + tC) * GC + c0 // cpgC) * N
                        _lane_adjoint(G, Hb, k * NL, (k + 1) * NL, ab, k * NL, AT, dAl,
                                      Bf, oB, Cf, oC, PB, PC, dtS, buS, dyS, ddtS, sgbS,
                                      k * LANES, N)
                    else:
                        _gather_groups(Bf, Cf, BL, CL, bbB, bbC, tB, tC, c0, nb, N, LB, GB,
                                       LC, GC, cpgB, cpgC)
                        _lane_adjoint_gathered(G, Hb, k * NL, (k + 1) * NL, ab, k * NL, AT,
                                               dAl, BL, 0, CL, 0, PB, PC, dtS, buS, dyS, ddtS,
                                               sgbS, k * LANES, N)
                    _add_shares(PB, dBl, accBf, baseB, strideB, LB, one_group, b, c0, nb, t,
                                ch, N)
                    _add_shares(PC, dCl, accCf, baseC, strideC, LC, one_group, b, c0, nb, t,
                                ch, N)
                    for cc in range(LANES):             # y = C . h + D u
                        dDl[cc] += dyS[k * LANES + cc] * uS[k * LANES + cc]
                # --- du, d dtB; then d delta (or the core's three gradients) out
                k0 = 0
                while nb == LANES and k0 + R <= T:
                    r = k0 * LANES
                    _input_grads_rows(sgbS, r, LANES, dtBS, r, LANES, uS, r, LANES,
                                      dyS, r, LANES, Dl, 0, 0, duS, r, LANES,
                                      ddtBS, r, LANES, hasD)
                    k0 += R
                for k in range(k0, T):
                    r = k * LANES
                    _input_grads(sgbS, r, dtBS, r, uS, r, dyS, r, Dl, 0, duS, r, ddtBS, r,
                                 hasD, nb)
                for k in range(T):
                    o = (b * L + t0 + k) * ch + c0
                    r = k * LANES
                    if marr > 0:
                        _store_core(duS, r, ddtS, r, ddtBS, r, duf, o, ddf, o, ddtBf, o, nb)
                    else:
                        g = _store_backward(duS, r, ddtS, r, ddtBS, r, dfS, r, dbl, 0,
                                            duf, o, ddf, o, mmean, nb)
                        if mmean > 0:
                            gmean_part[b, blk, t0 + k] = g
            for cc in range(nb):
                c = c0 + cc
                dD_rows[b, c] = dDl[cc]
                db_rows[b, c] = dbl[cc]
                for n in range(N):
                    dh0[b, c, n] = G[n * LANES + cc]
                    dA_rows[b, c, n] = dAl[n * LANES + cc]
                if LB == 1:
                    o = baseB[b * ch + c] * N
                    for n in range(N):
                        accBf[o + n] += dBl[n * LANES + cc]
                if LC == 1:
                    o = baseC[b * ch + c] * N
                    for n in range(N):
                        accCf[o + n] += dCl[n * LANES + cc]


@njit(inline="always")
def _gather_groups(Bf, Cf, BL, CL, bbB, bbC, tB, tC, c0, nb, N, LB, GB, LC, GC, cpgB, cpgC):
    """``BL[n, l]``, ``CL[n, l]``: the time-``t`` rows of ``B``/``C`` of each lane's own group."""
    for cc in range(nb):
        oB = ((bbB * LB + tB) * GB + (c0 + cc) // cpgB) * N
        oC = ((bbC * LC + tC) * GC + (c0 + cc) // cpgC) * N
        for n in range(N):
            BL[n * LANES + cc] = Bf[oB + n]
            CL[n * LANES + cc] = Cf[oC + n]


@njit(inline="always")
def _add_shares(P, dMl, accf, base, stride, LM, one_group, b, c0, nb, t, ch, N):
    """Add one step's lane shares ``P [N, LANES]`` of ``dB[t]`` (or ``dC[t]``).

    Varying over time: into the accumulation row of time ``t``, summed over
    the lanes when they share a group and row, else lane by lane into each
    one's row. Constant: into the lane-wise sums over time ``dMl``.
    """
    if LM > 1:
        if one_group:
            _lane_sums_add(P, accf, (base[b * ch + c0] + t * stride[b * ch + c0]) * N, N)
        else:
            for cc in range(nb):
                o = (base[b * ch + c0 + cc] + t * stride[b * ch + c0 + cc]) * N
                for n in range(N):
                    accf[o + n] += P[n * LANES + cc]
    else:
        for i in range(N * LANES):
            dMl[i] += P[i]


@njit(parallel=True, cache=True)
def _mean_backward_kernel(delta, bias, fl, gmean, cblk, ddelta, db_rows):
    """Add the channel mean's share: ``d_delta += gmean[b, t] * dt'(x)`` (and to ``db_rows``).

    ``gmean[b, t] = mean_c d dtB[b, t, c]``: with ``dtB = mean_c dt`` every
    channel's ``dt`` receives ``1/channels`` of the row's total ``d dtB``.
    """
    batch, L, ch = delta.shape
    nblk = (ch + cblk - 1) // cblk
    df = delta.reshape(-1)
    ddf = ddelta.reshape(-1)
    for item in prange(batch * nblk):
        b = item // nblk
        c0 = (item - b * nblk) * cblk
        nb = min(cblk, ch - c0)
        dbl = np.zeros(cblk, dtype=delta.dtype)
        for t in range(L):
            o = (b * L + t) * ch + c0
            _mean_fix(df, o, bias, c0, ddf, o, dbl, 0, fl[_SP], fl[_LO], fl[_HI], gmean[b, t], nb)
        for cc in range(nb):
            db_rows[b, c0 + cc] += dbl[cc]


def _backward(d_out, dh_last, saved: NumbaSaved):
    """Run the backward kernel(s); every gradient, as arrays (see the two callers)."""
    u, delta, bias, src, dt_mean, D, z, fl, A, B4, C4, ckpt, chunk = saved
    batch, seq_len, channels = u.shape
    N = A.shape[1]
    dtype = u.dtype
    dout = np.ascontiguousarray(d_out, dtype=dtype)
    if dh_last is None:
        g_last = np.zeros((batch, channels, N), dtype=dtype)
    else:
        g_last = np.ascontiguousarray(dh_last, dtype=dtype)
    nblk = -(-channels // LANES)
    items = batch * nblk
    bounds = _partition_bounds(items, min(N_PARTS, items))
    # partition of every (batch, channel) unit, for the dB / dC plans
    unit_item = (np.arange(batch)[:, None] * nblk
                 + np.arange(channels)[None, :] // LANES).reshape(-1)
    part_of_unit = np.searchsorted(bounds, unit_item, side="right") - 1
    planB = _acc_plan(B4.shape, batch, channels, part_of_unit)
    planC = _acc_plan(C4.shape, batch, channels, part_of_unit)
    accB = np.zeros((planB.n_direct + planB.slot_bb.size * B4.shape[1], N), dtype=dtype)
    accC = np.zeros((planC.n_direct + planC.slot_bb.size * C4.shape[1], N), dtype=dtype)
    du = np.empty_like(u)
    ddelta = np.empty_like(u)
    ddtB = np.empty_like(u) if fl[_ARR] > 0 else ddelta       # core API only
    dz = np.empty_like(u) if fl[_HAS_Z] > 0 else du
    gmean_part = np.zeros((batch, nblk, seq_len) if fl[_MEAN] > 0 else (1, 1, 1), dtype=dtype)
    dA_rows = np.empty((batch, channels, N), dtype=dtype)
    dh0 = np.empty((batch, channels, N), dtype=dtype)
    dD_rows = np.empty((batch, channels), dtype=dtype)
    db_rows = np.empty((batch, channels), dtype=dtype)
    _backward_kernel(dout, g_last, u, delta, bias, src, dt_mean, D, z, fl, A, B4, C4, ckpt,
                     chunk, bounds, planB.base, planB.stride, accB,
                     planC.base, planC.stride, accC,
                     du, ddelta, ddtB, dz, dA_rows, dh0, dD_rows, db_rows, gmean_part)
    if fl[_MEAN] > 0:
        gmean = gmean_part.sum(axis=1) / channels                # mean_c d dtB, [batch, L]
        _mean_backward_kernel(delta, bias, fl, gmean, LANES, ddelta, db_rows)
    rows_sum = (lambda r: r[0] if batch == 1 else r.sum(axis=0))  # noqa: E731
    return dict(u=du, delta=ddelta, dtB=ddtB, z=dz, A=rows_sum(dA_rows),
                B4=_finish_acc(accB, planB, B4.shape), C4=_finish_acc(accC, planC, C4.shape),
                h0=dh0, D=rows_sum(dD_rows), delta_bias=rows_sum(db_rows))


def fused_backward(d_out, dh_last, saved: NumbaSaved) -> dict:
    """Backward of :func:`fused_forward`, fused the same way.

    Parameters
    ----------
    d_out : ndarray ``[batch, seq_len, channels]``
    dh_last : ndarray ``[batch, channels, state]`` or None
    saved : NumbaSaved

    Returns
    -------
    dict
        ``u, delta, z`` ``[batch, seq_len, channels]`` (``z`` None without a
        gate); ``A`` ``[channels, state]``; ``B4, C4`` ``[bB, LB, G, state]``;
        ``h0`` ``[batch, channels, state]``; ``D``, ``delta_bias``
        ``[channels]``, summed over batch and time (meaningless when the
        forward had no ``D`` / ``delta_bias``: the caller drops them).
    """
    g = _backward(d_out, dh_last, saved)
    del g["dtB"]
    if not saved.fl[_HAS_Z] > 0:
        g["z"] = None
    return g


def scan_core_backward(dy, dh_last, saved: NumbaSaved):
    """Backward of :func:`scan_core_forward` (same contract as the NumPy engine's).

    Parameters
    ----------
    dy : ndarray ``[batch, seq_len, channels]``
    dh_last : ndarray ``[batch, channels, state]`` or None
    saved : NumbaSaved

    Returns
    -------
    dict
        ``u, dt, dtB`` ``[batch, seq_len, channels]``; ``A`` ``[channels, state]``;
        ``B4, C4`` ``[bB, LB, G, state]``; ``h0`` ``[batch, channels, state]``.
    """
    g = _backward(dy, dh_last, saved)
    return {"u": g["u"], "dt": g["delta"], "dtB": g["dtB"], "A": g["A"], "B4": g["B4"],
            "C4": g["C4"], "h0": g["h0"]}
