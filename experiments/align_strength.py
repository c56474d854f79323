"""How strong is OPDF's tensor-alignment term against the task gradient? (issue 8, the λ axis of the SST-2 search)

The alignment is a mean-reduced MSE over tensor entries (as the public code wrote it), so its size depends on how
many entries each tensor has and how far the student has drifted from the teacher's tensors. This trains the
sst2_cpu_repro student (3 blocks from the fine-tuned MiniLM-L6 teacher, n = 5 MPO, KD at T = 4 with CE, AdamW lr
1e-4, batch 16 x <= 64 tokens of the real SST-2) and, at the given steps, prints ||grad align|| / ||grad task||
per aligned tensor at λ = 1: multiply by λ for the ratio a run sees.

    python experiments/align_strength.py --teacher <fine-tuned teacher folder> --sst2 <glue_data>/SST-2
"""
from __future__ import annotations

import argparse
import statistics
import sys

import opdf_exp  # noqa: F401  (torchvision work-around first)
import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a fine-tuned SST-2 teacher folder (save_pretrained)")
    parser.add_argument("--sst2", required=True, help="the SST-2 folder of the official GLUE layout")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 300])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    from opdf_exp.data import glue
    from opdf_exp.models import student_from_teacher
    from opdf_exp.models.io import load_classifier_folder
    from opdf_exp.mpo import TensorAlignmentLoss, apply_decomposition

    print("command: python experiments/align_strength.py " + " ".join(sys.argv[1:]))
    teacher = load_classifier_folder(args.teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    student = student_from_teacher(teacher, num_layers=3)
    apply_decomposition(student, "mpo", n=5, layout="ends")
    align = TensorAlignmentLoss(student, teacher, layer_map="uniform")
    train = glue("sst2", path=args.sst2).train
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    tensors = [p for name, p in student.named_parameters() if "tensors." in name and p.requires_grad]
    print("| step | align (λ = 1) | task loss | ratio median | ratio max | tensors |\n|---|---|---|---|---|---|")
    for step in range(max(args.steps) + 1):
        rows = range(16 * step, 16 * step + 16)
        batch = tokenizer([train.text_a[i] for i in rows], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")
        labels = torch.tensor([train.labels[i] for i in rows])
        logits = student(**batch).logits
        with torch.no_grad():
            target = F.softmax(teacher(**batch).logits / 4.0, dim=-1)
        task = F.cross_entropy(logits, labels) + 16.0 * F.kl_div(F.log_softmax(logits / 4.0, dim=-1), target,
                                                                 reduction="batchmean")
        if step in args.steps:
            grad_task = torch.autograd.grad(task, tensors, retain_graph=True)
            value = align()
            grad_align = torch.autograd.grad(value, tensors, allow_unused=True)
            ratios = [float(a.norm() / t.norm()) for a, t in zip(grad_align, grad_task)
                      if a is not None and float(t.norm()) > 0]
            print(f"| {step} | {float(value.detach()):.2e} | {float(task.detach()):.3f} | {statistics.median(ratios):.1e} | "
                  f"{max(ratios):.1e} | {len(ratios)} |")
        optimizer.zero_grad(set_to_none=True)
        task.backward()
        optimizer.step()


if __name__ == "__main__":
    main()
