"""Time the selective-scan engines: the same figures as ``refssm bench``.

Usage::

    python benchmarks/bench_scan.py                # W1-W4, float64 and float32
    python benchmarks/bench_scan.py W1 W3          # chosen workloads
"""
import sys

from refssm.bench import bench_scan, format_bench

if __name__ == "__main__":
    workloads = sys.argv[1:] or ["W1", "W2", "W3", "W4"]
    print(format_bench(bench_scan(workloads=workloads)))
