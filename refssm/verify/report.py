"""Run the oracle checks and render their figures (table, JSON, Markdown)."""
from __future__ import annotations

import json
import math
import sys
import textwrap
import time
import traceback

from .._text import text_table
from .core import CORE_CHECKS, Figure

__all__ = ["run_checks", "format_table", "format_markdown", "to_json"]

#: Width at which the explanation lines under the table are wrapped.
EXPLANATION_WIDTH = 110


def all_checks():
    """The core checks, then one check per available architecture."""
    from .models import model_checks

    return tuple(CORE_CHECKS) + tuple(model_checks())


def run_checks(checks=None, progress=sys.stderr) -> list[Figure]:
    """Run every check in order, printing one progress line per check to ``progress``.

    A check that raises becomes one failing figure (value NaN, its exception in the
    detail, the traceback on ``progress``), and the other checks still run.
    """
    checks = all_checks() if checks is None else checks
    figures: list[Figure] = []
    for i, check in enumerate(checks, 1):
        t0 = time.perf_counter()
        if progress is not None:
            print(f"[{i}/{len(checks)}] {check.__name__} ...", end="", file=progress, flush=True)
        try:
            figs = check()
        except Exception as exc:  # noqa: BLE001 - reported as a failing figure, not lost
            figures.append(Figure("-", "-", f"{check.__name__} raised", float("nan"), 0.0,
                                  False, f"{type(exc).__name__}: {exc}"))
            if progress is not None:
                print(" RAISED", file=progress, flush=True)
                traceback.print_exc(file=progress)
            continue
        figures.extend(figs)
        if progress is not None:
            bad = sum(not f.ok for f in figs)
            status = "ok" if not bad else f"{bad} OVER BUDGET"
            print(f" {status} ({time.perf_counter() - t0:.1f} s)", file=progress, flush=True)
    return figures


def _budget_text(f: Figure) -> str:
    """A figure's budget as printed: ``-`` for the explained gaps, which have none."""
    return "-" if f.budget == float("inf") else f"{f.budget:.0e}"


def format_table(figures: list[Figure]) -> str:
    """A fixed-width table: arch, preset, check, value, budget, ok."""
    rows = [("arch", "preset", "check", "value", "budget", "ok")]
    for f in figures:
        rows.append((f.arch, f.preset, f.check, f"{f.value:.2e}", _budget_text(f),
                     "ok" if f.ok else "FAIL"))
    lines = text_table(rows, right={3, 4, 5})
    n_bad = sum(not f.ok for f in figures)
    lines.append("")
    lines.append(f"{len(figures)} figures, {len(figures) - n_bad} within budget, {n_bad} over budget")
    explained = [f for f in figures if f.budget == float("inf")]
    if explained:
        lines.append("")
        lines.append("The original API's approximate param_count formulas, against the exact count:")
        for f in explained:
            lines += _explanation_lines(f"{f.arch}/{f.preset}: ", f.detail)
    return "\n".join(lines)


def _explanation_lines(head: str, detail: str, width: int = EXPLANATION_WIDTH) -> list[str]:
    """A figure's (possibly multi-line) detail under the table.

    The first line follows ``head`` (indented 2); each further line is indented
    4 and wrapped at ``width`` with continuation lines indented 6.

    Examples
    --------
    >>> print("\\n".join(_explanation_lines("a/b: ", "exact 3 vs 2\\nleaves out +1: x", 40)))
      a/b: exact 3 vs 2
        leaves out +1: x
    """
    first, *rest = detail.split("\n") if detail else [""]
    out = [f"  {head}{first}"]
    for line in rest:
        out += textwrap.wrap(line, width, initial_indent="    ", subsequent_indent="      ",
                             break_on_hyphens=False) or [""]
    return out


def format_markdown(figures: list[Figure]) -> str:
    """A Markdown report with one table row per figure."""
    out = ["# refssm verify report", "",
           "| arch | preset | check | value | budget | ok | detail |",
           "|---|---|---|---:|---:|---|---|"]
    for f in figures:
        out.append(f"| {f.arch} | {f.preset} | {f.check} | {f.value:.2e} | {_budget_text(f)} | "
                   f"{'ok' if f.ok else '**FAIL**'} | {f.detail.replace(chr(10), '<br>')} |")
    return "\n".join(out) + "\n"


def _finite_or_none(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


def to_json(figures: list[Figure]) -> str:
    """``[{"arch", "preset", "check", "value", "budget", "ok", "detail"}]``, strict JSON.

    JSON has no infinity or NaN: ``budget`` is ``null`` for a figure without one (the
    original formulas' explained gaps) and ``value`` is ``null`` when it is not a finite
    number (such a figure has ``ok: false``).

    Examples
    --------
    >>> print(to_json([Figure("a", "p", "c", float("nan"), float("inf"), False)]))
    [
      {
        "arch": "a",
        "preset": "p",
        "check": "c",
        "value": null,
        "budget": null,
        "ok": false,
        "detail": ""
      }
    ]
    """
    rows = [{k: _finite_or_none(v) for k, v in f.as_dict().items()} for f in figures]
    return json.dumps(rows, indent=2, allow_nan=False)
