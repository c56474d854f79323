"""Build a Lightning Trainer for one stage of a job (teacher fine-tune, each student)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar
from pytorch_lightning.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a job killed mid-save never
    leaves a truncated ``last.ckpt`` for ``ckpt_path=`` to resume from."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class ValidateAtStepBudget(pl.Callback):
    """A step budget shorter than an epoch would end training before any validation, leaving the best-checkpoint
    callback nothing to rank; this runs the validation loop on the budget's last step (once: an epoch end on
    that step shares it)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step >= self.max_steps:
            trainer.should_stop = True  # Lightning validates on a requested stop, then ends the fit


def build_callbacks(callbacks_cfg: DictConfig | None, stage: str, prefix: str,
                    progress_bar: bool = True) -> list[pl.Callback]:
    """Instantiate every callback entry; checkpoints go to ``<dirpath>/<stage>`` and monitored names get the
    stage's metric prefix. Progress-bar callbacks are dropped when the trainer disables the bar."""
    callbacks = []
    for entry in (callbacks_cfg or {}).values():
        if not entry or "_target_" not in entry:
            continue
        callback = hydra.utils.instantiate(entry)
        if isinstance(callback, ProgressBar) and not progress_bar:
            continue
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = os.path.join(callback.dirpath, stage) if callback.dirpath else None
            if callback.monitor:
                callback.monitor = prefix + callback.monitor
        if isinstance(callback, EarlyStopping):
            callback.monitor = prefix + callback.monitor
        callbacks.append(callback)
    return callbacks


def build_trainer(cfg: DictConfig, stage: str, prefix: str, loggers: list,
                  overrides: DictConfig | dict | None = None) -> pl.Trainer:
    trainer_cfg = OmegaConf.merge(cfg.trainer, overrides or {})
    if trainer_cfg.get("accelerator") == "gpu" and not torch.cuda.is_available():
        from opdf_exp.errors import ConfigError

        raise ConfigError("trainer=gpu was requested but no CUDA device is visible; use trainer=cpu or trainer=default")
    callbacks = build_callbacks(cfg.get("callbacks"), stage, prefix, trainer_cfg.get("enable_progress_bar", True))
    max_steps = int(trainer_cfg.get("max_steps") or -1)
    if max_steps > 0 and trainer_cfg.get("val_check_interval") is None and not trainer_cfg.get("fast_dev_run"):
        callbacks.append(ValidateAtStepBudget(max_steps))
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False,
                                   plugins=[AtomicCheckpointIO()], _convert_="all")
