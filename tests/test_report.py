"""The report against hand-computed statistics: means, sample std, 95% t intervals, paired differences over
shared seeds, failed and unfinished jobs, several experiments, plots, W&B offline, and bad input."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from opdf_exp.errors import UserError
from opdf_exp.runner.report import describe, render_markdown, report
from opdf_exp.utils.io import atomic_write_json, atomic_write_text


def _job(sweep, num, overrides, seed, teacher_acc, kd_acc, opdf_acc=None, task="quickstart"):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    variants = [{"name": "kd", "label": "KD", "metrics": {"kd/test/acc": kd_acc, "kd/val/loss": 1.0},
                 "params": {"train": 3, "inference": 5}}]
    if opdf_acc is not None:
        variants.append({"name": "kd_opdf", "label": "KD + OPDF", "metrics": {"kd_opdf/test/acc": opdf_acc},
                         "params": {"train": 9, "inference": 5}})
    atomic_write_json(job / "results.json", {
        "status": "complete", "task_name": task, "overrides": overrides, "seed": seed, "metrics": {},
        "teacher": {"metrics": {"teacher/test/acc": teacher_acc, "teacher/val/loss": 9.0},
                    "params": {"train": 10, "inference": 20}},
        "variants": variants})
    return job


def test_means_std_ci_per_setting_and_model(tmp_path):
    _job(tmp_path, 0, ["seed=1", "distill=kd", "logger=none"], 1, 0.90, 0.80)
    _job(tmp_path, 1, ["seed=2", "distill=kd", "logger=none"], 2, 0.94, 0.84)
    _job(tmp_path, 2, ["seed=3", "distill=kd", "logger=none"], 3, 0.92, 0.86)
    _job(tmp_path, 3, ["seed=1", "distill=kd_hidden", "logger=none"], 1, 0.90, 0.70)
    failed = tmp_path / "4"
    (failed / ".hydra").mkdir(parents=True)
    atomic_write_text(failed / "error.txt", "ConfigError: bad thing\n\nTraceback ...")
    (tmp_path / "5" / ".hydra").mkdir(parents=True)  # started, never finished (killed)
    summary = report([tmp_path])
    assert summary["jobs"] == 6 and summary["complete"] == 4
    assert [f["error"] for f in summary["failed"]] == ["ConfigError: bad thing"]
    assert [u["folder"] for u in summary["unfinished"]] == [str(tmp_path / "5")]
    exp = summary["experiments"][0]
    assert exp["common_overrides"] == ["logger=none"] and exp["metric"] == "test/acc"
    rows = {(r["setting"], r["model"]): r for r in exp["rows"]}
    kd = rows[("distill=kd", "KD")]
    # hand values: mean(0.80, 0.84, 0.86) = 0.8333; sample std = sqrt(((-.0333)^2 + .0067^2 + .0267^2) / 2) = 0.0306
    assert kd["test/acc"] == "0.8333 ± 0.0306" and kd["n"] == 3 and kd["train params"] == 3
    half = 4.302652729911275 * 0.030550504633038926 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert kd["test/acc 95% CI"] == f"[{0.8333333333 - half:.4f}, {0.8333333333 + half:.4f}]"
    assert rows[("distill=kd", "teacher")]["test/acc"] == "0.9200 ± 0.0200"
    assert rows[("distill=kd_hidden", "KD")]["test/acc"] == "0.7000" and rows[("distill=kd_hidden", "KD")]["n"] == 1
    assert "val/loss" not in kd  # losses are left out
    md = (tmp_path / "summary.md").read_text()
    assert "| setting | model | n |" in md and "ConfigError: bad thing" in md and "unfinished" in md
    assert json.loads((tmp_path / "summary.json").read_text())["experiments"][0]["rows"] == exp["rows"]
    assert (tmp_path / "summary.csv").read_text().startswith("experiment,setting,model,n,")


def test_paired_differences_across_models_and_settings(tmp_path):
    # same seeds under decomposition=none and =mpo; KD and KD + OPDF variants inside each job
    accs = {("none", 1): (0.80, 0.82), ("none", 2): (0.84, 0.85), ("none", 3): (0.86, 0.90),
            ("mpo", 1): (0.81, 0.83), ("mpo", 2): (0.86, 0.86), ("mpo", 3): (0.86, 0.91)}
    for i, ((dec, seed), (kd, opdf)) in enumerate(accs.items()):
        _job(tmp_path, i, [f"decomposition={dec}", f"seed={seed}"], seed, 0.9, kd, opdf)
    paired = {(p["setting"], p["comparison"]): p for p in report([tmp_path])["experiments"][0]["paired"]}
    within = paired[("decomposition=none", "KD + OPDF − KD")]
    assert within["n"] == 3 and within["mean"] == pytest.approx((0.02 + 0.01 + 0.04) / 3)
    assert within["std"] == pytest.approx(describe([0.02, 0.01, 0.04])["std"])
    across = paired[("(all jobs)", "KD: decomposition=mpo − decomposition=none")]  # none is the baseline value
    assert across["mean"] == pytest.approx((0.01 + 0.02 + 0.0) / 3) and across["seeds"] == [1, 2, 3]


def test_by_key_groups_from_the_saved_config_and_plots_numeric_keys(tmp_path):
    for i, (n, seed, acc) in enumerate([(2, 1, 0.7), (2, 2, 0.72), (3, 1, 0.75), (3, 2, 0.77)]):
        job = _job(tmp_path / "sweep", i, [f"decomposition.n={n}", f"seed={seed}"], seed, 0.9, acc)
        atomic_write_text(job / ".hydra" / "config.yaml", f"task_name: quickstart\nseed: {seed}\ndecomposition:\n  n: {n}\n")
    summary = report([tmp_path / "sweep"], metrics=["test/acc"], by=["decomposition.n"], out_dir=tmp_path / "out")
    rows = {(r["setting"], r["model"]): r["test/acc"] for r in summary["experiments"][0]["rows"]}
    assert rows[("decomposition.n=2", "KD")] == "0.7100 ± 0.0141" and rows[("decomposition.n=3", "KD")] == "0.7600 ± 0.0141"
    plots = summary["experiments"][0]["plots"]
    assert len(plots) == 1 and plots[0].endswith("_vs_decomposition.n.png")
    assert (tmp_path / "out" / plots[0].split("/")[-1]).read_bytes()[:4] == b"\x89PNG"


def test_jobs_of_two_experiments_get_separate_sections(tmp_path):
    _job(tmp_path / "a", 0, ["seed=1"], 1, 0.9, 0.8, task="quickstart")
    _job(tmp_path / "b", 0, ["seed=1"], 1, 0.9, 0.8, task="bert_glue")
    summary = report([tmp_path / "a", tmp_path / "b"], out_dir=tmp_path)
    assert sorted(e["experiment"] for e in summary["experiments"]) == ["bert_glue", "quickstart"]
    assert "Jobs from 2 experiments" in summary["markdown"]


def test_no_results_is_one_line_with_counts(tmp_path):
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "1" / ".hydra").mkdir(parents=True)
    atomic_write_text(tmp_path / "1" / "error.txt", "boom")
    with pytest.raises(UserError, match="found 2 job folder\\(s\\), 1 failed"):
        report([tmp_path])
    cli = subprocess.run([sys.executable, "-m", "opdf_exp.report", str(tmp_path)], capture_output=True, text=True)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "1 failed" in cli.stderr


def test_report_logs_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _job(tmp_path, 0, ["seed=1"], 1, 0.9, 0.8)
    _job(tmp_path, 1, ["seed=2"], 2, 0.9, 0.82)
    cli = subprocess.run([sys.executable, "-m", "opdf_exp.report", str(tmp_path), "--wandb"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    from tests.helpers.wandb_record import read_offline_record

    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    record = read_offline_record(tmp_path, (b"report", b"quickstart/summary"))
    assert b"report" in record and b"quickstart/summary" in record


def test_glue_rows_of_one_method_and_decomposition_keep_their_variant_labels(tmp_path):
    """The GLUE study's OPDF rows share method and decomposition (kd, mpo): each keeps its own row, named by its
    label, and is paired against KD alone by seed (before, the first one stood for all of them)."""
    sweep = tmp_path / "mrpc"
    scores = {1: (0.70, 0.65, 0.74), 2: (0.72, 0.65, 0.75)}  # acc of KD, OPDF (same rate), OPDF (auto)
    shares = {1: (0.6, 1.0, 0.7), 2: (0.62, 0.995, None)}  # test/majority_share (None: a result without it)
    for num, (seed, (kd, same, auto)) in enumerate(scores.items()):
        job = sweep / str(num)
        (job / ".hydra").mkdir(parents=True)
        variants = [{"name": name, "label": label, "method": "kd", "decomposition": kind,
                     "metrics": {f"{name}/test/acc": acc, f"{name}/test/f1": acc,
                                 **({f"{name}/test/majority_share": share} if share is not None else {})},
                     "params": {"train": 1, "inference": 1}}
                    for name, label, kind, acc, share in (
                        ("kd", "KD", "none", kd, shares[seed][0]), ("kd_opdf", "KD + OPDF", "mpo", same, shares[seed][1]),
                        ("kd_opdf_auto", "KD + OPDF, auto", "mpo", auto, shares[seed][2]))]
        atomic_write_text(job / ".hydra" / "config.yaml", (
            "task_name: glue_cpu\ntask:\n  variants:\n    no_kd: null\n    kd: {label: KD, overrides: [distill=kd]}\n"
            "    kd_opdf: {label: KD + OPDF, overrides: [distill=kd, decomposition=mpo]}\n"
            "    kd_opdf_auto: {label: 'KD + OPDF, auto', overrides: [distill=kd, decomposition=mpo, "
            "decomposition.lr_scale=auto]}\n"))
        atomic_write_json(job / "results.json", {
            "status": "complete", "task_name": "glue_cpu", "overrides": ["data=glue/mrpc", f"seed={seed}"],
            "seed": seed, "metrics": {}, "variants": variants,
            "teacher": {"metrics": {"teacher/test/acc": 0.8, "teacher/test/f1": 0.8}, "params": {},
                        "warnings": ["the teacher's validation loss 0.6931 is no lower than a constant's"]}})
    glue = report([sweep], plots=False)["experiments"][0]["glue"]["tasks"]["mrpc"]
    rows = {r["model"]: r for r in glue["rows"]}
    assert set(rows) == {"teacher", "kd alone", "KD + OPDF", "KD + OPDF, auto"}
    assert rows["KD + OPDF, auto"]["score"] == "74.50 ± 0.71"  # MRPC's score: the mean of F1 and accuracy
    # seeds whose predictions collapsed to one class (>= 99 %), of the seeds that logged the share
    assert [rows[m]["one-class seeds"] for m in ("kd alone", "KD + OPDF", "KD + OPDF, auto", "teacher")] == \
        ["0/2", "2/2", "0/1", None]
    paired = {p["comparison"]: p for p in glue["paired"]}
    # each variant also against its nearest control (the one setting it adds: here the step size alone); KD + OPDF's
    # nearest control is KD alone, already paired
    nearest = "KD + OPDF, auto − KD + OPDF (nearest control)"
    assert set(paired) == {"KD + OPDF − kd alone", "KD + OPDF, auto − kd alone", nearest}
    assert paired["KD + OPDF, auto − kd alone"]["mean diff"] == "+3.50"
    assert paired["KD + OPDF − kd alone"]["better in"] == "0/2"
    assert paired[nearest]["mean diff"] == "+9.50" and paired[nearest]["better in"] == "2/2"
    # the teacher beside the published dev scores of the models KD papers start from
    # a teacher warning the jobs logged is listed once under its task's table (both seeds share the teacher)
    assert glue["teacher_warnings"] == ["the teacher's validation loss 0.6931 is no lower than a constant's"]
    summary = report([sweep], plots=False)
    assert render_markdown(summary).count("**Teacher warning:** the teacher's validation loss 0.6931") == 1
    published = {r["model"]: r["mrpc"] for r in summary["experiments"][0]["glue"]["published"]}
    assert published["teacher (this sweep, report half)"] == "80.00"
    assert published["BERT-base (12 layers), published (full dev)"] == "88.6"


def test_nearest_control_is_the_largest_strict_subset_of_overrides():
    from opdf_exp.runner.report import nearest_controls

    sets = {"KD": {"distill=kd"}, "OPDF": {"distill=kd", "decomposition=mpo"},
            "OPDF auto": {"distill=kd", "decomposition=mpo", "lr_scale=auto"},
            "OPDF auto align": {"distill=kd", "decomposition=mpo", "lr_scale=auto", "align=0.1", "map=preceding"},
            "OPDF public": {"distill=kd", "decomposition=mpo", "align=0"},
            "two ways": {"distill=kd", "decomposition=mpo", "lr_scale=auto", "align=0"}}  # auto or public: none
    controls = nearest_controls({k: frozenset(v) for k, v in sets.items()})
    assert controls == {"OPDF": "KD", "OPDF auto": "OPDF", "OPDF auto align": "OPDF auto", "OPDF public": "OPDF"}
