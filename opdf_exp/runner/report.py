"""Turn finished jobs into tables, paired comparisons and plots: ``python -m opdf_exp.report <dirs> [options]``.

Why one report: every table of this project (the quickstart, GLUE, vision, the subquadratic comparison) comes
from a multirun, and "method A beats B" is a claim about seeds. So the report reads each job's
``results.json`` (recursively, several sweeps at once, any launcher), groups jobs by their overrides minus the
seed (or by ``--by`` keys), and gives per setting and model: mean ± sample std, the number of seeds, a 95%
confidence interval (Student t), and the train / inference parameter counts. When the same seeds ran under two
settings (or two models of one job), it reports the *paired* difference: its mean, its std over seeds and a 95%
interval. Failed and unfinished jobs are listed with their error line, never dropped silently. The end-of-sweep
callback (``conf/hydra/default.yaml``) calls the same code, so there is one aggregation.

Jobs of different experiments (``task_name``) in one directory are reported separately, one section each (the
report says so): their metrics and settings are not comparable.

GLUE jobs (``data=glue/<task>``) also get the OPDF paper's layout: one table per task and a GLUE table, each row a
KD method × decomposition (mean ± std over seeds of the task score, train and inference parameters), and the
paired differences of "+SVD" and "+OPDF" against the same method alone over shared seeds. A task's score and the
GLUE average follow :mod:`opdf_exp.data.glue_tasks` (MNLI = mean of matched and mismatched; WNLI left out).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from opdf_exp.errors import UserError
from opdf_exp.utils.io import atomic_write_json, atomic_write_text
from opdf_exp.utils.tables import markdown_table, write_table

SEED_KEYS = ("seed",)
RESULTS_FILE, ERROR_FILE = "results.json", "error.txt"
BASELINE_VALUES = ("none", "null", "false", "kd", "0")
PREFERRED_METRICS = ("test/acc", "test/mcc", "test/pearson", "test/f1", "val/acc", "floor_r2", "test/ppl")


# ------------------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    folder: Path
    status: str  # complete | failed | unfinished
    experiment: str
    overrides: list[str]
    seed: int | None
    payload: dict = field(default_factory=dict)
    error: str = ""

    def models(self) -> list[tuple[str, dict[str, float], dict]]:
        """``[(model label, metrics without the model's prefix, params)]``: the teacher, then each student
        variant; a task without variants (the geometry studies) has one unnamed model."""
        result = self.payload
        parts = ([("teacher", "teacher", result["teacher"])] if result.get("teacher") else []) + \
            [(v["name"], v.get("label", v["name"]), v) for v in result.get("variants", [])]
        models = []
        for name, label, part in parts:
            prefix = f"{name}/"
            metrics = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in part.get("metrics", {}).items()}
            models.append((label, metrics, part.get("params", {})))
        if not models:
            models.append(("", dict(result.get("metrics", {})), result.get("params", {})))
        return models


def _read_hydra(folder: Path) -> tuple[str | None, list[str], int | None]:
    """Experiment name, overrides and seed of a job that wrote no results (from Hydra's ``.hydra`` folder)."""
    name, overrides, seed = None, [], None
    try:
        import yaml

        overrides_file = folder / ".hydra" / "overrides.yaml"
        if overrides_file.is_file():
            overrides = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
        config_file = folder / ".hydra" / "config.yaml"
        if config_file.is_file():
            config = yaml.safe_load(config_file.read_text()) or {}
            name, seed = config.get("task_name"), config.get("seed")
    except Exception:  # a half-written .hydra folder: report what we have
        pass
    return name, overrides, seed if isinstance(seed, int) else None


def _is_job_folder(path: Path) -> bool:
    return (path / RESULTS_FILE).is_file() or (path / ERROR_FILE).is_file() or (path / ".hydra").is_dir()


def find_jobs(roots: Iterable[str | Path]) -> tuple[list[Job], list[Path]]:
    """Every job folder under ``roots`` (recursively), with its status; and the roots that do not exist."""
    jobs, missing, seen = [], [], set()
    for root in map(Path, roots):
        if not root.is_dir():
            missing.append(root)
            continue
        candidates = [root, *sorted(p for p in root.rglob("*") if p.is_dir() and not p.name.startswith("."))]
        for folder in candidates:
            if folder in seen or not _is_job_folder(folder) or any(part.startswith(".") for part in folder.relative_to(root).parts):
                continue
            seen.add(folder)
            jobs.append(_load_job(folder))
    return jobs, missing


def _load_job(folder: Path) -> Job:
    results = folder / RESULTS_FILE
    if results.is_file():
        try:
            payload = json.loads(results.read_text())
            if payload.get("status", "complete") == "complete" and "metrics" in payload:
                return Job(folder, "complete", str(payload.get("task_name", "")), list(payload.get("overrides", [])),
                           payload.get("seed"), payload)
        except (OSError, ValueError):
            pass
    name, overrides, seed = _read_hydra(folder)
    if (folder / ERROR_FILE).is_file():
        line = (folder / ERROR_FILE).read_text(errors="replace").strip().splitlines()
        return Job(folder, "failed", name or "", overrides, seed, error=line[0] if line else "(empty error.txt)")
    return Job(folder, "unfinished", name or "", overrides, seed, error="no results.json (running or killed)")


# ------------------------------------------------------------------------------------------------ statistics
def t_quantile_975(dof: int) -> float:
    """Student t quantile (scipy.special's inverse CDF: a light import, unlike scipy.stats)."""
    from scipy.special import stdtrit

    return float(stdtrit(dof, 0.975))


def describe(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std, n and the 95% Student-t interval of the mean (``None`` bounds for one value)."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else 0.0
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "ci95": None if half is None else [mean - half, mean + half],
            "values": list(values)}


def _num(value: float, digits: int = 4, integral: bool = False) -> str:
    """Counts (parameters, bytes) as integers with thousands separators, large values with one decimal, the rest
    with ``digits`` decimals (accuracies, losses)."""
    if integral:
        return f"{round(value):,}"
    if abs(value) >= 1000:
        return f"{value:,.1f}"
    return f"{value:.{digits}f}"


def _fmt(stat: dict | None, digits: int = 4) -> str | None:
    if not stat:
        return None
    integral = all(float(v).is_integer() for v in stat.get("values", [stat["mean"]])) and abs(stat["mean"]) >= 1000
    if stat["n"] == 1:
        return _num(stat["mean"], digits, integral)
    return f"{_num(stat['mean'], digits, integral)} ± {_num(stat['std'], digits)}"


def _fmt_ci(stat: dict | None, digits: int = 4) -> str | None:
    if not stat or stat["ci95"] is None:
        return None
    return f"[{stat['ci95'][0]:.{digits}f}, {stat['ci95'][1]:.{digits}f}]"


# ------------------------------------------------------------------------------------------------ grouping
def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _job_config_value(job: Job, key: str) -> str:
    """The value of ``key`` for a job: its override when given, else its saved config's value."""
    for override in job.overrides:
        if _key(override) == key:
            return _value(override)
    config_file = job.folder / ".hydra" / "config.yaml"
    if config_file.is_file():
        try:
            from omegaconf import OmegaConf

            value = OmegaConf.select(OmegaConf.load(config_file), key, default=None, throw_on_resolution_failure=False)
            return "null" if value is None else str(value)
        except Exception:
            pass
    return "?"


def setting_of(job: Job, by: Sequence[str] | None, common: set[str]) -> tuple[tuple[str, str], ...]:
    """The job's setting as ``((key, value), ...)``: the ``by`` keys, or every override except the seed and
    those shared by every job of the experiment."""
    if by:
        return tuple((key, _job_config_value(job, key)) for key in by)
    return tuple((_key(o), _value(o)) for o in job.overrides if o not in common and _key(o) not in SEED_KEYS)


def _setting_text(setting: tuple[tuple[str, str], ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting) or "(all jobs)"


def _metric_names(jobs: list[Job], wanted: Sequence[str] | None) -> list[str]:
    names: dict[str, None] = {}
    for job in jobs:
        for _, metrics, _ in job.models():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "/loss" not in name:
                    names.setdefault(name, None)
    if wanted:
        unknown = [m for m in wanted if m not in names]
        if unknown and len(unknown) == len(wanted):
            raise UserError(f"--metric {', '.join(unknown)} was not logged by any job; logged: "
                            f"{', '.join(sorted(names)[:15])}")
        if unknown:
            print(f"note: --metric {', '.join(unknown)} not logged by any job; left out", file=sys.stderr)
        return [m for m in wanted if m in names]
    return sorted(names)


def primary_metric(names: Sequence[str], wanted: Sequence[str] | None) -> str | None:
    if wanted:
        return next((m for m in wanted if m in names), None)
    return next((m for m in PREFERRED_METRICS if m in names), names[0] if names else None)


# ------------------------------------------------------------------------------------------------ report
@dataclass
class ExperimentReport:
    experiment: str
    metric: str | None
    metrics: list[str]
    common: list[str]
    rows: list[dict]            # table rows (formatted)
    cells: list[dict]           # full numbers per (setting, model)
    paired: list[dict]          # paired differences
    plots: list[str] = field(default_factory=list)


def _experiment_report(experiment: str, jobs: list[Job], by: Sequence[str] | None, wanted: Sequence[str] | None,
                       baselines: dict[str, str], baseline_model: str | None) -> ExperimentReport:
    override_sets = [set(j.overrides) for j in jobs]
    common = set.intersection(*override_sets) if len(override_sets) > 1 else set()
    if by:
        common = set()
    metrics = _metric_names(jobs, wanted)
    metric = primary_metric(metrics, wanted)
    # cells[(setting, model)] = {metric: {seed: value}}
    cells: dict[tuple, dict[str, Any]] = {}
    for job in sorted(jobs, key=lambda j: str(j.folder)):
        setting = setting_of(job, by, common)
        for label, values, params in job.models():
            cell = cells.setdefault((setting, label), {"values": {}, "params": params, "jobs": 0, "seeds": []})
            cell["jobs"] += 1
            cell["seeds"].append(job.seed)
            for name in metrics:
                if isinstance(values.get(name), (int, float)):
                    cell["values"].setdefault(name, {})[job.seed if job.seed is not None else f"job{cell['jobs']}"] = \
                        float(values[name])
    full, rows = [], []
    for (setting, label), cell in cells.items():
        stats = {name: describe(list(per_seed.values())) for name, per_seed in cell["values"].items()}
        full.append({"setting": dict(setting), "setting_text": _setting_text(setting), "model": label,
                     "seeds": cell["seeds"], "stats": stats, "params": cell["params"]})
        row: dict[str, Any] = {"setting": _setting_text(setting), "model": label, "n": len(cell["seeds"])}
        for name in metrics:
            row[name] = _fmt(stats.get(name))
        if metric:
            row[f"{metric} 95% CI"] = _fmt_ci(stats.get(metric))
        train, inference = cell["params"].get("train"), cell["params"].get("inference")
        if isinstance(train, int) and not isinstance(train, bool):  # parameter counts (not a study's settings)
            row["train params"] = train
            row["inference params"] = inference if isinstance(inference, int) else None
        rows.append(row)
    columns = ["setting", "model", "n", *metrics] + ([f"{metric} 95% CI"] if metric else []) + \
        [c for c in ("train params", "inference params") if any(c in r for r in rows)]
    rows = [{c: r.get(c) for c in columns} for r in rows]
    paired = _paired(cells, metrics, metric, baselines, baseline_model)
    return ExperimentReport(experiment, metric, metrics, sorted(common), rows, full, paired)


def _paired_stat(a: dict[Any, float], b: dict[Any, float], min_seeds: int = 2, scale: float = 1.0) -> dict | None:
    """``describe`` of scale x (B − A) over the seeds both ran (their list under ``seeds``, the differences under
    ``values``), or None below ``min_seeds`` shared seeds."""
    seeds = [s for s in a if s in b]
    if len(seeds) < min_seeds:
        return None
    stat = describe([scale * (b[s] - a[s]) for s in seeds])
    stat["seeds"] = seeds
    return stat


def _paired(cells: dict, metrics: list[str], metric: str | None, baselines: dict[str, str],
            baseline_model: str | None) -> list[dict]:
    """Paired differences of the primary metric over shared seeds: (1) each model against the baseline model
    of the same setting (variants of one job share its seed); (2) settings that differ in exactly one key,
    against the baseline value of that key (``--baseline key=value``; else none/null/false/kd/0, else the first
    value seen), per model."""
    if not metric:
        return []
    out = []
    settings = list(dict.fromkeys(s for s, _ in cells))
    models = list(dict.fromkeys(m for _, m in cells))
    students = [m for m in models if m not in ("teacher", "")]
    base_model = baseline_model if baseline_model in models else \
        next((m for m in students if m.lower() in ("kd", "student")), students[0] if students else None)
    for setting in settings:
        for model in students:
            if model == base_model or (setting, base_model) not in cells or (setting, model) not in cells:
                continue
            stat = _paired_stat(cells[(setting, base_model)]["values"].get(metric, {}),
                                cells[(setting, model)]["values"].get(metric, {}))
            if stat:
                out.append({"setting": _setting_text(setting), "comparison": f"{model} − {base_model}",
                            "metric": metric, **stat})
    for i, a in enumerate(settings):
        for b in settings[i + 1:]:
            da, db = dict(a), dict(b)
            if set(da) != set(db):
                continue
            diff = [k for k in da if da[k] != db[k]]
            if len(diff) != 1:
                continue
            key = diff[0]
            base_value = baselines.get(key)
            if base_value is None:
                values_seen = [dict(s)[key] for s in settings if key in dict(s)]
                base_value = next((v for v in values_seen if v.lower() in BASELINE_VALUES), values_seen[0])
            if db[key] == base_value:
                a, b, da, db = b, a, db, da
            elif da[key] != base_value:
                continue
            rest = _setting_text(tuple((k, v) for k, v in a if k != key))
            for model in models:
                if (a, model) not in cells or (b, model) not in cells:
                    continue
                stat = _paired_stat(cells[(a, model)]["values"].get(metric, {}),
                                    cells[(b, model)]["values"].get(metric, {}))
                if stat:
                    label = f"{model}: " if model else ""
                    out.append({"setting": rest, "comparison": f"{label}{key}={db[key]} − {key}={da[key]}",
                                "metric": metric, **stat})
    return out


def _paired_rows(paired: list[dict]) -> list[dict]:
    return [{"setting": p["setting"], "comparison": p["comparison"], "metric": p["metric"], "n seeds": p["n"],
             "mean diff": f"{p['mean']:+.4f}", "std": f"{p['std']:.4f}", "95% CI": _fmt_ci(p),
             "B > A in": f"{sum(v > 0 for v in p['values'])}/{p['n']}"} for p in paired]


# ------------------------------------------------------------------------------------------------ GLUE
DECOMPOSITION_LABELS = {"none": "alone", "svd": "+SVD", "mpo": "+OPDF"}


def _glue_task_of(job: Job) -> str | None:
    """The GLUE task of a job (``data=glue/<task>``, else its saved config's data group), or None."""
    from opdf_exp.data.glue_tasks import GLUE_TASKS

    for override in job.overrides:
        if _key(override) == "data":
            value = _value(override)
            return value.split("/", 1)[1] if value.startswith("glue/") and value.split("/", 1)[1] in GLUE_TASKS else None
    if _job_config_value(job, "data.module.source._target_").endswith("data.glue"):
        name = _job_config_value(job, "data.name")
        return name if name in GLUE_TASKS else None
    return None


def _glue_entries(job: Job, task: str) -> list[tuple[str, str, str, float, dict, dict]]:
    """``[(method, decomposition, variant label, task score, metrics, params)]`` of a job's teacher and
    students."""
    from opdf_exp.data.glue_tasks import task_score
    from opdf_exp.errors import ConfigError

    result = job.payload
    parts = ([("teacher", "-", "teacher", "teacher/", result["teacher"])] if result.get("teacher") else [])
    for variant in result.get("variants", []):
        method = variant.get("method") or _job_config_value(job, "distill.name")
        decomposition = variant.get("decomposition") or _job_config_value(job, "decomposition.kind")
        prefix = f"{variant['name']}/"
        parts.append((method, decomposition, str(variant.get("label") or variant["name"]), prefix, variant))
    entries = []
    for method, decomposition, label, prefix, part in parts:
        metrics = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in part.get("metrics", {}).items()}
        try:
            score = task_score(task, metrics)
        except ConfigError:  # a job that did not log the task's metrics (an old or partial result)
            continue
        entries.append((method, decomposition, label, score, metrics, part.get("params", {})))
    return entries


ONE_CLASS_SHARE = 0.99  # a classifier (student or teacher) whose predictions are this much one class has collapsed
ONE_CLASS_COLUMN = "one-class seeds"


def glue_tables(jobs: list[Job]) -> dict | None:
    """Per-task and GLUE-average tables over GLUE jobs; None when no job is a GLUE job."""
    from opdf_exp.data.glue_tasks import GLUE_AVERAGE_EXCLUDES, glue_task

    # scores[(method, decomposition, label)][task][seed] = score; one value per seed (a shared teacher counts
    # once). The variant's label tells apart rows of one method and decomposition (the GLUE study's OPDF rows:
    # same nominal rate, lr_scale=auto, the public setting, an alignment that acts).
    scores: dict[tuple[str, str, str], dict[str, dict[Any, float]]] = {}
    metric_values: dict[tuple[str, ...], dict[str, dict[Any, float]]] = {}
    majority: dict[tuple[str, ...], dict[Any, float]] = {}  # test/majority_share per seed, where logged
    params: dict[tuple[str, ...], dict] = {}
    teacher_warnings: dict[str, list[str]] = {}  # per task, as the jobs logged them (runner.distill_task)
    for job in sorted(jobs, key=lambda j: str(j.folder)):
        task = _glue_task_of(job)
        if task is None:
            continue
        for warning in (job.payload.get("teacher") or {}).get("warnings") or []:
            if warning not in teacher_warnings.setdefault(task, []):
                teacher_warnings[task].append(warning)
        seed = job.seed if job.seed is not None else str(job.folder)
        for method, decomposition, variant_label, score, metrics, part_params in _glue_entries(job, task):
            row = (method, decomposition, variant_label)
            scores.setdefault(row, {}).setdefault(task, {}).setdefault(seed, score)
            per_metric = metric_values.setdefault((*row, task), {})
            for name in glue_task(task).metrics:
                per_metric.setdefault(name, {}).setdefault(seed, float(metrics[f"test/{name}"]))
            if "test/majority_share" in metrics:
                majority.setdefault((*row, task), {}).setdefault(seed, float(metrics["test/majority_share"]))
            params.setdefault((*row, task), part_params)
    if not scores:
        return None
    controls = nearest_controls(_variant_overrides([j for j in jobs if _glue_task_of(j) is not None][:1]))
    tasks = sorted({task for per_task in scores.values() for task in per_task})
    order = sorted(scores, key=lambda r: (r[0] != "teacher", r[0], list(DECOMPOSITION_LABELS).index(r[1])
                                          if r[1] in DECOMPOSITION_LABELS else -1))

    shared = {r[:2] for r in scores if sum(o[:2] == r[:2] for o in scores) > 1}

    def label(row: tuple[str, str, str]) -> str:
        if row[0] == "teacher":
            return row[0]
        if row[:2] in shared:  # several variants of one method and decomposition: their own labels
            return row[2]
        return f"{row[0]} {DECOMPOSITION_LABELS.get(row[1], row[1])}"

    def pct(values: dict[Any, float]) -> dict:
        return describe([100.0 * v for v in values.values()])

    per_task = {}
    for task in tasks:
        rows = []
        logged_majority = any((*row, task) in majority for row in order)
        for row in order:
            if task not in scores[row]:
                continue
            out = {"model": label(row), "n": len(scores[row][task]), "score": _fmt(pct(scores[row][task]), 2)}
            for name, values in metric_values[(*row, task)].items():
                out[f"test {name}"] = _fmt(pct(values), 2)
            if logged_majority:  # seeds whose test predictions are >= 99 % one class, of the seeds that logged it
                shares = majority.get((*row, task), {})
                out[ONE_CLASS_COLUMN] = (f"{sum(s >= ONE_CLASS_SHARE for s in shares.values())}/{len(shares)}"
                                         if shares else None)
            out["train params"] = params[(*row, task)].get("train")
            out["inference params"] = params[(*row, task)].get("inference")
            rows.append(out)
        per_task[task] = {"rows": rows, "paired": _glue_paired({r: v[task] for r, v in scores.items() if task in v},
                                                               label, controls),
                          "teacher_warnings": teacher_warnings.get(task, [])}
    averaged = [t for t in tasks if t not in GLUE_AVERAGE_EXCLUDES]
    averages = _per_seed_averages(scores, order, averaged)
    average_rows = []
    for row in order:
        out: dict[str, Any] = {"model": label(row)}
        for task in tasks:
            out[task] = _fmt(pct(scores[row][task]), 2) if task in scores[row] else None
        out["GLUE avg"] = _fmt(pct(averages[row]), 2) if averages[row] else None
        out["n seeds"] = len(averages[row])
        average_rows.append(out)
    teacher_row = next((row for row in order if row[0] == "teacher"), None)
    published = published_rows(tasks, {t: pct(scores[teacher_row][t]) for t in tasks if t in scores[teacher_row]}
                               if teacher_row else {})
    return {"tasks": per_task, "published": published,
            "average": {"rows": average_rows, "paired": _glue_paired(averages, label, controls),
                                           "tasks_averaged": averaged}}


def _variant_overrides(jobs: list[Job]) -> dict[str, frozenset[str]]:
    """Each student variant's label -> its override set (``task.variants.<name>.overrides`` of the jobs' saved
    configs)."""
    from omegaconf import OmegaConf

    out: dict[str, frozenset[str]] = {}
    for job in jobs:
        config_file = job.folder / ".hydra" / "config.yaml"
        try:
            variants = OmegaConf.to_container(OmegaConf.load(config_file).task.variants, resolve=False)
        except Exception:  # no saved config, or a task without variants
            continue
        for name, spec in (variants or {}).items():
            if isinstance(spec, dict):
                out.setdefault(str(spec.get("label") or name), frozenset(map(str, spec.get("overrides") or [])))
    return out


def nearest_controls(overrides: dict[str, frozenset[str]]) -> dict[str, str]:
    """Each variant's nearest control: the variant whose overrides are the largest strict subset of its own, so
    the two differ by the fewest settings (KD + OPDF, lr_scale auto -> KD + OPDF: the step size alone). Left out
    where that largest subset is not unique."""
    controls = {}
    for label, own in overrides.items():
        subsets = [(len(other), name) for name, other in overrides.items() if other < own]
        if not subsets:
            continue
        best = max(size for size, _ in subsets)
        names = [name for size, name in subsets if size == best]
        if len(names) == 1:
            controls[label] = names[0]
    return controls


def _paired_row(label_b: str, label_a: str, b: dict[Any, float], a: dict[Any, float]) -> dict | None:
    """B − A in score points over the seeds both ran."""
    stat = _paired_stat(a, b, min_seeds=1, scale=100.0)  # one seed still gives a row (no spread)
    if stat is None:
        return None
    diffs = stat["values"]
    return {"comparison": f"{label_b} − {label_a}", "n seeds": len(diffs), "mean diff": f"{stat['mean']:+.2f}",
            "std": f"{stat['std']:.2f}" if stat.get("std") is not None else None, "95% CI": _fmt_ci(stat, 2),
            "better in": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"}


def _per_seed_averages(scores: dict, order: list, averaged: list[str]) -> dict[tuple[str, str, str], dict[Any, float]]:
    """The GLUE average per row and seed, for rows that ran every averaged task of the sweep with that seed (an
    average over another set of tasks would not be comparable, so such rows get none)."""
    from opdf_exp.data.glue_tasks import glue_average

    averages = {}
    for row in order:
        complete = averaged and all(t in scores[row] for t in averaged)
        seeds = set.intersection(*(set(scores[row][t]) for t in averaged)) if complete else set()
        averages[row] = {seed: glue_average({t: scores[row][t][seed] for t in averaged})
                         for seed in sorted(seeds, key=str)}
    return averages


def published_rows(tasks: list[str], teacher: dict[str, dict]) -> list[dict]:
    """The sweep's teacher (its score per task, x 100: one fine-tune per task, shared by the seeds) beside the published dev scores of the models KD papers
    start from (``data.glue_tasks.PUBLISHED_DEV_SCORES``), on the sweep's tasks; empty when no task has one."""
    from opdf_exp.data.glue_tasks import PUBLISHED_DEV_SCORES

    if not any(task in scores for scores in PUBLISHED_DEV_SCORES.values() for task in tasks):
        return []
    rows = [{"model": "teacher (this sweep, report half)",
             **{task: f"{teacher[task]['mean']:.2f}" if task in teacher else None for task in tasks}}] if teacher else []
    for model, scores in PUBLISHED_DEV_SCORES.items():
        rows.append({"model": f"{model}, published (full dev)",
                     **{task: f"{scores[task]:.1f}" if task in scores else None for task in tasks}})
    return rows


def _glue_paired(values: dict[tuple[str, str, str], dict[Any, float]], label,
                 controls: dict[str, str] | None = None) -> list[dict]:
    """Each +SVD / +OPDF row minus the same method alone (its first dense row), then each variant minus its
    nearest control (``controls``: variant label -> control label, where that is another row), in score points,
    over the seeds both ran; ``label(row)`` names the rows."""
    out = []
    alone_of = {}
    for row, with_decomposition in values.items():
        method, decomposition = row[:2]
        alone_row = next((r for r in values if r[:2] == (method, "none")), None)
        if decomposition in ("none", "-") or alone_row is None:
            continue
        alone_of[row] = alone_row
        paired = _paired_row(label(row), label(alone_row), with_decomposition, values[alone_row])
        if paired:
            out.append(paired)
    by_label = {row[2]: row for row in values}
    for row in values:
        control_row = by_label.get((controls or {}).get(row[2], ""))
        if control_row is None or control_row == alone_of.get(row) or control_row == row:
            continue
        paired = _paired_row(label(row), label(control_row), values[row], values[control_row])
        if paired:
            out.append({**paired, "comparison": paired["comparison"] + " (nearest control)"})
    return out


def _render_glue(glue: dict) -> list[str]:
    parts = []
    for task, table in glue["tasks"].items():
        parts.append(f"### GLUE {task} (test = the reported split; score ×100, mean ± std over seeds)\n")
        parts.append(markdown_table(table["rows"]) + "\n")
        if table.get("teacher_warnings"):  # a teacher that learned nothing: its students' rows distil a constant
            parts.append("\n".join(f"- **Teacher warning:** {w}" for w in table["teacher_warnings"]) + "\n")
        if table["paired"]:
            parts.append(markdown_table(table["paired"]) + "\n")
    if glue.get("published"):
        parts.append("### The teacher beside published GLUE dev scores (orientation only: the papers print one metric "
                     "per task, on the full dev set; data/glue_tasks.py::PUBLISHED_DEV_SCORES)\n")
        parts.append(markdown_table(glue["published"]) + "\n")
    tasks = ", ".join(glue["average"]["tasks_averaged"])
    parts.append(f"### GLUE average (per seed, the mean of the task scores over {tasks}; MNLI = mean of m/mm; WNLI "
                 "excluded; rows that miss a task get none)\n")
    parts.append(markdown_table(glue["average"]["rows"]) + "\n")
    if glue["average"]["paired"]:
        parts.append(markdown_table(glue["average"]["paired"]) + "\n")
    return parts


# ------------------------------------------------------------------------------------------------ plots
def _as_number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def plot_numeric_keys(report: ExperimentReport, out_dir: Path) -> list[str]:
    """One PNG per numeric key that varies (``decomposition.n``, ``max_bond``, widths, layers): the primary
    metric's mean against the key, error bars = std over seeds, one line per model and other setting."""
    if not report.metric:
        return []
    keys: dict[str, set] = {}
    for cell in report.cells:
        for key, value in cell["setting"].items():
            keys.setdefault(key, set()).add(value)
    numeric = [k for k, vals in keys.items() if len(vals) > 1 and sum(_as_number(v) is not None for v in vals) >= 2]
    if not numeric:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key in numeric:
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for cell in report.cells:
            x = _as_number(cell["setting"].get(key))
            stat = cell["stats"].get(report.metric)
            if x is None or not stat:
                continue
            rest = " ".join(f"{k}={v}" for k, v in cell["setting"].items() if k != key)
            name = " | ".join(p for p in (cell["model"], rest) if p) or report.metric
            lines.setdefault(name, []).append((x, stat["mean"], stat["std"]))
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for name, points in sorted(lines.items()):
            points.sort()
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, label=name)
        ax.set_xlabel(key)
        ax.set_ylabel(f"{report.metric} (mean ± std over seeds)")
        ax.set_title(f"{report.experiment}: {report.metric} vs {key}", fontsize=10)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        fig.tight_layout()
        safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)  # noqa: E731
        path = out_dir / f"plot_{safe(report.experiment)}_{safe(report.metric)}_vs_{safe(key)}.png"
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        files.append(str(path))
    return files


# ------------------------------------------------------------------------------------------------ entry
def report(roots: Sequence[str | Path], *, metrics: Sequence[str] | None = None, by: Sequence[str] | None = None,
           out_dir: str | Path | None = None, baselines: dict[str, str] | None = None,
           baseline_model: str | None = None, plots: bool = True, require_results: bool = True) -> dict[str, Any]:
    """Report every job under ``roots``; write ``summary.md``, ``summary.csv``, ``summary.json`` and the plots to
    ``out_dir`` (default: the first root). Returns the summary as a dict."""
    jobs, missing = find_jobs(roots)
    if missing:
        raise UserError(f"report directory {', '.join(map(str, missing))} does not exist")
    out = Path(out_dir or roots[0])
    out.mkdir(parents=True, exist_ok=True)
    complete = [j for j in jobs if j.status == "complete"]
    problems = [j for j in jobs if j.status != "complete"]
    if not complete and require_results:
        failed = sum(j.status == "failed" for j in jobs)
        raise UserError(f"no results.json under {', '.join(map(str, roots))}: found {len(jobs)} job folder(s), "
                        f"{failed} failed (see their error.txt) and {len(jobs) - failed} unfinished; pass a sweep or "
                        "run folder whose jobs finished")
    experiments: dict[str, list[Job]] = {}
    for job in complete:
        experiments.setdefault(job.experiment or "(unnamed)", []).append(job)
    reports = [_experiment_report(name, group, by, metrics, baselines or {}, baseline_model)
               for name, group in experiments.items()]
    if plots:
        for rep in reports:
            rep.plots = plot_numeric_keys(rep, out)
    summary = {
        "roots": [str(r) for r in roots], "jobs": len(jobs), "complete": len(complete),
        "failed": [{"folder": str(j.folder), "error": j.error, "overrides": j.overrides} for j in problems
                   if j.status == "failed"],
        "unfinished": [{"folder": str(j.folder), "overrides": j.overrides} for j in problems
                       if j.status == "unfinished"],
        "experiments": [{"experiment": r.experiment, "metric": r.metric, "common_overrides": r.common,
                         "rows": r.rows, "cells": r.cells, "paired": r.paired, "plots": r.plots,
                         "glue": glue_tables(experiments[r.experiment])} for r in reports],
    }
    markdown = render_markdown(summary)
    if complete:
        csv_rows = [{"experiment": r.experiment, **row} for r in reports for row in r.rows]
        write_table(csv_rows, out / "summary")  # summary.csv (and a flat summary.md, replaced just below)
    atomic_write_text(out / "summary.md", markdown)
    atomic_write_json(out / "summary.json", summary)
    summary["markdown"] = markdown
    return summary


def render_markdown(summary: dict) -> str:
    parts = []
    experiments = summary["experiments"]
    if len(experiments) > 1:
        parts.append(f"Jobs from {len(experiments)} experiments ({', '.join(e['experiment'] for e in experiments)}): "
                     "each is reported in its own section.\n")
    for exp in experiments:
        parts.append(f"## {exp['experiment']}\n")
        if exp["common_overrides"]:
            parts.append(f"Common to all jobs: `{' '.join(exp['common_overrides'])}`\n")
        parts.append(markdown_table(exp["rows"]) + "\n")
        if exp["paired"]:
            parts.append(f"Paired differences of {exp['metric']} over shared seeds (B − A; std over seeds):\n")
            parts.append(markdown_table(_paired_rows(exp["paired"])) + "\n")
        for plot in exp["plots"]:
            parts.append(f"![{Path(plot).stem}]({Path(plot).name})\n")
        if exp.get("glue"):
            parts += _render_glue(exp["glue"])
    problems = [("failed", j["folder"], j["error"]) for j in summary["failed"]] + \
        [("unfinished", j["folder"], "no results.json (running or killed)") for j in summary["unfinished"]]
    if problems:
        parts.append(f"## Jobs without results ({len(problems)})\n")
        parts.append(markdown_table([{"status": s, "job": f, "error": e} for s, f, e in problems]) + "\n")
    parts.append(f"{summary['complete']} of {summary['jobs']} jobs complete.\n")
    return "\n".join(parts)


def log_to_wandb(summary: dict, roots: Sequence[str | Path], project: str = "opdf_exp") -> str:
    """Log the summary tables and plots as their own W&B run (``job_type=report``) in the sweep's group, i.e.
    the group the sweep's jobs used (``<task>-<sweep folder>``). Offline without credentials, as the jobs."""
    import wandb

    from opdf_exp.runner.loggers import resolve_wandb_mode

    root = Path(roots[0]).resolve()
    task = summary["experiments"][0]["experiment"] if summary["experiments"] else "report"
    group = f"{task}-{root.name}" if (root / "multirun.yaml").is_file() else task
    run = wandb.init(project=project, group=group, job_type="report", name=f"report-{root.name}",
                     dir=str(root), mode=resolve_wandb_mode("auto"), reinit="finish_previous")
    try:
        for exp in summary["experiments"]:
            columns = list(exp["rows"][0]) if exp["rows"] else []
            table = wandb.Table(columns=columns, data=[[str(r.get(c)) for c in columns] for r in exp["rows"]])
            payload = {f"{exp['experiment']}/summary": table}
            if exp["paired"]:
                rows = _paired_rows(exp["paired"])
                payload[f"{exp['experiment']}/paired"] = wandb.Table(
                    columns=list(rows[0]), data=[[str(r[c]) for c in rows[0]] for r in rows])
            for plot in exp["plots"]:
                payload[f"{exp['experiment']}/{Path(plot).stem}"] = wandb.Image(plot)
            run.log(payload)
        run.summary.update({"jobs": summary["jobs"], "complete": summary["complete"],
                            "failed": len(summary["failed"]), "unfinished": len(summary["unfinished"])})
        return run.dir
    finally:
        run.finish()


def _parse_baselines(items: Sequence[str] | None) -> dict[str, str]:
    baselines = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--baseline {item!r} must read KEY=VALUE, e.g. --baseline decomposition=none")
        key, value = item.split("=", 1)
        baselines[key.lstrip("+~")] = value
    return baselines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opdf_exp.report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="sweep or run folders (searched recursively for results.json)")
    parser.add_argument("--metric", action="append", help="metric(s) to report; the first is the primary metric "
                        "(CI, paired differences, plots). Default: all logged metrics but losses")
    parser.add_argument("--by", action="append", help="group by these config keys instead of the overrides")
    parser.add_argument("--baseline", action="append", help="KEY=VALUE: the reference side of paired differences")
    parser.add_argument("--baseline-model", help="model label the other models are paired against (default KD)")
    parser.add_argument("--out", help="where to write summary.* and plots (default: the first folder)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--wandb", action="store_true", help="log the tables and plots as a W&B run in the sweep's group")
    args = parser.parse_args(argv)
    try:
        summary = report(args.dirs, metrics=args.metric, by=args.by, out_dir=args.out,
                         baselines=_parse_baselines(args.baseline), baseline_model=args.baseline_model,
                         plots=not args.no_plots)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary["markdown"])
    print(f"written: {Path(args.out or args.dirs[0]) / 'summary.md'} (.csv, .json)")
    if args.wandb:
        print(f"W&B run: {log_to_wandb(summary, args.dirs)}")
    return 0


# ------------------------------------------------------------------------------------------------ Hydra callback
def _hydra_callback_base():
    from hydra.experimental.callback import Callback

    return Callback


class ReportOnMultirunEnd(_hydra_callback_base()):
    """Hydra callback (``conf/hydra/default.yaml``): report the sweep when all its jobs have ended, failed ones
    included, then exit non-zero if any job failed, so scripts notice."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from opdf_exp.utils.distributed import is_global_zero

        if not is_global_zero():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            summary = report([sweep_dir], require_results=False)
        except UserError as error:
            print(f"sweep report: {error}")
            return
        print(f"\nSweep report ({summary['complete']} of {summary['jobs']} jobs complete; {sweep_dir / 'summary.md'})"
              f"\n{summary['markdown']}")
        if summary["failed"]:
            print(f"{len(summary['failed'])} job(s) failed: " +
                  "; ".join(f"{Path(j['folder']).name}: {j['error']}" for j in summary["failed"]), file=sys.stderr)
            raise SystemExit(1)
