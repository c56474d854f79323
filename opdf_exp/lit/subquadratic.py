"""The three training stages of Transformer -> subquadratic distillation (arXiv 2504.14366 v2, MOHAWK-style;
notes/subquadratic.md §4) as LightningModules. Trainers come from ``runner/trainer.py::build_trainer``.

1. ``AttentionTransferModule``: per layer, teacher-forced: the mixer of student layer l reads the teacher's
   normalised hidden state entering layer l; ``target="matrix"`` regresses its materialised (B, H, T, T) mixing
   matrix on the teacher's eager attention probabilities, ``target="output"`` its output on the teacher's
   attention output (after ``o_proj``, before the residual). Only mixer parameters train.
2. ``HiddenAlignmentModule``: per layer, the whole student layer reads the teacher's hidden state h_l and matches
   h_{l+1} with the un-squared L2 norm per token (mean over real tokens); the last target is the residual stream
   before the final norm.
3. ``EndToEndKDModule``: CE on the next token + KL(teacher || student) over the vocabulary at temperature T,
   plus, for an MPO-over-parameterized student (OPDF), an optional tensor-alignment term (``align``).

Why manual optimisation in stages 1 and 2: layers are independent given the teacher's activations, so each
layer's loss is back-propagated as soon as it is computed; only one layer's activations (teacher and student)
are alive at a time, which is what makes these stages cheap at depth 30.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.distill.adapters import check_chunkable, hidden_and_head, model_logits
from opdf_exp.distill.lm_objectives import DIVERGENCES, LMObjective, chunked_lm_loss, lm_loss
from opdf_exp.distill.sparse_targets import SparseTargets, sparse_forward_kl
from opdf_exp.errors import ConfigError
from opdf_exp.subquadratic.attention_cache import AttentionIO
from opdf_exp.subquadratic.teacher_forcing import TeacherWalk, causal_mask_4d, teacher_attention  # noqa: F401
from opdf_exp.utils.optim import adamw, fused_for, with_schedule

TARGETS = ("matrix", "output")
KL_REDUCTIONS = ("token_mean", "batchmean")


def _batch_size(batch: dict) -> int:
    """Rows of a batch: token blocks (``input_ids``) or cached rows (``index``)."""
    return (batch["input_ids"] if "input_ids" in batch else batch["index"]).shape[0]


def logged_terms(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Loss terms as logged: detached, forward KL under its historical name ``kl``."""
    return {("kl" if name == "forward_kl" else name): value.detach() for name, value in values.items()}


def token_weights(attention_mask: torch.Tensor | None, shape) -> torch.Tensor:
    return torch.ones(shape) if attention_mask is None else attention_mask.to(torch.float32)


# ---------------------------------------------------------------------------------------------- the modules
class _StageModule(pl.LightningModule):
    """Shared by the stages: a frozen teacher (never in checkpoints), the student, AdamW with a schedule over
    the parameters this stage trains (``trainable_parameters``), losses logged as ``{prefix}{split}/loss``."""

    manual = False
    # tensors passed in, never hyperparameters: saving them would write the cached activations or teacher
    # targets (hundreds of MB) into every logger's hparams.yaml and every checkpoint
    DATA_ARGS = ("activations", "val_activations", "teacher_targets")

    def __init__(self, student: nn.Module, teacher: nn.Module, *, lr: float = 2e-4, weight_decay: float = 0.1,
                 betas=(0.9, 0.95), warmup_ratio: float = 0.1, scheduler: str = "cosine", min_lr_ratio: float = 0.0,
                 decay_ratio: float = 0.1, gradient_clip: float = 1.0, log_prefix: str = "",
                 mpo_lr_scale: float = 1.0, mpo_weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher", "align", *self.DATA_ARGS])
        self.student, self.teacher = student, teacher
        teacher.eval().requires_grad_(False)
        if self.manual:
            self.automatic_optimization = False

    def train(self, mode: bool = True):
        """Lightning switches the whole module to train mode at fit start; the teacher must stay in eval."""
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.student.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self.trainable_parameters()
        if not params:
            raise ConfigError(f"{type(self).__name__}: nothing to train (every parameter is frozen)")
        optimizer = adamw([self.student], hp.lr, hp.weight_decay, tuple(hp.betas), fused_for(self),
                          mpo_lr_scale=float(hp.get("mpo_lr_scale", 1.0)), mpo_weight_decay=hp.get("mpo_weight_decay", 0.0),
                          only=params)  # the same roles as the distillation task's, restricted to this stage
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return with_schedule(optimizer, int(hp.warmup_ratio * total), total, hp.scheduler, hp.min_lr_ratio,
                             hp.decay_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})

    def _log(self, split: str, value: torch.Tensor, batch_size: int, **extra) -> None:
        p = self.hparams.log_prefix
        self.log(f"{p}{split}/loss", value, prog_bar=True, batch_size=batch_size, on_step=split == "train",
                 on_epoch=split != "train")
        for k, v in extra.items():
            self.log(f"{p}{split}/{k}", v, batch_size=batch_size, on_step=split == "train", on_epoch=split != "train")

    # -- layer-wise stages: one backward per layer (manual optimisation)
    def _backward(self, loss: torch.Tensor) -> None:
        """Lightning's ``manual_backward`` inside a fit (precision plugins, DDP); plain backward outside one."""
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def layer_losses(self, batch, backward: bool) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        if not self.manual:
            raise NotImplementedError
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad(set_to_none=True)
        total = self.layer_losses(batch, backward=True)
        if self.hparams.gradient_clip:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.hparams.gradient_clip)
        opt.step()
        sched.step()
        self._log("train", total, _batch_size(batch))
        return None

    def validation_step(self, batch, batch_idx):
        with torch.no_grad():
            total = self.layer_losses(batch, backward=False)
        self._log("val", total, _batch_size(batch))


class AttentionTransferModule(_StageModule):
    """Stage 1 (see the module docstring); ``target`` is ``matrix`` or ``output``; losses are MSE summed over
    the mixer layers.

    With ``activations`` (an ``AttentionIO`` of the stage's blocks, collected once), batches are ``{"index": (B,)}``
    rows of that cache and no step walks the teacher: every mixer reads its cached input and regresses on the
    cached attention output. ``val_activations`` does the same for validation and for the per-layer error
    curve: every ``curve_every`` steps (and before the first), each layer's relative attention-output error
    ||y - a||^2 / ||a||^2 on the held-out blocks is appended to ``self.curve``."""

    manual = True

    COPIED = ("q_proj.", "k_proj.", "v_proj.", "o_proj.")  # what QKV copying fills from the teacher's attention

    def __init__(self, student, teacher, *, target: str = "output", freeze_copied: bool = False,
                 activations: AttentionIO | None = None, val_activations: AttentionIO | None = None,
                 curve_every: int = 0, **optim):
        """``freeze_copied=True`` keeps the copied q/k/v/o projections fixed and trains only what the mixer adds
        (feature maps, gates, decays, norms, convolutions), as LoLCATs' attention transfer does."""
        if target not in TARGETS:
            raise ConfigError(f"stage-1 target={target!r} is unknown; use one of {list(TARGETS)}")
        self.freeze_copied = bool(freeze_copied)
        mixers = student.mixers()
        if not mixers:
            raise ConfigError("stage 1 (attention transfer) needs token-mixer layers; this student has none")
        if target == "matrix":
            no_matrix = sorted({type(m).name for m in mixers.values() if not m.matrix_form})
            if no_matrix:
                raise ConfigError(f"target=matrix needs a mixing-matrix form, which {', '.join(no_matrix)} lacks "
                                  f"(e.g. metala with self_augmentation); use target=output")
        for label, io in (("activations", activations), ("val_activations", val_activations)):
            if io is not None and set(io.layers) != set(mixers):
                raise ConfigError(f"stage 1: the cached {label} hold layers {io.layers}, the student's mixers are "
                                  f"{sorted(mixers)}; collect them for the mixer layers")
        super().__init__(student, teacher, **optim)
        self.target = target
        self.mixer_layers = mixers
        self.activations, self.val_activations = activations, val_activations
        self.curve_every = int(curve_every or 0)
        self.curve: list[dict] = []

    # -- the cached path
    def _cached_layer_loss(self, idx: int, io: AttentionIO, index: torch.Tensor) -> torch.Tensor:
        """One layer's loss on cached activations (full blocks: no padding)."""
        mixer = self.mixer_layers[idx]
        device, dtype = mixer.output_projection.weight.device, mixer.output_projection.weight.dtype
        x, target = io.batch(idx, index.cpu(), dtype, device)  # (B, T, D) each
        rotary = tuple(t.to(device) for t in io.rotary(x.shape[0], dtype))
        if self.target == "matrix":
            layer = self.teacher.model.layers[idx]
            with torch.no_grad():
                mask4d = causal_mask_4d(None, x.shape[0], x.shape[1], dtype, device)
                _, probs = teacher_attention(layer.self_attn, x, rotary, mask4d, True)  # (B, H, T, T)
            m = mixer.materialize(x, rotary=rotary if mixer.rope else None)  # (B, H, T, T), zero above the diagonal
            return ((m - probs) ** 2).mean()  # as the walked loss: a mean over all B x H x T x T entries
        y = mixer(x, rotary=rotary if mixer.rope else None)
        return ((y - target) ** 2).mean()

    def cached_losses(self, index: torch.Tensor, io: AttentionIO, backward: bool) -> torch.Tensor:
        total = torch.zeros(())
        for idx in self.mixer_layers:
            with torch.set_grad_enabled(backward):
                loss = self._cached_layer_loss(idx, io, index)
                if backward:
                    self._backward(loss)
            total = total + loss.detach().cpu()
        return total

    @torch.no_grad()
    def layer_errors(self, io: AttentionIO, batch_size: int = 8) -> dict[int, float]:
        """Per mixer layer, ||mixer(x) - a||^2 / ||a||^2 over every block of ``io`` (eval mode)."""
        was_training = self.student.training
        self.student.eval()
        out = {}
        for idx, mixer in self.mixer_layers.items():
            err = ref = 0.0
            for start in range(0, io.num_blocks, batch_size):
                index = torch.arange(start, min(start + batch_size, io.num_blocks))
                device, dtype = mixer.output_projection.weight.device, mixer.output_projection.weight.dtype
                x, target = io.batch(idx, index, dtype, device)
                rotary = tuple(t.to(device) for t in io.rotary(x.shape[0], dtype))
                y = mixer(x, rotary=rotary if mixer.rope else None)
                err += (y - target).pow(2).sum().item()
                ref += target.pow(2).sum().item()
            out[idx] = err / max(ref, 1e-30)
        self.student.train(was_training)
        return out

    def _record_curve(self, log: bool = False) -> None:
        if not self.curve_every or self.val_activations is None:
            return
        step = int(self.trainer.global_step) if self._trainer is not None else len(self.curve)
        if self.curve and self.curve[-1]["step"] == step:
            return
        errors = self.layer_errors(self.val_activations)
        self.curve.append({"step": step, "errors": errors})
        mean = sum(errors.values()) / len(errors)
        if log:  # Lightning allows logging from the batch hooks only
            self.log(f"{self.hparams.log_prefix}val/layer_err_mean", mean, on_step=True, on_epoch=False)

    def on_train_start(self) -> None:
        self._record_curve()  # the error right after conversion (and calibration)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.curve_every and self.trainer.global_step % self.curve_every == 0:
            self._record_curve(log=True)

    def on_train_end(self) -> None:
        self._record_curve()

    def trainable_parameters(self):
        params = [p for m in self.mixer_layers.values() for name, p in m.named_parameters()
                  if p.requires_grad and not (self.freeze_copied and name.startswith(self.COPIED))]
        if not params:
            families = sorted({type(m).name for m in self.mixer_layers.values()})
            raise ConfigError(f"stage 1 with freeze_copied=true has nothing to train: {', '.join(families)} adds no "
                              "parameters of its own here (e.g. use feature_map=hedgehog, or freeze_copied=false)")
        return params

    def layer_losses(self, batch, backward):
        """Training batches of cached rows read ``activations``, validation ones ``val_activations``; batches of
        tokens walk the teacher."""
        if "index" in batch:
            return self.cached_losses(batch["index"], self.activations if backward else self.val_activations,
                                      backward)
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        walk = TeacherWalk(self.teacher, ids, mask)
        pad = None if mask is None or bool(mask.all()) else mask
        w = token_weights(mask, ids.shape).to(walk.hidden.device)
        hidden, total = walk.hidden, torch.zeros((), device=walk.hidden.device)
        for idx, layer in enumerate(self.teacher.model.layers):
            if idx in self.mixer_layers:
                with torch.no_grad():
                    x = layer.input_layernorm(hidden)
                    target, probs = teacher_attention(layer.self_attn, x, walk.position_embeddings, walk.mask4d,
                                                      self.target == "matrix")
                mixer = self.mixer_layers[idx]
                with torch.set_grad_enabled(backward):
                    rotary = walk.position_embeddings if mixer.rope else None
                    if self.target == "matrix":
                        m = mixer.materialize(x, pad, rotary=rotary)  # (B, H, T, T)
                        keep = (w[:, None, :, None] * w[:, None, None, :])  # (B, 1, T, T): real query & key
                        loss = ((m - probs) ** 2 * keep).sum() / (keep.sum() * m.shape[1]).clamp_min(1)
                    else:
                        y = mixer(x, pad, rotary=rotary)  # (B, T, D)
                        loss = (((y - target) ** 2).mean(-1) * w).sum() / w.sum().clamp_min(1)
                    if backward:
                        self._backward(loss)
                total = total + loss.detach()
            hidden = walk.layer_output(idx, hidden)
        return total


class HiddenAlignmentModule(_StageModule):
    """Stage 2 (see the module docstring): every student layer trains on the teacher's h_l -> h_{l+1}."""

    manual = True

    def layer_losses(self, batch, backward):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        walk = TeacherWalk(self.teacher, ids, mask)
        w = token_weights(mask, ids.shape).to(walk.hidden.device)
        kwargs = {} if mask is None or bool(mask.all()) else {"mixer_padding_mask": mask}
        hidden, total = walk.hidden, torch.zeros((), device=walk.hidden.device)
        for idx, layer in enumerate(self.student.model.layers):
            target = walk.layer_output(idx, hidden)  # h_{l+1}; for the last layer: before the final norm
            with torch.set_grad_enabled(backward):
                out = layer(hidden, attention_mask=walk.mask4d, position_embeddings=walk.position_embeddings,
                            **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = ((out - target).norm(dim=-1) * w).sum() / w.sum().clamp_min(1)  # un-squared L2 per token
                if backward and loss.requires_grad:
                    self._backward(loss)
            total = total + loss.detach()
            hidden = target
        return total


def kd_losses(student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor,
              attention_mask: torch.Tensor | None, temperature: float = 1.0,
              kl_reduction: str = "token_mean") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE on the next token, KL(teacher || student) * T^2, token count) over real tokens.

    ``kl_reduction="token_mean"`` (default) averages KL over real predicted tokens, like the CE, so the 1:1
    weights mean what they say. ``"batchmean"`` reproduces the authors' public code
    (``kl_div(..., reduction="batchmean")`` on (B, T, V)): KL summed over positions and divided by the batch
    size only, which weights KL about T times more than CE.
    """
    if kl_reduction not in KL_REDUCTIONS:
        raise ConfigError(f"kl_reduction={kl_reduction!r} is unknown; use one of {list(KL_REDUCTIONS)}")
    s, t = student_logits[:, :-1].float(), teacher_logits[:, :-1].float()  # (B, T-1, V): predict token i+1
    labels = input_ids[:, 1:]
    w = torch.ones_like(labels, dtype=torch.float32) if attention_mask is None else \
        (attention_mask[:, 1:] * attention_mask[:, :-1]).float()  # (B, T-1): both tokens real
    n = w.sum().clamp_min(1)
    ce = (F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="none").view_as(w) * w).sum() / n
    log_p_s = F.log_softmax(s / temperature, -1)
    log_p_t = F.log_softmax(t / temperature, -1)
    kl_tok = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * w  # (B, T-1)
    kl = kl_tok.sum() / (n if kl_reduction == "token_mean" else labels.shape[0])
    return ce, kl * temperature ** 2, n


class EndToEndKDModule(_StageModule):
    """Stage 3: ``ce_weight * CE + kl_weight * KL [+ align_weight * align()]``; ``freeze`` names parts that stay
    fixed (``mlp``, ``embeddings``, ``head``, ``norms``). ``align`` is a parameter-free module returning a scalar
    from the student's live parameters (OPDF's ``TensorAlignmentLoss``); it is logged as ``align``."""

    FREEZABLE = ("mlp", "embeddings", "head", "norms")

    def __init__(self, student, teacher, *, ce_weight: float = 1.0, kl_weight: float = 1.0,
                 temperature: float = 1.0, kl_reduction: str = "token_mean", divergence: str = "forward_kl",
                 beta: float = 0.5, chunk_size: int | None = None, on_policy: float = 0.0,
                 on_policy_prompt: float = 0.5, on_policy_temperature: float = 1.0, freeze=(),
                 align: nn.Module | None = None, align_weight: float = 0.0,
                 teacher_targets: SparseTargets | None = None, **optim):
        """``teacher_targets``: the teacher's sparse (sampled or top-k) distributions of the training blocks,
        looked up by ``batch["block_index"]`` instead of running the teacher (distill/sparse_targets.py);
        validation still runs the teacher."""
        unknown = sorted(set(freeze) - set(self.FREEZABLE))
        if unknown:
            raise ConfigError(f"stage-3 freeze has {unknown}; freezable parts: {list(self.FREEZABLE)}")
        if kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"kl_reduction={kl_reduction!r} is unknown; use one of {list(KL_REDUCTIONS)}")
        if divergence not in DIVERGENCES:
            raise ConfigError(f"stage-3 divergence={divergence!r} is unknown; use one of {', '.join(DIVERGENCES)}")
        if kl_reduction == "batchmean" and (divergence != "forward_kl" or chunk_size is not None):
            raise ConfigError("kl_reduction=batchmean (the authors' code) is defined for forward_kl on whole logits "
                              "only; use kl_reduction=token_mean with other divergences or chunk_size")
        if chunk_size is not None:
            check_chunkable(student, "student")
            check_chunkable(teacher, "teacher")
        s_vocab, t_vocab = student.get_output_embeddings().weight.shape[0], \
            teacher.get_output_embeddings().weight.shape[0]
        if s_vocab != t_vocab:
            raise ConfigError(f"the student's vocabulary ({s_vocab} tokens) differs from the teacher's ({t_vocab}); "
                              "token-level distillation needs one vocabulary (cross-tokenizer distillation is out "
                              "of scope here)")
        if not 0.0 <= float(on_policy) <= 1.0:
            raise ConfigError(f"on_policy={on_policy} is the share of on-policy batches (GKD's lambda); use a value "
                              "in [0, 1]")
        if on_policy > 0:
            if not callable(getattr(student, "generate", None)) or not hasattr(student, "generation_config"):
                raise ConfigError(f"on_policy={on_policy} needs a student that generates; {type(student).__name__} "
                                  "has no generate(); set on_policy=0")
            if not 0.0 < float(on_policy_prompt) < 1.0:
                raise ConfigError(f"on_policy_prompt={on_policy_prompt} is the share of each block used as the "
                                  "prompt; use a value in (0, 1)")
            if not kl_weight > 0:
                raise ConfigError("on_policy > 0 needs kl_weight > 0: on the student's own samples only the "
                                  "divergence to the teacher is a target")
            if not float(on_policy_temperature) > 0:
                raise ConfigError(f"on_policy_temperature={on_policy_temperature} must be > 0")
        if teacher_targets is not None:
            why = ("divergence=" + divergence if divergence != "forward_kl" else "on_policy > 0" if on_policy > 0
                   else f"chunk_size={chunk_size}" if chunk_size is not None
                   else "kl_reduction=batchmean" if kl_reduction == "batchmean" else None)
            if why:
                raise ConfigError(f"a {teacher_targets.kind} teacher cache estimates forward KL on whole student "
                                  f"logits only, not with {why}; set teacher_cache=null or change that option")
            if teacher_targets.temperature != float(temperature):
                raise ConfigError(f"the teacher cache was built at temperature {teacher_targets.temperature}, stage 3 "
                                  f"distils at {temperature}; rebuild it with the stage's temperature")
        self.teacher_targets = teacher_targets
        # kl_weight weighs the chosen divergence (forward KL by default, as before)
        self.objective = LMObjective({"ce": ce_weight, divergence: kl_weight}, temperature=temperature, beta=beta,
                                     chunk_size=chunk_size)
        super().__init__(student, teacher, **optim)
        self.frozen = tuple(freeze)
        self.divergence = divergence
        self.align = align if align is not None and align_weight > 0 else None

    def trainable_parameters(self):
        def frozen(name: str) -> bool:
            return (("mlp" in self.frozen and ".mlp." in name)
                    or ("embeddings" in self.frozen and "embed_tokens" in name)
                    or ("head" in self.frozen and name.startswith("lm_head"))
                    or ("norms" in self.frozen and "norm" in name.rsplit(".", 2)[-2]))
        return [p for n, p in self.student.named_parameters() if p.requires_grad and not frozen(n)]

    def _objective_losses(self, ids, mask, predict_from: int = 0,
                          objective: LMObjective | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The LM objective over the predicting positions from ``predict_from`` on: whole logits, or chunked
        through the LM heads (no batch x tokens x vocab tensor) when ``chunk_size`` is set."""
        labels = ids[:, 1:].reshape(-1)
        weights = (torch.ones_like(ids[:, 1:], dtype=torch.float32) if mask is None else
                   (mask[:, 1:] * mask[:, :-1]).float())  # (B, T-1): both tokens real
        weights[:, : max(predict_from, 0)] = 0.0
        weights = weights.reshape(-1)
        objective = objective or self.objective
        if objective.chunk_size is None:
            teacher = None
            if objective.needs_teacher:
                with torch.no_grad():
                    teacher = model_logits(self.teacher, input_ids=ids, attention_mask=mask, use_cache=False)
                teacher = teacher[:, :-1].flatten(0, 1)  # (B*(T-1), V)
            s = model_logits(self.student, input_ids=ids, attention_mask=mask, use_cache=False)
            return lm_loss(s[:, :-1].flatten(0, 1), teacher, labels, weights, objective)
        t_hidden, t_head = None, None
        if objective.needs_teacher:
            with torch.no_grad():
                t_hidden, t_head = hidden_and_head(self.teacher, input_ids=ids, attention_mask=mask)
            t_hidden = t_hidden[:, :-1].flatten(0, 1)  # (B*(T-1), D_teacher)
        s_hidden, s_head = hidden_and_head(self.student, input_ids=ids, attention_mask=mask)
        return chunked_lm_loss(s_hidden[:, :-1].flatten(0, 1), s_head.weight, s_head.bias, labels, weights,
                               objective, (lambda a, b: t_head(t_hidden[a:b])) if t_hidden is not None else None)

    def _sparse_target_losses(self, ids, mask, index) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """CE + kl_weight * forward KL estimated from the cached sparse teacher targets of blocks ``index``."""
        hp, cached = self.hparams, self.teacher_targets
        labels = ids[:, 1:].reshape(-1)
        weights = (torch.ones_like(ids[:, 1:], dtype=torch.float32) if mask is None else
                   (mask[:, 1:] * mask[:, :-1]).float()).reshape(-1)            # (B*(T-1),)
        s = model_logits(self.student, input_ids=ids, attention_mask=mask, use_cache=False)[:, :-1].flatten(0, 1)
        n = weights.sum().clamp_min(1)
        ce = (F.cross_entropy(s.float(), labels, reduction="none") * weights).sum() / n
        index = index.cpu()
        probs = None if cached.probs is None else cached.probs[index].flatten(0, 1).to(s.device)
        kd, kl = sparse_forward_kl(s, cached.ids[index].flatten(0, 1).to(s.device), weights,
                                   cached.entropy[index].flatten(0, 1).to(s.device), probs, cached.temperature)
        return hp.ce_weight * ce + hp.kl_weight * kd, {"ce": ce, "forward_kl": kl}

    def _losses(self, batch):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        hp = self.hparams
        if self.teacher_targets is not None and "block_index" in batch:
            total, values = self._sparse_target_losses(ids, mask, batch["block_index"])
        elif hp.kl_reduction == "batchmean":  # the authors' reduction, kept for reproduction
            with torch.no_grad():
                t = model_logits(self.teacher, input_ids=ids, attention_mask=mask, use_cache=False)
            s = model_logits(self.student, input_ids=ids, attention_mask=mask, use_cache=False)
            ce, kl, _ = kd_losses(s, t, ids, mask, hp.temperature, hp.kl_reduction)
            values = {"ce": ce, "forward_kl": kl}
            total = hp.ce_weight * ce + hp.kl_weight * kl
        else:
            total, values = self._objective_losses(ids, mask)
        extra = logged_terms(values)
        if self.align is not None:
            align = self.align()
            total = total + hp.align_weight * align
            extra["align"] = align.detach()
        return total, extra

    # -- on-policy distillation (GKD): the student's own continuations, scored by the teacher
    def on_policy_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` trains on the student's own samples: a coin of probability
        ``on_policy`` drawn from the step number alone, so a resumed run makes the same draws."""
        share = float(self.hparams.get("on_policy", 0.0))
        if share <= 0:
            return False
        coin = torch.Generator().manual_seed(0x5EED + int(step))
        return bool(torch.rand((), generator=coin).item() < share)

    def generate_continuations(self, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """``(sequences [B, T], prompt length)``: each block's first ``on_policy_prompt`` share as the prompt, the
        rest sampled from the student (its own generate with the mixers' fixed-size state; batched; every
        sequence the block's length: EOS is not allowed to end it early)."""
        hp = self.hparams
        length = ids.shape[1]
        prompt = min(max(int(round(length * hp.on_policy_prompt)), 1), length - 1)
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                sequences = self.student.generate(
                    input_ids=ids[:, :prompt], attention_mask=None if mask is None else mask[:, :prompt],
                    max_new_tokens=length - prompt, min_new_tokens=length - prompt, do_sample=True,
                    temperature=float(hp.on_policy_temperature), top_k=0, top_p=1.0,
                    pad_token_id=self.student.generation_config.eos_token_id or 0)
        finally:
            self.student.train(was_training)
        return sequences[:, :length], prompt

    def _on_policy_losses(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The divergence terms on the student's continuations (the CE on its own samples is no target)."""

        ids, mask = batch["input_ids"], batch.get("attention_mask")
        started = time.perf_counter()
        sequences, prompt = self.generate_continuations(ids, mask)
        seconds = time.perf_counter() - started
        sequence_mask = None if mask is None else torch.cat(
            [mask[:, :prompt], torch.ones_like(mask[:, prompt:])], 1)
        objective = dataclasses.replace(self.objective, terms={k: (0.0 if k == "ce" else w)
                                                               for k, w in self.objective.terms.items()})
        total, values = self._objective_losses(sequences, sequence_mask, predict_from=prompt - 1,
                                               objective=objective)
        extra = logged_terms(values)
        extra["generation_s"] = torch.tensor(seconds)
        return total, extra

    def training_step(self, batch, batch_idx):
        on_policy = self.on_policy_step(self.global_step)
        if on_policy:
            total, extra = self._on_policy_losses(batch)
            if self.align is not None:
                align = self.align()
                total = total + self.hparams.align_weight * align
                extra["align"] = align.detach()
        else:
            total, extra = self._losses(batch)
        if float(self.hparams.get("on_policy", 0.0)) > 0:
            extra["on_policy"] = torch.tensor(float(on_policy))  # its mean over steps is the on-policy share
        self._log("train", total, batch["input_ids"].shape[0], **extra)
        return total

    def validation_step(self, batch, batch_idx):
        total, extra = self._losses(batch)
        self._log("val", total, batch["input_ids"].shape[0], **extra)
