"""Model surgery: MPO layers in BERT / timm ViT / Llama, dense export, parameter counts, validation."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from opdf_exp.errors import ConfigError
from opdf_exp.mpo import (MPOEmbedding, MPOLinear, apply_decomposition, balanced_factors, count_params,
                          detect_family, end_factors, export_dense, match_targets, mpo_layers, overparameterize,
                          plan_decomposition)


pytestmark = pytest.mark.usefixtures("single_thread")


BERT_DIMS = dict(hidden_size=48, num_attention_heads=4, intermediate_size=96, vocab_size=100,
                 max_position_embeddings=32)
BERT_TARGETS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")


def tiny_bert(layers: int = 2, seed: int = 0, **overrides):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(num_hidden_layers=layers, num_labels=2,
                                                    **{**BERT_DIMS, **overrides})).eval()


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=128, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, num_classes=10).eval()


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def ids(batch=2, length=12, vocab=100):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------ BERT
def test_bert_default_targets_outputs_and_hf_roundtrip(tmp_path):
    from transformers import BertForSequenceClassification

    model = tiny_bert()
    x = ids()
    with torch.no_grad():
        reference = model(x).logits
    keys = list(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())

    assert detect_family(model) == "bert"
    overparameterize(model, n=3)
    layers = mpo_layers(model)
    assert sorted(layers) == sorted(f"bert.encoder.layer.{i}.{t}" for i in range(2) for t in BERT_TARGETS)
    assert isinstance(model.bert.pooler.dense, nn.Linear) and isinstance(model.classifier, nn.Linear)
    assert isinstance(model.bert.embeddings.word_embeddings, nn.Embedding)
    counts = count_params(model)
    assert counts["inference"] == n_params
    assert counts["train"] == n_params + sum(m.num_mpo_params - m.num_dense_params for m in layers.values())
    with torch.no_grad():
        assert rel(model(x).logits, reference) < 1e-5

    export_dense(model)
    assert not mpo_layers(model)
    assert list(model.state_dict()) == keys
    assert count_params(model) == {"train": n_params, "inference": n_params}
    with torch.no_grad():
        exported = model(x).logits
    assert rel(exported, reference) < 1e-5
    model.save_pretrained(tmp_path)
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, exported)


def test_bert_base_width_counts_match_notes_formula():
    """Notes section 2: 66,955,008 + 769 L + (n-1) * 23,887,872 with the public code's factors."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=6,
                     vocab_size=30522, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    assert count_params(model)["train"] == 66_956_546

    dense = 66_956_546
    for n in (2, 3, 4, 6, 7, 10):  # dry runs: the plan's counts for every n in the notes' table
        f768 = [32] + [1] * (n - 2) + [24]
        f3072 = [64] + [1] * (n - 2) + [48]
        plan = plan_decomposition(model, factors={768: f768, 3072: f3072})
        assert len(plan) == 36
        assert dense + sum(e.mpo_params - e.dense_params for e in plan) == 66_955_008 + 769 * 2 + (n - 1) * 23_887_872

    start = time.perf_counter()
    overparameterize(model, factors={768: [32, 1, 1, 1, 24], 3072: [64, 1, 1, 1, 48]})
    elapsed = time.perf_counter() - start
    assert count_params(model) == {"train": 162_508_034, "inference": 66_956_546}
    assert elapsed < 60  # loose (shared CPU); measured figures in docs/mpo.md
    export_dense(model)
    assert count_params(model) == {"train": 66_956_546, "inference": 66_956_546}


# ------------------------------------------------------------------------------------------ timm ViT
def test_vit_default_targets_and_state_dict_roundtrip():
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    assert detect_family(model) == "vit"
    overparameterize(model, n=3)
    assert sorted(mpo_layers(model)) == sorted(f"blocks.{i}.{t}" for i in range(2)
                                               for t in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    assert isinstance(model.head, nn.Linear)
    with torch.no_grad():
        assert rel(model(x), reference) < 1e-5
    export_dense(model)
    fresh = tiny_vit()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel(fresh(x), reference) < 1e-5


# ------------------------------------------------------------------------------------------ Llama
def test_llama_default_targets_and_hf_roundtrip(tmp_path):
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    x = ids(vocab=128)
    with torch.no_grad():
        reference = model(x).logits
    assert detect_family(model) == "llama"
    overparameterize(model, n=4)
    names = {name.split(".")[-1] for name in mpo_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(mpo_layers(model)) == 14 and isinstance(model.lm_head, nn.Linear)
    k_proj = model.model.layers[0].self_attn.k_proj  # 64 -> 32 (2 kv heads of 16): rectangular
    assert (k_proj.out_features, k_proj.in_features) == (32, 64)
    with torch.no_grad():
        assert rel(model(x).logits, reference) < 1e-5
    export_dense(model)
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert rel(reloaded(x).logits, reference) < 1e-5


def test_tied_embedding_target_is_rejected():
    model = tiny_llama(tie=True)
    with pytest.raises(ConfigError, match="tied"):
        overparameterize(model, targets=["embed_tokens"], n=2)
    assert not mpo_layers(model)


# ------------------------------------------------------------------------------------------ embeddings
def test_embedding_target_becomes_mpo_embedding_and_exports_back():
    model = tiny_bert(pad_token_id=0)
    x = ids()
    with torch.no_grad():
        reference = model(x).logits
    overparameterize(model, targets=["word_embeddings"], n=2)
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, MPOEmbedding) and emb.padding_idx == 0
    assert (emb.row_factors, emb.col_factors) == ([10, 10], [8, 6])
    with torch.no_grad():
        assert rel(model(x).logits, reference) < 1e-5
    model.train()
    model(x).logits.sum().backward()
    assert all(t.grad is not None and float(t.grad.abs().sum()) > 0 for t in emb.tensors)
    export_dense(model)
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding
    assert model.bert.embeddings.word_embeddings.padding_idx == 0


# ------------------------------------------------------------------------------------------ MPOLinear
def test_mpo_linear_gradients_bias_sharing_freeze_and_repr():
    torch.manual_seed(0)
    linear = nn.Linear(48, 96)
    layer = MPOLinear.from_linear(linear, [4, 2, 3, 4], [4, 3, 2, 2])
    assert layer.bias is linear.bias
    assert layer.central_index == 1 and layer.aux_indices == [0, 2, 3]
    assert rel(layer.to_matrix(), linear.weight.detach()) < 1e-5
    x = torch.randn(5, 7, 48)
    assert rel(layer(x), linear(x).detach()) < 1e-5
    layer(x).square().sum().backward()
    assert all(t.grad is not None and float(t.grad.abs().sum()) > 0 for t in layer.tensors)
    assert layer.bias.grad is not None

    text = repr(layer)
    assert "rows=[4, 2, 3, 4]" in text and "cols=[4, 3, 2, 2]" in text and "bonds=[1, 16, 48, 8, 1]" in text
    assert f"params={layer.num_mpo_params:,}" in text and "dense 4,608" in text

    layer.freeze(central=True)
    assert [t.requires_grad for t in layer.tensors] == [True, False, True, True]
    layer.freeze(central=False, aux=True)
    assert [t.requires_grad for t in layer.tensors] == [False, True, False, False]
    frozen = MPOLinear.from_linear(linear, [4, 2, 3, 4], [4, 3, 2, 2], train_central=False)
    assert "frozen=[1]" in repr(frozen)

    dense = layer.to_linear()
    assert type(dense) is nn.Linear and dense.bias is linear.bias
    assert dense.weight.dtype == linear.weight.dtype and dense.weight.requires_grad


def test_graph_free_forwards_reuse_w_until_a_tensor_changes(monkeypatch):
    """Evaluation reuses the rebuilt W; an optimizer step, load_state_dict or a training forward invalidates it."""
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(48, 96), [4, 2, 3, 4], [4, 3, 2, 2])
    rebuilds = []
    original = MPOLinear.to_matrix
    monkeypatch.setattr(MPOLinear, "to_matrix", lambda self: rebuilds.append(1) or original(self))
    x = torch.randn(5, 48)
    with torch.no_grad():
        first, again = layer(x), layer(x)
    assert len(rebuilds) == 1 and torch.equal(first, again)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    layer(x).square().sum().backward()  # a training forward rebuilds with autograd and drops the cache
    assert len(rebuilds) == 2 and layer._cached_weight is None
    optimizer.step()
    with torch.no_grad():
        after_step = layer(x)
        assert len(rebuilds) == 3 and not torch.allclose(after_step, first)
        assert torch.equal(after_step, F.linear(x, original(layer), layer.bias))  # the new W, not the stale one
        layer(x)
        assert len(rebuilds) == 3  # reused again
        layer.load_state_dict({k: v * 0.5 if k.startswith("tensors.0") else v for k, v in layer.state_dict().items()})
        assert torch.allclose(layer(x) - layer.bias, (after_step - layer.bias) * 0.5, atol=1e-5)
        assert len(rebuilds) == 4
        with torch.autocast("cpu", dtype=torch.bfloat16):  # another autocast state: its own rebuild
            assert layer(x).dtype == torch.bfloat16
        assert len(rebuilds) == 5
    frozen = MPOLinear.from_linear(nn.Linear(48, 96), [4, 2, 3, 4], [4, 3, 2, 2]).freeze(central=True, aux=True)
    frozen(x), frozen(x)  # grad mode on, but nothing trains (a frozen teacher): reused too
    assert len(rebuilds) == 6


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adamw", "loop-adamw"])
def test_graph_free_w_is_never_stale_after_any_optimizer_step(fused):
    """backward -> graph-free forward (caches W) -> optimizer step -> graph-free forward must see the new W. The
    fused AdamW writes the tensors without moving their version counters; the cache also keys on a count of
    optimizer steps, so both kernels give the rebuilt W's output exactly."""
    torch.manual_seed(0)
    layer = MPOLinear.from_linear(nn.Linear(48, 96), [4, 2, 3, 4], [4, 3, 2, 2])
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=fused, foreach=False if not fused else None)
    x = torch.randn(5, 48)
    layer(x).square().sum().backward()
    with torch.no_grad():
        before = layer(x)
    versions = [t._version for t in layer.tensors]
    optimizer.step()
    assert ([t._version for t in layer.tensors] == versions) == fused  # the trap: fused moves no counter
    with torch.no_grad():
        after = layer(x)
        assert not torch.allclose(after, before)
        assert torch.equal(after, F.linear(x, layer.to_matrix(), layer.bias))


def test_mpo_linear_bf16_autocast_keeps_fp32_master_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 128)
    layer = MPOLinear.from_linear(linear, [8, 1, 16], [8, 1, 8])
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in layer.tensors)
    assert rel(y.float(), linear(x).detach()) < 3e-2
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in layer.tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # export inside an autocast region stays exact fp32
        dense = layer.to_linear()
    assert dense.weight.dtype == torch.float32 and torch.equal(dense.weight, layer.to_matrix().detach())


def test_train_flags_and_counts():
    model = tiny_bert()
    total = count_params(model)["train"]
    overparameterize(model, n=3, train_central=False)
    layers = mpo_layers(model)
    for layer in layers.values():
        assert [t.requires_grad for t in layer.tensors] == [k != layer.central_index for k in range(3)]
    central = sum(layer.tensors[layer.central_index].numel() for layer in layers.values())
    added = sum(layer.num_mpo_params - layer.num_dense_params for layer in layers.values())
    assert count_params(model) == {"train": total + added - central, "inference": total}


# ------------------------------------------------------------------------------------------ config & validation
def test_apply_decomposition_kinds_and_string_keys():
    model = tiny_bert()
    assert apply_decomposition(model, kind="none") is model and not mpo_layers(model)
    apply_decomposition(model, kind="svd", factors={"48": [8, 6], "96": [12, 8]})
    assert all(layer.n == 2 for layer in mpo_layers(model).values())
    assert model.bert.encoder.layer[0].intermediate.dense.row_factors == [12, 8]

    model = tiny_bert()
    apply_decomposition(model, kind="mpo", n=4, factors={96: [4, 1, 1, 24]}, layout="ends",
                        align={"weight": 0.0})
    ffn = model.bert.encoder.layer[0].intermediate.dense
    assert (ffn.row_factors, ffn.col_factors) == ([4, 1, 1, 24], [8, 1, 1, 6])
    with pytest.raises(ConfigError, match="kind=svd means n=2"):
        apply_decomposition(tiny_bert(), kind="svd", n=3)
    with pytest.raises(ConfigError, match="unknown"):
        apply_decomposition(tiny_bert(), kind="tucker")
    with pytest.raises(ConfigError, match="needs n"):
        apply_decomposition(tiny_bert(), kind="mpo")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(factors={48: [5, 10], 96: [12, 8]}), "multiply to 50 but the dimension is 48"),
    (dict(factors={48: [8, 6], 96: [4, 4, 6]}), "different lengths"),
    (dict(n=1), "n=1 must be an integer >= 2"),
    (dict(n=3, targets=["nope"]), "matches no nn.Linear"),
    (dict(n=3, targets=["encoder"]), "matches no nn.Linear"),
    (dict(n=3, max_bond=0), "max_bond=0"),
    (dict(factors={48: [8, 6]}), "no factors for dimension 96"),
    (dict(n=3, factors={48: [8, 6]}), "has 2 entries but n=3"),
    (dict(n=3, layout="zigzag"), "layout"),
    (dict(n=3, targets=["re:(unclosed"]), "regular expression"),
])
def test_bad_input_raises_before_anything_changes(kwargs, needle):
    model = tiny_bert()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=needle) as info:
        overparameterize(model, **kwargs)
    assert "\n" not in str(info.value)
    assert not mpo_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_target_patterns_glob_suffix_and_regex():
    model = tiny_bert()
    assert list(match_targets(model, ["query"])) == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert list(match_targets(model, "re:bert\\.encoder\\.layer\\.1\\..*\\.dense")) == [
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.intermediate.dense",
        "bert.encoder.layer.1.output.dense"]
    assert "bert.pooler.dense" not in match_targets(model, None)
    overparameterize(model, n=2, targets=["layer.0.*.query"])
    assert list(mpo_layers(model)) == ["bert.encoder.layer.0.attention.self.query"]
    with pytest.raises(ConfigError, match="already MPO layers"):
        overparameterize(model, n=2, targets=["layer.0.*.query"])
    with pytest.raises(ConfigError, match="cannot infer default MPO targets"):
        overparameterize(nn.Sequential(nn.Linear(4, 4)), n=2)


def test_balanced_and_end_factors():
    assert balanced_factors(768, 5) == [4, 4, 4, 4, 3]
    assert balanced_factors(3072, 5) == [8, 6, 4, 4, 4]
    assert balanced_factors(768, 2) == [32, 24]
    assert balanced_factors(7, 3) == [7, 1, 1]
    assert balanced_factors(1, 2) == [1, 1]
    for dim in (2, 12, 30, 97, 100, 384, 1536, 4096, 30522):
        for n in (2, 3, 5, 7):
            facs = balanced_factors(dim, n)
            assert len(facs) == n and facs == sorted(facs, reverse=True)
            assert torch.tensor(facs).prod().item() == dim
    assert end_factors(768, 5) == [32, 1, 1, 1, 24] and end_factors(3072, 5) == [64, 1, 1, 1, 48]
    assert end_factors(512, 2) == [32, 16] and end_factors(97, 3) == [97, 1, 1]
