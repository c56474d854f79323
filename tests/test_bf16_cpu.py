"""bf16-mixed exercised on the CPU: the GPU check's jobs (scripts/gpu_check.py), every task family, run here with
``trainer=cpu trainer.precision=bf16-mixed`` (Lightning's CPU autocast), so dtype bugs show up on every machine
and not first on a user's GPU. Outputs must be finite; the MPO layers keep float32 weights and contract to the
exact float32 dense matrix after bf16 training."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from opdf_exp.runner.app import run_task
from tests.helpers.hydra import compose_job
from tests.test_train import REPO

_spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)
ON_CPU = ["trainer=cpu", "trainer.precision=bf16-mixed"]
EMPTY_BANDS = ("r2_abs_below", "r2_abs_near", "r2_abs_above")


def on_cpu(overrides: list[str]) -> list[str]:
    """The GPU job's overrides with the CPU trainer in bf16-mixed (FSDP needs GPUs: it stays the GPU check's)."""
    kept = [o for o in overrides if not o.startswith(("trainer=", "trainer.devices="))]
    return [*kept, *ON_CPU]


@pytest.mark.parametrize("name, overrides", [job for job in gpu_check.JOBS if "FSDP" not in job[0]],
                         ids=[job[0] for job in gpu_check.JOBS if "FSDP" not in job[0]])
def test_every_task_family_runs_in_bf16_mixed_on_cpu(name, overrides, tmp_path):
    with compose_job(on_cpu(overrides), tmp_path) as cfg:
        assert cfg.trainer.precision == "bf16-mixed"
        run_task(cfg)
    payload = json.loads((tmp_path / "results.json").read_text())
    # the toy study's R² per width band is NaN by design when a band holds no point (one alpha, two widths here)
    values = {k: v for k, v in payload["metrics"].items() if isinstance(v, (int, float)) and k not in EMPTY_BANDS}
    assert values and all(math.isfinite(v) for v in values.values()), payload["metrics"]
    for stage in payload.get("stages", {}).values():  # the subquadratic stages all trained
        assert stage.get("steps", 0) > 0, payload["stages"]
    for variant in payload.get("variants", []):
        if "dense_export" in variant:  # the contracted student scores as the MPO one (both evaluated in bf16)
            assert variant["dense_export"]["max_metric_change"] < 0.05


def test_mpo_trained_under_cpu_bf16_autocast_keeps_float32_and_exports_exactly():
    from opdf_exp.mpo import apply_decomposition, export_dense

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.GELU(), torch.nn.Linear(48, 24))
    apply_decomposition(model, kind="mpo", n=3, targets=["0", "2"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(16, 24)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
            assert y.dtype == torch.bfloat16
            loss = y.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    with torch.no_grad():
        mpo_out = model(x)
        export_dense(model)
        assert all(type(m) in (torch.nn.Linear, torch.nn.GELU) for m in model)
        assert torch.allclose(model(x), mpo_out, rtol=0, atol=1e-5)
