"""LoLCATs' sliding-window softmax branch: banded block matmuls against a per-query gather of its W keys.

    .venv/bin/python experiments/bench_window.py            # stage-1 shape and longer T (about 2 minutes)

Why: with ``student.window=64`` a stage-1 step of the LoLCATs student took about 20 s on one thread, five times a
Gated DeltaNet step, and a profile put 80 % of it in the window branch's ``unfold`` gather (strided copies and
``UnfoldBackward``). The mixer now computes the branch as (W, 2W) score tiles per block of W queries
(``LinearAttention._banded_softmax``). This script keeps the gather as the reference, checks both give the same
numerator, denominator and gradients, and times forward+backward of the branch alone and of whole layers (the
window-free linear attention and GLA beside it) at SmolLM2-135M's width, each variant in its own process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import header, run_worker, timed, worker_or_none, write_report  # noqa: E402

HIDDEN, HEADS = 576, 9  # SmolLM2-135M: 9 query heads of 64
LOLCATS = {"feature_map": "hedgehog", "normalize": True, "output_norm": False}


def gather_reference(mixer, q, keys, values, real):
    """The branch as it was: every query gathers its W keys with ``unfold`` (the oracle the blocks must match)."""
    import torch

    t, w, h = q.shape[1], mixer.window, q.shape[2]
    win_k = keys.unfold(1, w, 1)[:, 1:t + 1]                                             # (B, T, H, K, W)
    win_v = values.unfold(1, w, 1)[:, 1:t + 1]                                           # (B, T, H, V, W)
    win_real = real.unfold(1, w, 1)[:, 1:t + 1]                                          # (B, T, W)
    scores = torch.einsum("bthd,bthdw->bthw", q, win_k) * mixer.key_dim ** -0.5
    scores = scores.masked_fill(win_real[:, :, None, :] == 0, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.sigmoid(mixer.window_factor).view(1, 1, h, 1) * (scores - top).exp()  # (B, T, H, W)
    return torch.einsum("bthw,bthvw->bthv", weights, win_v), weights.sum(-1, keepdim=True)


def branch_inputs(mixer, batch, t, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    w, h, d = mixer.window, mixer.num_heads, mixer.key_dim
    q = torch.randn(batch, t, h, d, generator=g).requires_grad_(True)
    keys = torch.randn(batch, w + t, h, d, generator=g).requires_grad_(True)
    values = torch.randn(batch, w + t, h, d, generator=g).requires_grad_(True)
    real = torch.cat([torch.zeros(batch, w), torch.ones(batch, t)], 1)  # no carried state: the first W slots empty
    real[0, w:w + t // 4] = 0  # a left-padded row
    return q, keys, values, real


def measure(args):
    import torch

    from opdf_exp.mixers import create_mixer

    torch.manual_seed(0)
    if args.worker in ("blocks", "gather"):
        mixer = create_mixer("linear_attention", HIDDEN, HEADS, window=args.window, **LOLCATS)
        q, keys, values, real = branch_inputs(mixer, args.batch, args.t)
        branch = mixer._banded_softmax if args.worker == "blocks" else (
            lambda *a: gather_reference(mixer, *a))

        def step():
            num, den = branch(q, keys, values, real)
            (num.square().mean() + den.mean()).backward()
    else:
        options = {"gla": {}, "linear_attention": LOLCATS,
                   "lolcats": {**LOLCATS, "window": args.window}}[args.worker]
        mixer = create_mixer("gla" if args.worker == "gla" else "linear_attention", HIDDEN, HEADS, **options)
        x = torch.randn(args.batch, args.t, HIDDEN)

        def step():
            mixer(x).square().mean().backward()
    seconds, peak = timed(step, repeats=args.repeats)
    return {"seconds": seconds, "peak_mib": peak}


def agreement(window: int, batch: int, t: int) -> float:
    """Largest difference between blocks and gather over numerator, denominator and the input gradients."""
    import torch

    from opdf_exp.mixers import create_mixer

    mixer = create_mixer("linear_attention", HIDDEN, HEADS, window=window, **LOLCATS).double()
    worst = 0.0
    outs = {}
    for name, branch in (("blocks", mixer._banded_softmax), ("gather", lambda *a: gather_reference(mixer, *a))):
        inputs = [x.double().detach().requires_grad_(x.requires_grad) for x in branch_inputs(mixer, batch, t)]
        num, den = branch(*inputs)
        (num.square().mean() + den.mean()).backward()
        outs[name] = [num, den] + [x.grad for x in inputs[:3]]
    for a, b in zip(outs["blocks"], outs["gather"]):
        worst = max(worst, (a - b).abs().max().item())
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--t", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="experiments/results/bench_window.md")
    args = parser.parse_args(argv)
    if worker_or_none(args, measure):
        return
    started = time.time()
    import opdf_exp  # noqa: F401
    import torch

    torch.set_num_threads(args.threads)
    lines = header("LoLCATs' sliding-window branch: banded blocks against the per-query gather", __file__,
                   args.threads, f"Width {HIDDEN}, {HEADS} heads of 64 (SmolLM2-135M); forward+backward, median of "
                   f"{args.repeats} after one warm-up, each variant in its own process.")
    lines += ["## The branch alone", "",
              "| B x T | W | blocks (ms) | gather (ms) | gather / blocks | blocks peak (MiB) | gather peak (MiB) "
              "| max difference, float64 |", "|---|---|---|---|---|---|---|---|"]
    shapes = [(4, 128, 64), (4, 128, 16), (1, 1024, 64), (1, 4096, 64)]
    for batch, t, window in shapes:
        common = ["--window", str(window), "--batch", str(batch), "--t", str(t), "--repeats", str(args.repeats),
                  "--threads", str(args.threads)]
        got = {name: run_worker(__file__, ["--worker", name, *common]) for name in ("blocks", "gather")}
        diff = agreement(window, 2, min(t, 256))
        lines.append(f"| {batch} x {t} | {window} | {got['blocks']['seconds'] * 1e3:.1f} | "
                     f"{got['gather']['seconds'] * 1e3:.1f} | {got['gather']['seconds'] / got['blocks']['seconds']:.1f}x"
                     f" | {got['blocks']['peak_mib']:.0f} | {got['gather']['peak_mib']:.0f} | {diff:.1e} |")
        print(lines[-1], flush=True)
    lines += ["", "## Whole layers (q/k/v/o, feature maps, the linear branch and the window branch)", "",
              "| B x T | GLA (ms) | linear attention, no window (ms) | LoLCATs W=64 (ms) | LoLCATs / no window |",
              "|---|---|---|---|---|"]
    for batch, t in ((4, 128), (1, 2048)):
        common = ["--window", "64", "--batch", str(batch), "--t", str(t), "--repeats", str(args.repeats),
                  "--threads", str(args.threads)]
        got = {name: run_worker(__file__, ["--worker", name, *common]) for name in ("gla", "linear_attention",
                                                                                     "lolcats")}
        lines.append(f"| {batch} x {t} | {got['gla']['seconds'] * 1e3:.1f} | "
                     f"{got['linear_attention']['seconds'] * 1e3:.1f} | {got['lolcats']['seconds'] * 1e3:.1f} | "
                     f"{got['lolcats']['seconds'] / got['linear_attention']['seconds']:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", "Before this change the LoLCATs layer at 4 x 128 took 439 ms against 50 ms without the window "
              "(8.8x; torch profiler, one thread): the gather column above is that implementation.", ""]
    write_report(args.out, lines, started)


if __name__ == "__main__":
    main()
