"""Distillation losses: a weighted sum of named terms, each logged unweighted (torchdistill style)."""
from opdf_exp.distill.loss import DistillationLoss, DistillContext
from opdf_exp.distill.taps import ForwardTaps
from opdf_exp.distill.terms import HiddenStateMSE, LogitKL, LossTerm, ModuleOutputMSE, TaskLoss, TensorAlignment

__all__ = ["DistillationLoss", "DistillContext", "ForwardTaps", "LossTerm", "TaskLoss", "LogitKL", "HiddenStateMSE",
           "ModuleOutputMSE", "TensorAlignment"]
