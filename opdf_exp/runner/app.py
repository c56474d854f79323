"""The failure-safe job wrapper around every task.

For each Hydra job it: skips the job when its folder already holds a complete ``results.json`` for the same
overrides (a relaunched sweep), seeds everything, prints and saves the config tree, runs the task, writes
``results.json`` atomically (rank zero only), and always closes W&B (so multirun jobs never share a run).

Failures: user errors print one line (exit 2 in a single run). In a multirun any failing job writes
``error.txt`` (the one-line error, then the traceback) into its folder and returns, so the sweep goes on; the
end-of-sweep report lists it. A killed job leaves no ``results.json``, so a relaunch runs it again (resuming its
stages from their ``last.ckpt``, see ``runner/distill_task.py``).
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import traceback
import warnings
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opdf_exp.errors import ConfigError, UserError
from opdf_exp.utils.distributed import is_global_zero, world_size
from opdf_exp.utils.io import atomic_write_json, atomic_write_text, json_digest

log = logging.getLogger("opdf_exp")
RESULTS_FILE = "results.json"
PREVIOUS_RESULTS_FILE = "results.previous.json"  # a finished result a rerun set aside until it finishes
ERROR_FILE = "error.txt"
CONFIG_TREE_FILE = "config_tree.txt"
RESUME_MODES = ("auto", "overrides", "never")
TREE_ORDER = ("task", "data", "teacher", "student", "decomposition", "distill", "optim", "trainer", "callbacks",
              "logger", "paths")


def print_config_tree(cfg: DictConfig, save_to: Path | None = None) -> str:
    """Render the resolved config as a rich tree (fixed group order), print it and save it as plain text."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("CONFIG", guide_style="dim")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER and k != "hydra"]
    for key in keys:
        branch = tree.add(str(key))
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) or OmegaConf.is_list(value) else str(value)
        branch.add(Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    console = Console(file=sys.stdout, width=120)
    console.print(tree)
    plain = Console(width=120, record=True, file=io.StringIO(), color_system=None)
    plain.print(tree)
    text = plain.export_text()
    if save_to is not None:
        atomic_write_text(save_to, text)
    return text


def job_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# Config entries that name folders, loggers or console output: a result does not depend on them.
VOLATILE_KEYS = ("hydra", "paths", "logger", "print_config", "resume", "tags")
VOLATILE_TRAINER_KEYS = ("default_root_dir", "enable_progress_bar", "enable_model_summary", "log_every_n_steps")


# ``results.json -> config_digests_format``: 2 = folders of the job's own location written as placeholders.
DIGESTS_FORMAT = 2

# Keys added to the config after results were stored, each with the value that reproduces what jobs did before the
# key existed. A key changes its top-level entry's digest, so without this every finished job of a study would
# rerun after any new option. A stored result whose digest matches once such a key (holding exactly that value)
# is left out is still this job's result. Register each new key with a behaviour-preserving default here; a key
# whose default changes behaviour must not be listed (those jobs should rerun).
NEUTRAL_ADDITIONS: dict[str, Any] = {}


def _job_locations(cfg: DictConfig) -> list[tuple[str, str]]:
    """(resolved folder, placeholder) for the job's ``paths.*`` folders, longest first (the output folder sits
    inside the root)."""
    from omegaconf.errors import OmegaConfBaseException

    locations = []
    for name in ("output_dir", "log_dir", "cache_dir", "data_dir", "root_dir"):
        try:
            value = cfg.paths.get(name) if "paths" in cfg else None
        except OmegaConfBaseException:  # ${hydra:...} outside a running Hydra job
            continue
        if value:
            locations.append((str(value), f"<paths.{name}>"))
    return sorted(locations, key=lambda pair: -len(pair[0]))


def _without_locations(value: Any, locations: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for folder, placeholder in locations:
            value = value.replace(folder, placeholder)
        return value
    if isinstance(value, dict):
        return {k: _without_locations(v, locations) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_locations(v, locations) for v in value]
    return value


def without_neutral_additions(key: str, value: Any, additions: dict[str, Any]) -> Any:
    """``value`` (top-level entry ``key``, resolved) less the nested keys of ``additions`` that hold their neutral
    value."""
    for dotted, neutral in additions.items():
        top, _, rest = dotted.partition(".")
        if top != key or not rest or not isinstance(value, dict):
            continue
        *parents, leaf = rest.split(".")
        node = value
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
            node.pop(leaf)
    return value


def config_digests(cfg: DictConfig, location_free: bool = True,
                   neutral_additions: dict[str, Any] | None = None) -> dict[str, str]:
    """A short hash of each top-level entry of the resolved job config that its result depends on. Stored in
    ``results.json``: a relaunch with the same overrides but an edited experiment file (another rate in a YAML,
    a new variant) is then told apart from the job that made the result, and each differing entry is named.

    The job's own folders (``paths.*``: the checkpoint callback's ``dirpath`` is inside the output folder) are
    hashed as placeholders, so the same sweep relaunched from another checkout or machine (a frozen worktree, a
    cluster's scratch) is the same config. ``location_free=False`` gives the digests of results written before
    (``config_digests_format`` absent), which hashed the folders as they were. ``neutral_additions`` (dotted key
    -> value) leaves those keys out where they hold that value: the digests of the config before they existed."""

    from omegaconf.errors import OmegaConfBaseException

    locations = _job_locations(cfg) if location_free else []
    digests = {}
    for key in cfg:
        if key in VOLATILE_KEYS:
            continue
        node = cfg._get_node(key)
        try:
            value = OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        except OmegaConfBaseException:  # an interpolation only a running Hydra job resolves: its text is its identity
            value = str(node)
        if key == "trainer" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in VOLATILE_TRAINER_KEYS}
        if neutral_additions:
            value = without_neutral_additions(str(key), value, neutral_additions)
        digests[str(key)] = json_digest(_without_locations(value, locations), 12)
    return digests


def location_bound_entries(cfg: DictConfig) -> set[str]:
    """Top-level entries whose resolved value names one of the job's folders: what a digest of the old format
    cannot compare across locations (a result written elsewhere hashed that folder)."""
    as_written, location_free = config_digests(cfg, location_free=False), config_digests(cfg)
    return {key for key, digest in as_written.items() if digest != location_free.get(key)}


def complete_payload(path: Path) -> dict | None:
    """The results file at ``path`` when it reads and says the job completed; ``None`` when it is missing, torn or
    from a job that failed or was stopped."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) and payload.get("status") == "complete" else None


def previous_result(output_dir: Path, overrides: list[str]) -> dict | None:
    """The finished result a rerun of this job's folder set aside (``results.previous.json``) when it was made with
    the same overrides (its config has since changed); ``None`` when there is none."""
    payload = complete_payload(output_dir / PREVIOUS_RESULTS_FILE)
    if payload is None or list(payload.get("overrides", [])) != list(overrides):
        return None
    return payload


def _override_entry(override: str) -> str:
    """The top-level config entry an override writes: ``student.rope=false`` and ``student=...`` -> ``student``;
    ``+experiment=...`` -> ``experiment`` (a group that may write any entry: callers treat it as such)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split(".", 1)[0].split("@", 1)[0]


def differing_config_entries(payload: dict, cfg: DictConfig) -> tuple[list[str], list[str], set[str]]:
    """The top-level entries whose digest differs between a stored result and this job's config: without and with
    the registered neutral additions, and the entries that cannot be compared (a result of the old digest format
    hashed the folders where it ran into the entries that name them)."""
    stored = payload.get("config_digests") or {}
    location_free = payload.get("config_digests_format") == DIGESTS_FORMAT
    unknown = set() if location_free else location_bound_entries(cfg)

    def differing(additions: dict[str, Any] | None) -> list[str]:
        digests = config_digests(cfg, location_free=location_free, neutral_additions=additions)
        return sorted(k for k in set(stored) | set(digests) if k not in unknown and stored.get(k) != digests.get(k))

    plain = differing(None)
    return plain, (differing(NEUTRAL_ADDITIONS) if plain and NEUTRAL_ADDITIONS else plain), unknown


def same_config_spelled_differently(payload: dict, overrides: list[str], cfg: DictConfig | None) -> bool:
    """Whether a result made with other overrides was made with exactly this job's config: a relaunch that pins a
    value equal to its default (``student.rope=false`` before the default flips), or writes a list in another
    order, is the same job. Its digests must match on every entry (a key added since at its neutral value
    included, as for the same overrides); a result of the old digest format, whose folder-naming entries cannot be
    compared, qualifies only when no override that differs writes one of those entries. No digests: rerun."""
    if cfg is None or not payload.get("config_digests"):
        return False
    plain, with_neutral, unknown = differing_config_entries(payload, cfg)
    if plain and with_neutral:
        return False
    if not unknown:  # every entry was compared
        return True
    changed = set(overrides) ^ set(map(str, payload.get("overrides", [])))
    written = {_override_entry(o) for o in changed}
    return not written & (unknown | {"experiment"})  # an experiment file may write an uncompared entry


def adopt_overrides(path: Path, payload: dict, overrides: list[str]) -> dict:
    """Rewrite a reused result under this launch's overrides (reports group jobs by them), keeping the spelling
    it was made with in ``overrides_as_run``. Atomic, like every results.json write."""
    adopted = {**payload, "overrides": list(overrides),
               "overrides_as_run": payload.get("overrides_as_run", payload.get("overrides", []))}
    if is_global_zero():
        atomic_write_json(path, adopted)
    return adopted


def completed_result(output_dir: Path, overrides: list[str], cfg: DictConfig | None = None,
                     resume: str = "auto") -> dict | None:
    """The stored result of this job when its folder holds a complete ``results.json`` for the same overrides
    (a relaunched sweep reuses ``hydra.sweep.dir``) and, with ``resume=auto``, the same config (``cfg``'s
    :func:`config_digests`); ``None`` otherwise. ``resume=overrides`` keeps a result whose config differs (saying
    which entries do). Results written before digests were stored are kept; results whose digests hashed the
    folders (no ``config_digests_format``) are compared on every entry that names no folder. A result made with
    other overrides that spell the identical config is kept too, and takes this launch's overrides
    (:func:`same_config_spelled_differently`)."""
    path = output_dir / RESULTS_FILE
    payload = complete_payload(path)
    if payload is None:
        return None
    if list(payload.get("overrides", [])) != list(overrides):
        if resume == "never" or not same_config_spelled_differently(payload, overrides, cfg):
            return None
        log.info("kept %s: made with the overrides %s, which give the same config as %s", path,
                 " ".join(payload.get("overrides", [])) or "(none)", " ".join(overrides) or "(none)")
        return adopt_overrides(path, payload, overrides)
    if cfg is None or payload.get("config_digests") is None:
        return payload
    differing, with_neutral, _ = differing_config_entries(payload, cfg)
    if differing and not with_neutral:
        log.info("kept %s: its config differs only by keys added since, at their neutral values (%s)", path,
                 ", ".join(sorted(NEUTRAL_ADDITIONS)))
        return payload
    if not differing:
        return payload
    if resume == "overrides":
        log.warning("kept %s (resume=overrides) although the config's %s differ from the job that made it",
                    path, ", ".join(differing))
        return payload
    log.warning("rerun: %s holds a result for these overrides made with another config (%s differ); "
                "resume=overrides keeps such results", path, ", ".join(differing))
    return None


def run_task(cfg: DictConfig) -> dict[str, Any]:
    """Seed, save the config tree, run ``cfg.task`` and write ``results.json``. Returns the task's result."""
    import hydra
    import pytorch_lightning as pl

    from opdf_exp.runner.checks import check_job_config
    from opdf_exp.runner.trainer import check_trainer_config

    # The frozen teacher is in eval mode on purpose; Lightning's generic warning about it is noise here.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / RESULTS_FILE
    overrides = job_overrides()
    resume = str(cfg.get("resume", "auto"))
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume={resume!r} is unknown; use resume=auto (skip jobs finished with the same "
                          "overrides and config, resume stages from last.ckpt), resume=overrides (skip on the same "
                          "overrides even if the config changed) or resume=never")
    digests = config_digests(cfg)
    if resume != "never" and (done := completed_result(output_dir, overrides, cfg, resume)) is not None:
        log.info("skipped: %s already holds a complete %s for these overrides", output_dir, RESULTS_FILE)
        return {**done, "skipped": True}
    # Checked here as well as on the submitting machine: a SLURM job is where its GPUs are known, and a job
    # composed elsewhere (a relaunch, a sweep) is checked before its first stage.
    check_trainer_config(cfg.trainer)
    check_job_config(cfg)
    if is_global_zero():
        if complete_payload(results_path) is not None:
            # A finished result this job does not reuse (other overrides or config, or resume=never) is set aside,
            # not deleted: a rerun stopped part-way (or started by mistake) must not cost a finished result, and a
            # multi-variant task of the same overrides reuses the rows of variants whose own config is unchanged
            # (runner/distill_task.py). Nobody reads it as this job's result; it goes when this job's result is
            # written.
            os.replace(results_path, output_dir / PREVIOUS_RESULTS_FILE)
            log.info("the earlier result of %s is kept as %s until this job finishes", output_dir,
                     PREVIOUS_RESULTS_FILE)
        for stale in (results_path, output_dir / ERROR_FILE):
            if stale.exists():
                stale.unlink()  # a re-used folder must never show a stale result or error for this job
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    if cfg.get("print_config", True) and is_global_zero():
        print_config_tree(cfg, output_dir / CONFIG_TREE_FILE)
    started = time.perf_counter()
    task = hydra.utils.instantiate(cfg.task, _partial_=True)
    result = dict(task(cfg))
    wall = time.perf_counter() - started
    payload = {
        "status": "complete",
        "task_name": cfg.task_name,
        "overrides": overrides,
        "seed": int(cfg.seed),
        "metrics": result.get("metrics", {}),
        "params": result.get("params", {}),
        "wall_time_s": round(wall, 2),
        "world_size": world_size(),
        "output_dir": str(output_dir),
        "config_digests": digests,
        "config_digests_format": DIGESTS_FORMAT,
    }
    payload.update({k: v for k, v in result.items() if k not in payload and k != "tables"})
    if is_global_zero():
        atomic_write_json(results_path, payload)
        (output_dir / PREVIOUS_RESULTS_FILE).unlink(missing_ok=True)
        for name, table in result.get("tables", {}).items():
            print(f"\n{name}\n{table}\n")
        log.info("results written to %s (%.1f s)", results_path, wall)
    return result


def write_error(output_dir: Path, error: BaseException) -> Path:
    """``error.txt``: the one-line error first (what the report shows), then the traceback."""
    first = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, UserError):
        first = f"{type(error).__name__}: {first}"
    text = first + "\n\n" + "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return atomic_write_text(output_dir / ERROR_FILE, text)


def _check_optimized_metric(cfg: DictConfig, result: dict) -> float | None:
    """The value a sweeper optimises. An Optuna search on a metric that was never logged fails with the list of
    metrics that were."""
    metric = cfg.get("optimized_metric")
    if not metric:
        return None
    metrics = result.get("metrics", {})
    value = metrics.get(metric)
    if value is None and _sweeper_optimises():
        known = ", ".join(sorted(k for k in metrics if "/loss/" not in k)[:12])
        raise ConfigError(f"optimized_metric={metric!r} was never logged by this job; pick one of: {known}")
    return float(value) if value is not None else None


def _sweeper_optimises() -> bool:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    target = str(HydraConfig.get().sweeper.get("_target_", ""))
    return "optuna" in target.lower()


def user_error_cause(error: BaseException) -> BaseException:
    """The one-line :class:`UserError` behind ``error``, if any: a model builder's error (an offline hub, a bad
    argument) reaches the job wrapped by Hydra's ``InstantiationException``, whose multi-line text would bury it."""
    seen, current = 0, error
    while current is not None and seen < 8:
        if isinstance(current, UserError):
            return current
        current, seen = current.__cause__ or current.__context__, seen + 1
    return error


def run_job(cfg: DictConfig) -> float | None:
    """Hydra task function. Returns ``cfg.optimized_metric`` (for sweepers such as Optuna) when present."""
    from opdf_exp.runner import preemption, progress

    preemption.install()  # the scheduler's warning signal saves the running stage before the job is requeued
    output_dir = Path(cfg.paths.output_dir)
    multirun = is_multirun()
    if multirun and is_global_zero():
        progress.job_started(output_dir)
    try:
        result = run_task(cfg)
        value = _check_optimized_metric(cfg, result)
    except Exception as raised:
        error = user_error_cause(raised)
        if is_global_zero():
            output_dir.mkdir(parents=True, exist_ok=True)
            write_error(output_dir, error)
        if multirun:
            log.error("job failed (%s): %s", output_dir / ERROR_FILE, " ".join(str(error).split()))
            if is_global_zero():
                progress.job_ended(output_dir, None)
            return None  # the sweep goes on; the report lists this job as failed
        if isinstance(error, UserError):
            sys.stdout.flush()  # the config tree and progress output come first, the error on a line of its own
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        _finish_wandb()
    if multirun and is_global_zero():
        progress.job_ended(output_dir, result, cfg.get("optimized_metric"))
    return value


def _finish_wandb() -> None:
    """Close any open W&B run so the next multirun job starts its own (wandb#1314, lightning#5212)."""
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
