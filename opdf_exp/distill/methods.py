"""KD methods by name: ``create_method(name, **kwargs)``, ``list_methods()``, ``@register_method(name)``.

Why a registry beside the loss terms: most methods (KD, PKD, KD + hidden states) are only a weighted sum of
terms on the student's forward, but some change *what trains and how*: BERT-of-Theseus trains a mixed
predecessor/successor model, LGTM updates the teacher every step. A method object says exactly that, in plain
PyTorch, and the runner asks every method the same questions, so a new method plugs in with a class here and a
``conf/distill/<name>.yaml`` (tests are parametrized over :func:`list_methods`):

- :meth:`DistillMethod.check`: refuse bad input in one line before any training;
- :meth:`DistillMethod.training_model`: the module that runs the training forward (default: the student);
- :attr:`DistillMethod.trains_teacher` / :attr:`DistillMethod.decompose_teacher`: whether the teacher is a trainable
  copy (LGTM), and whether ``decomposition=svd|mpo`` over-parameterizes it too.

``distill.method`` in the config holds a method's keyword arguments; ``distill.module`` may name the
LightningModule that runs it (LGTM's custom step). No Lightning or Hydra here (layering rule).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn as nn

from opdf_exp.errors import ConfigError

_METHODS: dict[str, Callable[..., "DistillMethod"]] = {}


def register_method(*names: str) -> Callable:
    """Class decorator: make the class available as ``distill=<name>`` for each name."""
    def add(cls):
        for name in names:
            if name in _METHODS:
                raise ValueError(f"KD method {name!r} is registered twice")
            _METHODS[name] = cls
        return cls
    return add


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, **kwargs: Any) -> "DistillMethod":
    if name not in _METHODS:
        raise ConfigError(f"KD method {name!r} is unknown; registered: {', '.join(list_methods())}")
    try:
        method = _METHODS[name](**kwargs)
    except TypeError as error:
        raise ConfigError(f"KD method {name!r} got bad options {sorted(kwargs)}: {error}") from None
    method.name = name
    return method


class DistillMethod:
    """A method that is just its loss terms: the student trains on their weighted sum (Hinton KD, PKD ...)."""

    name = "loss"
    trains_teacher = False     # the teacher is a trainable copy (LGTM)
    decompose_teacher = False  # with decomposition=svd|mpo, over-parameterize that copy too

    def check(self, *, student: nn.Module, teacher: nn.Module, problem_type: str) -> None:
        """Refuse input the method cannot train (a layer map that does not fit the two depths ...)."""

    def training_model(self, student: nn.Module, teacher: nn.Module, *, seed: int) -> nn.Module | None:
        """The module whose forward trains (None: the student). Called after the decomposition."""
        return None

    def module_options(self) -> dict[str, Any]:
        """Extra keyword arguments for the method's LightningModule (``distill.module``)."""
        return {}


@register_method("none", "kd", "kd_hidden", "pkd", "deit_hard")
class LossOnly(DistillMethod):
    """No-KD baseline, Hinton KD, KD + hidden states, Patient-KD and DeiT hard distillation: what differs is in
    ``distill.terms``."""


@register_method("theseus")
class Theseus(DistillMethod):
    """BERT-of-Theseus module replacement (Xu et al. 2020), see :mod:`opdf_exp.models.theseus`.

    ``p0``, ``k``: the curriculum p(t) = min(1, p0 + k·t) (``constant: true`` keeps p = p0). ``groups``: teacher
    blocks per student block (``auto``: equal contiguous groups). ``train``: parameter-name substrings of the
    student that train besides its blocks (the paper trains the successor blocks only; ``[classifier]`` adds the
    head). Everything else of the student is frozen during module replacement.
    """

    def __init__(self, p0: float = 0.3, k: float = 3e-4, constant: bool = False,
                 groups: str | Sequence[Sequence[int]] = "auto", train: Sequence[str] = ()):
        self.p0, self.k = float(p0), 0.0 if constant else float(k)
        self.groups = groups
        self.train = list(train or [])

    def check(self, *, student: nn.Module, teacher: nn.Module, problem_type: str) -> None:
        from opdf_exp.models.layers import find_layer_stack
        from opdf_exp.models.theseus import theseus_groups

        theseus_groups(len(find_layer_stack(student)[1]), len(find_layer_stack(teacher)[1]), self.groups)

    def training_model(self, student: nn.Module, teacher: nn.Module, *, seed: int) -> nn.Module:
        from opdf_exp.models.layers import find_layer_stack
        from opdf_exp.models.theseus import TheseusModel

        stack_path, _ = find_layer_stack(student)
        for name, param in student.named_parameters():
            if not name.startswith(stack_path + ".") and not any(pattern in name for pattern in self.train):
                param.requires_grad_(False)
        return TheseusModel(student, teacher, p0=self.p0, k=self.k, groups=self.groups, seed=seed)


@register_method("lgtm")
class LGTM(DistillMethod):
    """"Learning Good Teacher Matters" (Ren et al. 2023, ACL): the teacher is a trainable copy, updated every step
    by its own loss plus the *distillation influence* of a held-out batch (see :mod:`opdf_exp.distill.lgtm`).

    ``teacher_lr``: the teacher's AdamW learning rate (the influence is scaled by it, as in the public code);
    ``teacher_alpha``: weight of the teacher's KL towards the student vs its own cross-entropy;
    ``finite_difference_r``: the finite-difference radius (divided by the held-out gradient's norm);
    ``decompose_teacher``: with ``decomposition=svd|mpo``, over-parameterize the teacher copy too.
    """

    trains_teacher = True

    def __init__(self, teacher_lr: float = 3e-5, teacher_alpha: float = 0.5, temperature: float = 1.0,
                 finite_difference_r: float = 1e-2, decompose_teacher: bool = False):
        if not teacher_lr > 0 or not 0 <= teacher_alpha <= 1 or not temperature > 0 or not finite_difference_r > 0:
            raise ConfigError(f"lgtm needs teacher_lr > 0, 0 <= teacher_alpha <= 1, temperature > 0 and "
                              f"finite_difference_r > 0; got {teacher_lr}, {teacher_alpha}, {temperature}, "
                              f"{finite_difference_r}")
        self.teacher_lr, self.teacher_alpha = float(teacher_lr), float(teacher_alpha)
        self.temperature, self.finite_difference_r = float(temperature), float(finite_difference_r)
        self.decompose_teacher = bool(decompose_teacher)

    def module_options(self) -> dict[str, Any]:
        return {"teacher_lr": self.teacher_lr, "teacher_alpha": self.teacher_alpha, "temperature": self.temperature,
                "finite_difference_r": self.finite_difference_r}
