"""OmegaConf resolvers used by the shipped configs. Registered once, before any config is composed."""
from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

_RUN_ID = f"{os.getpid():x}{secrets.token_hex(2)}"
# Strategies that Lightning runs as one process per device; under SLURM each process is one task (srun).
PROCESS_PER_DEVICE = ("ddp", "fsdp", "deepspeed")


def device_count(devices) -> int | None:
    """``trainer.devices`` as a count: a list of ids counts its entries; -1/"auto" is ``None`` (all visible)."""
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    text = str(devices).strip()
    if text in ("-1", "auto", "None", ""):
        return None
    if text.startswith("[") or "," in text:  # "0,1" or "[0, 1]": Lightning's string forms of an id list
        return len([d for d in text.strip("[]").split(",") if d.strip()])
    return int(text)


def slurm_gpus_per_node(accelerator, devices) -> int | None:
    """GPUs a SLURM job asks for per node: none for a CPU trainer, else the trainer's device count (1 when the
    trainer takes every visible GPU: say how many with ``hydra.launcher.gpus_per_node``)."""
    if str(accelerator) == "cpu":
        return None
    return device_count(devices) or 1


def slurm_tasks_per_node(strategy, devices, gpus_per_node) -> int:
    """Lightning under SLURM runs one process per srun task and requires tasks per node == devices for DDP and
    FSDP; any other strategy is one process per job."""
    if not str(strategy).startswith(PROCESS_PER_DEVICE) or str(strategy).startswith("ddp_spawn"):
        return 1
    count = device_count(devices)
    if count is None:  # devices=-1: every GPU the job was given
        count = int(gpus_per_node) if str(gpus_per_node) not in ("None", "") else 1
    return count


def glue_path(root, task) -> str | None:
    """``<root>/<official folder>`` of a GLUE task (``sst2`` -> ``SST-2``); ``None`` when no root is given, so
    the GLUE reader asks for ``data.path`` (or the hub) in its own one-line error."""
    if root is None or str(root) in ("", "null", "None"):
        return None
    from opdf_exp.data.glue_tasks import glue_task

    return os.path.join(str(root), glue_task(str(task)).folder)


def register() -> None:
    # ${uid:} -> a per-process id appended to run folders, so two runs started in the same second never share a
    # folder (Hydra's ${now:} alone collides; lightning-hydra-template #511, Hydra #1817).
    if not OmegaConf.has_resolver("uid"):
        OmegaConf.register_new_resolver("uid", lambda: _RUN_ID)
    # ${cwd:} -> the launch directory. Unlike ${hydra:runtime.cwd} it resolves before Hydra's runtime config
    # exists, which the multirun sweeper needs for hydra.sweep.dir (paths.log_dir is built from it).
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd, use_cache=True)
    # SLURM job shape from the trainer (conf/hydra/launcher/slurm.yaml).
    if not OmegaConf.has_resolver("slurm_gpus_per_node"):
        OmegaConf.register_new_resolver("slurm_gpus_per_node", slurm_gpus_per_node)
    if not OmegaConf.has_resolver("glue_path"):  # ${glue_path:${oc.env:GLUE_DIR,null},${data.name}}
        OmegaConf.register_new_resolver("glue_path", glue_path)
    if not OmegaConf.has_resolver("slurm_tasks_per_node"):
        OmegaConf.register_new_resolver("slurm_tasks_per_node", slurm_tasks_per_node)
