"""Every shipped config composes; every group option and experiment is reachable; objects instantiate."""
from importlib.resources import files
from pathlib import Path

import hydra
import pytest

from tests.helpers.hydra import compose_job

CONF = Path(str(files("opdf_exp.conf")))
GROUPS = ["task", "data", "teacher", "student", "decomposition", "distill", "optim", "trainer", "callbacks",
          "logger", "paths", "hydra", "debug"]


def options(group: str) -> list[str]:
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def experiments() -> list[str]:
    return options("experiment")


def test_required_groups_exist():
    for group in GROUPS + ["experiment"]:
        assert options(group), f"config group {group}/ is empty"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g) if g != "hydra"])
def test_every_group_option_composes(group, option, tmp_path):
    override = f"{group}={option}"
    with compose_job([override], tmp_path) as cfg:
        assert cfg.task_name
        assert cfg.paths.output_dir == str(tmp_path)


@pytest.mark.parametrize("name", experiments())
def test_every_experiment_composes(name, tmp_path):
    with compose_job([f"+experiment={name}"], tmp_path) as cfg:
        assert "_target_" in cfg.task


def test_quickstart_defaults_and_bert_glue_deltas(tmp_path):
    with compose_job([], tmp_path) as cfg:
        assert cfg.teacher.name == "minilm_l6" and cfg.data.name == "bbc_news"
        assert list(cfg.task.variants) == ["no_kd", "kd", "kd_svd", "kd_opdf"]
    with compose_job(["+experiment=bert_glue", "data=glue/sst2"], tmp_path) as cfg:
        assert cfg.teacher.model.name_or_path == "bert-base-uncased"
        assert cfg.student.model.num_layers == 6 and not cfg.task.variants
        assert cfg.data.name == "sst2" and cfg.data.module.source.path is None


def test_data_and_trainer_instantiate(tmp_path):
    with compose_job(["teacher=tiny_bert"], tmp_path) as cfg:
        dm = hydra.utils.instantiate(cfg.data.module)
        assert dm.load_splits().num_labels == cfg.data.num_labels
        trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert trainer.max_steps == cfg.trainer.max_steps
        model = hydra.utils.instantiate(cfg.teacher.model)
        assert model.config.num_labels == 5
