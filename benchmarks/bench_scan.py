"""Time the selective-scan engines: the same figures as ``refssm bench``.

Usage::

    python benchmarks/bench_scan.py                # W1-W4, float64 and float32
    python benchmarks/bench_scan.py W1 W3          # chosen workloads
"""
import os
import sys

from refssm.bench import bench_scan, format_bench

if __name__ == "__main__":
    if not os.environ.get("MALLOC_MMAP_THRESHOLD_") and sys.platform.startswith("linux"):
        # fixed mmap threshold, so the peak-memory column is measured (see refssm.bench)
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_="4194304"))
    workloads = sys.argv[1:] or ["W1", "W2", "W3", "W4"]
    print(format_bench(bench_scan(workloads=workloads)))
