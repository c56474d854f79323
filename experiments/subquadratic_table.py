"""The subquadratic comparison as one table (perplexity, KL, recall, parameters, throughput, state size), read from
the ``results.json`` of a sweep or of single runs. ``python -m opdf_exp.report`` gives the generic summary (every
metric, paired differences); this prints the issue's columns, one row per student, the teacher once.

    python experiments/subquadratic_table.py logs/subq_compare [more folders ...]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("perplexity", "perplexity", "{:,.1f}"), ("KL/token", "kl_per_token", "{:.3f}"),
           ("passkey@128", "passkey_acc_128", "{:.2f}"), ("passkey@256", "passkey_acc_256", "{:.2f}"),
           ("MQAR", "mqar_acc", "{:.3f}"), ("params", "params", "{:,.0f}"),
           ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"), ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
           ("state bytes T=512", "state_bytes_T512", "{:,.0f}"), ("state bytes T=4096", "state_bytes_T4096", "{:,.0f}")]
STAGES = ("attention_transfer", "hidden_alignment", "end_to_end")


def _overrides(result: dict) -> list[str]:
    """Overrides as written by single runs and sweeps alike (a sweep writes booleans as True/False)."""
    return [o.replace("=True", "=true").replace("=False", "=false") for o in result["overrides"]]


def _label(result: dict, common: set[str]) -> str:
    """The student's name plus the overrides this run does not share with every other run shown."""
    student = next((o.split("=", 1)[1] for o in _overrides(result) if o.startswith("student=")), "subquadratic/gla")
    extra = [o for o in _overrides(result) if o not in common and not o.startswith(("student=", "hydra."))]
    return student.split("/")[-1] + (f" ({', '.join(extra)})" if extra else "")


def _cells(metrics: dict, prefix: str) -> list[str]:
    cells = []
    for _, key, fmt in COLUMNS:
        value = metrics.get(f"{prefix}/{key}")
        cells.append("–" if value is None else fmt.format(value))
    return cells


def main(folders: list[str]) -> None:
    results = sorted((p for folder in folders for p in Path(folder).rglob("results.json")), key=lambda p: str(p))
    rows, teacher = [], None
    loaded = [json.loads(path.read_text()) for path in results]
    loaded = [r for r in loaded if r.get("status") == "complete"]
    common = set.intersection(*(set(_overrides(r)) for r in loaded)) if loaded else set()
    for result in loaded:
        metrics = result["metrics"]
        stages = result.get("stages", {})
        seconds = sum(float(stages.get(s, {}).get("seconds", 0.0)) for s in STAGES)
        steps = "/".join(str(stages.get(s, {}).get("steps", 0)) for s in STAGES)
        fidelity = [float(v["output_rel_err"]) for v in (result.get("layer_fidelity") or {}).values()
                    if isinstance(v, dict) and v.get("output_rel_err") is not None]
        fid = f"{sum(fidelity) / len(fidelity):.3f}" if fidelity else "–"
        rows.append([_label(result, common), *_cells(metrics, "student"), fid, steps, f"{seconds:.0f}",
                     f"{result.get('wall_time_s', 0):.0f}"])
        teacher = teacher or _cells(metrics, "teacher")
    header = ["model", *(c[0] for c in COLUMNS), "attn-output rel. err after stage 1 (mean over layers)",
              "steps (1/2/3)", "train s", "wall s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if teacher:
        print("| teacher | " + " | ".join(teacher) + " | – | – | – | – |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["logs/subq_compare"])
