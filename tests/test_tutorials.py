"""The tutorials run: every notebook in tutorials/ is executed from scratch and must not raise.

Each notebook's "two ways agree" checks are ``assert`` statements, so a wrong
number fails here. The committed notebooks must also be what
``tutorials/_build.py`` generates (edit the sources there, then run it), carry
their outputs (they render on GitHub) and stay small.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
MAX_BYTES = 1_000_000


def _build_module():
    spec = importlib.util.spec_from_file_location("tutorials_build", TUTORIALS / "_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_from_scratch(name):
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    for cell in nb.cells:                                   # from scratch: no stale outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    build = _build_module()
    try:
        build.execute(nb, cwd=TUTORIALS, timeout=600)
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed:\n{exc}")
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
    assert images >= 1, f"{name}: no picture"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed_and_small(name):
    path = TUTORIALS / name
    assert path.stat().st_size < MAX_BYTES, f"{name}: {path.stat().st_size} bytes"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, name
    for cell in code:
        assert cell.execution_count is not None, f"{name}: a cell without outputs (run _build.py)"
        for out in cell.outputs:
            assert out.output_type != "error", f"{name}: committed with an error output"
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), name
    source = "\n".join(c.source for c in code)
    assert "assert " in source, f"{name}: no executable check"


def test_notebooks_are_what_the_build_script_generates():
    build = _build_module()
    expected = {f"{n}.ipynb" for n in build.NOTEBOOKS}
    assert set(NOTEBOOKS) == expected, "tutorials/*.ipynb and _build.NOTEBOOKS differ"
    for name, text in build.NOTEBOOKS.items():
        fresh = build.make_notebook(text)
        committed = nbformat.read(TUTORIALS / f"{name}.ipynb", as_version=4)
        assert [(c.cell_type, c.source) for c in committed.cells] == \
            [(c.cell_type, c.source) for c in fresh.cells], \
            f"{name}.ipynb is stale: run python tutorials/_build.py {name[:2]}"


def test_build_script_refuses_malformed_sources():
    build = _build_module()
    assert build.parse_cells("%% md\n# T\n%% code\nx = 1\n") == [("markdown", "# T"),
                                                                  ("code", "x = 1")]
    with pytest.raises(ValueError, match="empty"):
        build.parse_cells("%% md\n\n%% code\nx = 1\n")
    with pytest.raises(ValueError, match="before the first cell marker"):
        build.parse_cells("x = 1\n%% code\ny = 2\n")
