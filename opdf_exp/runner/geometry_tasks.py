"""Hydra task entry points of the geometry studies (``conf/task/geometric_*.yaml``): they turn a DictConfig into
plain arguments, so ``opdf_exp.geometry`` itself never reads one (only the runner layer knows Hydra).

The runner instantiates ``cfg.task`` with ``_partial_: true`` and calls ``fn(cfg)``; the task's own options arrive
as keyword arguments. Both functions are also callable directly, e.g.
``geometric_toy(OmegaConf.create({"seed": 0, "paths": {"output_dir": "out"}}), seeds=1)``.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _context(cfg) -> tuple[int, str]:
    seed = int(cfg.get("seed", 0) or 0) if cfg is not None else 0
    paths = cfg.get("paths") if cfg is not None else None
    output_dir = paths.get("output_dir") if paths is not None else None
    if not output_dir:
        from opdf_exp.errors import ConfigError

        raise ConfigError("paths.output_dir is not set; the geometry tasks write their tables and plots there")
    return seed, str(output_dir)


def _run_with_loggers(cfg: DictConfig, run, params: dict) -> dict:
    """Build the job's loggers, hand the study a stage-Trainer factory on them, then attach the resolved config
    and the final metrics to every logger (W&B: run config and summary), as the distillation task does."""
    from opdf_exp.runner.loggers import build_loggers, log_final
    from opdf_exp.runner.trainer import StageTrainers

    seed, output_dir = _context(cfg)
    loggers = build_loggers(cfg.get("logger")) if cfg is not None else []
    result = run(params, output_dir, seed, make_trainer=StageTrainers(cfg, loggers))
    if loggers:
        log_final(loggers, {k: _plain(v) for k, v in cfg.items() if k != "hydra"}, dict(result.get("metrics", {})))
    return result


def _study_params(cfg: DictConfig | None, params: dict[str, Any]) -> dict[str, Any]:
    plain = {k: _plain(v) for k, v in params.items()}
    trainer = cfg.get("trainer") if cfg is not None else None
    if trainer is not None and "trainer" not in plain:  # the evaluation device follows the job's trainer group
        plain["trainer"] = {"accelerator": str(trainer.get("accelerator", "cpu")),
                            "precision": str(trainer.get("precision", "32-true")), "devices": trainer.get("devices", 1)}
    return plain


def geometric_toy(cfg: DictConfig, **params: Any) -> dict:
    """The 48-config toy superposition study (``+experiment=geometric_toy``)."""
    from opdf_exp.runner.geometry_runs import run_toy_experiment

    plain = _study_params(cfg, params)
    plain.pop("trainer", None)
    return _run_with_loggers(cfg, run_toy_experiment, plain)


def geometric_floor(cfg: DictConfig, **params: Any) -> dict:
    """The LM width sweep: teacher, SAE measurement, distilled students, calibrated floors, probes
    (``+experiment=geometric_floor``; paper scale: ``+experiment=geometric_floor_pythia``)."""
    from opdf_exp.runner.geometry_runs import run_floor_experiment

    return _run_with_loggers(cfg, run_floor_experiment, _study_params(cfg, params))
