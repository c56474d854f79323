"""The teacher's next-token distributions of a fixed corpus, stored sparsely once: top-k or an unbiased sample.

Why: in end-to-end LM distillation on a fixed corpus the teacher sees the same tokens at every epoch and in every
student of a sweep, yet each step pays its full forward. Storing its whole distribution is out of the question
(49,152 floats per token for SmolLM2), so toolkits store the top-k probabilities, which biases the gradient:
the student is pushed to put all the teacher's mass on those k tokens and gets no signal about the tail.
"Sparse Logit Sampling" (Anshumann et al., ACL 2025) stores instead K tokens *sampled* from the teacher's
distribution per position: with sampled tokens x_1..x_K ~ p_T,

    -(1/K) sum_k log p_S(x_k)  has expectation  -sum_v p_T(v) log p_S(v) = H(p_T, p_S),

whose gradient in the student is exactly forward KL(p_T || p_S)'s. So the estimate is unbiased at any K, and
KL itself is estimated without bias as that cross-entropy minus the teacher's entropy H(p_T), stored per token.

Storage per predicted token: ``sampled`` K int32 ids + one float32 entropy (K = 64: 260 bytes, vs 98 KB of
float16 logits, ~380x less); ``topk`` K int32 ids + K float16 probabilities.

Targets are stored for positions 0..T-2 of each block (each predicts the next token), temperature applied to the
teacher's logits first (its T^2 gradient scale is applied by the loss, as for the full KL).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.errors import ConfigError

KINDS = ("sampled", "topk")


@dataclass
class SparseTargets:
    """Per block and predicting position: ``ids`` (N, T-1, K) and, for ``topk``, ``probs`` (N, T-1, K);
    ``entropy`` (N, T-1) is the teacher's full entropy there (so KL = cross-entropy - entropy)."""

    kind: str
    ids: torch.Tensor
    entropy: torch.Tensor
    probs: torch.Tensor | None = None
    temperature: float = 1.0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ids, self.entropy, self.probs) if t is not None)


@torch.no_grad()
def build_sparse_targets(teacher: nn.Module, blocks: torch.Tensor, kind: str = "sampled", k: int = 64,
                         temperature: float = 1.0, seed: int = 0, batch_size: int = 4) -> SparseTargets:
    """One teacher forward per batch of ``blocks`` (N, T); keeps K tokens per predicting position."""
    check_settings(kind, k, temperature)
    device = next(teacher.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    ids, probs, entropy = [], [], []
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start:start + batch_size].to(device)
        logits = teacher(input_ids=batch, use_cache=False).logits[:, :-1].float().cpu() / temperature  # (B, T-1, V)
        log_p = F.log_softmax(logits, -1)
        p = log_p.exp()
        entropy.append(-(p * log_p).sum(-1))
        if kind == "topk":
            top_p, top_ids = p.topk(k, -1)
            ids.append(top_ids.to(torch.int32))
            probs.append(top_p.to(torch.float16))
        else:
            flat = torch.multinomial(p.flatten(0, 1), k, replacement=True, generator=generator)  # (B*(T-1), K)
            ids.append(flat.view(*p.shape[:2], k).to(torch.int32))
    return SparseTargets(kind, torch.cat(ids), torch.cat(entropy), torch.cat(probs) if probs else None,
                         float(temperature))


def check_settings(kind: str, k: int, temperature: float) -> None:
    if kind not in KINDS:
        raise ConfigError(f"teacher_cache.kind={kind!r} is unknown; use one of {list(KINDS)}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ConfigError(f"teacher_cache.k={k!r} must be a positive number of tokens per position")
    if not float(temperature) > 0:
        raise ConfigError(f"teacher_cache.temperature={temperature} must be > 0")


def sparse_forward_kl(student_logits: torch.Tensor, targets_ids: torch.Tensor, token_weights: torch.Tensor,
                      entropy: torch.Tensor, probs: torch.Tensor | None = None,
                      temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, KL estimate), both per real token: student logits (M, V), stored ids (M, K), token weights (M,),
    teacher entropy (M,); ``probs`` (M, K) for top-k (weights p_T(x_k)), else the sample mean (1/K each).

    The loss is the cross-entropy H(p_T, p_S) (sampled: its unbiased estimate) times T^2, whose gradient is forward
    KL's; the KL estimate subtracts the teacher's entropy (for top-k it is a lower bound of the truncated mass)."""
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    picked = log_q.gather(-1, targets_ids.long())                             # (M, K)
    weights = probs.float() if probs is not None else torch.full_like(picked, 1.0 / picked.shape[-1])
    cross = -(weights * picked).sum(-1)                                       # (M,)
    n = token_weights.sum().clamp_min(1)
    loss = (cross * token_weights).sum() / n * temperature ** 2
    kl = ((cross - entropy) * token_weights).sum() / n * temperature ** 2
    return loss, kl.detach()


def settings_key(teacher_fingerprint: str, vocab_size: int, blocks_digest: str, shape, kind: str, k: int,
                 temperature: float, seed: int) -> dict[str, str]:
    """What a stored file depends on: a different teacher, tokenizer (vocabulary), blocks, block size or setting
    makes it stale."""
    return {"teacher": teacher_fingerprint, "vocab_size": str(int(vocab_size)), "blocks": blocks_digest,
            "block_size": str(int(shape[1])), "num_blocks": str(int(shape[0])), "kind": kind, "k": str(int(k)),
            "temperature": repr(float(temperature)), "seed": str(int(seed)) if kind == "sampled" else "-",
            "format": json.dumps(1)}


def load_or_build_targets(teacher: nn.Module, blocks: torch.Tensor, path: str | Path, kind: str = "sampled",
                          k: int = 64, temperature: float = 1.0, seed: int = 0, batch_size: int = 4) -> SparseTargets:
    """The targets of ``path`` when its key matches; otherwise built and written atomically (utils/keyed_file)."""
    from opdf_exp.distill.teacher_cache import teacher_fingerprint
    from opdf_exp.utils.keyed_file import load_or_build, tensor_digest

    check_settings(kind, k, temperature)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    key = settings_key(teacher_fingerprint(teacher), vocab, tensor_digest(blocks), blocks.shape, kind, k,
                       temperature, seed)

    def build() -> dict[str, torch.Tensor]:
        targets = build_sparse_targets(teacher, blocks, kind, k, temperature, seed, batch_size)
        return {"ids": targets.ids, "entropy": targets.entropy,
                **({"probs": targets.probs} if targets.probs is not None else {})}

    tensors = load_or_build(path, key, build, f"stage-3 {kind} teacher targets")
    return SparseTargets(kind, tensors["ids"], tensors["entropy"], tensors.get("probs"), float(temperature))
