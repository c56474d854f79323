"""LGTM's teacher update (Ren et al. 2023, ACL, "Tailoring Instructions to Student's Learning Levels Boosts
Knowledge Distillation"; method name "Learning Good Teacher Matters").

Each step the teacher moves along two gradients:

1. its own loss on the training batch, ``teacher_alpha · KL(student ‖ teacher) + (1 − teacher_alpha) · task``
   (the student's soft predictions are targets, detached);
2. the *distillation influence*: how the student's loss on a held-out batch would change if the student took one
   optimizer step distilled from this teacher. With θ' the student after a virtual AdamW step and
   v = ∇_θ' L_heldout(θ'), the second-order term ∇_teacher ∇_θ L_teacher · v is taken by finite differences at
   θ ± R·v, R = r / ‖v‖ (DARTS' approximation), and subtracted scaled by the teacher's learning rate.

Following the public code, the virtual step replays the student's own AdamW update (its moments and bias
correction) and the held-out batch comes from the selection data (here: the first dev half only, never the
reported half). Differences from that code: the virtual student is evaluated with ``torch.func.functional_call``
instead of a deep copy, and the teacher runs in eval mode (no dropout) in every pass, so the two
finite-difference passes see the same function. No Lightning or Hydra here (layering rule).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from opdf_exp.distill.adapters import ModelOutputs, adapter_for
from opdf_exp.distill.terms import soft_target_kl


def soft_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(target/T) ‖ softmax(student/T)); MSE for a single logit (regression), where KL is zero."""
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.float(), target_logits.float())
    return soft_target_kl(student_logits, target_logits, temperature, t2_scaling=False)


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def teacher_objective(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor,
                      teacher_alpha: float, temperature: float, detach_student: bool = True) -> torch.Tensor:
    """The teacher's own loss: pulled towards what the student predicts (a detached target), and towards the
    labels. ``detach_student=False`` only serves the tests' exact second derivative."""
    target = student_logits.detach() if detach_student else student_logits
    distill = soft_loss(teacher_logits, target, temperature)
    return teacher_alpha * distill + (1.0 - teacher_alpha) * task_loss(teacher_logits, labels)


@torch.no_grad()
def adamw_lookahead(optimizer: torch.optim.Optimizer, grads: Mapping[nn.Parameter, torch.Tensor]
                    ) -> dict[nn.Parameter, torch.Tensor]:
    """The parameters one ``torch.optim.AdamW`` step with ``grads`` would give, without changing the optimizer."""
    new = {}
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        for param in group["params"]:
            grad = grads.get(param)
            if grad is None:
                continue
            state = optimizer.state.get(param, {})
            step = float(state["step"]) + 1 if "step" in state else 1.0
            exp_avg = state["exp_avg"] * beta1 + (1 - beta1) * grad if "exp_avg" in state else (1 - beta1) * grad
            exp_avg_sq = (state["exp_avg_sq"] * beta2 + (1 - beta2) * grad * grad if "exp_avg_sq" in state
                          else (1 - beta2) * grad * grad)
            denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step) + eps
            new[param] = param * (1 - lr * weight_decay) - (lr / (1 - beta1 ** step)) * exp_avg / denom
    return new


def distillation_influence(student: nn.Module, teacher: nn.Module, inputs: Mapping[str, torch.Tensor],
                           labels: torch.Tensor, pairs: list[tuple[nn.Parameter, torch.Tensor]], *,
                           teacher_alpha: float, temperature: float, r: float = 1e-2) -> list[torch.Tensor | None]:
    """(∇_teacher L_teacher(θ + R v) − ∇_teacher L_teacher(θ − R v)) / 2R, R = r / ‖v‖, for the teacher's trainable
    parameters in order; ``pairs`` = [(student parameter, v)]. Student and teacher run in eval mode, so both
    passes see the same function; the student's parameters are restored exactly (saved, not re-subtracted)."""
    teacher_params = [p for p in teacher.parameters() if p.requires_grad]
    norm = torch.sqrt(sum((v.float() ** 2).sum() for _, v in pairs))
    radius = float(r / norm.clamp_min(1e-12))
    saved = [p.detach().clone() for p, _ in pairs]

    def teacher_grad_at(sign: float) -> tuple:
        with torch.no_grad():
            for (p, v), original in zip(pairs, saved):
                p.copy_(original + sign * radius * v)
            student_logits = adapter_for(student).run(student, inputs).logits
        logits = adapter_for(teacher).run(teacher, inputs).logits
        return torch.autograd.grad(teacher_objective(logits, student_logits, labels, teacher_alpha, temperature),
                                   teacher_params, allow_unused=True)

    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        plus, minus = teacher_grad_at(+1.0), teacher_grad_at(-1.0)
    finally:
        with torch.no_grad():
            for (p, _), original in zip(pairs, saved):
                p.copy_(original)
        student.train(modes[0])
        teacher.train(modes[1])
    return [None if a is None or b is None else (a - b) / (2 * radius) for a, b in zip(plus, minus)]


def lgtm_teacher_gradients(student: nn.Module, teacher: nn.Module, inputs: Mapping[str, torch.Tensor],
                           labels: torch.Tensor, heldout_inputs: Mapping[str, torch.Tensor],
                           heldout_labels: torch.Tensor, *, student_objective: Callable[[object, object], torch.Tensor],
                           student_optimizer: torch.optim.Optimizer, teacher_lr: float, teacher_alpha: float,
                           temperature: float, r: float = 1e-2) -> list[torch.Tensor | None]:
    """Gradients for the teacher's trainable parameters (in ``teacher.parameters()`` order, None if frozen).

    ``student_objective(student_out, teacher_out)`` is the student's training loss (the method's KD terms); the
    student's parameters are restored exactly before returning.
    """
    student_params = [p for p in student.parameters() if p.requires_grad]
    teacher_params = [p for p in teacher.parameters() if p.requires_grad]
    # 1. the teacher's own gradient, and the student's gradient for the virtual step
    teacher_out = adapter_for(teacher).run(teacher, inputs)
    student_out = adapter_for(student).run(student, inputs)
    own = torch.autograd.grad(teacher_objective(teacher_out.logits, student_out.logits, labels, teacher_alpha,
                                                temperature), teacher_params, allow_unused=True)
    teacher_target = ModelOutputs(logits=teacher_out.logits.detach())
    student_grads = torch.autograd.grad(student_objective(student_out, teacher_target), student_params,
                                        allow_unused=True)
    # 2. the student after one virtual AdamW step, and its held-out gradient v
    stepped = adamw_lookahead(student_optimizer, {p: g for p, g in zip(student_params, student_grads) if g is not None})
    names = {p: name for name, p in student.named_parameters()}
    virtual = {names[p]: value.requires_grad_(True) for p, value in stepped.items()}
    student_io = adapter_for(student)
    args, kwargs = student_io.call_arguments(student, heldout_inputs)
    heldout_logits = student_io.logits_of(functional_call(student, virtual, args=args, kwargs=kwargs))
    vector = dict(zip(virtual, torch.autograd.grad(task_loss(heldout_logits, heldout_labels), list(virtual.values()),
                                                    allow_unused=True)))
    pairs = [(p, vector[names[p]]) for p in student_params if vector.get(names[p]) is not None]
    influence = distillation_influence(student, teacher, inputs, labels, pairs, teacher_alpha=teacher_alpha,
                                       temperature=temperature, r=r)
    grads_by_param = {}
    for param, g_own, g_influence in zip(teacher_params, own, influence):
        if g_own is None and g_influence is None:
            continue
        g_own = torch.zeros_like(param) if g_own is None else g_own
        grads_by_param[param] = g_own if g_influence is None else g_own - teacher_lr * g_influence
    return [grads_by_param.get(p) for p in teacher.parameters()]
