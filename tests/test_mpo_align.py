"""Tensor alignment loss: zero on identical weights, differentiable on the student only, layer maps, mismatches."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError
from opdf_exp.mpo import TensorAlignmentLoss, mpo_layers, overparameterize, split_layer_name, uniform_map


pytestmark = pytest.mark.usefixtures("single_thread")


DIMS = dict(hidden_size=48, num_attention_heads=4, intermediate_size=96, vocab_size=100, max_position_embeddings=32)


def bert(layers: int, seed: int = 0, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_hidden_layers=layers, num_labels=2,
                                                    **{**DIMS, **overrides})).eval()


def student_from(teacher, teacher_layers):
    """A shallower copy whose block i holds the teacher's block teacher_layers[i] (DistilBERT/Theseus style)."""
    student = bert(len(teacher_layers), seed=1)
    for i, j in enumerate(teacher_layers):
        student.bert.encoder.layer[i].load_state_dict(teacher.bert.encoder.layer[j].state_dict())
    return student


FACTORS = {48: [8, 1, 6], 96: [12, 1, 8]}


@pytest.mark.parametrize("teacher_is_mpo", [True, False])
def test_zero_in_float64_when_student_holds_the_teacher_layers(teacher_is_mpo):
    teacher = bert(4).double()
    student = student_from(teacher, [1, 3]).double()  # the default uniform map for 2 of 4 blocks
    overparameterize(student, factors=FACTORS)
    if teacher_is_mpo:
        overparameterize(teacher, factors=FACTORS)
    loss_fn = TensorAlignmentLoss(student, teacher)
    assert [(p.student.split(".")[3], p.teacher.split(".")[3]) for p in loss_fn.pairs[::12]] == [("0", "1"), ("1", "3")]
    assert len(loss_fn.pairs) == 2 * 6 * 2  # 2 blocks x 6 matrices x 2 auxiliary tensors (n = 3, central = 1)
    assert {p.index for p in loss_fn.pairs} == {0, 2}
    loss = loss_fn()
    assert loss.dtype == torch.float64 and loss.grad_fn is not None
    assert loss.item() <= 1e-10


def test_zero_in_float32_and_gradients_reach_only_student_aux_tensors():
    teacher = bert(4)
    student = student_from(teacher, [1, 3])
    overparameterize(student, n=5, layout="ends")
    overparameterize(teacher, n=5, layout="ends")
    loss_fn = TensorAlignmentLoss(student, teacher)
    assert loss_fn().item() <= 1e-12

    query = student.bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.tensors[0].add_(1e-2 * torch.randn_like(query.tensors[0]))
    loss = loss_fn()
    assert loss.item() > 0 and loss.grad_fn is not None
    loss.backward()
    assert float(query.tensors[0].grad.abs().sum()) > 0          # the perturbed auxiliary tensor is pulled back
    assert query.tensors[query.central_index].grad is None        # the central tensor is not aligned
    assert all(t.grad is not None for layer in mpo_layers(student).values() for k, t in enumerate(layer.tensors)
               if k != layer.central_index)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not b.requires_grad for b in loss_fn.buffers())
    assert not list(loss_fn.parameters())  # the student is not registered inside the loss

    # a gradient step on the live parameters lowers the loss
    optimizer = torch.optim.SGD([p for layer in mpo_layers(student).values() for p in layer.tensors], lr=10.0)
    before = loss.item()
    optimizer.step()
    assert loss_fn().item() < before


def test_independent_decompositions_of_a_perturbed_teacher_are_close():
    """The fixed gauge makes tensors continuous in W: a slightly different student weight gives slightly
    different tensors, not sign-flipped ones (the loss stays at the perturbation's scale)."""
    teacher = bert(2)
    student = student_from(teacher, [0, 1])
    with torch.no_grad():
        for p in student.bert.encoder.parameters():
            p.add_(1e-6 * torch.randn_like(p))
    overparameterize(student, n=3, layout="ends")
    loss = TensorAlignmentLoss(student, teacher, indices="all")()
    scale = sum(t.detach().square().mean().item() for layer in mpo_layers(student).values() for t in layer.tensors)
    assert loss.item() < 1e-6 * scale  # measured ~7e-9; a sign flip anywhere would give O(1)


def test_layer_maps_and_indices():
    teacher = bert(4)
    student = bert(2, seed=3)
    overparameterize(student, n=3)
    explicit = TensorAlignmentLoss(student, teacher, layer_map={"0": 0, "1": 2}, indices="all")
    assert {(p.student.split(".")[3], p.teacher.split(".")[3]) for p in explicit.pairs} == {("0", "0"), ("1", "2")}
    assert {p.index for p in explicit.pairs} == {0, 1, 2}
    as_list = TensorAlignmentLoss(student, teacher, layer_map=[0, 2], indices=[0, -1])
    assert {p.index for p in as_list.pairs} == {0, 2}
    partial = TensorAlignmentLoss(student, teacher, layer_map={1: 3}, indices="central")
    assert {p.student.split(".")[3] for p in partial.pairs} == {"1"} and {p.index for p in partial.pairs} == {1}
    assert len(partial.skipped) == 6  # block 0 is not mapped
    with pytest.raises(ConfigError, match="out of range"):
        TensorAlignmentLoss(student, teacher, layer_map={0: 4})
    with pytest.raises(ConfigError, match="out of range"):
        TensorAlignmentLoss(student, teacher, indices=[3])
    with pytest.raises(ConfigError, match="unknown"):
        TensorAlignmentLoss(student, teacher, layer_map="diagonal")
    with pytest.raises(ConfigError, match="no MPO layers"):
        TensorAlignmentLoss(bert(2), teacher)


def test_uniform_map_and_layer_names():
    assert uniform_map(6, 12) == {i: 2 * i + 1 for i in range(6)}  # the public code's 2i + 1
    assert uniform_map(3, 3) == {0: 0, 1: 1, 2: 2}
    assert uniform_map(4, 6) == {0: 1, 1: 2, 2: 3, 3: 5}  # Python round: half to even (4.5 -> 4)
    with pytest.raises(ConfigError):
        uniform_map(4, 2)
    assert split_layer_name("bert.encoder.layer.3.attention.self.query") == ("bert.encoder.layer", 3,
                                                                             "attention.self.query")
    assert split_layer_name("model.layers.1.self_attn.q_proj") == ("model.layers", 1, "self_attn.q_proj")
    assert split_layer_name("blocks.11.mlp.fc2") == ("blocks", 11, "mlp.fc2")
    assert split_layer_name("classifier") is None


def test_width_mismatch_errors_or_skips():
    teacher = bert(2, intermediate_size=128)  # same hidden width, wider FFN
    student = bert(2, seed=4)
    overparameterize(student, n=3)
    with pytest.raises(ConfigError, match="on_mismatch='skip'") as info:
        TensorAlignmentLoss(student, teacher)
    assert "\n" not in str(info.value)
    loss_fn = TensorAlignmentLoss(student, teacher, on_mismatch="skip")
    assert {p.student.rsplit(".", 2)[-2] for p in loss_fn.pairs} == {"self", "output"}  # attention only
    assert all("intermediate" not in p.student and not p.student.endswith("layer.0.output.dense")
               for p in loss_fn.pairs)
    assert len(loss_fn.skipped) == 4  # intermediate.dense and output.dense in both blocks
    assert loss_fn().item() > 0
    with pytest.raises(ConfigError, match="matched no tensors"):
        TensorAlignmentLoss(student, bert(2, hidden_size=64), on_mismatch="skip")


def test_teacher_gauge_must_match():
    teacher = bert(2)
    student = bert(2, seed=5)
    overparameterize(student, n=3)
    overparameterize(teacher, n=3, gauge=None)
    with pytest.raises(ConfigError, match="same gauge"):
        TensorAlignmentLoss(student, teacher)


def test_llama_and_timm_blocks_are_matched():
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=128)
    teacher = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **cfg))
    student = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **cfg))
    student.model.layers[0].load_state_dict(teacher.model.layers[1].state_dict())
    overparameterize(student, n=3)
    loss_fn = TensorAlignmentLoss(student, teacher)
    assert {p.teacher.split(".")[2] for p in loss_fn.pairs} == {"1"} and len(loss_fn.pairs) == 14
    assert loss_fn().item() <= 1e-12

    vit_teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4)
    vit_student = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2)
    overparameterize(vit_student, n=2)
    pairs = TensorAlignmentLoss(vit_student, vit_teacher).pairs
    assert {(p.student.split(".")[1], p.teacher.split(".")[1]) for p in pairs} == {("0", "1"), ("1", "3")}
    assert isinstance(vit_teacher.blocks[1].attn.qkv, nn.Linear)  # a plain teacher is never modified


def test_relative_reduction_equals_the_hand_computed_value_and_public_map():
    """relative = mean over aligned tensors of ||S - T||^2 / ||T||^2; public maps block i to teacher block 2i + 1;
    a student initialised from the blocks it is aligned to is counted (and warned about) as starting at target."""
    teacher = bert(4)
    student = student_from(teacher, [0, 1])  # the public code's initialisation: block i from teacher block i
    overparameterize(student, factors=FACTORS)
    public = TensorAlignmentLoss(student, teacher, layer_map="public", reduction="relative")
    assert {(p.student.split(".")[3], p.teacher.split(".")[3]) for p in public.pairs} == {("0", "1"), ("1", "3")}
    assert public.starts_at_target == 0  # the targets differ from the start: the term can act
    expected = []
    for s_name, k, buffer in public._buffer_of:
        s_t, t_t = public._student_layers[s_name].tensors[k].detach().double(), getattr(public, buffer).double()
        expected.append(((s_t - t_t) ** 2).sum() / (t_t ** 2).sum())
    assert public().item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)
    mean = TensorAlignmentLoss(student, teacher, layer_map="public")  # the public code's MSE is far smaller
    assert 0 < mean().item() < public().item()
    uniform_start = student_from(teacher, [1, 3])  # student=from_teacher's blocks; preceding aligns to 0 and 2
    overparameterize(uniform_start, factors=FACTORS)
    preceding = TensorAlignmentLoss(uniform_start, teacher, layer_map="preceding")
    assert {(p.student.split(".")[3], p.teacher.split(".")[3]) for p in preceding.pairs} == {("0", "0"), ("1", "2")}
    assert preceding.starts_at_target == 0
    with pytest.raises(ConfigError, match="out of range"):  # 2i + 1 past a 2-block teacher
        TensorAlignmentLoss(student, bert(2), layer_map="public")
    with pytest.raises(ConfigError, match="reduction='sum' is unknown"):
        TensorAlignmentLoss(student, teacher, reduction="sum")


def test_a_map_onto_the_students_own_start_is_counted_and_warned(caplog):
    teacher = bert(4)
    student = student_from(teacher, [1, 3])  # what student=from_teacher does; the uniform map aligns to [1, 3]
    overparameterize(student, factors=FACTORS)
    with caplog.at_level("WARNING"):
        loss_fn = TensorAlignmentLoss(student, teacher)
    assert loss_fn.starts_at_target == len(loss_fn.pairs) == 24
    lines = [r.getMessage() for r in caplog.records if "already equal their targets" in r.getMessage()]
    assert len(lines) == 1 and "24 of 24" in lines[0] and "align.layer_map=public" in lines[0]


def test_step_amplification_equals_a_hand_computed_adam_step():
    """n = 2: one Adam step moves each factor by lr * g / (|g| + eps) (step 1, bias-corrected); the dense W moves
    by lr * g_W / (|g_W| + eps). The ratio of the two ||dW|| is what step_amplification reports."""
    from opdf_exp.mpo import MPOLinear, mpo_contract, step_amplification

    torch.manual_seed(0)
    linear = nn.Linear(12, 6)
    layer = MPOLinear.from_linear(linear, [2, 3], [3, 4])
    x, target = torch.randn(10, 12), torch.randn(10, 6)

    def loss(model):
        return ((model(x) - target) ** 2).mean()

    lr, eps = 1e-3, 1e-8
    tensors = [t.detach().clone().requires_grad_(True) for t in layer.tensors]
    w_before = mpo_contract(tensors).detach()
    out = x @ mpo_contract(tensors).t() + linear.bias.detach()
    grads = torch.autograd.grad(((out - target) ** 2).mean(), tensors)
    moved = [t.detach() - lr * g / (g.abs() + eps) for t, g in zip(tensors, grads)]
    mpo_step = (mpo_contract(moved) - w_before).norm()
    w = w_before.clone().requires_grad_(True)
    g_w, = torch.autograd.grad((((x @ w.t() + linear.bias.detach()) - target) ** 2).mean(), w)
    dense_step = (lr * g_w / (g_w.abs() + eps)).norm()
    expected = (mpo_step / dense_step).item()
    assert step_amplification(layer, loss, lr=lr, eps=eps) == pytest.approx(expected, rel=1e-4)
    assert torch.equal(layer.to_matrix().detach(), w_before)  # the layer itself did not move
    with pytest.raises(ConfigError, match="no effect on a student without MPO layers"):
        step_amplification(linear, loss)


def test_parameter_groups_by_role():
    from opdf_exp.utils.optim import adamw, parameter_groups

    model = bert(2)
    overparameterize(model, n=3, targets=["*.intermediate.dense", "*.output.dense"])
    groups = parameter_groups([model])
    mpo_ids = {id(t) for layer in mpo_layers(model).values() for t in layer.tensors}
    assert {id(p) for p in groups["mpo"]} == mpo_ids
    assert id(model.bert.embeddings.word_embeddings.weight) in {id(p) for p in groups["no_decay"]}
    assert all(p.dim() < 2 for p in groups["no_decay"] if p is not model.bert.embeddings.word_embeddings.weight
               and p is not model.bert.embeddings.position_embeddings.weight
               and p is not model.bert.embeddings.token_type_embeddings.weight)
    assert all(p.dim() >= 2 for p in groups["matrices"]) and not mpo_ids & {id(p) for p in groups["matrices"]}
    assert sum(len(g) for g in groups.values()) == len([p for p in model.parameters() if p.requires_grad])
    optimizer = adamw([model], 1e-3, 0.01, mpo_lr_scale=0.25, mpo_weight_decay=0.0)
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["mpo"]["lr"] == pytest.approx(2.5e-4) and by_name["mpo"]["weight_decay"] == 0.0
    assert by_name["matrices"]["lr"] == 1e-3 and by_name["matrices"]["weight_decay"] == 0.01
    assert by_name["no_decay"]["weight_decay"] == 0.0
    with pytest.raises(ConfigError, match="lr_scale=0 must be > 0"):
        adamw([model], 1e-3, mpo_lr_scale=0)


def test_align_weight_auto_sets_the_measured_gradient_ratio_in_a_real_fit(tmp_path):
    """decomposition.align.weight=auto:<ratio>: at the fit's start λ is set so that the alignment gradient is
    <ratio> x the rest of the gradient on the MPO tensors. The oracle is the run's own first logged
    train/align_grad_ratio (the same batch and state as the measurement, no dropout): it equals <ratio>.
    Refused in one line when the alignment gradient is 0 (targets equal the start) or the weight is malformed."""
    import pytorch_lightning as pl

    from opdf_exp.distill.loss import DistillationLoss
    from opdf_exp.distill.terms import LogitKL, TaskLoss, TensorAlignment
    from opdf_exp.lit.module import DistillationModule
    from opdf_exp.runner.checks import align_weight

    teacher = bert(4).train()
    student = student_from(teacher, [0, 1]).train()
    for module in student.modules():  # no dropout: the first step then sees exactly what the measurement saw
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    overparameterize(student, factors=FACTORS)
    ids = torch.randint(1, 100, (16, 12))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(16)]

    def fit(alignment, ratio):
        loss = DistillationLoss({"task": TaskLoss(), "kd": LogitKL(temperature=2.0), "align": TensorAlignment(alignment)},
                                {"task": 1.0, "kd": 1.0, "align": align_weight(f"auto:{ratio}")[0]})
        module = DistillationModule(student, loss, teacher, lr=1e-3, align_weight_ratio=ratio)
        csv = pl.loggers.CSVLogger(tmp_path)
        trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=csv, log_every_n_steps=1, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
        return module, next(tmp_path.rglob("metrics.csv")).read_text().splitlines()

    public = TensorAlignmentLoss(student, teacher, layer_map="public", reduction="relative")
    module, lines = fit(public, 0.25)
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    weight = next(float(r["opdf/align_weight"]) for r in rows if r.get("opdf/align_weight"))
    first_ratio = next(float(r["train/align_grad_ratio"]) for r in rows if r.get("train/align_grad_ratio"))
    assert weight > 0 and module.loss.weights["align"] == pytest.approx(weight)
    assert first_ratio == pytest.approx(0.25, rel=1e-3)
    assert float(module.align_weight_measured) == pytest.approx(weight)  # kept in the checkpoint's state

    at_start = student_from(teacher, [1, 3])
    overparameterize(at_start, factors=FACTORS)
    student = at_start
    with pytest.raises(ConfigError, match=r"alignment gradient is 0 at the start \(every target .*layer_map=public"):
        fit(TensorAlignmentLoss(at_start, teacher), 0.1)
    for bad in ("auto:", "auto:0", "auto:x", -1, "strong", True):
        with pytest.raises(ConfigError, match=r"must be a number >= 0 or auto:<ratio> with ratio > 0"):
            align_weight(bad)
    assert align_weight(0.5) == (0.5, None) and align_weight("auto:0.1") == (1.0, 0.1)
