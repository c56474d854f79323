"""Atomic files and folders (a failed write leaves the old state and no temporary), and the canonical digest."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

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


def test_json_digest_is_canonical_and_truncated():
    from opdf_exp.utils.io import json_digest

    first = {"b": [1, 2], "a": {"y": 1.5, "x": None}, "path": Path("/tmp/x")}
    second = {"path": Path("/tmp/x"), "a": {"x": None, "y": 1.5}, "b": [1, 2]}  # same content, other key order
    assert json_digest(first) == json_digest(second) and len(json_digest(first)) == 16
    assert len(json_digest(first, 12)) == 12 and json_digest(first).startswith(json_digest(first, 12))
    assert json_digest({**first, "b": [2, 1]}) != json_digest(first)  # list order is content
    expected = hashlib.sha256(json.dumps(first, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert json_digest(first) == expected  # the keys of caches written before json_digest existed still match


def test_atomic_folder_is_whole_or_absent_and_first_complete_cache_stands(tmp_path):
    from opdf_exp.utils.io import atomic_folder

    target = tmp_path / "cache" / "model"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed while writing")
    assert not target.exists() and list(target.parent.iterdir()) == []  # no half folder, no temporary left
    with atomic_folder(target) as tmp:
        (tmp / "weights").write_text("first")
    mask = os.umask(0)
    os.umask(mask)
    assert (target / "weights").read_text() == "first" and stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    with atomic_folder(target, replace=False) as tmp:  # a second job filling the same cache: the first stands
        (tmp / "weights").write_text("second")
    assert (target / "weights").read_text() == "first"
    with atomic_folder(target) as tmp:  # a result: the new one replaces the old
        (tmp / "weights").write_text("third")
    assert (target / "weights").read_text() == "third" and sorted(p.name for p in target.parent.iterdir()) == ["model"]
