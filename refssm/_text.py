"""Plain-text tables for the command line (verify, bench, compare)."""
from __future__ import annotations

__all__ = ["text_table"]


def text_table(rows, right=()) -> list:
    """Lines of a fixed-width table: the header row, a rule of dashes, the data rows.

    Parameters
    ----------
    rows : sequence of sequences of str
        ``rows[0]`` is the header.
    right : collection of int
        Columns to right-align (numbers); the others are left-aligned.

    Examples
    --------
    >>> print("\\n".join(text_table([("name", "value"), ("a", "1.0"), ("bb", "10.0")], right={1})))
    name  value
    ----  -----
    a       1.0
    bb     10.0
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
