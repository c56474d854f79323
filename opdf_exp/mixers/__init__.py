"""Linear-time token mixers for subquadratic students, in pure PyTorch (no Lightning, Hydra, transformers, timm).

Why a package of its own: the students of the subquadratic-distillation experiments replace the teacher's
attention with one of eight mixers; they must train on CPU in tests (chunked kernels), generate with a fixed-size
state, expose their mixing matrix, and take the teacher's Q/K/V weights. ``ops`` holds the recurrences on fla's
``[B, T, H, D]`` layout; the layers (``create_mixer``) wrap them with projections, gates, convs and norms.
See docs/mixers.md for the equations and the benchmark.
"""
from opdf_exp.mixers import ops
from opdf_exp.mixers.base import MIXERS, Mixer, create_mixer, expand_kv, list_mixers, register_mixer, rope_families
from opdf_exp.mixers.layers import GLA, MLSTM, DeltaNet, GatedDeltaNet, LinearAttention, Mamba2, MetaLA, RetNet

__all__ = ["MIXERS", "Mixer", "create_mixer", "list_mixers", "register_mixer", "expand_kv", "rope_families", "ops",
           "LinearAttention", "RetNet", "GLA", "MetaLA", "Mamba2", "MLSTM", "DeltaNet", "GatedDeltaNet"]
