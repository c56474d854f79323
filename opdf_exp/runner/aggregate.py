"""Aggregate a multirun: one row per setting, mean ± std over seeds, from each job's ``results.json``.

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

from opdf_exp.runner.report import markdown_table, write_table
from opdf_exp.utils.io import atomic_write_json

SEED_KEYS = ("seed",)


def _setting(overrides: list[str]) -> str:
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SEED_KEYS]
    return " ".join(kept) or "(defaults)"


def aggregate(sweep_dir: str | Path, metrics: list[str] | None = None) -> dict[str, Any]:
    """Summarise every job under ``sweep_dir``; write ``summary.md``, ``summary.csv`` and ``summary.json``."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()) if sweep_dir.is_dir() else []
    groups: dict[str, list[dict]] = {}
    missing = []
    for job in jobs:
        path = job / "results.json"
        if not path.is_file():
            missing.append(job.name)
            continue
        result = json.loads(path.read_text())
        groups.setdefault(_setting(result.get("overrides", [])), []).append(result)
    rows = []
    for setting, results in groups.items():
        names = metrics or sorted({k for r in results for k in r.get("metrics", {}) if "/loss" not in k})
        row: dict[str, Any] = {"setting": setting, "runs": len(results)}
        for name in names:
            values = [r["metrics"][name] for r in results if name in r.get("metrics", {})]
            if values:
                mean = statistics.fmean(values)
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                row[name] = f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}"
        params = results[0].get("params", {})
        if "train" in params:
            row["train params"], row["inference params"] = params["train"], params.get("inference")
        rows.append(row)
    columns = sorted({c for row in rows for c in row}, key=lambda c: (c not in ("setting", "runs"), c))
    rows = [{c: row.get(c) for c in columns} for row in rows]
    summary = {"sweep_dir": str(sweep_dir), "jobs": len(jobs), "failed_or_missing": missing, "rows": rows}
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
