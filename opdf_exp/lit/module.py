"""One LightningModule for fine-tuning a teacher and for distilling a student.

Fine-tuning is distillation with no teacher and only the task term, so both stages share this class, its
metrics and its logging. Models are run only through their :mod:`~opdf_exp.distill.adapters` (a batch in, named
outputs out), so the same class trains transformers and timm students; nothing here knows a model family. The teacher is frozen (eval mode, no grad) and its weights are left out of
checkpoints: it is rebuilt by the runner and re-inserted on load, so checkpoints stay student-sized.

A KD method may change the student for its training forwards (``train_model``: BERT-of-Theseus's mixed
predecessor/successor model, whose successor *is* the student): its ``training_forward()`` context swaps the
mixed blocks in while the student's adapter runs. Validation, test and export always use the student alone. Like
the teacher it is rebuilt by the runner, so it is left out of checkpoints too. If it has ``set_step(step)``, it
is told the global step before each training forward (curricula such as Theseus's p(t) depend on it, so a resumed
run continues the same schedule).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torchmetrics

from opdf_exp.distill.adapters import ModelOutputs, adapter_for
from opdf_exp.distill.loss import DistillationLoss, DistillContext
from opdf_exp.distill.taps import ForwardTaps
from opdf_exp.errors import ConfigError
from opdf_exp.utils.optim import adamw, describe_groups, fused_for, rescale_group_lr, with_schedule

log = logging.getLogger(__name__)


class MajorityShare(torchmetrics.Metric):
    """The share of predictions that fall in the most predicted class: 1.0 when a classifier has collapsed to one
    class. Why: a small student at too large a step often predicts the majority class everywhere (MRPC: accuracy
    exactly the positive share, F1 81.4), which a mean score hides; every classification split logs it, and the
    GLUE report counts the seeds at >= 0.99 (``one-class seeds``)."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)
        self.add_state("counts", default=torch.zeros(self.num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # target unused: a property of preds
        self.counts += torch.bincount(preds.reshape(-1).long(), minlength=self.num_classes)[: self.num_classes]

    def compute(self) -> torch.Tensor:
        return self.counts.max().float() / self.counts.sum().clamp(min=1).float()


def build_metrics(problem_type: str, num_labels: int, names: list[str]) -> torchmetrics.MetricCollection:
    """Metric objects by short name; unknown names fail with the list of known ones. Classification always adds
    ``majority_share`` (:class:`MajorityShare`)."""
    regression = problem_type == "regression"
    factories: dict[str, Callable[[], torchmetrics.Metric]] = {
        "pearson": lambda: torchmetrics.PearsonCorrCoef(),
        "spearman": lambda: torchmetrics.SpearmanCorrCoef(),
    } if regression else {
        "acc": lambda: torchmetrics.Accuracy(task="multiclass", num_classes=num_labels),
        "f1": lambda: (torchmetrics.F1Score(task="binary") if num_labels == 2 else
                       torchmetrics.F1Score(task="multiclass", num_classes=num_labels, average="macro")),
        "mcc": lambda: torchmetrics.MatthewsCorrCoef(task="multiclass", num_classes=num_labels),
        "majority_share": lambda: MajorityShare(num_labels),
        "acc5": lambda: _reads_scores(torchmetrics.Accuracy(task="multiclass", num_classes=num_labels,
                                                            top_k=min(5, num_labels))),  # ImageNet's top-5
    }
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise ConfigError(f"data.metrics has {unknown}, not available for {problem_type}; use some of {sorted(factories)}")
    chosen = {name: factories[name]() for name in names}
    if not regression:
        chosen.setdefault("majority_share", MajorityShare(num_labels))
    # no compute groups: top-1 and top-5 accuracy have equal states but are updated with different inputs
    return torchmetrics.MetricCollection(chosen, compute_groups=False)


def alignment_gradient_ratio(alignment: nn.Module, weight: float, student: nn.Module) -> float | None:
    """||grad of weight * alignment|| / ||the rest of the gradient|| over the student's MPO tensors, read after
    the backward (``.grad`` holds the total): the alignment part is recomputed alone (it reads only the tensors),
    the rest is the total minus it. ``None`` when no MPO tensor has a gradient yet."""
    from opdf_exp.mpo.layers import MPO_LAYER_TYPES

    tensors = [t for m in student.modules() if isinstance(m, MPO_LAYER_TYPES) for t in m.tensors
               if t.requires_grad and t.grad is not None]
    if not tensors:
        return None
    with torch.enable_grad():
        align_grads = torch.autograd.grad(weight * alignment(), tensors, allow_unused=True)
    align_sq = rest_sq = 0.0
    for tensor, g_align in zip(tensors, align_grads):
        total = tensor.grad.detach().float()
        g_align = torch.zeros_like(total) if g_align is None else g_align.detach().float()
        align_sq += float(g_align.square().sum())
        rest_sq += float((total - g_align).square().sum())
    return (align_sq ** 0.5) / max(rest_sq ** 0.5, 1e-30)


def _reads_scores(metric: torchmetrics.Metric) -> torchmetrics.Metric:
    """Mark a metric that is updated with the logits (top-k) instead of the predicted labels."""
    metric.reads_scores = True
    return metric


class DistillationModule(pl.LightningModule):
    """Trains ``student`` with ``loss``; ``teacher`` (optional) is frozen.

    Metric names are ``{prefix}{split}/{name}`` (e.g. ``val/acc``, ``kd_opdf/test/acc``) and every loss term is
    logged unweighted as ``{prefix}train/loss/{term}`` next to the weighted total ``{prefix}train/loss``.
    """

    def __init__(self, student: nn.Module, loss: DistillationLoss, teacher: nn.Module | None = None, *,
                 problem_type: str = "single_label_classification", num_labels: int = 2,
                 metrics: list[str] | None = None, lr: float = 5e-5, weight_decay: float = 0.01,
                 warmup_ratio: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), scheduler: str = "linear",
                 log_prefix: str = "", compile: bool = False, teacher_cache=None,
                 train_model: nn.Module | None = None, mpo_lr_scale: float | str = 1.0,
                 mpo_weight_decay: float = 0.0, align_weight_ratio: float | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "loss", "teacher_cache", "train_model"])
        self.teacher_cache = teacher_cache  # TeacherOutputCache: training reads the teacher's outputs from disk
        self.student = student
        self.loss = loss
        self.teacher = teacher
        self.train_model = train_model
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        elif loss.needs_teacher:
            raise ConfigError(f"loss terms {list(loss.active)} need a teacher but none was given")
        self.prefix = log_prefix
        if align_weight_ratio is not None:
            if "align" not in loss.terms:
                raise ConfigError("decomposition.align.weight=auto:<ratio> needs the alignment term; this student "
                                  "has no MPO layers to align (decomposition.kind=none)")
            # the measured λ lives in the checkpoint, so a resumed fit trains with the λ of its start
            self.register_buffer("align_weight_measured", torch.tensor(float("nan"), dtype=torch.float64))
        metric_names = list(metrics or (["pearson", "spearman"] if problem_type == "regression" else ["acc", "f1"]))
        self.val_metrics = build_metrics(problem_type, num_labels, metric_names).clone(prefix=f"{log_prefix}val/")
        self.test_metrics = build_metrics(problem_type, num_labels, metric_names).clone(prefix=f"{log_prefix}test/")
        # Further test sets (MNLI's test_mismatched), made when a test run first sees them; metric states are not
        # persistent, so checkpoints do not depend on which test sets were evaluated.
        self.extra_test_metrics = nn.ModuleDict()
        self.regression = problem_type == "regression"
        self.student_adapter = adapter_for(student)
        self.teacher_adapter = adapter_for(teacher) if teacher is not None else None
        for model, adapter in ((student, self.student_adapter), (teacher, self.teacher_adapter)):
            if adapter is not None:
                adapter.prepare(model)  # e.g. DeiT's two heads in training
        student_paths, teacher_paths = loss.tap_paths()
        self._student_taps = ForwardTaps(student, student_paths) if student_paths else None
        self._teacher_taps = ForwardTaps(teacher, teacher_paths) if teacher_paths and teacher is not None else None

    # -- teacher stays in eval mode whatever Lightning does with .train()
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def configure_model(self) -> None:
        if self.hparams.compile:
            self.student = torch.compile(self.student)

    def forward(self, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> ModelOutputs:
        return self.student_adapter.run(self.student, batch, hidden_states)

    def teacher_outputs(self, batch: dict[str, torch.Tensor], hidden_states: bool = False) -> ModelOutputs:
        return self.teacher_adapter.run(self.teacher, batch, hidden_states)

    def _context(self, batch: dict[str, torch.Tensor]) -> DistillContext:
        hidden = self.loss.needs_hidden_states
        mixed = getattr(self.train_model, "training_forward", None) if self.training else None
        with mixed() if mixed is not None else contextlib.nullcontext():
            student_out = self(batch, hidden_states=hidden)
        teacher_out = None
        if self.loss.needs_teacher and self.teacher_cache is not None and self.training:
            teacher_out = self.teacher_cache.lookup(batch, self.device)  # computed once for the whole sweep
        elif self.loss.needs_teacher:
            with torch.no_grad():
                teacher_out = self.teacher_outputs(batch, hidden_states=hidden)
        return DistillContext(
            student=student_out, teacher=teacher_out, labels=batch.get("labels"),
            attention_mask=batch.get("attention_mask"),
            student_features=dict(self._student_taps.outputs) if self._student_taps else {},
            teacher_features=dict(self._teacher_taps.outputs) if self._teacher_taps else {})

    def _start_training_forward(self, batch_size: int) -> None:
        set_step = getattr(self.train_model, "set_step", None)
        if set_step is not None:
            set_step(self.global_step)
            probability = getattr(self.train_model, "probability", None)
            if probability is not None:
                self.log(f"{self.prefix}train/replace_p", float(probability), batch_size=batch_size)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch_size = batch["labels"].shape[0]
        self._start_training_forward(batch_size)
        total, terms = self.loss(self._context(batch))
        if not total.requires_grad:
            # No trainable parameter took part (a Theseus step that drew only teacher blocks): Lightning skips the
            # backward for None, the step still counts, so the curriculum and the budget advance as drawn.
            self.log(f"{self.prefix}train/loss", total, prog_bar=True, batch_size=batch_size)
            return None
        self.log(f"{self.prefix}train/loss", total, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"{self.prefix}train/loss/{name}", value.detach(), batch_size=batch_size)
        return total

    def _eval_step(self, batch: dict[str, torch.Tensor], metrics: torchmetrics.MetricCollection, split: str,
                   add_dataloader_idx: bool = True) -> None:
        outputs = self(batch)
        labels = batch["labels"]
        # the evaluation loss is the task term itself (CE, or MSE for one output), not a second copy of it
        loss = self.loss.task_term(DistillContext(student=outputs, labels=labels))
        logits = outputs.logits
        preds = logits.squeeze(-1).float() if self.regression else logits.argmax(-1)
        for metric in metrics.values():
            metric.update(logits.float() if getattr(metric, "reads_scores", False) else preds, labels)
        self.log(f"{self.prefix}{split}/loss", loss, batch_size=labels.shape[0], add_dataloader_idx=add_dataloader_idx,
                 sync_dist=True)  # mean over ranks: DDP reports the loss of the whole split

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)  # equal on all ranks already
        self.val_metrics.reset()

    # -- test: one loader per test set; loader k is named by the datamodule's ``test_set_names[k]``
    def _test_set_name(self, dataloader_idx: int) -> str:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(datamodule, "test_set_names", None) or ["test"])
        return names[dataloader_idx] if dataloader_idx < len(names) else f"test_{dataloader_idx}"

    def _test_metrics_for(self, name: str) -> torchmetrics.MetricCollection:
        if name == "test":
            return self.test_metrics
        if name not in self.extra_test_metrics:
            hp = self.hparams
            names = list(hp.metrics or (["pearson", "spearman"] if self.regression else ["acc", "f1"]))
            self.extra_test_metrics[name] = build_metrics(hp.problem_type, hp.num_labels, names).clone(
                prefix=f"{self.prefix}{name}/").to(self.device)
        return self.extra_test_metrics[name]

    def on_test_epoch_start(self) -> None:
        self._sets_tested: dict[str, None] = {}  # ordered: the order of the loaders

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self._test_set_name(dataloader_idx)
        self._sets_tested[name] = None
        # metric names already say which set: test/acc, test_mismatched/acc (no "/dataloader_idx_k" suffix)
        self._eval_step(batch, self._test_metrics_for(name), name, add_dataloader_idx=False)

    def on_test_epoch_end(self) -> None:
        for name in getattr(self, "_sets_tested", None) or ["test"]:
            metrics = self._test_metrics_for(name)
            self.log_dict(metrics.compute(), add_dataloader_idx=False, sync_dist=True)
            metrics.reset()

    # -- optimisation: parameter groups by role (utils.optim.parameter_groups); the MPO tensors' own rate and decay
    def _numeric_mpo_lr_scale(self) -> float:
        scale = self.hparams.get("mpo_lr_scale", 1.0)
        return 1.0 if str(scale) == "auto" else float(scale)  # auto: rescaled at the fit's start

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        optimizer = adamw([self.student, self.loss], hp.lr, hp.weight_decay, tuple(hp.betas), fused_for(self),
                          mpo_lr_scale=self._numeric_mpo_lr_scale(), mpo_weight_decay=hp.get("mpo_weight_decay", 0.0))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return with_schedule(optimizer, int(hp.warmup_ratio * total), total, hp.scheduler)

    def on_train_start(self) -> None:
        """``mpo_lr_scale=auto``: measure the step amplification on the first training batch and divide the MPO
        group's rate by it (a resumed fit keeps the rate its checkpoint restored). Then log every group's rate
        and decay, so a reader of any run sees what each role trained at."""
        extra: dict[str, float] = {}
        if str(self.hparams.get("mpo_lr_scale", 1.0)) == "auto" and self.trainer.ckpt_path is None:
            amplification = self._measure_step_amplification()
            rescale_group_lr(self.trainer, "mpo", 1.0 / amplification)
            extra["opdf/step_amplification"] = amplification
            log.info("%sMPO step amplification %.3f: the MPO tensors train at lr x %.4f", self.prefix, amplification,
                     1.0 / amplification)
        ratio = self.hparams.get("align_weight_ratio")
        if ratio is not None:
            if torch.isnan(self.align_weight_measured):
                self.align_weight_measured.fill_(self._measure_align_weight(float(ratio)))
            self.loss.weights["align"] = float(self.align_weight_measured)
            extra["opdf/align_weight"] = self.loss.weights["align"]
            log.info("%salignment weight %.4g: its gradient starts at %g x the rest of the gradient on the MPO "
                     "tensors", self.prefix, self.loss.weights["align"], ratio)
        metrics = {f"{self.prefix}{k}": v for k, v in extra.items()}
        for optimizer in self.trainer.optimizers:
            metrics.update({f"{self.prefix}{k}": v for k, v in describe_groups(optimizer).items()})
            log.info("%sparameter groups: %s", self.prefix, ", ".join(
                f"{g.get('name')} lr={g['lr']:.3g} wd={g.get('weight_decay', 0):g} "
                f"({sum(p.numel() for p in g['params']):,} params)" for g in optimizer.param_groups))
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.global_step)

    def _measure_step_amplification(self) -> float:
        from opdf_exp.mpo import step_amplification

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            batch = next(iter(self.trainer.train_dataloader))  # the job's own first batch; the RNG is left as it was
        batch = self.transfer_batch_to_device(batch, self.device, 0)

        def task_loss(model: nn.Module) -> torch.Tensor:
            outputs = self.student_adapter.run(model, batch, False)
            return self.loss.task_term(DistillContext(student=outputs, labels=batch["labels"]))

        value = torch.tensor(step_amplification(self.student, task_loss), device=self.device, dtype=torch.float64)
        return float(self.trainer.strategy.reduce(value, reduce_op="mean"))  # one rate for every rank

    def _measure_align_weight(self, ratio: float) -> float:
        """λ such that, on the job's first batch, ||λ grad(alignment)|| = ratio x ||grad(the other terms)|| over
        the MPO tensors. Gradients are taken with autograd.grad (no .grad is touched) under a forked RNG."""
        from opdf_exp.mpo.layers import MPO_LAYER_TYPES

        tensors = [t for m in self.student.modules() if isinstance(m, MPO_LAYER_TYPES) for t in m.tensors
                   if t.requires_grad]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            batch = next(iter(self.trainer.train_dataloader))
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            weights = dict(self.loss.weights)
            self.loss.weights["align"] = 0.0
            try:
                self._start_training_forward(batch["labels"].shape[0])
                rest, _ = self.loss(self._context(batch))
            finally:
                self.loss.weights.update(weights)
            rest_grads = torch.autograd.grad(rest, tensors, allow_unused=True)
            align_grads = torch.autograd.grad(self.loss.terms["align"].alignment(), tensors, allow_unused=True)

        def norm(grads):
            return sum(float(g.float().square().sum()) for g in grads if g is not None) ** 0.5

        rest_norm, align_norm = norm(rest_grads), norm(align_grads)
        values = torch.tensor([rest_norm, align_norm], device=self.device, dtype=torch.float64)
        rest_norm, align_norm = (float(v) for v in self.trainer.strategy.reduce(values, reduce_op="mean"))
        if align_norm <= 0:
            raise ConfigError("decomposition.align.weight=auto: the alignment gradient is 0 at the start (every "
                              "target equals the student's starting tensor); use align.layer_map=public or "
                              "preceding, or a fixed weight")
        return ratio * rest_norm / align_norm

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Every ``log_every_n_steps``: ``train/align_grad_ratio``, the norm of the tensor-alignment gradient over
        the norm of the rest of the gradient on the MPO tensors, so any run shows whether the term acts."""
        weight = self.loss.weights.get("align", 0.0)
        every = max(int(getattr(self.trainer, "log_every_n_steps", 50) or 50), 1)
        if weight <= 0 or self.global_step % every:
            return
        ratio = alignment_gradient_ratio(self.loss.terms["align"].alignment, weight, self.student)
        if ratio is not None:
            self.log(f"{self.prefix}train/align_grad_ratio", ratio, batch_size=1)

    # -- checkpoints hold the student (and loss projections), never the frozen teacher nor the training model
    rebuilt_by_runner = ("teacher", "train_model")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.split(".", 1)[0] not in self.rebuilt_by_runner}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Live values fill the keys left out; the training model's aliases of student parameters are loaded after
        # the student's own keys (module order), from the same storage, so they end up with the checkpoint's values.
        for name in self.rebuilt_by_runner:
            module = getattr(self, name, None)
            if module is not None:
                checkpoint["state_dict"].update({f"{name}.{k}": v for k, v in module.state_dict().items()
                                                 if f"{name}.{k}" not in checkpoint["state_dict"]})
