"""Token-mixer recurrences on fla's ``[B, T, H, D]`` layout: ``op(q, k, v, <gates>, *, mode, scale, initial_state,
output_final_state) -> (o, final_state)``.

Why one signature: a mixer layer, a test or a benchmark can swap ops without adapters, and the fla kernels (same
layout, gates in log space, state ``[B, H, K, V]``, ``scale`` defaulting to ``K ** -0.5``) drop in on CUDA.
``mode="chunk"`` is the training path (chunked, batched matmuls; see :mod:`.common`); ``mode="recurrent"`` is the
float32 loop over time of :mod:`.naive` (the oracle and the generation step).

| op | recurrence | reduces to |
|---|---|---|
| ``linear_attn(q, k, v)`` | ``S = S + k v^T`` | gated core, no decay |
| ``simple_gla(q, k, v, g)`` | ``S = e^{g} S + k v^T``, g [B,T,H] | gated core, scalar decay (RetNet: constant g) |
| ``gla(q, k, v, gk)`` | ``S = diag(e^{gk}) S + k v^T``, gk [B,T,H,K] | gated core, vector decay |
| ``delta_rule(q, k, v, beta)`` | ``S = S + beta k (v - S^T k)^T`` | WY core |
| ``gated_delta_rule(q, k, v, g, beta)`` | ``S = e^{g} S``, then the delta update | WY core, scalar decay |
| ``mlstm(q, k, v, i, f)`` | stabilised mLSTM with normaliser | :mod:`.mlstm_chunk` |
| ``ssd(x, dt, A, B, C)`` | Mamba2: ``h = e^{dt A} h + dt B x^T``, ``y = h^T C`` | gated core, scalar decay |
"""
from __future__ import annotations

import torch

from opdf_exp.errors import ConfigError
from opdf_exp.mixers.ops import naive
from opdf_exp.mixers.ops.common import chunk_delta_rule_core, chunk_gated_linear_attention, l2norm
from opdf_exp.mixers.ops.fast import fast_kernel
from opdf_exp.mixers.ops.matrix import delta_matrix, gated_matrix, mlstm_matrix
from opdf_exp.mixers.ops.mlstm_chunk import chunk_mlstm

__all__ = ["linear_attn", "simple_gla", "gla", "delta_rule", "gated_delta_rule", "mlstm", "ssd", "l2norm",
           "gated_matrix", "delta_matrix", "mlstm_matrix", "ssd_matrix", "MODES"]

MODES = ("chunk", "recurrent")


def _setup(mode: str, q: torch.Tensor, scale: float | None) -> float:
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not one of {list(MODES)}")
    if q.dim() != 4:
        raise ConfigError(f"ops take [B, T, H, D] tensors; got q of shape {tuple(q.shape)}")
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _float32(fn):
    """Run the torch path in float32 for half-precision inputs (like fla's references) and cast ``o`` back."""
    def wrapped(*tensors, initial_state=None, **kwargs):
        dtype = tensors[0].dtype
        if dtype not in (torch.float16, torch.bfloat16):
            return fn(*tensors, initial_state=initial_state, **kwargs)
        up = [None if t is None else t.float() for t in tensors]
        if isinstance(initial_state, tuple):
            initial_state = tuple(s.float() for s in initial_state)
        elif initial_state is not None:
            initial_state = initial_state.float()
        o, final = fn(*up, initial_state=initial_state, **kwargs)
        return o.to(dtype), final
    return wrapped


_chunk_gla = _float32(chunk_gated_linear_attention)
_chunk_delta = _float32(chunk_delta_rule_core)
_chunk_mlstm = _float32(chunk_mlstm)
_naive_gla = _float32(naive.recurrent_gated_linear_attention)
_naive_delta = _float32(naive.recurrent_delta_rule)
_naive_mlstm = _float32(naive.recurrent_mlstm)
_naive_ssd = _float32(naive.recurrent_ssd)


def _gated(name, q, k, v, g, mode, scale, initial_state, output_final_state, chunk_size):
    scale = _setup(mode, q, scale)
    if mode == "recurrent":
        return _naive_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state)
    fused = fast_kernel(name, q)
    if fused is not None:
        extra = {} if g is None else {"g": g}
        if name == "linear_attn":
            extra["normalize"] = False
        return fused(q, k, v, **extra, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state)
    return _chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                      chunk_size=chunk_size)


def linear_attn(q, k, v, *, mode="chunk", scale=None, initial_state=None, output_final_state=False,
                chunk_size=64):
    """Causal linear attention without normaliser (fla ``chunk_linear_attn(normalize=False)``); feature maps are
    the layer's business."""
    return _gated("linear_attn", q, k, v, None, mode, scale, initial_state, output_final_state, chunk_size)


def simple_gla(q, k, v, g, *, mode="chunk", scale=None, initial_state=None, output_final_state=False,
               chunk_size=64):
    """GLA with one log decay per head and token, g [B, T, H] (<= 0). RetNet: g = log(gamma_h), constant."""
    return _gated("simple_gla", q, k, v, g, mode, scale, initial_state, output_final_state, chunk_size)


def gla(q, k, v, gk, *, mode="chunk", scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Gated linear attention with a log decay per key dim, gk [B, T, H, K] (<= 0; fla: logsigmoid(.)/16)."""
    return _gated("gla", q, k, v, gk, mode, scale, initial_state, output_final_state, chunk_size)


def _delta(name, q, k, v, g, beta, mode, scale, initial_state, output_final_state, use_qk_l2norm, chunk_size):
    scale = _setup(mode, q, scale)
    fused = fast_kernel(name, q) if mode == "chunk" else None
    if fused is not None:
        extra = {} if g is None else {"g": g}
        return fused(q, k, v, **extra, beta=beta, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    if mode == "recurrent":
        return _naive_delta(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state)
    return _chunk_delta(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, chunk_size=chunk_size)


def delta_rule(q, k, v, beta, *, mode="chunk", scale=None, initial_state=None, output_final_state=False,
               use_qk_l2norm=False, chunk_size=64):
    """DeltaNet, beta [B, T, H] in (0, 1). fla expects L2-normalised keys: pass ``use_qk_l2norm=True`` or
    normalise before."""
    return _delta("delta_rule", q, k, v, None, beta, mode, scale, initial_state, output_final_state,
                  use_qk_l2norm, chunk_size)


def gated_delta_rule(q, k, v, g, beta, *, mode="chunk", scale=None, initial_state=None, output_final_state=False,
                     use_qk_l2norm=False, chunk_size=64):
    """Gated DeltaNet (fla argument order ``q, k, v, g, beta``), g [B, T, H] log decay, beta [B, T, H]."""
    return _delta("gated_delta_rule", q, k, v, g, beta, mode, scale, initial_state, output_final_state,
                  use_qk_l2norm, chunk_size)


def mlstm(q, k, v, i, f, *, mode="chunk", scale=None, initial_state=None, output_final_state=False,
          eps=1e-6, chunk_size=64):
    """Stabilised mLSTM; i, f are the input/forget gate pre-activations [B, T, H] (exp input gate, sigmoid forget
    gate, as in xLSTM). State is ``(C [B,H,K,V], n [B,H,K], m [B,H])``: mLSTM needs its normaliser and max state
    besides the ``[B, H, K, V]`` matrix."""
    scale = _setup(mode, q, scale)
    if mode == "recurrent":
        return _naive_mlstm(q, k, v, i, f, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, eps=eps)
    getter = fast_kernel("mlstm", q)
    if getter is not None:
        kernel = getter("chunkwise--triton_xl_chunk")
        c0, n0, m0 = (None, None, None) if initial_state is None else initial_state
        hf = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  [B, T, H, D] -> [B, H, T, D]
        out = kernel(hf(q * (scale / q.shape[-1] ** -0.5)), hf(k), hf(v), hf(i), hf(f), c_initial=c0,
                     n_initial=n0, m_initial=None if m0 is None else m0.unsqueeze(-1),
                     return_last_states=output_final_state, chunk_size=chunk_size)
        if output_final_state:
            h, (c1, n1, m1) = out
            return h.transpose(1, 2), (c1, n1, m1.squeeze(-1))
        return out.transpose(1, 2), None
    return _chunk_mlstm(q, k, v, i, f, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, eps=eps, chunk_size=chunk_size)


def _ssd_as_gla(x, dt, A, B, C):
    rep = x.shape[2] // B.shape[2]
    q = C.repeat_interleave(rep, 2)  # (B, T, H, N): query <-> C
    k = B.repeat_interleave(rep, 2) * dt.unsqueeze(-1)  # key <-> dt * B
    return q, k, dt * A  # log decay dt * A <= 0


def ssd(x, dt, A, B, C, *, mode="chunk", initial_state=None, output_final_state=False, chunk_size=64):
    """Mamba2's SSD scan (no D skip, no gating: the layer adds them). x [B,T,H,P], dt [B,T,H] > 0, A [H] < 0,
    B, C [B,T,G,N]. State [B, H, N, P]. This is simple GLA with q = C, k = dt B, v = x, g = dt A, scale 1."""
    _setup(mode, x, None)
    if mode == "recurrent":
        return _naive_ssd(x, dt, A, B, C, initial_state=initial_state,
                          output_final_state=output_final_state)
    fused = fast_kernel("ssd", x)
    if fused is not None:
        init = None if initial_state is None else initial_state.transpose(-1, -2).contiguous()
        out = fused(x, dt, A, B, C, chunk_size, initial_states=init, return_final_states=output_final_state)
        if output_final_state:
            return out[0], out[1].transpose(-1, -2)
        return out, None
    q, k, g = _ssd_as_gla(x, dt, A, B, C)
    return _chunk_gla(q, k, x, g, scale=1.0, initial_state=initial_state, output_final_state=output_final_state,
                      chunk_size=chunk_size)


def ssd_matrix(dt, A, B, C, x_heads: int) -> torch.Tensor:
    """Mamba2's semiseparable matrix ``M_ij = C_i . B_j dt_j exp(sum_{j<s<=i} dt_s A)`` (B, H, T, T)."""
    rep = x_heads // B.shape[2]
    q = C.repeat_interleave(rep, 2)
    k = B.repeat_interleave(rep, 2) * dt.unsqueeze(-1)
    return gated_matrix(q, k, dt * A, scale=1.0)

