"""KD methods (PKD, BERT-of-Theseus, LGTM) against oracles: layer maps from the papers, the mixed model equal to
the teacher at p = 0 and to the student at p = 1, replacement draws reproducible from (seed, step), LGTM's
look-ahead equal to a real AdamW step and its finite difference equal to the exact second derivative; plus the
registry and the one-line refusals of bad input."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from opdf_exp.distill.lgtm import adamw_lookahead, distillation_influence, teacher_objective
from opdf_exp.distill.methods import create_method, list_methods
from opdf_exp.distill.terms import LogitKL, PatientCLSMSE, patient_layer_map
from opdf_exp.errors import ConfigError
from opdf_exp.models.hf import random_classifier
from opdf_exp.models.layers import student_from_teacher
from opdf_exp.models.theseus import TheseusModel, replacement_probability, theseus_groups

CONF = Path(__file__).resolve().parents[1] / "conf"


def tiny_bert(layers: int = 4, seed: int = 0, **extra) -> nn.Module:
    return random_classifier("bert", num_labels=3, seed=seed, vocab_size=64, hidden_size=16, num_hidden_layers=layers,
                             num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, **extra)


def batch(seed: int = 0, size: int = 4, length: int = 6) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 64, (size, length), generator=generator),
            "attention_mask": torch.ones(size, length, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------ registry
def test_every_registered_method_has_its_config_and_unknown_names_are_refused():
    assert {"kd", "pkd", "theseus", "lgtm"} <= set(list_methods())
    for name in list_methods():
        config = CONF / "distill" / f"{name}.yaml"
        assert config.is_file(), f"method {name} has no conf/distill/{name}.yaml"
        assert f"name: {name}" in config.read_text()
    with pytest.raises(ConfigError, match="unknown; registered: .*pkd.*theseus"):
        create_method("theseuss")
    with pytest.raises(ConfigError, match="bad options"):
        create_method("kd", p0=0.5)


@pytest.mark.parametrize("name", list_methods())
def test_every_method_composes_with_every_decomposition(name, tmp_path):
    from opdf_exp.runner.distill_task import distill_method
    from tests.helpers.hydra import compose_job

    for decomposition in ("none", "svd", "mpo"):
        with compose_job([f"distill={name}", f"decomposition={decomposition}"], tmp_path) as cfg:
            method = distill_method(cfg)
            assert method.name == name and cfg.decomposition.kind == decomposition


# ------------------------------------------------------------------------------------------------ PKD
def test_pkd_layer_maps_are_the_papers():
    # Sun et al. 2019: a 6-layer student of BERT-base learns from teacher layers {2,4,6,8,10} (Skip) / {7..11} (Last)
    assert patient_layer_map(6, 12, "skip") == [(1, 2), (2, 4), (3, 6), (4, 8), (5, 10)]
    assert patient_layer_map(6, 12, "last") == [(1, 7), (2, 8), (3, 9), (4, 10), (5, 11)]
    assert patient_layer_map(3, 6, "skip") == [(1, 2), (2, 4)]


@pytest.mark.parametrize("student_layers,teacher_layers,strategy,layer_map,fix", [
    (3, 4, "skip", None, "strategy=last or an explicit layer_map"),
    (1, 4, "skip", None, "change student.num_layers"),
    (2, 4, "skip", [[3, 1]], "give pairs"),
    (2, 4, "skip", [[1, 5]], "give pairs"),
])
def test_pkd_layer_map_that_does_not_fit_is_refused_in_one_line(student_layers, teacher_layers, strategy, layer_map, fix):
    term = PatientCLSMSE(strategy=strategy, layer_map=layer_map)
    with pytest.raises(ConfigError, match=fix) as error:
        term.setup(tiny_bert(student_layers), tiny_bert(teacher_layers))
    assert "\n" not in str(error.value)


def test_pkd_term_is_the_public_codes_mean_over_examples_blocks_and_units():
    """L_PT = mean over (examples, mapped blocks, hidden units) of the normalised [CLS] difference squared, as
    the public patience_loss computes it, so β means what the paper's grid means."""
    term = PatientCLSMSE(strategy="skip")
    term.setup(tiny_bert(3), tiny_bert(6))  # pairs (1, 2), (2, 4)
    hs = [torch.randn(3, 5, 16) for _ in range(4)]
    ht = [torch.randn(3, 5, 16) for _ in range(7)]
    ctx = SimpleNamespace(student=SimpleNamespace(hidden_states=hs), teacher=SimpleNamespace(hidden_states=ht))
    unit = lambda v: v / v.norm(dim=-1, keepdim=True)
    squared = [((unit(hs[s][:, 0]) - unit(ht[t][:, 0])) ** 2).sum().item() for s, t in [(1, 2), (2, 4)]]
    assert term(ctx).item() == pytest.approx(sum(squared) / (3 * 2 * 16), rel=1e-5)  # B x pairs x d entries
    raw = PatientCLSMSE(strategy="skip", normalize=False)
    raw.setup(tiny_bert(3), tiny_bert(6))
    by_hand = sum(((hs[s][:, 0] - ht[t][:, 0]) ** 2).sum().item() for s, t in [(1, 2), (2, 4)]) / (3 * 2 * 16)
    assert raw(ctx).item() == pytest.approx(by_hand, rel=1e-5)
    ctx.student.hidden_states = [h * 7.0 for h in [hs[0], ht[2], ht[4], hs[3]]]  # same direction as the teacher's
    assert term(ctx).item() == pytest.approx(0.0, abs=1e-6) and raw(ctx).item() > 1.0


def test_classification_only_term_on_a_regression_task_is_refused_before_training(tmp_path):
    from opdf_exp.runner.distill_task import build_loss
    from tests.helpers.hydra import compose_job

    teacher = tiny_bert(4)
    with compose_job(["distill=kd", "+distill.terms.kd.regression_fallback=false"], tmp_path) as cfg:
        with pytest.raises(ConfigError, match="regression task.*drop distill.terms.kd") as error:
            build_loss(cfg, student_from_teacher(teacher, 2), teacher, "regression")
    assert "\n" not in str(error.value)
    assert LogitKL().classification_only is False  # the default falls back to MSE on one logit


# ------------------------------------------------------------------------------------------------ Theseus
def test_theseus_curriculum_and_groups():
    assert replacement_probability(0, 0.3, 3e-4) == pytest.approx(0.3)
    assert replacement_probability(1000, 0.3, 3e-4) == pytest.approx(0.6)
    assert replacement_probability(10 ** 6, 0.3, 3e-4) == 1.0
    assert theseus_groups(6, 12) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert theseus_groups(2, 4, [[0], [1, 2, 3]]) == [[0], [1, 2, 3]]
    for student, teacher, groups, fix in [(3, 4, "auto", "give groups="), (2, 4, [[0, 1], [3]], "covering teacher"),
                                          (2, 4, [[1, 0], [2, 3]], "in order")]:
        with pytest.raises(ConfigError, match=fix):
            theseus_groups(student, teacher, groups)


def _no_dropout(layers: int) -> nn.Module:
    return tiny_bert(layers, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_theseus_mixed_model_is_the_teacher_at_p0_and_the_student_at_p1():
    teacher = _no_dropout(4)
    student = student_from_teacher(teacher, 2)
    with torch.no_grad():  # make the student differ from every teacher block
        for param in student.bert.encoder.layer.parameters():
            param.add_(0.1 * torch.randn_like(param))
    inputs = batch()
    teacher.eval()
    expected_teacher = teacher(**inputs).logits
    expected_student = student.eval()(**inputs).logits
    never = TheseusModel(student, teacher, p0=0.0, k=0.0).train()
    always = TheseusModel(student, teacher, p0=1.0, k=0.0).train()
    torch.testing.assert_close(never(**inputs).logits, expected_teacher)
    torch.testing.assert_close(always(**inputs).logits, expected_student)
    torch.testing.assert_close(never.eval()(**inputs).logits, expected_student)  # inference: the student alone
    assert len(student.bert.encoder.layer) == 2  # the student's own stack is back after each mixed forward
    # only the successor's parameters get gradients through the mixed model
    half = TheseusModel(student, teacher, p0=0.5, k=0.0, seed=3).train()
    step = next(s for s in range(50) if any(half.replaced(s)) and not all(half.replaced(s)))
    half.set_step(step)
    half(**inputs).logits.sum().backward()
    used = [i for i, flag in enumerate(half.replaced(step)) if flag]
    grads = [any(p.grad is not None for p in block.parameters()) for block in student.bert.encoder.layer]
    assert [i for i, g in enumerate(grads) if g] == used
    assert all(p.grad is None and not p.requires_grad for p in half.predecessor_groups.parameters())


def test_theseus_replacement_draws_are_reproducible_from_seed_and_step():
    teacher = _no_dropout(4)
    model = TheseusModel(student_from_teacher(teacher, 2), teacher, p0=0.5, k=0.0, seed=7)
    again = TheseusModel(student_from_teacher(teacher, 2), teacher, p0=0.5, k=0.0, seed=7)
    other = TheseusModel(student_from_teacher(teacher, 2), teacher, p0=0.5, k=0.0, seed=8)
    draws = [model.replaced(s) for s in range(40)]
    assert draws == [again.replaced(s) for s in range(40)]  # a resumed run draws the same at the same step
    assert draws != [other.replaced(s) for s in range(40)]
    assert 0.3 < sum(map(sum, draws)) / 80 < 0.7


# ------------------------------------------------------------------------------------------------ LGTM
def test_adamw_lookahead_equals_a_real_adamw_step():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # non-trivial moments and step counts
        optimizer.zero_grad()
        model(torch.randn(4, 5)).pow(2).sum().backward()
        optimizer.step()
    optimizer.zero_grad()
    model(torch.randn(4, 5)).pow(2).sum().backward()
    predicted = adamw_lookahead(optimizer, {p: p.grad.clone() for p in model.parameters()})
    state_before = copy.deepcopy(optimizer.state_dict())
    optimizer.step()
    for param in model.parameters():
        torch.testing.assert_close(predicted[param], param.detach(), rtol=1e-6, atol=1e-7)
    assert state_before["state"][0]["step"] != optimizer.state_dict()["state"][0]["step"]


class _Classifier(nn.Module):
    """A minimal Hugging Face-like classifier: ``model(x=..., return_dict=True).logits``."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x, return_dict=True):
        return SimpleNamespace(logits=self.net(x))


def test_distillation_influence_is_the_exact_second_derivative():
    """The finite difference of the teacher's gradient at theta ± R v equals d/de grad_teacher L(theta + e v)."""
    from torch.func import functional_call, grad, jvp

    student, teacher = _Classifier(1), _Classifier(2)
    inputs, labels = {"x": torch.randn(8, 4)}, torch.randint(0, 3, (8,))
    vector = [torch.randn_like(p) for p in student.parameters()]
    influence = distillation_influence(student, teacher, inputs, labels, list(zip(student.parameters(), vector)),
                                       teacher_alpha=0.7, temperature=2.0, r=1e-3)
    s_names = [n for n, _ in student.named_parameters()]
    t_params = dict(teacher.named_parameters())

    def teacher_grad(s_values):
        def loss(t_params_):
            s_logits = functional_call(student, dict(zip(s_names, s_values)), args=(), kwargs=inputs).logits
            t_logits = functional_call(teacher, t_params_, args=(), kwargs=inputs).logits
            return teacher_objective(t_logits, s_logits, labels, 0.7, 2.0, detach_student=False)
        return grad(loss)(t_params)

    s_values = tuple(p.detach() for p in student.parameters())
    _, exact = jvp(teacher_grad, (s_values,), (tuple(vector),))
    for (name, _), got in zip(teacher.named_parameters(), influence):
        torch.testing.assert_close(got, exact[name], rtol=2e-2, atol=2e-4)
    # the student's parameters are restored exactly
    for p, value in zip(student.parameters(), s_values):
        assert torch.equal(p.detach(), value)
