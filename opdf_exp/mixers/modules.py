"""Small building blocks of the mixers: short causal convolution with a cache, per-head norms, feature maps.

Why our own short conv: fla's ``ShortConvolution`` has only Triton/CUDA backends, and a generation step needs
the last ``kernel_size - 1`` inputs as part of the state. ``ShortConv`` is a depthwise causal ``conv1d`` that takes
and returns that cache, so chunked forward, split sequences and ``step`` agree exactly; on CUDA tensors it uses
``causal_conv1d_fn`` when installed and no cache is involved.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.errors import ConfigError
from opdf_exp.mixers.ops.fast import fast_kernel


class ShortConv(nn.Module):
    """Depthwise causal conv over time on (B, T, C) with optional SiLU; cache (B, C, kernel_size - 1)."""

    def __init__(self, channels: int, kernel_size: int = 4, activation: str | None = "silu", bias: bool = False):
        super().__init__()
        self.channels, self.kernel_size, self.activation = channels, kernel_size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def cache_shape(self, batch_size: int) -> tuple[int, ...]:
        return (batch_size, self.channels, self.kernel_size - 1)

    @torch.no_grad()
    def identity_(self) -> None:
        """Pass each channel through unchanged (a 1 on the current token's tap, zero bias): after QKV copying, a
        randomly initialised conv would mix a token's copied projection with its neighbours' before training."""
        self.weight.zero_()
        self.weight[..., -1] = 1.0
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        xt = x.transpose(1, 2)  # (B, C, T)
        fused = fast_kernel("causal_conv1d", x) if cache is None else None
        if fused is not None:
            y = fused(xt.contiguous(), self.weight.squeeze(1), self.bias, activation=self.activation)
            new_cache = F.pad(xt, (self.kernel_size - 1, 0))[..., -(self.kernel_size - 1):]
            return y.transpose(1, 2), new_cache
        if cache is None:
            cache = xt.new_zeros(x.shape[0], self.channels, self.kernel_size - 1)
        xp = torch.cat([cache.to(xt.dtype), xt], -1)  # (B, C, K - 1 + T)
        y = F.conv1d(xp, self.weight, self.bias, groups=self.channels)  # (B, C, T)
        if self.activation == "silu":
            y = F.silu(y)
        return y.transpose(1, 2), xp[..., xp.shape[-1] - (self.kernel_size - 1):]


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim of (..., H, D) with one weight vector of size D (fla's per-head output norm);
    ``gate`` multiplies ``silu(gate)`` after the norm (fla ``FusedRMSNormGated``) or before it (Mamba2
    ``RMSNormGated``, ``norm_before_gate=False``)."""

    def __init__(self, dim: int, eps: float = 1e-5, gate_first: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.gate_first = eps, gate_first

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is not None and self.gate_first:
            x = x * F.silu(gate)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if gate is not None and not self.gate_first:
            x = x * F.silu(gate)
        return x


class HeadLayerNorm(nn.Module):
    """LayerNorm over the last dim of (..., H, D) (MetaLA's group norm without affine; xLSTM's multi-head norm)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine, bias=False) if affine else \
            nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class HedgehogMap(nn.Module):
    """Hedgehog (Zhang et al. 2024): ``softmax([2 W x, -2 W x])`` with W a trainable map initialised to the
    identity, shared by the heads (fla ``HedgehogFeatureMap``); doubles the feature dim."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.layer = nn.Linear(head_dim, head_dim)
        with torch.no_grad():
            nn.init.eye_(self.layer.weight)
            nn.init.zeros_(self.layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer(x)
        return torch.cat([2 * x, -2 * x], -1).softmax(-1)


FEATURE_MAPS = ("identity", "elu+1", "hedgehog")


class FeatureMap(nn.Module):
    """``identity``, ``elu+1`` (Katharopoulos et al. 2020) or ``hedgehog``; ``out_dim(d)`` is the feature size."""

    def __init__(self, name: str, head_dim: int, family: str = "linear_attention"):
        super().__init__()
        if name not in FEATURE_MAPS:
            raise ConfigError(f"feature_map={name!r} is not supported by {family}; use one of {list(FEATURE_MAPS)}")
        self.name = name
        self.hedgehog = HedgehogMap(head_dim) if name == "hedgehog" else None

    def out_dim(self, head_dim: int) -> int:
        return 2 * head_dim if self.name == "hedgehog" else head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "elu+1":
            return F.elu(x) + 1.0
        if self.name == "hedgehog":
            return self.hedgehog(x)
        return x
