"""What a batch hands to a model: the one list of model-input keys, shared by the LightningModule and the
teacher-output cache (so both feed the teacher exactly the same tensors)."""
from __future__ import annotations

from typing import Mapping

import torch

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``batch`` a model's ``forward`` takes (labels and example indices stay out)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
