"""Tiny GLUE folders in the official distribution layout, written into a test's tmp_path.

Why hand-written fixtures: the real GLUE download is not on this machine (only SST-2 is, in ../shared), and the
reader's traps are in the layout, not in the size: CoLA's header-less files, MRPC's byte-order mark and
``#1 String`` columns, MNLI's ``dev_matched.tsv`` / ``dev_mismatched.tsv`` and 12/15-column files, QQP's
malformed rows, STS-B's float scores, bare ``"`` characters that only ``csv.QUOTE_NONE`` reads right. Each
fixture records what a correct reader must return (rows kept, their texts and labels, rows to skip), so the data
tests and the GLUE grid test can share them.

Texts carry their class in a word (``good``/``bad`` ..., a rising number for STS-B), so a tiny model can learn a
little in a few steps.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from opdf_exp.data.glue_tasks import GLUE_TASKS, glue_task

BOM = "\ufeff"
CLASS_WORDS = ("good", "bad", "odd")


@dataclass
class GlueFixture:
    """One written task folder and what reading it must give, per file."""

    task: str
    path: Path
    examples: dict[str, list[tuple[str, str | None, int | float]]] = field(default_factory=dict)  # well-formed rows
    malformed: dict[str, int] = field(default_factory=dict)  # rows a reader must skip, per file

    def rows(self, file: str) -> int:
        return len(self.examples[file])


def _sentence(rng: random.Random, index: int, label) -> str:
    word = CLASS_WORDS[label] if isinstance(label, int) else f"level {round(label)}"
    filler = rng.choice(["the film", "a \"quoted\" phrase", "an item's price", "this (one)", "rain, then sun"])
    return f"{filler} is {word} number {index}"


def _label_cell(task: str, label) -> str:
    spec = glue_task(task)
    if spec.labels_in_files == "score":
        return f"{label:.3f}"
    return spec.label_names[label] if spec.labels_in_files == "name" else str(label)


def _row(task: str, file: str, index: int, text_a: str, text_b: str | None, label) -> list[str]:
    """One line's fields in the task's official column order."""
    cell = _label_cell(task, label)
    if task == "cola":  # source, label, original mark (* when unacceptable), sentence
        return ["gj04", cell, "" if label == 1 else "*", text_a]
    if task == "sst2":
        return [text_a, cell]
    if task == "mrpc":
        return [cell, str(1000 + index), str(2000 + index), text_a, text_b]
    if task == "stsb":
        return [str(index), "main-captions", "MSRvid", "2012test", f"{index:04d}", "none", "none", text_a, text_b, cell]
    if task == "qqp":
        return [str(index), str(2 * index + 1), str(2 * index + 2), text_a, text_b, cell]
    if task == "mnli":
        parses = [f"( {text_a} )", f"( {text_b} )", f"(ROOT {text_a})", f"(ROOT {text_b})"]
        annotator_labels = [cell] if file == "train.tsv" else [cell] * 5
        return [str(index), str(100 + index), f"{100 + index}e", "fiction", *parses, text_a, text_b,
                *annotator_labels, cell]
    return [str(index), text_a, text_b, cell]  # qnli, rte, wnli


HEADERS = {
    "sst2": ["sentence", "label"],
    "mrpc": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
    "stsb": ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"],
    "qqp": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
    "qnli": ["index", "question", "sentence", "label"],
    "rte": ["index", "sentence1", "sentence2", "label"],
    "wnli": ["index", "sentence1", "sentence2", "label"],
}
MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]


def _header(task: str, file: str) -> list[str] | None:
    if task == "cola":
        return None
    if task == "mnli":
        return MNLI_HEADER + (["label1"] if file == "train.tsv" else [f"label{k}" for k in range(1, 6)]) + ["gold_label"]
    return HEADERS[task]


def write_glue_fixture(root: Path, task: str, train_rows: int = 24, dev_rows: int = 12, seed: int = 0) -> GlueFixture:
    """Write ``root/<official folder>/`` for ``task``; each file gets the given number of well-formed rows
    (QQP's train and dev files get malformed rows on top)."""
    spec = glue_task(task)
    rng = random.Random(f"{task}-{seed}")
    folder = root / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    fixture = GlueFixture(task=spec.name, path=folder)
    for file in spec.files:
        count = train_rows if file == spec.train_file else dev_rows
        lines, kept = [], []
        header = _header(spec.name, file)
        if header:
            lines.append("\t".join(header))
        for index in range(count):
            label = (round(5.0 * index / max(count - 1, 1), 3) if spec.problem_type == "regression"
                     else index % spec.num_labels)
            text_a = _sentence(rng, index, label)
            text_b = f"and {_sentence(rng, index, label)}" if len(spec.text_columns) > 1 else None
            lines.append("\t".join(_row(spec.name, file, index, text_a, text_b, label)))
            kept.append((text_a, text_b, label))
        malformed = 0
        if spec.name == "qqp":  # a question with a line break: one record split into two short lines
            lines.insert(3, "\t".join(["900", "1801", "1802", "How do I cook"]))
            lines.insert(4, "\t".join(["rice?", "What is rice?", "0"]))
            lines.insert(6, "\t".join(["901", "1803", "1804", "Is this labelled?", "No.", ""]))  # empty label
            malformed = 3
        text = "\n".join(lines) + "\n"
        (folder / file).write_text((BOM + text) if spec.name == "mrpc" else text, encoding="utf-8")
        fixture.examples[file] = kept
        fixture.malformed[file] = malformed
    return fixture


def write_glue_fixtures(root: Path, tasks=tuple(GLUE_TASKS), **sizes) -> dict[str, GlueFixture]:
    """A tiny ``<glue_data>`` folder with every task in ``tasks``."""
    return {task: write_glue_fixture(root, task, **sizes) for task in tasks}
