"""Golden fixtures: byte-identical, verified on read, and with teeth."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from refssm.cli import main
from refssm.golden import FixtureError, compare_tensors, read_fixture, write_fixture, write_suite
from refssm.golden.suite import SUITE
from refssm.models import mamba


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("golden")
    write_suite(str(d), progress=None)
    return d


def _hashes(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_same_seed_gives_byte_identical_files(suite_dir, tmp_path):
    write_suite(str(tmp_path), progress=None)
    a, b = _hashes(suite_dir), _hashes(tmp_path)
    assert len(a) == 2 * 2 * len(SUITE)
    assert a == b


def test_other_seed_gives_other_numbers(suite_dir, tmp_path):
    write_suite(str(tmp_path), seed=1, dtypes=("float64",), progress=None,
                only={"mamba_mamba_ssm_small"})
    a = read_fixture(suite_dir / "float64" / "mamba_mamba_ssm_small").tensors["output/last"]
    b = read_fixture(tmp_path / "float64" / "mamba_mamba_ssm_small").tensors["output/last"]
    assert not np.allclose(a, b)


def test_every_fixture_reads_back_and_its_own_outputs_pass_compare(suite_dir):
    for dtype in ("float64", "float32"):
        for name, *_ in SUITE:
            fx = read_fixture(suite_dir / dtype / name)
            assert fx.manifest["dtype"] == dtype
            rows = compare_tensors(fx, fx.tensors)
            assert rows and all(r.ok and r.rel == 0.0 for r in rows), name


def test_params_split_on_dot_rebuild_the_axon_tree(suite_dir):
    fx = read_fixture(suite_dir / "float64" / "mamba_edifice_small")
    cfg = mamba.as_config({k: v for k, v in fx.manifest["config"].items() if k != "batch"})
    tree = fx.params()
    assert {k: {n: a.shape for n, a in p.items()} for k, p in tree.items()} == \
        {k: {n: tuple(s) for n, s in p.items()} for k, p in mamba.param_shapes(cfg).items()}
    # recomputing from the fixture's own inputs and parameters reproduces its outputs
    out = mamba.forward(tree, fx.tensors["input/x"], cfg, return_sequence=True).output
    assert np.array_equal(out, fx.tensors["output/sequence"])


def test_fixtures_have_teeth_in_their_regime(suite_dir):
    """delta well inside Edifice's clip; the state carries; seq_len beyond the conv window."""
    fx = read_fixture(suite_dir / "float64" / "core_selective_scan_edifice")
    t = fx.tensors
    dt = np.logaddexp(0, t["input/delta"] + t["input/delta_bias"])
    assert 0.002 < dt.min() and dt.max() < 0.09
    for name in ("mamba_edifice_small", "mamba_mamba_ssm_wide"):
        m = read_fixture(suite_dir / "float64" / name).manifest["config"]
        assert m["seq_len"] > 2 * m["conv_size"]


# --- perturbed implementations must fail compare ---------------------------

def _candidate_from(fx, params, cfg):
    x = fx.tensors["input/x"]
    out = mamba.forward(params, x, cfg, return_sequence=True).output
    return {"output/sequence": out, "output/last": out[:, -1]}


def _rows_for(fx, cand):
    return [r for r in compare_tensors(fx, cand) if r.name in cand]


def _perturbations():
    def drop_D(params, cfg):
        p = {k: dict(v) for k, v in params.items()}
        for layer in p:
            if "D" in p[layer]:
                p[layer]["D"] = np.zeros_like(p[layer]["D"])
        return p, cfg

    def mean_delta(params, cfg):
        return params, mamba.as_config(cfg, b_bar="channel_mean")

    def per_channel_delta(params, cfg):
        return params, mamba.as_config(cfg, b_bar="per_channel")

    def fix_A(params, cfg):
        p = {k: dict(v) for k, v in params.items()}
        for layer in p:
            if "A_log" in p[layer]:
                N = p[layer]["A_log"].shape[1]
                p[layer]["A_log"] = np.tile(np.log(np.arange(1.0, N + 1)), (p[layer]["A_log"].shape[0], 1))
        return p, cfg

    def conv_window_short(params, cfg):
        p = {k: dict(v) for k, v in params.items()}
        for layer in p:
            if layer.endswith("_conv_dw_conv"):
                k = p[layer]["kernel"].copy()
                k[0] = 0.0                       # the oldest tap: a window one frame short
                p[layer]["kernel"] = k
        return p, cfg

    return {"mamba_mamba_ssm_small": [drop_D, mean_delta, fix_A, conv_window_short],
            "mamba_edifice_small": [per_channel_delta, conv_window_short]}


@pytest.mark.parametrize("name, perturb", [(n, f) for n, fs in _perturbations().items() for f in fs],
                         ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_perturbed_implementation_fails_compare(suite_dir, name, perturb, dtype):
    fx = read_fixture(suite_dir / dtype / name)
    cfg = mamba.as_config({k: v for k, v in fx.manifest["config"].items() if k != "batch"})
    params = {k: {n: a.astype(np.float64) for n, a in p.items()} for k, p in fx.params().items()}
    good = _rows_for(fx, _candidate_from(fx, params, cfg))
    assert all(r.ok for r in good)
    bad = _rows_for(fx, _candidate_from(fx, *perturb(params, cfg)))
    assert not any(r.ok for r in bad), [(r.name, r.rel) for r in bad]
    # and not by a hair: at least 5x the fixture's tolerance (measured: the weakest
    # perturbation, fix_A, misses by 7.4e-4 against float32's 1e-4)
    tol = fx.manifest["tolerances"]["output"]
    assert min(r.rel for r in bad) > 5 * tol, [(r.name, r.rel) for r in bad]


@pytest.mark.parametrize("preset", ["mamba_ssm", "edifice"])
def test_float32_candidate_passes_float32_fixture(suite_dir, preset):
    """A real float32 computation (the scan engines run in float32) is within tolerance."""
    from refssm.ssm.selective_scan import selective_scan_backward, selective_scan_forward

    fx = read_fixture(suite_dir / "float32" / f"core_selective_scan_{preset}")
    t = fx.tensors
    args = {k: t[f"input/{k}"] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias",
                                          "initial_state")}
    cfg = fx.manifest["config"]
    opts = dict(delta_softplus=cfg["delta_softplus"])
    if preset == "edifice":
        opts.update(delta_clip=tuple(cfg["delta_clip"]), delta_b_mean=cfg["delta_b_mean"])
    cand = {}
    for engine in ("numpy", "numba", "logdepth"):
        out, last, saved = selective_scan_forward(**args, **opts, engine=engine)
        assert out.dtype == np.float32
        g = selective_scan_backward(t["input/w_out"], t["input/w_state"], saved)
        cand = {"output/out": out, "output/last_state": last,
                **{f"grad/input/{k}": v for k, v in g.items() if v is not None}}
        rows = compare_tensors(fx, cand)
        assert len(rows) == 11 and all(r.ok for r in rows), [(r.name, r.rel) for r in rows]
        assert max(r.rel for r in rows) > 1e-8          # really float32, not a copy


# --- a fixture that cannot be trusted is an error ----------------------------

def _copy(suite_dir, tmp_path, name="core_selective_scan_mamba_ssm"):
    import shutil
    dst = tmp_path / name
    shutil.copytree(suite_dir / "float64" / name, dst)
    return dst


def test_tampered_tensor_is_a_hash_error(suite_dir, tmp_path):
    d = _copy(suite_dir, tmp_path)
    t = load_file(str(d / "tensors.safetensors"))
    t["output/out"] = t["output/out"].copy()
    t["output/out"][0, 0, 0] += 1e-9
    save_file(t, str(d / "tensors.safetensors"))
    with pytest.raises(FixtureError, match=r"output/out: sha256 mismatch"):
        read_fixture(d)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=99), r"expected format_version 2, got 99"),
    (lambda m: m["tensors"].append(dict(m["tensors"][0], name="output/ghost", role="output")),
     r"listed in the manifest but missing: \['output/ghost'\]"),
    (lambda m: m.update(tensors=m["tensors"][1:]), r"not listed in the manifest"),
    (lambda m: m["tensors"][0].update(shape=[1, 2, 3, 4, 5]), r"expected shape \(1, 2, 3, 4, 5\)"),
    (lambda m: m["tensors"][0].update(dtype="float16"), r"expected dtype float16"),
    # malformed manifests: a clear FixtureError (the CLI's exit 2), never a traceback
    (lambda m: m["tensors"][0].pop("sha256"), r"expected tensors\[0\]\.sha256: a str, got 'nothing'"),
    (lambda m: m.update(tensors={}), r"expected 'tensors': a list, got \{\}"),
    (lambda m: m["tolerances"].update(output="1e-12"), r"expected tolerance 'output': a finite"),
    (lambda m: m["tolerances"].update(output=float("inf")), r"expected tolerance 'output'"),
    (lambda m: m["tensors"][0].update(shape=[2, -1]), r"shape: non-negative integers"),
    (lambda m: m["tensors"][0].update(role="param"), r"expected tensors\[0\]\.role"),
    # edits the tensor hashes cannot see: the manifest's own sha256, recorded in the tensors
    (lambda m: m["tolerances"].update(output=10.0), r"manifest.json: expected the sha256 that "
                                                    r"tensors.safetensors records for it"),
    (lambda m: m["config"].update(delta_softplus=not m["config"]["delta_softplus"]),
     r"was changed after it was written"),
])
def test_bad_manifest_is_a_clear_error(suite_dir, tmp_path, edit, match):
    d = _copy(suite_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FixtureError, match=match):
        read_fixture(d)


def test_manifest_that_is_not_an_object(suite_dir, tmp_path):
    d = _copy(suite_dir, tmp_path)
    (d / "manifest.json").write_text("[1, 2]")
    with pytest.raises(FixtureError, match=r"expected a JSON object, got list"):
        read_fixture(d)


def test_a_tensor_dropped_from_both_files_is_refused(suite_dir, tmp_path):
    # consistent tensor hashes, but the manifest is no longer the one the tensors record
    d = _copy(suite_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["tensors"] = [e for e in m["tensors"] if e["name"] != "grad/input/A"]
    (d / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")
    from safetensors import safe_open
    with safe_open(str(d / "tensors.safetensors"), framework="np") as fh:
        meta = fh.metadata()                        # keep the recorded manifest sha256
    t = load_file(str(d / "tensors.safetensors"))
    del t["grad/input/A"]
    save_file(t, str(d / "tensors.safetensors"), metadata=meta)
    with pytest.raises(FixtureError, match=r"expected the sha256 that tensors.safetensors "
                                           r"records for it, [0-9a-f]{16}\.\.\., got"):
        read_fixture(d)
    save_file(t, str(d / "tensors.safetensors"))    # and without it: says what is missing
    with pytest.raises(FixtureError, match=r"expected the manifest's sha256 in its header "
                                           r"metadata \(manifest_sha256, format 2\), got none"):
        read_fixture(d)


def test_manifest_with_other_line_endings_still_verifies(suite_dir, tmp_path):
    # git's autocrlf rewrites text files; the recorded sha256 covers the canonical text
    d = _copy(suite_dir, tmp_path)
    text = (d / "manifest.json").read_bytes()
    (d / "manifest.json").write_bytes(text.replace(b"\n", b"\r\n"))
    assert read_fixture(d).manifest == json.loads(text)


def test_write_fixture_refuses_what_read_fixture_would(tmp_path):
    for tol in (float("nan"), -1.0, True, "1e-12", 10 ** 400):
        with pytest.raises(FixtureError, match=r"write_fixture: expected tolerance 'output': "
                                               r"a finite number >= 0"):
            write_fixture(tmp_path / "f", arch="core", preset="-", config={}, seed=0,
                          dtype="float64", tensors={"output/y": np.ones(2)},
                          tolerances={"output": tol})
    assert not (tmp_path / "f" / "manifest.json").exists()


def test_format_1_fixture_says_to_write_it_again(suite_dir, tmp_path):
    d = _copy(suite_dir, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FixtureError, match=r"got 1: format 1 fixtures .* written again with "
                                           r"refssm golden"):
        read_fixture(d)


def test_fixture_files_follow_the_umask(tmp_path):
    # safetensors' save_file creates 0600 files; a fixture is meant to be shared
    old = os.umask(0o022)
    try:
        write_fixture(tmp_path / "f", arch="core", preset="-", config={}, seed=0,
                      dtype="float64", tensors={"input/x": np.arange(3.0)},
                      tolerances={"input": 0.0})
    finally:
        os.umask(old)
    for name in ("manifest.json", "tensors.safetensors"):
        assert (os.stat(tmp_path / "f" / name).st_mode & 0o777) == 0o644, name


def test_corrupt_safetensors_and_missing_files(suite_dir, tmp_path):
    d = _copy(suite_dir, tmp_path)
    (d / "tensors.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(FixtureError, match="not a readable safetensors file"):
        read_fixture(d)
    os.remove(d / "manifest.json")
    with pytest.raises(FixtureError, match="expected file manifest.json"):
        read_fixture(d)


# --- the command line ---------------------------------------------------------

def test_cli_golden_and_compare(suite_dir, tmp_path, capsys):
    assert main(["golden", "--out", str(tmp_path / "fx"), "--dtypes", "float64"]) == 0
    fx_dir = tmp_path / "fx" / "float64" / "core_selective_scan_mamba_ssm"
    fx = read_fixture(fx_dir)
    good = {k: v for k, v in fx.tensors.items() if not k.startswith("input/")}
    save_file(good, str(tmp_path / "good.safetensors"))
    capsys.readouterr()
    assert main(["compare", str(fx_dir), str(tmp_path / "good.safetensors")]) == 0
    assert "0 failed" in capsys.readouterr().out
    bad = dict(good)
    bad["grad/input/A"] = bad["grad/input/A"] * (1 + 1e-6)
    del bad["output/last_state"]
    save_file(bad, str(tmp_path / "bad.safetensors"))
    assert main(["compare", str(fx_dir), str(tmp_path / "bad.safetensors")]) == 1
    out = capsys.readouterr().out
    assert "grad/input/A" in out and "FAIL" in out and "missing" in out
    assert main(["compare", str(tmp_path), str(tmp_path / "bad.safetensors")]) == 2


def test_check_callable_points_the_oracle_at_a_python_implementation(suite_dir):
    """A candidate given as a callable: refssm's own Mamba passes, a perturbed one fails."""
    from refssm.golden import check_callable

    def candidate(eps):
        def fn(inputs, params, manifest):
            cfg = mamba.as_config({k: v for k, v in manifest["config"].items() if k != "batch"})
            out = mamba.forward(params, inputs["x"] * (1 + eps), cfg, return_sequence=True).output
            return {"output/sequence": out, "output/last": out[:, -1]}
        return fn

    path = suite_dir / "float64" / "mamba_edifice_wide"
    good = check_callable(path, candidate(0.0), roles=("output",))
    assert good and all(r.ok for r in good if r.note != "missing")
    assert {r.name for r in good if r.note == "missing"} == {
        f"output/hidden_state_{i}" for i in range(4)}
    bad = check_callable(path, candidate(1e-9), roles=("output",))
    assert not any(r.ok for r in bad if r.name in ("output/sequence", "output/last"))


def test_core_gated_ema_fixture_gradients_match_the_numba_engine(suite_dir):
    from refssm.golden import check_callable
    from refssm.ssm.gated_ema import gated_ema_backward, gated_ema_forward

    def fn(inputs, params, manifest):
        y, last, saved = gated_ema_forward(inputs["x"], inputs["delta"], inputs["B"], inputs["C"],
                                           initial_context=inputs["initial_context"],
                                           engine="numba")
        g = gated_ema_backward(inputs["w_out"], inputs["w_context"], saved)
        return {"output/out": y, "output/last_context": last,
                **{f"grad/input/{k}": v for k, v in g.items() if v is not None}}

    rows = check_callable(suite_dir / "float64" / "core_gated_ema_causal", fn)
    assert len(rows) == 7 and all(r.ok for r in rows), [(r.name, r.rel) for r in rows]


@pytest.mark.parametrize("arch,preset", [("mamba", "mamba_ssm"), ("gated_ssm", "causal"),
                                         ("s5", "s5"), ("ss_transformer", "mamba_ssm"),
                                         ("ss_transformer", "edifice")])
def test_model_fixture_gradients_reproduced_by_another_engine(suite_dir, arch, preset):
    """Every architecture's fixture gradients (loss <W, output>) come back from the fixture's
    own inputs through the numba engine's backward, within the fixture's tolerance (1e-10).

    SSTransformer's attn_k.bias gradient is structurally zero (no carried cache: softmax
    ignores a shift common to all keys), so both sides are round-off; compare measures
    such a tensor against the largest gradient, and a real error there still fails.
    """
    import importlib

    from refssm.golden import check_callable

    mod = importlib.import_module(f"refssm.models.{arch}")

    def fn(inputs, params, manifest):
        cfg = mod.as_config({k: v for k, v in manifest["config"].items() if k != "batch"})
        _, saved = mod.forward_with_saved(params, inputs["x"], cfg, return_sequence=True,
                                          engine="numba")
        g = mod.backward(inputs["w_out"], saved)
        out = {"grad/input/x": g.x}
        out.update({f"grad/{layer}.{k}": v for layer, p in g.params.items() for k, v in p.items()})
        return out

    path = suite_dir / "float64" / f"{arch}_{preset}_wide"
    rows = check_callable(path, fn, roles=("grad",))
    assert len(rows) > 20 and all(r.ok for r in rows), [(r.name, r.rel) for r in rows if not r.ok]
    if arch == "ss_transformer":
        fx = read_fixture(path)
        name = "grad/sst_block_1_attn_k.bias"
        assert np.abs(fx.tensors[name]).max() < 1e-12          # the structural zero
        bad = dict(fx.tensors)
        bad[name] = fx.tensors[name] + 1e-6
        row = next(r for r in compare_tensors(fx, bad, roles=("grad",)) if r.name == name)
        assert not row.ok
