"""BERT-of-Theseus (Xu et al. 2020, "BERT-of-Theseus: Compressing BERT by Progressive Module Replacing").

The student (successor) keeps its own embeddings, blocks and head; during training each of its M blocks stands in
for a contiguous *group* of the teacher's (predecessor's) N blocks with probability p(t), and the forward runs the
mixed chain. As p(t) reaches 1 the chain is the student alone, which is what validation, test and export use.

Why a wrapper that swaps the block list for one forward instead of a new encoder: the student stays an unchanged
Hugging Face model (its parameter names, MPO layers, ``save_pretrained`` and checkpoints are those of every other
method), and any encoder that loops over a ``ModuleList`` of blocks (BERT, RoBERTa, Llama ...) works unchanged.

Replacement draws come from a generator seeded by ``(seed, step)``: a run is reproducible from its seed, and a
resumed run draws what the uninterrupted one drew at the same global step, with no sampler state to save.
No Lightning or Hydra here (layering rule).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.models.layers import find_layer_stack


def replacement_probability(step: int, p0: float, k: float) -> float:
    """The curriculum p(t) = min(1, p0 + k·t) of the paper (k = 0: a constant p0)."""
    return min(1.0, float(p0) + float(k) * int(step))


def theseus_groups(num_student: int, num_teacher: int, groups: str | Sequence[Sequence[int]] = "auto") -> list[list[int]]:
    """Teacher block indices each student block replaces: contiguous, in order, covering every teacher block.

    ``"auto"`` splits the N teacher blocks into M equal groups (12 → 6: [[0, 1], [2, 3], ...]); N must then be a
    multiple of M. An explicit list is checked for the same three properties, since any other map would drop or
    repeat teacher computation in the mixed chain.
    """
    if groups == "auto":
        if num_student < 1 or num_teacher % num_student:
            raise ConfigError(f"theseus groups=auto needs the teacher's {num_teacher} blocks to split evenly over the "
                              f"student's {num_student}; give groups=[[0,1],[2,3],...] (one contiguous list of teacher "
                              f"blocks per student block) or a student depth that divides {num_teacher}")
        size = num_teacher // num_student
        return [list(range(i * size, (i + 1) * size)) for i in range(num_student)]
    parsed = [[int(t) for t in group] for group in groups]
    flat = [t for group in parsed for t in group]
    if len(parsed) != num_student or flat != list(range(num_teacher)) or any(not group for group in parsed):
        raise ConfigError(f"theseus groups={parsed} do not fit a {num_student}-block student and a {num_teacher}-block "
                          f"teacher; give {num_student} non-empty contiguous groups covering teacher blocks "
                          f"0..{num_teacher - 1} in order, or groups=auto")
    return parsed


class _BlockChain(nn.Module):
    """Teacher blocks run one after the other with the arguments the encoder gives a single block."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, hidden_states, *args, **kwargs):
        output = hidden_states
        for block in self.blocks:
            output = block(hidden_states, *args, **kwargs)
            hidden_states = output[0] if isinstance(output, (tuple, list)) else output  # HF 4.x blocks return tuples
        return output


class TheseusModel(nn.Module):
    """The mixed predecessor/successor model that BERT-of-Theseus trains.

    ``successor``: the student (its blocks train). ``predecessor``: the teacher; copies of its blocks are kept,
    frozen (the teacher object itself is never modified, so other students of the job can share it). In eval mode,
    or once p(t) = 1, the forward is the student's own. Call :meth:`set_step` before each training forward.
    """

    def __init__(self, successor: nn.Module, predecessor: nn.Module, *, p0: float = 0.5, k: float = 0.0,
                 groups: str | Sequence[Sequence[int]] = "auto", seed: int = 0):
        super().__init__()
        if not 0.0 <= float(p0) <= 1.0 or float(k) < 0:
            raise ConfigError(f"theseus p0={p0} must be in [0, 1] and k={k} >= 0 (p(t) = min(1, p0 + k*t))")
        self.successor = successor
        self.stack_path, student_blocks = find_layer_stack(successor)
        _, teacher_blocks = find_layer_stack(predecessor)
        self.groups = theseus_groups(len(student_blocks), len(teacher_blocks), groups)
        self.predecessor_groups = nn.ModuleList(
            _BlockChain([copy.deepcopy(teacher_blocks[t]) for t in group]) for group in self.groups)
        self.predecessor_groups.requires_grad_(False)
        self.p0, self.k, self.seed = float(p0), float(k), int(seed)
        self.step = 0
        self.last_replaced: list[bool] = [True] * len(self.groups)

    def set_step(self, step: int) -> None:
        self.step = int(step)

    @property
    def probability(self) -> float:
        return replacement_probability(self.step, self.p0, self.k)

    def replaced(self, step: int | None = None) -> list[bool]:
        """Which student blocks are used at ``step``: one Bernoulli(p(t)) draw per block, seeded by (seed, step)."""
        step = self.step if step is None else int(step)
        p = replacement_probability(step, self.p0, self.k)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        draws = torch.rand(len(self.groups), generator=generator)  # (M,)
        return (draws < p).tolist()

    @contextlib.contextmanager
    def _mixed_stack(self, replaced: list[bool]) -> Iterator[None]:
        parent_path, _, attr = self.stack_path.rpartition(".")
        parent = self.successor.get_submodule(parent_path) if parent_path else self.successor
        own = getattr(parent, attr)
        mixed = [own[i] if use_student else self.predecessor_groups[i] for i, use_student in enumerate(replaced)]
        # swap without re-registering parameters; a Sequential stack (timm) stays callable as one module
        parent._modules[attr] = nn.Sequential(*mixed) if isinstance(own, nn.Sequential) else nn.ModuleList(mixed)
        try:
            yield
        finally:
            parent._modules[attr] = own

    @contextlib.contextmanager
    def training_forward(self) -> Iterator[None]:
        """Within this context the successor (the student) runs with this step's mixed blocks; the training step
        calls the student through its own adapter inside it, so any model family trains the same way."""
        if not self.training:
            yield
            return
        replaced = self.replaced()
        self.last_replaced = replaced
        if all(replaced):
            yield
            return
        with self._mixed_stack(replaced):
            yield

    def forward(self, *args, **inputs):
        with self.training_forward():
            return self.successor(*args, **inputs)
