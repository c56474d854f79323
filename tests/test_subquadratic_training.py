"""The training stages and the runner task of the subquadratic students, on a tiny random GQA Llama."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from opdf_exp.data.lm import pack_blocks, parse_splits, split_blocks
from opdf_exp.errors import ConfigError
from opdf_exp.lit.subquadratic import (AttentionTransferModule, EndToEndKDModule, HiddenAlignmentModule, TeacherWalk,
                                       kd_losses)
from opdf_exp.models.causal_lm import tiny_llama
from opdf_exp.subquadratic import convert
from tests.helpers.hydra import compose_job


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(num_hidden_layers=3)[0]


def test_teacher_walk_reproduces_hf_hidden_states(teacher):
    ids = torch.randint(1, 256, (2, 12))
    with torch.no_grad():
        ref = teacher(ids, output_hidden_states=True).hidden_states  # (L + 1) x (B, T, D); the last is normed
        walk = TeacherWalk(teacher, ids, None)
        h = walk.hidden
        for idx in range(3):
            torch.testing.assert_close(h, ref[idx], rtol=1e-5, atol=1e-5)
            h = walk.layer_output(idx, h)
        torch.testing.assert_close(teacher.model.norm(h), ref[3], rtol=1e-5, atol=1e-5)  # target is pre-norm


def test_stage_modules_train_the_right_parameters(teacher):
    student = convert(teacher, "gla", attention_layers=[1])
    stage1 = AttentionTransferModule(student, teacher, target="matrix")
    mixer_ids = {id(p) for m in student.mixers().values() for p in m.parameters()}
    assert {id(p) for p in stage1.trainable_parameters()} == mixer_ids
    batch = {"input_ids": torch.randint(1, 256, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    loss = stage1.layer_losses(batch, backward=True)
    assert loss > 0 and all(p.grad is not None for m in student.mixers().values() for p in m.q_proj.parameters())
    assert all(p.grad is None for p in student.model.layers[0].mlp.parameters())
    assert HiddenAlignmentModule(student, teacher).layer_losses(batch, backward=False) > 0
    # a student converted with the teacher's attention everywhere aligns exactly (hidden alignment of the identity)
    same = convert(teacher, "transformer")
    assert HiddenAlignmentModule(same, teacher).layer_losses(batch, backward=False) < 1e-4
    lolcats = AttentionTransferModule(convert(teacher, "linear_attention", feature_map="hedgehog"), teacher,
                                      freeze_copied=True)  # LoLCATs: feature maps (and the norm) only
    kept = {n for m in lolcats.mixer_layers.values() for n, p in m.named_parameters()
            if any(p is q for q in lolcats.trainable_parameters())}
    assert kept and all(not n.startswith(("q_proj", "k_proj", "v_proj", "o_proj")) for n in kept)
    assert any(n.startswith("feature_q.") for n in kept)
    with pytest.raises(ConfigError, match="freeze_copied=true has nothing to train: linear_attention"):
        AttentionTransferModule(convert(teacher, "linear_attention", feature_map="identity", output_norm=False),
                                teacher, freeze_copied=True).trainable_parameters()
    kd = EndToEndKDModule(student, teacher, freeze=["mlp", "embeddings"])
    names = {id(p) for p in kd.trainable_parameters()}
    assert id(student.model.embed_tokens.weight) not in names
    assert id(student.model.layers[0].mlp.up_proj.weight) not in names


def test_stage_errors_are_one_line(teacher):
    with pytest.raises(ConfigError, match="target=matrix needs a mixing-matrix form, which metala"):
        AttentionTransferModule(convert(teacher, "metala"), teacher, target="matrix")
    with pytest.raises(ConfigError, match="freezable parts"):
        EndToEndKDModule(convert(teacher, "gla"), teacher, freeze=["attention"])
    with pytest.raises(ConfigError, match="sums to 0.9"):
        parse_splits("0.5|0.2|0.2")
    with pytest.raises(ConfigError, match="3 non-negative shares"):
        parse_splits("0.5|0.5")


def test_kd_losses_reductions():
    s, t = torch.randn(2, 9, 11), torch.randn(2, 9, 11)
    ids = torch.randint(0, 11, (2, 9))
    ce, kl, n = kd_losses(s, t, ids, None)
    _, kl_sum, _ = kd_losses(s, t, ids, None, kl_reduction="batchmean")
    assert n == 16 and torch.allclose(kl_sum, kl * 8)  # batchmean sums the 8 positions, divides by B only
    _, kl_t2, _ = kd_losses(s, t, ids, None, temperature=2.0)
    assert kl_t2 > 0 and ce > 0


def test_blocks_split_by_document_and_stage_slices():
    docs = [(f"doc{i}", "word " * 50) for i in range(40)]
    blocks = pack_blocks(docs, lambda s: list(s.encode()), 0, 16, held_out_fraction=0.25, seed=0)
    assert not set(blocks.train_docs) & set(blocks.held_out_docs) and blocks.held_out_docs
    slices = split_blocks(blocks.train, parse_splits("0|0.25|0.75"))
    assert slices["attention_transfer"].shape[0] == 0
    assert sum(v.shape[0] for v in slices.values()) == blocks.train.shape[0]


def test_subquadratic_task_end_to_end(tmp_path):
    from opdf_exp.runner.app import run_task

    overrides = ["task=subquadratic", "teacher=tiny_llama", "student=subquadratic/mlstm", "data=lm_bbc",
                 "callbacks=none", "trainer=cpu", "trainer.max_steps=-1", "trainer.enable_progress_bar=false",
                 "logger=none", "data.max_train_tokens=3000", "data.block_size=32", "data.batch_size=4",
                 "task.stages.splits=0.2|0.2|0.6", "task.stages.attention_transfer.target=matrix",
                 "task.evaluation.max_blocks=2", "task.evaluation.throughput.prompt_len=16",
                 "task.evaluation.throughput.decode_steps=2", "task.evaluation.passkey.context_tokens=[64]",
                 "task.evaluation.passkey.trials=1", "task.evaluation.mqar.trials=1", "optimized_metric=null",
                 "student.attention_layers=auto:1", "student.rope=true"]  # RoPE through stage 1's matrix target
    with compose_job(overrides, tmp_path) as cfg:
        run_task(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["status"] == "complete"
    assert all(result["stages"][s]["steps"] > 0 for s in ("attention_transfer", "hidden_alignment", "end_to_end"))
    m = result["metrics"]
    for key in ("perplexity", "kl_per_token", "params", "prefill_tokens_per_s", "decode_tokens_per_s",
                "state_bytes_T512", "state_bytes_T4096", "passkey_acc_64", "mqar_acc"):
        assert f"student/{key}" in m
    assert m["teacher/state_bytes_T4096"] == 8 * m["teacher/state_bytes_T512"]
    assert m["student/state_bytes_T512"] < m["student/state_bytes_T4096"]  # the hybrid's attention layer grows
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert reloaded.config.attention_layers == result["attention_layers"] and len(result["attention_layers"]) == 1
    assert reloaded.config.mixer_options.get("rope") is True and all(m.rope for m in reloaded.mixers().values())
    # both hybrid criteria are reported: worst stage-1 fidelity (the one used by auto:K) and KL increase
    assert set(result["hybrid_picks"]) == {"fidelity", "kl"} and len(result["hybrid_picks"]["kl"]) == 1
    assert result["hybrid_picks"]["fidelity"] == result["attention_layers"]
    assert set(result["layer_kl_increase"]) == {"0", "1"} and all(v > 0 for v in result["layer_kl_increase"].values())
    assert set(result["layer_fidelity"]) == {"0", "1"} and (tmp_path / "layer_fidelity.md").exists()


def test_hybrid_chooser_by_kl_increase_and_its_bad_input(teacher):
    """auto_kl:K ranks layers by the KL to the teacher when each alone is linearised (its stage-1 mixer, every
    other layer the teacher's attention); a layer whose mixer is nonsense costs the most."""
    from opdf_exp.runner.subquadratic_task import layer_kl_increase, parse_attention_layers

    assert parse_attention_layers("auto_kl:2", 2) == ([], 2, "kl")
    assert parse_attention_layers("auto:1", 2) == ([], 1, "fidelity")
    for bad, message in (("auto_kl:3", "K must be in 1..2"), ("auto_kl:0", "K must be in 1..2"),
                         ("best:1", "use a list of layer indices, auto:K")):
        with pytest.raises(ConfigError, match=message):
            parse_attention_layers(bad, 2)
    student = convert(teacher, "gla")
    with torch.no_grad():  # break layer 1's mixer
        for p in student.mixers()[1].parameters():
            p.mul_(25.0)
    blocks = torch.randint(1, 256, (2, 16))
    kl = layer_kl_increase(student, teacher, blocks, lambda layers: convert(teacher, "gla", attention_layers=layers))
    layers = teacher.config.num_hidden_layers
    assert set(kl) == set(range(layers)) and all(v > 0 for v in kl.values())
    assert max(kl, key=kl.get) == 1


def test_hub_defaults_fail_fast_offline(tmp_path, monkeypatch):
    from opdf_exp.errors import OfflineError
    from opdf_exp.runner.subquadratic_task import _hub_documents, load_teacher

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with compose_job(["+experiment=subquadratic_lm"], tmp_path) as cfg:
        with pytest.raises(OfflineError, match="teacher.name_or_path"):
            load_teacher(cfg.teacher, str(tmp_path))
        with pytest.raises(OfflineError, match="subquadratic_cpu"):
            _hub_documents(cfg.data)


def test_teacher_stays_in_eval_mode(teacher):
    module = HiddenAlignmentModule(convert(teacher, "retnet"), teacher)
    module.train()
    assert module.student.training and not module.teacher.training


def test_transformer_student_runs_the_same_pipeline(tmp_path):
    """... and the LM-objective options through the shipped config: sequence-level KD data (cached), JSD in
    chunks through the LM heads, half the stage-3 batches on-policy."""
    import csv
    import types

    from opdf_exp.lit.subquadratic import EndToEndKDModule
    from opdf_exp.runner.app import run_task

    overrides = ["task=subquadratic", "teacher=tiny_llama", "student=transformer", "data=lm_bbc", "callbacks=none",
                 "trainer=cpu", "trainer.max_steps=-1", "trainer.enable_progress_bar=false", "logger=csv",
                 "trainer.log_every_n_steps=1",
                 "data.max_train_tokens=2000", "data.block_size=32", "data.batch_size=4", "optimized_metric=null",
                 "task.stages.splits=0.3|0.3|0.4", "task.evaluation.teacher=false", "task.evaluation.max_blocks=1",
                 "task.evaluation.throughput={}", "task.evaluation.passkey.context_tokens=[]", "task.evaluation.mqar={}",
                 "task.save_student=false", "data.sequence_kd.enabled=true", "data.sequence_kd.prompt_tokens=8",
                 "task.stages.end_to_end.divergence=jsd", "task.stages.end_to_end.chunk_size=16",
                 "task.stages.end_to_end.on_policy=0.5", "task.stages.hidden_alignment.train=mixers"]
    with compose_job(overrides, tmp_path) as cfg:
        run_task(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["stages"]["attention_transfer"]["skipped"] == "no token-mixer layers"
    assert result["stages"]["hidden_alignment"]["train"] == "all"  # no mixers: its fresh attention must train
    assert result["stages"]["end_to_end"]["steps"] > 0
    assert list((tmp_path / "cache" / "sequence_kd").glob("*.safetensors"))
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).open()))
    shares = {int(r["step"]): float(r["end_to_end/train/on_policy"]) for r in rows
              if r.get("end_to_end/train/on_policy")}
    coin = EndToEndKDModule.on_policy_step  # a coin per step, from the step number alone
    assert shares and all(v == float(coin(types.SimpleNamespace(hparams={"on_policy": 0.5}), step))
                          for step, v in shares.items())
    assert 0 < sum(shares.values()) < len(shares)
    assert any(r.get("end_to_end/train/jsd") for r in rows)


@pytest.mark.parametrize("decomposition,attention_layers", [("mpo", []), ("svd", [1])])
def test_subquadratic_task_with_mpo_exports_dense(tmp_path, decomposition, attention_layers):
    """decomposition=mpo: MPO during stage 3 only (mixer + MLP matrices, with tensor alignment on the MLPs, the
    mixers skipped), contracted to dense before evaluation; the saved student reloads with the dense count."""
    from opdf_exp.runner.app import run_task

    overrides = ["task=subquadratic", "teacher=tiny_llama", "student=subquadratic/gla", "data=lm_bbc",
                 "callbacks=none", "trainer=cpu", "trainer.max_steps=-1", "trainer.enable_progress_bar=false",
                 "logger=none", "data.max_train_tokens=1500", "data.block_size=32", "data.batch_size=4",
                 "optimized_metric=null", "task.stages.splits=0|0|1", "task.evaluation.teacher=false",
                 "task.evaluation.max_blocks=1", "task.evaluation.throughput={}",
                 "task.evaluation.passkey.context_tokens=[]", "task.evaluation.mqar={}",
                 "task.stages.end_to_end.max_steps=6", "task.num_threads=1", f"decomposition={decomposition}",
                 f"student.attention_layers={attention_layers}"]
    with compose_job(overrides, tmp_path) as cfg:
        run_task(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    dec = result["decomposition"]
    assert dec["kind"] == decomposition and result["stages"]["end_to_end"]["steps"] > 0
    # a GLA layer: q/k/v/o, gk_proj (2), g_proj and the 3 MLP matrices; a kept attention layer: q/k/v/o and the
    # MLP; never embeddings or the head. The MLPs and kept attention align with the teacher, the mixers cannot
    kept = len(attention_layers)
    assert dec["matrices"] == (2 - kept) * 10 + kept * 7
    assert dec["align"]["layers"] == 2 * 3 + kept * 4 and dec["align"]["skipped"] > 0
    assert dec["params_train_time"] > dec["params_before"] == dec["params_dense_export"] == dec["params_inference"]
    assert dec["max_logit_diff"] < 1e-4 * max(1.0, dec["max_abs_logit"])
    assert result["params"]["student"] == dec["params_dense_export"] == result["params"]["student_inference"]
    assert result["stages"]["end_to_end"]["end_to_end/train/align"] >= 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert sum(p.numel() for p in reloaded.parameters()) == dec["params_dense_export"]
    assert not any("tensors" in name for name, _ in reloaded.named_parameters())
