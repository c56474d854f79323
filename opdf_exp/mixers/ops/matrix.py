"""Materialised mixing matrices ``M`` (B, H, T, T) with ``o = M v`` per head, for MOHAWK-style matrix alignment.

Why O(T^2) here when the kernels are linear: matrix orientation regresses the student's mixing matrix onto the
teacher's attention probabilities at training length (T = 512), where a T x T matrix per head is cheap. These are
written from the closed forms, independently of the chunked kernels, so ``M @ v == op(q, k, v, ...)`` is a test.
All assume a zero initial state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _tril(t: int, device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool, device=device).tril(diagonal)


def gated_matrix(q, k, g=None, *, scale: float) -> torch.Tensor:
    """``M_ij = scale * sum_d q_id k_jd exp(G_id - G_jd)`` for ``j <= i``; G the cumulative log decay.

    g None (linear attention), [B,T,H] (scalar) or [B,T,H,K] (per key dim, GLA: chunked, see ``_per_key_matrix``).
    """
    qh, kh = (q * scale).transpose(1, 2), k.transpose(1, 2)  # (B, H, T, K)
    t = q.shape[1]
    tri = _tril(t, q.device)
    if g is None:
        return (qh @ kh.transpose(-1, -2)).masked_fill(~tri, 0.0)
    cum = g.transpose(1, 2).cumsum(2)  # (B, H, T) or (B, H, T, K)
    if g.dim() == 3:
        dec = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~tri, float("-inf")).exp()
        return (qh @ kh.transpose(-1, -2)) * dec
    return _per_key_matrix(qh, kh, cum)


def _per_key_matrix(qh, kh, cum, chunk: int | None = None) -> torch.Tensor:
    """The per-key-dim gated matrix without the (B, H, T, T, K) decay tensor, which made GLA's matrix target cost
    41 s a stage-1 step against 2.2 s for the output target (T = 128, K = 64, 30 layers).

    Split T into N chunks of C. A block of query chunk a and key chunk b < a factors through the chunk ends
    ``e`` (the last cumulative log decay of each chunk): ``exp(G_i - G_j) = exp(G_i - e_{a-1}) exp(e_{a-1} - e_b)
    exp(e_b - G_j)``, each factor <= 1 because G falls along T, so nothing overflows and the blocks are one einsum
    over a (N, N, K) decay. Only the N diagonal blocks materialise their (C, C, K) decays. Memory O(T (C + N) K),
    smallest at C ~ sqrt(T), instead of O(T^2 K). ``chunk=T`` is the closed form (one diagonal block).
    """
    b, h, t, dk = qh.shape
    c = chunk or max(1, round(t ** 0.5))
    n = -(-t // c)
    pad = n * c - t
    if pad:  # zero queries and keys, no decay: padded rows and columns are zero and are cropped below
        qh, kh = F.pad(qh, (0, 0, 0, pad)), F.pad(kh, (0, 0, 0, pad))
        cum = torch.cat([cum, cum[:, :, -1:].expand(b, h, pad, dk)], 2)
    q, k, g = (z.reshape(b, h, n, c, dk) for z in (qh, kh, cum))  # (B, H, N, C, K)
    # diagonal blocks: (B, H, N, C, C, K) decays, causal within the chunk
    diff = (g.unsqueeze(-2) - g.unsqueeze(-3)).masked_fill(~_tril(c, q.device)[..., None], float("-inf"))
    diag = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, diff.exp())  # (B, H, N, C, C)
    # off-diagonal blocks: the reference of query chunk a is e_{a-1} (chunk 0 has none: its own start, unused)
    ends = g[:, :, :, -1]  # (B, H, N, K)
    ref = torch.cat([g[:, :, :1, 0], ends[:, :, :-1]], 2)  # (B, H, N, K)
    q_in = q * (g - ref.unsqueeze(-2)).exp()  # exp(G_i - e_{a-1}) <= 1
    k_out = k * (ends.unsqueeze(-2) - g).exp()  # exp(e_b - G_j) <= 1
    between = ref.unsqueeze(3) - ends.unsqueeze(2)  # (B, H, N_a, N_b, K): e_{a-1} - e_b <= 0 for b < a
    between = between.masked_fill(~_tril(n, q.device, -1)[..., None], float("-inf")).exp()
    off = torch.einsum("zhaik,zhack,zhcjk->zhaicj", q_in, between, k_out)  # (B, H, N, C, N, C)
    blocks = off + torch.einsum("zhnij,nm->zhnimj", diag, torch.eye(n, dtype=diag.dtype, device=diag.device))
    return blocks.reshape(b, h, n * c, n * c)[:, :, :t, :t]


def delta_matrix(q, k, beta, g=None, *, scale: float) -> torch.Tensor:
    """The delta rule as a matrix mixer: ``M = tril(Q K^T * Gamma) (I + tril_{-1}(diag(beta) K K^T * Gamma))^{-1}
    diag(beta)``, the WY form over the whole sequence."""
    qh, kh = (q * scale).transpose(1, 2), k.transpose(1, 2)  # (B, H, T, K)
    bh = beta.transpose(1, 2)  # (B, H, T)
    t = q.shape[1]
    tri = _tril(t, q.device)
    if g is None:
        gamma = tri.to(q.dtype)
    else:
        cum = g.transpose(1, 2).cumsum(2)
        gamma = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~tri, float("-inf")).exp()
    lhs = (bh.unsqueeze(-1) * (kh @ kh.transpose(-1, -2)) * gamma).masked_fill(~_tril(t, q.device, -1), 0.0)
    lhs = lhs + torch.eye(t, dtype=q.dtype, device=q.device)
    inv = torch.linalg.solve_triangular(lhs, torch.diag_embed(bh), upper=False, unitriangular=True)
    return ((qh @ kh.transpose(-1, -2)) * gamma) @ inv


def mlstm_matrix(q, k, i, f, *, scale: float, eps: float = 1e-6) -> torch.Tensor:
    """xLSTM's parallel form: ``D_ij = exp(F_i - F_j + i_j - m_i)``, ``C = (scale Q K^T * D) / (max(|rowsum|,
    e^{-m}) + eps)``, with ``m_i = max(F_i, max_{j<=i} F_i - F_j + i_j)`` (the recurrent max state from m_0 = 0)."""
    qh, kh = (q * scale).transpose(1, 2), k.transpose(1, 2)
    t = q.shape[1]
    tri = _tril(t, q.device)
    flog = F.logsigmoid(f.to(torch.promote_types(f.dtype, torch.float32))).to(q.dtype)  # float64 stays float64
    cum = flog.transpose(1, 2).cumsum(2)  # (B, H, T)
    logd = (cum.unsqueeze(-1) - cum.unsqueeze(-2) + i.transpose(1, 2).unsqueeze(-2)).masked_fill(~tri, float("-inf"))
    m = torch.maximum(logd.max(-1).values, cum)  # (B, H, T)
    s = (qh @ kh.transpose(-1, -2)) * (logd - m.unsqueeze(-1)).exp()
    den = torch.maximum(s.sum(-1).abs(), (-m).exp()) + eps
    return s / den.unsqueeze(-1)
