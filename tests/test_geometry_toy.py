"""Toy superposition study: the batched model, the sweep layout, and an end-to-end smoke run of the task."""
import csv
import json

import numpy as np
import pytest
import torch

from opdf_exp.errors import ConfigError
from opdf_exp.geometry import theory, toy


def test_fused_loss_matches_autograd():
    torch.manual_seed(0)
    m, b, d, n = 5, 64, 3, 12
    w = torch.randn(m, d, n, requires_grad=True)
    bias = (0.1 * torch.randn(m, 1, n)).requires_grad_()
    x = torch.rand(m, b, n) * (torch.rand(m, b, n) < 0.3)
    target = torch.rand(m, b, n) * (torch.rand(m, b, n) < 0.3)
    imp = torch.rand(m, 1, n)
    ref = (imp * (torch.relu(torch.bmm(torch.bmm(x, w.transpose(1, 2)), w) + bias) - target).square()).sum(-1).mean(-1)
    weights = torch.arange(1.0, m + 1)
    g_ref = torch.autograd.grad((ref * weights).sum(), [w, bias])
    out = toy.TmsLoss.apply(w, bias, x, target, imp)
    g_out = torch.autograd.grad((out * weights).sum(), [w, bias])
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    for a, c in zip(g_ref, g_out):
        assert torch.allclose(a, c, rtol=1e-4, atol=1e-6)


def test_sweep_layout_is_the_papers_48_configs():
    sweep = toy.ToySweep([10, 20, 40], [0.8, 0.9, 0.95, 0.99], [3, 5, 8, 10], seeds=[0], controls=False)
    roles = [s.role for s in sweep.models]
    assert roles.count("teacher") == 48
    assert roles.count("student") == 12 * (2 + 4 + 7 + 9)  # every teacher into every smaller width
    student = next(s for s in sweep.models if s.role == "student" and s.teacher_width == 10 and s.width == 9)
    assert sweep.models[student.teacher_id].width == 10 and sweep.models[student.teacher_id].n == student.n
    with pytest.raises(ConfigError, match="exceeds"):
        toy.ToySweep([4], [0.9], [5], seeds=[0])
    with pytest.raises(ConfigError, match="alpha"):
        toy.ToySweep([10], [1.0], [3], seeds=[0])


def test_sparse_sampler_statistics():
    gen = torch.Generator().manual_seed(0)
    x = toy.sample_sparse(gen, torch.tensor([0.2, 0.05]), 20000, 10)
    active = (x > 0).float().mean((1, 2))
    assert active[0] == pytest.approx(0.2, abs=0.01) and active[1] == pytest.approx(0.05, abs=0.005)
    assert float(x.square().mean((1, 2))[0]) == pytest.approx(toy.toy_ex2(0.8), rel=0.05)
    assert float(x.max()) <= 1.0


def test_importance_profiles():
    assert np.allclose(toy.importance_profile(4, "zipf", s=1), [1, 1 / 2, 1 / 3, 1 / 4])
    assert np.allclose(toy.importance_profile(3, "geometric", base=0.7), [1, 0.7, 0.49])
    with pytest.raises(ConfigError, match="importance kind"):
        toy.importance_profile(3, "pareto")


def test_toy_smoke_end_to_end(tmp_path):
    """+experiment=geometric_toy_smoke through the shipped configs and the task function."""
    import hydra

    from tests.helpers.hydra import compose_job

    with compose_job(["+experiment=geometric_toy_smoke", "task.train.steps=60", "task.eval.samples=2048"],
                     tmp_path) as cfg:
        task = hydra.utils.instantiate(cfg.task, _partial_=True)
        result = task(cfg)
    metrics = result["metrics"]
    assert metrics["n_configs"] == 2 and metrics["n_points"] == 2 + 4
    assert -1 <= metrics["pearson_r"] <= 1
    assert set(result["tables"]) >= {"toy_r2_by_stratum", "toy_accuracy (eq2)", "toy_dstar"}
    with open(tmp_path / "toy_floors.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {"observed", "eq2", "equilibrium", "measured_kept"} <= set(rows[0])
    for row in rows:
        assert float(row["observed"]) > 0
        expected = theory.predicted_floor(int(row["d_S"]), 0.9, toy.importance_profile(20), toy.toy_ex2(0.9))
        assert float(row["eq2"]) == pytest.approx(expected, rel=1e-4)
    assert (tmp_path / "toy_pred_vs_obs.png").stat().st_size > 1000
    assert (tmp_path / "toy_floor_vs_width.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "toy_summary.json").read_text())
    assert summary["params"]["predictor"] == "eq2"


def test_toy_task_rejects_unknown_options(tmp_path):
    from omegaconf import OmegaConf

    from opdf_exp.runner.geometry_tasks import geometric_toy

    cfg = OmegaConf.create({"seed": 0, "paths": {"output_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="unknown option task.train.stepz"):
        geometric_toy(cfg, train={"stepz": 3})
    with pytest.raises(ConfigError, match="predictor"):
        geometric_toy(cfg, predictor="oracle")


@pytest.mark.parametrize("name", ["geometric_toy", "geometric_floor"])
def test_task_yaml_matches_code_defaults(name):
    """conf/task/<name>.yaml and the code defaults (used when the task is called directly) never drift apart."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    from opdf_exp.runner import geometry_runs as runs

    yaml = OmegaConf.to_container(OmegaConf.load(files("opdf_exp.conf") / "task" / f"{name}.yaml"))
    assert yaml.pop("_target_") == f"opdf_exp.runner.geometry_tasks.{name}" and yaml.pop("_partial_") is True
    defaults = runs.TOY_DEFAULTS if name == "geometric_toy" else runs.FLOOR_DEFAULTS
    assert yaml == defaults


def test_geometry_study_logs_to_wandb_through_the_one_trainer_builder(tmp_path, monkeypatch):
    """``logger=wandb`` works for the geometry studies too: one offline run with each stage's prefixed losses,
    the resolved config and the final metrics."""
    pytest.importorskip("wandb")
    from opdf_exp.runner.app import run_job
    from tests.helpers.hydra import compose_job

    monkeypatch.setenv("WANDB_MODE", "offline")
    with compose_job(["+experiment=geometric_toy_smoke", "task.train.steps=20", "task.eval.samples=1024",
                      "task.plots=false", "logger=wandb", "print_config=false"], tmp_path) as cfg:
        run_job(cfg)
    from tests.helpers.wandb_record import read_offline_record

    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    expected = (b"toy_teachers/train/loss", b"toy_students/train/loss", b"geometric_toy_smoke", b"pearson_r")
    record = read_offline_record(tmp_path, expected)
    for item in expected:
        assert item in record, item
