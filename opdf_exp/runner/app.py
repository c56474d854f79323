"""The failure-safe job wrapper around every task.

For each Hydra job it: seeds everything, prints and saves the config tree, runs the task, writes
``results.json`` atomically, and always closes W&B (so multirun jobs never share a run). User errors print one
line; in a multirun the failing job is marked failed and the other jobs still run.
"""
from __future__ import annotations

import io
import logging
import sys
import warnings
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opdf_exp.errors import UserError
from opdf_exp.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("opdf_exp")
RESULTS_FILE = "results.json"
CONFIG_TREE_FILE = "config_tree.txt"
TREE_ORDER = ("task", "data", "teacher", "student", "decomposition", "distill", "optim", "trainer", "callbacks",
              "logger", "paths")


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> str:
    """Render the resolved config as a rich tree (fixed group order), print it and save it as plain text."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("CONFIG", guide_style="dim")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key))
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) or OmegaConf.is_list(value) else str(value)
        branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    console = Console(file=sys.stdout, width=120)
    console.print(tree)
    plain = Console(width=120, record=True, file=io.StringIO(), color_system=None)
    plain.print(tree)
    text = plain.export_text()
    if save_to is not None:
        atomic_write_text(save_to, text)
    return text


def job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """Seed, save the config tree, run ``cfg.task`` and write ``results.json``. Returns the task's result."""
    import hydra
    import pytorch_lightning as pl

    # The frozen teacher is in eval mode on purpose; Lightning's generic warning about it is noise here.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / RESULTS_FILE
    if results_path.exists():
        results_path.unlink()  # a re-used folder must never show a stale result for this job
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("print_config", True):
        print_config_tree(cfg, output_dir / CONFIG_TREE_FILE)
    started = time.perf_counter()
    task = hydra.utils.instantiate(cfg.task, _partial_=True)
    result = dict(task(cfg))
    wall = time.perf_counter() - started
    payload = {
        "task_name": cfg.task_name,
        "overrides": job_overrides(),
        "seed": int(cfg.seed),
        "metrics": result.get("metrics", {}),
        "params": result.get("params", {}),
        "wall_time_s": round(wall, 2),
        "output_dir": str(output_dir),
    }
    payload.update({k: v for k, v in result.items() if k not in payload and k != "tables"})
    atomic_write_json(results_path, payload)
    for name, table in result.get("tables", {}).items():
        print(f"\n{name}\n{table}\n")
    log.info("results written to %s (%.1f s)", results_path, wall)
    return result


def run_job(cfg: DictConfig) -> float | None:
    """Hydra task function. Returns ``cfg.optimized_metric`` (for sweepers such as Optuna) when present."""
    try:
        result = run_task(cfg)
    except UserError as error:
        if is_multirun():
            log.error("job failed: %s", error)
            raise
        sys.stdout.flush()  # the config tree and progress output come first, the error on a line of its own
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        _finish_wandb()
    metric = cfg.get("optimized_metric")
    if metric:
        value = result.get("metrics", {}).get(metric)
        return float(value) if value is not None else None
    return None


def _finish_wandb() -> None:
    """Close any open W&B run so the next multirun job starts its own (wandb#1314, lightning#5212)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
