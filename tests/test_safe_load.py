"""Checkpoints load with weights_only=True: a file that needs pickle is refused with one line naming the opt-in."""
from __future__ import annotations

import collections

import pytest
import torch

from opdf_exp.errors import UserError
from opdf_exp.runner.trainer import AtomicCheckpointIO, RestoreRNGState, safe_load


class _Payload:  # an arbitrary class: unpickling it would run code from the file's author
    pass


def test_plain_tensors_load_and_pickled_objects_are_refused(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": collections.OrderedDict(w=torch.ones(2)), "epoch": 1, "rng": RestoreRNGState().state_dict()},
               good)
    assert safe_load(good)["epoch"] == 1  # our own checkpoints, RNG states included, are weights-only loadable
    bad = tmp_path / "bad.ckpt"
    torch.save({"payload": _Payload()}, bad)
    with pytest.raises(UserError, match="allow_unsafe_checkpoints=true") as info:
        safe_load(bad)
    assert "\n" not in str(info.value)
    assert isinstance(safe_load(bad, allow_pickle=True)["payload"], _Payload)  # explicit opt-in
    assert isinstance(AtomicCheckpointIO(allow_pickle=True).load_checkpoint(bad)["payload"], _Payload)
    with pytest.raises(UserError):
        AtomicCheckpointIO().load_checkpoint(bad)
    with pytest.raises(UserError, match="does not exist"):
        safe_load(tmp_path / "missing.ckpt")
