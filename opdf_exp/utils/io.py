"""Atomic file writes, and the one digest every cache key and result identity is made of.

Why: a sweep job that dies mid-write (OOM, SLURM pre-emption, Ctrl-C) must never leave a half-written
``results.json`` or checkpoint that an aggregator would then read as a finished run. We write to a temporary
file in the same folder, fsync it, and ``os.replace`` it into place (atomic on POSIX and Windows).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Call ``write(fileobj)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results should read like any file written
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextmanager
def atomic_folder(folder: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``folder`` to fill; when the block ends without error, move it into
    place in one rename. Readers see no folder or a complete one, never a half-written one.

    ``replace=True`` (results, saved students) swaps out what is there. ``replace=False`` (caches that concurrent
    jobs may fill with the same content, e.g. two test workers converting one GGUF) keeps the first complete folder
    and discards this one. An error inside the block removes the temporary folder and leaves ``folder`` untouched.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; a cache or result reads like any folder
        if folder.exists() and replace:
            shutil.rmtree(folder)
        try:
            os.replace(tmp, folder)
        except OSError:  # the folder exists (another process finished first): with replace=False, theirs stands
            if replace:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda handle: json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default))


def _json_default(value: Any) -> Any:
    """Make numpy/torch scalars and paths JSON-serialisable."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def json_digest(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``obj``'s canonical JSON (sorted keys; ``str()`` for what
    JSON cannot hold).

    Why one function: every cache key (fine-tuned teachers, logit caches, stored stages, sequence-KD text) and every
    config identity in ``results.json`` is compared across processes and sessions, so they must all canonicalise a
    config the same way; two spellings of one dict must never hash apart.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]
