"""Transformer -> subquadratic students (arXiv 2504.14366 v2): ``convert`` a Llama-family causal LM into a
student whose attention layers are token mixers (``opdf_exp.mixers``), as a registered transformers model that
generates with a fixed-size state. Pure torch + transformers: no Lightning or Hydra here (docs/subquadratic.md).
"""
from opdf_exp.subquadratic.convert import INITS, SUPPORTED_FAMILIES, convert
from opdf_exp.subquadratic.modeling import (MODEL_TYPE, TRANSFORMER_ARCH, MixerAttention, MixerCache,
                                            MixerStateLayer, SubquadraticLlamaConfig, SubquadraticLlamaForCausalLM,
                                            known_archs, register)

register()

__all__ = ["convert", "INITS", "SUPPORTED_FAMILIES", "MODEL_TYPE", "TRANSFORMER_ARCH", "MixerAttention",
           "MixerCache", "MixerStateLayer", "SubquadraticLlamaConfig", "SubquadraticLlamaForCausalLM",
           "known_archs", "register"]
