"""Rows of benchmark results (dicts) as an aligned text table, markdown, or JSON.

A row is one measured variant. Columns are the union of the rows' keys in first-seen order;
a value a row lacks prints as `n/a`, so every line of the table has the same columns.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Literal

from sd_mlperf.utils.files import atomic_write_text

MISSING = "n/a"
TableFormat = Literal["text", "markdown", "json"]


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Union of the rows' keys in first-seen order."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return cols


def format_value(value: Any) -> str:
    """One cell: floats to about 4 significant digits, None/NaN as n/a, booleans as yes/no."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    # Runs of spaces are the column separator of the text format: collapse them inside a cell.
    return " ".join(str(value).replace("|", "/").split())


def add_ratios(rows: list[dict[str, Any]], key: str, *, name: str = "ratio", baseline: int = 0,
               higher_is_better: bool = True) -> list[dict[str, Any]]:
    """Add `name` = row[key] / baseline[key] (inverted when lower is better) to each row, in place."""
    base = rows[baseline].get(key) if rows else None
    for row in rows:
        value = row.get(key)
        if not base or value is None or not isinstance(value, (int, float)) or not value:
            row[name] = None
        else:
            row[name] = value / base if higher_is_better else base / value
    return rows


def format_table(rows: Sequence[dict[str, Any]], *, fmt: TableFormat = "text",
                 columns: Sequence[str] | None = None) -> str:
    """The rows as one table string ending with a newline; `columns` picks and orders them."""
    cols = list(columns) if columns is not None else columns_of(rows)
    if fmt == "json":
        return json.dumps([{c: row.get(c) for c in cols} for row in rows], indent=1) + "\n"
    cells = [[format_value(row.get(c)) for c in cols] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines) + "\n"
    if fmt != "text":
        raise ValueError(f"unknown table format {fmt!r}; use text, markdown or json")
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(cols)]
    # Text columns align left, numbers right, so ratios line up under each other.
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in cols]

    def fit(text: str, i: int) -> str:
        return text.rjust(widths[i]) if numeric[i] else text.ljust(widths[i])

    lines = ["  ".join(fit(c, i) for i, c in enumerate(cols)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(fit(v, i) for i, v in enumerate(line)).rstrip() for line in cells]
    return "\n".join(lines) + "\n"


def parse_text_table(text: str) -> tuple[list[str], list[list[str]]]:
    """Inverse of the text format, for tests and scripts: (header, rows of cells split on 2+ spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or set(lines[1].replace(" ", "")) != {"-"}:
        raise ValueError("not a bench table: expected a header line and a dashed separator line")
    split = re.compile(r"\s{2,}")
    return split.split(lines[0].strip()), [split.split(line.strip()) for line in lines[2:]]


def write_rows(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Save the rows as JSON (atomically), for the README tables and later comparisons."""
    atomic_write_text(path, format_table(rows, fmt="json"))
