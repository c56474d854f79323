"""OPDF's tensor alignment loss: MSE between the student's auxiliary MPO tensors and the teacher's matching ones.

Unlike the public code (which read the tensors through ``state_dict()`` and so never had a gradient), the student
side here is the live ``nn.Parameter`` of each MPO layer; the teacher side is a detached buffer computed once.

Why it is meaningful at all: an MPO is defined only up to a gauge (any invertible G on a bond, T_k G and
G^-1 T_{k+1}, leaves W unchanged), so raw tensors of two independent decompositions are not comparable. Both sides
are therefore decomposed with the same deterministic gauge (symmetric canonical form + sign fixing, see
:func:`opdf_exp.mpo.decompose.mpo_decompose`): equal matrices give equal tensors. During training the student's
tensors can also drift along gauge directions without changing W; the MSE penalises that drift too.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.errors import ConfigError
from opdf_exp.mpo.decompose import mpo_decompose
from opdf_exp.mpo.layers import MPO_LAYER_TYPES
from opdf_exp.mpo.surgery import mpo_layers
from opdf_exp.utils.layer_map import uniform_layer_map

log = logging.getLogger(__name__)


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """``bert.encoder.layer.3.attention.self.query`` -> ("bert.encoder.layer", 3, "attention.self.query").

    The first purely numeric component is the block index: BERT ``encoder.layer.N``, Llama ``model.layers.N``,
    timm ``blocks.N``, GPT-2 ``transformer.h.N``. None when the module is not inside a block stack.
    """
    parts = name.split(".")
    for p, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:p]), int(part), ".".join(parts[p + 1:])
    return None


def uniform_map(num_student: int, num_teacher: int) -> dict[int, int]:
    """Student block i -> teacher block round((i + 1) * T / S) - 1: spread uniformly, last maps to last.

    6 -> 12 gives 1, 3, 5, 7, 9, 11 (the public code's 2i + 1); equal depths give the identity. The rule itself is
    :func:`opdf_exp.utils.layer_map.uniform_layer_map`, shared with the student builder in ``models/``.
    """
    error = (f"the student has {num_student} blocks but the teacher only {num_teacher}; pass an explicit "
             f"layer_map {{student_block: teacher_block}}")
    return dict(enumerate(uniform_layer_map(num_student, num_teacher, error=error)))


def _stack_depths(model: nn.Module) -> dict[str, int]:
    """{stack prefix: number of blocks}, from ModuleLists when present, else the largest index seen + 1."""
    depths: dict[str, int] = {}
    for name, _ in model.named_modules():
        parsed = split_layer_name(name)
        if parsed is None:
            continue
        prefix, idx, _ = parsed
        depths[prefix] = max(depths.get(prefix, 0), idx + 1)
    for prefix in list(depths):
        try:
            stack = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            continue
        if isinstance(stack, (nn.ModuleList, nn.Sequential)):
            depths[prefix] = len(stack)
    return depths


@dataclass(frozen=True)
class AlignPair:
    """One aligned tensor: student layer ``student`` tensor ``index`` <-> teacher ``teacher`` tensor ``index``."""

    student: str
    teacher: str
    index: int
    shape: tuple[int, ...]


REDUCTIONS = ("mean", "relative")


class TensorAlignmentLoss(nn.Module):
    """mean over matched tensors of MSE(student T_k, teacher T_k) for the selected k of every mapped MPO layer.

    student: a model with MPO layers (after :func:`overparameterize`).
    teacher: either a model with MPO layers of the same factors and gauge, or a plain model; in the latter case the
        matching teacher ``nn.Linear``/``nn.Embedding`` weights are decomposed here (same factors, bond cap and gauge
        as the student layer) without modifying the teacher.
    layer_map: None or "uniform" (see :func:`uniform_map`), "public" (student block i -> teacher block 2i + 1, the
        public OPDF code's map, which it pairs with students initialised from teacher blocks 0..S-1), "preceding"
        (the teacher block just before the uniform one: for a student initialised uniformly, the neighbour of
        its own starting block, so the targets differ from the start), a dict
        {student block: teacher block} (keys may be strings), or a sequence whose i-th entry is the teacher block
        of student block i. Student blocks missing from an explicit map are not aligned.
    indices: "auxiliary" (every k except the central (n-1)//2; the paper), "all", "central", or a list of ints
        (negative counts from the end; the public code used [0, 2] or [0, 1, 3, 4]).
    on_mismatch: "error" (ConfigError on any tensor or module that cannot be matched, e.g. different widths) or
        "skip" (leave it out; listed in ``skipped`` and logged).

    reduction: "mean" (the public code's: the mean over tensors of each tensor's mean squared entry difference;
        tiny, since local tensors have many near-zero entries, so lambda must be ~1e4 before the term acts) or
        "relative" (the mean over tensors of ||S - T||^2 / ||T||^2, scale-free, so lambda in 1e-3..1 spans weak
        to strong).

    ``pairs`` lists what is aligned (for logging); ``starts_at_target`` counts the pairs whose student tensor
    already equals its target (a student initialised from the very blocks it is aligned to: the term is 0 at
    step 0 and can only pull back to the start; a one-line warning says so). ``forward()`` returns an unweighted
    scalar; the caller applies the weight lambda (lambda = 0 reproduces the public code, whose loss never had a
    gradient).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, layer_map=None,
                 indices: str | Sequence[int] = "auxiliary", on_mismatch: str = "error", reduction: str = "mean"):
        super().__init__()
        if on_mismatch not in ("error", "skip"):
            raise ConfigError(f"on_mismatch={on_mismatch!r} is unknown; use 'error' or 'skip'")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"align.reduction={reduction!r} is unknown; use one of {', '.join(REDUCTIONS)}")
        self.on_mismatch, self.reduction = on_mismatch, reduction
        s_layers = mpo_layers(student)
        if not s_layers:
            raise ConfigError("the student has no MPO layers to align; over-parameterize it first "
                              "(decomposition.kind=mpo or svd)")
        self.layer_map = self._resolve_map(student, teacher, layer_map, s_layers)
        t_modules = dict(teacher.named_modules())
        t_by_key: dict[tuple[int, str], list[str]] = {}
        for name in t_modules:
            parsed = split_layer_name(name)
            if parsed is not None:
                t_by_key.setdefault((parsed[1], parsed[2]), []).append(name)

        self.pairs: list[AlignPair] = []
        self.skipped: list[tuple[str, str]] = []
        self._student_layers: dict[str, nn.Module] = {}  # plain dict: not registered, so no duplicate parameters
        self._buffer_of: list[tuple[str, int, str]] = []
        for s_name, s_layer in s_layers.items():
            t_name = self._teacher_name(s_name, t_modules, t_by_key)
            if t_name is None:
                continue
            t_tensors = self._teacher_tensors(s_name, s_layer, t_name, t_modules[t_name])
            if t_tensors is None:
                continue
            for k in self._resolve_indices(indices, s_layer, s_name):
                s_t, t_t = s_layer.tensors[k], t_tensors[k]
                if tuple(s_t.shape) != tuple(t_t.shape):
                    self._mismatch(s_name, f"tensor {k} has shape {tuple(s_t.shape)} but the teacher's {t_name} has "
                                           f"{tuple(t_t.shape)}")
                    continue
                buffer = f"target_{len(self._buffer_of)}"
                self.register_buffer(buffer, t_t.detach().to(device=s_t.device, dtype=s_t.dtype).clone(),
                                     persistent=False)
                self._buffer_of.append((s_name, k, buffer))
                self._student_layers[s_name] = s_layer
                self.pairs.append(AlignPair(s_name, t_name, k, tuple(s_t.shape)))
        if self.skipped:
            log.warning("tensor alignment skipped %d student layers/tensors, e.g. %s: %s", len(self.skipped),
                        *self.skipped[0])
        if not self.pairs:
            raise ConfigError("tensor alignment matched no tensors between student and teacher (see skipped: "
                              f"{self.skipped[:1]}); check the layer map, factors and widths or set align.weight=0")
        self.starts_at_target = sum(
            torch.allclose(self._student_layers[s_name].tensors[k].detach(), getattr(self, buffer), rtol=1e-5,
                           atol=1e-7) for s_name, k, buffer in self._buffer_of)
        if self.starts_at_target:
            log.warning("tensor alignment: %d of %d aligned tensors already equal their targets (the student's blocks "
                        "were initialised from the teacher blocks they are aligned to), so the term is 0 at step 0 and "
                        "only pulls back to the start; to transfer from other blocks use align.layer_map=public with "
                        "student.model.layers=[0,1,...] (the public code's setting)", self.starts_at_target,
                        len(self.pairs))

    # -- construction helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _resolve_map(student: nn.Module, teacher: nn.Module, layer_map, s_layers) -> dict[str, dict[int, int]]:
        """{student stack prefix: {student block: teacher block}} for every stack holding MPO layers."""
        s_depths, t_depths = _stack_depths(student), _stack_depths(teacher)
        prefixes = {p[0] for p in map(split_layer_name, s_layers) if p is not None}
        out: dict[str, dict[int, int]] = {}
        for prefix in sorted(prefixes):
            s_depth = s_depths[prefix]
            t_depth = t_depths.get(prefix)
            if t_depth is None:  # differing wrappers (BertModel vs BertForSequenceClassification): match by tail
                tail = prefix.split(".")[-1]
                candidates = [d for p, d in t_depths.items() if p.split(".")[-1] == tail]
                t_depth = max(candidates) if candidates else max(t_depths.values(), default=0)
            if layer_map is None or layer_map == "uniform":
                mapping = uniform_map(s_depth, t_depth)
            elif layer_map == "public":
                mapping = {i: 2 * i + 1 for i in range(s_depth)}
            elif layer_map == "preceding":
                mapping = {i: j - 1 for i, j in uniform_map(s_depth, t_depth).items()}
            elif isinstance(layer_map, str):
                raise ConfigError(f"layer_map={layer_map!r} is unknown; use 'uniform', 'public', 'preceding', a dict "
                                  f"{{student_block: teacher_block}} or a list of teacher blocks")
            elif isinstance(layer_map, Mapping):
                try:
                    mapping = {int(k): int(v) for k, v in layer_map.items()}
                except (TypeError, ValueError):
                    raise ConfigError(f"layer_map {dict(layer_map)!r} must map integers to integers") from None
            else:
                try:
                    mapping = {i: int(v) for i, v in enumerate(layer_map)}
                except (TypeError, ValueError):
                    raise ConfigError(f"layer_map {layer_map!r} must be 'uniform', a dict or a list of "
                                      f"integers") from None
            bad = {i: j for i, j in mapping.items() if not (0 <= i < s_depth and 0 <= j < t_depth)}
            if bad:
                raise ConfigError(f"layer_map entries {bad} are out of range: the student has blocks 0..{s_depth - 1} "
                                  f"and the teacher 0..{t_depth - 1}")
            out[prefix] = mapping
        return out

    def _mismatch(self, name: str, reason: str) -> None:
        if self.on_mismatch == "error":
            raise ConfigError(f"cannot align {name}: {reason}; give student and teacher the same widths and factors, "
                              f"or set on_mismatch='skip'")
        self.skipped.append((name, reason))

    def _teacher_name(self, s_name: str, t_modules, t_by_key) -> str | None:
        parsed = split_layer_name(s_name)
        if parsed is None:
            if s_name in t_modules:
                return s_name
            self._mismatch(s_name, "the teacher has no module of that name")
            return None
        prefix, i, suffix = parsed
        mapping = self.layer_map[prefix]
        if i not in mapping:
            self.skipped.append((s_name, f"student block {i} is not in the layer map"))
            return None
        j = mapping[i]
        exact = f"{prefix}.{j}.{suffix}" if prefix else f"{j}.{suffix}"
        if exact in t_modules:
            return exact
        candidates = t_by_key.get((j, suffix), [])
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ConfigError(f"{s_name} matches several teacher modules {candidates}; pass teacher and student of "
                              f"the same class")
        self._mismatch(s_name, f"the teacher has no block {j} module ending in {suffix!r}")
        return None

    def _teacher_tensors(self, s_name: str, s_layer, t_name: str, t_module: nn.Module) -> list[torch.Tensor] | None:
        if isinstance(t_module, MPO_LAYER_TYPES):
            if (t_module.row_factors, t_module.col_factors) != (s_layer.row_factors, s_layer.col_factors):
                self._mismatch(s_name, f"factors {s_layer.row_factors} x {s_layer.col_factors} differ from the "
                                       f"teacher's {t_module.row_factors} x {t_module.col_factors} ({t_name})")
                return None
            if t_module.gauge != s_layer.gauge:
                raise ConfigError(f"{s_name} uses gauge {s_layer.gauge!r} but the teacher's {t_name} uses "
                                  f"{t_module.gauge!r}; decompose both with the same gauge")
            return [t.detach() for t in t_module.tensors]
        if isinstance(t_module, (nn.Linear, nn.Embedding)):
            weight = t_module.weight.detach()
            rows, cols = math.prod(s_layer.row_factors), math.prod(s_layer.col_factors)
            if tuple(weight.shape) != (rows, cols):
                self._mismatch(s_name, f"its weight is {rows}x{cols} but the teacher's {t_name} is "
                                       f"{tuple(weight.shape)[0]}x{tuple(weight.shape)[1]}")
                return None
            return mpo_decompose(weight, s_layer.row_factors, s_layer.col_factors, max_bond=s_layer.max_bond,
                                 gauge=s_layer.gauge)
        self._mismatch(s_name, f"the teacher's {t_name} is a {type(t_module).__name__}, not a linear/embedding layer")
        return None

    @staticmethod
    def _resolve_indices(indices, layer, name: str) -> list[int]:
        n = layer.n
        if isinstance(indices, str):
            if indices == "auxiliary":
                return list(layer.aux_indices)
            if indices == "all":
                return list(range(n))
            if indices == "central":
                return [layer.central_index]
            raise ConfigError(f"indices={indices!r} is unknown; use 'auxiliary', 'all', 'central' or a list of ints")
        try:
            picked = [int(k) for k in indices]
        except (TypeError, ValueError):
            raise ConfigError(f"indices={indices!r} must be 'auxiliary', 'all', 'central' or a list of ints") from None
        bad = [k for k in picked if not -n <= k < n]
        if bad:
            raise ConfigError(f"indices {bad} are out of range for {name}, which has n={n} local tensors "
                              f"(0..{n - 1})")
        return sorted({k % n for k in picked})

    # -- loss -----------------------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        terms = []
        for s_name, k, buffer in self._buffer_of:
            param = self._student_layers[s_name].tensors[k]
            target = getattr(self, buffer)
            if target.device != param.device:
                target = target.to(param.device)
            if self.reduction == "relative":
                terms.append((param - target).square().sum() / target.square().sum().clamp_min(1e-30))
            else:
                terms.append(F.mse_loss(param, target))
        return torch.stack(terms).mean()

    def student_tensors(self) -> list[torch.Tensor]:
        """The student's aligned local tensors (what the term's gradient reaches)."""
        return [self._student_layers[s_name].tensors[k] for s_name, k, _ in self._buffer_of]

    def extra_repr(self) -> str:
        layers = len({p.student for p in self.pairs})
        return f"pairs={len(self.pairs)} over {layers} layers, skipped={len(self.skipped)}, layer_map={self.layer_map}"
