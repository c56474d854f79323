"""Pre-emption and time limits: on the scheduler's warning signal, save the running stage, then requeue.

SLURM sends the job a signal before it pre-empts it or before its time limit (``--signal=USR2@120``, which the
slurm launcher asks for through submitit). On that signal the running fit saves its stage's ``last.ckpt`` once the
current training step completes (full training state: weights, optimizer, schedule, loop counters, RNG, the
sampler's position), and then hands over to whoever owned the signal before us:

* under submitit (``hydra/launcher=slurm``), submitit's handler calls the Hydra launcher's ``checkpoint``, which
  requeues the same job (``scontrol requeue``) and exits. The requeued job runs in the same folder: finished
  stages end at once, and the interrupted one resumes from the ``last.ckpt`` saved here
  (``runner/distill_task.py``), so it ends with the metrics of an uninterrupted run.
* anywhere else (a run on a workstation, a test), the process exits with ``128 + signal`` after one line saying
  where the state was saved; relaunching the same command with the same ``hydra.run.dir`` continues it.

Why submitit's requeue and not Lightning's SLURM auto-requeue: the launcher is submitit, which already asks
SLURM for the signal, tracks the job and its timeout count, and requeues the whole Hydra job. Lightning's
auto-requeue would be a second handler on another signal (SIGUSR1) that saves an ``hpc_ckpt_*.ckpt`` into
``default_root_dir`` and restores it into the next fit that starts there; one job here has several fits
(teacher, then each student variant) sharing that folder, so the restore would reach the wrong stage. The trainer
builder therefore turns Lightning's auto-requeue off and adds :class:`CheckpointOnPreemption` to every fit.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl

from opdf_exp.utils.distributed import is_global_zero

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised after the stage's state is saved when no scheduler handler takes over (exit code 128 + signal)."""


class _Pending:
    signum: int | None = None      # the warning signal, once received
    active_fits: int = 0           # fits that will save at their next step end
    previous = None                # the handler we replaced (submitit's, or SIG_DFL)
    installed: int | None = None   # the signal we handle


_PENDING = _Pending()


def warning_signal() -> int:
    """The signal submitit asks SLURM for (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


def install() -> None:
    """Handle the warning signal in this (job) process, keeping the handler it replaces (submitit's) to call
    once the running stage is saved. Idempotent; main thread only (Python's rule for signal handlers)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    signum = warning_signal()
    current = signal.getsignal(signum)
    if current is _on_signal:
        return
    _PENDING.previous, _PENDING.installed, _PENDING.signum = current, signum, None
    signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame) -> None:
    if _PENDING.signum is not None:
        return  # already handling one
    _PENDING.signum = signum
    log.warning("received %s: saving the running stage at the end of this step", signal.Signals(signum).name)
    if _PENDING.active_fits == 0:  # no fit running (data, teacher outputs, evaluation): nothing to save
        _hand_over(signum, frame, saved=None)


def _hand_over(signum: int, frame, saved: Path | None) -> None:
    previous = _PENDING.previous
    where = f"saved {saved}" if saved else "no fit was running"
    if callable(previous):  # submitit: checkpoint the launcher call, requeue, exit (rank zero only)
        log.warning("pre-empted (%s; %s): handing over to the scheduler's handler", signal.Signals(signum).name, where)
        previous(signum, frame)
    if is_global_zero():
        print(f"pre-empted by {signal.Signals(signum).name} ({where}); relaunch the same command with the same "
              "hydra.run.dir (or sweep dir) to continue", file=sys.stderr, flush=True)
    raise Preempted(128 + int(signum))


class CheckpointOnPreemption(pl.Callback):
    """Saves the stage's ``last.ckpt`` once the training step during which the warning signal came has
    completed (at the next step's start, the epoch's end or the fit's end), all ranks agreeing first so that a DDP job saves
    one consistent state; then hands over (see the module docstring).

    Why the next step's start and not the current step's end: at ``on_train_batch_end`` Lightning has not yet
    counted the batch as completed, so a checkpoint saved there would replay it on resume."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _PENDING.active_fits += 1

    def _leave(self) -> None:
        _PENDING.active_fits = max(_PENDING.active_fits - 1, 0)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, Preempted):
            self._leave()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx > 0:  # the first batch of an epoch: the previous epoch's end already saved
            self._save_if_requested(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_if_requested(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_if_requested(trainer)
        self._leave()

    def _save_if_requested(self, trainer: pl.Trainer) -> None:
        requested = _PENDING.signum is not None
        if trainer.world_size > 1:  # one rank may get the signal a step before another
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        signum = _PENDING.signum or warning_signal()
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else \
            Path(trainer.default_root_dir) / "checkpoints"
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # atomic (AtomicCheckpointIO), full training state
        log.warning("pre-emption: saved %s at step %d", path, trainer.global_step)
        self._leave()
        _hand_over(signum, None, saved=path)
