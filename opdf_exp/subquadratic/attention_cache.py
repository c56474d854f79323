"""The teacher's per-layer attention inputs and outputs, computed once and reused by every stage-1 step.

Why a cache: stage 1 (attention transfer) trains each mixer on the normalised hidden state entering its layer and
the teacher's attention output there. Both depend only on the teacher and the text, so recomputing them walks the
whole teacher (its MLPs are two thirds of its weights) at every step, for every epoch. Collected once, a stage-1
step costs only the mixers' own forward and backward, and all layers train in the same optimizer step.

What is stored, per mixer layer l: ``inputs[l]`` = input_layernorm(h_l) (N, T, D) and ``outputs[l]`` = the
teacher's attention output after o_proj, before the residual (N, T, D); once for all layers, the rotary tables of
positions 0..T-1 (the blocks are full, unpadded, so they are the same for every block).

On disk (``load_or_collect``): one safetensors file (no pickle) whose metadata holds a key of everything the
activations depend on: the teacher's config and a checksum of its weights, the token ids, the layers and the dtype.
A file whose key differs is rebuilt, with the reason logged; the file is written to a temporary name and renamed,
so a killed job never leaves a half-written cache that a later job would trust.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from opdf_exp.distill.teacher_cache import teacher_fingerprint
from opdf_exp.subquadratic.teacher_forcing import TeacherWalk, teacher_attention
from opdf_exp.utils.keyed_file import load_or_build, tensor_digest


@dataclass
class AttentionIO:
    """Teacher activations of ``layers`` on N blocks of T tokens (see the module docstring)."""

    inputs: dict[int, torch.Tensor]    # layer -> (N, T, D) normalised hidden state entering the attention
    outputs: dict[int, torch.Tensor]   # layer -> (N, T, D) teacher attention output (after o_proj)
    cos: torch.Tensor                  # (1, T, head_dim) rotary tables of positions 0..T-1
    sin: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def layers(self) -> list[int]:
        return sorted(self.inputs)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.inputs, self.outputs) for t in d.values())

    def rotary(self, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables expanded to a batch: ((B, T, d), (B, T, d))."""
        return (self.cos.expand(batch, -1, -1).to(dtype), self.sin.expand(batch, -1, -1).to(dtype))

    def batch(self, layer: int, index: torch.Tensor, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of ``layer`` for the blocks ``index``, each (B, T, D) in the compute dtype."""
        return (self.inputs[layer][index].to(device=device, dtype=dtype),
                self.outputs[layer][index].to(device=device, dtype=dtype))


@torch.no_grad()
def collect_attention_io(teacher: nn.Module, blocks: torch.Tensor, layers, batch_size: int = 4,
                         dtype: torch.dtype = torch.float32) -> AttentionIO:
    """Walk the teacher over ``blocks`` (N, T) once, keeping the attention input and output of ``layers``."""
    wanted = sorted(int(i) for i in layers)
    device = next(teacher.parameters()).device
    inputs = {i: [] for i in wanted}
    outputs = {i: [] for i in wanted}
    cos = sin = None
    last = max(wanted) if wanted else -1
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        walk = TeacherWalk(teacher, ids, None)
        if cos is None:
            cos, sin = (t[:1].to(dtype).cpu() for t in walk.position_embeddings)
        hidden = walk.hidden
        for idx, layer in enumerate(teacher.model.layers[: last + 1]):
            if idx in inputs:
                x = layer.input_layernorm(hidden)
                attn, _ = teacher_attention(layer.self_attn, x, walk.position_embeddings, walk.mask4d, False)
                inputs[idx].append(x.to(dtype).cpu())
                outputs[idx].append(attn.to(dtype).cpu())
            hidden = walk.layer_output(idx, hidden)
    return AttentionIO({i: torch.cat(v) for i, v in inputs.items()}, {i: torch.cat(v) for i, v in outputs.items()},
                       cos, sin)


def cache_key(teacher: nn.Module, blocks: torch.Tensor, layers, dtype: torch.dtype) -> dict[str, str]:
    """What the cached activations depend on; a file with another key is stale."""
    return {"teacher": teacher_fingerprint(teacher), "blocks": tensor_digest(blocks),
            "shape": json.dumps(list(blocks.shape)), "layers": json.dumps(sorted(int(i) for i in layers)),
            "dtype": str(dtype)}


def load_or_collect(teacher: nn.Module, blocks: torch.Tensor, layers, path: str | Path, batch_size: int = 4,
                    dtype: torch.dtype = torch.float32) -> AttentionIO:
    """The activations from ``path`` when its key matches the teacher, blocks, layers and dtype; otherwise
    collected and written atomically to ``path`` (``utils/keyed_file.py``)."""
    def build() -> dict[str, torch.Tensor]:
        io = collect_attention_io(teacher, blocks, layers, batch_size, dtype)
        return {**{f"in.{i}": t for i, t in io.inputs.items()}, **{f"out.{i}": t for i, t in io.outputs.items()},
                "cos": io.cos, "sin": io.sin}

    tensors = load_or_build(path, cache_key(teacher, blocks, layers, dtype), build, "stage-1 activation cache")
    return AttentionIO({int(k[3:]): v for k, v in tensors.items() if k.startswith("in.")},
                       {int(k[4:]): v for k, v in tensors.items() if k.startswith("out.")},
                       tensors["cos"], tensors["sin"])
