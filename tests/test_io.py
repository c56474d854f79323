"""Atomic writes: a failed write leaves the previous file intact and no temporary behind."""
from __future__ import annotations

import json
import os
import stat

import pytest

from opdf_exp.utils.io import atomic_write, atomic_write_json


def test_atomic_json_roundtrip_and_permissions(tmp_path):
    import numpy as np

    path = atomic_write_json(tmp_path / "sub" / "results.json", {"acc": np.float32(0.5), "path": tmp_path})
    assert json.loads(path.read_text()) == {"acc": 0.5, "path": str(tmp_path)}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "results.json", {"ok": 1})

    def explode(handle):
        handle.write('{"half": ')
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, explode)
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
