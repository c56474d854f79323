"""Wall time and peak memory of a stage-1 and a stage-3 step, before and after issue 16, side by side.

On the packaged SmolLM2-135M teacher and its QKV-copied student (GLA by default), one batch of real BBC blocks,
each variant in its own fresh process (so the process's peak resident memory is that variant's alone):

* **stage 1, before**: the teacher walked layer by layer for the batch (its MLPs included), each mixer trained on
  its layer's attention output (``AttentionTransferModule.layer_losses``), AdamW over the mixers.
* **stage 1, after**: the same losses and update from activations cached once (``AttentionIO``): no teacher
  forward in the step. The cache's one-off cost per block is reported next to it.
* **stage 1 with the matrix target (``target=matrix``), before / after**: cached activations, each mixer's mixing
  matrix against the teacher's attention probabilities. Before: GLA's per-key-dim matrix as one chunk of T, i.e.
  its closed form with a (B, H, T, T, K) decay tensor (how ``ops.matrix`` built it until 2026-12-06); after: the
  chunks of about sqrt(T) that ``ops.matrix.gated_matrix`` uses. Only families with per-key-dim decays (GLA) differ.
* **stage 3, before**: full-parameter end-to-end KD, the teacher's forward at every step (CE + forward KL).
* **stage 3, after**: the sampled teacher targets (K per token, cached once) instead of the teacher's forward,
  and LoRA adapters (r = 8 on q/k/v/o and the MLPs) plus the mixers instead of every parameter.

Reported per variant: median step time over the repeats (the first step is an untimed warm-up) and the process's
peak resident memory above its memory after loading the models. Ratios after / before in the last row.

    .venv/bin/python experiments/bench_subquadratic.py [--arch gla] [--batch 4] [--length 128] [--repeats 3]

Writes experiments/results/bench_subquadratic.md (atomically) with the command, versions and load.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, header, run_worker, smollm2_teacher, timed, worker_or_none, write_report  # noqa: E402

VARIANTS = {"stage1": ("before", "after"), "stage1_matrix": ("before", "after"), "stage3": ("before", "after")}


def _setup(args):
    from opdf_exp.data.lm import bbc_documents, pack_blocks
    from opdf_exp.subquadratic.convert import convert

    teacher, tokenizer = smollm2_teacher()
    blocks = pack_blocks(bbc_documents()[:40], tokenizer.encode, tokenizer.eos_token_id, args.length).train
    import torch

    torch.manual_seed(0)  # the same random init of the mixers' own parameters in every variant's process
    return teacher, convert(teacher, args.arch), blocks[: args.batch]


def stage1(args) -> dict:
    import torch

    from opdf_exp.lit.subquadratic import AttentionTransferModule
    from opdf_exp.mixers.ops import matrix
    from opdf_exp.subquadratic.attention_cache import collect_attention_io

    teacher, student, ids = _setup(args)
    extra, one_off = {}, {}
    matrix_target = args.worker == "stage1_matrix"
    if matrix_target and args.variant == "before":  # one chunk of T: the whole (B, H, T, T, K) decay tensor
        chunked = matrix._per_key_matrix
        matrix._per_key_matrix = lambda qh, kh, cum: chunked(qh, kh, cum, chunk=qh.shape[2])
    if args.variant == "after" or matrix_target:
        started = time.perf_counter()
        io = collect_attention_io(teacher, ids, list(student.mixers()))
        one_off = {"cache_s_per_block": (time.perf_counter() - started) / ids.shape[0],
                   "cache_mib_per_block": io.nbytes() / ids.shape[0] / 2 ** 20}
        extra = {"activations": io}
    module = AttentionTransferModule(student, teacher, target="matrix" if matrix_target else "output", **extra)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    index = torch.arange(ids.shape[0])
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        if "activations" in extra:
            losses.append(float(module.cached_losses(index, io, backward=True)))
        else:
            losses.append(float(module.layer_losses(batch, backward=True)))
        optimizer.step()

    median, peak = timed(step, args.repeats)
    return {"median_s": median, "peak_above_mib": peak, "first_loss": losses[0], **one_off}


def stage3(args) -> dict:
    import torch

    from opdf_exp.distill.sparse_targets import build_sparse_targets
    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.subquadratic.adapters import set_train_mode

    teacher, student, ids = _setup(args)
    extra, one_off = {}, {}
    if args.variant == "after":
        started = time.perf_counter()
        targets = build_sparse_targets(teacher, ids, "sampled", k=args.k)
        one_off = {"cache_s_per_block": (time.perf_counter() - started) / ids.shape[0],
                   "cache_bytes_per_token": targets.nbytes() / targets.entropy.numel()}
        extra = {"teacher_targets": targets}
        counts = set_train_mode(student, "lora", {"r": 8})
    else:
        counts = set_train_mode(student, "all")
    module = EndToEndKDModule(student, teacher, **extra)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if args.variant == "after":
        batch["block_index"] = torch.arange(ids.shape[0])
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        total, _ = module._losses(batch)
        total.backward()
        optimizer.step()
        losses.append(float(total))

    median, peak = timed(step, args.repeats)
    return {"median_s": median, "peak_above_mib": peak, "first_loss": losses[0], "trainable": counts["trainable"],
            **one_off}


def run_variant(kind: str, variant: str, args) -> dict:
    return run_worker(__file__, ["--worker", kind, "--variant", variant, "--batch", str(args.batch), "--length",
                                 str(args.length), "--repeats", str(args.repeats), "--arch", args.arch,
                                 "--threads", str(args.threads), "--k", str(args.k)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gla")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=64, help="sampled teacher tokens per position (stage 3, after)")
    parser.add_argument("--worker", choices=tuple(VARIANTS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("before", "after"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_subquadratic.md"))
    args = parser.parse_args()
    if worker_or_none(args, lambda a: stage3(a) if a.worker == "stage3" else stage1(a)):
        return
    started = time.time()
    lines = header("Subquadratic stage steps before and after issue 16", __file__, args.threads,
                   f"SmolLM2-135M teacher, {args.arch} student (QKV copied), batch {args.batch} x {args.length} BBC "
                   f"tokens, {args.repeats} timed steps after one warm-up, each variant in its own process.")
    titles = {"stage1": ("Stage 1 (attention transfer, every layer, one AdamW step)",
                         "teacher walked every step", "cached teacher activations"),
              "stage1_matrix": ("Stage 1 with the matrix target (cached activations, every layer, one AdamW step)",
                                "(B, H, T, T, K) closed form of the per-key-dim matrix",
                                "the matrix built in chunks (ops.matrix)"),
              "stage3": ("Stage 3 (end-to-end KD: CE + forward KL, one AdamW step)",
                         "all parameters, teacher forward every step",
                         f"LoRA r=8 + mixers, {args.k} sampled teacher tokens per position (cached)")}
    for kind in VARIANTS:
        before, after = run_variant(kind, "before", args), run_variant(kind, "after", args)
        title, label_before, label_after = titles[kind]
        lines += [f"## {title}", "", "| variant | median step (s) | peak memory above start (MiB) | first loss |",
                  "|---|---|---|---|",
                  f"| before: {label_before} | {before['median_s']:.2f} | {before['peak_above_mib']:.0f} | "
                  f"{before['first_loss']:.4f} |",
                  f"| after: {label_after} | {after['median_s']:.2f} | {after['peak_above_mib']:.0f} | "
                  f"{after['first_loss']:.4f} |",
                  f"| after / before | {after['median_s'] / before['median_s']:.2f} | "
                  f"{after['peak_above_mib'] / max(before['peak_above_mib'], 1e-9):.2f} | |", ""]
        if kind == "stage1":
            lines += [f"One-off cost of the cache: {after['cache_s_per_block']:.2f} s and "
                      f"{after['cache_mib_per_block']:.1f} MiB per block (paid once, then reused by every step "
                      "and epoch).", ""]
        elif kind == "stage1_matrix":
            lines += ["The same losses before and after (the first loss agrees to rounding); the matrix of every "
                      "other family is unchanged.", ""]
        else:
            lines += [f"Trainable parameters: {before['trainable']:,} before, {after['trainable']:,} after. "
                      f"One-off cost of the targets: {after['cache_s_per_block']:.2f} s per block and "
                      f"{after['cache_bytes_per_token']:.0f} bytes per token (float16 logits would be "
                      f"{2 * 49152:,}).", ""]
        print("\n".join(lines[-9:]), flush=True)
    write_report(args.out, lines, started)


if __name__ == "__main__":
    main()
