"""Scale-out on existing engines: Optuna search that a relaunch continues, parallel jobs (joblib) sharing one
teacher fine-tune, and submitit's local executor (the SLURM launcher's code path) landing in the same layout and
the same report as the other launchers."""
from __future__ import annotations

import json
import sqlite3

import pytest

from opdf_exp.runner.report import report
from tests.test_train import run_cli

FAST = ["teacher=tiny_bert", "logger=none", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
        "teacher.finetune.trainer.max_steps=2", "data.module.limit_train_examples=32",
        "data.module.limit_eval_examples=32", "data.module.batch_size=16", "data.module.max_length=32",
        "print_config=false"]


@pytest.mark.parametrize("plugin", ["hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_joblib_launcher",
                                    "hydra_plugins.hydra_submitit_launcher"])
def test_sweep_plugins_are_installed(plugin):
    __import__(plugin)


def test_optuna_search_is_seeded_stored_and_continued_by_a_relaunch(tmp_path):
    sweep = tmp_path / "search"
    common = ["hparams_search=opdf_optuna", *FAST, f"hydra.sweep.dir={sweep}"]
    first = run_cli([*common, "hydra.sweeper.n_trials=2"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    relaunch = run_cli([*common, "hydra.sweeper.n_trials=3"], tmp_path)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert "2 trials stored, 1 to go" in relaunch.stdout + relaunch.stderr
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "1", "2"]  # numbered on
    with sqlite3.connect(sweep / "optuna.db") as db:
        states = [row[0] for row in db.execute("select state from trials order by number")]
    assert states == ["COMPLETE"] * 3
    assert (sweep / "optimization_results.yaml").is_file() and (sweep / "summary.md").is_file()
    params = [json.loads((sweep / str(i) / "results.json").read_text())["overrides"] for i in range(3)]
    assert all(any(o.startswith("decomposition.n=") for o in p) for p in params)


def test_optuna_metric_never_logged_fails_with_the_logged_names(tmp_path):
    sweep = tmp_path / "search"
    result = run_cli(["hparams_search=opdf_optuna", *FAST, "hydra.sweeper.n_trials=1", "optimized_metric=val/nope",
                      f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode != 0
    line = (sweep / "0" / "error.txt").read_text().splitlines()[0]
    assert "optimized_metric='val/nope' was never logged" in line and "val/acc" in line


def test_parallel_jobs_share_one_teacher_and_submitit_lands_in_the_same_report(tmp_path):
    cache = tmp_path / "cache"
    parallel = tmp_path / "parallel"
    result = run_cli(["-m", "hydra/launcher=local_parallel", *FAST, "task.variants=null", "teacher.finetune.cache=true",
                      "decomposition=mpo", "decomposition.n=2,3", f"hydra.sweep.dir={parallel}"], tmp_path,
                     OPDF_CACHE_DIR=str(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in (cache / "teachers").iterdir() if p.is_dir()].__len__() == 1  # built once
    logs = [(parallel / str(i) / "quickstart.log").read_text() for i in (0, 1)]
    assert sum("reusing fine-tuned teacher" in text for text in logs) == 1  # the other job waited, then loaded it
    submitit = tmp_path / "submitit"
    result = run_cli(["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *FAST,
                      "task.variants=null", "teacher.finetune.cache=true", "decomposition=mpo", "decomposition.n=4",
                      f"hydra.sweep.dir={submitit}"], tmp_path, OPDF_CACHE_DIR=str(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (submitit / "0" / "results.json").is_file()
    summary = report([parallel, submitit], out_dir=tmp_path, by=["decomposition.n"])
    settings = {row["setting"] for row in summary["experiments"][0]["rows"]}
    assert settings == {"decomposition.n=2", "decomposition.n=3", "decomposition.n=4"}
