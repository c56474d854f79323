"""A callback that SIGKILLs its own process at a given training step: a real, un-catchable crash, for the
resume tests (added through the CLI as ``+callbacks.killer._target_=tests.helpers.kill.KillAtStep``)."""
from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    def __init__(self, step: int, stage_prefix: str = ""):
        self.step, self.stage_prefix = int(step), stage_prefix

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step >= self.step and getattr(pl_module, "prefix", "") == self.stage_prefix:
            os.kill(os.getpid(), signal.SIGKILL)
