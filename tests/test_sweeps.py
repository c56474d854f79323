"""Sweeps that survive: kill-and-relaunch, exact resume, failure isolation, DDP on 2 CPU processes, and the
one-line errors of bad sweeps. Every test drives the real CLI in a subprocess, as a user would."""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opdf_exp.runner.report import report
from tests.test_train import REPO, run_cli

SMALL = ["teacher=tiny_bert", "logger=none", "trainer.enable_progress_bar=false", "print_config=false",
         "teacher.finetune.trainer.max_steps=2", "data.module.limit_eval_examples=32", "data.module.batch_size=16",
         "data.module.max_length=32", "task.variants=null"]


def _env(cwd: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OPDF_ROOT": str(cwd),
            "PYTHONPATH": str(REPO)}


def test_killed_sweep_relaunches_and_runs_every_job_exactly_once(tmp_path):
    """A tensor-shape sweep (n = 2, 3) x 2 seeds, SIGKILLed once half of its jobs finished, then relaunched with
    the same command: finished jobs are skipped (their results untouched), the rest run, and the report's means
    and spreads equal the hand-computed ones of the jobs' own results."""
    sweep = tmp_path / "sweep"
    args = [sys.executable, "-m", "opdf_exp", "-m", *SMALL, "decomposition=mpo", "decomposition.n=2,3",
            "seed=1,2", "trainer.max_steps=3", "data.module.limit_train_examples=48",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(sweep.glob("*/results.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.parent.name: p.read_bytes() for p in sweep.glob("*/results.json")}
    assert 2 <= len(before) < 4, before.keys()
    relaunch = subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=400)
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    after = {p.parent.name: p.read_bytes() for p in sweep.glob("*/results.json")}
    assert sorted(after) == [str(i) for i in range(4)]
    assert all(after[name] == content for name, content in before.items())  # finished jobs were not rerun
    output = relaunch.stdout + relaunch.stderr  # Hydra's job log goes to stdout
    assert output.count("already holds a complete results.json") == len(before), output[-3000:]
    assert "[sweep] job 3" in output and "left 0" in output
    payloads = [json.loads(c) for c in after.values()]
    for n in (2, 3):
        values = [p["metrics"]["test/acc"] for p in payloads if f"decomposition.n={n}" in p["overrides"]]
        assert len(values) == 2
        cell = next(c for c in report([sweep])["experiments"][0]["cells"]
                    if c["setting"] == {"decomposition.n": str(n)} and c["model"] == "student")
        assert cell["stats"]["test/acc"]["mean"] == pytest.approx(statistics.fmean(values))
        assert cell["stats"]["test/acc"]["std"] == pytest.approx(statistics.stdev(values))
    assert (sweep / "summary.md").is_file()


def test_job_killed_or_preempted_mid_epoch_resumes_to_the_uninterrupted_metrics(tmp_path):
    """SIGKILL at step 5 of 10 (last.ckpt at step 4, mid-epoch: 6 batches an epoch), relaunch into the same run
    folder: the final metrics and the per-step training losses equal the uninterrupted run's. The same for the
    scheduler's warning signal (SIGUSR2) at step 3: the job saves the stage at once, exits 128 + 12 with one line
    saying how to continue, and the relaunch resumes from that step."""
    common = [*SMALL, "logger=csv", "trainer.log_every_n_steps=1", "data.module.limit_train_examples=96",
              "trainer.max_steps=10", "trainer.val_check_interval=2", "callbacks.model_checkpoint.monitor=null",
              "optim.lr=1e-3"]
    env = {"PYTHONPATH": str(REPO)}
    assert run_cli([*common, f"hydra.run.dir={tmp_path / 'straight'}"], tmp_path, **env).returncode == 0
    killed = run_cli([*common, f"hydra.run.dir={tmp_path / 'resumed'}", "+callbacks.killer._target_=tests.helpers.kill.KillAtStep",
                      "+callbacks.killer.step=5"], tmp_path, **env)
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "resumed" / "results.json").exists()
    resumed = run_cli([*common, f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path, **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage from" in resumed.stdout + resumed.stderr
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "resumed"))
    assert a["variants"][0]["steps"] == b["variants"][0]["steps"] == 10
    assert a["metrics"] == b["metrics"]

    def losses(folder):
        import csv

        rows = csv.DictReader((tmp_path / folder / "csv" / "metrics.csv").open())
        return {r["step"]: r["train/loss"] for r in rows if r.get("train/loss")}

    straight, resumed_losses = losses("straight"), losses("resumed")
    assert resumed_losses and all(straight[step] == value for step, value in resumed_losses.items())

    signalled = [*common, f"hydra.run.dir={tmp_path / 'preempted'}",
                 "+callbacks.preempt._target_=tests.helpers.signal_at_step.SignalAtStep", "+callbacks.preempt.step=3",
                 f"+callbacks.preempt.marker={tmp_path / 'preempted' / 'signalled'}"]
    preempted = run_cli(signalled, tmp_path, **env)
    assert preempted.returncode == 128 + signal.SIGUSR2, preempted.stderr[-3000:]
    assert "pre-empted by SIGUSR2" in preempted.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "preempted" / "results.json").exists()
    assert (tmp_path / "preempted" / "checkpoints" / "student" / "last.ckpt").is_file()
    relaunched = run_cli(signalled, tmp_path, **env)  # the marker says it was signalled: no second signal
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    c = json.loads((tmp_path / "preempted" / "results.json").read_text())
    assert c["variants"][0]["steps"] == 10 and c["metrics"] == a["metrics"]


def test_failing_job_writes_error_txt_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", *SMALL, "trainer.max_steps=1", "data.module.limit_train_examples=32",
                      "student.model.layers=[0,1],[0,9]", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 1  # a sweep with a failed job says so
    assert (sweep / "0" / "results.json").is_file() and not (sweep / "1" / "results.json").exists()
    error = (sweep / "1" / "error.txt").read_text().splitlines()
    assert "points past the teacher" in error[0] and any("Traceback" in line for line in error)
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["complete"] == 1 and len(summary["failed"]) == 1 and "past the teacher" in summary["failed"][0]["error"]


def test_ddp_on_two_cpu_processes_in_a_multirun(tmp_path):
    """``-m trainer=ddp_sim seed=42,1`` with the default variants (four students per job): each job runs on 2 gloo
    processes, writes one results.json (rank zero) with world size 2, each step takes two batches (the epoch
    count doubles at the same step budget), evaluation of the same untrained teacher equals the single-process
    run's, and the end-of-sweep report reads both jobs."""
    common = [*SMALL, "teacher.finetune.enabled=false", "trainer.max_steps=4", "data.module.limit_train_examples=64",
              "save_student=false"]
    single = run_cli([*common, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, timeout=200)
    started = time.perf_counter()
    sweep = tmp_path / "two"
    with_variants = [o for o in common if o != "task.variants=null"]
    ddp = run_cli(["-m", *with_variants, "task.variants.no_kd=null", "task.variants.kd_svd=null", "trainer=ddp_sim",
                   "seed=42,1", f"hydra.sweep.dir={sweep}"], tmp_path, timeout=300)
    assert time.perf_counter() - started < 280  # never hangs
    assert single.returncode == 0 and ddp.returncode == 0, ddp.stderr[-3000:]
    assert (ddp.stdout + ddp.stderr).count("results written") == 2  # one per job, by rank zero
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    jobs = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert one["world_size"] == 1 and all(job["world_size"] == 2 for job in jobs)
    two = jobs[0]  # seed 42, as the single run
    kd = next(v for v in two["variants"] if v["name"] == "kd")  # the single run's student is KD too
    assert {v["name"] for v in two["variants"]} == {"kd", "kd_opdf"} and all(v["world_size"] == 2 for v in two["variants"])
    assert one["variants"][0]["epochs"] == 1 and kd["epochs"] == 2  # 64 examples, 16 x 2 a step
    for key, value in one["teacher"]["metrics"].items():
        assert two["teacher"]["metrics"][key] == pytest.approx(value, abs=1e-6), key
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["complete"] == 2 and not summary["failed"]
    assert {row["model"] for row in summary["experiments"][0]["rows"]} >= {"KD", "KD + OPDF (MPO)"}


@pytest.mark.slow  # ddp_spawn starts 2 processes per fit, validate and test: about a minute on 2 cores
def test_ddp_spawn_no_longer_hangs(tmp_path):
    result = run_cli([*SMALL, "trainer=ddp_sim", "trainer.strategy=ddp_spawn", "teacher.finetune.enabled=false",
                      "trainer.max_steps=1", "data.module.limit_train_examples=32", "save_student=false"], tmp_path,
                     timeout=200)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("args, expected", [
    (["-m", "trainer.max_stepz=1,2"], "trainer.max_steps"),
    (["trainer=ddp"], "trainer=ddp_sim"),
])
def test_bad_sweeps_fail_before_any_job(tmp_path, args, expected):
    result = run_cli(args, tmp_path, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], lines
    assert not list(tmp_path.rglob("results.json")) and not list(tmp_path.rglob(".hydra"))


def assert_relocated_relaunch_is_skipped(overrides, folder, stored, caplog):
    """The same sweep relaunched from another checkout (a frozen worktree, a symlinked path) names the same folder
    with another string; the checkpoint callback's dirpath holds it. That is the same config: skipped. A result of
    the old digest format (which hashed the folder) is compared on the other entries."""
    from omegaconf import open_dict

    from opdf_exp.runner.app import config_digests, run_task
    from tests.helpers.hydra import compose_job

    alias = folder.parent / f"{folder.name}_elsewhere"
    alias.symlink_to(folder)
    with compose_job(overrides, alias) as cfg:
        assert "callbacks" in config_digests(cfg) and run_task(cfg)["skipped"] is True
    with compose_job(overrides, folder) as cfg:  # rewrite the result as the old format wrote it, here
        old = {**stored, "config_digests": config_digests(cfg, location_free=False)}
    old.pop("config_digests_format")
    (folder / "results.json").write_text(json.dumps(old))
    with compose_job(overrides, alias) as cfg:
        assert config_digests(cfg, location_free=False)["callbacks"] != old["config_digests"]["callbacks"]
        assert run_task(cfg)["skipped"] is True
    with compose_job(overrides, alias) as cfg, open_dict(cfg), caplog.at_level("WARNING"):
        cfg.task.train.lr = float(cfg.task.train.lr) * 2
        cfg.resume = "overrides"  # kept, but only after naming the entry that differs: task, not the folders
        assert run_task(cfg)["skipped"] is True
        assert any("config's task differ" in r.getMessage() for r in caplog.records)
    caplog.clear()
    (folder / "results.json").write_text(json.dumps(stored))


def test_a_finished_job_is_rerun_when_its_config_changed_and_kept_when_told(tmp_path, caplog):
    """The same overrides with an edited config (a YAML value, not an override) do not reuse the finished
    result under resume=auto: the job reruns and the log names the entry that differs. resume=overrides keeps
    it, saying so; an unchanged relaunch is skipped."""
    from omegaconf import open_dict

    from opdf_exp.runner.app import run_task
    from tests.helpers.hydra import compose_job

    overrides = ["+experiment=geometric_toy_smoke", "task.train.steps=20", "task.eval.samples=1024", "logger=none"]
    with compose_job(overrides, tmp_path) as cfg:
        first = run_task(cfg)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert "task" in stored["config_digests"] and "paths" not in stored["config_digests"]
    with compose_job(overrides, tmp_path) as cfg:
        assert run_task(cfg)["skipped"] is True
    assert_relocated_relaunch_is_skipped(overrides, tmp_path, stored, caplog)
    with compose_job(overrides, tmp_path) as cfg, caplog.at_level("WARNING"), open_dict(cfg):
        cfg.task.train.lr = float(cfg.task.train.lr) * 2  # an edited experiment file: the overrides are the same
        cfg.resume = "overrides"
        assert run_task(cfg)["skipped"] is True
        assert any("kept" in r.getMessage() and "task differ" in r.getMessage() for r in caplog.records)
        caplog.clear()
        cfg.resume = "auto"
        rerun = run_task(cfg)
    assert "skipped" not in rerun and rerun["metrics"] != first["metrics"]
    assert any("rerun:" in r.getMessage() and "(task differ)" in r.getMessage() for r in caplog.records)
    with compose_job(overrides + ["+resume=sometimes"], tmp_path) as cfg, pytest.raises(Exception, match="resume=overrides"):
        run_task(cfg)


def test_a_relaunch_that_spells_the_same_config_differently_keeps_the_result(tmp_path, caplog):
    """Pinning a value equal to its default (a study script that pins ``student.rope=false`` before the default
    flips) is the same job: kept, and the result takes the new spelling (reports group by it) while remembering
    the one it was made with. Pinning another value, or a result without location-free digests, reruns."""
    from opdf_exp.runner import app
    from opdf_exp.runner.app import run_task
    from tests.helpers.hydra import compose_job

    overrides = ["+experiment=geometric_toy_smoke", "task.train.steps=20", "task.eval.samples=1024", "logger=none"]
    with compose_job(overrides, tmp_path) as cfg:
        first = run_task(cfg)
        default_steps, default_seed = int(cfg.task.train.steps), int(cfg.seed)
    pinned = overrides + [f"seed={default_seed}"]  # the default, now written out
    with compose_job(pinned, tmp_path) as cfg, caplog.at_level("INFO"):
        kept = run_task(cfg)
    assert kept["skipped"] is True and json.dumps(kept["metrics"]) == json.dumps(first["metrics"])
    assert any("which give the same config" in r.getMessage() for r in caplog.records)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["overrides"] == pinned and stored["overrides_as_run"] == overrides
    with compose_job(list(reversed(pinned)), tmp_path) as cfg:  # another order: still the same job
        assert run_task(cfg)["skipped"] is True
    assert json.loads((tmp_path / "results.json").read_text())["overrides_as_run"] == overrides
    # a result of the old digest format (folders hashed into "callbacks") vouches for every other entry...
    stored.pop("config_digests_format")
    (tmp_path / "results.json").write_text(json.dumps(stored))
    with compose_job(overrides, tmp_path) as cfg:
        assert run_task(cfg)["skipped"] is True
    # ...but not for an override that writes the entry it cannot compare
    assert "config_digests_format" not in json.loads((tmp_path / "results.json").read_text())
    with compose_job(overrides + ["callbacks=default"], tmp_path) as cfg:
        assert "callbacks" in app.location_bound_entries(cfg)
        assert "skipped" not in run_task(cfg)
    changed = overrides[:1] + [f"task.train.steps={default_steps + 1}"] + overrides[2:]
    with compose_job(changed, tmp_path) as cfg:
        rerun = run_task(cfg)
    assert "skipped" not in rerun and json.dumps(rerun["metrics"]) != json.dumps(first["metrics"])


def test_a_rerun_stopped_part_way_does_not_cost_the_finished_result(tmp_path, monkeypatch):
    """A finished result that a relaunch does not reuse (here: made with other overrides and no digests, so its
    config cannot be vouched for) is set aside while the job reruns, not deleted: stopping that rerun leaves it in
    results.previous.json; the rerun's own result, once written, supersedes it."""
    import hydra

    from opdf_exp.runner.app import PREVIOUS_RESULTS_FILE, run_task
    from tests.helpers.hydra import compose_job

    overrides = ["+experiment=geometric_toy_smoke", "task.train.steps=20", "task.eval.samples=1024", "logger=none"]
    finished = {"status": "complete", "overrides": overrides[:-1], "metrics": {"loss": 0.5}}
    (tmp_path / "results.json").write_text(json.dumps(finished))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped part-way")

    with compose_job(overrides, tmp_path) as cfg:
        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(hydra.utils, "instantiate", stopped)
            run_task(cfg)
        assert not (tmp_path / "results.json").exists()  # never a stale result for this job...
        assert json.loads((tmp_path / PREVIOUS_RESULTS_FILE).read_text()) == finished  # ...nor a lost one
        rerun = run_task(cfg)
    assert "skipped" not in rerun and not (tmp_path / PREVIOUS_RESULTS_FILE).exists()
    assert json.loads((tmp_path / "results.json").read_text())["overrides"] == overrides


def test_a_key_added_at_its_neutral_value_keeps_finished_results(tmp_path, monkeypatch, caplog):
    """A new option changes its entry's digest. Registered in NEUTRAL_ADDITIONS with the value that reproduces
    the jobs before it, it keeps their results at that value and reruns them at any other; unregistered, it
    reruns them (the safe default)."""
    from omegaconf import open_dict

    from opdf_exp.runner import app
    from tests.helpers.hydra import compose_job

    overrides = ["+experiment=geometric_toy_smoke", "logger=none"]
    with compose_job(overrides, tmp_path) as cfg:
        stored = {"status": "complete", "overrides": overrides, "config_digests": app.config_digests(cfg),
                  "config_digests_format": app.DIGESTS_FORMAT}
        (tmp_path / "results.json").write_text(json.dumps(stored))
        assert app.completed_result(tmp_path, overrides, cfg) is not None
        with open_dict(cfg):
            cfg.task.train.new_option = 0  # an option added since, whose 0 is what jobs did before it
        assert app.completed_result(tmp_path, overrides, cfg) is None  # unregistered: rerun
        monkeypatch.setattr(app, "NEUTRAL_ADDITIONS", {"task.train.new_option": 0})
        with caplog.at_level("INFO"):
            assert app.completed_result(tmp_path, overrides, cfg) is not None
        assert any("neutral values (task.train.new_option)" in r.getMessage() for r in caplog.records)
        cfg.task.train.new_option = 1  # the same key at another value changes what the job does
        assert app.completed_result(tmp_path, overrides, cfg) is None
        cfg.task.train.new_option = 0
        cfg.task.train.lr = float(cfg.task.train.lr) * 2  # a real change beside the neutral key still reruns
        assert app.completed_result(tmp_path, overrides, cfg) is None


def test_a_neutral_key_keeps_the_variant_rows_of_a_multi_variant_job(tmp_path, monkeypatch):
    """The per-variant reuse of a GLUE-style job applies the same rule: a row made before a registered key existed
    is still its variant's row while the key holds its neutral value."""
    from omegaconf import open_dict

    from opdf_exp.runner import app
    from opdf_exp.runner.distill_task import same_variant, variant_digest
    from tests.helpers.hydra import compose_job

    with compose_job(["+experiment=quickstart", "logger=none"], tmp_path) as cfg:
        row = {"config_digest": variant_digest(cfg)}
        with open_dict(cfg):
            cfg.task.new_option = "off"
        digest = variant_digest(cfg)
        assert digest != row["config_digest"] and not same_variant(row, cfg, digest)
        monkeypatch.setattr(app, "NEUTRAL_ADDITIONS", {"task.new_option": "off"})
        assert same_variant(row, cfg, digest)
        cfg.task.new_option = "on"
        assert not same_variant(row, cfg, variant_digest(cfg))


def test_variant_rows_are_reused_only_from_a_result_of_the_same_overrides_and_never_with_resume_never(tmp_path,
                                                                                                     monkeypatch):
    """results.previous.json holds any finished result a rerun set aside: its variant rows are reused only when it
    was made with this job's overrides, and resume=never reuses nothing."""
    from omegaconf import OmegaConf

    from opdf_exp.runner.app import PREVIOUS_RESULTS_FILE
    from opdf_exp.runner import distill_task
    from opdf_exp.runner.distill_task import reusable_rows

    monkeypatch.setattr(distill_task, "job_overrides", lambda: [])  # this job's overrides (no Hydra job here)
    row = {"name": "kd", "config_digest": "abc", "metrics": {"kd/test/acc": 0.9}}
    previous = {"status": "complete", "overrides": [], "variants": [row]}
    (tmp_path / PREVIOUS_RESULTS_FILE).write_text(json.dumps(previous))
    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "resume": "auto"})
    assert reusable_rows(cfg) == {"kd": row}
    assert reusable_rows(OmegaConf.merge(cfg, {"resume": "never"})) == {}
    (tmp_path / PREVIOUS_RESULTS_FILE).write_text(json.dumps({**previous, "overrides": ["seed=2"]}))
    assert reusable_rows(cfg) == {}
