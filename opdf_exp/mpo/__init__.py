"""MPO (matrix product operator / tensor-train matrix) over-parameterization for OPDF, in pure torch.

No Lightning or Hydra imports here (layering rule). See docs/mpo.md for the API, gauge and contraction choices.
"""
from opdf_exp.mpo.amplification import step_amplification
from opdf_exp.mpo.align import AlignPair, TensorAlignmentLoss, split_layer_name, uniform_map
from opdf_exp.mpo.decompose import (check_factors, contraction_plan, fix_signs, mpo_contract, mpo_decompose,
                                    mpo_num_params, mpo_ranks)
from opdf_exp.mpo.layers import MPOEmbedding, MPOLinear
from opdf_exp.mpo.surgery import (DEFAULT_TARGETS, MPOPlanEntry, apply_decomposition, balanced_factors,
                                  check_decomposition,
                                  count_params, default_targets, detect_family, end_factors, export_dense,
                                  match_targets, mpo_layers, overparameterize, plan_decomposition)

__all__ = [
    "mpo_decompose", "mpo_contract", "mpo_ranks", "mpo_num_params", "check_factors", "contraction_plan", "fix_signs",
    "MPOLinear", "MPOEmbedding",
    "overparameterize", "export_dense", "apply_decomposition", "check_decomposition", "count_params", "mpo_layers", "plan_decomposition",
    "MPOPlanEntry", "balanced_factors", "end_factors", "match_targets", "default_targets", "detect_family",
    "DEFAULT_TARGETS",
    "TensorAlignmentLoss", "AlignPair", "step_amplification", "split_layer_name", "uniform_map",
]
