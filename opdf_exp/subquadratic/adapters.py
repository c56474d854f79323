"""What the later stages train: everything, only the token mixers, or the mixers plus LoRA adapters (peft).

Why: after attention transfer the student already sits near the teacher; stages 2 and 3 then mostly have to
re-fit the interplay of the new mixers with the copied MLPs. LoLCATs showed that low-rank adapters on the copied
projections do that at a fraction of the trainable parameters and optimizer memory, and full fine-tuning of a
135M model on a few hundred thousand tokens mostly moves weights that were already right.

Modes (``stages.<stage>.train``):
- ``all``: every parameter trains (the default, the paper's recipe).
- ``mixers``: only the token mixers' parameters; MLPs, norms, embeddings, head and kept attention stay fixed.
- ``lora``: LoRA adapters (peft ``inject_adapter_in_model``, no wrapper class) on ``lora.target_modules`` (module
  name suffixes: the copied ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and the MLPs' ``gate_proj``/``up_proj``/
  ``down_proj`` by default), plus every mixer parameter that is not the base weight of an adapted layer (gates,
  decays, feature maps, norms). After the stage ``merge_adapters`` folds the adapters into the weights, so the
  next stage, the evaluation and the saved student are a plain model of the same architecture.
"""
from __future__ import annotations

import logging

import torch.nn as nn

from opdf_exp.errors import ConfigError

log = logging.getLogger(__name__)

TRAIN_MODES = ("all", "mixers", "lora")
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_TARGETS = (*ATTENTION_PROJECTIONS, "gate_proj", "up_proj", "down_proj")


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def check_lora_targets(model: nn.Module, targets) -> list[str]:
    """The target suffixes that name at least one nn.Linear of ``model``.

    The attention projections (``ATTENTION_PROJECTIONS``) are family-dependent: Mamba2 has ``in_proj``/``out_proj``
    instead, MetaLA no ``k_proj``. The recipe's one target list serves every family, so those names are dropped
    where a family lacks them, with one log line (that family's own projections are mixer parameters, which train
    in full in LoRA mode). Any other unmatched name is a typo or another model's name, and no match at all means
    no adapter: both are errors that list the names there are."""
    names = _linear_names(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    matched = [t for t in targets if any(n == t or n.endswith(f".{t}") for n in names)]
    unmatched = [t for t in targets if t not in matched]
    if not matched or any(t not in ATTENTION_PROJECTIONS for t in unmatched):
        raise ConfigError(f"lora.target_modules {unmatched} match no linear layer of the student; its linear "
                          f"layers are named {', '.join(suffixes)}")
    if unmatched:
        log.info("lora: the student has no %s (its mixers' own projections train in full); adapters on %s",
                 ", ".join(unmatched), ", ".join(matched))
    return matched


def set_train_mode(student: nn.Module, mode: str, lora: dict | None = None) -> dict[str, int]:
    """Prepare ``student`` in place for a stage that trains ``mode`` (module docstring); returns parameter counts
    (``trainable``, ``total``, and ``adapter`` for LoRA)."""
    if mode not in TRAIN_MODES:
        raise ConfigError(f"train={mode!r} is unknown; use one of {list(TRAIN_MODES)}")
    mixers = student.mixers() if hasattr(student, "mixers") else {}
    if mode == "mixers" and not mixers:
        raise ConfigError("train=mixers trains the token mixers, and this student has none (the Transformer "
                          "student); use train=all or train=lora")
    counts = {}
    if mode == "all":
        student.requires_grad_(True)
    elif mode == "mixers":
        student.requires_grad_(False)
        for mixer in mixers.values():
            mixer.requires_grad_(True)
    else:
        options = dict(lora or {})
        targets = check_lora_targets(student, list(options.pop("target_modules", DEFAULT_TARGETS)))
        import opdf_exp  # noqa: F401  (torchvision shim before peft imports transformers' vision parts)
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=int(options.pop("r", 8)), lora_alpha=float(options.pop("alpha", 16)),
                            lora_dropout=float(options.pop("dropout", 0.0)), target_modules=targets, bias="none")
        if options:
            raise ConfigError(f"lora has unknown keys {sorted(options)}; use r, alpha, dropout, target_modules")
        student.requires_grad_(False)
        inject_adapter_in_model(config, student)
        adapted_bases = {id(p) for m in student.modules() if _is_lora(m) for p in m.get_base_layer().parameters()}
        for mixer in mixers.values():
            for p in mixer.parameters():
                p.requires_grad_(id(p) not in adapted_bases)
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
        counts["adapter"] = sum(p.numel() for n, p in student.named_parameters() if "lora_" in n)
    counts.update(trainable=sum(p.numel() for p in student.parameters() if p.requires_grad),
                  total=sum(p.numel() for p in student.parameters()))
    return counts


def _is_lora(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def merge_adapters(student: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the base layer back; every parameter trains again.
    Returns the number of merged layers (0 when the stage had none)."""
    merged = 0
    if any("lora_" in n for n, _ in student.named_parameters()):
        for name, module in list(student.named_modules()):
            if _is_lora(module):
                module.merge()
                parent_name, _, child = name.rpartition(".")
                setattr(student.get_submodule(parent_name) if parent_name else student, child, module.get_base_layer())
                merged += 1
    student.requires_grad_(True)
    return merged
