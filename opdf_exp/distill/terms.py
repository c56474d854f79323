"""Loss terms. Each is an ``nn.Module`` mapping a :class:`DistillContext` to an unweighted scalar.

Terms say what they need (teacher outputs, hidden states, module taps) so the LightningModule runs only the
forward passes that are required. ``setup(student, teacher)`` lets a term size itself from the models
(projection widths, layer maps) once they exist.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.errors import ConfigError


class LossTerm(nn.Module):
    needs_teacher = False
    needs_hidden_states = False
    classification_only = False  # True: refused on a regression task (one output) before training
    student_paths: list[str] = []
    teacher_paths: list[str] = []

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Size the term from the models; called once before training."""

    @property
    def teacher_hidden_layers(self) -> tuple[int, ...] | None:
        """Indices of the teacher hidden states the term reads (so the teacher-output cache stores only those);
        ``None`` for a term that reads hidden states without saying which (the teacher then runs live)."""
        return None if self.needs_hidden_states else ()


class TaskLoss(LossTerm):
    """Cross-entropy on the labels, or MSE when the head has one output (regression, e.g. STS-B).

    Labels may be class ids ``[B]`` or class probabilities ``[B, C]`` (mixup / cutmix batches).
    ``label_smoothing`` is the DeiT / TinyViT recipes' 0.1 (applied to class-id labels; mixup's soft labels carry
    their own smoothing).
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ConfigError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)

    def forward(self, ctx) -> torch.Tensor:
        logits = ctx.student.logits
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1).float(), ctx.labels.float())
        if ctx.labels.dim() == logits.dim() and ctx.labels.is_floating_point():  # soft targets (mixup)
            return torch.sum(-ctx.labels.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(logits.float(), ctx.labels, label_smoothing=self.label_smoothing)


class HardDistillation(LossTerm):
    """DeiT's hard-label distillation (Touvron et al. 2021): cross-entropy of the student on the teacher's argmax.

    With a DeiT distilled student the term reads its distillation-token head (``dist_logits``) while the task term
    trains the class-token head, as in the paper (``L = ½ CE(y) + ½ CE(argmax teacher)``: set both weights to
    0.5); a student with one head gets both terms on the same logits.
    """

    needs_teacher = True
    classification_only = True

    def forward(self, ctx) -> torch.Tensor:
        student = ctx.student.dist_logits if getattr(ctx.student, "dist_logits", None) is not None \
            else ctx.student.logits
        target = ctx.teacher.logits.argmax(-1)
        if student.dim() == 3:  # token-level logits: real tokens only
            keep = ctx.attention_mask.bool() if ctx.attention_mask is not None else torch.ones_like(target, dtype=torch.bool)
            return F.cross_entropy(student[keep].float(), target[keep])
        return F.cross_entropy(student.float(), target)


class LogitKL(LossTerm):
    """KL(teacher || student) on temperature-softened logits, mean over examples, or over non-padding tokens for
    token-level logits (Hinton et al. 2015).

    ``t2_scaling`` multiplies by T^2 so the soft-target gradients keep their size as T grows (Hinton's choice;
    the LGTM/OPDF code omits it). With a single logit (regression) softmax is constant and KL is identically zero
    (the LGTM STS-B bug), so this term falls back to MSE between the logits and warns once; with
    ``regression_fallback=false`` it is classification-only and a regression task refuses it before training.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 1.0, t2_scaling: bool = True, regression_fallback: bool = True):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature} must be > 0")
        self.temperature = float(temperature)
        self.t2_scaling = bool(t2_scaling)
        self.regression_fallback = bool(regression_fallback)
        self._warned = False

    @property
    def classification_only(self) -> bool:
        return not self.regression_fallback

    def forward(self, ctx) -> torch.Tensor:
        student, teacher = ctx.student.logits, ctx.teacher.logits
        if student.shape[-1] == 1 and teacher.shape[-1] == 1:
            if not self._warned:
                warnings.warn("single-logit head: logit KL is identically zero, using MSE between logits instead")
                self._warned = True
            return F.mse_loss(student.float(), teacher.float())
        mask = ctx.attention_mask if student.dim() == 3 else None  # token-level logits: padding does not count
        return soft_target_kl(student, teacher, self.temperature, mask, self.t2_scaling)


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                   mask: torch.Tensor | None = None, t2_scaling: bool = True) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) per position, averaged over positions (times T^2 if asked).

    Logits are [..., classes]; every leading index is a position (an example, or a token of a sequence), so the
    value does not change with sequence length or batch size. ``mask`` (the leading shape) selects the positions
    that count. PyTorch's ``batchmean`` on [batch, seq, vocab] would instead sum over the sequence.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ConfigError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                          f"{tuple(teacher_logits.shape)} differ; give both the same labels (or vocabulary)")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_position = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if mask is not None:
        weights = mask.to(per_position.dtype)
        kl = (per_position * weights).sum() / weights.sum().clamp_min(1.0)
    else:
        kl = per_position.mean()
    return kl * (t * t) if t2_scaling else kl


def _masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over real (non-padding) tokens and features."""
    diff = (student.float() - teacher.float()) ** 2
    if mask is None or diff.dim() != 3:
        return diff.mean()
    weights = mask.to(diff.dtype).unsqueeze(-1)
    return (diff * weights).sum() / (weights.sum() * diff.shape[-1]).clamp_min(1.0)


def _projection(student_dim: int, teacher_dim: int, projection: bool | str, where: str) -> nn.Module:
    if projection == "auto":
        projection = student_dim != teacher_dim
    if projection:
        return nn.Linear(student_dim, teacher_dim)
    if student_dim != teacher_dim:
        raise ConfigError(f"{where}: student width {student_dim} != teacher width {teacher_dim}; "
                          f"set {where}.projection=true to learn a linear map")
    return nn.Identity()


class HiddenStateMSE(LossTerm):
    """MSE between student and teacher hidden states at mapped layers (FitNets / TinyBERT style).

    ``layer_map`` pairs hidden-state indices ``[[student, teacher], ...]`` where 0 is the embedding output and
    ``i`` the output of block ``i - 1``. ``"auto"`` maps the embeddings to each other and each student block to
    the teacher block it was initialised from (or a uniform spread). ``projection``: ``true``, ``false`` or
    ``"auto"`` (only when widths differ) learns one linear map per pair, applied to the student side.
    """

    needs_teacher = True
    needs_hidden_states = True

    def __init__(self, layer_map: str | Sequence[Sequence[int]] = "auto", projection: bool | str = "auto"):
        super().__init__()
        self.layer_map_spec = layer_map
        self.projection_spec = projection
        self.pairs: list[tuple[int, int]] = []
        self.prefix_tokens = (0, 0)  # (student, teacher): set by setup from timm models' num_prefix_tokens
        self.projections = nn.ModuleList()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        from opdf_exp.distill.adapters import adapter_for
        from opdf_exp.models.layers import uniform_layer_map

        if teacher is None:
            raise ConfigError("distill.terms.hidden needs a teacher")
        student_io, teacher_io = adapter_for(student), adapter_for(teacher)
        n_student, n_teacher = student_io.num_hidden(student), teacher_io.num_hidden(teacher)
        if self.layer_map_spec == "auto":
            origin = getattr(student, "distill_teacher_layers", None) or uniform_layer_map(n_student, n_teacher)
            pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(origin)]
        else:
            pairs = [(int(s), int(t)) for s, t in self.layer_map_spec]
        for s, t in pairs:
            if not (0 <= s <= n_student and 0 <= t <= n_teacher):
                raise ConfigError(f"distill.terms.hidden.layer_map pair [{s}, {t}] is out of range: hidden states run "
                                  f"0..{n_student} for the student and 0..{n_teacher} for the teacher")
        self.pairs = pairs
        # prefix tokens ([CLS], DeiT's distillation token, registers) come first in timm token states
        self.prefix_tokens = (int(getattr(student, "num_prefix_tokens", 0) or 0),
                              int(getattr(teacher, "num_prefix_tokens", 0) or 0))
        self.projections = nn.ModuleList(
            _projection(student_io.hidden_width(student, s), teacher_io.hidden_width(teacher, t), self.projection_spec,
                        "distill.terms.hidden") for s, t in pairs)

    @property
    def teacher_hidden_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t for _, t in self.pairs}))

    def forward(self, ctx) -> torch.Tensor:
        hs, ht = ctx.student.hidden_states, ctx.teacher.hidden_states
        losses = []
        for (s, t), proj in zip(self.pairs, self.projections):
            student, teacher = self._common_tokens(hs[s], ht[t], s, t)
            losses.append(_masked_mse(proj(student), teacher, ctx.attention_mask))
        return torch.stack(losses).mean()

    def _common_tokens(self, student: torch.Tensor, teacher: torch.Tensor, s: int, t: int):
        """Equal token counts pass through. Models with different prefix tokens (a DeiT distilled student of a ViT
        teacher: [CLS, DIST, patches] vs [CLS, patches]) compare their shared prefix tokens and all patches."""
        if student.shape[:-1] == teacher.shape[:-1]:
            return student, teacher
        ps, pt = self.prefix_tokens
        if student.dim() == 3 and student.shape[1] - ps == teacher.shape[1] - pt and ps != pt:
            keep = min(ps, pt)
            return (torch.cat([student[:, :keep], student[:, ps:]], 1), torch.cat([teacher[:, :keep], teacher[:, pt:]], 1))
        raise ConfigError(f"distill.terms.hidden pair [{s}, {t}]: student states {tuple(student.shape)} and teacher "
                          f"states {tuple(teacher.shape)} have different token counts; map layers of equal resolution "
                          "(layer_map) or give both models the same patch size and image size")


def patient_layer_map(num_student: int, num_teacher: int, strategy: str = "skip") -> list[tuple[int, int]]:
    """PKD's pairs of hidden-state indices ``(student, teacher)`` (index i = output of block i, 1-based).

    Patient-KD distils the student's M - 1 intermediate blocks (its last block is covered by the logit KD):
    ``skip`` pairs student block j with teacher block j·N/M (12 → 6: teacher 2, 4, 6, 8, 10), ``last`` with
    teacher block N - M + j (12 → 6: 7, 8, 9, 10, 11).
    """
    if strategy not in ("skip", "last"):
        raise ConfigError(f"PKD strategy={strategy!r} is unknown; use skip, last or an explicit layer_map")
    if num_student < 2 or num_student > num_teacher:
        raise ConfigError(f"PKD needs a student of 2..{num_teacher} blocks for a {num_teacher}-block teacher (it "
                          f"distils the student's intermediate blocks), got {num_student}; change student.num_layers")
    if strategy == "skip" and num_teacher % num_student:
        raise ConfigError(f"PKD strategy=skip needs the teacher's {num_teacher} blocks to be a multiple of the "
                          f"student's {num_student}; use strategy=last or an explicit layer_map [[student, teacher], ...]")
    if strategy == "skip":
        return [(j, j * num_teacher // num_student) for j in range(1, num_student)]
    return [(j, num_teacher - num_student + j) for j in range(1, num_student)]


class PatientCLSMSE(LossTerm):
    """Patient-KD's L_PT (Sun et al. 2019, "Patient Knowledge Distillation for BERT Model Compression").

    The mean squared difference of the L2-normalised [CLS] (first-token) hidden states of mapped blocks, averaged
    over examples, mapped blocks **and hidden units**: ``F.mse_loss`` of the stacked ``[B, pairs, d]`` states, as
    the public code (intersun/PKD-for-BERT-Model-Compression, ``src/KD_loss.py::patience_loss``) computes it. The
    paper writes a sum of squared distances, but its β grid {10, 100, 500, 1000} (and its best settings, e.g.
    SST-2 6-layer T 10, α 0.5, β 100) were found with this mean; a sum over d and the blocks would make the same
    β about d·(M-1) times stronger (3,840x for BERT-base, 6 layers). Normalising (``normalize``, the public
    ``--normalize_patience``; the paper's formula normalises) makes the term about direction only, so the student
    is not pushed to match the teacher's activation scale. ``strategy`` picks the paper's PKD-Skip or PKD-Last
    map; ``layer_map`` (``[[student, teacher], ...]``, block indices 1..M and 1..N) overrides it. Student and
    teacher widths must be equal (the paper distils a shallower copy of the teacher).
    """

    needs_teacher = True
    needs_hidden_states = True

    def __init__(self, strategy: str = "skip", layer_map: Sequence[Sequence[int]] | None = None,
                 normalize: bool = True):
        super().__init__()
        self.strategy = str(strategy)
        self.normalize = bool(normalize)
        self.layer_map_spec = layer_map
        self.pairs: list[tuple[int, int]] = []

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        from opdf_exp.distill.adapters import adapter_for

        if teacher is None:
            raise ConfigError("the PKD term needs a teacher")
        student_io, teacher_io = adapter_for(student), adapter_for(teacher)
        n_student, n_teacher = student_io.num_hidden(student), teacher_io.num_hidden(teacher)
        if self.layer_map_spec is None:
            self.pairs = patient_layer_map(n_student, n_teacher, self.strategy)
        else:
            self.pairs = [(int(s), int(t)) for s, t in self.layer_map_spec]
            bad = [[s, t] for s, t in self.pairs if not (1 <= s <= n_student and 1 <= t <= n_teacher)]
            if bad or not self.pairs:
                raise ConfigError(f"PKD layer_map {bad or '[]'} does not fit a {n_student}-block student and a "
                                  f"{n_teacher}-block teacher; give pairs [student 1..{n_student}, teacher "
                                  f"1..{n_teacher}] or layer_map=null with strategy=skip|last")
        d_student = student_io.hidden_width(student, self.pairs[0][0])
        d_teacher = teacher_io.hidden_width(teacher, self.pairs[0][1])
        if d_student != d_teacher:
            raise ConfigError(f"PKD compares [CLS] states of equal width; student {d_student} != teacher {d_teacher}: "
                              "use distill=kd_hidden (it learns a projection) for students of another width")

    def forward(self, ctx) -> torch.Tensor:
        hs, ht = ctx.student.hidden_states, ctx.teacher.hidden_states
        cls_s = torch.stack([hs[s][:, 0] for s, _ in self.pairs], dim=1).float()  # [B, pairs, d]: first tokens
        cls_t = torch.stack([ht[t][:, 0] for _, t in self.pairs], dim=1).float()
        if self.normalize:
            cls_s, cls_t = F.normalize(cls_s, dim=-1), F.normalize(cls_t, dim=-1)
        return F.mse_loss(cls_s, cls_t)


class ModuleOutputMSE(LossTerm):
    """MSE between outputs of arbitrary student and teacher modules named by path (captured with hooks).

    ``pairs``: ``[[student_module_path, teacher_module_path], ...]``. Works for any architecture, including
    timm models and subquadratic students, without rewriting their forward.
    """

    needs_teacher = True

    def __init__(self, pairs: Sequence[Sequence[str]], projection: bool | str = "auto"):
        super().__init__()
        if not pairs:
            raise ConfigError("distill.terms.features.pairs is empty; give [[student_path, teacher_path], ...]")
        self.pairs = [(str(s), str(t)) for s, t in pairs]
        self.student_paths = [s for s, _ in self.pairs]
        self.teacher_paths = [t for _, t in self.pairs]
        self.projection_spec = projection
        self.projections = nn.ModuleList()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ConfigError("distill.terms.features needs a teacher")
        self.projections = nn.ModuleList()
        for s, t in self.pairs:
            d_s, d_t = _output_width(student, s), _output_width(teacher, t)
            self.projections.append(_projection(d_s, d_t, self.projection_spec, "distill.terms.features"))

    def forward(self, ctx) -> torch.Tensor:
        losses = [_masked_mse(proj(ctx.student_features[s]), ctx.teacher_features[t], ctx.attention_mask)
                  for (s, t), proj in zip(self.pairs, self.projections)]
        return torch.stack(losses).mean()


def _output_width(model: nn.Module, path: str) -> int:
    from opdf_exp.distill.taps import ForwardTaps

    ForwardTaps(model, [path]).remove()  # validates the path with a clear error
    module = dict(model.named_modules())[path]
    for attr in ("out_features", "hidden_size", "embedding_dim", "normalized_shape"):
        value = getattr(module, attr, None)
        if value is not None:
            return int(value[0] if isinstance(value, (tuple, list)) else value)
    from opdf_exp.distill.adapters import adapter_for

    try:
        return adapter_for(model).hidden_width(model, 1)
    except (ConfigError, AttributeError):
        pass
    raise ConfigError(f"cannot infer the output width of '{path}'; set projection=false and match widths")


class TensorAlignment(LossTerm):
    """OPDF's tensor-alignment loss (MSE between student and teacher auxiliary MPO tensors).

    It reads the student's live parameters, so it has a gradient (the public code's version did not). It needs
    no batch data; its teacher-side tensors come from an MPO decomposition of the teacher built in ``setup``
    by the runner (see :mod:`opdf_exp.mpo.align`).
    """

    def __init__(self, alignment: nn.Module):
        super().__init__()
        self.alignment = alignment

    def forward(self, ctx) -> torch.Tensor:
        return self.alignment()
