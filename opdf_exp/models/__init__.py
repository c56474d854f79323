"""Model builders (no Hydra): load or create teachers, derive students from teacher layers, for transformers and
timm models alike."""
from opdf_exp.models.hf import load_classifier, pretrained_student, random_classifier
from opdf_exp.models.io import load_classifier_folder, save_model
from opdf_exp.models.layers import find_layer_stack, freeze_parameters, student_from_teacher, uniform_layer_map
from opdf_exp.models.timm_models import create_timm_classifier, load_timm, save_timm, timm_student

__all__ = ["create_timm_classifier", "find_layer_stack", "freeze_parameters", "load_classifier",
           "load_classifier_folder", "load_timm", "pretrained_student", "random_classifier", "save_model", "save_timm",
           "student_from_teacher", "timm_student", "uniform_layer_map"]
