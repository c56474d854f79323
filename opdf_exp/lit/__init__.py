"""Lightning wrappers: they own the training loop mechanics, never model construction or configs."""
from opdf_exp.lit.module import DistillationModule

__all__ = ["DistillationModule"]
