"""One interface between models and losses: an adapter runs a model on a batch and returns named outputs.

Why: the LightningModule, every loss term, the teacher-output cache and LGTM's influence step used to assume a
Hugging Face model (a whitelist of input keys, ``.logits``, ``output_hidden_states=True``, ``config.hidden_size``).
timm models take one image tensor, return a bare tensor and expose intermediate features through
``forward_intermediates``; other families will differ again. An adapter hides exactly those differences:

- :meth:`ModelAdapter.run` gives :class:`ModelOutputs`: ``logits`` and, when asked, ``hidden_states`` indexed
  0..N (0 is the input of the first block, i the output of block i; tokens as ``[B, L, C]`` for every family);
- :meth:`ModelAdapter.call_arguments` / :meth:`ModelAdapter.logits_of` split one plain forward into its call and
  its result, for code that calls the model itself (``torch.func.functional_call`` in LGTM);
- :meth:`ModelAdapter.num_hidden` / :meth:`ModelAdapter.hidden_width` size layer-mapped terms and projections.

Module-path features (any named submodule) are captured by :class:`opdf_exp.distill.taps.ForwardTaps` for every
family alike. No Lightning or Hydra here (layering rule).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.models.timm_models import is_timm_model  # noqa: F401  (re-exported: the family test lives in models/)


@dataclass
class ModelOutputs:
    """What a loss term reads, by name. ``dist_logits``: a DeiT distillation head's logits (training only)."""

    logits: torch.Tensor
    hidden_states: tuple | None = None
    dist_logits: torch.Tensor | None = None


class ModelAdapter:
    """Base class: how one model family is called. Subclasses implement the four methods below."""

    family = "generic"

    def call_arguments(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[tuple, dict]:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> None:
        """Set a model up for training once (nothing by default)."""

    def logits_of(self, raw: Any) -> torch.Tensor:
        raw = raw[0] if isinstance(raw, (tuple, list)) else raw
        return raw.logits if hasattr(raw, "logits") else raw

    def run(self, model: nn.Module, batch: Mapping[str, torch.Tensor], hidden_states: bool = False) -> ModelOutputs:
        args, kwargs = self.call_arguments(model, batch)
        return ModelOutputs(logits=self.logits_of(model(*args, **kwargs)))

    def num_hidden(self, model: nn.Module) -> int:
        """N: hidden states run 0..N."""
        from opdf_exp.models.layers import find_layer_stack

        return len(find_layer_stack(model)[1])

    def hidden_width(self, model: nn.Module, index: int) -> int:
        raise ConfigError(f"cannot tell the hidden width of {type(model).__name__}; set projection=true or false")


NOT_MODEL_INPUTS = frozenset({"labels", "example_index", "return_dict"})


class KeywordAdapter(ModelAdapter):
    """Any ``nn.Module`` called with the batch entries its ``forward`` names (all but labels and example indices
    when it takes ``**kwargs``), returning logits or an object with ``.logits``. No hidden states."""

    family = "keyword"

    def __init__(self):
        self._accepted: dict[type, frozenset[str] | None] = {}

    def _accepted_keys(self, model: nn.Module) -> frozenset[str] | None:
        cls = type(model)
        if cls not in self._accepted:
            params = inspect.signature(model.forward).parameters
            takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
            self._accepted[cls] = None if takes_any else frozenset(params)
        return self._accepted[cls]

    def call_arguments(self, model, batch):
        keys = self._accepted_keys(model)
        return (), {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS and (keys is None or k in keys)}

    def run(self, model, batch, hidden_states=False):
        if hidden_states:
            raise ConfigError(f"{type(model).__name__} gives no hidden states; use terms on logits or module paths "
                              "(distill.terms.features)")
        return super().run(model, batch)


class HFAdapter(KeywordAdapter):
    """transformers models: keyword inputs (the ones ``forward`` accepts), ``.logits``, ``output_hidden_states``."""

    family = "hf"

    def run(self, model, batch, hidden_states=False):
        _, kwargs = self.call_arguments(model, batch)
        out = model(**kwargs, output_hidden_states=bool(hidden_states), return_dict=True)
        return ModelOutputs(logits=out.logits, hidden_states=getattr(out, "hidden_states", None) if hidden_states else None)

    def num_hidden(self, model):
        config = getattr(model, "config", None)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if isinstance(getattr(config, key, None), int):
                return int(getattr(config, key))
        return super().num_hidden(model)

    def hidden_width(self, model, index):
        return int(model.config.hidden_size)


class TimmAdapter(ModelAdapter):
    """timm models: one positional image tensor (``pixel_values``); hidden states from ``forward_intermediates``
    (block or stage outputs, before the final norm) where the model has it, else from forward hooks on the modules
    its ``feature_info`` names. Index 0 is the input of the first of those modules (captured by a pre-hook).
    Vision-transformer tokens keep their prefix tokens first (``[B, prefix + H*W, C]``, so [CLS] is token 0);
    NCHW maps become ``[B, H*W, C]``.

    A DeiT distilled model (``VisionTransformerDistilled``) is switched to distilled training: in training mode
    its two heads come back as ``logits`` (class token) and ``dist_logits`` (distillation token); in eval mode
    timm averages them, as DeiT does at inference.
    """

    family = "timm"

    def call_arguments(self, model, batch):
        if "pixel_values" not in batch:
            raise ConfigError(f"a timm model needs image batches (pixel_values); this batch has {sorted(batch)}: "
                              "use an image data config (data=mnist_digits, data=image_folder, ...)")
        return (batch["pixel_values"],), {}

    def prepare(self, model: nn.Module) -> None:
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)

    def _feature_modules(self, model) -> list[str]:
        info = getattr(model, "feature_info", None)
        names = [entry["module"] for entry in info] if info else []
        if not names:
            from opdf_exp.models.layers import find_layer_stack

            path, stack = find_layer_stack(model)
            names = [f"{path}.{i}" for i in range(len(stack))]
        return names

    def num_hidden(self, model):
        return len(self._feature_modules(model))

    def hidden_width(self, model, index):
        info = getattr(model, "feature_info", None)
        if info:
            if index == 0:
                return int(getattr(model, "embed_dim", None) or info[0]["num_chs"])
            return int(info[index - 1]["num_chs"])
        return int(getattr(model, "embed_dim", None) or model.num_features)

    def _split_logits(self, head_out) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(head_out, (tuple, list)):  # DeiT distilled training: (class head, distillation head)
            return head_out[0], head_out[1]
        return head_out, None

    def run(self, model, batch, hidden_states=False):
        args, _ = self.call_arguments(model, batch)
        pixels = args[0]
        if not hidden_states:
            logits, dist = self._split_logits(model(pixels))
            return ModelOutputs(logits=logits, dist_logits=dist)
        first = dict(model.named_modules())[self._feature_modules(model)[0]]
        captured: list[torch.Tensor] = []
        handle = first.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        try:
            if hasattr(model, "forward_intermediates"):
                final, states = self._intermediates(model, pixels)
                logits, dist = self._split_logits(model.forward_head(final))
            else:
                states, (logits, dist) = self._hooked(model, pixels)
        finally:
            handle.remove()
        hidden = tuple(_tokens(t) for t in [captured[0], *states])
        return ModelOutputs(logits=logits, dist_logits=dist, hidden_states=hidden)

    def _intermediates(self, model, pixels):
        params = inspect.signature(model.forward_intermediates).parameters
        if "return_prefix_tokens" in params:  # ViT family: tokens, prefix tokens kept
            final, states = model.forward_intermediates(pixels, output_fmt="NLC", return_prefix_tokens=True)
            states = [torch.cat([prefix, spatial], dim=1) if prefix is not None else spatial
                      for spatial, prefix in states]
        else:
            final, states = model.forward_intermediates(pixels)
        return final, list(states)

    def _hooked(self, model, pixels):
        modules = dict(model.named_modules())
        states: dict[int, torch.Tensor] = {}
        handles = [modules[name].register_forward_hook(
            lambda _m, _i, out, i=i: states.__setitem__(i, out[0] if isinstance(out, (tuple, list)) else out))
            for i, name in enumerate(self._feature_modules(model))]
        try:
            head = self._split_logits(model(pixels))
        finally:
            for handle in handles:
                handle.remove()
        return [states[i] for i in sorted(states)], head


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, H*W, C]``; token tensors unchanged."""
    return t.flatten(2).transpose(1, 2) if t.dim() == 4 else t


_HF = HFAdapter()
_TIMM = TimmAdapter()
_KEYWORD = KeywordAdapter()


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s family: timm, transformers, else keyword inputs (a model can name its own
    through an ``adapter`` attribute)."""
    explicit = getattr(model, "adapter", None)
    if isinstance(explicit, ModelAdapter):
        return explicit
    if is_timm_model(model):
        return _TIMM
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        PreTrainedModel = ()
    if isinstance(model, PreTrainedModel):
        return _HF
    return _KEYWORD


def model_logits(model: nn.Module, **inputs: Any) -> torch.Tensor:
    """``model``'s logits for keyword ``inputs`` (``input_ids=...``), through its adapter: the one call the
    language-model stages (subquadratic, geometry) make, whatever the model family."""
    return adapter_for(model).run(model, inputs).logits


def check_chunkable(model: nn.Module, role: str = "model") -> None:
    """A chunked vocabulary loss applies the LM head itself, so the model's logits must be exactly
    ``head(final hidden state)``: no logit soft-capping or scaling, and a base model holding the final norm."""
    config = getattr(model, "config", None)
    for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            raise ConfigError(f"chunk_size needs logits = lm_head(hidden); the {role} ({type(model).__name__}) "
                              f"transforms them ({key}={getattr(config, key)}); set chunk_size=null")
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, prefix, None) is None or model.get_output_embeddings() is None:
        raise ConfigError(f"chunk_size needs a causal LM with a base model and an LM head; the {role} "
                          f"({type(model).__name__}) has none; set chunk_size=null")


def hidden_and_head(model: nn.Module, **inputs: Any) -> tuple[torch.Tensor, nn.Module]:
    """``(final hidden states [B, T, D], LM head)`` of a transformers causal LM, without computing the logits: the
    base model (``model.<base_model_prefix>``, final norm included) and ``get_output_embeddings()``."""
    base = getattr(model, model.base_model_prefix)
    inputs.setdefault("use_cache", False)
    return base(**inputs).last_hidden_state, model.get_output_embeddings()
