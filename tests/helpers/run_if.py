"""``@RunIf(...)``: skip tests whose hardware or files are missing, with a reason that says what is missing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


def RunIf(min_gpus: int = 0, packages: tuple[str, ...] = (), shared: bool = False, bf16: bool = False):  # noqa: N802
    reasons = []
    if min_gpus and torch.cuda.device_count() < min_gpus:
        reasons.append(f"needs {min_gpus} GPU(s)")
    if bf16 and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        reasons.append("needs a bf16-capable GPU")
    for package in packages:
        if importlib.util.find_spec(package) is None:
            reasons.append(f"needs package {package}")
    if shared and not SHARED.is_dir():
        reasons.append(f"needs {SHARED}")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons))
