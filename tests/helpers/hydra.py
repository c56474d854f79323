"""Compose the shipped configs and run a job in-process, the way Hydra's launcher does."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from opdf_exp.runner import resolvers
from opdf_exp.runner.cli import CONFIG_MODULE


@contextlib.contextmanager
def compose_job(overrides: list[str], output_dir: Path, cache_dir: Path | None = None) -> Iterator[DictConfig]:
    """Compose ``config`` with ``overrides`` and make it the current Hydra job writing to ``output_dir``.

    Hydra stays initialized inside the block, so tasks can compose variant configs like in a real run.
    """
    resolvers.register()
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.hydra.job.config_name = "config"
            cfg.hydra.overrides.task = list(overrides)
            cfg.paths.cache_dir = str(cache_dir or output_dir / "cache")
        HydraConfig.instance().set_config(cfg)
        yield cfg
    GlobalHydra.instance().clear()
