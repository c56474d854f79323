"""The nine GLUE tasks in one table: files, columns, labels, problem type, metrics, hub names, row counts.

Why one table: the reader, the hub loader, the yaml files, the label mapping stored in every model and the
metric set must all agree, and the traps of GLUE are per-task details (CoLA has no header, MRPC starts with a
byte-order mark, MNLI's label order differs between the old ``transformers`` processors and the hub). Writing each
fact once, here, and testing the yaml against it keeps them from drifting apart. This module holds metadata and
the checks that use it; it reads no files (see :mod:`opdf_exp.data.sources` for that).

Label order is the hub's (``nyu-mll/glue`` ``ClassLabel`` names), so a model fine-tuned from the hub and one
fine-tuned from the official TSV files get the same ``config.id2label``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from opdf_exp.errors import ConfigError

REGRESSION = "regression"
CLASSIFICATION = "single_label_classification"
HUB_LABEL_COLUMN = "label"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task. Column names refer to the official TSV files; ``hub_text_columns`` to ``nyu-mll/glue``.

    ``headerless_columns`` names the columns of a file that has no header row (CoLA's train and dev), so that
    text and label columns are found by name in every task. ``labels_in_files`` says how the TSV stores the
    label: ``"id"`` (an integer in the hub's order), ``"name"`` (MNLI/QNLI/RTE's ``entailment`` ...) or
    ``"score"`` (STS-B's float).
    """

    name: str                                  # hub config name, and the name used in data=glue/<name>
    folder: str                                # folder of the official download (download_glue_data.py)
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...]               # hub order; empty for regression
    labels_in_files: str                       # "id" | "name" | "score"
    metrics: tuple[str, ...]                   # reported on every test set
    selection_metric: str                      # checkpoint selection on validation (val/<metric>)
    hub_text_columns: tuple[str, ...]
    official_rows: tuple[tuple[str, int], ...]  # (file, rows) of the official download
    train_file: str = "train.tsv"
    dev_file: str = "dev.tsv"
    extra_dev_files: tuple[tuple[str, str], ...] = ()   # (test set name, file): further evaluation sets
    headerless_columns: tuple[str, ...] | None = None
    hub_validation_split: str = "validation"
    hub_extra_splits: tuple[tuple[str, str], ...] = ()  # (test set name, hub split)

    @property
    def problem_type(self) -> str:
        return REGRESSION if not self.label_names else CLASSIFICATION

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == REGRESSION else len(self.label_names)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the local reader needs, in the order they are read."""
        return (self.train_file, self.dev_file, *(file for _, file in self.extra_dev_files))

    @property
    def official_row_counts(self) -> dict[str, int]:
        return dict(self.official_rows)


def _task(**fields: Any) -> GlueTask:
    return GlueTask(**fields)


GLUE_TASKS: dict[str, GlueTask] = {task.name: task for task in (
    _task(name="cola", folder="CoLA", text_columns=("sentence",), label_column="label",
          label_names=("unacceptable", "acceptable"), labels_in_files="id",
          metrics=("mcc",), selection_metric="mcc", hub_text_columns=("sentence",),
          headerless_columns=("source", "label", "original_label", "sentence"),
          official_rows=(("train.tsv", 8551), ("dev.tsv", 1043))),
    _task(name="sst2", folder="SST-2", text_columns=("sentence",), label_column="label",
          label_names=("negative", "positive"), labels_in_files="id",
          metrics=("acc",), selection_metric="acc", hub_text_columns=("sentence",),
          official_rows=(("train.tsv", 67349), ("dev.tsv", 872))),
    _task(name="mrpc", folder="MRPC", text_columns=("#1 String", "#2 String"), label_column="Quality",
          label_names=("not_equivalent", "equivalent"), labels_in_files="id",
          metrics=("f1", "acc"), selection_metric="f1", hub_text_columns=("sentence1", "sentence2"),
          official_rows=(("train.tsv", 3668), ("dev.tsv", 408))),
    _task(name="stsb", folder="STS-B", text_columns=("sentence1", "sentence2"), label_column="score",
          label_names=(), labels_in_files="score",
          metrics=("pearson", "spearman"), selection_metric="pearson", hub_text_columns=("sentence1", "sentence2"),
          official_rows=(("train.tsv", 5749), ("dev.tsv", 1500))),
    _task(name="qqp", folder="QQP", text_columns=("question1", "question2"), label_column="is_duplicate",
          label_names=("not_duplicate", "duplicate"), labels_in_files="id",
          metrics=("f1", "acc"), selection_metric="f1", hub_text_columns=("question1", "question2"),
          official_rows=(("train.tsv", 363846), ("dev.tsv", 40430))),
    _task(name="mnli", folder="MNLI", text_columns=("sentence1", "sentence2"), label_column="gold_label",
          label_names=("entailment", "neutral", "contradiction"), labels_in_files="name",
          metrics=("acc",), selection_metric="acc", hub_text_columns=("premise", "hypothesis"),
          dev_file="dev_matched.tsv", extra_dev_files=(("test_mismatched", "dev_mismatched.tsv"),),
          hub_validation_split="validation_matched", hub_extra_splits=(("test_mismatched", "validation_mismatched"),),
          official_rows=(("train.tsv", 392702), ("dev_matched.tsv", 9815), ("dev_mismatched.tsv", 9832))),
    _task(name="qnli", folder="QNLI", text_columns=("question", "sentence"), label_column="label",
          label_names=("entailment", "not_entailment"), labels_in_files="name",
          metrics=("acc",), selection_metric="acc", hub_text_columns=("question", "sentence"),
          official_rows=(("train.tsv", 104743), ("dev.tsv", 5463))),
    _task(name="rte", folder="RTE", text_columns=("sentence1", "sentence2"), label_column="label",
          label_names=("entailment", "not_entailment"), labels_in_files="name",
          metrics=("acc",), selection_metric="acc", hub_text_columns=("sentence1", "sentence2"),
          official_rows=(("train.tsv", 2490), ("dev.tsv", 277))),
    # WNLI's files store 1 for entailment, as the hub does (names: not_entailment 0, entailment 1).
    _task(name="wnli", folder="WNLI", text_columns=("sentence1", "sentence2"), label_column="label",
          label_names=("not_entailment", "entailment"), labels_in_files="id",
          metrics=("acc",), selection_metric="acc", hub_text_columns=("sentence1", "sentence2"),
          official_rows=(("train.tsv", 635), ("dev.tsv", 71))),
)}

# Accepted spellings: the hub name, the folder name, any case, with or without '-'/'_' (SST-2, sst-2, STS_B ...).
_ALIASES = {re.sub(r"[-_ ]", "", key.lower()): task.name
            for task in GLUE_TASKS.values() for key in (task.name, task.folder)}


def glue_task(name: str) -> GlueTask:
    """The table row of a task, by hub or folder name; an unknown name lists the nine."""
    found = _ALIASES.get(re.sub(r"[-_ ]", "", str(name).lower()))
    if found is None:
        raise ConfigError(f"unknown GLUE task '{name}'; use one of {', '.join(GLUE_TASKS)} (data=glue/<task>)")
    return GLUE_TASKS[found]


# ----------------------------------------------------------------------------------------------- label mapping
def label_mapping(task: str) -> tuple[dict[int, str], dict[str, int]]:
    """``(id2label, label2id)`` to store in a model's config (``config.id2label``) for this task.

    Regression (STS-B) has one output, named ``score``.
    """
    spec = glue_task(task)
    names = spec.label_names or ("score",)
    return dict(enumerate(names)), {name: index for index, name in enumerate(names)}


_GENERIC_LABEL = re.compile(r"label_\d+")


def _normalise(name: Any) -> str:
    return re.sub(r"[-\s]+", "_", str(name).strip().lower())


def _ordered_names(id2label: Mapping) -> list[str]:
    """Label names by id; JSON configs store the ids as strings."""
    try:
        pairs = sorted((int(key), value) for key, value in id2label.items())
    except (TypeError, ValueError):
        raise ConfigError(f"config.id2label={dict(id2label)!r} has non-integer ids; re-save the model with "
                          "integer ids (transformers does this by default)") from None
    return [str(value) for _, value in pairs]


def check_label_mapping(task: str, config: Any, *, allow_generic_names: bool = False) -> None:
    """Refuse a model config whose label order differs from the task's (the MNLI trap; see the module doc).

    ``config`` is a ``transformers`` config (or anything with ``id2label``, or a plain mapping). Names are
    compared by id, ignoring case, spaces and hyphens. Generic names (``LABEL_0`` ...) say nothing about the
    order, so they are refused too unless ``allow_generic_names`` is set (the caller then vouches for the order).
    For a regression task only the number of outputs (one) is checked.
    """
    spec = glue_task(task)
    id2label = config.get("id2label") if isinstance(config, Mapping) else getattr(config, "id2label", None)
    expected = list(spec.label_names)
    if not id2label:
        raise ConfigError(f"the model config has no id2label; GLUE {spec.name} needs {expected} in that order: "
                          "re-save the model with config.id2label set from opdf_exp.data.label_mapping")
    found = _ordered_names(id2label)
    if spec.problem_type == REGRESSION:
        if len(found) != 1:
            raise ConfigError(f"the model has {len(found)} outputs ({found}) but GLUE {spec.name} is a regression "
                              "task with one output; use a checkpoint fine-tuned on it with num_labels=1")
        return
    if [_normalise(n) for n in found] == [_normalise(n) for n in expected]:
        return
    generic = all(_GENERIC_LABEL.fullmatch(_normalise(n)) for n in found)
    if generic and allow_generic_names and len(found) == len(expected):
        return
    why = ("generic names, so the order cannot be verified" if generic and len(found) == len(expected)
           else "a different label order" if sorted(map(_normalise, found)) == sorted(map(_normalise, expected))
           else "different labels")
    raise ConfigError(f"the model's id2label {found} differs from GLUE {spec.name}'s {expected} ({why}); "
                      f"use a checkpoint fine-tuned with the {spec.name} order {expected}, or fine-tune the teacher "
                      "here (teacher.finetune.enabled=true)")


# ----------------------------------------------------------------------------------------------- problem type
def check_problem_type(task_or_problem_type: str, needs_classification: bool, *, term: str = "this loss term") -> None:
    """Refuse a classification-only component (e.g. a loss on class probabilities) on a regression task.

    ``task_or_problem_type`` is a GLUE task name or a problem type (``regression`` /
    ``single_label_classification``); ``term`` names the component in the message.
    """
    if task_or_problem_type in (REGRESSION, CLASSIFICATION, "multi_label_classification"):
        problem_type, what = task_or_problem_type, f"problem_type={task_or_problem_type}"
    else:
        spec = glue_task(task_or_problem_type)
        problem_type, what = spec.problem_type, f"GLUE {spec.name}"
    if needs_classification and problem_type == REGRESSION:
        raise ConfigError(f"{term} needs class probabilities but {what} is a regression task (one output); "
                          f"drop {term} or choose a term that works on a regression output (e.g. an MSE on logits)")


# ----------------------------------------------------------------------------------------------- scores
# The GLUE average leaves WNLI out, as KD papers do (its dev set has 71 examples and models rarely beat the
# majority class); pass exclude=() for the leaderboard's nine-task average.
GLUE_AVERAGE_EXCLUDES = ("wnli",)


def report_sets(task: str) -> tuple[str, ...]:
    """The test sets a task is scored on, by logged name: ``test`` (MNLI: matched) and any extra set."""
    spec = glue_task(task)
    return ("test", *(name for name, _ in spec.extra_dev_files))


def task_score(task: str, metrics: Mapping[str, float], prefix: str = "") -> float:
    """A task's GLUE score from logged metrics (``{prefix}test/acc`` ...): the mean of its metrics on each report
    set, then the mean over the sets (MNLI = mean of matched and mismatched accuracy, as the leaderboard does).
    Correlations and accuracies are fractions here; multiply by 100 for a table."""
    spec = glue_task(task)
    per_set = []
    for name in report_sets(task):
        keys = [f"{prefix}{name}/{metric}" for metric in spec.metrics]
        missing = [key for key in keys if key not in metrics]
        if missing:
            raise ConfigError(f"metrics {missing} are missing for GLUE {spec.name}'s score; log {', '.join(keys)} "
                              f"(data.metrics={list(spec.metrics)})")
        per_set.append(sum(float(metrics[key]) for key in keys) / len(keys))
    return sum(per_set) / len(per_set)


def glue_average(scores: Mapping[str, float], exclude: tuple[str, ...] = GLUE_AVERAGE_EXCLUDES) -> float:
    """Mean of task scores (one per task, MNLI counted once) over the tasks given, less ``exclude``."""
    kept = {glue_task(task).name: float(score) for task, score in scores.items()}
    kept = {task: score for task, score in kept.items() if task not in {glue_task(t).name for t in exclude}}
    if not kept:
        raise ConfigError(f"no task scores left to average (given {sorted(scores)}, excluded {list(exclude)})")
    return sum(kept.values()) / len(kept)


# ----------------------------------------------------------------------------------------- published scores
# GLUE dev scores as the papers print them (x 100, full dev sets), collected in shared/notes/glue.md §4, so that a
# teacher trained here can be read beside the models the KD literature starts from. Each paper prints one number
# per task (CoLA: Matthews correlation; MNLI: matched accuracy; MRPC and QQP: F1 or accuracy as that paper chose;
# STS-B: a correlation), which is not always the mean of metrics that ``task_score`` computes: read them as
# orientation, not as paired baselines.
PUBLISHED_DEV_SCORES: dict[str, dict[str, float]] = {
    "BERT-base (12 layers)": {"cola": 56.3, "mnli": 84.7, "mrpc": 88.6, "qnli": 91.8, "qqp": 89.6, "rte": 69.3,
                              "sst2": 92.7, "stsb": 89.0},
    "DistilBERT (6 layers)": {"cola": 51.3, "mnli": 82.1, "mrpc": 87.5, "qnli": 89.2, "qqp": 88.5, "rte": 59.9,
                              "sst2": 91.3, "stsb": 86.9},
    "MiniLM-L6-H384 (6 layers)": {"cola": 47.5, "mnli": 83.3, "mrpc": 88.9, "qnli": 90.5, "qqp": 90.6, "rte": 68.8,
                                  "sst2": 91.5},
}
