"""Teacher forcing for the layer-wise stages and diagnostics, in pure torch (no Lightning).

Why walk the teacher one layer at a time: stages 1 and 2 and the per-layer fidelity only ever need the hidden
state entering layer l and the teacher's output of layer l, so nothing keeps all layers' activations alive at
once. The teacher's attention is recomputed eagerly from its own projections, so its softmax probabilities exist
whatever ``attn_implementation`` it was loaded with (fused kernels never form them).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def causal_mask_4d(attention_mask: torch.Tensor | None, batch: int, steps: int, dtype, device) -> torch.Tensor:
    """Additive (B, 1, T, T) mask: causal, plus padded keys masked (HF convention 1 = token)."""
    allowed = torch.ones(steps, steps, dtype=torch.bool, device=device).tril()  # (T, T)
    allowed = allowed.expand(batch, 1, steps, steps)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    # a fully padded row (left padding) attends to itself so softmax stays finite
    allowed = allowed | torch.eye(steps, dtype=torch.bool, device=device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def teacher_attention(attn: nn.Module, x: torch.Tensor, position_embeddings, mask4d: torch.Tensor,
                      want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Llama attention module run eagerly: (output after o_proj (B, T, D), probabilities (B, H, T, T) or None).
    Eager on purpose: fused kernels never form the probabilities that ``target=matrix`` regresses on."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

    b, t, _ = x.shape
    shape = (b, t, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)  # (B, H, T, d)
    k = attn.k_proj(x).view(shape).transpose(1, 2)  # (B, H_kv, T, d)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    out, probs = eager_attention_forward(attn, q, k, v, mask4d, scaling=attn.scaling, dropout=0.0)
    return attn.o_proj(out.reshape(b, t, -1)), (probs if want_probs else None)


class TeacherWalk:
    """Walk the teacher's decoder one layer at a time under no_grad: yields (layer index, hidden state in,
    normalised input of the attention, teacher layer); the caller calls ``advance(h_out)`` to move on."""

    def __init__(self, teacher: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        model = teacher.model
        with torch.no_grad():
            h = model.embed_tokens(input_ids)
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
            self.position_embeddings = model.rotary_emb(h, position_ids=positions)
        self.mask4d = causal_mask_4d(attention_mask, *input_ids.shape, h.dtype, h.device)
        self.hidden, self.model = h, model

    @torch.no_grad()
    def layer_output(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.model.layers[idx]
        x = layer.input_layernorm(hidden)
        a, _ = teacher_attention(layer.self_attn, x, self.position_embeddings, self.mask4d, False)
        h = hidden + a
        return h + layer.mlp(layer.post_attention_layernorm(h))


@torch.no_grad()
def layer_fidelity(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 4,
                   with_matrix: bool = True) -> dict[int, dict[str, float]]:
    """Per mixer layer, teacher-forced on ``blocks`` (N, T): ``output_rel_err`` = ||mixer(x) - attn(x)||^2 /
    ||attn(x)||^2 and, for mixers with a matrix form, ``matrix_mse`` = mean squared error of the materialised
    mixing matrix against the teacher's attention probabilities (causal part)."""
    mixers = student.mixers()
    sums: dict[int, dict[str, float]] = {i: {"err": 0.0, "ref": 0.0, "mat": 0.0, "n": 0.0} for i in mixers}
    device = next(student.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        walk = TeacherWalk(teacher, ids, None)
        hidden = walk.hidden
        steps = ids.shape[1]
        keep = torch.ones(steps, steps, device=device).tril()  # (T, T)
        for idx, layer in enumerate(teacher.model.layers):
            if idx in mixers:
                x = layer.input_layernorm(hidden)
                want = with_matrix and mixers[idx].matrix_form
                attn, probs = teacher_attention(layer.self_attn, x, walk.position_embeddings, walk.mask4d, want)
                rotary = walk.position_embeddings if mixers[idx].rope else None
                y = mixers[idx](x, rotary=rotary)
                sums[idx]["err"] += (y - attn).pow(2).sum().item()
                sums[idx]["ref"] += attn.pow(2).sum().item()
                if want:
                    m = mixers[idx].materialize(x, rotary=rotary)  # (B, H, T, T)
                    sums[idx]["mat"] += ((m - probs).pow(2) * keep).sum().item()
                    sums[idx]["n"] += keep.sum().item() * m.shape[0] * m.shape[1]
            hidden = walk.layer_output(idx, hidden)
    out = {}
    for idx, s in sums.items():
        out[idx] = {"output_rel_err": s["err"] / max(s["ref"], 1e-30)}
        if s["n"]:
            out[idx]["matrix_mse"] = s["mat"] / s["n"]
    return out
