"""Language-model distillation objectives over the vocabulary, and a loss that never holds batch x tokens x vocab.

Terms (each a per-token value, averaged over the real predicted tokens, logged unweighted, weighted in the sum):

* ``ce``: next-token cross-entropy on the data;
* ``forward_kl``: KL(teacher || student), mode-covering (Hinton KD, the default of every toolkit);
* ``reverse_kl``: KL(student || teacher), mode-seeking (MiniLLM);
* ``jsd``: the generalized Jensen-Shannon divergence of GKD with ``beta`` as TRL defines it: with the mixture
  ``m = beta * p_teacher + (1 - beta) * p_student``, ``beta * KL(teacher || m) + (1 - beta) * KL(student || m)``;
  ``beta = 0`` is forward KL and ``beta = 1`` reverse KL (the two endpoints are the KLs themselves, as in TRL);
* ``tvd``: total variation ``0.5 * sum |p_teacher - p_student|`` (DistillKit).

Divergences are taken between the temperature-softened distributions; the KL-type ones are multiplied by
``temperature ** 2`` so their gradients keep the scale of ``T = 1`` (Hinton's correction); TVD is not.

Memory: with a 49,152-token vocabulary a 4 x 512 batch has 100M logits per model, and the loss's softmaxes and
gradients several copies more. :func:`chunked_lm_loss` takes the hidden states before the LM head and runs the head
and the loss over chunks of tokens, computing each chunk's gradients at once (w.r.t. the hidden states, the head's
weight and bias), so only ``chunk x vocab`` logits ever exist; the backward only scales the stored gradients. Its
value and gradients equal the unchunked loss's to float32 round-off (tests/test_lm_objectives.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from opdf_exp.errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
TERMS = ("ce", *DIVERGENCES)


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.log_softmax(logits.to(dtype) / temperature, -1)


def token_divergence(name: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Per-token divergence ``(N,)`` between ``(N, V)`` student and teacher logits (see the module docstring)."""
    s, t = _log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature)
    if name == "jsd" and beta == 0.0:
        name = "forward_kl"
    elif name == "jsd" and beta == 1.0:
        name = "reverse_kl"
    if name == "forward_kl":
        value = (t.exp() * (t - s)).sum(-1)
    elif name == "reverse_kl":
        value = (s.exp() * (s - t)).sum(-1)
    elif name == "jsd":
        m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
        value = beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    elif name == "tvd":
        return 0.5 * (s.exp() - t.exp()).abs().sum(-1)
    else:
        raise ConfigError(f"LM divergence {name!r} is unknown; use one of {', '.join(DIVERGENCES)}")
    return value * temperature ** 2


@dataclass
class LMObjective:
    """Named terms with weights (``{"ce": 1.0, "forward_kl": 1.0}``), the softening temperature, JSD's ``beta``
    and the token chunk of :func:`chunked_lm_loss` (``None``: logits whole, as before)."""

    terms: dict[str, float] = field(default_factory=lambda: {"ce": 1.0, "forward_kl": 1.0})
    temperature: float = 1.0
    beta: float = 0.5
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        self.terms = {str(k): float(v) for k, v in dict(self.terms).items()}
        unknown = sorted(set(self.terms) - set(TERMS))
        if unknown:
            raise ConfigError(f"LM objective terms {unknown} are unknown; use some of {', '.join(TERMS)}")
        if not self.terms or any(not w >= 0 for w in self.terms.values()):
            raise ConfigError(f"LM objective weights {self.terms} must be >= 0, with at least one term")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ConfigError(f"jsd beta={self.beta} must be in [0, 1] (0: forward KL, 1: reverse KL)")
        if not float(self.temperature) > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0")
        if self.chunk_size is not None and int(self.chunk_size) <= 0:
            raise ConfigError(f"chunk_size={self.chunk_size} must be a positive number of tokens (or null: no "
                              "chunking)")

    @property
    def active(self) -> dict[str, float]:
        return {name: weight for name, weight in self.terms.items() if weight > 0}

    @property
    def needs_teacher(self) -> bool:
        return any(name in DIVERGENCES for name in self.active)

    def token_values(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                     labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every active term per token, ``{name: (N,)}``, from ``(N, V)`` logits."""
        values = {}
        for name in self.active:
            if name == "ce":
                values[name] = F.cross_entropy(student_logits.float() if student_logits.dtype != torch.float64
                                               else student_logits, labels, reduction="none")
            else:
                values[name] = token_divergence(name, student_logits, teacher_logits, self.temperature, self.beta)
        return values


def _reduce(values: dict[str, torch.Tensor], weights: torch.Tensor, count: torch.Tensor,
            objective: LMObjective) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    means = {name: (v * weights).sum() / count for name, v in values.items()}
    total = sum(objective.terms[name] * mean for name, mean in means.items())
    return total, means


def lm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            weights: torch.Tensor, objective: LMObjective) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The objective on whole ``(N, V)`` logits: ``(weighted total, {term: mean over real tokens})``."""
    count = weights.sum().clamp_min(1)
    return _reduce(objective.token_values(student_logits, teacher_logits, labels), weights, count, objective)


class _ChunkedLMLoss(torch.autograd.Function):
    """Forward computes every chunk's loss and its gradients at once; backward scales them by the incoming
    gradient. Inputs: student hidden ``(N, D)``, head weight ``(V, D)`` and bias ``(V,)`` or ``None``; the
    teacher's logits come chunk by chunk from ``teacher_chunk(start, stop)`` (no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, weights, objective, teacher_chunk):
        count = weights.sum().clamp_min(1)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        total = hidden.new_zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        sums = {name: torch.zeros_like(total) for name in objective.active}
        size = int(objective.chunk_size)
        for start in range(0, hidden.shape[0], size):
            stop = min(start + size, hidden.shape[0])
            with torch.enable_grad():
                h = hidden[start:stop].detach().requires_grad_(True)
                w = weight.detach().requires_grad_(weight.requires_grad)
                b = bias.detach().requires_grad_(bias.requires_grad) if bias is not None else None
                logits = F.linear(h, w, b)  # (chunk, V): the only logits that exist at a time
                with torch.no_grad():
                    teacher = teacher_chunk(start, stop) if objective.needs_teacher else None
                chunk_total, means = _reduce(objective.token_values(logits, teacher, labels[start:stop]),
                                             weights[start:stop], count, objective)
                wanted = [t for t in (h, w, b) if t is not None and t.requires_grad]
                grads = dict(zip([id(t) for t in wanted], torch.autograd.grad(chunk_total, wanted)))
            grad_hidden[start:stop] = grads[id(h)]
            if id(w) in grads:
                grad_weight += grads[id(w)]
            if b is not None and id(b) in grads:
                grad_bias += grads[id(b)]
            total += chunk_total.detach()
            for name, mean in means.items():
                sums[name] += mean.detach()
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias if grad_bias is not None else grad_weight[:0])
        ctx.has_bias = bias is not None
        names = list(sums)
        ctx.mark_non_differentiable(*[sums[n] for n in names]) if names else None
        return (total, *[sums[n] for n in names])

    @staticmethod
    def backward(ctx, grad_total, *_unused):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        return (grad_hidden * scale, grad_weight * scale, grad_bias * scale if ctx.has_bias else None,
                None, None, None, None)


def chunked_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, head_bias: torch.Tensor | None,
                    labels: torch.Tensor, weights: torch.Tensor, objective: LMObjective,
                    teacher_chunk: Callable[[int, int], torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`lm_loss` with the LM head inside, over chunks of ``objective.chunk_size`` tokens.

    ``hidden``: the student's final hidden states at the predicting positions, ``(N, D)``; ``labels`` ``(N,)``
    the next tokens; ``weights`` ``(N,)`` 1 for real tokens; ``teacher_chunk(start, stop)`` the teacher's logits
    for those rows (computed from its own hidden states and head, chunk by chunk, without gradient)."""
    if objective.chunk_size is None:
        raise ConfigError("chunked_lm_loss needs objective.chunk_size (a positive number of tokens)")
    if objective.needs_teacher and teacher_chunk is None:
        raise ConfigError(f"LM objective terms {sorted(objective.active)} need the teacher's logits")
    names = list(objective.active)
    total, *means = _ChunkedLMLoss.apply(hidden, head_weight, head_bias, labels, weights.to(hidden.dtype
                                         if hidden.dtype == torch.float64 else torch.float32), objective,
                                         teacher_chunk)
    return total, dict(zip(names, means))
