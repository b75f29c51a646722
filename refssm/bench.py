"""Benchmarks of the selective-scan engines (``refssm bench``).

Speed is measured here, never asserted in tests. Each entry of the refssm
engines is the median of ``repeats`` timed runs after one warm-up run (which
also triggers Numba's JIT or loads its cache), and of more runs when those take
less than ``min_time`` in all (the selective-scan table: 0.5 s), with ratios
against the NumPy engine of the same run and, when torch is installed, against a
torch transcription of the official ``selective_scan_ref`` loop. The torch rows
are cheaper to keep short: forward is the median of ``min(repeats, 3)`` runs,
forward+backward one run (autograd over the Python loop is slow). Timings run
with the allocator's defaults, as a user's program would. Peak extra memory is the growth of the
resident set (Linux ``VmHWM`` after resetting it through
``/proc/self/clear_refs``) during one forward+backward, so it counts Numba's
allocations as well as NumPy's. It is measured in a child process started with
a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_`` = 128 KiB): otherwise
glibc raises its threshold after the first large free and serves later arrays
from heap memory that is already resident, and the growth reads as 0. (Not in
the timed process: on this VM every page fault of a fresh mmap costs ~2 us,
which slowed the NumPy engine and the fused one alike, by up to 2x and 1.5x.)
Arrays from 128 KiB up are counted exactly, smaller ones not at all (with the
threshold at 4 MiB, as before, the returned gradients of a small workload read
as 0). Not on Linux: "-".
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from ._text import text_table
from .ssm.selective_scan import ENGINES, selective_scan_backward, selective_scan_forward
from .verify.peers import torch_selective_scan

__all__ = ["WORKLOADS", "BenchResult", "make_inputs", "bench_scan", "format_bench"]

#: name -> (batch, channels, seq_len, state), from the core issue.
WORKLOADS = {
    "W1": (1, 1536, 2048, 16),
    "W2": (8, 512, 1024, 16),
    "W3": (1, 256, 60, 16),
    "W4": (1, 256, 65536, 16),
}


@dataclass
class BenchResult:
    """Timings of one engine on one workload and dtype (seconds, medians)."""

    workload: str
    dtype: str
    engine: str
    forward: float
    forward_backward: float | None
    peak_extra_bytes: int | None = None
    input_bytes: int = 0
    notes: list = field(default_factory=list)


def make_inputs(batch, channels, seq_len, state, dtype=np.float64, seed=0):
    """Mamba-like inputs: variable B/C, softplus delta in ~[1e-3, 0.1], D and z."""
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return dict(
        u=f(batch, seq_len, channels),
        delta=rng.uniform(-6.0, -2.3, (batch, seq_len, channels)).astype(dtype),
        A=(-np.tile(np.arange(1.0, state + 1), (channels, 1))).astype(dtype),
        B=f(batch, seq_len, state), C=f(batch, seq_len, state),
        D=np.ones(channels, dtype=dtype), z=f(batch, seq_len, channels),
        delta_bias=np.zeros(channels, dtype=dtype), delta_softplus=True,
    )


def _median_time(fn, repeats, min_time=0.0):
    """Median of ``repeats`` timed runs of ``fn`` after a warm-up, and of more (up to
    ``100 repeats``) until the runs add up to ``min_time`` seconds.

    A run of under a millisecond (W3) is at the mercy of the scheduler: on this
    2-core VM, medians of 5 runs of the same call ranged over 1.7x (log-depth
    forward at W3, float64: 0.334 to 0.566 ms; the median of 400 runs 0.337 ms).
    """
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats: expected an integer >= 1, got {repeats!r}")
    fn()  # warm-up (JIT / cache load)
    times = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < 100 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _rss_kib(key):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_extra_bytes(fn):
    """Peak resident-set growth while ``fn`` runs (Linux only; None elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return None
    before = _rss_kib("VmRSS:")
    fn()
    peak = _rss_kib("VmHWM:")
    if before is None or peak is None:
        return None
    return max(0, (peak - before) * 1024)


#: glibc's mmap threshold in the memory-measuring child: allocations from this size up
#: are fresh mappings, whose pages the peak counts (see the module docstring).
MMAP_THRESHOLD = 128 * 1024


def _peak_extra_bytes_child(size, dtype, engine):
    """:func:`_peak_extra_bytes` of one forward+backward, in a child process with a fixed
    mmap threshold (see the module docstring); None where that cannot be measured."""
    import subprocess

    if not sys.platform.startswith("linux"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    code = "from refssm.bench import _peak_child_main; _peak_child_main()"
    args = [str(v) for v in size] + [str(dtype), engine]
    try:
        out = subprocess.run([sys.executable, "-c", code] + args, env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        return None if out == "None" else int(out)
    except (subprocess.CalledProcessError, ValueError):
        return None


def _peak_child_main(argv=None):
    """Child of :func:`_peak_extra_bytes_child`: ``batch channels seq_len state dtype engine``."""
    batch, channels, seq_len, state, dtype, engine = (argv or sys.argv[1:])[:6]
    inputs = make_inputs(int(batch), int(channels), int(seq_len), int(state), np.dtype(dtype))
    d_out = np.ones_like(inputs["u"])

    def fwd_bwd():
        _, _, saved = selective_scan_forward(**inputs, engine=engine)
        selective_scan_backward(d_out, None, saved)

    fwd_bwd()                                  # JIT / cache load outside the measurement
    print(_peak_extra_bytes(fwd_bwd))


def _torch_fns(inputs):
    """Forward and forward+backward closures of a torch transcription (or None)."""
    try:
        import torch
    except ImportError:
        return None
    dtype = torch.float64 if inputs["u"].dtype == np.float64 else torch.float32
    t = {k: torch.tensor(v, dtype=dtype) for k, v in inputs.items() if isinstance(v, np.ndarray)}

    def forward(requires_grad=False):
        tt = {k: v.clone().requires_grad_(requires_grad) for k, v in t.items()}
        h0 = torch.zeros(tt["u"].shape[0], tt["u"].shape[2], tt["A"].shape[1], dtype=dtype)
        return torch_selective_scan(torch, tt["u"], tt["delta"], tt["A"], tt["B"], tt["C"],
                                    tt["D"], tt["z"], tt["delta_bias"], h0, True)[0]

    def fwd():
        with torch.no_grad():
            forward(False)

    def fwd_bwd():
        forward(True).sum().backward()

    return fwd, fwd_bwd


def bench_scan(workloads=("W1", "W2", "W3", "W4"), dtypes=("float64", "float32"),
               engines=ENGINES, repeats=5, with_torch=True, torch_backward_max=2_000_000,
               progress=sys.stderr, sizes=None, min_time=0.5):
    """Time every engine on every workload; returns a list of :class:`BenchResult`.

    Parameters
    ----------
    workloads : sequence of str
        Keys of :data:`WORKLOADS` (or of ``sizes``).
    dtypes : sequence of str
    engines : sequence of str
    repeats : int
        Timed runs per figure (median reported), after one warm-up; more while
        they add up to less than ``min_time`` seconds. Each engine's
        runs follow one another (its steady state, as in a user's loop; taking
        turns between engines instead made each run pay for the previous
        engine's memory churn, on this VM up to 1.6x for the fused engine).
    with_torch : bool
        Also time a torch transcription when torch is importable.
    torch_backward_max : int
        Skip torch forward+backward above this many ``batch*seq_len*channels``
        elements (autograd over a Python loop takes minutes at W1).
    sizes : dict, optional
        Override :data:`WORKLOADS` (tests use tiny sizes).
    min_time : float
        Seconds that each engine's runs of a figure add up to at least (up to ``100
        repeats`` runs), so that sub-millisecond figures are medians of many runs.
    """
    sizes = sizes or WORKLOADS
    results = []
    # each once: a repeated workload made its engines' ratios refer to another block's
    # NumPy row (and the NumPy rows to each other)
    workloads, dtypes = list(dict.fromkeys(workloads)), list(dict.fromkeys(dtypes))
    for wl in workloads:
        batch, channels, seq_len, state = sizes[wl]
        for dtype in dtypes:
            inputs = make_inputs(batch, channels, seq_len, state, np.dtype(dtype))
            in_bytes = sum(v.nbytes for v in inputs.values() if isinstance(v, np.ndarray))
            d_out = np.ones_like(inputs["u"])
            for engine in engines:
                if progress:
                    print(f"  {wl} {dtype} {engine} ...", file=progress, flush=True)

                def fwd(engine=engine):
                    return selective_scan_forward(**inputs, engine=engine)

                def fwd_bwd(engine=engine):
                    _, _, saved = selective_scan_forward(**inputs, engine=engine)
                    return selective_scan_backward(d_out, None, saved)

                r_fwd = _median_time(fwd, repeats, min_time)
                r_fb = _median_time(fwd_bwd, repeats, min_time)
                peak = _peak_extra_bytes_child(sizes[wl], dtype, engine)
                results.append(BenchResult(wl, dtype, engine, r_fwd, r_fb, peak, in_bytes))
            if with_torch:
                fns = _torch_fns(inputs)
                if fns is not None:
                    if progress:
                        print(f"  {wl} {dtype} torch ...", file=progress, flush=True)
                    t_fwd = _median_time(fns[0], max(1, min(repeats, 3)))
                    n = batch * seq_len * channels
                    t_fb = _median_time(fns[1], 1) if n <= torch_backward_max else None
                    notes = [] if t_fb is not None else ["fwd+bwd skipped (minutes)"]
                    results.append(BenchResult(wl, dtype, "torch", t_fwd, t_fb, None, in_bytes,
                                               notes))
    return results


def _fmt_time(s):
    """Milliseconds with three significant digits below 1 ms (``0.200 ms``), else two
    decimals; seconds from 10 s."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e3:.2f} ms" if s < 10 else f"{s:.1f} s"


def _fmt_mib(n):
    """MiB with one decimal below 10 MiB (a W3 workload's 0.4 MiB of inputs read '0')."""
    m = n / 2**20
    return f"{m:.1f} MiB" if m < 10 else f"{m:.0f} MiB"


def format_bench(results) -> str:
    """A table: medians, ratio of NumPy's time to each engine's, peak extra memory."""
    rows = [("workload", "dtype", "engine", "forward", "x numpy", "fwd+bwd", "x numpy",
             "peak extra / inputs")]
    by_key = {(r.workload, r.dtype, r.engine): r for r in results}
    for r in results:
        ref = by_key.get((r.workload, r.dtype, "numpy"))
        fr = f"{ref.forward / r.forward:.1f}x" if ref else "-"
        br = (f"{ref.forward_backward / r.forward_backward:.1f}x"
              if ref and r.forward_backward else "-")
        mem = (f"{_fmt_mib(r.peak_extra_bytes)} / {_fmt_mib(r.input_bytes)}"
               if r.peak_extra_bytes is not None else "-")
        rows.append((r.workload, r.dtype, r.engine, _fmt_time(r.forward), fr,
                     _fmt_time(r.forward_backward), br, mem + ("  " + "; ".join(r.notes)
                                                               if r.notes else "")))
    lines = text_table(rows)
    lines.append("")
    lines.append(f"threads: {_num_threads()}; ratios are NumPy time / engine time (same run)")
    return "\n".join(lines)


def _num_threads():
    try:
        import numba
        return numba.get_num_threads()
    except Exception:  # pragma: no cover
        return os.cpu_count()


# ---------------------------------------------------------------------------
# Whole models: forward over a window and step per frame
# ---------------------------------------------------------------------------

@dataclass
class ModelBenchResult:
    """One architecture/preset at its recommended defaults (seconds, medians)."""

    arch: str
    preset: str
    engine: str
    forward: float
    step_per_frame: float | None


def bench_models(archs=None, engines=("numpy", "numba"), seq_len=60, embed_dim=287, repeats=5,
                 progress=sys.stderr):
    """Time every architecture's forward (batch 1, ``seq_len`` frames) and ``step``.

    Each architecture runs at ``recommended_defaults()`` (dropout off: inference)
    with its default preset. ``step_per_frame`` is the median over ``repeats``
    runs of ``seq_len`` consecutive steps, divided by ``seq_len``: the NumPy
    ``step`` on the "numpy" row; on the "numba" row the architecture's
    compiled stepper where it has one (Mamba's ``make_stepper``), else none.
    """
    from .verify.models import available_archs

    results = []
    for arch, mod, presets in available_archs():
        if archs and arch not in archs:
            continue
        preset = presets[0]
        c = mod.as_config(dict(mod.recommended_defaults(), embed_dim=embed_dim, dropout=0.0,
                               preset=preset))
        params = mod.build(c, seed=0).params
        x = np.random.default_rng(0).standard_normal((1, seq_len, embed_dim))
        for engine in engines:
            if progress:
                print(f"  {arch} {preset} {engine} ...", file=progress, flush=True)
            try:
                t_fwd = _median_time(lambda: mod.forward(params, x, c, engine=engine), repeats)
            except ValueError as exc:        # an architecture without this engine
                if "engine" in str(exc):
                    continue
                raise
            t_step = None
            step_fn = None
            if getattr(c, "scan_mode", "causal") == "causal":
                if engine == "numpy":
                    step_fn = lambda cache, f: mod.step(params, cache, f, c)  # noqa: E731
                elif engine == "numba" and hasattr(mod, "make_stepper"):
                    step_fn = mod.make_stepper(params, c).step
            if step_fn is not None:
                def run_steps():
                    cache = mod.init_cache(c, 1)
                    for t in range(seq_len):
                        _, cache = step_fn(cache, x[:, t])
                t_step = _median_time(run_steps, repeats) / seq_len
            results.append(ModelBenchResult(arch, preset, engine, t_fwd, t_step))
    return results


def format_model_bench(results) -> str:
    """Table: forward per window, ratio NumPy/engine, step per frame."""
    rows = [("arch", "preset", "engine", "forward (60 frames)", "x numpy", "step per frame")]
    ref = {(r.arch, r.preset): r for r in results if r.engine == "numpy"}
    for r in results:
        base = ref.get((r.arch, r.preset))
        ratio = f"{base.forward / r.forward:.1f}x" if base else "-"
        step = f"{r.step_per_frame * 1e6:.0f} us" if r.step_per_frame is not None else "-"
        rows.append((r.arch, r.preset, r.engine, _fmt_time(r.forward), ratio, step))
    return "\n".join(text_table(rows))


def bench_s5_engines(seq_lens=(60, 4096, 65536), repeats=5, progress=sys.stderr) -> str:
    """S5's engines at H 256, P 64 (forward), and where the FFT beats the scans."""
    from .scan.s5_engines import bench_s5

    rows = bench_s5(256, 64, seq_lens=seq_lens, repeats=repeats, verbose=False)
    engines = sorted({r["engine"] for r in rows}, key=lambda e: [r["engine"] for r in rows].index(e))
    lines = ["engine     " + "  ".join(f"L={L:<8d}" for L in seq_lens)]
    by = {(r["engine"], r["seq_len"]): r for r in rows}
    for e in engines:
        cells = []
        for L in seq_lens:
            m = by[(e, L)].get("median_s")
            cells.append(f"{_fmt_time(m):<10s}" if m is not None else "skipped   ")
        lines.append(f"{e:<10s} " + "  ".join(cells))
    for L in seq_lens:
        fft = by.get(("fft", L), {}).get("median_s")
        scans = [by[(e, L)]["median_s"] for e in ("numba", "logdepth")
                 if by.get((e, L), {}).get("median_s") is not None]
        if fft is not None and scans:
            best = min(scans)
            if fft < best:
                verdict = f"the FFT is {best / fft:.2f}x faster than the scans"
            elif best < fft:
                verdict = f"the scans are {fft / best:.2f}x faster than the FFT"
            else:
                verdict = "a tie"
            lines.append(f"L={L}: fft {_fmt_time(fft)} vs best Numba scan {_fmt_time(best)}: "
                         f"{verdict}")
    return "\n".join(lines)
