"""The subquadratic recipe's newer parts on a tiny random GQA Llama (issue 16): what the later stages train (all,
mixers, peft LoRA merged back), the LoLCATs student with a sliding window through the CLI, and their bad input."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from opdf_exp.errors import ConfigError
from opdf_exp.models.causal_lm import tiny_llama
from opdf_exp.subquadratic import convert
from opdf_exp.subquadratic.adapters import merge_adapters, set_train_mode
from tests.helpers.hydra import compose_job


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(num_hidden_layers=2)[0]


def test_lora_adapters_start_neutral_train_the_right_parameters_and_merge_exactly(teacher):
    student = convert(teacher, "gla", attention_layers=[1])
    ids = torch.randint(1, 256, (2, 16))
    with torch.no_grad():
        before = student(ids).logits
    keys = set(student.state_dict())
    counts = set_train_mode(student, "lora", {"r": 4, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert counts["adapter"] > 0 and counts["trainable"] < counts["total"] / 2
    assert any("mixer.q_proj.lora_A" in n for n in trainable) and any("mlp.down_proj.lora_B" in n for n in trainable)
    assert any(n.endswith("mixer.g_proj.weight") for n in trainable)        # the mixer's own gate trains fully
    assert not any(n.endswith("mixer.q_proj.base_layer.weight") for n in trainable)  # the copied weight does not
    assert not any("layers.1.self_attn.q_proj.base_layer.weight" in n for n in trainable)  # kept attention: adapter only
    assert not any("embed_tokens" in n or "up_proj" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, before)  # LoRA's B starts at zero
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted = student(ids).logits
    assert (adapted - before).abs().max() > 1e-2
    assert merge_adapters(student) == 6  # q and v of the mixer and of the kept attention, both MLPs' down_proj
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert set(student.state_dict()) == keys and all(p.requires_grad for p in student.parameters())
    mixers_only = set_train_mode(student, "mixers")
    assert mixers_only["trainable"] == sum(p.numel() for m in student.mixers().values() for p in m.parameters())


@pytest.mark.parametrize("arch, missing", [("mamba2", ["q_proj", "k_proj", "v_proj", "o_proj"]),
                                            ("metala", ["k_proj"])])
def test_the_recipe_lora_targets_serve_families_without_attention_projections(teacher, arch, missing, caplog):
    """The recipe's one target list names the attention projections; Mamba2 has in_proj/out_proj instead and MetaLA
    no k_proj. Those names are dropped for them (one log line), their mixers train in full, and the MLPs (and the
    projections the family has) get adapters; naming only absent projections is still an error."""
    student = convert(teacher, arch)
    with caplog.at_level("INFO", logger="opdf_exp.subquadratic.adapters"):
        counts = set_train_mode(student, "lora", {"r": 2})
    assert any(f"the student has no {', '.join(missing)}" in r.getMessage() for r in caplog.records)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert counts["adapter"] > 0 and any("mlp.down_proj.lora_A" in n for n in trainable)
    for mixer in student.mixers().values():  # every mixer parameter but an adapted base weight trains
        assert all(p.requires_grad for n, p in mixer.named_parameters() if "base_layer" not in n)
    assert merge_adapters(student) > 0
    with pytest.raises(ConfigError, match=r"lora.target_modules \['k_proj'\] match no linear layer"):
        set_train_mode(convert(teacher, arch), "lora", {"target_modules": ["k_proj"]})


def test_train_mode_bad_input_is_one_line(teacher):
    student = convert(teacher, "gla")
    with pytest.raises(ConfigError, match=r"lora.target_modules \['qkv'\] match no linear layer of the student; "
                                          r"its linear layers are named .*down_proj.*q_proj"):
        set_train_mode(student, "lora", {"target_modules": ["qkv"]})
    with pytest.raises(ConfigError, match=r"train='some' is unknown; use one of \['all', 'mixers', 'lora'\]"):
        set_train_mode(student, "some")
    with pytest.raises(ConfigError, match="this student has none"):
        set_train_mode(convert(teacher, "transformer"), "mixers")
    the_teacher = convert(teacher, "transformer", init="qkv_copy")  # the teacher control: LoRA, no mixers
    counts = set_train_mode(the_teacher, "lora", {"r": 2})
    assert counts["trainable"] == counts["adapter"] > 0


TINY = ["task=subquadratic", "teacher=tiny_llama", "data=lm_bbc", "callbacks=none", "trainer=cpu",
        "trainer.max_steps=-1", "trainer.enable_progress_bar=false", "logger=none", "data.max_train_tokens=3000",
        "data.block_size=32", "data.batch_size=4", "task.evaluation.max_blocks=2",
        "task.evaluation.throughput.prompt_len=16", "task.evaluation.throughput.decode_steps=2",
        "task.evaluation.passkey.context_tokens=[64]", "task.evaluation.passkey.trials=1",
        "task.evaluation.mqar.trials=1", "optimized_metric=null"]


def test_lolcats_student_with_window_cached_stage1_and_lora_stages_through_the_cli(tmp_path):
    """One run covers: the windowed LoLCATs student, stage 1 on a disk cache with its error curve, the calibrated
    start, stage 2 on mixers only and stage 3 with LoRA adapters merged before evaluation and saving."""
    from opdf_exp.runner.app import run_task

    overrides = TINY + ["student=subquadratic/linear_attention", "student.window=8", "task.stages.splits=0.3|0.2|0.5",
                        "task.stages.attention_transfer.cache=disk", "task.stages.attention_transfer.max_steps=12",
                        "task.stages.attention_transfer.curve_every=4", "task.stages.hidden_alignment.train=mixers",
                        "task.stages.end_to_end.train=lora", "task.stages.end_to_end.lora.r=4",
                        "task.stages.end_to_end.teacher_cache={kind: sampled, k: 16}",
                        "task.stages.curve_blocks=2", "task.stages.end_to_end.eval_every=2",
                        f"paths.cache_dir={tmp_path / 'cache'}"]
    with compose_job(overrides, tmp_path) as cfg:
        run_task(cfg)
    result = json.loads((tmp_path / "results.json").read_text())
    stages = result["stages"]
    assert result["status"] == "complete" and result["calibration"]["blocks"] == 8
    stage1 = stages["attention_transfer"]
    assert stage1["steps"] == 12 and stage1["cache"] == "disk" and stage1["tokens_seen"] == 12 * 4 * 32
    assert [p["step"] for p in stage1["curve"]] == [0, 4, 8, 12]
    assert stage1["curve"][-1]["mean"] < stage1["curve"][0]["mean"]  # attention transfer lowers the error
    assert (tmp_path / "stage1_curve.md").exists() and len(list((tmp_path / "cache" / "stage1").glob("*"))) == 2
    assert stages["hidden_alignment"]["train"] == "mixers"
    assert stages["hidden_alignment"]["params_trainable"] < stages["hidden_alignment"]["params_total"]
    assert stages["end_to_end"]["train"] == "lora" and stages["end_to_end"]["params_adapter"] > 0
    cache = stages["end_to_end"]["teacher_cache"]  # 16 sampled ids (int32) + 1 entropy (float32) per token
    assert cache["kind"] == "sampled" and cache["k"] == 16 and cache["bytes_per_token"] == 68
    assert len(list((tmp_path / "cache" / "stage3").glob("*_sampled_k16.safetensors"))) == 1
    assert stages["end_to_end"]["steps"] > 0 and stages["end_to_end"]["end_to_end/val/loss"] > 0
    curve = result["recovery_curve"]  # conversion, every stage, and every 2 stage-3 steps
    assert [p["stage"] for p in curve][:3] == ["conversion", "attention_transfer", "hidden_alignment"]
    assert curve[-1]["stage"] == "end_to_end" and sum(p["stage"] == "end_to_end" for p in curve) >= 2
    assert [p["tokens"] for p in curve] == sorted(p["tokens"] for p in curve) and (tmp_path / "recovery_curve.md").exists()
    assert curve[-1]["perplexity"] == stages["end_to_end"]["perplexity"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")  # merged: a plain student again
    assert not any("lora" in n for n in reloaded.state_dict())
    assert reloaded.config.mixer_options["window"] == 8 and all(m.window == 8 for m in reloaded.mixers().values())


def test_stage_prefix_reuse_is_exact_and_keyed_on_what_the_stages_depend_on(tmp_path):
    """task.stages.reuse: a second job with the same stages 1-2 and another stage-3 rate starts from the stored
    prefix (weights, reports, curve points, output files, generator states), and a third job identical to the
    first reproduces its every number while skipping stages 1 and 2. A fourth leaves stage 2 out
    (enabled=false, the grid's control): it reuses stage 1 and stage 3 keeps its slice. A changed stage-1
    setting misses."""
    from opdf_exp.runner.app import run_task

    common = TINY + ["student=subquadratic/gla", "student.attention_layers=auto_kl:1",
                     "task.stages.splits=0.3|0.2|0.5", "task.stages.attention_transfer.max_steps=6",
                     "task.stages.end_to_end.max_steps=3", "task.stages.end_to_end.train=lora",
                     "task.stages.end_to_end.lora.r=4", "task.stages.curve_blocks=2", "task.stages.reuse=true"]
    runs = {"first": [], "other_rate": ["task.stages.end_to_end.lr=1e-3"], "again": [],
            "no_stage2": ["task.stages.hidden_alignment.enabled=false"]}
    results = {}
    for name, extra in runs.items():
        with compose_job(common + extra, tmp_path / name, cache_dir=tmp_path / "cache") as cfg:
            run_task(cfg)
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "stages").iterdir())
    assert stored == ["attention_transfer", "hidden_alignment"]  # after every stage but the last
    first, other, again = results["first"], results["other_rate"], results["again"]
    assert "reused_from" not in first["stages"]["attention_transfer"]
    for result in (other, again):
        assert result["stages"]["hidden_alignment"]["reused_from"].split("/")[-1].startswith("hidden_alignment-")
        for stage in ("attention_transfer", "hidden_alignment"):
            assert {k: v for k, v in result["stages"][stage].items() if k != "reused_from"} == \
                first["stages"][stage]
        assert result["hybrid_picks"] == first["hybrid_picks"] and result["attention_layers"] == first["attention_layers"]
        assert (tmp_path / ("other_rate" if result is other else "again") / "stage1_curve.md").exists()
    assert again["metrics"]["student/perplexity"] == first["metrics"]["student/perplexity"]  # exact, not close
    assert again["recovery_curve"] == first["recovery_curve"]
    assert other["metrics"]["student/perplexity"] != first["metrics"]["student/perplexity"]
    control = results["no_stage2"]  # stage 2 left out: stage 1 comes from the store, stage 3 keeps its slice
    assert control["stages"]["hidden_alignment"] == {"skipped": "enabled=false",
                                                     "blocks": first["stages"]["hidden_alignment"]["blocks"]}
    assert control["stages"]["attention_transfer"]["reused_from"].split("/")[-1].startswith("attention_transfer-")
    assert control["stages"]["end_to_end"]["blocks"] == first["stages"]["end_to_end"]["blocks"]
    assert [p["stage"] for p in control["recovery_curve"]] == ["conversion", "attention_transfer", "end_to_end"]

    from opdf_exp.runner.stage_reuse import StageReuse
    stages = {"attention_transfer": {"lr": 1e-3}, "hidden_alignment": {"lr": 2e-4}, "end_to_end": {"lr": 4e-4}}
    reuse = StageReuse(tmp_path, {"teacher": "t"}, stages)
    changed = StageReuse(tmp_path, {"teacher": "t"}, {**stages, "attention_transfer": {"lr": 1e-2}})
    later = StageReuse(tmp_path, {"teacher": "t"}, {**stages, "end_to_end": {"lr": 1e-3}})
    assert reuse.key(0) != changed.key(0) and reuse.key(1) != changed.key(1)
    assert reuse.key(1) == later.key(1) and reuse.key(2) != later.key(2)
    assert reuse.key(0) != StageReuse(tmp_path, {"teacher": "u"}, stages).key(0)


@pytest.mark.parametrize("extra,message", [
    (["student=subquadratic/linear_attention", "student.window=64"],
     "student.window=64 is larger than data.block_size=32"),
    (["student=subquadratic/gla", "+student.window=8"], "student.window is defined for linear_attention"),
    (["student=subquadratic/gla", "task.stages.end_to_end.train=lora",
      "task.stages.end_to_end.lora.target_modules=[qkv]"], r"lora.target_modules \['qkv'\] match no linear layer"),
    (["student=subquadratic/gla", "task.stages.end_to_end.teacher_cache={kind: sampled}",
      "task.stages.end_to_end.divergence=reverse_kl"], "estimates forward KL on whole student logits only, not with "
                                                       "divergence=reverse_kl"),
    (["student=subquadratic/gla", "decomposition=mpo", "decomposition.align.weight=auto:0.1"],
     r"align.weight=auto:<ratio> is measured by the distillation task only"),
])
def test_recipe_bad_input_fails_before_training(tmp_path, extra, message):
    from opdf_exp.runner.app import run_task

    with compose_job(TINY + extra, tmp_path) as cfg, pytest.raises(ConfigError, match=message):
        run_task(cfg)
