"""Peak memory and time of the stage-3 LM loss on the packaged SmolLM2-135M, whole logits vs chunked, side by side.

Issue 19's goal: at 4 x 512 tokens, the chunked vocabulary loss's peak memory <= 1/4 of the whole-logits loss's,
and the stage-3 step no slower. Two measurements, each variant in its own fresh process (so each process's peak
resident memory belongs to that variant alone), run one after another in this one invocation:

1. **the loss alone**: random final hidden states of the real shapes (B x T x 576) through the real SmolLM2 LM
   head (its tied 49,152 x 576 embedding), CE + forward KL against a teacher head, then the backward. Reported:
   peak resident memory above the process's memory just before the loss, and the median time over the repeats.
2. **the whole stage-3 step**: the packaged SmolLM2-135M teacher and its GLA student (QKV copied), forward +
   backward + AdamW on one 4 x 512 batch of real BBC text, median over the repeats. Reported: the step time and
   the process's peak above its memory after loading both models.

    .venv/bin/python experiments/bench_lm_loss.py [--batch 4] [--length 512] [--chunk 256] [--repeats 3]

Writes experiments/results/bench_lm_loss.md (atomically) with the command, versions and load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, header, peak_mib, rss_mib, run_worker, smollm2_teacher, worker_or_none, write_report  # noqa: E402


def _load_models(arch: str):
    import torch

    from opdf_exp.subquadratic.convert import convert

    teacher, tokenizer = smollm2_teacher()
    torch.manual_seed(0)  # the mixers' own parameters start random: the same student in both variants' processes
    return teacher, convert(teacher, arch), tokenizer


def loss_only(args) -> dict:
    """One variant of measurement 1, in this process."""
    import torch

    from opdf_exp.distill.lm_objectives import LMObjective, chunked_lm_loss, lm_loss

    teacher, _, _ = _load_models(args.arch)
    head = teacher.get_output_embeddings()
    weight = head.weight.detach().clone().requires_grad_(True)  # the student's head (a copy of the teacher's)
    t_weight = head.weight.detach()
    del teacher
    torch.manual_seed(0)
    n = args.batch * (args.length - 1)
    hidden = (0.5 * torch.randn(n, weight.shape[1])).requires_grad_(True)
    t_hidden = 0.5 * torch.randn(n, weight.shape[1])
    labels = torch.randint(0, weight.shape[0], (n,))
    weights = torch.ones(n)
    chunk = None if args.variant == "whole" else args.chunk
    objective = LMObjective({"ce": 1.0, "forward_kl": 1.0}, chunk_size=chunk)

    def step():
        hidden.grad, weight.grad = None, None
        if chunk is None:
            total, _ = lm_loss(hidden @ weight.t(), t_hidden @ t_weight.t(), labels, weights, objective)
        else:
            total, _ = chunked_lm_loss(hidden, weight, None, labels, weights, objective,
                                       lambda a, b: t_hidden[a:b] @ t_weight.t())
        total.backward()
        return float(total)

    base = rss_mib()
    times, value = [], None
    for _ in range(args.repeats):
        started = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - started)
    return {"peak_above_mib": peak_mib() - base, "median_s": statistics.median(times), "loss": value}


def full_step(args) -> dict:
    """One variant of measurement 2, in this process."""
    import torch

    from opdf_exp.data.lm import bbc_documents, pack_blocks
    from opdf_exp.lit.subquadratic import EndToEndKDModule

    teacher, student, tokenizer = _load_models(args.arch)
    blocks = pack_blocks(bbc_documents()[:40], tokenizer.encode, tokenizer.eos_token_id, args.length)
    ids = blocks.train[: args.batch]
    mask = torch.ones_like(ids)
    chunk = None if args.variant == "whole" else args.chunk
    module = EndToEndKDModule(student, teacher, chunk_size=chunk)
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5)
    base = rss_mib()
    times = []
    first_loss = None
    for i in range(args.repeats + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total, values = module._objective_losses(ids, mask)
        total.backward()
        optimizer.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - started)
        else:  # before any update: the two variants' losses must agree to round-off
            first_loss = float(total)
    return {"peak_above_mib": peak_mib() - base, "median_s": statistics.median(times), "loss": first_loss,
            "values": {k: float(v) for k, v in values.items()}}


def run_variant(kind: str, variant: str, args) -> dict:
    return run_worker(__file__, ["--worker", kind, "--variant", variant, "--batch", str(args.batch),
                                 "--length", str(args.length), "--chunk", str(args.chunk), "--repeats",
                                 str(args.repeats), "--arch", args.arch, "--threads", str(args.threads)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", default="gla")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-step", action="store_true", help="only the loss-alone measurement")
    parser.add_argument("--worker", choices=("loss", "step"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("whole", "chunked"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_lm_loss.md"))
    args = parser.parse_args()
    if worker_or_none(args, lambda a: loss_only(a) if a.worker == "loss" else full_step(a)):
        return
    started = time.time()
    lines = header("Stage-3 LM loss: whole logits vs chunked (issue 19)", __file__, args.threads,
                   f"SmolLM2-135M (vocabulary 49,152, hidden 576), batch {args.batch} x {args.length} tokens, chunk "
                   f"{args.chunk} tokens, CE + forward KL, {args.repeats} timed repeats per variant, each variant in "
                   "its own process.")
    kinds = ["loss"] + ([] if args.skip_step else ["step"])
    for kind in kinds:
        whole, chunked = run_variant(kind, "whole", args), run_variant(kind, "chunked", args)
        title = ("The loss alone (LM heads + CE + KL + backward)" if kind == "loss" else
                 f"The whole stage-3 step ({args.arch} student, forward + backward + AdamW)")
        loss_column = "loss" if kind == "loss" else "loss at the first step (same student, before any update)"
        lines += [f"## {title}", "", f"| variant | peak memory above start (MiB) | median time (s) | {loss_column} |",
                  "|---|---|---|---|",
                  f"| whole logits (before) | {whole['peak_above_mib']:.0f} | {whole['median_s']:.2f} | "
                  f"{whole['loss']:.6f} |",
                  f"| chunked, {args.chunk} tokens (after) | {chunked['peak_above_mib']:.0f} | "
                  f"{chunked['median_s']:.2f} | {chunked['loss']:.6f} |",
                  f"| after / before | {chunked['peak_above_mib'] / max(whole['peak_above_mib'], 1e-9):.3f} | "
                  f"{chunked['median_s'] / whole['median_s']:.2f} | |", ""]
        print("\n".join(lines[-8:]), flush=True)
    write_report(args.out, lines, started)


if __name__ == "__main__":
    main()
