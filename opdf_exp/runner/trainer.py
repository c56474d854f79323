"""The one Trainer builder. Every stage of every task (teacher fine-tune, each student, the geometry studies'
teachers, SAEs and students) gets its Trainer here, from the job's ``trainer``, ``callbacks`` and ``logger``
groups, so loggers, checkpoints, progress bars, precision and DDP behave the same everywhere.

What it adds to Lightning's defaults:
* atomic checkpoint writes (a job killed mid-save never leaves a truncated ``last.ckpt``);
* RNG state in every checkpoint (:class:`RestoreRNGState`), so a resumed run continues exactly where the
  uninterrupted one would have (the data order is restored by the DataModule's resumable sampler);
* validation at the end of a step budget shorter than an epoch (so a best checkpoint is always ranked);
* per-stage checkpoint folders and metric prefixes (``kd_opdf/val/acc``);
* a clear error, before any training, for a GPU strategy on a machine without a GPU;
* a checkpoint of the running stage on the scheduler's pre-emption / time-limit signal (runner/preemption.py).
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.plugins.io import TorchCheckpointIO

from opdf_exp.errors import ConfigError, UserError
from opdf_exp.runner.preemption import CheckpointOnPreemption


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so a job killed mid-save never
    leaves a truncated ``last.ckpt`` for ``ckpt_path=`` to resume from. Loads are ``weights_only`` (no code
    runs from a checkpoint) unless the job sets ``allow_unsafe_checkpoints=true``."""

    def __init__(self, allow_pickle: bool = False):
        super().__init__()
        self.allow_pickle = allow_pickle

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return safe_load(path, map_location=map_location, allow_pickle=self.allow_pickle or weights_only is False)


def safe_load(path, map_location=None, allow_pickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True``: tensors, numbers, strings and containers only. A file that
    needs pickle is refused with one line saying how to allow it (only for files you trust)."""
    if not Path(path).is_file():
        raise UserError(f"checkpoint '{path}' does not exist; check ckpt_path")
    if allow_pickle:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        if "weights_only" not in str(error) and "Unpickl" not in type(error).__name__:
            raise
        raise UserError(f"checkpoint '{path}' needs pickle to load, which can run arbitrary code; if you trust "
                        "the file, set allow_unsafe_checkpoints=true") from None


class RestoreRNGState(pl.Callback):
    """Saves the Python, NumPy, torch (and CUDA) RNG states with every checkpoint and restores them on resume.

    Why: dropout masks (and anything else random in a step) depend on the global RNG. Lightning restores the
    weights, the optimizer, the schedule and the loop counters, but not these states, so a resumed run drifts
    from the uninterrupted one. Stored as tensors and lists, so ``weights_only`` loading accepts them.
    """

    def __init__(self) -> None:
        self._pending: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        return {"torch": torch.get_rng_state(),
                "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
                "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
                "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict  # applied when training restarts, after the rest of set-up used the RNG

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class TrainClock(pl.Callback):
    """Seconds spent in ``fit`` over every run of a stage, kept in its checkpoints.

    Why: a stage resumed from ``last.ckpt`` (a pre-emption, a relaunch) times only its own part; a finished
    stage that a relaunch resumes just to evaluate reported 0.1 s of training. The time before the checkpoint is
    carried in it, so :func:`train_seconds` gives the whole stage's training time."""

    def __init__(self) -> None:
        self.before = 0.0  # seconds of earlier runs (from the checkpoint this fit resumed) and of this one once done
        self.fitted = False
        self._started: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before, self._started, self.fitted = self.seconds(), None, True

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict.get("seconds", 0.0))


def train_seconds(trainer: pl.Trainer, fallback: float) -> float:
    """The stage's training time across resumed runs (:class:`TrainClock`); ``fallback`` for a trainer without
    one."""
    clock = next((c for c in trainer.callbacks if isinstance(c, TrainClock)), None)
    return clock.seconds() if clock is not None and clock.fitted else fallback


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
                    progress_bar: bool = True, checkpoints: bool = True) -> list[pl.Callback]:
    """Instantiate every callback entry; checkpoints go to ``<dirpath>/<stage>`` and monitored names get the
    stage's metric prefix. Progress-bar callbacks are dropped when the trainer disables the bar."""
    callbacks = []
    for entry in (callbacks_cfg or {}).values():
        if not entry or "_target_" not in entry:
            continue
        callback = hydra.utils.instantiate(entry)
        if isinstance(callback, ProgressBar) and not progress_bar:
            continue
        if isinstance(callback, (ModelCheckpoint, EarlyStopping)) and not checkpoints:
            continue
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = os.path.join(callback.dirpath, stage) if callback.dirpath else None
            if callback.monitor:
                callback.monitor = prefix + callback.monitor
        if isinstance(callback, EarlyStopping):
            callback.monitor = prefix + callback.monitor
        callbacks.append(callback)
    return callbacks


GPU_STRATEGIES = ("ddp", "fsdp", "deepspeed")


def check_trainer_config(trainer_cfg: DictConfig | dict) -> None:
    """Refuse, in one line, what cannot run on this machine (called before any job starts, and per stage)."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    strategy = str(trainer_cfg.get("strategy", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        if strategy.startswith(GPU_STRATEGIES):
            raise ConfigError(f"trainer strategy={strategy} needs GPUs but no CUDA device is visible; use "
                              "trainer=ddp_sim for DDP on 2 CPU processes (gloo)")
        raise ConfigError("trainer=gpu was requested but no CUDA device is visible; use trainer=cpu or trainer=default")
    if accelerator in ("gpu", "cuda"):
        from opdf_exp.runner.resolvers import device_count

        wanted, visible = device_count(trainer_cfg.get("devices", 1)), torch.cuda.device_count()
        if wanted is not None and wanted > visible:
            raise ConfigError(f"trainer.devices={wanted} but this node has {visible} visible GPU(s); ask the "
                              f"scheduler for {wanted} (hydra.launcher.gpus_per_node) or set trainer.devices={visible}")
    if strategy.startswith("fsdp") and accelerator == "cpu":
        raise ConfigError("strategy=fsdp needs GPUs; use trainer=ddp_sim to test distributed code on CPU")


def trainer_world_size(trainer_cfg: DictConfig | dict) -> int:
    """Processes a fit will use (devices x nodes); -1/"auto" counts the visible GPUs."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        count = len(devices)
    elif str(devices) in ("-1", "auto"):
        count = max(torch.cuda.device_count(), 1)
    else:
        count = int(devices)
    return count * int(trainer_cfg.get("num_nodes", 1) or 1)


def build_trainer(cfg: DictConfig, stage: str, prefix: str, loggers: list,
                  overrides: DictConfig | dict | None = None, *, checkpoints: bool = True,
                  extra_callbacks: list[pl.Callback] | None = None) -> pl.Trainer:
    """The Trainer of one stage: ``cfg.trainer`` merged with the stage's ``overrides``, the job's callbacks
    (checkpoints under ``checkpoints/<stage>``, monitors prefixed by ``prefix``) and loggers."""
    trainer_cfg = OmegaConf.merge(OmegaConf.to_container(cfg.trainer, resolve=True),
                                  OmegaConf.to_container(overrides, resolve=True) if OmegaConf.is_config(overrides)
                                  else dict(overrides or {}))  # plain merge: a stage may set any Trainer argument
    check_trainer_config(trainer_cfg)
    callbacks = build_callbacks(cfg.get("callbacks"), stage, prefix, trainer_cfg.get("enable_progress_bar", True),
                                checkpoints=checkpoints and trainer_cfg.get("enable_checkpointing", True) is not False)
    callbacks.append(RestoreRNGState())
    callbacks.append(TrainClock())
    callbacks.append(CheckpointOnPreemption())
    callbacks += list(extra_callbacks or [])
    max_steps = int(trainer_cfg.get("max_steps") or -1)
    if max_steps > 0 and trainer_cfg.get("val_check_interval") is None and not trainer_cfg.get("fast_dev_run"):
        callbacks.append(ValidateAtStepBudget(max_steps))
    if not checkpoints:
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"enable_checkpointing": False})
    plugins: list = [AtomicCheckpointIO(allow_pickle=bool(cfg.get("allow_unsafe_checkpoints", False)))]
    if SLURMEnvironment.detect():  # requeue is submitit's (runner/preemption.py), not Lightning's SIGUSR1 handler
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer_cfg = {k: v for k, v in OmegaConf.to_container(trainer_cfg, resolve=True).items() if k != "logger"}
    return hydra.utils.instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                                   _convert_="all")


# Trainer settings of a job that has no ``trainer`` group (a study called from Python, a test).
PLAIN_TRAINER = {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 1, "precision": "32-true",
                 "logger": None, "enable_progress_bar": False, "enable_model_summary": False,
                 "num_sanity_val_steps": 0, "deterministic": False, "default_root_dir": None}


class StageTrainers:
    """``make_trainer(stage, **overrides)`` for tasks with several fits (the geometry studies): every Trainer
    comes from :func:`build_trainer` with the job's ``trainer``/``callbacks``/``logger`` config, the stage's
    own budget as overrides, its metrics prefixed ``<stage>/`` and no checkpoints (the studies keep what they
    measure themselves). With ``cfg=None`` a plain single-CPU Trainer config is used."""

    def __init__(self, cfg: DictConfig | None = None, loggers: list | None = None):
        base = OmegaConf.create({"trainer": PLAIN_TRAINER, "callbacks": {}})
        self.cfg = cfg if cfg is not None and "trainer" in cfg else base
        self.loggers = list(loggers or [])

    def __call__(self, stage: str, **overrides) -> pl.Trainer:
        overrides = {k: v for k, v in overrides.items()}
        return build_trainer(self.cfg, stage, f"{stage}/", self.loggers, overrides, checkpoints=False)
