"""timm image classifiers as teachers and students: build (fresh, pretrained or from a local file), derive a student,
save and load in a folder that ``timm.create_model`` rebuilds.

Why a folder format of our own making: a distilled student must deploy as a *plain* timm model. We save the
weights as ``model.safetensors`` (nothing is unpickled when loading) and a ``config.json`` in timm's own hub
layout (``architecture``, ``num_classes``, ``model_args``, ``label_names``, ``pretrained_cfg``), so
``timm.create_model(architecture, num_classes=..., **model_args).load_state_dict(...)`` and
``timm.create_model("local-dir:<folder>", pretrained=True)`` both rebuild it. The construction arguments travel on
the model as ``opdf_create_args`` (a shallower copy of the teacher updates its ``depth``).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError, MissingFileError, OfflineError

log = logging.getLogger(__name__)
WEIGHTS_NAME = "model.safetensors"
FAMILY_KEY = "opdf_exp_family"


def is_timm_model(model: nn.Module) -> bool:
    """A timm model (by its module, or by timm's ``pretrained_cfg`` + ``forward_head`` interface)."""
    return type(model).__module__.startswith("timm.") or hasattr(model, "pretrained_cfg") and hasattr(model, "forward_head")


def _require_pretrained_weights(name: str, override_key: str) -> None:
    """Offline and uncached, pretrained timm weights fail here in one line, before any data is read."""
    import timm

    from opdf_exp.hub import _in_hf_cache, hub_reachable

    cfg = timm.models.get_pretrained_cfg(name) if hasattr(timm.models, "get_pretrained_cfg") else None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id and (_in_hf_cache(hub_id, "model.safetensors") or _in_hf_cache(hub_id, "pytorch_model.bin")):
        return
    if hub_reachable():
        return
    raise OfflineError(f"the hub is unreachable and timm's pretrained weights for '{name}' ({hub_id or 'no hub id'}) "
                       f"are not cached; set {override_key}.checkpoint_path=<model.safetensors or a folder saved by "
                       f"opdf_exp> or {override_key}.pretrained=false")


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (or a folder holding ``model.safetensors``); pickled ``.pth``/``.bin`` files are read
    with ``weights_only=True`` (tensors only, no arbitrary objects)."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / WEIGHTS_NAME
    if not file.is_file():
        raise MissingFileError(f"checkpoint '{file}' does not exist; point checkpoint_path at a .safetensors file or "
                               "a folder saved by opdf_exp")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def create_timm_classifier(name: str, num_classes: int, pretrained: bool = False, checkpoint_path: str | None = None,
                           override_key: str = "teacher.model", problem_type: str | None = None,
                           **model_args: Any) -> nn.Module:
    """``timm.create_model(name, num_classes, **model_args)``; ``pretrained`` loads timm's hub weights (a new head
    when the class count differs), ``checkpoint_path`` a local file. ``model_args`` shrink a model for CPU
    (``img_size``, ``patch_size``, ``depth``, ``embed_dim``, ``num_heads`` for ViT/DeiT; ``embed_dims``,
    ``depths``, ``num_heads`` for TinyViT). An unknown name fails with timm's closest names; an image size the
    patch size does not divide fails before the model is built."""
    import timm

    from opdf_exp.data.images import check_image_size, check_timm_model

    if problem_type == "regression":
        raise ConfigError("timm classifiers are for classification; use a classification image dataset")
    check_timm_model(name)
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_args.items() if v is not None}
    if "img_size" in args:
        patch = args.get("patch_size") or _default_patch_size(name)
        check_image_size(name, int(args["img_size"]), patch)
    if pretrained:
        _require_pretrained_weights(name, override_key)
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), num_classes=int(num_classes), **args)
    except TypeError as error:
        raise ConfigError(f"timm model '{name}' does not take these arguments: {error}; check {override_key}") from None
    if checkpoint_path:
        state = _load_weights_file(checkpoint_path)
        head = [k for k, v in state.items() if k in model.state_dict() and v.shape != model.state_dict()[k].shape]
        for key in head:  # a checkpoint trained for another class count: keep the fresh head, as timm does
            state.pop(key)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k not in head]:
            raise ConfigError(f"checkpoint '{checkpoint_path}' does not fit timm '{name}' with {args}: missing "
                              f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}; give the model_args it was "
                              "trained with")
    model.opdf_create_args = {"architecture": name, "kwargs": dict(args)}
    return model


def _default_patch_size(name: str) -> int | None:
    import re

    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else None


def timm_student(teacher: nn.Module, name: str, pretrained: bool = False, checkpoint_path: str | None = None,
                 num_classes: int | None = None, **model_args: Any) -> nn.Module:
    """A fresh timm student (another architecture or size than the teacher) with the teacher's classes."""
    teacher_classes = int(getattr(teacher, "num_classes", 0) or 0)
    if num_classes is not None and teacher_classes and int(num_classes) != teacher_classes:
        raise ConfigError(f"student.model.num_classes={num_classes} but the teacher has {teacher_classes} classes; a "
                          f"KD student must predict the teacher's classes (set student.model.num_classes="
                          f"{teacher_classes} or null)")
    student = create_timm_classifier(name, num_classes or teacher_classes, pretrained=pretrained,
                                     checkpoint_path=checkpoint_path, override_key="student.model", **model_args)
    labels = getattr(teacher, "pretrained_cfg", {}).get("label_names")
    if labels:
        student.pretrained_cfg = {**student.pretrained_cfg, "label_names": list(labels)}
    return student


def set_label_names(model: nn.Module, names: list[str]) -> None:
    """timm keeps class names in ``pretrained_cfg['label_names']`` (saved in config.json)."""
    model.pretrained_cfg = {**dict(getattr(model, "pretrained_cfg", {}) or {}), "label_names": list(names)}


def label_names(model: nn.Module) -> list[str] | None:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    return list(names) if names else None


def save_timm(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and a timm-layout ``config.json`` into ``folder`` (which must exist)."""
    from safetensors.torch import save_file

    create = getattr(model, "opdf_create_args", None)
    if not create:
        raise ConfigError(f"{type(model).__name__} was not built by opdf_exp.models.create_timm_classifier, so its "
                          "construction arguments are unknown; build timm models through it")
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    keep = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv", "classifier")
    config = {"architecture": create["architecture"], "num_classes": int(model.num_classes),
              "num_features": int(getattr(model, "num_features", 0) or 0), "model_args": create["kwargs"],
              "pretrained_cfg": {k: cfg[k] for k in keep if k in cfg}, FAMILY_KEY: "timm"}
    if cfg.get("label_names"):
        config["label_names"] = list(cfg["label_names"])
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    return folder


def load_timm(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a folder written by :func:`save_timm` with ``timm.create_model`` and a strict ``load_state_dict``."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    model = create_timm_classifier(config["architecture"], int(config["num_classes"]), **config.get("model_args", {}))
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)), strict=True)
    if config.get("label_names"):
        set_label_names(model, config["label_names"])
    return model


def is_timm_folder(folder: str | os.PathLike) -> bool:
    file = Path(folder) / "config.json"
    if not file.is_file():
        return False
    try:
        return json.loads(file.read_text()).get(FAMILY_KEY) == "timm"
    except (OSError, ValueError):
        return False


def check_class_count(teacher: nn.Module, student: nn.Module) -> None:
    """Teacher and student must predict the same classes (logit KD compares them one by one)."""
    def classes(model: nn.Module) -> int | None:
        value = getattr(model, "num_classes", None)
        if value is None and getattr(model, "config", None) is not None:
            value = getattr(model.config, "num_labels", None)
        return int(value) if value is not None else None

    t, s = classes(teacher), classes(student)
    if t is not None and s is not None and t != s:
        raise ConfigError(f"the teacher predicts {t} classes but the student {s}; give both the data's classes "
                          "(num_classes / num_labels = data.num_labels)")



def check_input_size(model: nn.Module, input_size, role: str) -> None:
    """A ViT-style timm model built for one image size refuses others at its first forward; say so before any
    training, naming both sizes and the keys that set them."""
    embed = getattr(model, "patch_embed", None)
    expected = getattr(embed, "img_size", None)
    if embed is None or expected is None or not getattr(embed, "strict_img_size", True) \
            or getattr(embed, "dynamic_img_size", False):
        return
    height, width = int(input_size[-2]), int(input_size[-1])
    if (height, width) != tuple(int(v) for v in expected):
        raise ConfigError(f"the {role} takes {tuple(expected)} images but the data gives ({height}, {width}); set "
                          f"{role}.model.img_size={height} or data.module.input_size=[3,{expected[0]},{expected[1]}]")
