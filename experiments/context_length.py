"""Held-out perplexity and KL by position, on contexts longer than the 128-token training blocks, for the saved
students of a comparison.

    .venv/bin/python experiments/context_length.py experiments/runs/subquadratic_compare_v2/*
    .venv/bin/python experiments/context_length.py <run folders> --length 512 --edges 1,64,128,256,512 --blocks 16

Why: every student of `experiments/results/subquadratic_compare_v2.md` is trained and scored on 128-token blocks.
A student that keeps only recent context (LoLCATs' 64-token softmax window, a fast-decaying state) can match its
teacher there and fall behind where the context is longer; the rows for positions past 128 show whether it
does. Each run folder's saved student (``<job>/student``, written by the subquadratic task) and the packaged
SmolLM2-135M teacher score the same held-out BBC stream (the task's document split, ``data.split_seed``,
``data.max_train_tokens``), packed into ``--length``-token blocks instead of 128. One thread by default.

Each job's bins are kept in ``<job>/context_length_<length>.json``, keyed on the student's bytes, the run that
trained it (its metrics), the data and the bins, so a rerun over a grown comparison scores only the new students,
and a clone without the students (they are not committed) still tabulates the committed scores;
``subquadratic_table.py`` shows the ratio and KL of the last bin beside the 128-token numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import REPO, header, smollm2_teacher, write_report  # noqa: E402
from subquadratic_table import run_labels  # noqa: E402  (the comparison table's run labels)


DEFAULT_LENGTH = 512  # tokens per held-out context: 4x the comparison's training blocks


def held_out_blocks(tokenizer, length: int, job: dict):
    """The job's held-out stream (same articles as its 128-token blocks) packed into ``length``-token blocks."""
    from opdf_exp.data import lm

    overrides = dict(o.split("=", 1) for o in job.get("overrides", []) if "=" in o)
    max_tokens = overrides.get("data.max_train_tokens")
    blocks = lm.pack_blocks(lm.bbc_documents(), tokenizer.encode, tokenizer.eos_token_id, length, 0.1,
                            int(overrides.get("data.split_seed", 0)), int(max_tokens) if max_tokens else 200_000)
    return blocks.held_out


def has_student(folder: Path) -> bool:
    return (folder / "student" / "config.json").is_file()


def student_digest(folder: Path) -> str:
    """sha256 of the saved student's files (config and weights): its score file is reused only for these bytes."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((folder / "student").iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
    return digest.hexdigest()[:16]


def result_digest(job: dict) -> str:
    """sha256 of the job's metrics: which training run a score belongs to, when its student is not on this machine
    (students are not committed; the metrics do not change when a relaunch adopts new overrides)."""
    import hashlib

    return hashlib.sha256(json.dumps(job.get("metrics", {}), sort_keys=True).encode()).hexdigest()[:16]


def score_key(folder: Path, job: dict, args) -> dict:
    """What a job's position bins depend on: the student's bytes (``None`` when it is not on this machine), the run
    that trained it, the packed held-out stream and the bins."""
    overrides = dict(o.split("=", 1) for o in job.get("overrides", []) if "=" in o)
    student = student_digest(folder) if has_student(folder) else None
    return {"student": student, "result": result_digest(job), "teacher": "smollm2_135m (packaged GGUF)",
            "length": args.length, "edges": args.edges, "blocks": args.blocks,
            "split_seed": overrides.get("data.split_seed", "0"),
            "max_train_tokens": overrides.get("data.max_train_tokens", "200000")}


def kept_score_applies(kept: dict, key: dict) -> bool:
    """A kept score is this job's when everything it depends on matches; without the student on this machine (a
    fresh clone: students are not committed) the run that trained it stands in for its bytes."""
    if kept == key:
        return True
    return key["student"] is None and {**kept, "student": None} == key


def score_path(folder: Path, length: int) -> Path:
    """Where a job's bins are kept (committed with its results.json; read by subquadratic_table.py)."""
    return folder / f"context_length_{length}.json"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (searched for results.json with a saved student/ or a "
                        "kept score)")
    parser.add_argument("--length", type=int, default=DEFAULT_LENGTH)
    parser.add_argument("--edges", default="1,64,128,256,512", help="position bins (predicted token positions)")
    parser.add_argument("--blocks", type=int, default=16, help="held-out blocks of --length tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="experiments/results/context_length.md")
    parser.add_argument("--rescore", action="store_true", help="score every student again, ignoring kept scores")
    args = parser.parse_args(argv)
    started = time.time()
    import opdf_exp  # noqa: F401  (registers the subquadratic students with transformers)
    import torch
    from transformers import AutoModelForCausalLM

    from opdf_exp.subquadratic.evaluate import perplexity_by_position
    from opdf_exp.utils.io import atomic_write_json

    torch.set_num_threads(args.threads)
    edges = [int(e) for e in args.edges.split(",")]
    jobs = sorted((p.parent for run in args.runs for p in Path(run).rglob("results.json")
                   if (has_student(p.parent) or score_path(p.parent, args.length).is_file())
                   and json.loads(p.read_text()).get("status") == "complete"), key=str)
    if not jobs:
        raise SystemExit(f"no results.json with a saved student/ (or a kept score) under {args.runs}")
    teacher, tokenizer = smollm2_teacher()
    results = [json.loads((folder / "results.json").read_text()) for folder in jobs]
    rows, blocks = [], None
    reused = 0
    for folder, job, name in zip(jobs, results, run_labels(results)):
        name = f"{name}, seed {job.get('seed')}"
        key, path = score_key(folder, job, args), score_path(folder, args.length)
        kept = json.loads(path.read_text()) if path.is_file() and not args.rescore else {}
        if kept.get("key") and kept_score_applies(kept["key"], key):
            bins, reused = kept["bins"], reused + 1
        elif not has_student(folder):
            print(f"{name}: its kept score is for another run or setting and its student is not here; skipped "
                  f"(rerun the job to score it)", flush=True)
            continue
        else:
            if blocks is None:
                blocks = held_out_blocks(tokenizer, args.length, job)[: args.blocks]
            student = AutoModelForCausalLM.from_pretrained(folder / "student", dtype=torch.float32).eval()
            with torch.no_grad():
                bins = perplexity_by_position(student, teacher, blocks, edges)
            atomic_write_json(path, {"key": key, "bins": bins})
            del student
        rows.append((name, str(folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder), bins))
        print(name, [round(b["perplexity"], 1) for b in bins], flush=True)
    if not rows:
        raise SystemExit("no job could be scored: see the lines above")
    teacher_bins = rows[0][2]
    lines = header("Perplexity and KL by position on 512-token held-out contexts", __file__, args.threads,
                   f"{args.blocks} held-out BBC blocks of {args.length} tokens (the comparison's held-out "
                   f"articles); training blocks were 128 tokens. {reused} of {len(rows)} students' scores were "
                   f"kept from their `context_length_{args.length}.json` (same student bytes, data and bins).")
    spans = [f"{b['from']}-{b['to'] - 1}" for b in teacher_bins]
    lines += ["Perplexity of each predicted position range (the teacher's in the first row), then the ratio to the "
              "teacher's at the same positions and KL(teacher || student) per token.", "",
              "| model | " + " | ".join(f"ppl {s}" for s in spans) + " | " + " | ".join(f"/teacher {s}" for s in spans)
              + " | " + " | ".join(f"KL {s}" for s in spans) + " | run |",
              "|---" * (3 * len(spans) + 2) + "|",
              "| teacher | " + " | ".join(f"{b['teacher_perplexity']:.1f}" for b in teacher_bins) + " | "
              + " | ".join("1.00x" for _ in spans) + " | " + " | ".join("–" for _ in spans) + " | – |"]
    for name, folder, bins in rows:
        lines.append(f"| {name} | " + " | ".join(f"{b['perplexity']:.1f}" for b in bins) + " | "
                     + " | ".join(f"{b['perplexity'] / b['teacher_perplexity']:.2f}x" for b in bins) + " | "
                     + " | ".join(f"{b['kl_per_token']:.3f}" for b in bins) + f" | `{folder}` |")
    lines.append("")
    write_report(args.out, lines, started)


if __name__ == "__main__":
    main()
