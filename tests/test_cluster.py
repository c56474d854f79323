"""The login-node workflow: GPU configs compose and submit from a CPU machine, SLURM jobs are shaped by the
trainer, a job on a node without the GPUs it asks for fails in one line into its error.txt, and a pre-empted
SLURM job saves its running stage, is requeued and ends with the uninterrupted run's metrics.

SLURM is played by fake client commands (tests/helpers/fake_slurm: sbatch, srun, sacct, squeue, scancel,
scontrol) that record what they are given and run the array's tasks on this machine, so the sweep goes through
Hydra's submitit launcher and submitit's job code for real."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from opdf_exp.errors import UserError
from opdf_exp.runner.cli import validate_overrides
from tests.test_train import REPO, run_cli

FAKE_SLURM = Path(__file__).parent / "helpers" / "fake_slurm"
SMALL = ["teacher=tiny_bert", "logger=none", "trainer.enable_progress_bar=false", "print_config=false",
         "teacher.finetune.trainer.max_steps=2", "data.module.limit_eval_examples=32", "data.module.batch_size=16",
         "data.module.max_length=32", "task.variants=null"]


@pytest.mark.parametrize("argv", [
    ["--cfg", "job", "trainer=fsdp"],
    ["--cfg", "job", "+experiment=tinyvit_imagenet"],
    ["--cfg", "job", "trainer=gpu"],
    ["-m", "hydra/launcher=slurm", "trainer=ddp", "+experiment=bert_glue", "seed=1,2,3"],
    ["-m", "hydra/launcher=slurm", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2"],
    ["-m", "hydra/launcher=slurm", "trainer=ddp_sim", "allow_cpu_ddp_on_cluster=true"],
], ids=["cfg-fsdp", "cfg-tinyvit", "cfg-gpu", "slurm-ddp", "slurm-fsdp-2-nodes", "slurm-cpu-ddp-allowed"])
def test_login_node_composes_and_submits_gpu_configs(argv):
    validate_overrides(argv)  # no GPU here: nothing is refused that runs elsewhere


@pytest.mark.parametrize("argv, expected", [
    (["trainer=gpu"], "no CUDA device is visible"),                              # a local run still fails fast
    (["-m", "trainer=ddp", "seed=1,2"], "no CUDA device is visible"),            # so does a local sweep
    (["-m", "hydra/launcher=local_parallel", "trainer=fsdp", "seed=1,2"], "needs GPUs"),
    (["-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "hydra.launcher.gpus_per_node=2"],
     "set hydra.launcher.gpus_per_node=4"),
    (["-m", "hydra/launcher=slurm", "trainer=ddp_sim"], "allow_cpu_ddp_on_cluster=true"),
    (["-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2", "hydra.launcher.tasks_per_node=1"],
     "one task per device"),
    (["decomposition=mpo", "decomposition.n=0"], "decomposition: n=0 must be an integer >= 2"),
    (["-m", "hydra/launcher=slurm", "trainer=ddp", "decomposition.n=1"], "variant 'kd_opdf': decomposition: n=1"),
    (["trainer.max_epochs=abc"], "trainer.max_epochs='abc' must be an integer"),
    (["teacher.finetune.trainer.max_steps=ten"], "teacher.finetune.trainer.max_steps='ten' must be an integer"),
    (["trainer.precision=bf17"], "trainer.precision='bf17' is unknown"),
    (["optim.lr=-1"], "optim.lr=-1 must be > 0"),
    (["distill.name=nope"], "KD method 'nope' is unknown"),
    (["decomposition=mpo", "decomposition.lr_scale=0"], "decomposition.lr_scale=0 must be a number > 0 or auto"),
    (["decomposition=mpo", "decomposition.lr_scale=fast"], "decomposition.lr_scale='fast' must be a number > 0"),
    (["decomposition=mpo", "decomposition.align.reduction=sum"], "decomposition.align.reduction='sum' is unknown"),
    (["decomposition=mpo", "decomposition.align.layer_map=diagonal"], "layer_map='diagonal' is unknown"),
    (["task.variants=null", "decomposition.lr_scale=auto"], "lr_scale=auto has no effect: no student of this job"),
    (["task=subquadratic", "teacher=tiny_llama", "data=lm_bbc", "student=subquadratic/mamba2", "student.rope=true"],
     "student.rope=true is not defined for mamba2"),
    (["task=subquadratic", "teacher=tiny_llama", "data=lm_bbc", "task.stages.end_to_end.divergence=jsd",
      "task.stages.end_to_end.beta=1.5"], "jsd beta=1.5 must be in [0, 1]"),
    (["task=subquadratic", "teacher=tiny_llama", "data=lm_bbc", "task.stages.end_to_end.on_policy=2"],
     "on_policy=2 is the share of on-policy batches"),
    (["task=subquadratic", "teacher=tiny_llama", "data=lm_bbc", "task.stages.end_to_end.chunk_size=0"],
     "chunk_size=0 must be a positive number of tokens"),
    (["task=subquadratic", "teacher=tiny_llama", "data=lm_bbc", "task.stages.end_to_end.divergence=kl"],
     "divergence='kl' is unknown"),
    (["-m", "hydra/launcher=slurm", "trainer=fsdp", "+trainer.strategy._target_=pytorch_lightning.strategies.FSDPStrategy",
      "+trainer.strategy.use_orig_params=false", "decomposition=mpo", "decomposition.train_central=false"],
     "set trainer.strategy.use_orig_params=true"),
])
def test_bad_config_fails_on_the_submitting_machine_in_one_line(argv, expected):
    with pytest.raises(UserError) as error:
        validate_overrides(argv)
    message = str(error.value)
    assert "\n" not in message and expected in message, message


def _fake_slurm_env(tmp_path: Path) -> dict:
    return {"PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path / "slurm"),
            "PYTHONPATH": str(REPO)}


def test_slurm_sweep_from_a_cpu_login_node_is_shaped_by_the_trainer(tmp_path):
    """A 4-GPU DDP sweep submitted from this CPU machine: the sbatch script asks for what Lightning will use,
    and each job, landing on a node without GPUs, fails in one line into its error.txt while the sweep goes on."""
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=30",
                      "hydra.launcher.array_parallelism=1", "trainer=ddp", "trainer.devices=2", *SMALL, "seed=1,2",
                      f"hydra.sweep.dir={sweep}"], tmp_path, **_fake_slurm_env(tmp_path))
    assert result.returncode == 1, result.stderr[-3000:]  # both jobs failed, reported, and the sweep ended
    scripts = list((tmp_path / "slurm").glob("job_*.sh"))
    assert len(scripts) == 1  # one array for the sweep
    script = scripts[0].read_text()
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)$", script, re.M))
    assert directives["partition"] == "gpu" and directives["gpus-per-node"] == "2"
    assert directives["ntasks-per-node"] == "2" and directives["nodes"] == "1"  # one task per device
    assert directives["array"] == "0-1%1" and directives["time"] == "30" and directives["signal"] == "USR2@120"
    for job in ("0", "1"):
        first = (sweep / job / "error.txt").read_text().splitlines()[0]
        assert "needs GPUs but no CUDA device is visible" in first
        assert not (sweep / job / "checkpoints").exists()  # failed before any stage
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["complete"] == 0 and len(summary["failed"]) == 2
    calls = (tmp_path / "slurm" / "calls.log").read_text()
    assert calls.startswith("sbatch ") and "\nsacct " in calls and calls.count("\nsrun ") == 2
    # both ranks of each job ran the check; only rank zero (SLURM_PROCID 0) wrote the job's files
    assert all(len(list((sweep / ".submitit").glob(f"*_{job}/*_log.err"))) == 2 for job in (0, 1))


@pytest.mark.parametrize("overrides, shape", [
    (["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], (4, 4, 2)),
    (["trainer=fsdp"], (1, 1, 1)),                                            # devices=-1: one GPU unless told
    (["trainer=fsdp", "hydra.launcher.gpus_per_node=8"], (8, 8, 1)),          # ... then a task per GPU
    (["trainer=gpu"], (1, 1, 1)),
    (["trainer=cpu"], (None, 1, 1)),
    (["trainer=ddp_sim", "allow_cpu_ddp_on_cluster=true"], (None, 2, 1)),
])
def test_slurm_job_shape_follows_the_trainer(overrides, shape):
    """(GPUs per node, tasks per node, nodes) as the launcher will pass them to sbatch."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module("opdf_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    GlobalHydra.instance().clear()
    assert (launcher["gpus_per_node"], launcher["tasks_per_node"], launcher["nodes"]) == shape


def test_preempted_slurm_job_saves_is_requeued_and_ends_like_the_uninterrupted_one(tmp_path):
    """Job 0 gets SLURM's warning signal (USR2) at step 3 of 8: it saves its stage, submitit requeues it
    (scontrol requeue), and the requeued job resumes from that checkpoint; job 1, the same run unsignalled,
    ends with the same metrics."""
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=slurm", "trainer=cpu", *SMALL, "trainer.max_steps=8",
                      "data.module.limit_train_examples=64", "trainer.val_check_interval=2",
                      "callbacks.model_checkpoint.monitor=null", "optim.lr=1e-3",
                      "+callbacks.preempt._target_=tests.helpers.signal_at_step.SignalAtStep",
                      "+callbacks.preempt.step=3,1000", "+callbacks.preempt.marker=${paths.output_dir}/signalled",
                      f"hydra.sweep.dir={sweep}"], tmp_path, **_fake_slurm_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    calls = (tmp_path / "slurm" / "calls.log").read_text()
    assert calls.count("scontrol requeue") == 1 and calls.count("\nsrun ") == 3  # job 0 ran twice
    submitit_log = next((sweep / ".submitit").glob("*_0/*_0_0_log.err")).read_text()
    assert "Caught signal SIGUSR2" in submitit_log and "this job is preempted" in submitit_log
    log = (sweep / "0" / "quickstart.log").read_text()  # Hydra's job log: both attempts
    assert "pre-emption: saved" in log and "resuming stage from" in log
    a, b = (json.loads((sweep / job / "results.json").read_text()) for job in ("0", "1"))
    assert a["variants"][0]["steps"] == b["variants"][0]["steps"] == 8
    assert a["metrics"] == b["metrics"]


def test_gpu_check_dry_run_composes_every_step_here():
    """scripts/gpu_check.py --dry-run: every GPU job composes and passes the config checks on this CPU machine, and
    the GPU tests collect (the script itself runs on the first GPU lent)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run"], cwd=REPO,
                            capture_output=True, text=True, timeout=180,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "all steps compose" in result.stdout and "FAILED" not in result.stdout
    assert result.stdout.count("would run: python -m opdf_exp") == 6
