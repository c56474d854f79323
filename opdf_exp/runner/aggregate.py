"""Aggregate a multirun: one row per setting and model (teacher, each student variant), mean ± std over seeds, from each job's ``results.json``.

Runs by itself at the end of every ``-m`` sweep (a Hydra callback in ``conf/hydra/default.yaml``) and by hand:
``python -m opdf_exp.runner.aggregate <sweep_dir>``. Jobs without ``results.json`` (failed or still running)
are counted and listed, never averaged.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from opdf_exp.utils.io import atomic_write_json
from opdf_exp.utils.tables import markdown_table, write_table

SEED_KEYS = ("seed",)


def _setting(overrides: list[str], common: set[str]) -> str:
    kept = [o for o in overrides if o not in common and o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS]
    return " ".join(kept) or "(all jobs)"


def _models(result: dict) -> list[tuple[str, dict[str, float], dict]]:
    """``[(model label, metrics without the model's prefix, params)]``: the teacher, then each student variant."""
    models = []
    parts = ([("teacher", "teacher", result["teacher"])] if result.get("teacher") else []) + \
        [(v["name"], v.get("label", v["name"]), v) for v in result.get("variants", [])]
    for name, label, part in parts:
        prefix = f"{name}/"
        metrics = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in part.get("metrics", {}).items()}
        models.append((label, metrics, part.get("params", {})))
    if not models:  # a task without teacher/variants (e.g. the geometry studies): the job's own metrics
        models.append(("", result.get("metrics", {}), result.get("params", {})))
    return models


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def aggregate(sweep_dir: str | Path, metrics: list[str] | None = None) -> dict[str, Any]:
    """Summarise every job under ``sweep_dir``: one row per (setting, model), mean ± std over the seeds; write
    ``summary.md``, ``summary.csv`` and ``summary.json``. Overrides shared by every job are listed once, as
    ``common``, not repeated in each setting."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()) if sweep_dir.is_dir() else []
    results, missing = [], []
    for job in jobs:
        path = job / "results.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
        else:
            missing.append(job.name)
    override_sets = [set(r.get("overrides", [])) for r in results]
    common = set.intersection(*override_sets) if len(override_sets) > 1 else set()
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for result in results:
        setting = _setting(result.get("overrides", []), common)
        for label, values, params in _models(result):
            cell = cells.setdefault((setting, label), {"values": {}, "params": params, "runs": 0})
            cell["runs"] += 1
            for name, value in values.items():
                if "/loss" not in name and isinstance(value, (int, float)) and (not metrics or name in metrics):
                    cell["values"].setdefault(name, []).append(float(value))
    rows = []
    for (setting, label), cell in cells.items():
        row: dict[str, Any] = {"setting": setting, "model": label, "runs": cell["runs"]}
        row.update({name: _mean_std(values) for name, values in sorted(cell["values"].items())})
        if "train" in cell["params"]:
            row["train params"], row["inference params"] = cell["params"]["train"], cell["params"].get("inference")
        rows.append(row)
    leading = ["setting", "model", "runs"]
    trailing = ["train params", "inference params"]
    metric_columns = sorted({c for row in rows for c in row} - set(leading) - set(trailing))
    columns = leading + metric_columns + [c for c in trailing if any(c in row for row in rows)]
    rows = [{c: row.get(c) for c in columns} for row in rows]
    summary = {"sweep_dir": str(sweep_dir), "jobs": len(jobs), "common": sorted(common),
               "failed_or_missing": missing, "rows": rows}
    if rows:
        write_table(rows, sweep_dir / "summary")
    atomic_write_json(sweep_dir / "summary.json", summary)
    return summary


class AggregateOnMultirunEnd(Callback):
    """Hydra callback: summarise the sweep when all its jobs have finished (failed ones included)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        summary = aggregate(config.hydra.sweep.dir)
        if summary["rows"]:
            print(f"\nSweep summary ({summary['jobs']} jobs, {len(summary['failed_or_missing'])} without results)\n"
                  f"{markdown_table(summary['rows'])}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--metrics", nargs="*", help="metric names to keep (default: all but losses)")
    args = parser.parse_args()
    summary = aggregate(args.sweep_dir, args.metrics)
    print(markdown_table(summary["rows"]) or "no finished jobs")
    if summary["failed_or_missing"]:
        print(f"without results.json: {', '.join(summary['failed_or_missing'])}")


if __name__ == "__main__":
    main()
