"""Benchmark of the token mixers against causal softmax attention (SDPA): time and memory against T, state bytes.

    .venv/bin/python experiments/bench_mixers.py            # T = 512 ... 8192 (about 5-10 min on the 2-core box)
    .venv/bin/python experiments/bench_mixers.py --quick    # T = 512, 1024, 2048 (about 1 min)

Why these numbers: a subquadratic student is only worth distilling if its cost grows linearly in T while
attention's grows quadratically. For every mixer and for an attention layer of the same width and heads
(q/k/v/o projections + ``scaled_dot_product_attention(is_causal=True)``), at batch 1, it measures forward time
(no grad) and forward+backward time, per token, and peak memory; growth ratios time(4096)/time(512) (linear is
8, quadratic 64); the fixed recurrent state bytes per sequence against attention's KV cache at each T; and, at the
largest T, which mixers beat SDPA.

Method: each model runs in its own subprocess (clean allocator, clean peak RSS). Timings are the minimum over
``--repeats`` runs after one warm-up, in process CPU time by default (``--clock wall`` for wall clock): with one
torch thread the CPU time is the compute time, while wall time on this shared 2-core box doubled at load 8 as other
jobs took the cores. Peak memory is the growth of the process's peak RSS over its value after building the model and warming up
at T=64, read after each T in increasing order: an upper bound of the fwd+bwd working set at that T, including
allocator slack. Default ONE torch thread: with 2 threads on 2 shared cores OpenMP barriers made timings
meaningless (see bench_mpo.py). The load average is printed: timings under load are inflated.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from opdf_exp.mixers import create_mixer, list_mixers  # noqa: E402

FULL_T = [512, 1024, 2048, 4096, 8192]
QUICK_T = [512, 1024, 2048]
ATTENTION = "sdpa_attention"


class Attention(nn.Module):
    """The teacher-side reference: q/k/v/o projections and causal SDPA, same width and heads as the mixers."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.h, self.d = num_heads, hidden_size // num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.h, self.d).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, d)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, d)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))

    def kv_cache_bytes(self, t: int) -> int:
        return 2 * t * self.h * self.d * 4


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _time(fn, repeats: int, clock: str) -> float:
    now = CLOCKS[clock]
    best = float("inf")
    for _ in range(repeats):
        start = now()
        fn()
        best = min(best, now() - start)
    return best


def worker(name: str, lengths: list[int], hidden: int, heads: int, repeats: int, threads: int, clock: str) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Attention(hidden, heads) if name == ATTENTION else create_mixer(name, hidden, heads)
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd(x):
        with torch.no_grad():
            model(x)

    def fwd_bwd(x):
        x = x.clone().requires_grad_(True)
        model(x).square().mean().backward()
        for p in params:
            p.grad = None

    warm = torch.randn(1, 64, hidden)
    fwd(warm), fwd_bwd(warm)
    base = _maxrss_mib()
    rows = []
    for t in lengths:
        x = torch.randn(1, t, hidden)
        fwd_bwd(x)  # warm-up at this T, and the peak-memory run
        peak = _maxrss_mib() - base
        fwd(x)
        rows.append({"T": t, "fwd_s": _time(lambda: fwd(x), repeats, clock),
                     "fwd_bwd_s": _time(lambda: fwd_bwd(x), repeats, clock),
                     "peak_mib": peak,
                     "state_bytes": (model.kv_cache_bytes(t) if name == ATTENTION else model.state_numel(1) * 4)})
    return {"name": name, "rows": rows, "params": sum(p.numel() for p in params)}


def run_worker(name, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--hidden", str(args.hidden),
           "--heads", str(args.heads), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--clock", args.clock, "--lengths", ",".join(map(str, args.lengths))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=REPO)
    if out.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_us(seconds: float, t: int) -> str:
    return f"{seconds / t * 1e6:.1f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def report(results: list[dict], args, command: str, load: str, elapsed: float) -> str:
    lengths = args.lengths
    lo, hi = lengths[0], (4096 if 4096 in lengths else lengths[-1])
    ideal = hi / lo
    lines = ["# Token mixers vs causal SDPA attention (CPU)", "",
             f"Command: `{command}`", "",
             f"Width {args.hidden}, {args.heads} heads (head_dim {args.hidden // args.heads}), batch 1, float32, "
             f"{args.threads} torch thread(s), {'process CPU' if args.clock == 'cpu' else 'wall-clock'} time, min of "
             f"{args.repeats} runs after a warm-up; "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, load average before: {load}; "
             f"total {elapsed:.0f} s. Peak = growth of peak RSS during fwd+bwd (upper bound, includes allocator "
             f"slack). Linear growth over {lo}->{hi} is {ideal:.0f}x, quadratic {ideal ** 2:.0f}x.", ""]
    # Time per token table.
    head = "| model | " + " | ".join(f"fwd µs/tok T={t}" for t in lengths) + " | " + \
        " | ".join(f"fwd+bwd µs/tok T={t}" for t in lengths) + f" | growth fwd {hi}/{lo} | growth fwd+bwd {hi}/{lo} |"
    lines += ["## Time per token and growth", "", head, "|" + "---|" * (1 + 2 * len(lengths) + 2)]
    by_t = {}
    for r in results:
        rows = {row["T"]: row for row in r["rows"]}
        by_t[r["name"]] = rows
        g_f = rows[hi]["fwd_s"] / rows[lo]["fwd_s"]
        g_b = rows[hi]["fwd_bwd_s"] / rows[lo]["fwd_bwd_s"]
        lines.append(f"| {r['name']} | " + " | ".join(_fmt_us(rows[t]["fwd_s"], t) for t in lengths) + " | " +
                     " | ".join(_fmt_us(rows[t]["fwd_bwd_s"], t) for t in lengths) + f" | {g_f:.1f} | {g_b:.1f} |")
    lines += ["", "## Peak memory (fwd+bwd, MiB) and state bytes per sequence", "",
              "| model | " + " | ".join(f"peak T={t}" for t in lengths) + " | " +
              " | ".join(f"state T={t}" for t in lengths) + " |", "|" + "---|" * (1 + 2 * len(lengths))]
    for r in results:
        rows = by_t[r["name"]]
        lines.append(f"| {r['name']} | " + " | ".join(f"{rows[t]['peak_mib']:.0f}" for t in lengths) + " | " +
                     " | ".join(_bytes(rows[t]["state_bytes"]) for t in lengths) + " |")
    top = lengths[-1]
    att = by_t[ATTENTION][top]
    lines += ["", f"## At T={top}: mixer time / SDPA attention time (< 1 means the mixer is faster)", "",
              "| model | fwd ratio | fwd+bwd ratio | faster than SDPA (fwd+bwd) |", "|---|---|---|---|"]
    for r in results:
        if r["name"] == ATTENTION:
            continue
        row = by_t[r["name"]][top]
        rf, rb = row["fwd_s"] / att["fwd_s"], row["fwd_bwd_s"] / att["fwd_bwd_s"]
        lines.append(f"| {r['name']} | {rf:.2f} | {rb:.2f} | {'yes' if rb < 1 else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 512, 1024, 2048 only")
    parser.add_argument("--lengths", default=None, help="comma-separated T values (overrides --quick)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: process CPU time (robust to other jobs on shared cores; default); wall: wall clock")
    parser.add_argument("--mixers", default=None, help="comma-separated subset of list_mixers()")
    parser.add_argument("--out", default=str(REPO / "experiments/results/bench_mixers.md"))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.lengths = ([int(t) for t in args.lengths.split(",")] if args.lengths else (QUICK_T if args.quick else FULL_T))
    if args.worker:
        print(json.dumps(worker(args.worker, args.lengths, args.hidden, args.heads, args.repeats, args.threads,
                                args.clock)))
        return
    command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO) if sys.executable.startswith(
        str(REPO)) else sys.executable, os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])])
    print(f"command: {command}", flush=True)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average: {load}", flush=True)
    names = args.mixers.split(",") if args.mixers else list_mixers()
    start = time.perf_counter()
    results = []
    for name in [*names, ATTENTION]:
        t0 = time.perf_counter()
        results.append(run_worker(name, args))
        last = results[-1]["rows"][-1]
        print(f"{name:18s} done in {time.perf_counter() - t0:6.1f} s; T={last['T']}: fwd {last['fwd_s']:.3f} s, "
              f"fwd+bwd {last['fwd_bwd_s']:.3f} s", flush=True)
    text = report(results, args, command, load, time.perf_counter() - start)
    print(text)
    from opdf_exp.utils.io import atomic_write_text
    atomic_write_text(args.out, text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
