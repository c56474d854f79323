"""The project's one AdamW set-up and learning-rate schedule, shared by the distillation module and the geometry
studies, so that "warm-up then cosine" means the same thing everywhere."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant", "tail_linear", "wsd")


_FUSED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fused_for(module: nn.Module) -> bool | None:
    """``fused`` for :func:`adamw` in a LightningModule: off under mixed precision, else automatic. Why:
    Lightning's mixed-precision plugin refuses gradient clipping with an optimizer that unscales its own gradients
    (every fused one), so a CPU job in ``bf16-mixed`` with ``gradient_clip_val`` would stop at its first step."""
    trainer = getattr(module, "_trainer", None)  # attached while Lightning calls configure_optimizers
    return False if "mixed" in str(getattr(trainer, "precision", "")) else None


GROUPS = ("mpo", "matrices", "no_decay")


def parameter_groups(modules: Iterable[nn.Module],
                     only: Iterable[nn.Parameter] | None = None) -> dict[str, list[nn.Parameter]]:
    """The trainable parameters of ``modules`` by role: ``mpo`` (the local tensors of MPO layers, central and
    auxiliary), ``matrices`` (every other parameter of 2 or more dims) and ``no_decay`` (biases, norm weights and
    embedding tables). Each parameter once, in module order; ``only`` keeps just those parameters (a stage that
    trains part of a model).

    Why roles: an MPO layer's local tensors move its dense W further per Adam step than a dense W moves (the
    chain multiplies the updates), so OPDF's comparisons need their own rate and decay; biases, norms and
    embeddings are not decayed (BERT's recipe)."""
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUPS}
    seen: set[int] = set()
    kept = None if only is None else {id(p) for p in only}

    def add(group: str, param: nn.Parameter) -> None:
        if param.requires_grad and id(param) not in seen and (kept is None or id(param) in kept):
            seen.add(id(param))
            groups[group].append(param)

    for module in modules:
        for sub in module.modules():
            group = getattr(type(sub), "optimizer_group", None)  # MPO layers name theirs (mpo/layers.py)
            if group in groups:
                for tensor in sub.tensors:
                    add(group, tensor)
            elif isinstance(sub, nn.Embedding):
                add("no_decay", sub.weight)
        for param in module.parameters():
            add("no_decay" if param.dim() < 2 else "matrices", param)
    return groups


def adamw(modules: Iterable[nn.Module], lr: float, weight_decay: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.999), fused: bool | None = None, mpo_lr_scale: float = 1.0,
          mpo_weight_decay: float = 0.0, only: Iterable[nn.Parameter] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``modules`` in the groups of :func:`parameter_groups` (each
    param group carries its ``name``): ``matrices`` at ``lr`` with ``weight_decay``, ``no_decay`` at ``lr``
    without decay, ``mpo`` at ``lr * mpo_lr_scale`` with ``mpo_weight_decay``. Empty groups are left out.

    ``fused=None`` (default) uses torch's fused kernel when every parameter is a floating-point CPU tensor, and
    torch's own default (foreach on CUDA) otherwise. Why: on CPU torch defaults to a per-tensor loop of about ten
    elementwise passes per parameter; the fused kernel makes one. Measured side by side on the 2-core dev box
    (1 thread): 24 vs 202 ms per step for a 28.8M-parameter BERT, 30 vs 225 ms for its 41.4M-parameter MPO student
    (``experiments/bench_mpo.py``). The result equals the loop's up to rounding (about 1 ulp per step), not bitwise.
    """
    if not float(mpo_lr_scale) > 0:
        raise ConfigError(f"decomposition.lr_scale={mpo_lr_scale} must be > 0 (or auto)")
    groups = parameter_groups(modules, only)
    settings = {"matrices": (lr, weight_decay), "no_decay": (lr, 0.0),
                "mpo": (lr * float(mpo_lr_scale), float(mpo_weight_decay))}
    param_groups = [{"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
                    for name, params in groups.items() if params]
    if fused is None:
        params = [p for group in param_groups for p in group["params"]]
        fused = bool(params) and all(p.device.type == "cpu" and p.dtype in _FUSED_DTYPES for p in params)
    if not param_groups:  # torch refuses an empty list; one empty group keeps "nothing to train" a no-op
        param_groups = [{"name": "matrices", "params": []}]
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), fused=fused or None)


def describe_groups(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``{"opt/<group>/lr": ..., "opt/<group>/weight_decay": ..., "opt/<group>/params": ...}`` for logging."""
    out: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        name = group.get("name", str(index))
        out[f"opt/{name}/lr"] = float(group["lr"])
        out[f"opt/{name}/weight_decay"] = float(group.get("weight_decay", 0.0))
        out[f"opt/{name}/params"] = float(sum(p.numel() for p in group["params"]))
    return out


def rescale_group_lr(trainer, group: str, factor: float) -> None:
    """Multiply the rate of every param group named ``group`` by ``factor``, in the optimizer and in its
    schedulers' base rates (a LambdaLR recomputes each rate from its base every step)."""
    for optimizer in trainer.optimizers:
        indices = [i for i, g in enumerate(optimizer.param_groups) if g.get("name") == group]
        for index in indices:
            optimizer.param_groups[index]["lr"] *= factor
            if "initial_lr" in optimizer.param_groups[index]:
                optimizer.param_groups[index]["initial_lr"] *= factor
        for config in getattr(trainer, "lr_scheduler_configs", []):
            scheduler = config.scheduler
            if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
                for index in indices:
                    scheduler.base_lrs[index] *= factor
                if hasattr(scheduler, "_last_lr"):
                    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def _tail_decay(step: int, total: int, start: int, min_ratio: float) -> float:
    """1 until ``start``, then linear to ``min_ratio`` at ``total``."""
    remaining = 1.0 if step < start else max(0.0, (total - step) / max(1, total - start))
    return min_ratio + (1.0 - min_ratio) * remaining


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str = "cosine", min_ratio: float = 0.0,
              decay_ratio: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (the first step already trains, at 1/warmup of the rate), then:
    ``linear`` / ``cosine`` decay to ``min_ratio`` at ``total_steps``; ``constant``; ``tail_linear``, constant
    until 80% of the steps and then linear to ``min_ratio`` (the usual SAE recipe); or ``wsd``
    (warmup-stable-decay, MiniCPM-style, the subquadratic paper's stages 1-2): constant until the last
    ``decay_ratio`` of ``total_steps`` (never inside the warm-up), then linear to ``min_ratio`` at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"learning-rate schedule {schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
    if schedule == "wsd" and not 0.0 < decay_ratio <= 1.0:
        raise ConfigError(f"wsd decay_ratio={decay_ratio} must be in (0, 1], e.g. 0.1 for the last 10% of steps")
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    total = max(1, total_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "tail_linear":
        return _tail_decay(step, total, int(0.8 * total), min_ratio)
    if schedule == "wsd":
        return _tail_decay(step, total, max(warmup_steps, total - round(decay_ratio * total)), min_ratio)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * max(0.0, (total - step) / max(1, total - warmup_steps))
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def with_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, schedule: str = "cosine",
                  min_ratio: float = 0.0, decay_ratio: float = 0.1) -> dict:
    """Lightning's ``configure_optimizers`` return value: the optimizer with a per-step :func:`lr_factor`
    (``decay_ratio`` is read by ``wsd`` only)."""
    lr_factor(0, warmup_steps, total_steps, schedule, min_ratio, decay_ratio)  # a bad name fails here, before training
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule, min_ratio, decay_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
