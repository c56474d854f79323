"""Shared chunk primitives: one gated-linear-attention core and one WY-form delta-rule core.

Why two cores and not eight kernels: linear attention, RetNet (simple GLA), GLA, Mamba2's SSD and the input side
of mLSTM are all ``S_t = diag(a_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t`` with the decay ``a_t`` absent, a scalar
per head, or a vector over the key dims; DeltaNet and Gated DeltaNet are the same with the delta-rule correction,
which the WY representation turns into one triangular solve per chunk. So a fix or a speed-up lands once.

Layout is fla's: ``[B, T, H, D]`` inputs, gates in log space (``g <= 0``), state ``[B, H, K, V]``. Inside the
cores tensors are head-first and chunked, ``(B, H, N, C, D)`` with ``N`` chunks of ``C`` tokens. Everything within a
chunk is a batched matmul over all chunks at once; only the inter-chunk state (a ``K x V`` matrix per head) is
carried by a Python loop over the ``N`` chunks, never over tokens.

Numerical safety: scalar decays use the pairwise ``b_i - b_j`` matrix (every ``exp`` exponent <= 0). Per-key-dim
decays (GLA) take one of two exact paths, chosen per call: when every chunk's total log decay is above
``-SAFE_SPAN`` (the usual case: fla's ``logsigmoid(.)/16`` gates decay by about e^-3 per 64 tokens) a single
reference at the chunk start turns the intra-chunk scores into one matmul; otherwise sub-chunks of 8 tokens with
pairwise ``(c, c, K)`` factors on the diagonal blocks and a reference at the end of the key's sub-chunk off the
diagonal (the idea of fla's ``chunk_gla``), so decays down to -20 per token neither overflow nor underflow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# Largest log-decay span inside one chunk for which GLA uses a single reference point (e^40 ~ 2e17, far from the
# float32 limits for both the scaled keys and the scaled queries).
SAFE_SPAN = 40.0


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fla's ``l2norm``: ``x / sqrt(sum(x^2) + eps)`` over the last dim."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def pad_time(x: torch.Tensor | None, multiple: int, value: float = 0.0) -> torch.Tensor | None:
    """Right-pad dim 1 (time) of a ``[B, T, ...]`` tensor to a multiple of ``multiple``."""
    if x is None:
        return None
    extra = (-x.shape[1]) % multiple
    if not extra:
        return x
    pad = [0, 0] * (x.dim() - 2) + [0, extra]
    return F.pad(x, pad, value=value)


def to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """``[B, T, H, *D]`` (T a multiple of ``chunk``) -> ``(B, H, N, C, *D)``."""
    b, t, h = x.shape[:3]
    x = x.reshape(b, t // chunk, chunk, h, *x.shape[3:])  # (B, N, C, H, *D)
    return x.movedim(3, 1)  # (B, H, N, C, *D)


def from_chunks(x: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, H, N, C, D)`` -> ``[B, length, H, D]``."""
    b, h, n, c, d = x.shape
    return x.movedim(1, 3).reshape(b, n * c, h, d)[:, :length]


def _causal_mask(c: int, device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(c, c, dtype=torch.bool, device=device).tril(diagonal)


def _vector_decay_intra(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub: int) -> torch.Tensor:
    """Intra-chunk scores ``A_ij = sum_d q_id k_jd exp(b_id - b_jd)`` for ``j <= i``, stably.

    q, k, b: (B, H, N, C, K) with b the within-chunk cumulative log decay. Returns (B, H, N, C, C).
    """
    bsz, h, n, c, kd = q.shape
    s = c // sub
    qs, ks, bs = (t.reshape(bsz, h, n, s, sub, kd) for t in (q, k, b))  # (B, H, N, S, c, K)
    # Diagonal sub-blocks: explicit pairwise decay factors, exponent <= 0 where j <= i.
    tri = _causal_mask(sub, q.device)
    diff = (bs.unsqueeze(-2) - bs.unsqueeze(-3)).masked_fill(~tri[:, :, None], float("-inf"))  # (B,H,N,S,c,c,K)
    a_diag = torch.einsum("...ik,...jk,...ijk->...ij", qs, ks, diff.exp())  # (B, H, N, S, c, c)
    # Off-diagonal blocks: reference r = b at the last token of the key's sub-chunk.
    ref = bs[..., -1, :]  # (B, H, N, S, K)
    kr = ks * (ref.unsqueeze(-2) - bs).exp()  # (B, H, N, S, c, K), exponent <= 0
    qr = q.unsqueeze(-2) * (b.unsqueeze(-2) - ref.unsqueeze(-3)).clamp(max=0).exp()  # (B, H, N, C, S, K)
    a_off = torch.einsum("...isk,...sjk->...isj", qr, kr)  # (B, H, N, C, S, c)
    a_off = a_off.reshape(bsz, h, n, s, sub, s, sub)
    blk = torch.arange(s, device=q.device)
    lower = (blk[:, None] > blk[None, :]).to(q.dtype)[:, None, :, None]  # (S, 1, S, 1): strictly earlier sub-chunk
    eye = torch.eye(s, dtype=q.dtype, device=q.device)[:, None, :, None]
    full = a_off * lower + a_diag.unsqueeze(-2) * eye  # (B, H, N, S, c, S, c)
    return full.reshape(bsz, h, n, c, c)


def chunk_gated_linear_attention(q, k, v, g=None, *, scale: float, initial_state=None, output_final_state=False,
                                 chunk_size: int = 64, sub_chunk: int = 8):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``, computed chunkwise.

    q, k: [B, T, H, K]; v: [B, T, H, V]; g: None, [B, T, H] (scalar log decay) or [B, T, H, K] (per key dim).
    Returns o [B, T, H, V] and the final state [B, H, K, V] (or None).
    """
    bsz, length, h, kd = q.shape
    vd = v.shape[-1]
    c = chunk_size
    kind = "none" if g is None else ("scalar" if g.dim() == 3 else "vector")
    if kind == "vector" and c % sub_chunk:
        sub_chunk = c
    q, k, v, g = (pad_time(t, c) for t in (q * scale, k, v, g))
    q, k, v = to_chunks(q, c), to_chunks(k, c), to_chunks(v, c)  # (B, H, N, C, D)
    n = q.shape[2]
    tri = _causal_mask(c, q.device)
    if kind == "none":
        attn = (q @ k.transpose(-1, -2)).masked_fill(~tri, 0.0)  # (B, H, N, C, C)
        q_in, k_in, decay = q, k, None
    else:
        b = to_chunks(g, c).cumsum(3)  # (B, H, N, C) or (B, H, N, C, K)
        if kind == "scalar":
            dec = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~tri, float("-inf")).exp()  # (B, H, N, C, C)
            attn = (q @ k.transpose(-1, -2)) * dec
            b_k = b.unsqueeze(-1)  # (B, H, N, C, 1)
        elif bool((b[:, :, :, -1] > -SAFE_SPAN).all()):
            # Every chunk decays by less than e^-SAFE_SPAN in every key dim: one reference at the chunk start
            # keeps q e^{b} <= 1 and k e^{-b} <= e^{SAFE_SPAN}, so a single matmul per chunk is exact.
            attn = ((q * b.exp()) @ (k * (-b).exp()).transpose(-1, -2)).masked_fill(~tri, 0.0)
            b_k = b
        else:
            attn = _vector_decay_intra(q, k, b, sub_chunk)
            b_k = b
        last = b_k[:, :, :, -1:]  # (B, H, N, 1, K|1)
        q_in = q * b_k.exp()
        k_in = k * (last - b_k).exp()
        decay = last.squeeze(3).exp()  # (B, H, N, K|1)
    o = attn @ v  # (B, H, N, C, V)
    upd = k_in.transpose(-1, -2) @ v  # (B, H, N, K, V): each chunk's own contribution to the state at its end
    state = (torch.zeros(bsz, h, kd, vd, dtype=q.dtype, device=q.device) if initial_state is None
             else initial_state.to(q.dtype))
    # unbind once: indexing chunk i inside the loop would make autograd allocate a full-size zero gradient per
    # chunk (select_backward), O(N^2) memory traffic that showed up as super-linear backward time.
    upd = upd.unbind(2)
    decay = None if decay is None else decay.unsqueeze(-1).unbind(2)  # N x (B, H, K|1, 1)
    starts = []
    for i in range(n):
        starts.append(state)
        state = (state if decay is None else state * decay[i]) + upd[i]
    o = o + q_in @ torch.stack(starts, 2)  # (B, H, N, C, V)
    return from_chunks(o, length), (state if output_final_state else None)


def chunk_delta_rule_core(q, k, v, beta, g=None, *, scale: float, initial_state=None, output_final_state=False,
                          chunk_size: int = 64):
    """The (gated) delta rule in WY form: ``S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T``.

    Within a chunk, ``U = T (beta * V - W S)`` with ``T = (I + tril_{-1}(diag(beta) (K K^T * Gamma)))^{-1}``
    from one batched unit-triangular solve; between chunks the state is carried by a loop over chunks.
    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g: None or [B, T, H] (scalar log decay).
    """
    bsz, length, h, kd = q.shape
    vd = v.shape[-1]
    c = chunk_size
    q, k, v, beta, g = (pad_time(t, c) for t in (q * scale, k, v, beta, g))
    q, k, v = to_chunks(q, c), to_chunks(k, c), to_chunks(v, c)  # (B, H, N, C, D)
    beta = to_chunks(beta, c).unsqueeze(-1)  # (B, H, N, C, 1)
    n = q.shape[2]
    tri = _causal_mask(c, q.device)
    k_beta = k * beta
    kk = k_beta @ k.transpose(-1, -2)  # (B, H, N, C, C)
    qk = q @ k.transpose(-1, -2)
    if g is not None:
        b = to_chunks(g, c).cumsum(3)  # (B, H, N, C)
        gamma = (b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(~tri, float("-inf")).exp()  # (B, H, N, C, C)
        kk, qk = kk * gamma, qk * gamma
        b_k = b.unsqueeze(-1)  # (B, H, N, C, 1)
        last = b_k[:, :, :, -1:]
        q_in, k_w, k_s = q * b_k.exp(), k_beta * b_k.exp(), k * (last - b_k).exp()
        decay = last.squeeze(3).exp().unsqueeze(-1)  # (B, H, N, 1, 1)
    else:
        q_in, k_w, k_s, decay = q, k_beta, k, None
    eye = torch.eye(c, dtype=q.dtype, device=q.device)
    lhs = kk.masked_fill(~_causal_mask(c, q.device, -1), 0.0) + eye  # unit lower triangular
    rhs = torch.cat([v * beta, k_w], -1)  # (B, H, N, C, V + K)
    sol = torch.linalg.solve_triangular(lhs, rhs, upper=False, unitriangular=True)
    u, w = sol[..., :vd], sol[..., vd:]  # (B, H, N, C, V), (B, H, N, C, K)
    qk = qk.masked_fill(~tri, 0.0)
    state = (torch.zeros(bsz, h, kd, vd, dtype=q.dtype, device=q.device) if initial_state is None
             else initial_state.to(q.dtype))
    u, w, q_in, qk, k_t = u.unbind(2), w.unbind(2), q_in.unbind(2), qk.unbind(2), k_s.transpose(-1, -2).unbind(2)
    decay = None if decay is None else decay.unbind(2)  # N x (B, H, 1, 1)
    outs = []
    for i in range(n):
        v_new = u[i] - w[i] @ state  # (B, H, C, V)
        outs.append(q_in[i] @ state + qk[i] @ v_new)
        state = (state if decay is None else state * decay[i]) + k_t[i] @ v_new
    o = torch.stack(outs, 2)  # (B, H, N, C, V)
    return from_chunks(o, length), (state if output_final_state else None)
