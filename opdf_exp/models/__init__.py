"""Model builders (no Hydra): load or create teachers, derive students from teacher layers."""
from opdf_exp.models.hf import load_classifier, pretrained_student, random_classifier
from opdf_exp.models.layers import find_layer_stack, freeze_parameters, student_from_teacher, uniform_layer_map

__all__ = ["load_classifier", "pretrained_student", "random_classifier", "find_layer_stack", "freeze_parameters", "student_from_teacher", "uniform_layer_map"]
