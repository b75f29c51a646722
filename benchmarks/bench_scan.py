"""Time the selective-scan engines: the same figures as ``refssm bench``.

Usage::

    python benchmarks/bench_scan.py                # W1-W4, float64 and float32
    python benchmarks/bench_scan.py W1 W3          # chosen workloads
    python benchmarks/bench_scan.py --help         # every option of refssm bench
"""
import sys

from refssm.cli import main

if __name__ == "__main__":
    # the command's own argument checks and --help (a bare KeyError before)
    args = sys.argv[1:]
    if args and not args[0].startswith("-"):
        args = ["--workloads", ",".join(args)]
    sys.exit(main(["bench", "--what", "scan"] + args))
