"""Geometric limits of knowledge distillation (Sarkar & Deka, arXiv 2604.04037): theory, toy study, SAE measurement,
LM width sweep and linear probes. The public API is the theory below; the experiments run as Hydra tasks
(``+experiment=geometric_toy`` / ``geometric_floor``, see docs/geometry.md) or via ``python -m opdf_exp.geometry``.
"""
from opdf_exp.geometry.theory import (
    FloorFit,
    capacity,
    critical_width,
    critical_width_from_l0,
    fit_floor,
    floor_naive,
    kept_features,
    predicted_floor,
)

__all__ = ["FloorFit", "capacity", "critical_width", "critical_width_from_l0", "fit_floor", "floor_naive",
           "kept_features", "predicted_floor"]
