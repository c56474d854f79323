"""A callback that sends its own process the scheduler's warning signal (SIGUSR2, as SLURM does before a
pre-emption or time limit) at a given training step, once per run folder: the pre-emption tests add it through
the CLI (``+callbacks.preempt._target_=tests.helpers.signal_at_step.SignalAtStep``). A relaunch in the same folder
finds its marker and does not signal again, as a requeued SLURM job is not pre-empted twice."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    def __init__(self, step: int, marker: str, signum: int = int(signal.SIGUSR2)):
        self.step, self.marker, self.signum = int(step), Path(marker), int(signum)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(str(self.step))
            os.kill(os.getpid(), self.signum)
