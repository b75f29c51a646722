"""The ``refssm`` command: verify prints figures within budget; bench returns sane results."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from refssm.bench import bench_scan, format_bench
from refssm.cli import main
from refssm.verify.core import Figure
from refssm.verify.report import format_table


def test_verify_main_job_passes_and_writes_json_and_report(tmp_path, capsys):
    js = tmp_path / "figures.json"
    md = tmp_path / "report.md"
    code = main(["verify", "--json", str(js), "--report", str(md)])
    out = capsys.readouterr().out
    figures = json.loads(js.read_text())
    assert code == 0, out
    assert len(figures) >= 10
    for f in figures:
        assert set(f) >= {"arch", "preset", "check", "value", "budget", "ok"}
        assert f["ok"] and 0 <= f["value"] <= f["budget"], f
    # every engine is compared to the ground truth, forward and backward
    checks = {f["check"] for f in figures}
    for engine in ("numba", "logdepth"):
        assert f"scan: {engine} vs numpy, forward" in checks
        assert f"scan: {engine} vs numpy, backward" in checks
    assert "within budget, 0 over budget" in out
    assert "| arch |" in md.read_text()


def test_table_marks_a_figure_over_budget():
    figs = [Figure("core", "-", "x", 2e-12, 1e-12, False), Figure("core", "-", "y", 0.0, 1e-12, True)]
    table = format_table(figs)
    assert "FAIL" in table and "1 over budget" in table


def test_bench_runs_on_tiny_sizes():
    res = bench_scan(workloads=["tiny"], dtypes=["float64"], repeats=1, with_torch=False,
                     progress=None, sizes={"tiny": (1, 8, 16, 4)})
    assert [r.engine for r in res] == ["numpy", "numba", "logdepth"]
    for r in res:
        assert r.forward > 0 and r.forward_backward > 0 and np.isfinite(r.forward)
    table = format_bench(res)
    assert "x numpy" in table and "1.0x" in table


def test_bench_repeats_short_runs_until_min_time():
    """A figure is the median of ``repeats`` runs after a warm-up, and of more runs (up to
    ``100 repeats``) while they add up to less than ``min_time`` seconds."""
    from refssm.bench import _median_time
    calls = []
    assert _median_time(lambda: calls.append(1), 3) >= 0 and len(calls) == 1 + 3
    calls.clear()
    _median_time(lambda: calls.append(1), 3, min_time=60.0)
    assert len(calls) == 1 + 300
    calls.clear()
    _median_time(lambda: (calls.append(1), time.sleep(0.002)), 3, min_time=0.03)
    assert 1 + 3 < len(calls) < 1 + 300
    with pytest.raises(ValueError, match="repeats: expected an integer >= 1, got 0"):
        _median_time(lambda: None, 0)


def test_bench_rejects_zero_repeats(capsys):
    assert main(["bench", "--what", "scan", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err


def test_bench_rejects_unknown_workload(capsys):
    assert main(["bench", "--workloads", "W9"]) == 2
    assert "unknown workload 'W9'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["--help"], ["verify", "--help"], ["bench", "--help"]])
def test_help_has_examples(cmd, capsys):
    with pytest.raises(SystemExit) as exc:
        main(cmd)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "refssm" in out
    if cmd != ["--help"]:
        assert "examples:" in out


@pytest.mark.parametrize("arch", ["scan", "mamba", "s5", "gated_ssm", "ss_transformer"])
def test_plot_writes_a_png(arch, tmp_path, capsys):
    out = tmp_path / f"{arch}.png"
    assert main(["plot", arch, "--out", str(out), "--seq-len", "24"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_plot_rejects_bad_length(tmp_path, capsys):
    assert main(["plot", "mamba", "--out", str(tmp_path / "x.png"), "--seq-len", "0"]) == 2
    assert "--seq-len: expected a positive integer, got 0" in capsys.readouterr().err


def test_model_bench_reports_every_architecture():
    from refssm.bench import bench_models, format_model_bench

    res = bench_models(engines=("numpy",), seq_len=4, repeats=1, progress=None)
    assert {r.arch for r in res} == {"mamba", "gated_ssm", "s5", "ss_transformer"}
    for r in res:
        assert r.forward > 0 and (r.step_per_frame is None or r.step_per_frame > 0)
    assert "step per frame" in format_model_bench(res)


def test_bench_rejects_unknown_what(capsys):
    assert main(["bench", "--what", "gpu"]) == 2
    assert "unknown --what ['gpu']" in capsys.readouterr().err
