"""The recurrences as plain float32 loops over time (float64 for float64 inputs): the specification, and the oracles of the chunked kernels.

Why keep these separate and slow: each function is the published recurrence written one token at a time, as in
fla's ``ops/*/naive.py`` and mlstm_kernels' ``native`` step, so that reading it is enough to know what the op
computes. They are used by ``mode="recurrent"``, by the generation ``step`` of every mixer, and by the tests; never
for training (a Python loop over T is 100-500x slower than the chunked form on CPU).

All take fla's ``[B, T, H, D]`` layout and return ``(o, final_state)`` with ``o`` in the input dtype; the state is
accumulated in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc(x: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype of the oracles: float32, or float64 for float64 inputs (so float64 checks of the
    chunked kernels are limited by the kernels, not by the oracle)."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _state(initial_state, b, h, k, v, device, like: torch.Tensor | None = None):
    if initial_state is None:
        dtype = torch.float64 if like is not None and like.dtype == torch.float64 else torch.float32
        return torch.zeros(b, h, k, v, dtype=dtype, device=device)
    return _acc(initial_state)


def recurrent_gated_linear_attention(q, k, v, g=None, *, scale: float, initial_state=None, output_final_state=False):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``; ``o_t = scale * S_t^T q_t``. g: None, [B,T,H] or [B,T,H,K]."""
    b, t, h, kd = q.shape
    state = _state(initial_state, b, h, kd, v.shape[-1], q.device, like=q)
    # Per-token views made once (unbind): indexing inside the loop would cost a full-size zero gradient per step.
    qs, ks, vs = (_acc(q) * scale).unbind(1), _acc(k).unbind(1), _acc(v).unbind(1)  # T x (B, H, D)
    decay = None if g is None else (_acc(g).exp().unsqueeze(-1) if g.dim() == 4 else
                                    _acc(g).exp()[..., None, None]).unbind(1)  # T x (B, H, K|1, 1)
    outs = []
    for i in range(t):
        if decay is not None:
            state = state * decay[i]
        state = state + ks[i].unsqueeze(-1) * vs[i].unsqueeze(-2)  # (B, H, K, V)
        outs.append((qs[i].unsqueeze(-1) * state).sum(-2))  # (B, H, V)
    o = torch.stack(outs, 1).to(v.dtype)  # (B, T, H, V)
    return o, (state if output_final_state else None)


def recurrent_delta_rule(q, k, v, beta, g=None, *, scale: float, initial_state=None, output_final_state=False):
    """``S = exp(g_t) S``; ``u = beta_t (v_t - S^T k_t)``; ``S = S + k_t u^T``; ``o_t = scale * S^T q_t``."""
    b, t, h, kd = q.shape
    state = _state(initial_state, b, h, kd, v.shape[-1], q.device, like=q)
    qs, ks, vs = (_acc(q) * scale).unbind(1), _acc(k).unbind(1), _acc(v).unbind(1)
    betas = _acc(beta).unsqueeze(-1).unbind(1)  # T x (B, H, 1)
    decay = None if g is None else _acc(g).exp()[..., None, None].unbind(1)
    outs = []
    for i in range(t):
        if decay is not None:
            state = state * decay[i]
        u = (vs[i] - (ks[i].unsqueeze(-1) * state).sum(-2)) * betas[i]  # (B, H, V)
        state = state + ks[i].unsqueeze(-1) * u.unsqueeze(-2)
        outs.append((qs[i].unsqueeze(-1) * state).sum(-2))
    o = torch.stack(outs, 1).to(v.dtype)
    return o, (state if output_final_state else None)


def recurrent_mlstm(q, k, v, i, f, *, scale: float, initial_state=None, output_final_state=False, eps: float = 1e-6):
    """The stabilised mLSTM cell (xLSTM; mlstm_kernels' native step), gates as pre-activations [B, T, H].

    ``m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)``, ``C_t = e^{logsig f_t + m_{t-1} - m_t} C_{t-1} + e^{i_t - m_t}
    k_t v_t^T``, ``n_t`` the same with ``k_t``; ``h_t = C_t^T q~ / (max(|n_t . q~|, e^{-m_t}) + eps)``, ``q~ =
    scale * q_t``. State: ``(C [B,H,K,V], n [B,H,K], m [B,H])``, zeros by default.
    """
    b, t, h, kd = q.shape
    vd = v.shape[-1]
    if initial_state is None:
        dtype = _acc(q[:0]).dtype
        c_state = torch.zeros(b, h, kd, vd, dtype=dtype, device=q.device)
        n_state = torch.zeros(b, h, kd, dtype=dtype, device=q.device)
        m_state = torch.zeros(b, h, dtype=dtype, device=q.device)
    else:
        c_state, n_state, m_state = (_acc(s) for s in initial_state)
    flog, ig = F.logsigmoid(_acc(f)).unbind(1), _acc(i).unbind(1)  # T x (B, H)
    qs, ks, vs = (_acc(q) * scale).unbind(1), _acc(k).unbind(1), _acc(v).unbind(1)
    outs = []
    for s in range(t):
        m_new = torch.maximum(flog[s] + m_state, ig[s])  # (B, H)
        f_act = (flog[s] + m_state - m_new).exp().unsqueeze(-1)  # (B, H, 1)
        i_act = (ig[s] - m_new).exp().unsqueeze(-1)
        c_state = f_act.unsqueeze(-1) * c_state + (i_act * ks[s]).unsqueeze(-1) * vs[s].unsqueeze(-2)
        n_state = f_act * n_state + i_act * ks[s]
        m_state = m_new
        num = (qs[s].unsqueeze(-1) * c_state).sum(-2)  # (B, H, V)
        den = torch.maximum((qs[s] * n_state).sum(-1).abs(), (-m_state).exp()) + eps
        outs.append(num / den.unsqueeze(-1))
    o = torch.stack(outs, 1).to(v.dtype)
    return o, ((c_state, n_state, m_state) if output_final_state else None)


def recurrent_ssd(x, dt, A, B, C, *, initial_state=None, output_final_state=False):
    """Mamba2's selective state space, one token at a time (``ssd_minimal``'s definition).

    ``h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T``; ``y_t = h_t^T C_t``. x: [B,T,H,P]; dt: [B,T,H] (positive,
    softplus already applied); A: [H] (negative); B, C: [B,T,G,N] with G dividing H (head h reads group
    h // (H/G)). State [B, H, N, P] (key-first like fla; mamba_ssm stores its transpose [B, H, P, N]).
    """
    b, t, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)  # (B, T, H, N)
    state = _state(initial_state, b, h, B.shape[-1], p, x.device, like=x)
    decay = (_acc(dt) * _acc(A)).exp()[..., None, None].unbind(1)  # T x (B, H, 1, 1)
    inp = (_acc(dt).unsqueeze(-1) * _acc(Bh)).unbind(1)  # T x (B, H, N): dt_t B_t
    xs, cs = _acc(x).unbind(1), _acc(Ch).unbind(1)
    outs = []
    for s in range(t):
        state = state * decay[s] + inp[s].unsqueeze(-1) * xs[s].unsqueeze(-2)  # (B, H, N, P)
        outs.append((cs[s].unsqueeze(-1) * state).sum(-2))  # (B, H, P)
    y = torch.stack(outs, 1).to(x.dtype)
    return y, (state if output_final_state else None)
