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


def test_a_teacher_that_learned_nothing_is_named_in_one_line_each_way():
    """The RTE teacher of the GLUE study's first recipe ended at validation loss ln 2 (its logits equal, its
    argmax noise): its students distil a constant, which the job now says instead of leaving it to a reader of the
    teacher's accuracy. Two signs, each checked against hand-computed values."""
    import math

    from opdf_exp.runner.distill_task import constant_prediction_loss, teacher_warnings

    labels = [0] * 73 + [1] * 66  # RTE's selection half
    constant = -(73 / 139 * math.log(73 / 139) + 66 / 139 * math.log(66 / 139))
    assert constant_prediction_loss(labels) == pytest.approx(constant, rel=1e-12)  # 0.6919 nats
    assert constant_prediction_loss([1, 1, 1]) == 0.0
    healthy = {"teacher/val/loss": 0.55, "teacher/val/majority_share": 0.7, "teacher/test/majority_share": 0.98}
    assert teacher_warnings(healthy, labels) == []
    collapsed = {**healthy, "teacher/val/majority_share": 1.0, "teacher/test/majority_share": 0.995}
    (line,) = teacher_warnings(collapsed, labels)
    assert "one class" in line and "test and val" in line and "teacher.finetune.optim.lr" in line
    assert teacher_warnings({"kd/test/majority_share": 1.0}, labels) == []  # a student's share is not the teacher's
    at_chance = {**healthy, "teacher/val/loss": math.log(2)}  # the RTE teacher: above the 0.6919 of a constant
    (line,) = teacher_warnings(at_chance, labels)
    assert "0.6931" in line and "0.6919" in line and "teacher.finetune" in line
    assert teacher_warnings({**healthy, "teacher/val/loss": constant - 0.011}, labels) == []  # the margin: 0.01
    assert teacher_warnings(at_chance, labels, problem_type="regression") == []  # STS-B's loss is an MSE
    assert teacher_warnings(at_chance, None) == []  # no labels (a source that does not expose them): no guess
    assert all("\n" not in line for line in teacher_warnings({**collapsed, **at_chance}, labels))
