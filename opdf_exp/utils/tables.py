"""Result tables: one Markdown/CSV writer for every task (distillation results, sweep summaries, geometry studies).

The Markdown is for reading (thousands separators, fixed decimals, scientific notation only where fixed decimals
would show 0 or a huge number); the CSV keeps the raw values for analysis. Both are written atomically.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from opdf_exp.utils.io import atomic_write_text


def format_cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if hasattr(value, "item") and not isinstance(value, (int, float)):
        value = value.item()  # numpy / torch scalars
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value != 0 and (abs(value) < 0.5 * 10 ** -digits or abs(value) >= 1e6):  # would read as 0, or huge
            return f"{value:.{max(2, digits - 1)}e}"
        return f"{value:,.{digits}f}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int | Mapping[str, int] = 4) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` restricted to ``columns`` (default: the first row's keys).
    ``digits``: decimals for floats, one number or ``{column: decimals}`` (other columns get 4)."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    places = {c: (digits.get(c, 4) if isinstance(digits, Mapping) else digits) for c in columns}
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(c), places[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_table(rows: Sequence[Mapping[str, Any]], stem: str | Path, columns: Sequence[str] | None = None,
                digits: int | Mapping[str, int] = 4, save: bool = True) -> str:
    """Write ``<stem>.md`` and ``<stem>.csv`` (unless ``save`` is false: non-zero ranks); return the Markdown."""
    stem = Path(stem)
    columns = list(columns or (rows[0].keys() if rows else []))
    markdown = markdown_table(rows, columns, digits)
    if not save:
        return markdown
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: row.get(c) for c in columns} for row in rows)
    atomic_write_text(stem.parent / f"{stem.name}.md", markdown + "\n")
    atomic_write_text(stem.parent / f"{stem.name}.csv", buffer.getvalue())
    return markdown
