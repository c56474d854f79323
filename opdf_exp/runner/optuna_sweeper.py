"""Hydra's Optuna sweeper, made resumable: a relaunch of the same search (same ``hydra.sweep.dir``) continues the
study stored in the sweep folder instead of starting over or overwriting earlier trials' job folders.

Why: the plugin (hydra-optuna-sweeper 1.3) loads an existing study (``load_if_exists``) but then runs
``n_trials`` *more* trials and numbers the new jobs from 0 again, so job folder 0 of the relaunch overwrites
trial 0's. Here the budget counts the finished trials already stored, job numbers continue after the last
trial, trials left RUNNING by a killed search are marked FAIL, and the SQLite file's folder is created first
(the sweeper opens the study before the launcher creates the sweep folder).

How: Hydra only instantiates sweepers from its ``hydra_plugins`` namespace, so instead of a subclass the CLI
(:func:`opdf_exp.runner.cli.main`) wraps the plugin's ``OptunaSweeperImpl.sweep`` once with :func:`install`.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def install() -> bool:
    """Make the Optuna sweeper resumable (idempotent); False when the plugin is not installed."""
    try:
        from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl
    except ImportError:
        return False
    if getattr(OptunaSweeperImpl.sweep, "_opdf_resumable", False):
        return True
    original = OptunaSweeperImpl.sweep

    def sweep(self, arguments):
        if prepare_resume(self):
            return original(self, arguments)
        return None

    sweep._opdf_resumable = True
    OptunaSweeperImpl.sweep = sweep
    return True


def prepare_resume(impl) -> bool:
    """Adjust the sweeper to the study stored at its ``storage``; False when the trial budget is already spent."""
    import optuna

    storage = impl.storage
    if isinstance(storage, str) and storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if not storage or not impl.study_name:
        return True
    try:
        study = optuna.load_study(study_name=impl.study_name, storage=storage)
    except KeyError:  # no such study yet: a fresh search
        return True
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)  # killed mid-trial
    finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    impl.job_idx = len(study.trials)
    impl.n_trials = max(int(impl.n_trials) - len(finished), 0)
    log.info("continuing Optuna study %r: %d trials stored, %d to go", impl.study_name, len(finished), impl.n_trials)
    return impl.n_trials > 0
