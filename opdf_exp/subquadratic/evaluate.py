"""Evaluation of teacher and students on the same footing (no Lightning, no Hydra): held-out perplexity and
teacher-student KL per token, parameter counts, prefill/decode throughput, generation-state bytes per sequence,
and two recall probes built here (no hub): passkey retrieval and multi-query associative recall (MQAR).

Why these: the seed paper's findings are about quality (perplexity, KL) and about what a fixed-size state
forgets (long-context recall); the efficiency columns (tokens/s, state bytes against T) are the reason to want
a subquadratic student at all, so they are measured in the same harness (notes/subquadratic.md §6, §11).
"""
from __future__ import annotations

import math
import random
import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def perplexity_and_kl(student: nn.Module, teacher: nn.Module | None, blocks: torch.Tensor,
                      batch_size: int = 4) -> dict[str, float]:
    """Next-token perplexity of ``student`` (and of ``teacher``) on (N, T) held-out blocks, and the mean over
    predicted tokens of KL(teacher || student)."""
    device = next(student.parameters()).device
    nll_s = nll_t = kl = 0.0
    count = 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        s = student(input_ids=ids, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        labels = ids[:, 1:]
        nll_s += F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction="sum").item()
        if teacher is not None:
            t = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll_t += F.cross_entropy(t.flatten(0, 1), labels.flatten(), reduction="sum").item()
            log_t, log_s = F.log_softmax(t, -1), F.log_softmax(s, -1)
            kl += (log_t.exp() * (log_t - log_s)).sum().item()
        count += labels.numel()
    out = {"perplexity": math.exp(nll_s / max(count, 1)), "eval_tokens": count}
    if teacher is not None:
        out.update(teacher_perplexity=math.exp(nll_t / max(count, 1)), kl_per_token=kl / max(count, 1))
    return out


def perplexity_by_position(student: nn.Module, teacher: nn.Module | None, blocks: torch.Tensor,
                           edges: Sequence[int], batch_size: int = 4) -> list[dict[str, float]]:
    """Next-token perplexity (and KL(teacher || student)) per range of positions in (N, T) blocks: one row per
    ``[edges[i], edges[i+1])``, the position being the predicted token's (1 .. T-1).

    Why: a student that keeps only recent context (a sliding window, a fast-decaying state) can match its teacher
    on short blocks and fall behind where the context is long; the rows for positions past the training block
    length show it. With ``edges=(1, T)`` the one row equals :func:`perplexity_and_kl`."""
    device = next(student.parameters()).device
    t = blocks.shape[1]
    if list(edges) != sorted(edges) or edges[0] < 1 or edges[-1] > t:
        raise ValueError(f"edges {list(edges)} must increase within 1..{t} (the predicted positions)")
    position = torch.arange(1, t, device=device)  # the predicted token of logit j is token j + 1
    bins = [((position >= lo) & (position < hi)) for lo, hi in zip(edges[:-1], edges[1:])]
    sums = [{"nll_s": 0.0, "nll_t": 0.0, "kl": 0.0, "count": 0} for _ in bins]
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        labels = ids[:, 1:]
        s = F.log_softmax(student(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)  # (B, T-1, V)
        nll_s = -s.gather(-1, labels[..., None])[..., 0]  # (B, T-1)
        if teacher is not None:
            lt = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
            nll_t = -lt.gather(-1, labels[..., None])[..., 0]
            kl = (lt.exp() * (lt - s)).sum(-1)  # (B, T-1)
        for in_bin, acc in zip(bins, sums):
            acc["nll_s"] += nll_s[:, in_bin].sum().item()
            acc["count"] += int(in_bin.sum()) * ids.shape[0]
            if teacher is not None:
                acc["nll_t"] += nll_t[:, in_bin].sum().item()
                acc["kl"] += kl[:, in_bin].sum().item()
    rows = []
    for (lo, hi), acc in zip(zip(edges[:-1], edges[1:]), sums):
        n = max(acc["count"], 1)
        row = {"from": int(lo), "to": int(hi), "tokens": acc["count"], "perplexity": math.exp(acc["nll_s"] / n)}
        if teacher is not None:
            row.update(teacher_perplexity=math.exp(acc["nll_t"] / n), kl_per_token=acc["kl"] / n)
        rows.append(row)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels are asynchronous: time what ran, not what was queued


@torch.no_grad()
def throughput(model: nn.Module, prompt_len: int = 128, decode_steps: int = 32, vocab: int | None = None,
               repeats: int = 1, warmup: bool = True) -> dict[str, float]:
    """Prefill tokens/s (one forward over a (1, prompt_len) prompt, cache on) and decode tokens/s (one token at a
    time with the cache), best of ``repeats`` timed calls. Batch 1, the model's device and dtype, greedy.

    Why an untimed warm-up first (``warmup=True``): the first call pays one-off costs (allocator growth, kernel
    selection and, on CUDA, lazy initialisation and autotuning) that are not the model's speed; why the best of
    ``repeats``: on a shared machine the other calls only measure interference.
    """
    device = next(model.parameters()).device
    vocab = vocab or model.config.vocab_size
    ids = torch.randint(1, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)

    def run(steps: int) -> tuple[float, float]:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync(device)
        return t1 - t0, time.perf_counter() - t1

    if warmup:
        run(min(decode_steps, 2))
    best_prefill = best_decode = 0.0
    for _ in range(max(1, int(repeats))):
        prefill_s, decode_s = run(decode_steps)
        best_prefill = max(best_prefill, prompt_len / max(prefill_s, 1e-9))
        best_decode = max(best_decode, decode_steps / max(decode_s, 1e-9))
    return {"prefill_tokens_per_s": best_prefill, "decode_tokens_per_s": best_decode}


def kv_cache_bytes(config, seq_len: int, bytes_per_value: int = 4) -> int:
    """A softmax-attention model's KV cache per sequence after ``seq_len`` tokens."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * seq_len * config.num_key_value_heads * head_dim * bytes_per_value


def state_bytes(model: nn.Module, seq_len: int) -> int:
    if hasattr(model, "state_bytes_per_sequence"):
        return int(model.state_bytes_per_sequence(seq_len))
    return kv_cache_bytes(model.config, seq_len)


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


@torch.no_grad()
def passkey_accuracy(model: nn.Module, encode: Callable[[str], list[int]], context_tokens: int, trials: int = 5,
                     seed: int = 0) -> float:
    """Passkey retrieval (Mohtashami & Jaggi 2023): a 5-digit key is stated at a random depth of ``context_tokens``
    of filler; the model must continue "The pass key is" with it. Greedy; exact match of the key's tokens."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    filler = encode(FILLER)
    correct = 0
    for _ in range(trials):
        key = str(rng.randint(10000, 99999))
        needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key. ")
        question = encode(" What is the pass key? The pass key is")
        answer = encode(f" {key}")
        budget = max(context_tokens - len(needle) - len(question), len(filler))
        hay = (filler * (budget // len(filler) + 1))[:budget]
        depth = rng.randint(0, len(hay))
        ids = torch.tensor([hay[:depth] + needle + hay[depth:] + question], device=device)
        generated = []
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for _ in range(len(answer)):
            token = out.logits[:, -1].argmax(-1)
            generated.append(int(token))
            out = model(input_ids=token[:, None], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        correct += int(generated == answer)
    return correct / trials


@torch.no_grad()
def mqar_accuracy(model: nn.Module, token_pool: Sequence[int], num_pairs: int = 16, num_queries: int = 16,
                  trials: int = 8, seed: int = 0) -> float:
    """Multi-query associative recall (Arora et al. 2023, Zoology), in-context: ``k1 v1 k2 v2 ... kN vN`` then
    queried keys ``k_i`` whose next token must be ``v_i``. Keys and values are distinct tokens drawn from
    ``token_pool``; the score is next-token accuracy on the queried values (teacher-forced, one forward)."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    pool = list(dict.fromkeys(int(t) for t in token_pool))
    if len(pool) < 2 * num_pairs:
        raise ValueError(f"mqar needs {2 * num_pairs} distinct tokens, the pool has {len(pool)}")
    hits = total = 0
    for _ in range(trials):
        drawn = rng.sample(pool, 2 * num_pairs)
        keys, values = drawn[:num_pairs], drawn[num_pairs:]
        context = [t for kv in zip(keys, values) for t in kv]
        asked = [rng.randrange(num_pairs) for _ in range(num_queries)]
        query = [t for i in asked for t in (keys[i], values[i])]
        ids = torch.tensor([context + query], device=device)
        pred = model(input_ids=ids, use_cache=False).logits[0].argmax(-1)  # (T,)
        start = len(context)
        for j, i in enumerate(asked):
            position = start + 2 * j  # the key token; its prediction must be the value
            hits += int(pred[position] == values[i])
            total += 1
    return hits / max(total, 1)
