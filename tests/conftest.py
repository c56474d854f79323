"""Test set-up: offline, W&B disabled, torchvision patched before anything imports it.

Fixtures compose the *shipped* configs (lightning-hydra-template style) and shrink them, so tests exercise the
same files a user runs.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one intra-op thread each,
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI runs they spawn (no OpenMP oversubscription)

import opdf_exp  # noqa: E402  (applies the torchvision work-around first)
import pytest  # noqa: E402


# Settings that make a job fast: tiny random teacher, few examples, few steps, no progress bars.
TINY = [
    "teacher=tiny_bert",
    "logger=none",
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "teacher.finetune.trainer.max_steps=2",
    "data.module.limit_train_examples=64",
    "data.module.limit_eval_examples=32",
    "data.module.batch_size=16",
    "data.module.max_length=32",
    "print_config=false",
]


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for numeric tests of many small ops (see opdf_exp.utils.threads)."""
    from opdf_exp.utils.threads import torch_threads

    with torch_threads(1):
        yield
