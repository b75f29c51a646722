"""The ``refssm`` command.

Examples
--------
::

    refssm verify                      # every oracle check, one table; exit 1 if any over budget
    refssm verify --json figures.json --report report.md
    refssm bench                       # time the scan engines (W1-W4, float64 and float32)
    refssm bench --workloads W3 --dtypes float64 --repeats 5
    refssm golden --out fixtures/      # write the golden fixture suite
    refssm compare fixtures/float64/mamba_mamba_ssm_small mine.safetensors
    refssm plot mamba --out mamba_state.png
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__

#: The dtypes ``bench`` and ``golden`` take.
DTYPES = ("float64", "float32")


def _fail(cmd, msg) -> int:
    print(f"refssm {cmd}: {msg}", file=sys.stderr)
    return 2


def _dtypes(cmd, text):
    """``--dtypes`` split and checked: ``(list, None)`` or ``(None, exit code)``."""
    dtypes = list(dict.fromkeys(d for d in text.split(",") if d))     # in order, once each
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        return None, _fail(cmd, f"--dtypes: expected a comma-separated subset of "
                                f"{', '.join(DTYPES)}, got {text!r}")
    return dtypes, None


def _writable_file(cmd, opt, path):
    """None if ``path``'s folder exists (checked before a long run), else an exit code."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return _fail(cmd, f"{opt}: expected a file in an existing folder, got {path!r} "
                          f"({folder} does not exist)")
    if os.path.isdir(path):
        return _fail(cmd, f"{opt}: expected a file, got the folder {path!r}")
    return None


def _cmd_verify(args) -> int:
    from .verify.report import format_markdown, format_table, run_checks, to_json

    for opt, path in (("--json", args.json), ("--report", args.report)):
        if path and (code := _writable_file("verify", opt, path)) is not None:
            return code
    print(f"refssm {__version__} verify: oracle checks (float64)", file=sys.stderr)
    figures = run_checks(progress=sys.stderr)
    print(format_table(figures))
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(to_json(figures))
    if args.report:
        with open(args.report, "w") as fh:
            fh.write(format_markdown(figures))
    return 0 if all(f.ok for f in figures) else 1


def _cmd_bench(args) -> int:
    from .bench import (WORKLOADS, bench_models, bench_s5_engines, bench_scan, format_bench,
                        format_model_bench)

    what = args.what.split(",")
    unknown = sorted(set(what) - {"scan", "models", "s5"})
    if unknown:
        return _fail("bench", f"unknown --what {unknown}; expected scan, models, s5")
    if args.repeats < 1:
        return _fail("bench", f"--repeats must be >= 1, got {args.repeats}")
    dtypes, code = _dtypes("bench", args.dtypes)
    if code is not None:
        return code
    workloads = args.workloads.split(",")             # bench_scan times each once
    for w in workloads:
        if w not in WORKLOADS:
            return _fail("bench", f"unknown workload {w!r}; expected one of {sorted(WORKLOADS)}")
    if "scan" in what:
        results = bench_scan(workloads=workloads, dtypes=dtypes,
                             repeats=args.repeats, with_torch=not args.no_torch,
                             progress=sys.stderr)
        print("Selective scan engines\n")
        print(format_bench(results))
    if "models" in what:
        print("\nWhole models at recommended defaults (batch 1, embed 287)\n")
        print(format_model_bench(bench_models(repeats=args.repeats, progress=sys.stderr)))
    if "s5" in what:
        print("\nS5 engines, forward, H 256, P 64, batch 1\n")
        print(bench_s5_engines(repeats=args.repeats, progress=sys.stderr))
    return 0


def _cmd_golden(args) -> int:
    from .golden import write_suite

    dtypes, code = _dtypes("golden", args.dtypes)
    if code is not None:
        return code
    if args.seed < 0:
        return _fail("golden", f"--seed: expected an integer >= 0, got {args.seed}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return _fail("golden", f"--out: expected a folder, got the file {args.out!r}")
    paths = write_suite(args.out, seed=args.seed, dtypes=dtypes, progress=sys.stderr)
    print(f"wrote {len(paths)} fixtures under {args.out}")
    return 0


def _cmd_compare(args) -> int:
    from safetensors.numpy import load_file

    from .golden import FixtureError, compare_tensors, format_compare, read_fixture

    try:
        fixture = read_fixture(args.fixture)
    except FixtureError as exc:
        return _fail("compare", f"bad fixture: {exc}")
    cand = args.candidate
    if os.path.isdir(cand):              # a fixture-like folder: its tensors.safetensors
        cand = os.path.join(cand, "tensors.safetensors")
        if not os.path.isfile(cand):
            return _fail("compare", f"candidate: expected a .safetensors file or a folder "
                                    f"holding tensors.safetensors, got {args.candidate!r}")
    ref = os.path.join(args.fixture, "tensors.safetensors")
    if os.path.isfile(cand) and os.path.isfile(ref) and os.path.samefile(cand, ref):
        return _fail("compare", f"candidate: expected another implementation's outputs, got "
                                f"the fixture's own tensors ({cand})")
    try:
        candidate = load_file(cand)
    except Exception as exc:  # safetensors' own error types
        return _fail("compare", f"cannot read candidate {args.candidate}: {exc}")
    rows = compare_tensors(fixture, candidate)
    m = fixture.manifest
    print(f"fixture {args.fixture}: {m['arch']} / {m['preset']} / {m['dtype']}")
    print(format_compare(rows))
    return 0 if rows and all(r.ok for r in rows) else 1


def _cmd_plot(args) -> int:
    from .viz import plot_main

    if args.seq_len < 1:
        return _fail("plot", f"--seq-len: expected a positive integer, got {args.seq_len}")
    if os.path.isdir(args.out):
        return _fail("plot", f"--out: expected a .png file, got the folder {args.out!r}")
    opts = {"seq_len": args.seq_len, "seed": args.seed}
    if args.preset:
        if args.arch in ("scan", "s5"):
            what = "the bare selective scan" if args.arch == "scan" else "one S5 layer"
            return _fail("plot", f"--preset: the {args.arch} plot draws {what} and takes no "
                                 f"preset, got {args.preset!r}")
        opts["preset"] = args.preset
    try:
        plot_main(args.arch, args.out, **opts)
    except ValueError as exc:
        return _fail("plot", str(exc))
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refssm",
        description="NumPy/Numba reference implementation of selective state-space models: "
                    "oracle checks, benchmarks.",
        epilog="Run 'refssm COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"refssm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "verify", help="run every oracle check and print a table of figures",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every oracle check (discretization vs scipy, scan engines agreeing, "
                    "gradients vs finite differences, stepping vs one call) and print one table "
                    "of figures against their budgets. Exits 1 if any figure is over budget.",
        epilog="examples:\n  refssm verify\n  refssm verify --json figures.json --report report.md")
    p.add_argument("--json", metavar="FILE", help="also write the figures as a JSON list")
    p.add_argument("--report", metavar="FILE.md", help="also write a Markdown report")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser(
        "bench", help="time the selective-scan engines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Median of --repeats runs after a warm-up (for the scan engines, more runs "
                    "while they add up to less than 0.5 s), forward and forward+backward, "
                    "for the NumPy, Numba fused and Numba log-depth engines (and a torch "
                    "transcription when torch is installed: forward the median of up to 3 "
                    "runs, forward+backward one run), with ratios against NumPy and the "
                    "peak extra memory. W1=(1,1536,2048,16) W2=(8,512,1024,16) W3=(1,256,60,16) "
                    "W4=(1,256,65536,16) as (batch, channels, seq_len, state).",
        epilog="examples:\n  refssm bench\n  refssm bench --what scan --workloads W1,W3 --dtypes float64"
               "\n  refssm bench --what models,s5")
    p.add_argument("--what", default="scan,models,s5",
                   help="comma-separated: scan (the selective-scan engines), models (forward and "
                        "step of the four architectures), s5 (S5's engines and the FFT)")
    p.add_argument("--workloads", default="W1,W2,W3,W4", help="comma-separated (default: all)")
    p.add_argument("--dtypes", default="float64,float32", help="comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default 5)")
    p.add_argument("--no-torch", action="store_true", help="skip the torch transcription")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "golden", help="write the golden fixture suite",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write every fixture (core discretization and selective scan; each "
                    "architecture x preset x two configs) as OUT/<dtype>/<name>/ with "
                    "manifest.json + tensors.safetensors. Same seed -> byte-identical files.",
        epilog="examples:\n  refssm golden --out fixtures/\n"
               "  refssm golden --out fixtures/ --dtypes float64 --seed 1")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtypes", default="float64,float32", help="comma-separated")
    p.set_defaults(func=_cmd_golden)

    p = sub.add_parser(
        "compare", help="check another implementation's outputs against a fixture",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="CANDIDATE is a safetensors file (or a folder holding tensors.safetensors) "
                    "with the fixture's output/, step/, "
                    "cache/, grad/ and core/ tensors under the same names, computed by another "
                    "implementation from the fixture's inputs and parameters. Prints a per-tensor "
                    "table (max abs, normwise relative error, tolerance) and exits 1 if any "
                    "tensor is missing or out of tolerance, 2 if a file cannot be trusted.",
        epilog="examples:\n  refssm compare fixtures/float64/mamba_edifice_small out.safetensors")
    p.add_argument("fixture", metavar="FIXTURE", help="fixture folder")
    p.add_argument("candidate", metavar="CANDIDATE",
                   help="a .safetensors file, or a folder holding tensors.safetensors")
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser(
        "plot", help="draw the state evolution of an architecture to a PNG",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build ARCH with its default initialisation, feed it a demo input (sine, "
                    "noise, pulses; 'scan' uses a selective-copying input) and draw how its "
                    "state evolves over time, with delta / gates where the model has them.",
        epilog="examples:\n  refssm plot mamba --out mamba_state.png\n"
               "  refssm plot scan --out scan.png --seq-len 128\n"
               "  refssm plot ss_transformer --out gate.png --preset edifice")
    p.add_argument("arch", choices=["scan", "mamba", "s5", "gated_ssm", "ss_transformer"])
    p.add_argument("--out", required=True, metavar="FILE.png")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default=None,
                   help="mamba, gated_ssm, ss_transformer: the model's preset (default: its "
                        "default); scan and s5 take none")
    p.set_defaults(func=_cmd_plot)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
