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

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from opdf_exp.subquadratic.teacher_forcing import TeacherWalk, teacher_attention

log = logging.getLogger(__name__)


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


def teacher_fingerprint(teacher: nn.Module) -> str:
    """The teacher's config plus a float64 checksum of every weight: a different checkpoint changes it."""
    digest = hashlib.sha256(teacher.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in sorted(teacher.state_dict().items()):
            digest.update(name.encode())
            digest.update(f"{p.double().sum().item():.17g}/{p.double().abs().sum().item():.17g}".encode())
    return digest.hexdigest()


def cache_key(teacher: nn.Module, blocks: torch.Tensor, layers, dtype: torch.dtype) -> dict[str, str]:
    """What the cached activations depend on; a file with another key is stale."""
    return {"teacher": teacher_fingerprint(teacher),
            "blocks": hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest(),
            "shape": json.dumps(list(blocks.shape)), "layers": json.dumps(sorted(int(i) for i in layers)),
            "dtype": str(dtype)}


def _stale_reason(stored: dict[str, str], wanted: dict[str, str]) -> str | None:
    differing = [k for k in wanted if stored.get(k) != wanted[k]]
    return f"its {', '.join(differing)} differ" if differing else None


def load_or_collect(teacher: nn.Module, blocks: torch.Tensor, layers, path: str | Path, batch_size: int = 4,
                    dtype: torch.dtype = torch.float32) -> AttentionIO:
    """The activations from ``path`` when its key matches the teacher, blocks, layers and dtype; otherwise
    collected and written atomically to ``path`` (see the module docstring)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    key = cache_key(teacher, blocks, layers, dtype)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            reason = _stale_reason(f.metadata() or {}, key)
            if reason is None:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                log.info("stage-1 activations loaded from %s", path)
                return AttentionIO({int(k[3:]): v for k, v in tensors.items() if k.startswith("in.")},
                                   {int(k[4:]): v for k, v in tensors.items() if k.startswith("out.")},
                                   tensors["cos"], tensors["sin"])
        log.info("stage-1 activation cache %s is rebuilt: %s", path, reason)
    io = collect_attention_io(teacher, blocks, layers, batch_size, dtype)
    tensors = {**{f"in.{i}": t.contiguous() for i, t in io.inputs.items()},
               **{f"out.{i}": t.contiguous() for i, t in io.outputs.items()},
               "cos": io.cos.contiguous(), "sin": io.sin.contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata=key)
    os.replace(partial, path)
    log.info("stage-1 activations of %d blocks x %d layers cached in %s (%.1f MB)", io.num_blocks, len(io.layers),
             path, io.nbytes() / 2 ** 20)
    return io
