"""The one table writer: readable Markdown, raw CSV."""
from __future__ import annotations

import numpy as np

from opdf_exp.utils.tables import format_cell, write_table


def test_cells_are_readable():
    assert [format_cell(v) for v in (None, True, 1234567, np.int64(3), 0.94621, 0.0, float("nan"))] == \
        ["–", "True", "1,234,567", "3", "0.9462", "0.0000", "nan"]
    assert format_cell(59.43, 1) == "59.4" and format_cell(2e-7) == "2.000e-07" and format_cell(3.2e7, 2) == "3.20e+07"


def test_markdown_and_csv_keep_columns_and_raw_values(tmp_path):
    rows = [{"model": "KD", "acc": 0.93354, "time": 24.04, "extra": 1}]
    markdown = write_table(rows, tmp_path / "results_table", ["model", "acc", "time"], digits={"time": 1})
    assert markdown.splitlines()[2] == "| KD | 0.9335 | 24.0 |"
    assert (tmp_path / "results_table.md").read_text() == markdown + "\n"
    assert (tmp_path / "results_table.csv").read_text() == "model,acc,time\nKD,0.93354,24.04\n"
