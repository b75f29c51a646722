"""The README's Python examples run and their assertions hold."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 2
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})


def test_readme_set_up_commands_match_ci():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    for cmd in ("pip install -e . && refssm verify",
                'pip install torch==2.13.0 && pip install -e ".[test,peers]" && python -m pytest'):
        assert cmd in text, cmd
        assert cmd in ci, cmd
