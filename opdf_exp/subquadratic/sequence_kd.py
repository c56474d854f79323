"""Sequence-level KD (Kim & Rush, 2016) as a data option: the student trains on the teacher's own continuations.

Each training block keeps its first ``prompt_tokens`` tokens; the rest is replaced by the teacher's greedy or
sampled continuation of that prompt, so the text the student learns from is text the teacher would write.
Generating is the expensive part, so the result is cached on disk once, as safetensors (no pickle), under a key
made of everything that decides it: the teacher (its config and a digest of its embedding and LM-head weights),
the blocks themselves (a digest of the token ids, which fixes tokenizer, corpus and block size), the prompt length
and the decoding settings. A different teacher, corpus or setting is a different file, never a stale one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.utils.io import json_digest

log = logging.getLogger(__name__)
DECODINGS = ("greedy", "sample")


@dataclass(frozen=True)
class SequenceKDSettings:
    prompt_tokens: int = 32
    decoding: str = "greedy"      # greedy | sample
    temperature: float = 1.0      # sample only
    seed: int = 0                 # sample only
    batch_size: int = 8

    def check(self, block_size: int) -> None:
        if self.decoding not in DECODINGS:
            raise ConfigError(f"sequence_kd.decoding={self.decoding!r} is unknown; use one of {', '.join(DECODINGS)}")
        if not 0 < int(self.prompt_tokens) < int(block_size):
            raise ConfigError(f"sequence_kd.prompt_tokens={self.prompt_tokens} must be between 1 and the block size "
                              f"minus one ({block_size - 1})")
        if not float(self.temperature) > 0 or int(self.batch_size) < 1:
            raise ConfigError(f"sequence_kd.temperature={self.temperature} must be > 0 and batch_size="
                              f"{self.batch_size} >= 1")


def _digest_tensor(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def cache_key(teacher: nn.Module, blocks: torch.Tensor, settings: SequenceKDSettings) -> str:
    """Everything that decides the continuations, hashed."""
    config = getattr(teacher, "config", None)
    parts = {
        "teacher_config": config.to_dict() if hasattr(config, "to_dict") else type(teacher).__name__,
        "teacher_embeddings": _digest_tensor(teacher.get_input_embeddings().weight),
        "teacher_head": _digest_tensor(teacher.get_output_embeddings().weight),
        "blocks": _digest_tensor(blocks), "shape": list(blocks.shape), "settings": asdict(settings),
    }
    parts["teacher_config"] = {k: v for k, v in parts["teacher_config"].items() if k not in ("_name_or_path",)} \
        if isinstance(parts["teacher_config"], dict) else parts["teacher_config"]
    return json_digest(parts, 20)


@torch.no_grad()
def teacher_continuations(teacher: nn.Module, blocks: torch.Tensor, settings: SequenceKDSettings) -> torch.Tensor:
    """``(N, T)``: each block's first ``prompt_tokens`` tokens, then the teacher's continuation to length T
    (batched, EOS not allowed to end a block early)."""
    length, prompt = blocks.shape[1], int(settings.prompt_tokens)
    sample = settings.decoding == "sample"
    pad = getattr(getattr(teacher, "generation_config", None), "eos_token_id", None)
    pad = pad[0] if isinstance(pad, (list, tuple)) else pad
    out = []
    devices = [blocks.device] if blocks.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(settings.seed))
        for start in range(0, blocks.shape[0], int(settings.batch_size)):
            prompts = blocks[start:start + int(settings.batch_size), :prompt]
            kwargs = dict(do_sample=True, temperature=float(settings.temperature), top_k=0, top_p=1.0) if sample \
                else dict(do_sample=False)
            generated = teacher.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                         max_new_tokens=length - prompt, min_new_tokens=length - prompt,
                                         pad_token_id=pad if pad is not None else 0, **kwargs)
            out.append(generated[:, :length])
    return torch.cat(out)


def sequence_kd_blocks(teacher: nn.Module, blocks: torch.Tensor, settings: SequenceKDSettings,
                       cache_dir: str | os.PathLike | None) -> torch.Tensor:
    """The training blocks with the teacher's continuations, from the cache when it holds them (written
    atomically; read with safetensors, never unpickled)."""
    from safetensors.torch import load_file, save_file

    settings.check(blocks.shape[1])
    path = Path(cache_dir).expanduser() / "sequence_kd" / f"{cache_key(teacher, blocks, settings)}.safetensors" \
        if cache_dir else None
    if path is not None and path.is_file():
        log.info("sequence-level KD: reusing the teacher's continuations from %s", path)
        return load_file(str(path))["blocks"]
    started = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    try:
        result = teacher_continuations(teacher, blocks, settings)
    finally:
        teacher.train(was_training)
    log.info("sequence-level KD: %d blocks continued by the teacher (%s) in %.1f s", blocks.shape[0],
             settings.decoding, time.perf_counter() - started)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
        save_file({"blocks": result.contiguous()}, tmp)
        os.replace(tmp, path)
    return result
