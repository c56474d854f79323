"""Live progress of a sweep: one line when a job starts and one when it ends, with the sweep's counts.

Why: a 45-job grid runs for hours; the researcher wants to see at a glance how far it is and whether jobs fail,
without opening folders. Counts come from the sweep folder itself (``results.json`` = finished, ``error.txt`` =
failed), so they are right for any launcher (basic, joblib, SLURM) and after a relaunch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("opdf_exp")


def sweep_total(sweep_dir: Path) -> int | None:
    """The number of jobs the sweep will run, from its ``multirun.yaml`` (grid sweeps and Optuna's n_trials)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return None
    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        sweeper = str(cfg.hydra.sweeper.get("_target_", ""))
        if "optuna" in sweeper.lower():
            return int(cfg.hydra.sweeper.n_trials)
        parsed = OverridesParser.create().parse_overrides(list(cfg.hydra.overrides.task))
        return len(BasicSweeper.split_arguments(parsed, None)[0])
    except Exception:  # progress is informative only; never fail a job over it
        return None


def sweep_counts(sweep_dir: Path) -> dict[str, int | None]:
    """``finished`` / ``failed`` / ``running`` (started, neither finished nor failed) / ``left`` (not started)."""
    jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()] if sweep_dir.is_dir() else []
    finished = sum((p / "results.json").is_file() for p in jobs)
    failed = sum((p / "error.txt").is_file() and not (p / "results.json").is_file() for p in jobs)
    running = len(jobs) - finished - failed
    total = sweep_total(sweep_dir)
    return {"finished": finished, "failed": failed, "running": running,
            "left": None if total is None else max(total - len(jobs), 0), "total": total}


def _counts_text(counts: dict) -> str:
    left = "?" if counts["left"] is None else counts["left"]
    return f"finished {counts['finished']} / failed {counts['failed']} / running {counts['running']} / left {left}"


def job_started(output_dir: Path) -> None:
    counts = sweep_counts(output_dir.parent)
    log.info("[sweep] job %s started: %s", output_dir.name, _counts_text(counts))


def job_ended(output_dir: Path, result: dict[str, Any] | None, metric: str | None = None) -> None:
    counts = sweep_counts(output_dir.parent)
    if result is None:
        status = "FAILED (see error.txt)"
    else:
        value = (result.get("metrics") or {}).get(metric) if metric else None
        status = ("skipped (already complete)" if result.get("skipped") else "done") + \
            (f", {metric}={value:.4f}" if isinstance(value, (int, float)) else "")
    log.info("[sweep] job %s %s: %s", output_dir.name, status, _counts_text(counts))
