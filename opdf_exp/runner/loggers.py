"""Experiment loggers built from the ``logger`` config group; W&B goes offline by itself without credentials."""
from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``WANDB_MODE`` wins; otherwise ``auto`` means online with credentials and offline without."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if mode != "auto":
        return mode
    return "online" if wandb_credentials_present() else "offline"


def wandb_logger(project: str, save_dir: str, name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, job_type: str | None = None, mode: str = "auto",
                 log_model: bool = False, **kwargs: Any):
    """A Lightning ``WandbLogger`` with one run per Hydra job.

    ``name`` defaults to the job's overrides (``seed=2,decomposition.n=3``); ``group`` defaults to the sweep
    (``<task>-<sweep folder>``) in a multirun and to the task name otherwise, so seeds and sweep points line up on
    the dashboard.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from pytorch_lightning.loggers import WandbLogger

    resolved = resolve_wandb_mode(mode)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = ",".join(hydra_cfg.overrides.task)
        if name is None:
            name = overrides or hydra_cfg.job.name
        if group is None:
            group = (f"{job_type}-{Path(hydra_cfg.sweep.dir).name}" if hydra_cfg.mode == RunMode.MULTIRUN
                     else job_type)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    log.info("W&B mode: %s (group=%s, name=%s)", resolved, group, name)
    return WandbLogger(project=project, save_dir=save_dir, name=name, group=group, tags=list(tags or []),
                       job_type=job_type, mode=resolved, log_model=log_model, **kwargs)


def build_loggers(logger_cfg) -> list:
    import hydra

    if not logger_cfg:
        return []
    return [hydra.utils.instantiate(entry) for entry in logger_cfg.values() if entry and "_target_" in entry]


def log_final(loggers: list, config: dict, metrics: dict) -> None:
    """Attach the resolved config and the final metrics to every logger (W&B: run config and summary)."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.config.update(config, allow_val_change=True)
            logger.experiment.summary.update(metrics)
        else:
            logger.log_hyperparams(config)
            logger.log_metrics({f"final/{k}": v for k, v in metrics.items()}, step=0)
        logger.save()


def add_wandb_tags(loggers: list, tags: list[str]) -> None:
    """Add tags to the job's W&B run (e.g. ``decomposition:mpo``, ``distill:kd``) so dashboards filter by them."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.tags = tuple(dict.fromkeys([*(run.tags or ()), *tags]))
