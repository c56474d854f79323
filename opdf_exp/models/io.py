"""Save and load any supported classifier family in one call (the runner's teacher cache and student export).

transformers models use ``save_pretrained`` / ``from_pretrained``; timm models the folder format of
:mod:`opdf_exp.models.timm_models`. ``config.json`` says which, so a cached teacher or a saved student reloads
without the caller knowing its family.
"""
from __future__ import annotations

import os

import torch.nn as nn


def save_model(model: nn.Module, folder: str | os.PathLike, tokenizer=None) -> None:
    """Write ``model`` (and a tokenizer, for text models) into an existing ``folder``."""
    from opdf_exp.models.timm_models import is_timm_model, save_timm

    if is_timm_model(model):
        save_timm(model, folder)
    else:
        model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_classifier_folder(folder: str | os.PathLike) -> nn.Module:
    """A classifier saved by :func:`save_model`: timm folders through ``timm.create_model``, others through
    ``AutoModelForSequenceClassification``."""
    from opdf_exp.models.timm_models import is_timm_folder, load_timm

    if is_timm_folder(folder):
        return load_timm(folder)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder)


def store_label_names(model: nn.Module, names: list[str]) -> None:
    """Record the class order with the model, where its family saves it: ``config.id2label`` / ``label2id``
    (transformers) or ``pretrained_cfg['label_names']`` (timm)."""
    if getattr(model, "config", None) is None:
        from opdf_exp.models.timm_models import set_label_names

        set_label_names(model, names)
        return
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}


def stored_label_names(model: nn.Module) -> list[str]:
    """The class order saved with ``model`` (empty when it has none)."""
    if getattr(model, "config", None) is None:
        from opdf_exp.models.timm_models import label_names

        return label_names(model) or []
    return [str(v) for _, v in sorted((int(k), v) for k, v in (model.config.id2label or {}).items())]
