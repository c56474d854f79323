"""``convert``: a Llama-family teacher becomes a subquadratic student with the teacher's MLPs, norms, embeddings
and head, and (optionally) its Q/K/V/O weights copied into the mixers.

Why copying through ``init_from_attention`` with the teacher's real ``head_dim`` and GQA layout: the authors'
public code hard-codes ``head_dim = 32`` when it expands GQA keys/values, which shuffles half-heads on a 64-dim
teacher (notes/subquadratic.md §5b). Here the mixers expand exactly like HF ``repeat_kv``.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.mixers import MIXERS
from opdf_exp.subquadratic.modeling import (TRANSFORMER_ARCH, MixerAttention, SubquadraticLlamaConfig,
                                            SubquadraticLlamaForCausalLM, known_archs)

# Teacher families whose decoder layer is Llama's (RMSNorm, SwiGLU MLP, RoPE attention with q/k/v/o_proj).
# SmolLM/SmolLM2 are "llama"; Qwen2 adds q/k/v biases (and no o_proj bias).
SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
INITS = ("qkv_copy", "random")
_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
                "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
                "attention_dropout", "mlp_bias")


def _student_config(teacher_config, arch: str, attention_layers: list[int], mixer_options: dict):
    family = teacher_config.model_type
    values = {k: getattr(teacher_config, k) for k in _CONFIG_KEYS if hasattr(teacher_config, k)}
    values["head_dim"] = getattr(teacher_config, "head_dim", None) or \
        teacher_config.hidden_size // teacher_config.num_attention_heads
    values["attention_bias"] = bool(getattr(teacher_config, "attention_bias", family == "qwen2"))
    values["mlp_bias"] = bool(values.get("mlp_bias", False))
    return SubquadraticLlamaConfig(mixer=arch, mixer_options=dict(mixer_options), attention_layers=attention_layers,
                                   architectures=["SubquadraticLlamaForCausalLM"], **values)


def _check(teacher, arch: str, init: str, attention_layers) -> list[int]:
    config = getattr(teacher, "config", None)
    family = getattr(config, "model_type", type(teacher).__name__)
    if family not in SUPPORTED_FAMILIES:
        raise ConfigError(f"teacher family {family!r} is not supported; supported causal-LM families: "
                          f"{', '.join(SUPPORTED_FAMILIES)} (SmolLM/SmolLM2 are llama)")
    if arch not in known_archs():
        raise ConfigError(f"unknown student arch {arch!r}; known: {', '.join(known_archs())}")
    if init not in INITS:
        raise ConfigError(f"init={init!r} is not one of {list(INITS)}")
    n = config.num_hidden_layers
    layers = sorted({int(i) for i in (attention_layers or ())})
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ConfigError(f"attention_layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
    return layers


def convert(teacher: nn.Module, arch: str, init: str = "qkv_copy", attention_layers=(),
            **mixer_options) -> SubquadraticLlamaForCausalLM:
    """A student copy of ``teacher`` with each decoder layer's attention, except ``attention_layers``, replaced
    by ``create_mixer(arch, hidden, heads, head_dim=<teacher's>, **mixer_options)``.

    ``init="qkv_copy"``: mixers take the teacher's Q/K/V/O (``init_from_attention``; gates keep their init) and
    kept attention layers stay the teacher's. ``init="random"``: mixers keep their own init, and the attention
    of ``arch="transformer"`` (all layers softmax attention) is re-initialised, the Transformer baseline.
    Everything else (embeddings, norms, MLPs, head) is always copied.
    """
    layers = _check(teacher, arch, init, attention_layers)
    options = dict(mixer_options)
    teacher_cfg = teacher.config
    has_qkv_bias = bool(getattr(teacher.model.layers[0].self_attn.q_proj, "bias", None) is not None)
    if arch in MIXERS and has_qkv_bias and "qkv_bias" in inspect.signature(MIXERS[arch].__init__).parameters:
        options.setdefault("qkv_bias", True)
    config = _student_config(teacher_cfg, arch, layers, options)
    student = SubquadraticLlamaForCausalLM(config).to(next(teacher.parameters()).dtype)
    missing, _ = student.load_state_dict(teacher.state_dict(), strict=False)  # teacher self_attn.* of mixer layers
    for name in missing:                                                    # are simply not used
        if ".self_attn.mixer." in name or name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("self_attn.o_proj.bias"):  # Qwen2 has q/k/v biases but none on o_proj
            student.get_parameter(name).data.zero_()
            continue
        raise ConfigError(f"teacher has no weight for student parameter {name!r}; is the teacher a "
                          f"{'/'.join(SUPPORTED_FAMILIES)} causal LM?")
    if config.tie_word_embeddings:
        student.tie_weights()
    for idx, layer in enumerate(student.model.layers):
        attn_t = teacher.model.layers[idx].self_attn
        if isinstance(layer.self_attn, MixerAttention):
            if init == "qkv_copy":
                layer.self_attn.mixer.init_from_attention(
                    attn_t.q_proj.weight, attn_t.k_proj.weight, attn_t.v_proj.weight, attn_t.o_proj.weight,
                    num_kv_heads=teacher_cfg.num_key_value_heads, head_dim=config.head_dim,
                    q_bias=attn_t.q_proj.bias, k_bias=attn_t.k_proj.bias, v_bias=attn_t.v_proj.bias)
        elif init == "random" and arch == TRANSFORMER_ARCH:
            with torch.no_grad():
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                             layer.self_attn.o_proj):
                    proj.weight.normal_(0.0, config.initializer_range)
                    if proj.bias is not None:
                        proj.bias.zero_()
    student.generation_config = teacher.generation_config
    return student.eval() if not teacher.training else student
