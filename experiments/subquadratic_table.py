"""The subquadratic comparison as tables and one plot, read from the ``results.json`` of sweeps or single runs.

``python -m opdf_exp.report`` gives the generic summary (every metric, paired differences); this prints the
issue's columns: one row per run (perplexity and its ratio to the teacher's and, when a ``teacher_control`` run
(the teacher itself through the same stages: student=transformer student.init=qkv_copy) is among the folders, to
that corpus-adapted teacher's, since stage 3's CE on the corpus lowers any model's perplexity there; KL, recall
probes, size, speed, state, the ratio and KL at the last positions of 512-token contexts where
``experiments/context_length.py`` scored the student, stage-1 fidelity, steps and times), then per student the mean over seeds, and paired differences between students
that share seeds (the log-perplexity difference, so a ratio of perplexities, with its spread over seeds), and every
variant (a run with overrides, as the technique grid's) against its student's defaults at the same seed. With
``--curves`` it draws the recovery curves (held-out perplexity against training tokens: after conversion, after
each stage and inside stage 3) of the students named, or of the best three by mean perplexity.

    python experiments/subquadratic_table.py experiments/runs/subquadratic_compare_v2/* \
        [--out experiments/results/subquadratic_compare_v2.md] [--curves path.png] [--curve-students gla retnet]
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = [("perplexity", "perplexity", "{:,.1f}"), ("KL/token", "kl_per_token", "{:.3f}"),
           ("passkey@128", "passkey_acc_128", "{:.2f}"), ("passkey@256", "passkey_acc_256", "{:.2f}"),
           ("passkey@512", "passkey_acc_512", "{:.2f}"), ("MQAR", "mqar_acc", "{:.3f}"), ("params", "params", "{:,.0f}"),
           ("prefill tok/s", "prefill_tokens_per_s", "{:.1f}"), ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
           ("state bytes T=512", "state_bytes_T512", "{:,.0f}"), ("state bytes T=4096", "state_bytes_T4096", "{:,.0f}")]
STAGES = ("attention_transfer", "hidden_alignment", "end_to_end")
# overrides that change where or how fast a job runs, not what it computes (beyond round-off): not in labels
NOT_A_SETTING = ("task.num_threads=", "task.stages.attention_transfer.cache=", "task.stages.reuse=")


def _overrides(result: dict) -> list[str]:
    """Overrides as written by single runs and sweeps alike (a sweep writes booleans as True/False)."""
    return [o.replace("=True", "=true").replace("=False", "=false") for o in result["overrides"]]


def _label(result: dict, common: set[str]) -> str:
    """The student's name plus the overrides this run does not share with every other run shown (not the seed)."""
    if is_teacher_control(result):
        return "teacher control (the teacher through the same stages)"
    student, extra = _student_and_settings(result, common)
    return student + (f" ({', '.join(extra)})" if extra else "")


def _student_and_settings(result: dict, common: set[str]) -> tuple[str, list[str]]:
    """The student's short name and the overrides that set it apart from the other runs shown (not the seed)."""
    student = next((o.split("=", 1)[1] for o in _overrides(result) if o.startswith("student=")), "subquadratic/gla")
    extra = [o for o in _overrides(result) if o not in common and not o.startswith(("student=", "hydra.", "seed="))
             and not o.startswith(NOT_A_SETTING)]
    return student.split("/")[-1], extra


def run_labels(results: list[dict]) -> list[str]:
    """Each run's label among ``results``: its student and the overrides not shared by all of them."""
    common = set.intersection(*(set(_overrides(r)) for r in results)) if results else set()
    return [_label(result, common) for result in results]


def _cells(metrics: dict, prefix: str) -> list[str]:
    cells = []
    for _, key, fmt in COLUMNS:
        value = metrics.get(f"{prefix}/{key}")
        cells.append("–" if value is None else fmt.format(value))
    return cells


def load(folders: list[str]) -> list[dict]:
    paths = sorted((p for folder in folders for p in Path(folder).rglob("results.json")), key=str)
    loaded = [json.loads(path.read_text()) | {"_path": str(path.parent)} for path in paths]
    return [r for r in loaded if r.get("status") == "complete"]


def is_teacher_control(result: dict) -> bool:
    """The teacher itself through the same stages (student=transformer student.init=qkv_copy)."""
    overrides = _overrides(result)
    return "student=transformer" in overrides and "student.init=qkv_copy" in overrides


def control_perplexity(loaded: list[dict]) -> dict[int, float]:
    """Per seed, the perplexity of the teacher trained through the same stages (the corpus-adapted reference)."""
    return {int(r.get("seed", 0)): r["metrics"]["student/perplexity"] for r in loaded if is_teacher_control(r)}


def _control_ratio(result: dict, control: dict[int, float]) -> str:
    if not control:
        return "–"
    reference = control.get(int(result.get("seed", 0)), next(iter(control.values())))
    return f"{result['metrics']['student/perplexity'] / reference:.2f}x"


def long_context(result: dict) -> dict | None:
    """The last position bin of the job's score file from experiments/context_length.py (at its default length),
    or None where the student was not scored there."""
    from context_length import DEFAULT_LENGTH, score_path

    path = score_path(Path(result["_path"]), DEFAULT_LENGTH)
    if not path.is_file():
        return None
    bins = json.loads(path.read_text())["bins"]
    return bins[-1] if bins else None


def _long_context_cells(result: dict) -> list[str]:
    last = long_context(result)
    if last is None:
        return ["–", "–"]
    return [f"{last['perplexity'] / last['teacher_perplexity']:.2f}x", f"{last['kl_per_token']:.3f}"]


def run_rows(loaded: list[dict], common: set[str]) -> list[str]:
    control = control_perplexity(loaded)
    from context_length import DEFAULT_LENGTH

    spans = {f"{b['from']}-{b['to'] - 1}" for r in loaded if (b := long_context(r))}
    span = spans.pop() if len(spans) == 1 else "last bin"
    header = ["model", "seed", "perplexity / teacher's", "perplexity / adapted teacher's", *(c[0] for c in COLUMNS),
              f"ppl / teacher's at {span} of {DEFAULT_LENGTH}", f"KL at {span} of {DEFAULT_LENGTH}",
              "attn-output rel. err after stage 1 (mean over layers)", "steps (1/2/3)", "train s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    teacher = None
    for result in loaded:
        metrics, stages = result["metrics"], result.get("stages", {})
        seconds = sum(float(stages.get(s, {}).get("seconds", 0.0)) for s in STAGES)
        steps = "/".join(str(stages.get(s, {}).get("steps", 0)) for s in STAGES)
        fidelity = [float(v["output_rel_err"]) for v in (result.get("layer_fidelity") or {}).values()
                    if isinstance(v, dict) and v.get("output_rel_err") is not None]
        fid = f"{sum(fidelity) / len(fidelity):.3f}" if fidelity else "–"
        ratio = metrics["student/perplexity"] / metrics["teacher/perplexity"]
        lines.append("| " + " | ".join([_label(result, common), str(result.get("seed", "–")), f"{ratio:.2f}x",
                                         _control_ratio(result, control), *_cells(metrics, "student"),
                                         *_long_context_cells(result), fid, steps, f"{seconds:.0f}",
                                         f"{result.get('wall_time_s', 0):.0f}"]) + " |")
        teacher = teacher or _cells(metrics, "teacher")
    if teacher:
        lines.append("| teacher | – | 1.00x | – | " + " | ".join(teacher) + " | 1.00x | – | – | – | – | – |")
    return lines


def by_student(loaded: list[dict], common: set[str]) -> dict[str, dict[int, dict]]:
    groups: dict[str, dict[int, dict]] = defaultdict(dict)
    for result in loaded:
        groups[_label(result, common)][int(result.get("seed", 0))] = result
    return groups


def seed_rows(groups: dict[str, dict[int, dict]]) -> list[str]:
    """Per student: seeds, mean perplexity ratio to the teacher (and each seed's), mean KL, passkey and MQAR."""
    lines = ["| model | seeds | perplexity / teacher's, mean (per seed) | KL/token, mean | passkey (mean over T) | MQAR |",
             "|---|---|---|---|---|---|"]

    def ratio(r):
        return r["metrics"]["student/perplexity"] / r["metrics"]["teacher/perplexity"]

    for label, runs in sorted(groups.items(), key=lambda kv: statistics.fmean(ratio(r) for r in kv[1].values())):
        ratios = [ratio(r) for _, r in sorted(runs.items())]
        kl = statistics.fmean(r["metrics"]["student/kl_per_token"] for r in runs.values())
        passkey = statistics.fmean(v for r in runs.values() for k, v in r["metrics"].items()
                                   if k.startswith("student/passkey_acc_"))
        mqar = statistics.fmean(r["metrics"].get("student/mqar_acc", float("nan")) for r in runs.values())
        lines.append(f"| {label} | {','.join(map(str, sorted(runs)))} | {statistics.fmean(ratios):.3f} "
                     f"({', '.join(f'{x:.3f}' for x in ratios)}) | {kl:.3f} | {passkey:.2f} | {mqar:.3f} |")
    return lines


def paired_rows(groups: dict[str, dict[int, dict]]) -> list[str]:
    """Students with two or more shared seeds, each against the best of them: exp(mean paired difference of log
    perplexity) = the ratio of their perplexities, with the sd of the paired differences and the seeds."""
    multi = {k: v for k, v in groups.items() if len(v) >= 2}
    if len(multi) < 2:
        return []

    def logppl(r):
        return math.log(r["metrics"]["student/perplexity"])

    ranked = sorted(multi, key=lambda k: statistics.fmean(logppl(r) for r in multi[k].values()))
    best = ranked[0]
    lines = [f"Paired over shared seeds, against **{best}**: perplexity ratio exp(mean Δ log ppl), the sd of the "
             "paired Δ log ppl, and each seed's ratio.", "",
             "| model | seeds | ppl ratio to best | sd of Δ log ppl | per seed |", "|---|---|---|---|---|"]
    for label in ranked[1:]:
        seeds = sorted(set(multi[label]) & set(multi[best]))
        diffs = [logppl(multi[label][s]) - logppl(multi[best][s]) for s in seeds]
        if len(diffs) < 2:
            continue
        lines.append(f"| {label} | {','.join(map(str, seeds))} | {math.exp(statistics.fmean(diffs)):.3f} | "
                     f"{statistics.stdev(diffs):.3f} | {', '.join(f'{math.exp(d):.3f}' for d in diffs)} |")
    return lines


def _stage1_error(result: dict) -> float | None:
    errors = [float(v["output_rel_err"]) for v in (result.get("layer_fidelity") or {}).values()
              if isinstance(v, dict) and v.get("output_rel_err") is not None]
    return sum(errors) / len(errors) if errors else None


def variant_rows(groups: dict[str, dict[int, dict]], common: set[str]) -> list[str]:
    """The technique grid read as controls: every run with settings of its own against the run of the same student
    whose settings are the largest subset of them (its defaults, or e.g. the RoPE-off run for a hybrid that pinned
    RoPE off), at the same seeds (same data order, same teacher targets), so each row isolates what the remaining
    overrides change. The perplexity ratio is exp(mean Δ log ppl) over the shared seeds."""
    settings = {label: _student_and_settings(next(iter(runs.values())), common) for label, runs in groups.items()
                if not label.startswith("teacher control")}
    lines = ["| student | variant | against | seeds | ppl ratio (per seed) | Δ KL/token | stage-1 err base → variant |",
             "|---|---|---|---|---|---|---|"]
    for label, (student, extra) in sorted(settings.items()):
        bases = [b for b, (s, e) in settings.items() if s == student and set(e) < set(extra)]
        if not extra or not bases:
            continue
        base = max(bases, key=lambda b: len(settings[b][1]))
        seeds = sorted(set(groups[label]) & set(groups[base]))
        if not seeds:
            continue
        runs, bases_runs = [groups[label][s] for s in seeds], [groups[base][s] for s in seeds]
        diffs = [math.log(r["metrics"]["student/perplexity"] / b["metrics"]["student/perplexity"])
                 for r, b in zip(runs, bases_runs)]
        kl = statistics.fmean(r["metrics"]["student/kl_per_token"] - b["metrics"]["student/kl_per_token"]
                              for r, b in zip(runs, bases_runs))
        errors = [statistics.fmean(e) if (e := [x for x in map(_stage1_error, group) if x is not None]) else None
                  for group in (bases_runs, runs)]
        error_text = " → ".join("–" if e is None else f"{e:.3f}" for e in errors)
        changed = [o for o in extra if o not in settings[base][1]]
        lines.append(f"| {student} | {', '.join(changed)} | {base} | {','.join(map(str, seeds))} | "
                     f"{math.exp(statistics.fmean(diffs)):.2f}x ({', '.join(f'{math.exp(d):.2f}' for d in diffs)}) "
                     f"| {kl:+.3f} | {error_text} |")
    return lines if len(lines) > 2 else []


def plot_curves(groups: dict[str, dict[int, dict]], names: list[str] | None, path: Path) -> list[str]:
    """Held-out perplexity (log scale) against training tokens, one line per student (its lowest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean_ratio(label):
        return statistics.fmean(r["metrics"]["student/perplexity"] / r["metrics"]["teacher/perplexity"]
                                for r in groups[label].values())

    control = [k for k in groups if k.startswith("teacher control")]
    chosen = names or sorted((k for k in groups if k not in control), key=mean_ratio)[:3] + control
    fig, ax = plt.subplots(figsize=(7, 4.2))
    teacher = None
    for label in chosen:
        matches = [k for k in groups if k == label or k.split(" (")[0] == label]
        if not matches:
            raise SystemExit(f"--curve-students: no run is labelled {label!r}; labels: {sorted(groups)}")
        runs = groups[matches[0]]
        run = runs[min(runs)]
        curve = run.get("recovery_curve") or []
        ax.plot([max(p["tokens"], 1) for p in curve], [p["perplexity"] for p in curve], marker="o", ms=3,
                label=f"{matches[0]} (seed {min(runs)})")
        teacher = teacher or run["metrics"].get("teacher/perplexity")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen (stages 1-3)")
    ax.set_ylabel("held-out perplexity (curve blocks)")
    ax.set_title("Recovery: after conversion, each stage and inside stage 3")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return chosen


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", default=["logs/subq_compare"])
    parser.add_argument("--out", help="also write the tables to this markdown file")
    parser.add_argument("--curves", help="write the recovery curves of the best three (or --curve-students) here")
    parser.add_argument("--curve-students", nargs="*", default=None)
    args = parser.parse_args(argv)
    loaded = load(args.folders)
    if not loaded:
        raise SystemExit(f"no complete results.json under {args.folders}")
    common = set.intersection(*(set(_overrides(r)) for r in loaded))
    groups = by_student(loaded, common)
    lines = ["## Every run", "", *run_rows(loaded, common), "", "## Per student, over seeds", "",
             *seed_rows(groups), ""]
    paired = paired_rows(groups)
    if paired:
        lines += ["## Paired by seed", "", *paired, ""]
    variants = variant_rows(groups, common)
    if variants:
        lines += ["## Each variant against its student's closest run (same seeds)", "", *variants, ""]
    if args.curves:
        chosen = plot_curves(groups, args.curve_students, Path(args.curves))
        lines += [f"Recovery curves of {', '.join(chosen)}: `{args.curves}`.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
