"""GPU paths, skipped on CPU-only machines: the mixers' chunked kernels against their recurrences on CUDA, MPO
layers under bf16 autocast against float32, and real jobs with ``trainer=gpu`` (bf16-mixed) for a text and a
vision student. Run on a GPU machine with ``pytest tests/test_gpu.py`` (about a minute)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers.run_if import RunIf

pytestmark = RunIf(min_gpus=1, bf16=True)


@pytest.mark.parametrize("name", ["linear_attention", "retnet", "gla", "mlstm", "deltanet", "gated_deltanet",
                                  "mamba2", "metala"])
def test_mixer_chunk_equals_recurrent_on_cuda(name):
    from tests.test_mixers import build, grads, inputs, rel

    mixer = build(name, {}).cuda()
    x = inputs(2, 130).cuda()
    y_c, gx_c, gp_c = grads(mixer, x, mixer)
    y_r, gx_r, gp_r = grads(mixer, x, mixer.recurrent_forward)
    assert rel(y_c, y_r) < 1e-4 and rel(gx_c, gx_r) < 1e-3
    for n in gp_c:
        assert rel(gp_c[n], gp_r[n]) < 1e-3, n
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y16 = mixer(x)
    assert rel(y16.float(), y_c) < 5e-2


def test_mpo_linear_under_bf16_autocast_tracks_float32():
    from opdf_exp.mpo import apply_decomposition

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    x = torch.randn(64, 256, device="cuda")
    reference = model(x)
    apply_decomposition(model, kind="mpo", n=5, targets=["0", "2"])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = model(x)
        y.float().square().mean().backward()
    assert ((y.float() - reference).norm() / reference.norm()).item() < 3e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _job(overrides, tmp_path):
    from opdf_exp.runner.app import run_task
    from tests.helpers.hydra import compose_job

    with compose_job(overrides, tmp_path) as cfg:
        run_task(cfg)
    return json.loads((tmp_path / "results.json").read_text())


def test_text_distillation_job_in_bf16_on_gpu(tmp_path, tiny_overrides):
    payload = _job([*tiny_overrides, "trainer=gpu"], tmp_path)
    assert all(math.isfinite(v) for v in payload["metrics"].values())
    opdf = next(v for v in payload["variants"] if v["name"] == "kd_opdf")
    assert opdf["dense_export"]["max_metric_change"] < 0.05  # bf16 evaluation of the MPO vs dense student


def test_vision_distillation_job_in_bf16_on_gpu(tmp_path):
    overrides = ["+experiment=vision_cpu", "trainer=gpu", "logger=none", "print_config=false",
                 "trainer.max_steps=20", "trainer.val_check_interval=10", "teacher.finetune.trainer.max_steps=20",
                 "teacher.finetune.trainer.val_check_interval=10", "data.module.limit_train_examples=512"]
    payload = _job(overrides, tmp_path)
    assert all(math.isfinite(v) for v in payload["metrics"].values())
    assert {v["name"] for v in payload["variants"]} == {"kd", "kd_svd", "kd_opdf"}
