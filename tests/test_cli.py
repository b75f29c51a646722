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
    # strict JSON (no Infinity / NaN tokens, which other languages' parsers reject)
    json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON token {c}"))
    for f in figures:
        assert set(f) >= {"arch", "preset", "check", "value", "budget", "ok"}
        if f["budget"] is None:                    # an explained gap, no budget
            assert f["check"] == "param_count: original formula's relative gap", f
        else:
            assert f["ok"] and 0 <= f["value"] <= f["budget"], f
    assert any(f["budget"] is None for f in figures)
    # no vacuous rows: the SSTransformer's edifice (EMA) path ignores the engine
    assert not [f for f in figures if f["arch"] == "ss_transformer" and f["preset"] == "edifice"
                and "engine vs numpy" in f["check"]]
    assert [f for f in figures if f["arch"] == "ss_transformer" and f["preset"] == "mamba_ssm"
            and "engine vs numpy" in f["check"]]
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


def test_a_check_that_raises_is_a_failing_figure_and_the_others_still_run(capsys):
    import io

    from refssm.verify.report import run_checks, to_json

    def check_ok():
        return [Figure("core", "-", "fine", 0.0, 1e-12, True)]

    def check_boom():
        raise RuntimeError("kaput")

    err = io.StringIO()
    figs = run_checks([check_boom, check_ok], progress=err)
    assert [f.check for f in figs] == ["check_boom raised", "fine"]
    assert not figs[0].ok and "RuntimeError: kaput" in figs[0].detail
    assert "RAISED" in err.getvalue() and "Traceback" in err.getvalue()
    assert "OVER BUDGET" not in err.getvalue()      # it raised; "over budget" would be wrong
    assert json.loads(to_json(figs))[0]["value"] is None
    assert "1 over budget" in format_table(figs)


@pytest.mark.parametrize("argv, msg", [
    (["golden", "--out", "{tmp}/fx", "--dtypes", "float16"], "--dtypes: expected a comma-separated"),
    (["golden", "--out", "{tmp}/fx", "--dtypes", "float64,bogus"], "got 'float64,bogus'"),
    (["golden", "--out", "{tmp}/fx", "--seed", "-1"], "--seed: expected an integer >= 0, got -1"),
    (["golden", "--out", "{tmp}/afile"], "--out: expected a folder, got the file"),
    (["bench", "--dtypes", "float16"], "refssm bench: --dtypes: expected"),
    (["verify", "--json", "{tmp}/missing/f.json"], "--json: expected a file in an existing folder"),
    (["verify", "--report", "{tmp}"], "--report: expected a file, got the folder"),
    (["plot", "mamba", "--out", "{tmp}"], "--out: expected a .png file, got the folder"),
    (["plot", "s5", "--out", "{tmp}/s5.png", "--preset", "s5"], "takes no preset, got 's5'"),
    (["plot", "scan", "--out", "{tmp}/s.png", "--preset", "edifice"], "bare selective scan"),
])
def test_bad_arguments_are_refused_up_front(argv, msg, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "fx").exists()          # nothing written before the refusal


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


def test_compare_takes_a_candidate_folder(tmp_path, capsys):
    from refssm.golden import write_fixture

    x = np.arange(4.0)
    fx = write_fixture(tmp_path / "fx", arch="core", preset="-", config={}, seed=0,
                       dtype="float64", tensors={"input/x": x, "output/y": 2 * x},
                       tolerances={"output": 1e-12})
    write_fixture(tmp_path / "mine", arch="core", preset="-", config={}, seed=0,
                  dtype="float64", tensors={"output/y": 2 * x}, tolerances={})
    assert main(["compare", fx, str(tmp_path / "mine")]) == 0
    assert "1 tensors compared, 1 within tolerance, 0 failed" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["compare", fx, str(tmp_path / "empty")]) == 2
    assert "expected a .safetensors file or a folder holding" in capsys.readouterr().err
    assert main(["compare", fx, fx]) == 2                       # the fixture against itself
    assert "got the fixture's own tensors" in capsys.readouterr().err


def test_golden_writes_each_dtype_once(tmp_path, capsys):
    assert main(["golden", "--out", str(tmp_path / "fx"), "--dtypes", "float64,float64"]) == 0
    n = len(list((tmp_path / "fx").glob("*/*/manifest.json")))
    assert f"wrote {n} fixtures" in capsys.readouterr().out and n == len(
        list((tmp_path / "fx" / "float64").iterdir()))


def test_bench_counts_each_workload_once_and_small_arrays_in_the_peak():
    # a repeated workload gave ratios against another block's NumPy row; with a 4 MiB mmap
    # threshold the returned gradients of a small workload (each < 4 MiB) read as 0 MiB
    res = bench_scan(workloads=["s", "s"], dtypes=["float64", "float64"], repeats=1,
                     with_torch=False, progress=None, sizes={"s": (2, 512, 256, 16)},
                     min_time=0.0)
    assert [r.engine for r in res] == ["numpy", "numba", "logdepth"]
    grads = 3 * 2 * 256 * 512 * 8                  # du, d delta, dz alone: 6 MiB (read 0.2)
    fused = [r for r in res if r.engine == "numba"][0]
    assert fused.peak_extra_bytes is None or fused.peak_extra_bytes >= grads


def test_bench_formats_say_what_they_mean(monkeypatch):
    from refssm import bench
    from refssm.scan import s5_engines

    assert bench._fmt_time(0.000201) == "0.201 ms" and bench._fmt_time(0.0123) == "12.30 ms"
    assert bench._fmt_mib(0.4 * 2**20) == "0.4 MiB" and bench._fmt_mib(73.2 * 2**20) == "73 MiB"
    rows = [dict(engine=e, seq_len=L, median_s=t) for L, ts in
            ((1, dict(numba=1e-3, logdepth=2e-3, fft=2e-3)),
             (2, dict(numba=4e-3, logdepth=5e-3, fft=2e-3)),
             (3, dict(numba=2e-3, logdepth=3e-3, fft=2e-3))) for e, t in ts.items()]
    monkeypatch.setattr(s5_engines, "bench_s5", lambda *a, **k: rows)
    text = bench.bench_s5_engines(seq_lens=(1, 2, 3), repeats=1, progress=None)
    assert "L=1: fft 2.00 ms vs best Numba scan 1.00 ms: the scans are 2.00x faster" in text
    assert "L=2: fft 2.00 ms vs best Numba scan 4.00 ms: the FFT is 2.00x faster" in text
    assert "L=3: fft 2.00 ms vs best Numba scan 2.00 ms: a tie" in text
