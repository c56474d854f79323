"""Reuse of a subquadratic job's early stages by later jobs that share them (``task.stages.reuse: true``).

Why: a study of stage-3 objectives, learning rates or adapters repeats stages 1 and 2 (attention transfer and
hidden alignment: half of a CPU job's time) identically in every arm. With reuse on, the student after each stage
but the last is stored under ``<paths.cache_dir>/stages/<key>/``; a later job whose key matches starts from the
longest stored prefix and skips those stages.

The key is everything the student after stage k depends on: the package's source code, the teacher's weights,
the token blocks, the student and data config, the seed, the conversion and calibration settings, the trainer
settings, the torch thread count (it changes round-off), and the config of stages 1..k. It is hashed into the
folder name, so an entry can never be read by a job it does not match; a code change or a different teacher
simply misses.

A reused prefix is exact, not approximate: the entry holds the student's weights (safetensors, nothing
unpickled), its architecture (``attention_layers``, which ``auto:K`` may have changed), the stages' reports, the
recovery-curve points, the hybrid chooser's picks, the output files written so far (stage-1 curve, layer
fidelity), and the torch / numpy / random generator states at the end of the stage, so the rest of the job runs
as if it had computed the prefix itself. Entries are written to a temporary folder and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from opdf_exp.utils.io import atomic_folder, json_digest

log = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
OUTPUT_FILE_SUFFIXES = (".md", ".png", ".json", ".csv")


def source_digest(root: Path = PACKAGE_ROOT) -> str:
    """A hash of every ``.py`` file of the package: entries made by other code never match."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """torch (CPU), numpy and Python generator states as JSON-able values."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class StagePrefix:
    """What a stored prefix restores: the last stage it covers and the job state after it."""

    index: int                 # position of the last stage covered in the stage order
    stage: str
    state_dict: dict[str, torch.Tensor]
    attention_layers: list[int]
    report: dict[str, Any]     # the covered stages' reports
    recovery: list[dict]
    shared: dict[str, Any]     # e.g. the hybrid chooser's picks
    rng: dict[str, Any]        # generator states at the end of the stage (rng_state)
    files: Path                # the output files written up to that stage


class StageReuse:
    """Stores and finds stage prefixes of one job. ``base_key`` holds what every stage depends on; ``stage_cfgs``
    the stages' configs in order (a prefix's key adds the configs of the stages it covers)."""

    def __init__(self, root: str | Path, base_key: dict[str, Any], stage_cfgs: dict[str, Any]):
        self.root = Path(root).expanduser()
        self.base_key = {"code": source_digest(), "threads": torch.get_num_threads(), **base_key}
        self.stage_names = list(stage_cfgs)
        self.stage_cfgs = stage_cfgs

    def key(self, index: int) -> str:
        covered = {name: self.stage_cfgs[name] for name in self.stage_names[: index + 1]}
        return json_digest({**self.base_key, "stages": covered}, 20)

    def folder(self, index: int) -> Path:
        return self.root / f"{self.stage_names[index]}-{self.key(index)}"

    def find(self, last_index: int) -> StagePrefix | None:
        """The longest stored prefix that ends before ``last_index`` (the last stage always runs)."""
        from safetensors.torch import load_file

        for index in reversed(range(last_index)):
            folder = self.folder(index)
            if (folder / "meta.json").exists():
                meta = json.loads((folder / "meta.json").read_text())
                log.info("stages %s reused from %s", ", ".join(self.stage_names[: index + 1]), folder)
                return StagePrefix(index, self.stage_names[index], load_file(str(folder / "student.safetensors")),
                                   meta["attention_layers"], meta["report"], meta["recovery"], meta["shared"],
                                   meta["rng"], folder / "files")
        log.info("no stored stage prefix matches this job in %s; stages run and are stored", self.root)
        return None

    def save(self, index: int, student: torch.nn.Module, report: dict, recovery: list, shared: dict,
             output_dir: Path | None) -> Path:
        """Store the job's state after stage ``index`` (atomically: a temporary folder renamed into place)."""
        folder = self.folder(index)
        if (folder / "meta.json").exists():
            return folder
        with atomic_folder(folder, replace=False) as partial:  # another job storing the same prefix: theirs stands
            self._fill(partial, index, student, report, recovery, shared, output_dir)
        log.info("stages up to %s stored in %s", self.stage_names[index], folder)
        return folder

    def _fill(self, partial: Path, index: int, student: torch.nn.Module, report: dict, recovery: list,
              shared: dict, output_dir: Path | None) -> None:
        from safetensors.torch import save_file

        (partial / "files").mkdir()
        # shared storage (tied embeddings) is cloned: safetensors refuses tensors that alias one another
        save_file({k: v.detach().contiguous().clone() for k, v in student.state_dict().items()},
                  str(partial / "student.safetensors"))
        if output_dir is not None and output_dir.is_dir():
            for path in output_dir.iterdir():
                if path.is_file() and path.suffix in OUTPUT_FILE_SUFFIXES and path.name != "results.json":
                    shutil.copy2(path, partial / "files" / path.name)
        meta = {"stage": self.stage_names[index], "key": {**self.base_key, "stages": self.stage_names[: index + 1]},
                "attention_layers": list(student.config.attention_layers or []), "report": report,
                "recovery": recovery, "shared": shared, "rng": rng_state()}
        (partial / "meta.json").write_text(json.dumps(meta, default=str))

    def restore(self, prefix: StagePrefix, student: torch.nn.Module, rebuild: Callable[[list[int]], torch.nn.Module],
                output_dir: Path | None) -> torch.nn.Module:
        """The student of ``prefix`` (rebuilt when its kept-attention layers differ), its output files copied
        into ``output_dir`` and the generators set to their state after the prefix."""
        if list(student.config.attention_layers or []) != prefix.attention_layers:
            student = rebuild(prefix.attention_layers)
        student.load_state_dict(prefix.state_dict)
        if output_dir is not None and prefix.files.is_dir():
            output_dir.mkdir(parents=True, exist_ok=True)
            for path in prefix.files.iterdir():
                shutil.copy2(path, output_dir / path.name)
        set_rng_state(prefix.rng)
        return student
