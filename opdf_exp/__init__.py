"""opdf_exp: a Hydra + Lightning experiment framework for knowledge-distillation research.

Layers (each knows nothing of the ones above it):
  mpo/, mixers/, geometry/ theory -- pure torch math (mixers/: the linear-time token mixers of the subquadratic
                                     students, with their chunked and recurrent kernels)
  models/, data/, distill/ -- models, data and loss terms, no Hydra
  subquadratic/            -- Transformer -> token-mixer students as registered transformers models, no Hydra
  lit/                     -- the LightningModule
  runner/                  -- the only place that reads Hydra configs and composes everything
"""
from opdf_exp import _torchvision_compat

# Must run before anything imports torchvision, timm, pytorch_lightning or transformers.
_torchvision_compat.apply()

__version__ = "0.1.0"

# The subquadratic students are transformers models: their config and model classes are registered with
# AutoConfig / AutoModelForCausalLM so that a saved student reloads with from_pretrained(folder) after
# `import opdf_exp`. Registering needs transformers, which the pure-torch layers (mixers, mpo) must not pull in,
# so it happens the moment transformers is imported (now, if it already is).
from opdf_exp import _hf_registration  # noqa: E402

_hf_registration.install()
