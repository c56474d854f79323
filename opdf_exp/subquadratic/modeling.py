"""The subquadratic student as a Hugging Face model: a Llama whose attention layers are token mixers.

Why a transformers model and not a bare ``nn.Module``: the students must generate with transformers' own loop,
save with ``save_pretrained`` and reload with ``AutoModelForCausalLM.from_pretrained(folder)`` like any other
checkpoint, so that every evaluation and serving tool that takes an HF causal LM takes them too. The config and
model classes are registered with the Auto* factories when ``opdf_exp`` is imported (never ``trust_remote_code``).

Design, kept as thin as possible over transformers 5.23's Llama:
- ``MixerAttention`` replaces ``LlamaDecoderLayer.self_attn`` and keeps its call signature
  ``(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs) -> (output, weights)``.
  It ignores RoPE (the mixers carry position through their recurrence) and the 4-D causal mask; the 2-D padding
  mask reaches it as the keyword ``mixer_padding_mask`` (added by ``SubquadraticLlamaModel.forward``).
- ``MixerCache`` is a ``DynamicCache`` whose mixer layers are ``MixerStateLayer`` objects: a fixed-size state
  dict plus a token counter (so ``get_seq_length`` and mask sizes stay right even when layer 0 is a mixer);
  attention layers of a hybrid keep an ordinary growing ``DynamicLayer``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.cache_utils import CacheLayerMixin, DynamicLayer
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel

from opdf_exp.errors import ConfigError
from opdf_exp.mixers import Mixer, create_mixer, list_mixers

MODEL_TYPE = "opdf_subquadratic_llama"
TRANSFORMER_ARCH = "transformer"  # softmax attention through the same pipeline (the Transformer student)


class SubquadraticLlamaConfig(LlamaConfig):
    """A ``LlamaConfig`` plus the mixer: ``mixer`` (a registered name or ``transformer``), ``mixer_options``
    (keyword arguments of ``create_mixer``) and ``attention_layers`` (layers that keep softmax attention)."""

    model_type = MODEL_TYPE
    mixer: str = "linear_attention"
    mixer_options: dict | None = None
    attention_layers: list | None = None

    def is_attention_layer(self, layer_idx: int) -> bool:
        return self.mixer == TRANSFORMER_ARCH or layer_idx in set(self.attention_layers or [])


class MixerStateLayer(CacheLayerMixin):
    """One mixer layer's generation cache: the mixer's fixed-size state dict and how many tokens it has seen."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: dict[str, torch.Tensor] | None = None
        self.seen_tokens = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("a mixer layer keeps a recurrent state, not keys and values")

    def update_state(self, state: dict[str, torch.Tensor], num_tokens: int) -> None:
        self.state, self.seen_tokens = state, self.seen_tokens + num_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0  # what an attention layer of the same model will hold

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.state or {}).values())

    def offload(self):
        return None

    def prefetch(self):
        return None

    def reset(self) -> None:
        self.state, self.seen_tokens = None, 0

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = {k: fn(v) for k, v in self.state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ConfigError("a recurrent mixer state cannot be cropped (no assisted or contrastive decoding)")


class MixerCache(DynamicCache):
    """``DynamicCache`` with a ``MixerStateLayer`` for every mixer layer and a ``DynamicLayer`` for attention."""

    def __init__(self, config: SubquadraticLlamaConfig):
        layers = [DynamicLayer() if config.is_attention_layer(i) else MixerStateLayer()
                  for i in range(config.num_hidden_layers)]
        DynamicCache.__bases__[0].__init__(self, layers=layers)  # Cache.__init__: skip DynamicCache's layer typing

    def state_bytes(self) -> int:
        """Bytes held by the cache: mixer states plus any attention keys and values."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, MixerStateLayer):
                total += layer.state_bytes()
            elif layer.is_initialized and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size() * 2
        return total


class MixerAttention(nn.Module):
    """Adapter with ``LlamaAttention``'s call signature around one token mixer (see the module docstring)."""

    def __init__(self, config: SubquadraticLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        options = dict(config.mixer_options or {})
        options.setdefault("head_dim", config.head_dim)
        self.mixer = create_mixer(config.mixer, config.hidden_size, config.num_attention_heads, **options)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                mixer_padding_mask=None, **kwargs):
        steps = hidden_states.shape[1]
        pad = None
        if mixer_padding_mask is not None and mixer_padding_mask.dim() == 2:
            pad = mixer_padding_mask[:, -steps:]  # (B, T): the 2-D mask covers past + current tokens
            if bool(pad.all()):
                pad = None
        rotary = position_embeddings if self.mixer.rope else None  # the teacher's RoPE tables for these tokens
        if past_key_values is None:
            return self.mixer(hidden_states, pad, rotary=rotary), None
        if not isinstance(past_key_values, MixerCache):
            raise ConfigError(f"a subquadratic student needs a MixerCache, got {type(past_key_values).__name__}; "
                              f"pass past_key_values=None or MixerCache(model.config)")
        layer = past_key_values.layers[self.layer_idx]
        run = self.mixer.recurrent_forward if steps == 1 else self.mixer.forward  # one token: the generation step
        y, state = run(hidden_states, pad, initial_state=layer.state, output_final_state=True, rotary=rotary)
        layer.update_state(state, steps)
        return y, None


class _RestoresMixerBuffers:
    """``from_pretrained`` builds the model on the meta device and loads only the checkpoint's tensors, so a
    mixer's non-persistent buffers (RetNet's constant decays) would stay uninitialised; transformers calls
    ``_init_weights`` on such modules, and here they are recomputed from a freshly built mixer."""

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Mixer) and module._non_persistent_buffers_set:
            options = dict(self.config.mixer_options or {})
            options.setdefault("head_dim", self.config.head_dim)
            with torch.device("cpu"):
                fresh = create_mixer(self.config.mixer, self.config.hidden_size, self.config.num_attention_heads,
                                     **options)
            for name in module._non_persistent_buffers_set:
                buffer = getattr(module, name)
                setattr(module, name, getattr(fresh, name).to(device=buffer.device, dtype=buffer.dtype))


class SubquadraticLlamaModel(_RestoresMixerBuffers, LlamaModel):
    config_class = SubquadraticLlamaConfig

    def __init__(self, config: SubquadraticLlamaConfig):
        super().__init__(config)
        for idx, layer in enumerate(self.layers):
            if not config.is_attention_layer(idx):
                layer.self_attn = MixerAttention(config, idx)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = MixerCache(self.config)
        if attention_mask is not None and attention_mask.dim() == 2:
            kwargs["mixer_padding_mask"] = attention_mask
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                               **kwargs)


class SubquadraticLlamaForCausalLM(_RestoresMixerBuffers, LlamaForCausalLM):
    config_class = SubquadraticLlamaConfig

    def __init__(self, config: SubquadraticLlamaConfig):
        LlamaPreTrainedModel.__init__(self, config)  # not LlamaForCausalLM.__init__: it would build a LlamaModel
        self.model = SubquadraticLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() builds a plain DynamicCache; swap in a MixerCache unless the caller passed a cache."""
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, MixerCache) and not getattr(cache, "_is_user_defined", False):
            model_kwargs["past_key_values"] = MixerCache(self.config)
        return result

    def mixers(self) -> dict[int, nn.Module]:
        """Layer index -> token mixer (attention layers of a hybrid are absent)."""
        return {i: layer.self_attn.mixer for i, layer in enumerate(self.model.layers)
                if isinstance(layer.self_attn, MixerAttention)}

    def state_bytes_per_sequence(self, seq_len: int, dtype: torch.dtype = torch.float32) -> int:
        """Generation memory per sequence after ``seq_len`` tokens: mixer states are fixed in T, attention layers
        of a hybrid (or the Transformer student) hold keys and values for every token."""
        size = torch.empty((), dtype=dtype).element_size()
        total = sum(m.state_numel(1) for m in self.mixers().values()) * size
        kv_layers = self.config.num_hidden_layers - len(self.mixers())
        total += kv_layers * 2 * seq_len * self.config.num_key_value_heads * self.config.head_dim * size
        return total


def register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the student (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, SubquadraticLlamaConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(SubquadraticLlamaConfig, SubquadraticLlamaForCausalLM)
    except ValueError:
        pass


def known_archs() -> list[str]:
    return [*list_mixers(), TRANSFORMER_ARCH]
