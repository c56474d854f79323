"""The distillation objective: ``total = sum_k weight_k * term_k``, every term returned unweighted for logging."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from opdf_exp.distill.terms import LossTerm, TaskLoss
from opdf_exp.errors import ConfigError


@dataclass
class DistillContext:
    """Everything a loss term may read for one batch. Model outputs are read by name (``logits``,
    ``hidden_states``), never by tuple position."""

    student: Any
    labels: torch.Tensor | None = None
    teacher: Any = None
    attention_mask: torch.Tensor | None = None
    student_features: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher_features: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillationLoss(nn.Module):
    """A weighted sum of named :class:`LossTerm` s.

    Terms with weight 0 are kept for the formula but not computed (so a no-KD student skips the teacher
    forward entirely). Term modules with parameters (projections) are trained with the student and counted in
    its training-time parameters, never in its inference parameters.
    """

    def __init__(self, terms: Mapping[str, LossTerm], weights: Mapping[str, float]):
        super().__init__()
        if set(terms) != set(weights):
            raise ConfigError(f"loss terms {sorted(terms)} and weights {sorted(weights)} differ; give every term a weight")
        if not terms:
            raise ConfigError("the distillation loss has no terms; set distill.terms")
        for name, weight in weights.items():
            if not float(weight) >= 0:
                raise ConfigError(f"distill.terms.{name}.weight={weight} must be >= 0")
        self.terms = nn.ModuleDict(dict(terms))
        self.weights = {name: float(w) for name, w in weights.items()}

    @property
    def active(self) -> dict[str, LossTerm]:
        return {name: term for name, term in self.terms.items() if self.weights[name] > 0}

    @property
    def task_term(self) -> LossTerm:
        """The supervised term (validation and test loss are this term itself, whatever its weight in training)."""
        for term in self.terms.values():
            if isinstance(term, TaskLoss):
                return term
        if not hasattr(self, "_default_task_term"):
            self._default_task_term = TaskLoss()
        return self._default_task_term

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.active.values())

    @property
    def needs_hidden_states(self) -> bool:
        return any(term.needs_hidden_states for term in self.active.values())

    @property
    def teacher_hidden_layers(self) -> tuple[int, ...] | None:
        """The teacher hidden states the active terms read, or ``None`` when one of them does not say."""
        layers: set[int] = set()
        for term in self.active.values():
            wanted = term.teacher_hidden_layers if term.needs_teacher else ()
            if wanted is None:
                return None
            layers |= set(wanted)
        return tuple(sorted(layers))

    def tap_paths(self) -> tuple[list[str], list[str]]:
        student, teacher = [], []
        for term in self.active.values():
            student += term.student_paths
            teacher += term.teacher_paths
        return sorted(set(student)), sorted(set(teacher))

    def formula(self) -> str:
        return " + ".join(f"{self.weights[name]:g}*{name}" for name in self.terms if self.weights[name] > 0) or "0"

    def forward(self, ctx: DistillContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = {name: term(ctx) for name, term in self.active.items()}
        total = sum(self.weights[name] * value for name, value in values.items())
        return total, values
