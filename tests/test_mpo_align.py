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
