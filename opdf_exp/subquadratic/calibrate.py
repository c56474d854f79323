"""Start close to the teacher: per-channel output scales fitted by least squares right after QKV copying.

Why: a copied mixer reproduces the teacher's q, k, v and o, but the families' output norms (per-head RMSNorm or
LayerNorm of weight 1) hand o_proj outputs of unit scale, where the teacher's attention outputs are a mean of
values and much smaller; measured on the packaged SmolLM2 teacher right after conversion, every family was further
from the teacher than a zero output (per-layer attention-output error 1.0 to 20). Whatever a family computes
before its output projection, the best it can do with one scale per channel c of that projection's input is

    s* = argmin_s  sum_tokens || W_o diag(s) h_t - a_t ||^2,   G s* = b,
    G = (W_o^T W_o) * (H^T H)  (Hadamard product, C x C),   b_c = sum_t h_tc (W_o^T a_t)_c,

a C-dimensional linear least squares (C = heads x value dim) solved once per layer on a few calibration blocks.
s = 0 is a feasible point, so on those blocks the fitted error is never above a zero output's (< 1); the scales
are folded into W_o's columns, so the architecture, the fast kernels and the saved checkpoints do not change.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from opdf_exp.subquadratic.attention_cache import AttentionIO, collect_attention_io


@torch.no_grad()
def output_scale_fit(mixer: nn.Module, x: torch.Tensor, target: torch.Tensor, rotary=None,
                     ridge: float = 1e-6) -> torch.Tensor:
    """The least-squares channel scales s (C,) of ``mixer``'s output projection for inputs ``x`` (B, T, D) and
    teacher attention outputs ``target`` (B, T, D); ``ridge`` is relative to the mean diagonal of G."""
    proj = mixer.output_projection
    captured: list[torch.Tensor] = []
    hook = proj.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        mixer(x, rotary=rotary if mixer.rope else None)
    finally:
        hook.remove()
    h = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()  # (B*T, C)
    a = target.reshape(-1, target.shape[-1]).double()                      # (B*T, D)
    if proj.bias is not None:
        a = a - proj.bias.double()
    w = proj.weight.double()                                               # (D, C)
    gram = (w.T @ w) * (h.T @ h)                                           # (C, C), PSD (Schur product)
    rhs = (h * (a @ w)).sum(0)                                             # (C,)
    damping = ridge * gram.diagonal().mean().clamp_min(1e-30)
    scale = torch.linalg.solve(gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype), rhs)
    return scale.to(proj.weight.dtype)


@torch.no_grad()
def calibrate_output_scales(student: nn.Module, teacher: nn.Module | None = None, blocks: torch.Tensor | None = None,
                            activations: AttentionIO | None = None, batch_size: int = 4) -> dict[int, float]:
    """Fold ``output_scale_fit`` into every mixer's output projection, from ``activations`` or from a teacher
    walk over ``blocks``; returns each layer's relative attention-output error on those blocks after the fit."""
    mixers = student.mixers()
    if not mixers:
        return {}
    if activations is None:
        activations = collect_attention_io(teacher, blocks, list(mixers), batch_size)
    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    index = torch.arange(activations.num_blocks)
    errors = {}
    for idx, mixer in mixers.items():
        x, target = activations.batch(idx, index, dtype, device)
        rotary = tuple(t.to(device) for t in activations.rotary(x.shape[0], dtype))
        scale = output_scale_fit(mixer, x, target, rotary)
        mixer.output_projection.weight.mul_(scale[None, :])
        y = mixer(x, rotary=rotary if mixer.rope else None)
        errors[idx] = float((y - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-30))
    return errors
