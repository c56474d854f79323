"""OmegaConf resolvers used by the shipped configs. Registered once, before any config is composed."""
from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

_RUN_ID = f"{os.getpid():x}{secrets.token_hex(2)}"


def register() -> None:
    # ${uid:} -> a per-process id appended to run folders, so two runs started in the same second never share a
    # folder (Hydra's ${now:} alone collides; lightning-hydra-template #511, Hydra #1817).
    if not OmegaConf.has_resolver("uid"):
        OmegaConf.register_new_resolver("uid", lambda: _RUN_ID)
    # ${cwd:} -> the launch directory. Unlike ${hydra:runtime.cwd} it resolves before Hydra's runtime config
    # exists, which the multirun sweeper needs for hydra.sweep.dir (paths.log_dir is built from it).
    if not OmegaConf.has_resolver("cwd"):
        OmegaConf.register_new_resolver("cwd", os.getcwd, use_cache=True)
