"""Read a W&B offline run record (``run-*.wandb``), waiting for the service process to flush it.

Why wait: wandb 0.31 writes the record in its own service process; ``wandb.finish()`` can return before the last
records reach the file on a loaded machine, so a test that reads it at once may see only the header."""
from __future__ import annotations

import time
from pathlib import Path


def read_offline_record(save_dir: Path, expected: tuple[bytes, ...], timeout: float = 60.0) -> bytes:
    deadline = time.time() + timeout
    record = b""
    while time.time() < deadline:
        runs = sorted(Path(save_dir).glob("wandb/offline-run-*"))
        files = [f for run in runs for f in run.glob("run-*.wandb")]
        record = b"".join(f.read_bytes() for f in files)
        if files and all(e in record for e in expected):
            return record
        time.sleep(0.5)
    return record
