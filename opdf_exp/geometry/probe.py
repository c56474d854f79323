"""Linear probes for coarse and fine concepts on frozen hidden states (scikit-learn logistic regression).

Concepts (a reconstruction: the paper's probe set and its coarse/fine split are not public; see docs/geometry.md):

* **coarse / topic**: one-vs-rest BBC topic of a document, from the hidden states mean-pooled over its first windows;
* **coarse / block**: a token is *any* of a block of teacher SAE latents active (OR over ``block_size`` latents
  consecutive in importance order);
* **fine / latent**: a token has one given teacher SAE latent active (latents picked at spread importance ranks).

Every probe is binary and balanced by subsampling (chance = 50%); train/test splits are by document (topic) or by
window (token-level), so a probe never tests on a window it trained on. No Hydra here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from opdf_exp.geometry.sae import resolve_module


@torch.no_grad()
def hidden_states(model: nn.Module, module_path: str, windows: torch.Tensor, batch_size: int = 32,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """The hooked module's output for every token, on the CPU: (n_windows, seq_len, d)."""
    module = resolve_module(model, module_path)
    store: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, _i, out: store.append((out[0] if isinstance(out, (tuple, list)) else out).detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size].to(device))
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(store)


def balanced_indices(labels: np.ndarray, rng: np.random.Generator, max_per_class: int | None = None) -> np.ndarray:
    """Indices with as many positives as negatives (the smaller class sets the count, capped by ``max_per_class``)."""
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels.astype(bool))
    k = min(len(pos), len(neg))
    if max_per_class:
        k = min(k, max_per_class)
    if k == 0:
        return np.array([], dtype=int)
    return np.sort(np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]))


def probe_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int = 0,
                   test_fraction: float = 0.2, max_per_class: int | None = 2000, C: float = 1.0,
                   max_iter: int = 500) -> float:
    """Held-out accuracy of a standardised logistic-regression probe on a balanced binary task; train and test
    are split by ``groups`` (documents or windows). NaN when a split lacks one of the classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(bool)
    unique = np.unique(groups)
    test_groups = rng.choice(unique, max(1, int(round(test_fraction * unique.size))), replace=False)
    is_test = np.isin(groups, test_groups)
    train_idx = np.flatnonzero(~is_test)[balanced_indices(labels[~is_test], rng, max_per_class)]
    test_idx = np.flatnonzero(is_test)[balanced_indices(labels[is_test], rng, max_per_class)]
    if train_idx.size < 4 or test_idx.size < 2:
        return float("nan")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    clf.fit(features[train_idx], labels[train_idx])
    return float(clf.score(features[test_idx], labels[test_idx]))


@dataclass
class Concept:
    name: str
    kind: str  # coarse | fine
    level: str  # window | token
    labels: np.ndarray
    importance_rank: int | None = None


def topic_concepts(window_labels: np.ndarray, label_names) -> list[Concept]:
    return [Concept(f"topic:{name}", "coarse", "window", window_labels == i) for i, name in enumerate(label_names)]


def latent_concepts(z: torch.Tensor, importances_order: np.ndarray, n_fine: int = 6, n_blocks: int = 3,
                    block_size: int = 32, min_rate: float = 0.002, max_rate: float = 0.5) -> list[Concept]:
    """Token-level concepts from teacher SAE codes ``z`` (tokens x latents).

    ``importances_order`` lists latent ids from most to least important (E[z^2]). Fine concepts are single latents
    at evenly spread importance ranks among those firing on ``min_rate``..``max_rate`` of tokens; coarse block
    concepts are ORs over ``block_size`` consecutive latents starting at evenly spread ranks.
    """
    active = (z > 0).numpy()
    rates = active.mean(0)
    usable = [int(i) for i in importances_order if min_rate <= rates[i] <= max_rate]
    concepts: list[Concept] = []
    if usable:
        picks = np.unique(np.linspace(0, len(usable) - 1, num=min(n_fine, len(usable))).round().astype(int))
        rank_of = {int(lat): r for r, lat in enumerate(importances_order)}
        for p in picks:
            lat = usable[p]
            concepts.append(Concept(f"latent:{lat}", "fine", "token", active[:, lat], rank_of[lat]))
    order = [int(i) for i in importances_order]
    starts = np.unique(np.linspace(0, max(0, len(order) - block_size), num=n_blocks).round().astype(int))
    for s in starts:
        block = order[s:s + block_size]
        labels = active[:, block].any(1)
        if 0 < labels.mean() < 1:
            concepts.append(Concept(f"block:{s}-{s + len(block) - 1}", "coarse", "token", labels, int(s)))
    return concepts


def pool_by_group(features: torch.Tensor, groups: np.ndarray) -> torch.Tensor:
    """Mean of the rows of ``features`` per group, in sorted group order (e.g. windows -> documents)."""
    ids, inverse = np.unique(groups, return_inverse=True)
    index = torch.as_tensor(inverse)
    sums = torch.zeros(len(ids), features.shape[1], dtype=features.dtype).index_add_(0, index, features)
    counts = torch.bincount(index, minlength=len(ids)).clamp_min(1).unsqueeze(1)
    return sums / counts


def run_probes(doc_states: dict[str, torch.Tensor], token_states: dict[str, torch.Tensor], concepts: list[Concept],
               seed: int = 0, max_per_class: int = 2000) -> list[dict]:
    """Accuracy of every concept on every model.

    ``doc_states[model]`` is (n_docs, d) (mean-pooled per document; window-level concepts, split by document);
    ``token_states[model]`` is (n_windows, seq_len, d) (token-level concepts, split by window).
    """
    rows = []
    for model_name, pooled in doc_states.items():
        h = token_states[model_name]
        n_windows, seq_len, d = h.shape
        tokens = h.reshape(-1, d).numpy()
        token_groups = np.repeat(np.arange(n_windows), seq_len)
        doc_groups = np.arange(pooled.shape[0])
        for c in concepts:
            if c.level == "window":
                acc = probe_accuracy(pooled.numpy(), c.labels, doc_groups, seed, max_per_class=max_per_class)
            else:
                acc = probe_accuracy(tokens, c.labels, token_groups, seed, max_per_class=max_per_class)
            rows.append({"model": model_name, "concept": c.name, "kind": c.kind, "level": c.level,
                         "importance_rank": c.importance_rank, "positive_rate": float(np.mean(c.labels)),
                         "accuracy": acc})
    return rows
