"""Every loss term against values computed by hand."""
import math

import pytest
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from opdf_exp.distill import DistillationLoss, DistillContext, HiddenStateMSE, LogitKL, TaskLoss
from opdf_exp.distill.terms import ModuleOutputMSE, soft_target_kl
from opdf_exp.errors import ConfigError
from opdf_exp.models import random_classifier, student_from_teacher


def out(logits, hidden=None):
    return SequenceClassifierOutput(logits=torch.tensor(logits, dtype=torch.float32),
                                    hidden_states=hidden)


def test_task_loss_cross_entropy_by_hand():
    logits = [[2.0, 0.0], [0.0, 1.0]]
    labels = torch.tensor([0, 0])
    # example 1: -log(e^2/(e^2+1)); example 2: -log(1/(1+e))
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.e))) / 2
    value = TaskLoss()(DistillContext(student=out(logits), labels=labels))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_task_loss_regression_is_mse():
    value = TaskLoss()(DistillContext(student=out([[1.0], [3.0]]), labels=torch.tensor([0.0, 1.0])))
    assert value.item() == pytest.approx((1 + 4) / 2)


@pytest.mark.parametrize("t2", [True, False])
def test_logit_kl_by_hand(t2):
    s, t, temp = [[1.0, 2.0, 0.5]], [[0.0, 3.0, 1.0]], 2.0
    ps = [math.exp(x / temp) for x in s[0]]
    pt = [math.exp(x / temp) for x in t[0]]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    expected = kl * temp ** 2 if t2 else kl
    value = LogitKL(temperature=temp, t2_scaling=t2)(DistillContext(student=out(s), teacher=out(t)))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_logit_kl_is_mean_over_examples_and_zero_for_identical_logits():
    kl = LogitKL(temperature=3.0)
    same = kl(DistillContext(student=out([[1.0, 2.0]] * 4), teacher=out([[1.0, 2.0]] * 4)))
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    one = kl(DistillContext(student=out([[0.0, 1.0]]), teacher=out([[1.0, 0.0]])))
    four = kl(DistillContext(student=out([[0.0, 1.0]] * 4), teacher=out([[1.0, 0.0]] * 4)))
    assert four.item() == pytest.approx(one.item(), rel=1e-6)


def test_logit_kl_single_logit_falls_back_to_mse_and_warns():
    with pytest.warns(UserWarning, match="single-logit"):
        value = LogitKL()(DistillContext(student=out([[1.0], [2.0]]), teacher=out([[0.0], [0.0]])))
    assert value.item() == pytest.approx(2.5)


def test_logit_kl_rejects_bad_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        LogitKL(temperature=0)


def test_soft_target_kl_is_invariant_to_sequence_length():
    torch.manual_seed(0)
    s_tok, t_tok = torch.randn(1, 1, 50), torch.randn(1, 1, 50)
    values = [float(soft_target_kl(s_tok.expand(4, length, 50), t_tok.expand(4, length, 50), 2.0))
              for length in (1, 16, 512)]
    assert values[0] == pytest.approx(values[1], rel=1e-6) and values[0] == pytest.approx(values[2], rel=1e-6)
    # ... and to batch size; equal to T^2 * KL of that one token
    one = float(soft_target_kl(s_tok[0, 0], t_tok[0, 0], 2.0))
    assert values[0] == pytest.approx(one, rel=1e-6)
    p_t = torch.softmax(t_tok / 2, -1)
    direct = 4 * float((p_t * (torch.log_softmax(t_tok / 2, -1) - torch.log_softmax(s_tok / 2, -1))).sum())
    assert one == pytest.approx(direct, rel=1e-5)
    # PyTorch's batchmean on [batch, seq, vocab] would grow with the sequence length: the pitfall this guards
    bm = [float(torch.nn.functional.kl_div(torch.log_softmax(s_tok.expand(4, n, 50) / 2, -1),
                                           torch.log_softmax(t_tok.expand(4, n, 50) / 2, -1),
                                           reduction="batchmean", log_target=True)) for n in (1, 16)]
    assert bm[1] == pytest.approx(16 * bm[0], rel=1e-5)


def test_soft_target_kl_mask_and_identity():
    logits = torch.randn(2, 6, 11)
    assert float(soft_target_kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 6, 11)
    mask = torch.zeros(2, 6)
    mask[:, :3] = 1
    assert float(soft_target_kl(other, logits, 2.0, mask)) == pytest.approx(
        float(soft_target_kl(other[:, :3], logits[:, :3], 2.0)), rel=1e-6)
    with pytest.raises(ConfigError, match="vocabulary"):
        soft_target_kl(torch.randn(2, 3, 5), torch.randn(2, 3, 6))


def test_logit_kl_on_token_logits_ignores_padding():
    """Token-level logits (LM students): LogitKL averages over real tokens only, like the geometry sweep's KD."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    value = LogitKL(temperature=2.0)(DistillContext(student=out(s), teacher=out(t), attention_mask=mask))
    real = torch.cat([s[0, :3], s[1]]), torch.cat([t[0, :3], t[1]])
    assert float(value) == pytest.approx(float(soft_target_kl(*real, 2.0)), rel=1e-6)


def _bert(layers=4, hidden=16):
    return random_classifier("bert", num_labels=2, vocab_size=50, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)


def test_hidden_mse_masks_padding_by_hand():
    teacher = _bert()
    student = student_from_teacher(teacher, layers=[1, 3])
    term = HiddenStateMSE(layer_map=[[1, 2]], projection=False)
    term.setup(student, teacher)
    hs = [torch.zeros(1, 3, 16)] * 3
    ht = [torch.zeros(1, 3, 16)] * 5
    ht = list(ht)
    target = torch.zeros(1, 3, 16)
    target[0, 0] = 1.0   # real token, error 1 in every feature
    target[0, 2] = 5.0   # padding: must not count
    ht[2] = target
    mask = torch.tensor([[1, 1, 0]])
    ctx = DistillContext(student=out([[0.0, 0.0]], tuple(hs)), teacher=out([[0.0, 0.0]], tuple(ht)), attention_mask=mask)
    # squared errors: token 0 -> 16 features * 1, token 1 -> 0; mean over 2 real tokens * 16 features = 0.5
    assert term(ctx).item() == pytest.approx(0.5)


def test_hidden_mse_auto_map_follows_student_origin_and_projects_widths():
    teacher = _bert(layers=4, hidden=16)
    student = student_from_teacher(teacher, layers=[0, 3])
    term = HiddenStateMSE()
    term.setup(student, teacher)
    assert term.pairs == [(0, 0), (1, 1), (2, 4)]
    assert all(isinstance(p, torch.nn.Identity) for p in term.projections)
    narrow = _bert(layers=2, hidden=8)
    term = HiddenStateMSE(layer_map="auto", projection="auto")
    term.setup(narrow, teacher)
    assert term.projections[0].in_features == 8 and term.projections[0].out_features == 16
    with pytest.raises(ConfigError, match="projection=true"):
        HiddenStateMSE(projection=False).setup(narrow, teacher)


def test_hidden_mse_rejects_out_of_range_map():
    teacher = _bert()
    student = student_from_teacher(teacher, num_layers=2)
    with pytest.raises(ConfigError, match="out of range"):
        HiddenStateMSE(layer_map=[[1, 9]]).setup(student, teacher)


def test_module_output_mse_uses_hooks_and_validates_paths():
    teacher = _bert()
    student = student_from_teacher(teacher, layers=[1, 3])
    term = ModuleOutputMSE(pairs=[["bert.encoder.layer.1.output.dense", "bert.encoder.layer.3.output.dense"]])
    term.setup(student, teacher)
    with pytest.raises(ConfigError, match="names no module"):
        ModuleOutputMSE(pairs=[["bert.nope", "bert.encoder"]]).setup(student, teacher)


def test_weighted_sum_formula_and_skipped_zero_weights():
    loss = DistillationLoss({"task": TaskLoss(), "kd": LogitKL(temperature=1.0)}, {"task": 0.5, "kd": 0.0})
    assert loss.formula() == "0.5*task"
    assert not loss.needs_teacher
    ctx = DistillContext(student=out([[2.0, 0.0]]), labels=torch.tensor([1]))
    total, terms = loss(ctx)
    assert set(terms) == {"task"}
    assert total.item() == pytest.approx(0.5 * terms["task"].item())
    loss = DistillationLoss({"task": TaskLoss(), "kd": LogitKL(temperature=1.0)}, {"task": 1.0, "kd": 2.0})
    ctx = DistillContext(student=out([[2.0, 0.0]]), teacher=out([[0.0, 2.0]]), labels=torch.tensor([1]))
    total, terms = loss(ctx)
    assert total.item() == pytest.approx(terms["task"].item() + 2 * terms["kd"].item())
    with pytest.raises(ConfigError, match=">= 0"):
        DistillationLoss({"task": TaskLoss()}, {"task": -1.0})
