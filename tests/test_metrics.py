"""Evaluation metrics built by name for a task; the one-class diagnostic against hand counts."""
from __future__ import annotations

import pytest
import torch

from opdf_exp.errors import ConfigError
from opdf_exp.lit.module import MajorityShare, build_metrics


def test_majority_share_counts_the_most_predicted_class_over_batches_and_ranks():
    def rank_zero():
        share = MajorityShare(3)
        share.update(torch.tensor([0, 2, 2, 1]), torch.tensor([0, 0, 0, 0]))  # targets play no part
        share.update(torch.tensor([2, 2]), torch.tensor([1, 1]))
        return share

    assert rank_zero().compute().item() == pytest.approx(4 / 6)
    other_rank = MajorityShare(3)
    other_rank.update(torch.tensor([1, 1, 1, 1, 1, 1]), torch.tensor([0] * 6))
    merged = rank_zero()
    merged.merge_state(other_rank)  # what the DDP sum reduction does with the per-class counts
    assert merged.compute().item() == pytest.approx(7 / 12)  # class 1: 1 + 6 of 12, not the mean of 4/6 and 1
    collapsed = MajorityShare(2)
    collapsed.update(torch.ones(5, dtype=torch.long), torch.tensor([0, 1, 0, 1, 0]))
    assert collapsed.compute().item() == 1.0


def test_classification_always_logs_majority_share_and_regression_does_not():
    names = sorted(build_metrics("single_label_classification", 2, ["acc", "f1"]))
    assert names == ["acc", "f1", "majority_share"]
    assert sorted(build_metrics("single_label_classification", 2, ["majority_share", "acc"])) == ["acc",
                                                                                                 "majority_share"]
    assert sorted(build_metrics("regression", 1, ["pearson"])) == ["pearson"]
    with pytest.raises(ConfigError, match="majority_share"):  # the error lists it among the known names
        build_metrics("single_label_classification", 2, ["acc", "nope"])


def test_a_teacher_collapsed_to_one_class_is_named_in_one_warning(caplog):
    """The RTE teacher of the GLUE study's first recipe predicted one class (validation loss ln 2): its students
    distil a constant, which the job now says instead of leaving it to a reader of the teacher's accuracy."""
    import logging

    from opdf_exp.runner.distill_task import collapsed_teacher_splits, warn_if_teacher_collapsed

    healthy = {"teacher/val/acc": 0.62, "teacher/val/majority_share": 0.7, "teacher/test/majority_share": 0.98}
    collapsed = {**healthy, "teacher/val/majority_share": 1.0, "teacher/test/majority_share": 0.995}
    assert collapsed_teacher_splits(healthy) == []
    assert collapsed_teacher_splits(collapsed) == ["test", "val"]
    assert collapsed_teacher_splits({"kd/test/majority_share": 1.0}) == []  # a student's share is not the teacher's
    with caplog.at_level(logging.WARNING, logger="opdf_exp.runner.distill_task"):
        warn_if_teacher_collapsed(healthy)
        assert not caplog.records
        warn_if_teacher_collapsed(collapsed)
    (record,) = caplog.records
    assert "test and val" in record.getMessage() and "teacher.finetune.optim.lr" in record.getMessage()
    assert "\n" not in record.getMessage()
