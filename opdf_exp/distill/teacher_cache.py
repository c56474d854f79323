"""Teacher outputs computed once, stored on disk, and served to every student and seed of a sweep.

Why: with a frozen teacher (eval mode, no dropout) and deterministic inputs, the teacher's forward pass gives the
same outputs for an example at every step of every student, yet it costs about a third of a KD step on CPU
(MiniLM-L6 -> L3: 0.31 s of 0.88 s per 32x64 batch). Computing it once per (teacher weights, data, tokenizer,
max length, layers) and looking it up by example index leaves the student's own step.

What is stored (one ``safetensors`` file, so loading never unpickles anything):
* ``logits``: ``[N, C]`` float32 for the N training examples (per-example outputs, independent of padding);
* ``hidden.<layer>`` and ``offsets``: the hidden states of the layers a loss term asks for, in float16, only at
  real tokens, concatenated (``[sum_i len_i, H]``), with ``offsets[i]:offsets[i+1]`` the rows of example i. A
  lookup scatters them back into the batch's padded shape at the positions of its attention mask, so left or
  right padding and any batch composition give the same tensors.

Staleness: :func:`verify` compares the cache with the live teacher on a few batches before training; the runner
rebuilds the file when they differ (a teacher changed under the same key, a corrupted file).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from opdf_exp.errors import ConfigError
from opdf_exp.utils.io import json_digest

INDEX_KEY = "example_index"
FORMAT_VERSION = 1


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """A content hash of the teacher's weights (names, shapes, dtypes and values), so a re-fine-tuned or
    different teacher never reads another's outputs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()[:16]


@dataclass
class TeacherOutputs:
    """What a lookup returns: read by name like a transformers ``ModelOutput`` (``logits``, ``hidden_states``).
    ``hidden_states[k]`` is ``None`` for layers that were not cached."""

    logits: torch.Tensor
    hidden_states: tuple | None = None


class TeacherOutputCache:
    """Cached teacher outputs of one training split; ``lookup(batch)`` gives the batch's teacher outputs."""

    def __init__(self, logits: torch.Tensor, hidden: Mapping[int, torch.Tensor] | None = None,
                 offsets: torch.Tensor | None = None, num_hidden_states: int = 0, meta: dict | None = None):
        self.logits = logits
        self.hidden = dict(hidden or {})
        self.offsets = offsets
        self.num_hidden_states = num_hidden_states
        self.meta = dict(meta or {})

    @property
    def layers(self) -> list[int]:
        return sorted(self.hidden)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def lookup(self, batch: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> TeacherOutputs:
        if INDEX_KEY not in batch:
            raise ConfigError("batches carry no example_index, so cached teacher outputs cannot be looked up; "
                              "use a DataModule that yields it, or set distill.teacher_cache=false")
        index = batch[INDEX_KEY].long().cpu()
        device = device or batch[INDEX_KEY].device
        logits = self.logits.index_select(0, index).to(device)
        hidden_states = None
        if self.hidden:
            starts, ends = self.offsets[index], self.offsets[index + 1]
            mask = _token_mask(batch, int((ends[0] - starts[0]).item()) if len(index) else 0).cpu()  # (B, L)
            rows = torch.cat([torch.arange(int(s), int(e)) for s, e in zip(starts, ends)])
            if int(mask.sum()) != rows.numel():
                raise ConfigError("cached teacher hidden states do not match the batch's token count; the data or "
                                  "tokenizer changed under the same cache key: delete the cache or set "
                                  "distill.teacher_cache=false")
            states: list = [None] * self.num_hidden_states
            for layer, values in self.hidden.items():
                full = torch.zeros(*mask.shape, values.shape[-1], dtype=torch.float32)  # (B, L, H)
                full[mask] = values.index_select(0, rows).float()
                states[layer] = full.to(device)
            hidden_states = tuple(states)
        return TeacherOutputs(logits=logits, hidden_states=hidden_states)

    # -- files
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file + rename): a job killed mid-write leaves no half file behind."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"logits": self.logits.contiguous()}
        if self.hidden:
            tensors["offsets"] = self.offsets.contiguous()
            tensors.update({f"hidden.{layer}": v.contiguous() for layer, v in self.hidden.items()})
        meta = {"meta": json.dumps({**self.meta, "format": FORMAT_VERSION, "num_hidden_states": self.num_hidden_states})}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TeacherOutputCache | None":
        """The cache at ``path``, or ``None`` when it is missing, unreadable or of another format version."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {}).get("meta", "{}"))
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception:
            return None
        if meta.get("format") != FORMAT_VERSION or "logits" not in tensors:
            return None
        hidden = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("hidden.")}
        return cls(tensors["logits"], hidden, tensors.get("offsets"), int(meta.get("num_hidden_states", 0)), meta)


def _token_mask(batch: Mapping[str, torch.Tensor], length: int) -> torch.Tensor:
    """``[B, L]`` real tokens: the text batch's attention mask, or every token (image patches)."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return mask.bool()
    return torch.ones(len(batch[INDEX_KEY]), length, dtype=torch.bool)


@torch.no_grad()
def build_cache(teacher: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], num_examples: int,
                layers: Sequence[int] = (), meta: dict | None = None, progress=None) -> TeacherOutputCache:
    """Run the frozen teacher (eval mode) over ``batches`` (each with ``example_index`` and ``attention_mask``)
    and collect logits and the hidden states of ``layers`` at real tokens. ``progress(done, total, seconds)`` is
    called after every batch (the runner logs a rate)."""
    from opdf_exp.distill.adapters import adapter_for

    adapter = adapter_for(teacher)
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    logits = None
    per_layer: dict[int, list] = {layer: [None] * num_examples for layer in layers}
    num_hidden = 0
    done, started = 0, time.perf_counter()
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
            out = adapter.run(teacher, inputs, hidden_states=bool(layers))
            index = batch[INDEX_KEY].long()
            if logits is None:
                logits = torch.full((num_examples, out.logits.shape[-1]), float("nan"))
            logits[index] = out.logits.float().cpu()
            if layers:
                num_hidden = len(out.hidden_states)
                mask = _token_mask(batch, out.hidden_states[0].shape[1])
                for layer in layers:
                    if not 0 <= layer < num_hidden:
                        raise ConfigError(f"a loss term asks for teacher hidden state {layer}; the teacher has "
                                          f"0..{num_hidden - 1}")
                    states = out.hidden_states[layer].cpu()
                    for row, example in enumerate(index.tolist()):
                        per_layer[layer][example] = states[row][mask[row]].half()  # real tokens only
            done += int(index.numel())
            if progress is not None:
                progress(done, num_examples, time.perf_counter() - started)
    finally:
        teacher.train(was_training)
    if logits is None or torch.isnan(logits).any():
        raise ConfigError("the teacher-output cache did not see every training example once; check the loader")
    hidden, offsets = {}, None
    if layers:
        lengths = torch.tensor([t.shape[0] for t in per_layer[layers[0]]])
        offsets = torch.zeros(num_examples + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lengths, 0)
        hidden = {layer: torch.cat(values) for layer, values in per_layer.items()}
    return TeacherOutputCache(logits, hidden, offsets, num_hidden, meta)


@torch.no_grad()
def verify(cache: TeacherOutputCache, teacher: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
           max_batches: int = 2, logits_tol: float = 1e-3, hidden_tol: float = 2e-2) -> float:
    """Largest relative difference between the cache and the live teacher on the first ``max_batches``
    batches; raises nothing. Logits are stored in float32 (tolerance for batch-composition round-off) and hidden
    states in float16 (relative tolerance about 1e-3, checked against ``hidden_tol``)."""
    from opdf_exp.distill.adapters import adapter_for

    adapter = adapter_for(teacher)
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    worst = 0.0
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            cached = cache.lookup(batch, device)
            live = adapter.run(teacher, {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)},
                               hidden_states=bool(cache.hidden))
            scale = live.logits.abs().max().clamp_min(1.0)
            worst = max(worst, float((cached.logits - live.logits.float()).abs().max() / scale) / logits_tol)
            mask = _token_mask(batch, live.hidden_states[0].shape[1]).to(device) if cache.layers else None
            for layer in cache.layers:
                ref = live.hidden_states[layer].float()[mask]
                got = cached.hidden_states[layer][mask]
                rel = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                worst = max(worst, rel / hidden_tol)
    finally:
        teacher.train(was_training)
    return worst  # <= 1: within tolerance


def cache_key(teacher_fingerprint_: str, data: Mapping, inputs: Mapping, layers: Sequence[int]) -> str:
    """``inputs``: what fixes an example's model inputs (the DataModule's ``input_signature()``: tokenizer and max
    length for text, the eval transform's data config for images)."""
    return json_digest({"teacher": teacher_fingerprint_, "data": data, "inputs": inputs,
                        "layers": sorted(int(x) for x in layers), "format": FORMAT_VERSION})
