"""Sweep aggregation against hand-computed means and sample standard deviations."""
from __future__ import annotations

import json

from opdf_exp.runner.aggregate import aggregate
from opdf_exp.utils.io import atomic_write_json


def _job(sweep, num, overrides, teacher_acc, kd_acc):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    if teacher_acc is None:
        return  # a failed job: a folder without results.json
    atomic_write_json(job / "results.json", {
        "overrides": overrides,
        "metrics": {},
        "teacher": {"metrics": {"teacher/test/acc": teacher_acc, "teacher/val/loss": 9.0},
                    "params": {"train": 10, "inference": 20}},
        "variants": [{"name": "kd", "label": "KD", "metrics": {"kd/test/acc": kd_acc}, "params": {"train": 3, "inference": 5}}],
    })


def test_rows_per_setting_and_model_with_mean_and_sample_std(tmp_path):
    _job(tmp_path, 0, ["seed=1", "distill=kd", "logger=none"], 0.90, 0.80)
    _job(tmp_path, 1, ["seed=2", "distill=kd", "logger=none"], 0.94, 0.84)
    _job(tmp_path, 2, ["seed=1", "distill=kd_hidden", "logger=none"], 0.90, 0.70)
    _job(tmp_path, 3, ["seed=2", "distill=kd_hidden", "logger=none"], None, None)
    summary = aggregate(tmp_path)
    assert summary["jobs"] == 4 and summary["failed_or_missing"] == ["3"] and summary["common"] == ["logger=none"]
    rows = {(r["setting"], r["model"]): r for r in summary["rows"]}
    assert rows[("distill=kd", "teacher")]["test/acc"] == "0.9200 ± 0.0283"  # mean 0.92, stdev sqrt(0.0008)
    assert rows[("distill=kd", "KD")]["test/acc"] == "0.8200 ± 0.0283" and rows[("distill=kd", "KD")]["runs"] == 2
    assert rows[("distill=kd_hidden", "KD")]["test/acc"] == "0.7000" and rows[("distill=kd_hidden", "KD")]["runs"] == 1
    assert "val/loss" not in rows[("distill=kd", "teacher")]  # losses are left out of the summary
    assert rows[("distill=kd", "KD")]["train params"] == 3
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == summary["rows"]
    assert (tmp_path / "summary.md").read_text().startswith("| setting | model | runs |")
