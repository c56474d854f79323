"""Optional fused GPU kernels (fla, mamba_ssm, causal-conv1d, mlstm_kernels), chosen per call by tensor device.

Why by device and never by import: Hugging Face's fallback decorators prefer a package whenever it imports, so a
CPU box with fla installed crashes in Triton ("0 active drivers"). Here nothing is imported until a CUDA tensor
asks for it, and a CPU tensor returns ``None`` before any import is attempted: the pure-torch path is the only path
on CPU whatever is installed. ``OPDF_MIXERS_FAST=0`` disables the fused kernels on CUDA too (for A/B checks).

The adapters follow the packages' public signatures (fla 0.6 ``chunk_*`` ops on ``[B, T, H, D]``; mamba_ssm's
``mamba_chunk_scan_combined``; mlstm_kernels' ``get_mlstm_kernel``) and are untested in this repository's CI (CPU
only); a GPU run should compare them with the torch path before trusting them.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable

import torch

_MODULES: dict[str, Any] = {}

# op name -> (module, attribute)
KERNELS: dict[str, tuple[str, str]] = {
    "linear_attn": ("fla.ops.linear_attn", "chunk_linear_attn"),
    "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
    "gla": ("fla.ops.gla", "chunk_gla"),
    "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "ssd": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "mlstm": ("mlstm_kernels.torch", "get_mlstm_kernel"),
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
}


# Kernels that reject float32 in some fla releases ("does not support float32"): float32 CUDA tensors keep the
# torch path for these, half-precision ones take the fused kernel.
HALF_ONLY = {"delta_rule", "gated_delta_rule"}


def _import(module: str):
    if module not in _MODULES:
        try:
            _MODULES[module] = importlib.import_module(module)
        except Exception:  # not installed, or installed but broken (no driver): use the torch path
            _MODULES[module] = None
    return _MODULES[module]


def fast_kernel(name: str, tensor) -> Callable | None:
    """The fused kernel for op ``name`` if ``tensor`` lives on CUDA and the package imports, else None."""
    if not getattr(tensor, "is_cuda", False) or os.environ.get("OPDF_MIXERS_FAST", "1") == "0":
        return None
    if name in HALF_ONLY and getattr(tensor, "dtype", None) not in (torch.float16, torch.bfloat16):
        return None
    module, attr = KERNELS[name]
    mod = _import(module)
    return None if mod is None else getattr(mod, attr, None)


def clear_cache() -> None:
    """Forget import results (tests that stub packages in ``sys.modules`` call this)."""
    _MODULES.clear()
