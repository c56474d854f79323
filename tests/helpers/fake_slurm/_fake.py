#!/usr/bin/env python3
"""Fake SLURM client commands for the launcher tests: they record what they are given and run the submitted
array's tasks on this machine, so a real ``-m hydra/launcher=slurm`` sweep goes through submitit end to end.

One script answers every command by the name it is called under (``sbatch``, ``srun``, ``sacct``, ``squeue``,
``scancel``, ``scontrol``; each is a symlink to this file). State lives in ``$FAKE_SLURM_DIR``:
``calls.log`` (one line per call), ``job_<id>.sh`` (each submitted script), ``state.json`` (task states), and
``requeue_<job>`` markers written by ``scontrol requeue`` that make ``sbatch`` run that task again, as SLURM would
after a pre-emption. Not a scheduler: a detached process runs the array's tasks one after another, each with
all its ranks (``srun`` starts ``SLURM_NTASKS`` processes).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

STATE = Path(os.environ["FAKE_SLURM_DIR"])
MAX_REQUEUES = 3


def _log(name: str, args: list[str]) -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    with open(STATE / "calls.log", "a") as handle:
        handle.write(shlex.join([name, *args]) + "\n")


def _states() -> dict:
    path = STATE / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _set_state(job: str, state: str) -> None:
    states = _states()
    states[job] = state
    tmp = STATE / f".state.{os.getpid()}"
    tmp.write_text(json.dumps(states))
    os.replace(tmp, STATE / "state.json")  # sacct never reads half a file


def _directive(script: str, key: str, default: str | None = None) -> str | None:
    match = re.search(rf"^#SBATCH --{key}=(\S+)$", script, re.M)
    return match.group(1).strip("'") if match else default


def sbatch(args: list[str]) -> int:
    """Record the script, answer with a job id at once (submitit creates the tasks' folders and pickles only
    then), and run the array's tasks in a detached process."""
    script = Path(args[-1]).read_text()
    counter = STATE / "next_id"
    job_id = int(counter.read_text()) if counter.is_file() else 1000
    counter.write_text(str(job_id + 1))
    saved = STATE / f"job_{job_id}.sh"
    saved.write_text(script)
    array = _directive(script, "array")
    indices = range(int(array.split("%")[0].split("-")[0]), int(array.split("%")[0].split("-")[1]) + 1) \
        if array else [None]
    for index in indices:
        _set_state(f"{job_id}_{index}" if index is not None else str(job_id), "PENDING")
    subprocess.Popen([sys.executable, __file__, "--run", str(job_id)], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=open(STATE / f"runner_{job_id}.err", "w"))
    print(f"Submitted batch job {job_id}", flush=True)
    return 0


def _run(job_id: int) -> int:
    """The array's tasks one after another; a task that ``scontrol requeue`` marked runs again."""
    script_path = STATE / f"job_{job_id}.sh"
    script = script_path.read_text()
    array = _directive(script, "array")
    indices = list(range(int(array.split("%")[0].split("-")[0]), int(array.split("%")[0].split("-")[1]) + 1)) \
        if array else [None]
    nodes = int(_directive(script, "nodes", "1"))
    tasks = int(_directive(script, "ntasks-per-node", "1"))
    folder = re.search(r"submitit\.core\._submit (\S+)", script).group(1)
    for index in indices:
        name = f"{job_id}_{index}" if index is not None else str(job_id)
        pickles = Path(folder.replace("%j", name))
        for _ in range(600):  # submitit writes the task's pickle right after sbatch returns
            if list(pickles.glob("*_submitted.pkl")):
                break
            time.sleep(0.05)
        env = {**os.environ, "SLURM_JOB_ID": str(job_id * 100 + (index or 0)), "SLURM_JOB_NAME":
               _directive(script, "job-name", "fake"), "SLURM_NTASKS": str(nodes * tasks),
               "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_NODEID": "0",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": os.getcwd(), "FAKE_SLURM_JOB": name}
        if index is not None:
            env.update(SLURM_ARRAY_JOB_ID=str(job_id), SLURM_ARRAY_TASK_ID=str(index))
        for attempt in range(MAX_REQUEUES + 1):
            env["SLURM_RESTART_COUNT"] = str(attempt)
            _set_state(name, "RUNNING")
            code = subprocess.call(["bash", str(script_path)], env=env)
            marker = STATE / f"requeue_{name}"
            if not marker.exists():
                break
            marker.unlink()
        _set_state(name, "COMPLETED" if code == 0 else "FAILED")
    return 0


def srun(args: list[str]) -> int:
    options, command = {}, list(args)
    while command and command[0].startswith("--"):
        flag = command.pop(0)
        if flag in ("--output", "--error"):
            options[flag] = command.pop(0)
    processes = []
    for rank in range(int(os.environ.get("SLURM_NTASKS", "1"))):
        def expand(pattern: str) -> str:
            return (pattern.replace("%A", os.environ.get("SLURM_ARRAY_JOB_ID", ""))
                    .replace("%a", os.environ.get("SLURM_ARRAY_TASK_ID", ""))
                    .replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", str(rank)))
        out = open(expand(options["--output"]), "a") if "--output" in options else None
        err = open(expand(options["--error"]), "a") if "--error" in options else None
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0"}
        processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=err))
    return max(process.wait() for process in processes)


def sacct(args: list[str]) -> int:
    wanted = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for name, state in _states().items():
        if name.split("_")[0] in wanted:
            print(f"{name}|{state}|localhost")
    return 0


def scontrol(args: list[str]) -> int:
    if args[:1] == ["requeue"]:
        job = os.environ.get("FAKE_SLURM_JOB", args[1])
        (STATE / f"requeue_{job}").write_text("")
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--run"]:
        return _run(int(sys.argv[2]))
    name, args = Path(sys.argv[0]).name, sys.argv[1:]
    _log(name, args)
    command = {"sbatch": sbatch, "srun": srun, "sacct": sacct, "scontrol": scontrol}.get(name)
    return command(args) if command else 0  # squeue, scancel: recorded only


if __name__ == "__main__":
    sys.exit(main())
