"""Which process am I? Rank helpers that work before, during and after a Lightning distributed fit.

Why: with ``strategy=ddp`` every rank runs the whole job script (Lightning re-launches the command), and with
``ddp_spawn`` the parent is rank zero again after each fit. Results, tables, saved students, caches and sweep
summaries must be written by exactly one process, so every writer asks :func:`is_global_zero` first.
"""
from __future__ import annotations

import os


def global_rank() -> int:
    """The process's global rank: the initialised process group's, else the launcher's environment, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    for key in ("RANK", "GLOBAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    # srun starts every rank of a multi-task SLURM job itself (Lightning's SLURM environment reads the same).
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"])
    # Lightning's subprocess launcher sets LOCAL_RANK (and NODE_RANK) for the ranks it starts.
    local, node = os.environ.get("LOCAL_RANK", ""), os.environ.get("NODE_RANK", "0")
    if local.isdigit():
        devices = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        return int(node if node.isdigit() else 0) * devices + int(local)
    return 0


def is_global_zero() -> bool:
    return global_rank() == 0


def world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return int(os.environ.get("WORLD_SIZE", "1") or 1)
