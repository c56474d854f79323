"""The LightningModule of LGTM: the teacher trains jointly with the student (manual optimization).

One training step = one teacher step (its own loss plus the distillation influence of a held-out batch, see
:mod:`opdf_exp.distill.lgtm`), then one student step on the method's loss terms against the updated teacher, as
in the public code. The held-out batches are the validation split (the selection half under
``data.eval_protocol=half_dev``; the reported half is never seen), in the validation loader's batches
(``data.module.eval_batch_size``) taken in a fixed order by global step, so a resumed run uses the batches the
uninterrupted one would.

Only the student's optimizer step counts as a Lightning step (the teacher's optimizer is stepped directly), so
``trainer.max_steps`` means student steps as for every other method. The trained teacher is part of the
checkpoint, unlike a frozen teacher. The default BERT/GLUE path never uses this class.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from opdf_exp.distill.lgtm import lgtm_teacher_gradients
from opdf_exp.distill.loss import DistillationLoss, DistillContext
from opdf_exp.errors import ConfigError
from opdf_exp.lit.module import DistillationModule
from opdf_exp.utils.optim import adamw, fused_for, with_schedule


class LGTMModule(DistillationModule):
    rebuilt_by_runner = ("train_model",)  # the teacher trains, so checkpoints keep it

    def __init__(self, student: nn.Module, loss: DistillationLoss, teacher: nn.Module | None = None, *,
                 teacher_lr: float = 3e-5, teacher_alpha: float = 1.0, temperature: float = 1.0,
                 finite_difference_r: float = 1e-2, **kwargs: Any):
        if teacher is None:
            raise ConfigError("distill=lgtm trains the teacher jointly; it needs a teacher")
        super().__init__(student, loss, teacher, **kwargs)
        self.automatic_optimization = False
        self.gradient_clip_val: float | None = None  # set by the runner from trainer.gradient_clip_val
        teacher.requires_grad_(True)
        self.teacher_lr, self.teacher_alpha = float(teacher_lr), float(teacher_alpha)
        self.temperature, self.finite_difference_r = float(temperature), float(finite_difference_r)
        self._heldout: list[dict[str, torch.Tensor]] | None = None

    def _heldout_batch(self) -> dict[str, torch.Tensor]:
        if self._heldout is None:
            self._heldout = list(self.trainer.datamodule.val_dataloader())  # fixed order, eval batch size
            if not self._heldout:
                raise ConfigError("distill=lgtm needs held-out batches but the validation split is empty")
        batch = self._heldout[self.global_step % len(self._heldout)]
        return {k: v.to(self.device) for k, v in batch.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        student_opt, teacher_opt = self.optimizers()
        student_sched, teacher_sched = self.lr_schedulers()
        heldout = self._heldout_batch()
        batch_size = batch["labels"].shape[0]

        def student_objective(student_out, teacher_out) -> torch.Tensor:
            ctx = self._context_from(batch, student_out, teacher_out)
            return self.loss(ctx)[0]

        # 1. teacher step (raw optimizer: only the student's step advances the global step)
        grads = lgtm_teacher_gradients(
            self.student, self.teacher, batch, batch["labels"], heldout,
            heldout["labels"], student_objective=student_objective, student_optimizer=student_opt.optimizer,
            teacher_lr=teacher_sched.get_last_lr()[0], teacher_alpha=self.teacher_alpha,
            temperature=self.temperature, r=self.finite_difference_r)
        teacher_opt.optimizer.zero_grad(set_to_none=True)
        for param, grad in zip(self.teacher.parameters(), grads):
            if grad is not None:
                param.grad = grad.detach()
        self._clip(self.teacher)
        teacher_opt.optimizer.step()
        teacher_sched.step()
        # 2. student step against the updated teacher (its forward runs under no_grad in _context)
        total, terms = self.loss(self._context(batch))
        student_opt.zero_grad()
        self.manual_backward(total)
        self._clip(self.student, self.loss)
        student_opt.step()
        student_sched.step()
        self.log(f"{self.prefix}train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"{self.prefix}train/loss/{name}", value.detach(), batch_size=batch_size)
        return total.detach()

    @staticmethod
    def _context_from(batch, student_out, teacher_out) -> DistillContext:
        return DistillContext(student=student_out, teacher=teacher_out, labels=batch.get("labels"),
                              attention_mask=batch.get("attention_mask"))

    def _clip(self, *modules: nn.Module) -> None:
        if self.gradient_clip_val:
            params = [p for module in modules for p in module.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, float(self.gradient_clip_val))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(hp.warmup_ratio * total)
        student = with_schedule(adamw([self.student, self.loss], hp.lr, hp.weight_decay, tuple(hp.betas), fused_for(self)),
                                warmup, total, hp.scheduler)
        teacher = with_schedule(adamw([self.teacher], self.teacher_lr, hp.weight_decay, tuple(hp.betas), fused_for(self)),
                                warmup, total, hp.scheduler)
        return [student["optimizer"], teacher["optimizer"]], [student["lr_scheduler"], teacher["lr_scheduler"]]
