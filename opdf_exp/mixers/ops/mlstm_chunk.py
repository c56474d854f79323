"""Chunkwise stabilised mLSTM: the same maths as :func:`naive.recurrent_mlstm`, with the exact same max-state ``m``.

Why a separate core and not the gated one: mLSTM's exponential input gate needs a running maximum ``m_t`` to stay
finite, and its output divides by a normaliser. Both fold into the chunk scheme: ``m`` only depends on the scalar
gates, so its value at every chunk boundary is carried by a cheap loop over chunks on ``(B, H)`` tensors, and
within a chunk ``m_t = b_t + max(M, cummax_j(i_j - b_j))`` (``b`` the within-chunk cumulative log forget gate,
``M`` the boundary value) is exactly the recurrent ``m_t``. Every weight is then ``exp(. - m_t) <= 1``. The
normaliser ``n`` is carried as one extra value column of ones, so numerator and denominator share one pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from opdf_exp.mixers.ops.common import _causal_mask, from_chunks, pad_time, to_chunks


def chunk_mlstm(q, k, v, i, f, *, scale: float, initial_state=None, output_final_state=False, eps: float = 1e-6,
                chunk_size: int = 64):
    bsz, length, h, kd = q.shape
    vd = v.shape[-1]
    c = chunk_size
    flog = F.logsigmoid(f.to(torch.promote_types(f.dtype, torch.float32))).to(q.dtype)
    # Padding is neutral: no input (i = -inf), no forgetting (log f = 0).
    i = pad_time(i, c, float("-inf"))
    q, k, v, flog = (pad_time(t, c) for t in (q * scale, k, v, flog))
    v = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # the normaliser rides along as value column V
    q, k, v = to_chunks(q, c), to_chunks(k, c), to_chunks(v, c)  # (B, H, N, C, D)
    b = to_chunks(flog, c).cumsum(3)  # (B, H, N, C)
    a = to_chunks(i, c) - b  # log weight of key j relative to the chunk start
    a_cummax = a.cummax(3).values
    a_max, b_last = a_cummax[..., -1], b[..., -1]  # (B, H, N)
    if initial_state is None:
        c_state = torch.zeros(bsz, h, kd, vd + 1, dtype=q.dtype, device=q.device)
        m_state = torch.zeros(bsz, h, dtype=q.dtype, device=q.device)
    else:
        c0, n0, m0 = initial_state
        c_state = torch.cat([c0, n0.unsqueeze(-1)], -1).to(q.dtype)
        m_state = m0.to(q.dtype)
    m_starts = [m_state]
    for b_j, a_j in zip(b_last.unbind(2), a_max.unbind(2)):  # boundary values of m: a scan over chunks on (B, H)
        m_starts.append(b_j + torch.maximum(a_j, m_starts[-1]))
    m_start = torch.stack(m_starts[:-1], 2)  # (B, H, N) m entering each chunk
    m_end = torch.stack(m_starts[1:], 2)  # (B, H, N) m at each chunk's last token
    m = b + torch.maximum(a_cummax, m_start.unsqueeze(-1))  # (B, H, N, C) == the recurrent m_t
    tri = _causal_mask(c, q.device)
    w = (b.unsqueeze(-1) + a.unsqueeze(-2) - m.unsqueeze(-1)).masked_fill(~tri, float("-inf")).exp()  # (B,H,N,C,C)
    o = ((q @ k.transpose(-1, -2)) * w) @ v  # (B, H, N, C, V+1)
    q_in = q * (b + m_start.unsqueeze(-1) - m).exp().unsqueeze(-1)  # exponent <= 0
    k_in = k * (b_last.unsqueeze(-1) + a - m_end.unsqueeze(-1)).exp().unsqueeze(-1)  # exponent <= 0
    upd = k_in.transpose(-1, -2) @ v  # (B, H, N, K, V+1)
    carry = (b_last + m_start - m_end).exp()[..., None, None]  # (B, H, N, 1, 1)
    starts = []
    for carry_j, upd_j in zip(carry.unbind(2), upd.unbind(2)):  # unbind: see common.chunk_gated_linear_attention
        starts.append(c_state)
        c_state = c_state * carry_j + upd_j
    o = o + q_in @ torch.stack(starts, 2)
    num, den = o[..., :vd], o[..., vd]
    out = num / (torch.maximum(den.abs(), (-m).exp()) + eps).unsqueeze(-1)
    final = None
    if output_final_state:
        final = (c_state[..., :vd], c_state[..., vd], m_starts[-1])
    return from_chunks(out, length), final
