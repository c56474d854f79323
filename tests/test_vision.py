"""Vision distillation with timm: the model adapter (forward_intermediates and the hook fallback), DeiT's hard
distillation and two heads, mixup batches, OPDF on ViT with a plain-timm export, students from teacher blocks,
the tiny image-folder fast dev runs of both vision experiments, and bad inputs."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import opdf_exp  # noqa: F401  (torchvision work-around before timm)
from opdf_exp.distill.adapters import ModelOutputs, TimmAdapter, adapter_for
from opdf_exp.distill.terms import HardDistillation, HiddenStateMSE, TaskLoss
from opdf_exp.errors import ConfigError
from opdf_exp.models import create_timm_classifier, load_timm, save_timm, student_from_teacher, timm_student

VIT = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)


def tiny_vit(classes: int = 5, **overrides):
    torch.manual_seed(0)
    return create_timm_classifier("vit_tiny_patch16_224", classes, **{**VIT, **overrides}).eval()


def image_folder(root, classes=("cat", "dog", "owl"), per_class=6, size=40):
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size - 4), color=(60 * c, 20 * i, 120)).save(root / split / name / f"{i}.png")
    return root


# ------------------------------------------------------------------------------------------------ adapter
def test_vit_hidden_states_from_forward_intermediates_equal_the_hook_fallback():
    model, adapter = tiny_vit(), TimmAdapter()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])}
    out = adapter.run(model, batch, hidden_states=True)
    assert len(out.hidden_states) == 4 == adapter.num_hidden(model) + 1
    assert all(h.shape == (2, 1 + 16, 32) for h in out.hidden_states)  # [CLS] first, then 4x4 patches
    hooked, (logits, _) = adapter._hooked(model, batch["pixel_values"])
    for got, ref in zip(out.hidden_states[1:], hooked):
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.logits, model(batch["pixel_values"]))
    assert adapter_for(model) is adapter_for(tiny_vit()) and adapter.hidden_width(model, 2) == 32


def test_tinyvit_stage_outputs_become_tokens():
    model = create_timm_classifier("tiny_vit_5m_224", 4, embed_dims=[16, 16, 32, 32], depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 2, 2]).eval()
    out = adapter_for(model).run(model, {"pixel_values": torch.randn(2, 3, 64, 64)}, hidden_states=True)
    # index 0: the stem's output (stage 0's input); then each stage's output, downsampled at the stage's start
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 256, 16), (2, 256, 16), (2, 64, 16), (2, 16, 32),
                                                         (2, 4, 32)]
    assert [adapter_for(model).hidden_width(model, i) for i in range(5)] == [h.shape[-1] for h in out.hidden_states]


def test_feature_mse_with_projection_between_widths():
    teacher, student = tiny_vit(), tiny_vit(embed_dim=16)
    term = HiddenStateMSE(layer_map=[[3, 3]], projection="auto")
    term.setup(student, teacher)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32)}
    ctx = SimpleNamespace(student=adapter_for(student).run(student, batch, True),
                          teacher=adapter_for(teacher).run(teacher, batch, True), attention_mask=None)
    expected = F.mse_loss(term.projections[0](ctx.student.hidden_states[3]), ctx.teacher.hidden_states[3])
    assert term(ctx).item() == pytest.approx(expected.item(), rel=1e-6)
    term(ctx).backward()
    assert term.projections[0].weight.grad is not None


# ------------------------------------------------------------------------------------------------ losses
def test_hard_distillation_and_soft_targets_by_hand():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[0.0, 4.0, 1.0], [9.0, 0.0, 0.0]])
    ctx = SimpleNamespace(student=ModelOutputs(logits=student), teacher=ModelOutputs(logits=teacher),
                          attention_mask=None, labels=torch.tensor([0, 2]))
    log_p = torch.log_softmax(student, -1)
    assert HardDistillation()(ctx).item() == pytest.approx(-(log_p[0, 1] + log_p[1, 0]).item() / 2, rel=1e-6)
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
    ctx.labels = soft
    assert TaskLoss()(ctx).item() == pytest.approx(-(soft * log_p).sum(-1).mean().item(), rel=1e-6)
    ctx.labels = torch.tensor([0, 2])
    assert TaskLoss(label_smoothing=0.1)(ctx).item() == pytest.approx(
        F.cross_entropy(student, ctx.labels, label_smoothing=0.1).item())
    # a DeiT distilled student: the hard term reads the distillation head
    ctx.student = ModelOutputs(logits=student, dist_logits=torch.zeros(2, 3))
    assert HardDistillation()(ctx).item() == pytest.approx(torch.log(torch.tensor(3.0)).item(), rel=1e-6)


def test_deit_distilled_student_gives_two_heads_in_training_and_their_mean_in_eval():
    model = create_timm_classifier("deit_tiny_distilled_patch16_224", 4, **VIT)
    adapter = adapter_for(model)
    adapter.prepare(model)
    batch = {"pixel_values": torch.randn(2, 3, 32, 32)}
    model.train()
    out = adapter.run(model, batch)
    assert out.dist_logits is not None and out.logits.shape == out.dist_logits.shape == (2, 4)
    model.eval()
    with torch.no_grad():
        eval_out = adapter.run(model, batch)
        heads = model.forward_head(model.forward_features(batch["pixel_values"]), pre_logits=False)
    assert eval_out.dist_logits is None and eval_out.logits.shape == (2, 4)
    torch.testing.assert_close(eval_out.logits, heads)


def test_mixup_batches_carry_class_probabilities(tmp_path):
    from opdf_exp.data import ImageClassificationDataModule
    from opdf_exp.data import image_folder as folder_source

    root = image_folder(tmp_path)
    dm = ImageClassificationDataModule(lambda: folder_source(str(root)), input_size=(3, 32, 32), batch_size=4,
                                       mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    assert dm.input_signature() is None  # random inputs: the teacher runs live
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].shape == (4, 3) and torch.allclose(batch["labels"].sum(-1), torch.ones(4))
    assert all(len(b["labels"]) == 4 for b in dm.train_dataloader())  # drop_last keeps the pairs
    with pytest.raises(ConfigError, match="must be even"):
        ImageClassificationDataModule(lambda: None, batch_size=5, mixup_alpha=0.8)


# ------------------------------------------------------------------------------------------------ OPDF, export
def test_timm_mpo_round_trip_exports_a_plain_timm_model(tmp_path):
    import timm
    from safetensors.torch import load_file

    from opdf_exp.mpo import MPOLinear, apply_decomposition, export_dense

    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32)
    dense_before = model(x)
    apply_decomposition(model, kind="mpo", n=3)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, MPOLinear))
    assert names == sorted(f"blocks.{b}.{p}" for b in range(3) for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"))
    over = model(x)
    torch.testing.assert_close(over, dense_before, rtol=1e-4, atol=1e-4)  # a lossless MPO of the same matrices
    export_dense(model)
    torch.testing.assert_close(model(x), over, rtol=1e-5, atol=1e-5)
    save_timm(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    plain = timm.create_model(config["architecture"], num_classes=config["num_classes"], **config["model_args"])
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))  # strict: the same keys and shapes
    torch.testing.assert_close(plain.eval()(x), over, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_timm(tmp_path)(x), over, rtol=1e-5, atol=1e-5)
    hub_style = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    torch.testing.assert_close(hub_style.eval()(x), over, rtol=1e-5, atol=1e-5)


def test_student_from_vit_blocks_records_its_depth_and_features(tmp_path):
    teacher = tiny_vit(depth=4)
    student = student_from_teacher(teacher, num_layers=2)
    assert student.opdf_create_args["kwargs"]["depth"] == 2 and len(student.blocks) == 2
    assert [f["module"] for f in student.feature_info] == ["blocks.0", "blocks.1"]
    assert adapter_for(student).num_hidden(student) == 2 and student.distill_teacher_layers == [1, 3]
    save_timm(student.eval(), tmp_path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(load_timm(tmp_path)(x), student(x))


# ------------------------------------------------------------------------------------------------ bad input
def test_vision_bad_inputs_fail_in_one_line():
    with pytest.raises(ConfigError, match="close names: .*vit_tiny_patch16_224") as error:
        create_timm_classifier("vit_tiny_patch16_22", 3)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="not a multiple of .* patch size 8; use e.g. img_size=32"):
        create_timm_classifier("vit_tiny_patch16_224", 3, img_size=30, patch_size=8)
    with pytest.raises(ConfigError, match="teacher has 5 classes"):
        timm_student(tiny_vit(5), "vit_tiny_patch16_224", num_classes=3, **VIT)
    from opdf_exp.models.timm_models import check_class_count

    with pytest.raises(ConfigError, match="teacher predicts 5 classes but the student 3"):
        check_class_count(tiny_vit(5), tiny_vit(3))


# ------------------------------------------------------------------------------------------------ jobs
VISION_TINY = ["logger=none", "print_config=false", "trainer.enable_progress_bar=false", "trainer=cpu"]


def test_vision_cpu_fast_dev_run_trains_kd_svd_opdf_students(tmp_path):
    from opdf_exp.runner.app import run_task
    from tests.helpers.hydra import compose_job

    overrides = ["+experiment=vision_cpu", *VISION_TINY, "debug=fdr", "data.module.limit_train_examples=64",
                 "data.module.limit_eval_examples=32", "teacher.model.depth=2", "student.model.num_layers=1"]
    with compose_job(overrides, tmp_path) as cfg:
        result = run_task(cfg)
    rows = {row["name"]: row for row in result["variants"]}
    assert set(rows) == {"kd", "kd_svd", "kd_opdf"}
    assert rows["kd_opdf"]["params"]["train"] > rows["kd"]["params"]["train"] == rows["kd_opdf"]["params"]["inference"]
    assert rows["kd_opdf"]["dense_export"]["max_metric_change"] < 1e-6


def test_same_module_trains_timm_students_with_hard_and_feature_kd_and_saves_plain_timm(tmp_path):
    """A fresh, narrower DeiT student with two heads; DeiT hard distillation plus feature MSE through a projection;
    a real (short) fit, then the saved student reloads with timm."""
    from opdf_exp.runner.app import run_task
    from tests.helpers.hydra import compose_job

    root = image_folder(tmp_path / "images")
    overrides = [*VISION_TINY, "data=image_folder", f"data.path={root}", "data.num_labels=3",
                 "data.module.input_size=[3,32,32]", "data.module.batch_size=6", "teacher=vit_tiny",
                 "teacher.model.img_size=32", "teacher.model.patch_size=8", "teacher.model.depth=2",
                 "teacher.model.embed_dim=32", "teacher.model.num_heads=2", "teacher.finetune.trainer.max_steps=2",
                 "student=deit_tiny_distilled", "student.model.img_size=32", "student.model.patch_size=8",
                 "+student.model.depth=2", "+student.model.embed_dim=16", "+student.model.num_heads=2",
                 "distill=deit_hard", "+distill.terms.features._target_=opdf_exp.distill.terms.HiddenStateMSE",
                 "+distill.terms.features.weight=1.0", "+distill.terms.features.layer_map=[[2,2]]",
                 "task.variants=null", "trainer.max_steps=3", "decomposition=mpo", "decomposition.n=3",
                 "decomposition.align.weight=0"]  # a narrower student has no teacher tensors of its shapes
    with compose_job(overrides, tmp_path) as cfg:
        result = run_task(cfg)
    row = result["variants"][0]
    assert row["steps"] == 3 and set(json.loads((tmp_path / "results.json").read_text())["metrics"])
    folder = tmp_path / "students" / "student"
    student = load_timm(folder)
    assert type(student).__name__ == "VisionTransformerDistilled" and student.num_classes == 3
    assert json.loads((folder / "config.json").read_text())["label_names"] == ["cat", "dog", "owl"]


def test_tinyvit_imagenet_fast_dev_run_on_a_generated_image_folder(tmp_path):
    from opdf_exp.runner.app import run_task
    from tests.helpers.hydra import compose_job

    root = image_folder(tmp_path / "imagenet", per_class=8, size=72)
    overrides = ["+experiment=tinyvit_imagenet", *VISION_TINY, "debug=fdr", f"data.path={root}",
                 "data.num_labels=3", "data.module.input_size=[3,64,64]", "data.module.batch_size=4",
                 "data.module.eval_batch_size=4", "data.module.num_workers=0",
                 "data.module.source.selection_fraction_of_train=0.25", "teacher.model.pretrained=false",
                 "task.variants.kd_svd=null"]
    with compose_job(overrides, tmp_path) as cfg:
        assert cfg.data.module.mixup_alpha == 0.8 and cfg.teacher.model.name.startswith("tiny_vit_21m")
        result = run_task(cfg)
    assert [row["name"] for row in result["variants"]] == ["kd", "kd_opdf"]


def test_tinyvit_imagenet_offline_stops_in_one_line(tmp_path):
    from tests.test_train import run_cli

    for extra, fix in (([], "set data.path="),  # the hub dataset first, then the teacher's hub weights
                       ([f"data.path={image_folder(tmp_path / 'images')}", "data.num_labels=3"],
                        "set teacher.model.checkpoint_path=")):
        proc = run_cli(["+experiment=tinyvit_imagenet", "trainer=cpu", f"hydra.run.dir={tmp_path}/run", *extra],
                       tmp_path, timeout=120, HF_HUB_OFFLINE="1")
        assert proc.returncode == 2
        last = [line for line in (proc.stdout + proc.stderr).strip().splitlines() if line.strip()][-1]
        assert last.startswith("error: ") and fix in last, last


def test_pretrained_timm_weights_offline_fail_fast_naming_the_local_option(monkeypatch):
    from opdf_exp.errors import OfflineError
    from opdf_exp.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        with pytest.raises(OfflineError, match="teacher.model.checkpoint_path=.*pretrained=false") as error:
            create_timm_classifier("tiny_vit_21m_224.dist_in22k_ft_in1k", 10, pretrained=True)
        assert "\n" not in str(error.value)
    finally:
        hub_reachable.cache_clear()


def test_top5_accuracy_reads_the_logits():
    from opdf_exp.lit.module import build_metrics

    metrics = build_metrics("single_label_classification", 6, ["acc", "acc5"])
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0, 2.0, 1.0], [9.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    labels = torch.tensor([2, 5])  # top-1 wrong for both; label 2 is 2nd of row 0, label 5 is 2nd of row 1
    for metric in metrics.values():
        metric.update(logits if getattr(metric, "reads_scores", False) else logits.argmax(-1), labels)
    values = metrics.compute()
    assert values["acc"].item() == 0.0 and values["acc5"].item() == 1.0


def test_image_size_mismatch_between_data_and_model_is_refused_before_training(tmp_path):
    from opdf_exp.runner.app import run_task
    from tests.helpers.hydra import compose_job

    overrides = ["+experiment=vision_cpu", *VISION_TINY, "debug=fdr", "data.module.input_size=[3,32,32]"]
    with compose_job(overrides, tmp_path) as cfg:
        with pytest.raises(ConfigError, match=r"teacher takes \(28, 28\) images but the data gives \(32, 32\); set "
                                              r"teacher.model.img_size=32") as error:
            run_task(cfg)
    assert "\n" not in str(error.value) and not (tmp_path / "checkpoints").exists()


def test_hub_images_offline_fail_fast(monkeypatch):
    from opdf_exp.data import hub_images
    from opdf_exp.errors import OfflineError
    from opdf_exp.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        with pytest.raises(OfflineError, match="data=image_folder with data.path"):
            hub_images("uoft-cs/cifar10-not-cached")
    finally:
        hub_reachable.cache_clear()


def test_theseus_and_lgtm_run_on_timm_models_through_the_adapter():
    from opdf_exp.distill.lgtm import lgtm_teacher_gradients
    from opdf_exp.distill.terms import LogitKL
    from opdf_exp.models.theseus import TheseusModel

    teacher = tiny_vit(depth=4)
    student = student_from_teacher(teacher, num_layers=2).eval()
    with torch.no_grad():
        for param in student.blocks.parameters():
            param.add_(0.1 * torch.randn_like(param))
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([0, 1])}
    adapter = adapter_for(student)
    never = TheseusModel(student, teacher, p0=0.0, k=0.0).train()
    with never.training_forward():  # every student block replaced by its teacher group: the teacher's function
        torch.testing.assert_close(adapter.run(student, batch).logits, teacher(batch["pixel_values"]))
    assert isinstance(student.blocks, torch.nn.Sequential) and len(student.blocks) == 2  # restored
    torch.testing.assert_close(adapter.run(student, batch).logits, student(batch["pixel_values"]))

    teacher.requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    kd = LogitKL(temperature=1.0, t2_scaling=False)
    grads = lgtm_teacher_gradients(
        student, teacher, batch, batch["labels"], batch, batch["labels"],
        student_objective=lambda s, t: kd(SimpleNamespace(student=s, teacher=t, attention_mask=None)),
        student_optimizer=optimizer, teacher_lr=1e-3, teacher_alpha=0.5, temperature=1.0)
    assert len(grads) == len(list(teacher.parameters())) and all(g is not None for g in grads)


def test_null_data_config_entries_come_from_the_teacher(tmp_path):
    from opdf_exp.data import ImageClassificationDataModule
    from opdf_exp.data import image_folder as folder_source

    root = image_folder(tmp_path)
    dm = ImageClassificationDataModule(lambda: folder_source(str(root)), input_size=None, mean=None, std=None,
                                       interpolation=None, crop_pct=None, train_augment=False, batch_size=4)
    resolved = dm.adopt_model_data_config(tiny_vit())  # a ViT rebuilt at 32x32 (its pretrained cfg says 224)
    assert resolved["input_size"] == (3, 32, 32) and resolved["mean"] == (0.5, 0.5, 0.5)
    assert resolved["interpolation"] == "bicubic" and resolved["crop_pct"] == 0.9
    assert next(iter(dm.train_dataloader()))["pixel_values"].shape == (4, 3, 32, 32)
