"""Language-model text packed into fixed-length token blocks, with a held-out split that shares no document.

Why split by document before packing: a block that straddles two articles would otherwise put the end of a
held-out article into training. Every document is tokenized, followed by the end-of-text id, and each split's
stream is cut into blocks of ``block_size`` (the ragged tail is dropped); shuffling is off, as in the authors'
pipeline, so the stages take disjoint, contiguous slices of the training stream.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from opdf_exp.errors import ConfigError, MissingFileError


@dataclass
class Blocks:
    train: torch.Tensor  # (N_train, block_size) token ids
    held_out: torch.Tensor  # (N_held, block_size)
    train_docs: list[str]
    held_out_docs: list[str]


def _held_out(name: str, fraction: float, seed: int) -> bool:
    """A stable per-document coin: the same article is held out on every machine and for every student."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < fraction


def bbc_documents() -> list[tuple[str, str]]:
    """(name, text) of the packaged BBC News articles (``opdf_exp.data.sources.bbc_articles``: sorted, deduplicated)."""
    from opdf_exp.data.sources import bbc_articles

    return [(a.name, a.text) for a in bbc_articles()[0]]


def text_file_documents(paths: Sequence[str]) -> list[tuple[str, str]]:
    """Plain-text files (or folders of ``*.txt``), one document per file."""
    docs = []
    for p in paths:
        path = Path(p).expanduser()
        files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
        for f in files:
            if not f.is_file():
                raise MissingFileError(f"text file '{f}' does not exist")
            docs.append((str(f), f.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise MissingFileError(f"no text documents under {list(paths)}")
    return docs


def pack_blocks(docs: Sequence[tuple[str, str]], encode, eos_id: int, block_size: int, held_out_fraction: float = 0.1,
                seed: int = 0, max_tokens: int | None = None) -> Blocks:
    """Tokenize ``docs`` with ``encode(text) -> list[int]``, split by document, pack each split into blocks."""
    if not 0 < held_out_fraction < 1:
        raise ConfigError(f"held_out_fraction={held_out_fraction} must be in (0, 1)")
    streams: dict[bool, list[int]] = {False: [], True: []}
    names: dict[bool, list[str]] = {False: [], True: []}
    for name, text in docs:
        held = _held_out(name, held_out_fraction, seed)
        if max_tokens and len(streams[held]) >= (max_tokens * (held_out_fraction if held else 1)):
            continue
        streams[held] += list(encode(text)) + [eos_id]
        names[held].append(name)

    def blocks(ids: list[int], label: str) -> torch.Tensor:
        n = len(ids) // block_size
        if n < 1:
            raise ConfigError(f"the {label} text has {len(ids)} tokens, fewer than one block of {block_size}; "
                              f"lower block_size or add text")
        return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)  # (N, block_size)

    return Blocks(blocks(streams[False], "training"), blocks(streams[True], "held-out"), names[False], names[True])


def parse_splits(splits: str | Sequence[float], names: Sequence[str] = ("attention_transfer", "hidden_alignment",
                                                                         "end_to_end")) -> dict[str, float]:
    """``"0.03|0.05|0.92"`` (or a list) -> {stage: share}; shares must be >= 0 and sum to 1."""
    parts = str(splits).split("|") if isinstance(splits, str) else list(splits)
    try:
        shares = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"stages.splits={splits!r} must be numbers joined by '|', e.g. 0.03|0.05|0.92") from None
    if len(shares) != len(names) or any(s < 0 for s in shares):
        raise ConfigError(f"stages.splits={splits!r} needs {len(names)} non-negative shares ({'|'.join(names)})")
    if abs(sum(shares) - 1.0) > 1e-6:
        raise ConfigError(f"stages.splits={splits!r} sums to {sum(shares):.4g}; the shares must sum to 1")
    return dict(zip(names, shares))


def split_blocks(blocks: torch.Tensor, shares: dict[str, float]) -> dict[str, torch.Tensor]:
    """Disjoint contiguous slices of the training blocks, one per stage, in order (a zero share gets none)."""
    out, start, n = {}, 0, blocks.shape[0]
    acc = 0.0
    for name, share in shares.items():
        acc += share
        end = n if abs(acc - 1.0) < 1e-9 else int(round(acc * n))
        out[name] = blocks[start:end] if share > 0 else blocks[:0]
        start = end if share > 0 else start
    return out
