"""Tables for the geometry experiments: Markdown and CSV strings, written atomically."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from opdf_exp.utils.io import atomic_write_json, atomic_write_text


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 10 ** -(digits - 1) or abs(value) >= 1e6):
            return f"{value:.{max(2, digits - 1)}e}"
        return f"{value:.{digits}f}"
    try:
        return _fmt(float(value), digits) if hasattr(value, "item") else str(value)
    except (TypeError, ValueError):
        return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 4,
                   headers: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts) restricted to ``columns``."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buffer.getvalue()


def write_table(output_dir: str | Path, name: str, rows: Sequence[dict], columns: Sequence[str] | None = None,
                digits: int = 4) -> str:
    """Write ``name.csv`` and ``name.md``; returns the Markdown."""
    output_dir = Path(output_dir)
    md = markdown_table(rows, columns, digits)
    atomic_write_text(output_dir / f"{name}.csv", csv_text(rows, columns))
    atomic_write_text(output_dir / f"{name}.md", md + "\n")
    return md


def write_json(output_dir: str | Path, name: str, obj: Any) -> Path:
    return atomic_write_json(Path(output_dir) / name, obj)


def finite_metrics(metrics: dict) -> dict[str, float]:
    """Keep numeric metrics (as floats); NaN stays NaN so missing strata are visible."""
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
