"""The GLUE grid of the OPDF paper, offline: KD methods × {none, svd, mpo} × seeds over three tasks in the official
file layouts (MRPC: a pair task with a byte-order mark; STS-B: regression; CoLA: single sentences, no header),
run through the CLI as a user would (``python -m opdf_exp -m +experiment=bert_glue ...``), then reported.

Every registered GLUE method (kd, pkd, theseus, lgtm) runs with every decomposition at least once; the STS-B
sweep has two seeds so its paired differences have a spread. Tiny models and budgets keep it near a minute."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from opdf_exp.data.glue_tasks import task_score
from opdf_exp.runner.report import report
from tests.helpers.glue_fixtures import write_glue_fixtures
from tests.test_sweeps import _env

# one worker runs the whole module, so its expensive module-scoped fixture runs once (`make test`: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("glue_grid")


GRID = ["+experiment=bert_glue", "teacher=tiny_bert", "student.model.num_layers=2", "logger=none",
        "trainer.enable_progress_bar=false", "print_config=false", "trainer.max_steps=3",
        "trainer.val_check_interval=null", "teacher.finetune.trainer.max_steps=2", "data.module.batch_size=16",
        "data.module.max_length=32", "save_student=false",
        "teacher.finetune.cache=true"]  # jobs of one seed share the teacher's fine-tune
SWEEPS = {  # task: (methods, decompositions, seeds)
    "mrpc": ("kd,pkd,theseus,lgtm", "none,mpo", "1"),
    "stsb": ("kd", "none,svd", "1,2"),
    "cola": ("pkd,theseus,lgtm", "svd", "1"),
}
FOLDERS = {"mrpc": "MRPC", "stsb": "STS-B", "cola": "CoLA"}


def _sweep(root: Path, glue: Path, task: str) -> subprocess.CompletedProcess:
    methods, decompositions, seeds = SWEEPS[task]
    args = [sys.executable, "-m", "opdf_exp", "-m", *GRID,
            f"data=glue/{task}", f"data.path={glue / FOLDERS[task]}", f"distill={methods}",
            f"decomposition={decompositions}", f"seed={seeds}", f"hydra.sweep.dir={root / task}"]
    return subprocess.run(args, cwd=root, env=_env(root), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue_grid")
    glue = root / "glue_data"
    write_glue_fixtures(glue, tasks=tuple(SWEEPS), train_rows=48, dev_rows=16)
    for task in SWEEPS:
        done = _sweep(root, glue, task)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return root


def _results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/results.json"))]


def _override(result: dict, key: str) -> str:
    return next(o.split("=", 1)[1] for o in result["overrides"] if o.split("=", 1)[0] == key)


def test_every_method_and_decomposition_ran_on_every_layout(grid):
    results = _results(grid)
    assert not list(grid.glob("*/*/error.txt"))
    assert len(results) == 8 + 4 + 3
    ran = {(_override(r, "distill"), _override(r, "decomposition")) for r in results}
    assert ran == {(m, d) for m in ("kd", "pkd", "theseus", "lgtm") for d in ("none", "svd", "mpo")}
    for r in results:
        variant = r["variants"][0]
        assert variant["method"] == _override(r, "distill") and variant["decomposition"] == _override(r, "decomposition")
        assert variant["steps"] == 3
    # the deployed student has the same size whatever trained it; Theseus trains only the student's blocks
    mrpc = {(_override(r, "distill"), _override(r, "decomposition")): r["variants"][0]["params"]
            for r in results if _override(r, "data") == "glue/mrpc"}
    assert len({p["inference"] for p in mrpc.values()}) == 1
    assert mrpc[("theseus", "none")]["train"] < mrpc[("kd", "none")]["train"]
    assert mrpc[("lgtm", "none")]["train"] > mrpc[("kd", "none")]["train"]  # the teacher trains too


def test_report_gives_a_table_per_task_a_glue_table_and_paired_differences(grid):
    summary = report([grid], plots=False)
    markdown = (grid / "summary.md").read_text()
    for task in SWEEPS:
        assert f"### GLUE {task}" in markdown
    assert "### GLUE average" in markdown
    glue = summary["experiments"][0]["glue"]
    # STS-B: kd +SVD over 2 seeds, equal to the hand-computed mean of the task scores of the jobs' results
    stsb = sorted((r for r in _results(grid) if _override(r, "data") == "glue/stsb"), key=lambda r: r["seed"])
    scores = {d: [100 * task_score("stsb", r["variants"][0]["metrics"]) for r in stsb if _override(r, "decomposition") == d]
              for d in ("none", "svd")}
    row = next(r for r in glue["tasks"]["stsb"]["rows"] if r["model"] == "kd +SVD")
    assert row["n"] == 2
    assert row["score"] == f"{statistics.fmean(scores['svd']):.2f} ± {statistics.stdev(scores['svd']):.2f}"
    paired = {p["comparison"]: p for p in glue["tasks"]["stsb"]["paired"]}
    assert set(paired) == {"kd +SVD − kd alone"}
    diffs = [b - a for a, b in zip(scores["none"], scores["svd"])]
    assert paired["kd +SVD − kd alone"]["mean diff"] == f"{statistics.fmean(diffs):+.2f}"
    assert paired["kd +SVD − kd alone"]["n seeds"] == 2
    # MRPC: +OPDF against each method alone; the GLUE table lists every task for kd (mrpc and stsb)
    assert {p["comparison"] for p in glue["tasks"]["mrpc"]["paired"]} == \
        {f"{m} +OPDF − {m} alone" for m in ("kd", "pkd", "theseus", "lgtm")}
    kd = next(r for r in glue["average"]["rows"] if r["model"] == "kd alone")
    assert kd["mrpc"] and kd["stsb"] and kd["cola"] is None and kd["GLUE avg"] is None  # not over the same tasks
    teacher = next(r for r in glue["average"]["rows"] if r["model"] == "teacher")  # ran every task at seed 1
    seed1 = {t: 100 * task_score(t, r["teacher"]["metrics"], prefix="teacher/") for r in _results(grid)
             if r["seed"] == 1 for t in [_override(r, "data").split("/")[1]]}
    assert teacher["n seeds"] == 1 and teacher["GLUE avg"] == f"{statistics.fmean(seed1.values()):.2f}"
