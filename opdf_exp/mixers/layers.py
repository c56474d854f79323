"""The eight student token mixers of the subquadratic-distillation experiments (notes/subquadratic.md §2).

Why these layouts: each follows the fla layer (or the official code) its family is distilled into, so that a
student trained here means the same thing as one trained with fla on GPU: projections ``q/k/v/o_proj`` (QKV copy
targets), fla's default gates and output norms, short convolutions where fla has them. Deliberate departures are
named in ``docs/mixers.md`` (no RoPE in RetNet, ``expand_k = expand_v = 1`` by default so that teacher weights
fit).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.errors import ConfigError
from opdf_exp.mixers import ops
from opdf_exp.mixers.base import Mixer, State, apply_rotary, check_teacher, copy_into, expand_kv, register_mixer
from opdf_exp.mixers.modules import FeatureMap, HeadLayerNorm, HeadRMSNorm, ShortConv


def _masked(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero pad positions of a (B, T, ...) tensor; mask is (B, T, 1)."""
    if mask is None:
        return t
    return t * mask.reshape(*mask.shape[:2], *([1] * (t.dim() - 2)))


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    return t.reshape(*t.shape[:2], h, -1)  # (B, T, H, D)


SILU_INVERSE_OF_ONE = 1.2784645  # z with z * sigmoid(z) = 1: a swish gate of this constant passes its input


@torch.no_grad()
def _neutral_gate_(gate: nn.Module | None, bias: float = SILU_INVERSE_OF_ONE) -> None:
    """After QKV copying, an output gate that reads the input through random weights multiplies each channel by
    a random-signed factor, which no output scale can undo (measured: the copied GLA, RetNet, Gated DeltaNet,
    mLSTM and Mamba2 stay at the error of a zero output even with fitted scales). With a bias, the gate starts
    as the constant ``act(bias)`` (zero weights) and learns to depend on the input from there; without one, it
    is left as the family initialised it."""
    if gate is None or gate.bias is None:
        return
    gate.weight.zero_()
    gate.bias.fill_(bias)


class _QKVMixer(Mixer):
    """Shared by the mixers with q/k/v/o projections: optional short convs on q, k, v; QKV copy; state S;
    the teacher's RoPE on q and k (``rope=True``), after the convolutions and before any feature map or norm."""

    supports_rope = True

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, *, key_dim=None, value_dim=None,
                 conv_size=0, qkv_bias=False, q_conv_act="silu", v_conv_act="silu"):
        super().__init__(hidden_size, num_heads, head_dim, chunk_size)
        h = num_heads
        self.key_dim = key_dim or self.head_dim
        self.value_dim = value_dim or self.head_dim
        self.q_proj = nn.Linear(hidden_size, h * self.key_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, h * self.key_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, h * self.value_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(h * self.value_dim, hidden_size, bias=False)
        self.conv_size = conv_size
        if conv_size:
            self.q_conv = ShortConv(h * self.key_dim, conv_size, q_conv_act)
            self.k_conv = ShortConv(h * self.key_dim, conv_size, q_conv_act)
            self.v_conv = ShortConv(h * self.value_dim, conv_size, v_conv_act)

    def _qkv(self, x, mask, state):
        """Projected (and convolved) q, k, v as (B, T, H, D), with the new conv caches."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv: State = {}
        if self.conv_size:
            q, k, v = _masked(q, mask), _masked(k, mask), _masked(v, mask)
            q, conv["conv_q"] = self.q_conv(q, state.get("conv_q"))
            k, conv["conv_k"] = self.k_conv(k, state.get("conv_k"))
            v, conv["conv_v"] = self.v_conv(v, state.get("conv_v"))
        h = self.num_heads
        q, k = _heads(q, h), _heads(k, h)  # (B, T, H, K)
        if self._rotary is not None:
            q, k = apply_rotary(q, self._rotary), apply_rotary(k, self._rotary)
        return q, k, _heads(v, h), conv

    def _state_dims(self) -> tuple[int, int]:
        return self.key_dim, self.value_dim

    def _neutral_gates_(self) -> None:
        """Start the output gate (if any) as a constant that passes the copied path through."""
        _neutral_gate_(getattr(self, "g_proj", None))

    def state_shape(self, batch_size):
        kd, vd = self._state_dims()
        shapes = {"S": (batch_size, self.num_heads, kd, vd)}
        if self.conv_size:
            shapes.update(conv_q=self.q_conv.cache_shape(batch_size), conv_k=self.k_conv.cache_shape(batch_size),
                          conv_v=self.v_conv.cache_shape(batch_size))
        return shapes

    def _final(self, final, want):
        return {"S": final} if want else {}

    def init_from_attention(self, q_weight, k_weight, v_weight, o_weight, *, num_kv_heads, head_dim,
                            q_bias=None, k_bias=None, v_bias=None):
        h = self.num_heads
        check_teacher(self.name, h, self.hidden_size, q_weight, k_weight, v_weight, o_weight, num_kv_heads, head_dim)
        kx, vx = (expand_kv(w, num_kv_heads, head_dim, h) for w in (k_weight, v_weight))
        copy_into(self.name, self.q_proj.weight, q_weight, "q_proj.weight")
        copy_into(self.name, self.k_proj.weight, kx, "k_proj.weight (GQA-expanded)")
        copy_into(self.name, self.v_proj.weight, vx, "v_proj.weight (GQA-expanded)")
        copy_into(self.name, self.o_proj.weight, o_weight, "o_proj.weight")
        copied = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
        if self.conv_size:  # the copied projections reach the op unmixed across tokens
            for conv in (self.q_conv, self.k_conv, self.v_conv):
                conv.identity_()
        self._neutral_gates_()
        for label, lin, b in (("q_proj", self.q_proj, q_bias), ("k_proj", self.k_proj, k_bias),
                              ("v_proj", self.v_proj, v_bias)):
            if b is None:
                continue
            if lin.bias is None:
                raise ConfigError(f"{self.name}: the teacher has a {label} bias but the student was built without "
                                  f"one; pass qkv_bias=True")
            b = b if label == "q_proj" else expand_kv(b, num_kv_heads, head_dim, h)
            copy_into(self.name, lin.bias, b, f"{label}.bias")
            copied.append(f"{label}.bias")
        return copied


def _safe_denominator(den: torch.Tensor, eps: float) -> torch.Tensor:
    """``den`` moved at least ``eps`` away from 0 on its own side (an identity feature map can give den < 0)."""
    return den + torch.where(den >= 0, eps, -eps)


@register_mixer
class LinearAttention(_QKVMixer):
    """Linear attention: ``o_t = sum_{j<=t} phi(q_t).phi(k_j) v_j / sqrt(K)``, feature map ``identity`` /
    ``elu+1`` / ``hedgehog``, then a per-head RMSNorm (fla LinearAttention defaults: ``normalize=False``,
    ``output_norm='rmsnorm'``).

    ``normalize=True`` divides by ``phi(q_t) . sum_{j<=t} phi(k_j)`` (the kernel's own softmax denominator, as
    LoLCATs and Katharopoulos et al. do): then every output is a weighted mean of values, of the teacher's scale,
    instead of a sum that the RMSNorm has to rescale (by up to 10x after QKV copying). The denominator rides along
    as one extra value column of ones, so the chunked kernel, the recurrence, the state (``S`` is K x (V + 1)) and
    the mixing matrix (rows divided by their sums) all carry it. Use a positive feature map (``elu+1``,
    ``hedgehog``) with it; with ``identity`` the denominator can change sign.

    ``window=W`` (> 0, needs ``normalize=True``) adds LoLCATs' sliding-window softmax branch: query t attends with
    softmax weights to its last W keys (itself included) and with the linear kernel to every older key, in one
    normalised sum (LoLCATs ``hybrid_attention_quadratic``):

        y_t = (f_h sum_{t-W<j<=t} exp(s_tj - m_t) v_j + sum_{j<=t-W} phi(q_t).phi(k_j) v_j)
              / (f_h sum_{t-W<j<=t} exp(s_tj - m_t) + sum_{j<=t-W} phi(q_t).phi(k_j)),

    with s_tj = q_t.k_j / sqrt(d) on the (RoPE-rotated) queries and keys, m_t the window's max and
    f_h = sigmoid(window_factor_h) a learned weight per head. The linear part is the chunked linear attention on
    the keys delayed by W; the window part is a banded softmax; the state is the linear state plus the last W keys
    and values (fixed in T), so generation steps and split sequences reproduce one pass."""

    name = "linear_attention"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, feature_map="elu+1", conv_size=0,
                 output_norm=True, qkv_bias=False, normalize=False, eps=1e-6, window=0, window_factor=0.0):
        super().__init__(hidden_size, num_heads, head_dim, chunk_size, conv_size=conv_size, qkv_bias=qkv_bias)
        self.feature_q = FeatureMap(feature_map, self.head_dim, self.name)
        self.feature_k = FeatureMap(feature_map, self.head_dim, self.name)
        self.feature_dim = self.feature_q.out_dim(self.head_dim)
        self.normalize, self.eps = bool(normalize), float(eps)
        self.norm = HeadRMSNorm(self.value_dim) if output_norm else None
        self.window = int(window or 0)
        if self.window < 0:
            raise ConfigError(f"linear_attention: window={window} must be >= 0 (0: no sliding-window branch)")
        if self.window and not self.normalize:
            raise ConfigError("linear_attention: window > 0 combines a softmax with the linear kernel in one "
                              "normalised sum; pass normalize=True with it")
        self.window_factor = nn.Parameter(torch.full((num_heads,), float(window_factor))) if self.window else None

    def _state_dims(self):
        return self.feature_dim, self.value_dim + (1 if self.normalize else 0)

    def state_shape(self, batch_size):
        shapes = super().state_shape(batch_size)
        if self.window:  # the last W (rotated) keys and values, and which of those slots hold a real token
            w, h = self.window, self.num_heads
            shapes.update(win_k=(batch_size, w, h, self.key_dim), win_v=(batch_size, w, h, self.value_dim),
                          win_valid=(batch_size, w))
        return shapes

    def _prepare(self, x, mask, state):
        q, k, v, conv = self._qkv(x, mask, state)
        inp = {}
        if self.window:  # the softmax branch reads the rotated q, k before the feature maps
            inp.update(q_raw=q, k_raw=_masked(k, mask),
                       valid=torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask[..., 0])
        q, k = self.feature_q(q), self.feature_k(k)
        inp.update(q=q, k=_masked(k, mask), v=_masked(v, mask))
        if self.normalize:  # (B, T, H, V + 1): the last column accumulates sum_j phi(k_j)
            inp["v_den"] = _masked(torch.cat([v, torch.ones_like(v[..., :1])], -1), mask)
        return inp, conv

    def _window_core(self, inp, state, mode, want):
        """The sliding-window hybrid (class docstring): keys = the W carried slots then the T new ones."""
        q, k, v, valid = inp["q_raw"], inp["k_raw"], inp["v"], inp["valid"]  # (B, T, H, D), (B, T)
        b, t = q.shape[:2]
        zeros = {name: q.new_zeros(shape) for name, shape in self.state_shape(b).items() if name.startswith("win_")}
        keys = torch.cat([state.get("win_k", zeros["win_k"]).to(q.dtype), k], 1)      # (B, W + T, H, K)
        values = torch.cat([state.get("win_v", zeros["win_v"]).to(q.dtype), v], 1)    # (B, W + T, H, V)
        real = torch.cat([state.get("win_valid", zeros["win_valid"]).to(q.dtype), valid], 1)  # (B, W + T)
        # linear part: query i sees keys[0..i], i.e. every key at least W tokens older than itself
        old = real[:, :t, None, None]
        phi_k = self.feature_k(keys[:, :t]) * old                                         # (B, T, H, F)
        v_den = torch.cat([values[:, :t], torch.ones_like(values[:, :t, ..., :1])], -1) * old  # (B, T, H, V + 1)
        lin, final = ops.linear_attn(inp["q"], phi_k, v_den, mode=mode, scale=1.0, initial_state=state.get("S"),
                                     output_final_state=want, chunk_size=self.chunk_size)
        # window part: query i sees keys[i + 1 .. i + W] (itself and the W - 1 before it)
        win_num, win_den = self._banded_softmax(q, keys, values, real)
        o = (win_num + lin[..., :-1]) / _safe_denominator(win_den + lin[..., -1:], self.eps)
        if not want:
            return o, {}
        return o, {"S": final, "win_k": keys[:, t:], "win_v": values[:, t:], "win_valid": real[:, t:]}

    def _banded_softmax(self, q, keys, values, real):
        """Numerator and denominator of the window branch: query i (of T) against keys[i + 1 .. i + W] of the
        W + T carried-then-new keys, as dense block matmuls.

        Why blocks: query block c (queries cW .. cW + W - 1) needs exactly key blocks c and c + 1, so a
        (W, 2W) score tile per block with a fixed band mask does the work in contiguous batched matmuls. The
        per-query gather of W keys (``unfold``) it replaces spent 9x the whole linear branch's time in strided copies
        and their backward (experiments/bench_subquadratic.py)."""
        b, t, h, _ = q.shape
        w = self.window
        n = -(-t // w)                                                                    # query blocks
        q_blocks = F.pad(q, (0, 0, 0, 0, 0, n * w - t)).view(b, n, w, h, -1).permute(0, 3, 1, 2, 4)  # (B, H, N, W, K)

        def pairs(x):  # (B, W + T, ...) -> (B, N, 2W, ...): key blocks c and c + 1 side by side for query block c
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, (n + 1) * w - x.shape[1]))
            x = x.view(b, n + 1, w, *x.shape[2:])
            return torch.cat([x[:, :-1], x[:, 1:]], 2)

        k_pairs = pairs(keys).permute(0, 3, 1, 2, 4)                                      # (B, H, N, 2W, K)
        v_pairs = pairs(values).permute(0, 3, 1, 2, 4)                                    # (B, H, N, 2W, V)
        real_pairs = pairs(real)[:, None, :, None, :] > 0                                 # (B, 1, N, 1, 2W)
        offset = torch.arange(2 * w, device=q.device)[None, :] - torch.arange(w, device=q.device)[:, None]
        band = (offset >= 1) & (offset <= w)                                              # (W, 2W)
        scores = (q_blocks @ k_pairs.transpose(-1, -2)) * self.key_dim ** -0.5            # (B, H, N, W, 2W)
        scores = scores.masked_fill(~(band & real_pairs), float("-inf"))
        top = scores.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a pad query with no real key
        weights = torch.sigmoid(self.window_factor).view(1, h, 1, 1, 1) * (scores - top).exp()
        num = (weights @ v_pairs).permute(0, 2, 3, 1, 4).reshape(b, n * w, h, -1)[:, :t]  # (B, T, H, V)
        den = weights.sum(-1).permute(0, 2, 3, 1).reshape(b, n * w, h, 1)[:, :t]          # (B, T, H, 1)
        return num, den

    def _core(self, inp, state, mode, want):
        if self.window:
            return self._window_core(inp, state, mode, want)
        v = inp["v_den"] if self.normalize else inp["v"]
        o, final = ops.linear_attn(inp["q"], inp["k"], v, mode=mode, initial_state=state.get("S"),
                                   output_final_state=want, chunk_size=self.chunk_size)
        if self.normalize:
            o = o[..., :-1] / _safe_denominator(o[..., -1:], self.eps)
        return o, self._final(final, want)

    def _output(self, o, inp):
        if self.norm is not None:
            o = self.norm(o)
        return self.o_proj(o.flatten(2))

    def _window_matrix(self, inp):
        """The (B, H, T, T) weights of the sliding-window hybrid, computed quadratically (the oracle)."""
        q, k, valid = inp["q_raw"].transpose(1, 2), inp["k_raw"].transpose(1, 2), inp["valid"]  # (B, H, T, K)
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        lag = i[:, None] - i[None, :]                                                   # (T, T): query - key
        in_window, older = (lag >= 0) & (lag < self.window), lag >= self.window
        real = valid[:, None, None, :] > 0                                              # (B, 1, 1, T) real keys
        scores = (q @ k.transpose(-1, -2)) * self.key_dim ** -0.5
        scores = scores.masked_fill(~(in_window & real), float("-inf"))
        top = scores.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        soft = torch.sigmoid(self.window_factor).view(1, -1, 1, 1) * (scores - top).exp()
        phi_q, phi_k = inp["q"].transpose(1, 2), inp["k"].transpose(1, 2)
        lin = (phi_q @ phi_k.transpose(-1, -2)) * (older & real)
        m = soft + lin
        return m / _safe_denominator(m.sum(-1, keepdim=True), self.eps)

    def _matrix(self, inp):
        if self.window:
            return self._window_matrix(inp)
        m = ops.gated_matrix(inp["q"], inp["k"], None, scale=inp["q"].shape[-1] ** -0.5)  # (B, H, T, T)
        if self.normalize:
            m = m / _safe_denominator(m.sum(-1, keepdim=True), self.eps)
        return m


@register_mixer
class RetNet(_QKVMixer):
    """Multi-scale retention (fla MultiScaleRetention): simple GLA with constant ``g_h = log(1 - 2^(-5-h))``,
    per-head RMSNorm, swish output gate. fla's xPos/RoPE on q, k is not applied here (docs/mixers.md)."""

    name = "retnet"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, expand_v=1.0, conv_size=0,
                 use_output_gate=True, qkv_bias=False, gate_bias=True):
        hd = head_dim or (hidden_size // num_heads if hidden_size % num_heads == 0 else None)
        super().__init__(hidden_size, num_heads, head_dim, chunk_size, conv_size=conv_size, qkv_bias=qkv_bias,
                         value_dim=int(hd * expand_v) if hd else None)
        self.register_buffer("log_decay", torch.log(1 - 2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float32))),
                             persistent=False)
        self.g_proj = nn.Linear(hidden_size, num_heads * self.value_dim, bias=gate_bias) if use_output_gate else None
        self.norm = HeadRMSNorm(self.value_dim)

    def _prepare(self, x, mask, state):
        q, k, v, conv = self._qkv(x, mask, state)
        g = self.log_decay.to(x.dtype).expand(*x.shape[:2], self.num_heads)  # (B, T, H)
        gate = None if self.g_proj is None else _heads(self.g_proj(x), self.num_heads)
        return {"q": q, "k": _masked(k, mask), "v": _masked(v, mask), "g": _masked(g, mask), "gate": gate}, conv

    def _core(self, inp, state, mode, want):
        o, final = ops.simple_gla(inp["q"], inp["k"], inp["v"], inp["g"], mode=mode, initial_state=state.get("S"),
                                  output_final_state=want, chunk_size=self.chunk_size)
        return o, self._final(final, want)

    def _output(self, o, inp):
        return self.o_proj(self.norm(o, inp["gate"]).flatten(2))

    def _matrix(self, inp):
        return ops.gated_matrix(inp["q"], inp["k"], inp["g"], scale=self.key_dim ** -0.5)


@register_mixer
class GLA(_QKVMixer):
    """Gated linear attention (fla GatedLinearAttention): ``gk = logsigmoid(W2 W1 x) / 16`` per key dim (low-rank
    gate, rank 16), per-head RMSNorm then swish output gate. fla's default ``expand_k = 0.5``; here 1.0 so that
    teacher q/k weights can be copied."""

    name = "gla"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, expand_k=1.0, expand_v=1.0,
                 gate_low_rank_dim=16, gate_logit_normalizer=16.0, conv_size=0, use_output_gate=True,
                 qkv_bias=False, gate_bias=True):
        hd = head_dim or (hidden_size // num_heads if hidden_size % num_heads == 0 else None)
        super().__init__(hidden_size, num_heads, head_dim, chunk_size, conv_size=conv_size, qkv_bias=qkv_bias,
                         key_dim=int(hd * expand_k) if hd else None, value_dim=int(hd * expand_v) if hd else None)
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, num_heads * self.key_dim, bias=True))
        self.gate_logit_normalizer = gate_logit_normalizer
        self.g_proj = nn.Linear(hidden_size, num_heads * self.value_dim, bias=gate_bias) if use_output_gate else None
        self.norm = HeadRMSNorm(self.value_dim)

    def _prepare(self, x, mask, state):
        q, k, v, conv = self._qkv(x, mask, state)
        gk = _heads(F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer, self.num_heads)  # (B, T, H, K)
        gate = None if self.g_proj is None else _heads(self.g_proj(x), self.num_heads)
        return {"q": q, "k": _masked(k, mask), "v": _masked(v, mask), "gk": _masked(gk, mask), "gate": gate}, conv

    def _core(self, inp, state, mode, want):
        o, final = ops.gla(inp["q"], inp["k"], inp["v"], inp["gk"], mode=mode, initial_state=state.get("S"),
                           output_final_state=want, chunk_size=self.chunk_size)
        return o, self._final(final, want)

    def _output(self, o, inp):
        return self.o_proj(self.norm(o, inp["gate"]).flatten(2))

    def _matrix(self, inp):
        return ops.gated_matrix(inp["q"], inp["k"], inp["gk"], scale=self.key_dim ** -0.5)


@register_mixer
class DeltaNet(_QKVMixer):
    """DeltaNet (fla DeltaNet defaults): short convs (SiLU) on q, k, v, L2-normalised q/k inside the op,
    ``beta = sigmoid(W_b x)``, per-head RMSNorm (optionally gated)."""

    name = "deltanet"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, conv_size=4, use_output_gate=False,
                 qkv_bias=False, gate_bias=True):
        super().__init__(hidden_size, num_heads, head_dim, chunk_size, conv_size=conv_size, qkv_bias=qkv_bias)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.g_proj = nn.Linear(hidden_size, num_heads * self.value_dim, bias=gate_bias) if use_output_gate else None
        self.norm = HeadRMSNorm(self.value_dim)

    def _prepare(self, x, mask, state):
        q, k, v, conv = self._qkv(x, mask, state)
        if not self.conv_size:  # fla applies SiLU to q, k (inside the conv when there is one)
            q, k = F.silu(q), F.silu(k)
        gate = None if self.g_proj is None else _heads(self.g_proj(x), self.num_heads)
        inp = {"q": q, "k": _masked(k, mask), "v": _masked(v, mask), "beta": self.b_proj(x).sigmoid(),
               "gate": gate}
        return inp, conv

    def _op(self, inp, state, mode, want):
        return ops.delta_rule(inp["q"], inp["k"], inp["v"], inp["beta"], mode=mode, initial_state=state.get("S"),
                              output_final_state=want, use_qk_l2norm=True, chunk_size=self.chunk_size)

    def _core(self, inp, state, mode, want):
        o, final = self._op(inp, state, mode, want)
        return o, self._final(final, want)

    def _output(self, o, inp):
        return self.o_proj(self.norm(o, inp["gate"]).flatten(2))

    def _matrix(self, inp):
        return ops.delta_matrix(ops.l2norm(inp["q"]), ops.l2norm(inp["k"]), inp["beta"], inp.get("g"),
                                scale=self.key_dim ** -0.5)


@register_mixer
class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet (fla GatedDeltaNet): ``g = -exp(A_log) softplus(W_a x + dt_bias)`` (Mamba2-style decay),
    ``beta = sigmoid(W_b x)``, short convs, L2-normalised q/k in the op, RMSNorm then swish output gate."""

    name = "gated_deltanet"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, conv_size=4, use_output_gate=True,
                 qkv_bias=False, gate_bias=True):
        super().__init__(hidden_size, num_heads, head_dim, chunk_size, conv_size, use_output_gate, qkv_bias, gate_bias)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

    def _prepare(self, x, mask, state):
        inp, conv = super()._prepare(x, mask, state)
        g = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)  # (B, T, H) log decay <= 0
        inp["g"] = _masked(g, mask)
        return inp, conv

    def _op(self, inp, state, mode, want):
        return ops.gated_delta_rule(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], mode=mode,
                                    initial_state=state.get("S"), output_final_state=want, use_qk_l2norm=True,
                                    chunk_size=self.chunk_size)


@register_mixer
class MLSTM(_QKVMixer):
    """The mLSTM token mixer of xLSTM-large: exponential input gate and sigmoid forget gate per head
    (soft-capped at 15), stabilised matrix memory with normaliser, multi-head LayerNorm, sigmoid output gate.
    Gate biases follow xLSTM-large: input -10, forget linspace(3, 6)."""

    name = "mlstm"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, gate_soft_cap=15.0, conv_size=0,
                 qkv_bias=False, eps=1e-6, gate_bias=True):
        super().__init__(hidden_size, num_heads, head_dim, chunk_size, conv_size=conv_size, qkv_bias=qkv_bias)
        self.igate = nn.Linear(hidden_size, num_heads)
        self.fgate = nn.Linear(hidden_size, num_heads)
        self.ogate = nn.Linear(hidden_size, num_heads * self.value_dim, bias=gate_bias)
        with torch.no_grad():
            self.igate.bias.fill_(-10.0)
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, num_heads))
        self.gate_soft_cap, self.eps = gate_soft_cap, eps
        self.norm = HeadLayerNorm(self.value_dim)

    def _neutral_gates_(self) -> None:
        _neutral_gate_(self.ogate, 2.0)  # sigmoid(2) = 0.88: near open, still with a usable gradient (0.10)

    def _cap(self, t):
        return self.gate_soft_cap * torch.tanh(t / self.gate_soft_cap) if self.gate_soft_cap else t

    def _prepare(self, x, mask, state):
        q, k, v, conv = self._qkv(x, mask, state)
        i, f = self._cap(self.igate(x)), self._cap(self.fgate(x))  # (B, T, H) pre-activations
        if mask is not None:  # pads: no input (i = -inf), no forgetting (logsigmoid(f) = 0)
            pad = mask[..., 0] == 0
            i = i.masked_fill(pad.unsqueeze(-1), float("-inf"))
            f = f.masked_fill(pad.unsqueeze(-1), 1e4)
        inp = {"q": q, "k": _masked(k, mask), "v": _masked(v, mask), "i": i, "f": f,
               "ogate": _heads(self.ogate(x), self.num_heads)}
        return inp, conv

    def state_shape(self, batch_size):
        shapes = super().state_shape(batch_size)
        shapes.pop("S")
        h, kd, vd = self.num_heads, self.key_dim, self.value_dim
        return {"C": (batch_size, h, kd, vd), "n": (batch_size, h, kd), "m": (batch_size, h), **shapes}

    def _core(self, inp, state, mode, want):
        init = (state["C"], state["n"], state["m"]) if "C" in state else None
        o, final = ops.mlstm(inp["q"], inp["k"], inp["v"], inp["i"], inp["f"], mode=mode, initial_state=init,
                             output_final_state=want, eps=self.eps, chunk_size=self.chunk_size)
        return o, (dict(zip(("C", "n", "m"), final)) if want else {})

    def _output(self, o, inp):
        return self.o_proj((inp["ogate"].sigmoid() * self.norm(o)).flatten(2))

    def _matrix(self, inp):
        return ops.mlstm_matrix(inp["q"], inp["k"], inp["i"], inp["f"], scale=self.key_dim ** -0.5, eps=self.eps)


@register_mixer
class MetaLA(Mixer):
    """MetaLA as officially defined (ZiyanHuang11/MetaLA ``metala_qv_selfaug``): short causal conv (SiLU) on the
    input; query dim ``head_dim * qk_ratio`` (1/2); no key projection: ``gk = logsigmoid(W_gk x) / 16``,
    ``k = 1 - exp(gk)``; GLA op; self-augmentation ``o += sigmoid((q . (k * aug_balance)) v)``; per-head
    LayerNorm without affine; ``silu(W_g x)`` output gate; output projection."""

    name = "metala"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, qk_ratio=0.5, conv_size=4,
                 gate_logit_normalizer=16.0, self_augmentation=True):
        super().__init__(hidden_size, num_heads, head_dim, chunk_size)
        h = num_heads
        self.key_dim = max(1, int(self.head_dim * qk_ratio))
        self.value_dim = self.head_dim
        self.conv_size = conv_size
        self.conv = ShortConv(hidden_size, conv_size, "silu") if conv_size else None
        self.q_proj = nn.Linear(hidden_size, h * self.key_dim, bias=False)
        self.gk_proj = nn.Linear(hidden_size, h * self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, h * self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden_size, h * self.value_dim, bias=True)
        self.o_proj = nn.Linear(h * self.value_dim, hidden_size, bias=False)
        self.aug_balance = nn.Parameter(torch.zeros(h * self.key_dim)) if self_augmentation else None
        self.gate_logit_normalizer = gate_logit_normalizer
        self.norm = HeadLayerNorm(self.value_dim, affine=False)

    @property
    def matrix_form(self) -> bool:  # type: ignore[override]
        return self.aug_balance is None

    def _matrix(self, inp):
        if self.aug_balance is not None:
            raise ConfigError("metala has no mixing-matrix form while self-augmentation is on (sigmoid(q.(k*a) v) "
                              "is not linear in v); build it with self_augmentation=False or align outputs")
        return ops.gated_matrix(inp["q"], inp["k"], inp["gk"], scale=self.key_dim ** -0.5)

    def _prepare(self, x, mask, state):
        conv: State = {}
        if self.conv is not None:
            x, conv["conv_x"] = self.conv(_masked(x, mask), state.get("conv_x"))
        h = self.num_heads
        gk = _masked(_heads(F.logsigmoid(self.gk_proj(x)) / self.gate_logit_normalizer, h), mask)  # (B, T, H, K)
        k = -torch.expm1(gk)  # = 1 - exp(gk) without the cancellation (gk ~ -0.04); zero at pads, where gk = 0
        inp = {"q": _heads(self.q_proj(x), h), "k": k, "gk": gk, "v": _masked(_heads(self.v_proj(x), h), mask),
               "gate": _heads(self.g_proj(x), h)}
        return inp, conv

    def state_shape(self, batch_size):
        shapes = {"S": (batch_size, self.num_heads, self.key_dim, self.value_dim)}
        if self.conv is not None:
            shapes["conv_x"] = self.conv.cache_shape(batch_size)
        return shapes

    def _core(self, inp, state, mode, want):
        o, final = ops.gla(inp["q"], inp["k"], inp["v"], inp["gk"], mode=mode, initial_state=state.get("S"),
                           output_final_state=want, chunk_size=self.chunk_size)
        return o, ({"S": final} if want else {})

    def _output(self, o, inp):
        # In float32: o is small (RMS ~0.01 at init) next to sigmoid(.) ~ 0.5, so adding them in bfloat16 would
        # round o away (measured: 17% output error in bf16, 0.9% with this upcast).
        dtype = o.dtype
        o = o.float()
        if self.aug_balance is not None:
            aug = _heads(self.aug_balance.view(1, 1, -1), self.num_heads).float()  # (1, 1, H, K)
            w = (inp["q"].float() * inp["k"].float() * aug).sum(-1, keepdim=True)  # (B, T, H, 1)
            o = o + torch.sigmoid(w * inp["v"].float())
        o = self.norm(o).to(dtype)
        return self.o_proj((F.silu(inp["gate"]) * o).flatten(2))

    def init_from_attention(self, q_weight, k_weight, v_weight, o_weight, *, num_kv_heads, head_dim,
                            q_bias=None, k_bias=None, v_bias=None):
        """Copies v and o (GQA-expanded v), and q when the query dim equals the teacher's head_dim
        (``qk_ratio=1``); MetaLA has no key projection, so the teacher's keys are not used."""
        h = self.num_heads
        check_teacher(self.name, h, self.hidden_size, q_weight, k_weight, v_weight, o_weight, num_kv_heads, head_dim)
        copy_into(self.name, self.v_proj.weight, expand_kv(v_weight, num_kv_heads, head_dim, h),
                  "v_proj.weight (GQA-expanded)")
        copy_into(self.name, self.o_proj.weight, o_weight, "o_proj.weight")
        copied = ["v_proj.weight", "o_proj.weight"]
        if self.conv is not None:  # the copied projections read each token's own input, as the teacher's did
            self.conv.identity_()
        _neutral_gate_(self.g_proj)
        if tuple(self.q_proj.weight.shape) == tuple(q_weight.shape):
            copy_into(self.name, self.q_proj.weight, q_weight, "q_proj.weight")
            copied.insert(0, "q_proj.weight")
        return copied


@register_mixer
class Mamba2(Mixer):
    """Mamba2 (Dao & Gu 2024; fla/HF Mamba2 mixer): ``in_proj -> [z | x | B | C | dt]``, causal depthwise conv
    (SiLU) over ``xBC``, ``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``, SSD scan plus ``D x`` skip, gated
    RMSNorm ``norm(y * silu(z))`` per group, ``out_proj``. Defaults chosen for QKV copying: ``head_dim`` = the
    teacher's, ``d_state = head_dim``, ``n_groups = num_heads`` (one B/C per head, like attention's keys/queries)."""

    name = "mamba2"

    def __init__(self, hidden_size, num_heads, head_dim=None, chunk_size=64, d_state=None, n_groups=None,
                 conv_size=4, bias=False, gate_bias=True):
        super().__init__(hidden_size, num_heads, head_dim, chunk_size)
        h, p = num_heads, self.head_dim
        self.d_state = d_state or p
        self.n_groups = n_groups or h
        if h % self.n_groups:
            raise ConfigError(f"mamba2: n_groups={self.n_groups} must divide num_heads={h}")
        self.d_inner = h * p
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(hidden_size, self.d_inner + self.conv_dim + h, bias=bias)
        self.conv = ShortConv(self.conv_dim, conv_size, "silu", bias=True)
        self.A_log = nn.Parameter(torch.empty(h).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(h) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=bias)
        # a bias of the z gate alone (in_proj may have none): lets QKV copying start the gate open (_neutral_gate_)
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner)) if gate_bias else None

    def _split(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.num_heads], -1)

    def _prepare(self, x, mask, state):
        z, xbc, dt = self._split(self.in_proj(x))
        if self.z_bias is not None:
            z = z + self.z_bias
        xbc, cache = self.conv(_masked(xbc, mask), state.get("conv_xbc"))
        gn = self.n_groups * self.d_state
        xs, bm, cm = torch.split(xbc, [self.d_inner, gn, gn], -1)
        h = self.num_heads
        xs = _masked(_heads(xs, h), mask)  # (B, T, H, P)
        bm, cm = _heads(bm, self.n_groups), _heads(cm, self.n_groups)  # (B, T, G, N)
        dt = _masked(F.softplus(dt + self.dt_bias), mask)  # (B, T, H); 0 at pads: no decay, no input
        return {"x": xs, "B": bm, "C": cm, "dt": dt, "A": -self.A_log.exp(), "z": z}, {"conv_xbc": cache}

    def state_shape(self, batch_size):
        return {"S": (batch_size, self.num_heads, self.d_state, self.head_dim),
                "conv_xbc": self.conv.cache_shape(batch_size)}

    def _core(self, inp, state, mode, want):
        y, final = ops.ssd(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], mode=mode,
                           initial_state=state.get("S"), output_final_state=want, chunk_size=self.chunk_size)
        y = y + self.D.view(1, 1, -1, 1) * inp["x"]
        return y, ({"S": final} if want else {})

    def _output(self, y, inp):
        y = y.flatten(2) * F.silu(inp["z"])  # (B, T, d_inner), gate before the norm (norm_before_gate=False)
        yg = y.reshape(*y.shape[:2], self.n_groups, -1)  # (B, T, G, d_inner / G)
        yg = yg * torch.rsqrt(yg.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.out_proj(yg.flatten(2) * self.norm_weight)

    def _values(self, inp):
        return inp["x"]

    def _matrix(self, inp):
        m = ops.ssd_matrix(inp["dt"], inp["A"], inp["B"], inp["C"], self.num_heads)
        t = m.shape[-1]
        return m + self.D.view(1, -1, 1, 1) * torch.eye(t, dtype=m.dtype, device=m.device)

    def init_from_attention(self, q_weight, k_weight, v_weight, o_weight, *, num_kv_heads, head_dim,
                            q_bias=None, k_bias=None, v_bias=None):
        """Attention as SSM (Mamba-in-the-Llama): C <- Wq, B <- Wk, x <- Wv (K/V GQA-expanded), out <- Wo. Needs
        ``n_groups = num_heads`` and ``d_state = head_dim`` = the teacher's head_dim; z, dt, A, D keep their init."""
        h = self.num_heads
        check_teacher(self.name, h, self.hidden_size, q_weight, k_weight, v_weight, o_weight, num_kv_heads, head_dim)
        if self.n_groups != h or self.d_state != head_dim or self.head_dim != head_dim:
            raise ConfigError(f"mamba2: QKV copy needs n_groups=num_heads={h} and d_state=head_dim={head_dim}; "
                              f"got n_groups={self.n_groups}, d_state={self.d_state}, head_dim={self.head_dim}")
        w = self.in_proj.weight
        d, gn = self.d_inner, self.n_groups * self.d_state
        rows = {"x": (d, 2 * d), "B": (2 * d, 2 * d + gn), "C": (2 * d + gn, 2 * d + 2 * gn)}
        src = {"x": expand_kv(v_weight, num_kv_heads, head_dim, h), "B": expand_kv(k_weight, num_kv_heads, head_dim, h),
               "C": q_weight}
        bias = {"x": None if v_bias is None else expand_kv(v_bias, num_kv_heads, head_dim, h),
                "B": None if k_bias is None else expand_kv(k_bias, num_kv_heads, head_dim, h), "C": q_bias}
        for part, (a, b) in rows.items():
            copy_into(self.name, w[a:b], src[part], f"in_proj.weight[{part}]")
            if bias[part] is not None:
                if self.in_proj.bias is None:
                    raise ConfigError("mamba2: the teacher has q/k/v biases but in_proj has none; pass bias=True")
                copy_into(self.name, self.in_proj.bias[a:b], bias[part], f"in_proj.bias[{part}]")
        copy_into(self.name, self.out_proj.weight, o_weight, "out_proj.weight")
        # start as close to the attention as an SSM allows: no D x skip (attention has none), the conv passes
        # each token through, and A = -1 so that decays exp(A dt) with dt ~ 0.001..0.1 start near no forgetting
        with torch.no_grad():
            self.D.zero_()
            self.A_log.zero_()
            if self.z_bias is not None:  # the gate silu(z) starts at 1 (see _neutral_gate_)
                self.in_proj.weight[: self.d_inner].zero_()
                self.z_bias.fill_(SILU_INVERSE_OF_ONE)
        self.conv.identity_()
        return ["in_proj.weight[x]", "in_proj.weight[B]", "in_proj.weight[C]", "out_proj.weight"]
