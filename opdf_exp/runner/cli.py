"""Command-line entry point: ``python -m opdf_exp [overrides] [-m]``.

Before handing over to Hydra, the overrides are composed once (sweeps reduced to their first value) so that a
typo, an unknown option or a missing config file fails in under a second with one line naming the fix, instead
of Hydra's multi-line report or a failure deep inside a sweep.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from opdf_exp.errors import UserError
from opdf_exp.runner import resolvers

# Registered at import: launcher workers (joblib, submitit) import this module when they unpickle the task
# function, and compose the job's config there, so ${uid:} and ${cwd:} must resolve without main() running.
resolvers.register()

CONFIG_MODULE = "opdf_exp.conf"
CONFIG_NAME = "config"
EXIT_USAGE = 2
# Hydra flags that take a value (skipped when collecting overrides).
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--experimental-rerun"}


def one_line(message: str) -> str:
    """Flatten a (Hydra) error message into one line; option lists become comma-separated."""
    text = str(message).split("Config search path")[0]
    out: list[str] = []
    listing = False
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        if listing and out:
            out[-1] += (" " if out[-1].endswith(":") else ", ") + line
            continue
        listing = line.endswith(":")
        out.append(line.rstrip("."))
    return ". ".join(out)


def _collect_overrides(argv: list[str]) -> tuple[list[str], str]:
    overrides, config_name, skip = [], CONFIG_NAME, False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--config-name", "-cn") and index + 1 < len(argv):
            config_name = argv[index + 1]
        if arg in _FLAGS_WITH_VALUE:
            skip = True
            continue
        if arg.startswith("-"):
            continue
        overrides.append(arg)
    return overrides, config_name


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """Replace every sweep (``a=1,2``, ``range()``, ``glob()``) by its first value for a dry composition."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    single = []
    for override, text in zip(parsed, overrides):
        if override.is_sweep_override():
            try:
                first = next(iter(override.sweep_string_iterator()))
            except Exception:  # glob sweeps need the options list: leave validation to Hydra
                continue
            single.append(f"{override.get_key_element()}={first}")
        else:
            single.append(text)
    return single


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    keys = []
    for key in cfg.keys() if isinstance(cfg, DictConfig) else []:
        path = f"{prefix}{key}"
        keys.append(path)
        try:
            child = cfg._get_node(key)
        except Exception:
            continue
        if isinstance(child, DictConfig):
            keys += _flat_keys(child, path + ".")
    return keys


def _closest_keys(message: str, compose_fn) -> str:
    """For an override of a key that does not exist, name the closest keys of the composed config."""
    import difflib
    import re

    match = re.search(r"Could not override '([^']+)'|Key '([^']+)' is not in struct", message)
    if not match:
        return ""
    bad = match.group(1) or match.group(2)
    try:
        keys = _flat_keys(compose_fn())
    except Exception:
        return ""
    close = difflib.get_close_matches(bad, keys, n=3, cutoff=0.6)
    return f"; closest keys: {', '.join(close)}" if close else ""


def validate_overrides(argv: list[str]) -> None:
    """Compose the config once; raise :class:`UserError` with a one-line message on any problem (an unknown key
    names the closest existing ones). Then the checks of :mod:`opdf_exp.runner.checks`: every config value the
    job and its variants use, and the machine only when the jobs run on it (not for ``--cfg``, not for a SLURM
    launcher: a login node has no GPU, the job checks its own node)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from opdf_exp.runner.checks import check_job_and_variants, check_launch

    overrides, config_name = _collect_overrides(argv)
    multirun = any(a in ("-m", "--multirun") for a in argv)
    printing = any(a in ("--cfg", "-c") for a in argv)
    try:
        overrides = _first_of_sweeps(overrides)
        GlobalHydra.instance().clear()
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            try:
                cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            except (HydraException, OmegaConfBaseException) as error:
                hint = _closest_keys(str(error), lambda: compose(config_name, overrides=[
                    o for o in overrides if "." not in o.split("=", 1)[0]]))
                raise UserError(one_line(str(error)) + hint) from None

            def compose_variant(extra: list[str]):
                try:
                    return compose(config_name, overrides=overrides + extra)
                except (HydraException, OmegaConfBaseException) as error:
                    raise UserError(f"overrides {extra} do not compose: {one_line(str(error))}") from None

            check_job_and_variants(cfg, compose_variant)
            check_launch(cfg, multirun=multirun, printing=printing)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        if isinstance(error, UserError):
            raise
        raise UserError(one_line(str(error))) from None
    finally:
        GlobalHydra.instance().clear()


@hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
def _hydra_main(cfg: DictConfig) -> float | None:
    from opdf_exp.runner.app import run_job

    return run_job(cfg)


def main() -> None:
    from opdf_exp.runner import optuna_sweeper

    resolvers.register()
    optuna_sweeper.install()  # hparams_search=...: a relaunch continues the stored study
    argv = sys.argv[1:]
    # Lightning's DDP launcher re-runs the job from its saved config (-cp <job>/.hydra -cn config.yaml or
    # --experimental-rerun): that composition was validated when the job started.
    relaunch = any(a in ("--experimental-rerun", "-cp", "--config-path") for a in argv)
    if not relaunch and not any(a in ("--help", "-h", "--hydra-help", "--info", "--shell-completion", "-sc") for a in argv):
        try:
            validate_overrides(argv)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(EXIT_USAGE)
    _hydra_main()
