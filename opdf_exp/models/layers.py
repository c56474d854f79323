"""Find a model's stack of repeated blocks and build shallower students from a subset of them.

Why one generic helper: BERT keeps its blocks at ``bert.encoder.layer``, Llama at ``model.layers``, GPT-NeoX at
``gpt_neox.layers``, timm ViTs at ``blocks``. Students initialised from teacher layers (DistilBERT, TinyBERT,
BERT-of-Theseus) and layer-mapped losses need the same lookup, so it lives here once.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.utils.layer_map import uniform_layer_map as shared_uniform_layer_map

# Searched in order; the first attribute path that exists and is a ModuleList (or a Sequential, as timm's ViT
# ``blocks``) wins.
LAYER_STACK_PATHS = (
    "bert.encoder.layer", "roberta.encoder.layer", "electra.encoder.layer", "encoder.layer",
    "distilbert.transformer.layer", "model.layers", "gpt_neox.layers", "transformer.h", "model.decoder.layers",
    "blocks", "layers",
)


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def find_layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(path, ModuleList)`` of the model's repeated blocks."""
    for path in LAYER_STACK_PATHS:
        found = _get(model, path)
        if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) > 0:
            return path, found
    raise ConfigError(f"cannot find the layer stack of {type(model).__name__}; "
                      f"it has none of {', '.join(LAYER_STACK_PATHS)}")


def uniform_layer_map(num_student: int, num_teacher: int) -> list[int]:
    """Teacher layer for each student layer, spread uniformly and ending at the teacher's last layer.

    Student layer ``i`` maps to teacher layer ``round((i + 1) * T / S) - 1``: 6 of 12 gives 1, 3, 5, 7, 9, 11
    (the OPDF code's ``2i + 1``); 3 of 6 gives 1, 3, 5. The rule lives in :mod:`opdf_exp.utils.layer_map`.
    """
    return shared_uniform_layer_map(num_student, num_teacher, error=f"student.num_layers={num_student} must be "
                                    f"between 1 and the teacher's {num_teacher} layers")


def resolve_student_layers(num_teacher: int, num_layers: int | None = None,
                           layers: Sequence[int] | None = None) -> list[int]:
    """Validate an explicit ``layers`` list or spread ``num_layers`` uniformly."""
    if layers is not None:
        layers = [int(i) for i in layers]
        bad = [i for i in layers if not 0 <= i < num_teacher]
        if bad:
            raise ConfigError(f"student.layers={layers} points past the teacher's {num_teacher} layers ({bad}); "
                              f"use indices in 0..{num_teacher - 1}")
        if not layers:
            raise ConfigError("student.layers is empty; give at least one teacher layer index")
        return layers
    if num_layers is None:
        raise ConfigError("set student.num_layers or student.layers")
    return uniform_layer_map(int(num_layers), num_teacher)


def student_from_teacher(teacher: nn.Module, num_layers: int | None = None,
                         layers: Sequence[int] | None = None) -> nn.Module:
    """A deep copy of the teacher keeping only the chosen blocks (embeddings, head and norms are copied too).

    The config's layer count is updated so ``save_pretrained``/``from_pretrained`` round-trip, and attention
    modules' ``layer_idx`` are renumbered so KV caches index correctly.
    """
    path, stack = find_layer_stack(teacher)
    keep = resolve_student_layers(len(stack), num_layers, layers)
    student = copy.deepcopy(teacher)
    parent_path, _, attr = path.rpartition(".")
    parent = _get(student, parent_path) if parent_path else student
    old_stack = getattr(parent, attr)
    kept = [old_stack[i] for i in keep]
    setattr(parent, attr, nn.Sequential(*kept) if isinstance(old_stack, nn.Sequential) else nn.ModuleList(kept))
    for new_index, block in enumerate(getattr(parent, attr)):
        for module in block.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_index
    config = getattr(student, "config", None)
    if config is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, key) and isinstance(getattr(config, key), int):
                setattr(config, key, len(keep))
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in keep]
    _renumber_timm_features(student, path, keep)
    student.distill_teacher_layers = list(keep)  # read by layer-mapped losses; not part of the state dict
    for param in student.parameters():
        param.requires_grad_(True)
    return student


def _renumber_timm_features(model: nn.Module, path: str, keep: Sequence[int]) -> None:
    """A timm model lists its feature modules (``feature_info``) and the arguments that rebuild it; a shallower
    copy must say ``blocks.0..k-1`` and ``depth=k`` so features, export and ``timm.create_model`` agree."""
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info and all(str(e.get("module", "")).startswith(path + ".") for e in info):
        model.feature_info = [dict(info[i], module=f"{path}.{j}") for j, i in enumerate(keep)]
    create_args = getattr(model, "opdf_create_args", None)
    if isinstance(create_args, dict):
        model.opdf_create_args = {**create_args, "kwargs": {**create_args.get("kwargs", {}), "depth": len(keep)}}


def freeze_parameters(model: nn.Module, patterns: Sequence[str] | None) -> int:
    """Stop training every parameter whose name contains one of ``patterns``; returns how many were frozen.

    Why: the word-embedding table is half of a small BERT's parameters and a large share of each AdamW step on
    CPU; freezing it (as BERT-of-Theseus does) keeps short runs short. A pattern that matches nothing is an error.
    """
    frozen = 0
    for pattern in patterns or []:
        hits = [param for name, param in model.named_parameters() if pattern in name]
        if not hits:
            raise ConfigError(f"freeze pattern '{pattern}' matches no parameter of {type(model).__name__}; "
                              "use a substring of a parameter name such as 'embeddings.word_embeddings'")
        for param in hits:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen
