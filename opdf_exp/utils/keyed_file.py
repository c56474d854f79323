"""One safetensors file whose metadata says what its tensors were computed from; reused only when that matches.

Why one helper: the stage-1 activation cache and the stage-3 sparse teacher targets are both "compute once from
the teacher and the tokens, reuse across runs" files. Both need the same three guarantees: nothing is unpickled
(safetensors), a file computed from another teacher, tokenizer, block size or setting is rebuilt and the log says
which part of the key differed, and a killed job never leaves a half-written file that a later job would trust
(written under a temporary name, then renamed).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)


def tensor_digest(tokens: torch.Tensor) -> str:
    """A content hash of integer token ids (the corpus part of a key)."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def stale_reason(stored: dict[str, str], wanted: dict[str, str]) -> str | None:
    """None when every key of ``wanted`` matches ``stored``; else which parts differ."""
    differing = [k for k in wanted if stored.get(k) != wanted[k]]
    return f"its {', '.join(differing)} differ" if differing else None


def load_or_build(path: str | Path, key: dict[str, str], build: Callable[[], dict[str, torch.Tensor]],
                  what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` when its metadata equals ``key``; otherwise ``build()``, written atomically."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            reason = stale_reason(f.metadata() or {}, key)
            if reason is None:
                log.info("%s loaded from %s", what, path)
                return {k: f.get_tensor(k) for k in f.keys()}
        log.info("%s in %s is rebuilt: %s", what, path, reason)
    tensors = {k: v.contiguous() for k, v in build().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata=key)
    os.replace(partial, path)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    log.info("%s written to %s (%.1f MB)", what, path, size / 2 ** 20)
    return tensors
