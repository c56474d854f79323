"""Sweep robustness and scale-out figures for issue 7, measured side by side in one run.

1. Kill and relaunch: a 2x2 tensor-shape sweep (decomposition.n x max_bond) x 2 seeds on the tiny random teacher,
   SIGKILLed once half of its jobs finished, then relaunched with the same command; compared with the same sweep
   run uninterrupted. Reports both wall times, jobs skipped / run by the relaunch, and whether every job's metrics
   equal the uninterrupted sweep's.
2. DDP on 2 CPU processes (trainer=ddp_sim, gloo) vs 1 process, same job: wall time and final metrics.
3. Report time on 100 fake-but-real-format job folders (results.json as the runner writes them, with .hydra).

    python experiments/bench_sweeps.py            # all three (about 6 minutes on 2 cores)
    python experiments/bench_sweeps.py report     # only the report timing
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = ["teacher=tiny_bert", "logger=none", "trainer.enable_progress_bar=false", "print_config=false",
         "teacher.finetune.trainer.max_steps=2", "data.module.limit_eval_examples=32", "data.module.batch_size=16",
         "data.module.max_length=32", "task.variants=null"]


def _env(root: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OPDF_ROOT": str(root),
            "PYTHONPATH": str(REPO)}


def kill_and_relaunch(root: Path) -> dict:
    def command(sweep: Path) -> list[str]:
        return [sys.executable, "-m", "opdf_exp", "-m", *SMALL, "decomposition=mpo", "decomposition.n=2,3",
                "decomposition.max_bond=2,4", "seed=1,2", "trainer.max_steps=6", "data.module.limit_train_examples=64",
                f"hydra.sweep.dir={sweep}"]

    started = time.perf_counter()
    straight = subprocess.run(command(root / "straight"), cwd=root, env=_env(root), capture_output=True, text=True)
    t_straight = time.perf_counter() - started
    assert straight.returncode == 0, straight.stderr[-2000:]
    sweep = root / "killed"
    started = time.perf_counter()
    proc = subprocess.Popen(command(sweep), cwd=root, env=_env(root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    while len(list(sweep.glob("*/results.json"))) < 4:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    t_until_kill = time.perf_counter() - started
    done_before = len(list(sweep.glob("*/results.json")))
    started = time.perf_counter()
    relaunch = subprocess.run(command(sweep), cwd=root, env=_env(root), capture_output=True, text=True)
    t_relaunch = time.perf_counter() - started
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    out = relaunch.stdout + relaunch.stderr
    same = all(json.loads((root / "straight" / str(i) / "results.json").read_text())["metrics"] ==
               json.loads((sweep / str(i) / "results.json").read_text())["metrics"] for i in range(8))
    return {"uninterrupted_s": t_straight, "until_kill_s": t_until_kill, "relaunch_s": t_relaunch,
            "done_before_kill": done_before, "skipped_by_relaunch": out.count("already holds a complete results.json"),
            "resumed_stages": out.count("resuming stage from"), "metrics_equal_uninterrupted": same}


def ddp_vs_single(root: Path) -> dict:
    common = [sys.executable, "-m", "opdf_exp", *SMALL, "trainer.max_steps=8", "data.module.limit_train_examples=256",
              "save_student=false"]
    out = {}
    for name, extra in (("1 process", []), ("ddp_sim (2 processes)", ["trainer=ddp_sim"])):
        started = time.perf_counter()
        result = subprocess.run([*common, *extra, f"hydra.run.dir={root / name.split()[0]}"], cwd=root, env=_env(root),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        payload = json.loads((root / name.split()[0] / "results.json").read_text())
        out[name] = {"wall_s": time.perf_counter() - started, "world_size": payload["world_size"],
                     "epochs": payload["variants"][0]["epochs"], "steps": payload["variants"][0]["steps"],
                     **{k: payload["metrics"][k] for k in ("val/acc", "test/acc", "val/loss")}}
    return out


def report_timing(root: Path, n_jobs: int = 100) -> dict:
    from opdf_exp.runner.report import report
    from opdf_exp.utils.io import atomic_write_json, atomic_write_text

    rng = random.Random(0)
    sweep = root / "fake_sweep"
    for i in range(n_jobs):
        n, bond, seed = 2 + i % 5, (8, 32)[(i // 5) % 2], 1 + i // 10
        job = sweep / str(i)
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"decomposition.n={n}", f"decomposition.max_bond={bond}", f"seed={seed}"]
        atomic_write_text(job / ".hydra" / "overrides.yaml", "".join(f"- {o}\n" for o in overrides))
        atomic_write_json(job / "results.json", {
            "status": "complete", "task_name": "quickstart", "overrides": overrides, "seed": seed, "metrics": {},
            "teacher": {"metrics": {"teacher/test/acc": 0.95 + rng.gauss(0, 0.005)}, "params": {"train": 1, "inference": 2}},
            "variants": [{"name": v, "label": v, "params": {"train": 10, "inference": 5},
                          "metrics": {f"{v}/test/acc": 0.9 + rng.gauss(0, 0.01), f"{v}/val/acc": 0.9 + rng.gauss(0, 0.01)}}
                         for v in ("kd", "kd_opdf")]})
    started = time.perf_counter()
    summary = report([sweep])
    first = time.perf_counter() - started
    started = time.perf_counter()
    report([sweep])
    second = time.perf_counter() - started
    started = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "opdf_exp.report", str(sweep)], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    return {"jobs": n_jobs, "report_s": first, "report_again_s": second, "cli_s": time.perf_counter() - started,
            "rows": len(summary["experiments"][0]["rows"]),
            "paired": len(summary["experiments"][0]["paired"]), "plots": len(summary["experiments"][0]["plots"])}


def main() -> None:
    which = sys.argv[1:] or ["sweep", "ddp", "report"]
    print("command: python experiments/bench_sweeps.py " + " ".join(sys.argv[1:]))
    root = Path(tempfile.mkdtemp(prefix="bench_sweeps_"))
    try:
        if "sweep" in which:
            r = kill_and_relaunch(root)
            print(f"\nkill and relaunch (2x2 shapes x 2 seeds, 8 jobs): uninterrupted {r['uninterrupted_s']:.1f} s; "
                  f"killed after {r['until_kill_s']:.1f} s with {r['done_before_kill']} jobs done; relaunch "
                  f"{r['relaunch_s']:.1f} s ({r['relaunch_s'] / r['uninterrupted_s']:.2f}x of uninterrupted), "
                  f"skipped {r['skipped_by_relaunch']}, resumed stages {r['resumed_stages']}; "
                  f"metrics equal to the uninterrupted sweep: {r['metrics_equal_uninterrupted']}")
        if "ddp" in which:
            r = ddp_vs_single(root)
            print("\n| run | wall (s) | world size | steps | epochs | val/acc | test/acc | val/loss |\n|---|---|---|---|---|---|---|---|")
            for name, v in r.items():
                print(f"| {name} | {v['wall_s']:.1f} | {v['world_size']} | {v['steps']} | {v['epochs']} | "
                      f"{v['val/acc']:.4f} | {v['test/acc']:.4f} | {v['val/loss']:.4f} |")
        if "report" in which:
            r = report_timing(root)
            print(f"\nreport on {r['jobs']} job folders: {r['report_s']:.2f} s in-process (first call, plots included), "
                  f"{r['report_again_s']:.2f} s again; whole CLI command {r['cli_s']:.1f} s (interpreter and imports "
                  f"included); {r['rows']} rows, {r['paired']} paired comparisons, {r['plots']} plots")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
