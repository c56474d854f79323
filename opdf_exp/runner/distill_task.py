"""The distillation task: fine-tune (or load) a teacher, then train one or more students against it.

Stages of one job, in order:
1. data: load splits and the tokenizer (bad paths, missing columns and an offline hub fail here, in seconds);
2. teacher: build it and fine-tune it on the task, or reuse a cached fine-tune with the same config;
3. students: for each variant, build the student, apply the decomposition (OPDF), assemble the loss, train,
   evaluate, contract MPO layers back to dense and save a ``from_pretrained``-loadable folder.

A *variant* is a named list of overrides in command-line syntax (``[decomposition=mpo]``) applied on top of this
job's own overrides, so a comparison table reuses one teacher and one config language.

Resuming: with ``resume=auto`` (the default) every stage that finds its own ``checkpoints/<stage>/last.ckpt`` in
the job folder continues from it (a stage that had finished ends at once and is re-evaluated), so a relaunched
sweep ends with the same metrics as an uninterrupted one. Only global rank zero writes files.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from opdf_exp.data.glue_tasks import check_problem_type
from opdf_exp.distill.loss import DistillationLoss
from opdf_exp.distill.methods import DistillMethod, create_method
from opdf_exp.distill.terms import TaskLoss, TensorAlignment
from opdf_exp.errors import ConfigError
from opdf_exp.hub import resolve_model_path
from opdf_exp.lit.module import DistillationModule
from opdf_exp.models.io import save_model, store_label_names, stored_label_names
from opdf_exp.models.layers import freeze_parameters
from opdf_exp.models.timm_models import check_class_count, check_input_size
from opdf_exp.runner import app
from opdf_exp.runner.app import config_digests, job_overrides, previous_result, without_neutral_additions
from opdf_exp.runner.checks import align_weight, check_job_config, check_lr_scale_has_effect, check_model_shapes
from opdf_exp.runner.loggers import add_wandb_tags, build_loggers, log_final
from opdf_exp.runner.report import ONE_CLASS_SHARE
from opdf_exp.runner.trainer import build_trainer, train_seconds, trainer_world_size
from opdf_exp.utils.distributed import is_global_zero
from opdf_exp.utils.io import atomic_folder, atomic_write_json, json_digest
from opdf_exp.utils.tables import write_table

log = logging.getLogger(__name__)
TEACHER_PREFIX = "teacher/"


# ----------------------------------------------------------------------------------------------- helpers
def _evaluate(trainer: pl.Trainer, module: pl.LightningModule, datamodule) -> dict[str, float]:
    """Validation and test metrics of the best checkpoint (the current weights when none was saved)."""
    callback = trainer.checkpoint_callback
    ckpt = "best" if callback is not None and callback.best_model_path else None
    metrics: dict[str, float] = {}
    for result in trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
        metrics.update(result)
    for result in trainer.test(module, datamodule=datamodule, ckpt_path=ckpt, verbose=False):
        metrics.update(result)
    return {k: float(v) for k, v in metrics.items() if "/loss" not in k or k.endswith("val/loss")}


def _save_last(trainer: pl.Trainer) -> None:
    """Lightning writes ``last.ckpt`` only at validation time; re-write it at the end of training so that
    ``ckpt_path=.../last.ckpt`` resumes from the true final step."""
    callback = trainer.checkpoint_callback
    if trainer.lightning_module is None:  # never fitted (train=false): there is no training state to save
        return
    if callback is not None and callback.save_last and callback.dirpath and not trainer.fast_dev_run:
        # weights_only=False *saves* the full training state (optimizer, loops, callbacks) for resuming
        trainer.save_checkpoint(os.path.join(callback.dirpath, f"{callback.CHECKPOINT_NAME_LAST}.ckpt"),
                                weights_only=False)


def _save_pretrained_atomic(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """Save to a temporary sibling folder, then swap it into place (rank zero only)."""
    if not is_global_zero():
        return
    with atomic_folder(folder) as tmp, _quiet_hf_progress():
        save_model(model, tmp, tokenizer)  # save_pretrained, or timm's folder layout


@contextlib.contextmanager
def _quiet_hf_progress():
    """No "Writing model shards" / "Loading weights" bars from transformers inside a job's log."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def student_params(student: torch.nn.Module, loss: torch.nn.Module) -> dict[str, int]:
    """``train``: trainable parameters during distillation (MPO tensors and loss projections included);
    ``inference``: parameters of the deployed student after MPO layers are contracted back to dense."""
    from opdf_exp.mpo import count_params

    counts = count_params(student)
    return {"train": int(counts["train"]) + _count(loss, trainable_only=True), "inference": int(counts["inference"])}


def _optim_kwargs(optim: DictConfig) -> dict[str, Any]:
    return {k: (tuple(v) if k == "betas" else v) for k, v in OmegaConf.to_container(optim, resolve=True).items()}


def _mpo_optim_kwargs(decomposition: DictConfig) -> dict[str, Any]:
    """The MPO group's rate scale and decay (``decomposition.lr_scale``, ``decomposition.weight_decay``); a dense
    student has no MPO group, so its variant trains as the others whatever the job-level setting."""
    if decomposition.kind == "none":
        return {}
    scale = decomposition.get("lr_scale", 1)
    align = decomposition.get("align") or {}
    return {"mpo_lr_scale": "auto" if str(scale) == "auto" else float(scale),
            "mpo_weight_decay": float(decomposition.get("weight_decay", 0.0)),
            "align_weight_ratio": align_weight(align.get("weight", 0))[1]}


# ----------------------------------------------------------------------------------------------- teacher
def _teacher_cache_key(cfg: DictConfig) -> str:
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    for volatile in ("default_root_dir", "enable_progress_bar", "log_every_n_steps", "enable_model_summary"):
        trainer.pop(volatile, None)
    return json_digest({"teacher": OmegaConf.to_container(cfg.teacher, resolve=True),
                        "data": OmegaConf.to_container(cfg.data, resolve=True), "trainer": trainer,
                        "seed": _teacher_seed(cfg)})


def _teacher_seed(cfg: DictConfig) -> int:
    """``teacher.seed`` pins the teacher's fine-tune to one seed, so a sweep over ``seed`` varies only the students
    (every seed distils the same teacher); null: the job's seed."""
    seed = cfg.teacher.get("seed")
    return int(cfg.seed if seed is None else seed)


def prepare_teacher(cfg: DictConfig, datamodule, loggers: list) -> tuple[torch.nn.Module, dict[str, float], dict]:
    """Build the teacher; fine-tune it on the task (or reuse a cached fine-tune); return it with its metrics.

    Concurrent jobs of a sweep (joblib, SLURM arrays) that need the same fine-tune build it once: the first takes
    a file lock on the cache entry and the others wait, then load it. The entry is written to a temporary folder
    and ``teacher.json`` last, so a job killed while building leaves nothing a later job would trust (and the OS
    releases its lock). Distributed jobs skip the lock: their ranks must enter the fit together.
    """
    finetune = cfg.teacher.finetune
    cache = Path(cfg.paths.cache_dir) / "teachers" / _teacher_cache_key(cfg)
    use_cache = bool(finetune.enabled and finetune.cache and not cfg.trainer.get("fast_dev_run"))
    if use_cache and trainer_world_size(cfg.trainer) == 1:
        from filelock import FileLock

        cache.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache) + ".lock"):
            return _prepare_teacher(cfg, datamodule, loggers, cache, use_cache)
    return _prepare_teacher(cfg, datamodule, loggers, cache, use_cache)


UNINFORMATIVE_MARGIN = 0.01  # nats: a teacher whose validation loss is within this of a constant's tells nothing


def constant_prediction_loss(labels: Sequence[int]) -> float:
    """The cross-entropy of the best constant prediction (the class shares themselves) on ``labels``: their
    entropy, in nats."""
    counts = Counter(int(label) for label in labels)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def teacher_warnings(metrics: dict[str, float], validation_labels: Sequence[int] | None = None,
                     problem_type: str = "single_label_classification") -> list[str]:
    """One line per sign that a fine-tuned classifier teacher learned nothing, each naming the fix.

    Why: a teacher fine-tune that fails still yields a checkpoint, and its accuracy on the split it was selected
    on looks like a score. The MiniLM-L6 teacher on RTE at the study's first recipe ended at validation loss ln 2
    to six digits (its two logits equal on every pair, its argmax noise: 62.6 on the selection half, 49.3 on the
    report half); every student then distils a constant. Two signs: predictions (nearly) all in one class
    (``teacher/<split>/majority_share`` >= ``report.ONE_CLASS_SHARE``, the report's one-class threshold), and a
    validation loss no lower than the best constant prediction's (the entropy of the validation labels)."""
    fix = "fine-tune it longer or at another rate (teacher.finetune.optim.lr, teacher.finetune.trainer.*)"
    out = []
    collapsed = [key.split("/")[1] for key, value in sorted(metrics.items())
                 if key.startswith(TEACHER_PREFIX) and key.endswith("/majority_share") and value >= ONE_CLASS_SHARE]
    if collapsed:
        out.append(f"the teacher predicts one class on >= {round(100 * ONE_CLASS_SHARE)}% of its "
                   f"{' and '.join(collapsed)} split(s): its students distil a constant; {fix}")
    loss = metrics.get(f"{TEACHER_PREFIX}val/loss")
    if problem_type == "single_label_classification" and loss is not None and validation_labels:
        constant = constant_prediction_loss(validation_labels)
        if loss >= constant - UNINFORMATIVE_MARGIN:
            out.append(f"the teacher's validation loss {loss:.4f} is no lower than a constant prediction's "
                       f"({constant:.4f}, the entropy of the validation labels): its students distil noise; {fix}")
    return out


def _check_image_input(model_cfg: DictConfig, datamodule, role: str) -> None:
    """Before the teacher trains: the data-config entries left null come from the timm teacher (its normalisation,
    interpolation, crop, image size), and a model built for another image size than the data's is refused in one
    line. The model is built once here, on the CPU, without weights."""
    if not getattr(datamodule, "data_config", None) or "create_timm_classifier" not in str(model_cfg.get("_target_")):
        return
    args = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items()
            if k not in ("_target_", "pretrained", "checkpoint_path")}
    from opdf_exp.models.timm_models import create_timm_classifier

    model = create_timm_classifier(**args)
    log.info("image inputs: %s", datamodule.adopt_model_data_config(model))
    check_input_size(model, datamodule.data_config["input_size"], role)


def _glue_task_name(cfg: DictConfig) -> str | None:
    from opdf_exp.data.glue_tasks import glue_task

    try:
        return glue_task(str(cfg.data.get("name", ""))).name
    except ConfigError:
        return None


def apply_label_mapping(model: torch.nn.Module, splits) -> None:
    """Store the task's fixed label order in the model config (``id2label``/``label2id``; timm:
    ``pretrained_cfg['label_names']``), so every saved teacher and student says which output is which class."""
    if splits.problem_type == "regression" or not splits.label_names:
        return
    store_label_names(model, [str(v) for _, v in sorted(splits.id2label.items())])


def check_teacher_labels(cfg: DictConfig, teacher: torch.nn.Module, splits) -> None:
    """A teacher fine-tuned elsewhere must use the task's label order (MNLI's entailment/neutral/contradiction
    order differs between public checkpoints); refuse it in one line otherwise."""
    task = _glue_task_name(cfg)
    if task is not None:
        from opdf_exp.data.glue_tasks import check_label_mapping

        check_label_mapping(task, teacher.config)
        return
    names = stored_label_names(teacher)
    expected = [str(v) for _, v in sorted(splits.id2label.items())] if splits.label_names else []
    generic = all(n.upper().startswith("LABEL_") for n in names)
    if expected and names and not generic and [n.lower() for n in names] != [n.lower() for n in expected]:
        raise ConfigError(f"the teacher's id2label {names} differs from the data's labels {expected}; use a teacher "
                          "fine-tuned with that order, or fine-tune it here (teacher.finetune.enabled=true)")


def _load_cached_teacher(cache: Path, cfg: DictConfig):
    from opdf_exp.models.io import load_classifier_folder

    log.info("reusing fine-tuned teacher from %s", cache)
    with _quiet_hf_progress():
        teacher = load_classifier_folder(cache / "model")
    saved = json.loads((cache / "teacher.json").read_text())
    return teacher, saved["metrics"], {**saved["info"], "cached": True, "cache_dir": str(cache)}


def _prepare_teacher(cfg: DictConfig, datamodule, loggers: list, cache: Path, use_cache: bool):
    finetune = cfg.teacher.finetune
    if use_cache and (cache / "teacher.json").is_file():
        return _load_cached_teacher(cache, cfg)
    if cfg.teacher.get("seed") is not None:  # a pinned teacher seed: the same fine-tune whatever the job's seed
        pl.seed_everything(_teacher_seed(cfg), workers=True, verbose=False)
    teacher = hydra.utils.instantiate(cfg.teacher.model)
    splits = datamodule.load_splits()
    if finetune.enabled:
        apply_label_mapping(teacher, splits)  # a fresh head learns the task's order
    else:
        check_teacher_labels(cfg, teacher, splits)  # an already fine-tuned head must already have it
    info: dict[str, Any] = {"params": {"train": 0, "inference": _count(teacher)}, "cached": False}
    freeze_parameters(teacher, finetune.get("freeze"))
    info["params"]["train"] = _count(teacher, trainable_only=True) if finetune.enabled else 0
    loss = DistillationLoss({"task": TaskLoss()}, {"task": 1.0})
    module = DistillationModule(teacher, loss, problem_type=splits.problem_type, num_labels=splits.num_labels,
                                metrics=list(cfg.data.metrics), log_prefix=TEACHER_PREFIX,
                                **_optim_kwargs(finetune.optim))
    trainer = build_trainer(cfg, "teacher", TEACHER_PREFIX, loggers, finetune.trainer if finetune.enabled else None)
    started = time.perf_counter()
    if finetune.enabled:
        trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, trainer))
        _save_last(trainer)
    info["train_time_s"] = round(train_seconds(trainer, fallback=time.perf_counter() - started), 1)
    metrics = _evaluate(trainer, module, datamodule)
    teacher = module.student
    if use_cache and is_global_zero():
        with atomic_folder(cache) as tmp, _quiet_hf_progress():
            (tmp / "model").mkdir()
            save_model(teacher, tmp / "model")
            atomic_write_json(tmp / "teacher.json", {"metrics": metrics, "info": info})  # marks the entry done
    return teacher, metrics, info


def _resume_path(cfg: DictConfig, trainer: pl.Trainer, explicit: str | None = None) -> str | None:
    """The checkpoint a stage continues from: ``explicit`` (``ckpt_path=``), else with ``resume=auto`` the
    stage's own ``last.ckpt`` left in this job folder by an interrupted run."""
    if explicit:
        return explicit
    callback = trainer.checkpoint_callback
    if str(cfg.get("resume", "auto")) != "auto" or callback is None or not callback.dirpath:
        return None
    last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}.ckpt"
    if last.is_file():
        log.info("resuming stage from %s", last)
        return str(last)
    return None


# ----------------------------------------------------------------------------------------------- students
def variant_plan(cfg: DictConfig, variants: Mapping | None) -> list[tuple[str, str, DictConfig]]:
    """``[(name, label, config)]``: each variant's overrides composed on top of this job's overrides."""
    if not variants:
        return [("student", "student", cfg)]
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    config_name = HydraConfig.get().job.config_name if HydraConfig.initialized() else "config"
    base = job_overrides()
    plan = []
    for name, spec in variants.items():
        if spec is None:  # an experiment drops a default variant with task.variants.<name>: null
            continue
        extra = list(spec.get("overrides", []) or [])
        try:
            variant_cfg = compose(config_name=config_name, overrides=base + extra)
        except Exception as error:  # Hydra's errors are multi-line; keep ours to one
            raise ConfigError(f"variant '{name}' overrides {extra} do not compose: {' '.join(str(error).split())}") from None
        plan.append((str(name), str(spec.get("label", name)), variant_cfg))
    return plan


def variant_digest(variant_cfg: DictConfig, neutral_additions: dict | None = None) -> str:
    """A hash of everything one variant's student depends on: the composed config without the other variants'
    specs (``task.variants``, ``task.primary``), so adding or editing one variant leaves the others' unchanged.
    ``neutral_additions`` (runner/app.py::NEUTRAL_ADDITIONS) gives the digest the config had before those keys."""
    digests = config_digests(variant_cfg, neutral_additions=neutral_additions)
    task = {k: v for k, v in OmegaConf.to_container(variant_cfg.task, resolve=True).items()
            if k not in ("variants", "primary")}
    if neutral_additions:
        task = without_neutral_additions("task", task, neutral_additions)
    digests["task"] = json_digest(task, 12)
    return json_digest(digests)


def same_variant(row: dict, variant_cfg: DictConfig, digest: str) -> bool:
    """Whether a stored variant row was made with this variant's config: the same digest, or the same once the
    keys added since at their neutral values are left out."""
    stored = row.get("config_digest")
    additions = app.NEUTRAL_ADDITIONS
    return stored == digest or bool(additions) and stored == variant_digest(variant_cfg, additions)


def reusable_rows(cfg: DictConfig) -> dict[str, dict]:
    """The variant rows of this folder's previous result (same overrides, config since changed: runner/app.py),
    by variant name; each is reused when its ``config_digest`` equals the variant's digest now. ``resume=never``
    reuses nothing."""
    if str(cfg.get("resume", "auto")) == "never":
        return {}
    previous = previous_result(Path(cfg.paths.output_dir), job_overrides())
    return {row["name"]: row for row in (previous or {}).get("variants", []) if row.get("config_digest")}


def build_loss(cfg: DictConfig, student: torch.nn.Module, teacher: torch.nn.Module,
               problem_type: str = "single_label_classification") -> DistillationLoss:
    """Instantiate every ``distill.terms`` entry (popping its ``weight``), plus OPDF's tensor alignment when the
    decomposition asks for it; then let each term size itself from the models. A classification-only term on a
    regression task is refused here, before training."""
    terms, weights = {}, {}
    for name, entry in (cfg.distill.terms or {}).items():
        entry = OmegaConf.to_container(entry, resolve=True)
        weights[name] = float(entry.pop("weight", 1.0))
        try:
            terms[name] = hydra.utils.instantiate(entry)
        except Exception as error:  # a term's own ConfigError arrives wrapped by Hydra: keep its one line
            cause = error.__cause__ if isinstance(error.__cause__, ConfigError) else error
            raise ConfigError(f"distill.terms.{name}: {' '.join(str(cause).split())}") from None
        if weights[name] > 0:
            check_problem_type(problem_type, terms[name].classification_only, term=f"distill.terms.{name}")
    align = cfg.decomposition.get("align")
    if cfg.decomposition.kind != "none" and align and align_weight(align.weight)[0] > 0:
        terms["align"] = TensorAlignment(_tensor_alignment(cfg, student, teacher))
        weights["align"] = align_weight(align.weight)[0]  # auto:<ratio>: 1.0 until the module measures it
    loss = DistillationLoss(terms, weights)
    for name, term in loss.terms.items():
        if weights[name] > 0:
            term.setup(student, teacher)
    return loss


def _decomposition_kwargs(decomposition: DictConfig) -> dict[str, Any]:
    keys = ("kind", "n", "factors", "layout", "gauge", "max_bond", "targets", "train_central", "train_aux")
    return {k: OmegaConf.to_container(decomposition[k], resolve=True) if OmegaConf.is_config(decomposition[k])
            else decomposition[k] for k in keys if k in decomposition}


def _tensor_alignment(cfg: DictConfig, student: torch.nn.Module, teacher: torch.nn.Module,
                      on_mismatch: str | None = None, decompose_teacher: bool = True) -> torch.nn.Module:
    """Decompose a copy of the teacher with the same shapes and pair its tensors with the student's.

    ``on_mismatch`` overrides ``decomposition.align.on_mismatch``. ``decompose_teacher=False`` hands the plain
    teacher to ``TensorAlignmentLoss``, which decomposes only the matrices paired with a student MPO layer, with
    that layer's factors and gauge: the subquadratic task uses it because its student (token mixers) and teacher
    (attention) do not share the decomposition targets."""
    from opdf_exp.mpo import TensorAlignmentLoss, apply_decomposition

    align = cfg.decomposition.align
    teacher_mpo = apply_decomposition(copy.deepcopy(teacher), **_decomposition_kwargs(cfg.decomposition)) \
        if decompose_teacher else teacher
    layer_map = align.get("layer_map")
    if layer_map == "from_student":
        origin = getattr(student, "distill_teacher_layers", None)
        layer_map = {i: t for i, t in enumerate(origin)} if origin else None
    elif OmegaConf.is_config(layer_map):
        layer_map = {int(k): int(v) for k, v in OmegaConf.to_container(layer_map).items()}
    elif layer_map == "uniform":
        layer_map = None
    return TensorAlignmentLoss(student, teacher_mpo, layer_map=layer_map, indices=align.indices,
                               on_mismatch=on_mismatch or align.on_mismatch, reduction=align.get("reduction", "mean"))


DATA_KEYS_WITHOUT_EFFECT = ("batch_size", "eval_batch_size", "num_workers")  # do not change the teacher's outputs


def teacher_output_cache(cfg: DictConfig, teacher: torch.nn.Module, loss: DistillationLoss, datamodule):
    """The teacher's outputs on the training split, computed once per (teacher weights, data, tokenizer, max
    length, layers) and reused by every student and seed (``distill.teacher_cache``, default on).

    Off (the teacher runs live) when no active term needs the teacher, when a term reads teacher modules through
    forward hooks or hidden states without naming them, in distributed or fast-dev runs, or when the method
    trains the teacher. The stored file is checked against the live teacher on its first batches and rebuilt
    when they differ.
    """
    from torch.utils.data import DataLoader

    from opdf_exp.distill.teacher_cache import TeacherOutputCache, build_cache, cache_key, teacher_fingerprint, verify

    if not cfg.distill.get("teacher_cache", True) or not loss.needs_teacher:
        return None
    layers = loss.teacher_hidden_layers
    if loss.tap_paths()[1] or layers is None or cfg.trainer.get("fast_dev_run") or trainer_world_size(cfg.trainer) > 1:
        log.info("teacher-output cache off for this student (hooks, unnamed hidden states, fast dev run or DDP)")
        return None
    datamodule.setup()
    dataset = datamodule.datasets["train"]
    fingerprint = getattr(teacher, "_opdf_fingerprint", None)
    if fingerprint is None:
        fingerprint = teacher_fingerprint(teacher)
        teacher._opdf_fingerprint = fingerprint  # one hash per teacher object, shared by the job's variants
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for key in DATA_KEYS_WITHOUT_EFFECT:
        data.get("module", {}).pop(key, None)
    signature = datamodule.input_signature() if hasattr(datamodule, "input_signature") else None
    if signature is None:
        log.info("teacher-output cache off: the training inputs are not deterministic (augmentation)")
        return None
    key = cache_key(fingerprint, data, signature, layers)
    path = Path(cfg.paths.cache_dir) / "teacher_outputs" / f"{key}.safetensors"
    loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False, collate_fn=datamodule._collate)
    path.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(path) + ".lock"):
        cache = TeacherOutputCache.load(path)
        if cache is not None and (len(cache) != len(dataset) or cache.layers != list(layers)
                                  or verify(cache, teacher, loader) > 1.0):
            log.warning("teacher-output cache %s is stale (it differs from the live teacher); rebuilding", path)
            cache = None
        if cache is None:
            def progress(done: int, total: int, seconds: float) -> None:
                if done == total or done % (20 * datamodule.eval_batch_size) == 0:
                    log.info("teacher outputs: %d/%d examples (%.0f/s)", done, total, done / max(seconds, 1e-9))

            device = "cuda" if torch.cuda.is_available() else "cpu"
            original = next(teacher.parameters()).device
            cache = build_cache(teacher.to(device), loader, len(dataset), layers,
                                meta={"teacher": fingerprint, "key": key}, progress=progress)
            teacher.to(original)
            if is_global_zero():
                cache.save(path)
            log.info("teacher outputs cached in %s (%d examples, hidden layers %s)", path, len(cache), list(layers))
        else:
            log.info("reusing cached teacher outputs from %s", path)
    return cache


def distill_method(cfg: DictConfig) -> DistillMethod:
    """The KD method named by ``distill.name`` with the options in ``distill.method`` (see
    :mod:`opdf_exp.distill.methods`)."""
    options = cfg.distill.get("method")
    return create_method(str(cfg.distill.get("name", "kd")),
                         **(OmegaConf.to_container(options, resolve=True) if options else {}))


def _lightning_module_class(cfg: DictConfig) -> type:
    """``distill.module`` names the LightningModule of methods with their own training step (LGTM)."""
    target = cfg.distill.get("module")
    return hydra.utils.get_class(target) if target else DistillationModule


def build_student(cfg: DictConfig, name: str, teacher: torch.nn.Module, datamodule, method: DistillMethod,
                  problem_type: str) -> torch.nn.Module:
    """The variant's student, built from the teacher and checked against the teacher and the data (classes, image
    size, what the method needs), frozen where configured; :func:`decompose_student` over-parameterizes it."""
    build = hydra.utils.instantiate(cfg.student.model)
    student = build(teacher=teacher)
    check_class_count(teacher, student)
    if getattr(datamodule, "data_config", None):
        check_input_size(student, datamodule.data_config["input_size"], "student")
    freeze_parameters(student, cfg.student.get("freeze"))
    method.check(student=student, teacher=teacher, problem_type=problem_type)
    return student


def decompose_student(cfg: DictConfig, name: str, student: torch.nn.Module) -> None:
    """Replace the student's matrices by their MPO/SVD decompositions in place (``decomposition.kind``)."""
    decomposition = cfg.decomposition
    if decomposition.kind != "none":
        from opdf_exp.mpo import MPOEmbedding, MPOLinear, apply_decomposition

        started = time.perf_counter()
        apply_decomposition(student, **_decomposition_kwargs(decomposition))
        seconds = time.perf_counter() - started
        matrices = sum(isinstance(m, (MPOLinear, MPOEmbedding)) for m in student.modules())
        log.info("%s: decomposition %s applied to %d matrices in %.2f s (%.1f matrices/s)", name, decomposition.kind,
                 matrices, seconds, matrices / max(seconds, 1e-9))


def trainable_teacher(cfg: DictConfig, teacher: torch.nn.Module, method: DistillMethod) -> torch.nn.Module:
    """A method that trains its teacher (LGTM) gets a trainable copy, so the job's teacher stays as fine-tuned for
    the other variants; any other method gets the teacher itself."""
    if not method.trains_teacher:
        return teacher
    teacher = copy.deepcopy(teacher)
    teacher.requires_grad_(True)
    freeze_parameters(teacher, cfg.teacher.finetune.get("freeze"))
    return teacher


def build_module(cfg: DictConfig, name: str, prefix: str, student: torch.nn.Module, teacher: torch.nn.Module,
                 method: DistillMethod, datamodule, splits) -> tuple[pl.LightningModule, Any, dict[str, int]]:
    """The LightningModule that trains ``student``: its loss (OPDF aligns against the teacher as fine-tuned, before
    a teacher-training method decomposes its copy), the method's training model, the teacher-output cache, the
    optimizer's parameter groups. Returns (module, loss, parameter counts)."""
    loss = build_loss(cfg, student, teacher, splits.problem_type)
    if method.trains_teacher and method.decompose_teacher and cfg.decomposition.kind != "none":
        from opdf_exp.mpo import apply_decomposition

        apply_decomposition(teacher, **_decomposition_kwargs(cfg.decomposition))
    train_model = method.training_model(student, teacher, seed=int(cfg.seed))
    params = student_params(student, loss)
    if method.trains_teacher:
        params["train"] += _count(teacher, trainable_only=True)
    log.info("%s: method %s, loss = %s; params train=%d inference=%d", name, method.name, loss.formula(),
             params["train"], params["inference"])
    # A teacher that trains (LGTM) changes its outputs every step: nothing to cache then.
    cache = None if method.trains_teacher else teacher_output_cache(cfg, teacher, loss, datamodule)
    module = _lightning_module_class(cfg)(
        student, loss, teacher if loss.needs_teacher or method.trains_teacher else None,
        problem_type=splits.problem_type, num_labels=splits.num_labels, metrics=list(cfg.data.metrics),
        log_prefix=prefix, train_model=train_model, teacher_cache=cache, **method.module_options(),
        **_optim_kwargs(cfg.optim), **_mpo_optim_kwargs(cfg.decomposition))
    return module, loss, params


def fit_student(cfg: DictConfig, name: str, prefix: str, module: pl.LightningModule, datamodule,
                loggers: list) -> tuple[pl.Trainer, dict[str, Any]]:
    """Fit (unless ``train=false``) with the runner's one Trainer builder; returns the trainer and the run's
    steps, epochs and training time."""
    # A manual-optimization step (LGTM) clips its own gradients; Lightning refuses gradient_clip_val for it.
    stage_overrides = None
    if not module.automatic_optimization:
        module.gradient_clip_val = cfg.trainer.get("gradient_clip_val")
        stage_overrides = {"gradient_clip_val": None}
    trainer = build_trainer(cfg, name, prefix, loggers, stage_overrides)
    started = time.perf_counter()
    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=_resume_path(cfg, trainer, cfg.get("ckpt_path")))
    run = {"steps": int(trainer.global_step),  # before evaluation restores the best checkpoint's counter
           "epochs": int(trainer.current_epoch),  # with DDP each step takes world_size batches: epochs go faster
           "world_size": int(trainer.world_size),
           "train_time_s": round(train_seconds(trainer, fallback=time.perf_counter() - started), 1)}
    _save_last(trainer)
    return trainer, run


def dense_export_row(trainer: pl.Trainer, module: pl.LightningModule, datamodule,
                     metrics: Mapping[str, float]) -> dict[str, Any]:
    """Contract the decomposed student back to dense layers and test it again: the export must not change what
    the student predicts (``max_metric_change``), and its parameter count is the deployed model's."""
    from opdf_exp.mpo import export_dense

    export_dense(module.student)
    dense = {k: float(v) for result in trainer.test(module, datamodule=datamodule, verbose=False)
             for k, v in result.items() if "/loss" not in k}
    return {"metrics": dense,
            "max_metric_change": max((abs(dense[k] - metrics[k]) for k in dense if k in metrics), default=0.0),
            "params": _count(module.student)}


def train_student(cfg: DictConfig, name: str, label: str, prefix: str, teacher: torch.nn.Module, datamodule,
                  loggers: list) -> dict[str, Any]:
    """One variant, start to end: build, train, evaluate, export and save its student; returns its result row."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # each variant reproducible on its own
    splits = datamodule.load_splits()
    method = distill_method(cfg)
    student = build_student(cfg, name, teacher, datamodule, method, splits.problem_type)
    teacher = trainable_teacher(cfg, teacher, method)  # copied before the student's decomposition, as built
    decompose_student(cfg, name, student)
    module, loss, params = build_module(cfg, name, prefix, student, teacher, method, datamodule, splits)
    trainer, run = fit_student(cfg, name, prefix, module, datamodule, loggers)
    metrics = _evaluate(trainer, module, datamodule)
    row: dict[str, Any] = {"name": name, "label": label, "method": method.name, "decomposition": cfg.decomposition.kind,
                           "loss": loss.formula(), "params": params, **run, "metrics": metrics}
    if cfg.decomposition.kind != "none":
        row["dense_export"] = dense_export_row(trainer, module, datamodule, metrics)
    if cfg.get("save_student", True) and not trainer.fast_dev_run:
        folder = Path(cfg.paths.output_dir) / "students" / name
        _save_pretrained_atomic(module.student, getattr(datamodule, "tokenizer", None), folder)
        row["saved_to"] = str(folder)
    return row


# ----------------------------------------------------------------------------------------------- task
def run(cfg: DictConfig, variants: Mapping | None = None, primary: str | None = None) -> dict[str, Any]:
    """Hydra task entry point (``task=distill``)."""
    plan = variant_plan(cfg, variants)
    for name, _, variant_cfg in plan:  # every variant's config, before the data loads and the teacher trains
        try:
            check_job_config(variant_cfg)
        except ConfigError as error:
            raise ConfigError(f"variant '{name}': {error}" if len(plan) > 1 else str(error)) from None
    check_lr_scale_has_effect([variant_cfg for _, _, variant_cfg in plan])
    datamodule = hydra.utils.instantiate(cfg.data.module)
    splits = datamodule.load_splits()
    if splits.num_labels != int(cfg.data.num_labels):
        raise ConfigError(f"data.num_labels={cfg.data.num_labels} but the data has {splits.num_labels} labels; "
                          f"set data.num_labels={splits.num_labels}")
    # Resolve hub assets now, so an offline machine fails in seconds, before any training.
    if "name_or_path" in cfg.teacher.model:
        resolve_model_path(cfg.teacher.model.name_or_path, override_key="teacher.model.name_or_path")
    if hasattr(datamodule, "tokenizer"):
        datamodule.tokenizer  # noqa: B018  (a text model's tokenizer: offline hub ids fail here)
    # every variant's student and decomposition against the teacher's architecture, on the meta device
    check_model_shapes(cfg, [(name if len(plan) > 1 else "", variant_cfg) for name, _, variant_cfg in plan])
    student_builder = cfg.student.model
    if student_builder.get("_target_") == "opdf_exp.models.pretrained_student":  # before the teacher trains
        from opdf_exp.models.hf import check_student_vocabulary

        check_student_vocabulary(student_builder.name_or_path, student_builder.get("teacher_tokenizer"))
    if cfg.get("ckpt_path") and len(plan) > 1:
        raise ConfigError("ckpt_path resumes a single student; set task.variants=null or run the variant on its own")
    loggers = build_loggers(cfg.get("logger"))
    # One W&B run per job; the teacher and each student variant log under their own prefix (teacher/...,
    # kd_opdf/...), so one dashboard panel compares them and the run's config is the job's, shared by all.
    add_wandb_tags(loggers, [f"experiment:{cfg.task_name}", f"decomposition:{cfg.decomposition.kind}",
                             f"distill:{cfg.distill.get('name', 'custom')}"])
    student_classes = cfg.student.model.get("num_classes")
    if student_classes is not None and int(student_classes) != splits.num_labels:  # before the teacher trains
        raise ConfigError(f"student.model.num_classes={student_classes} but the data (and so the teacher) has "
                          f"{splits.num_labels} classes; set student.model.num_classes=null")
    _check_image_input(cfg.teacher.model, datamodule, "teacher")
    teacher, teacher_metrics, teacher_info = prepare_teacher(cfg, datamodule, loggers)
    warnings = teacher_warnings(teacher_metrics, getattr(splits.validation, "labels", None),
                                getattr(splits, "problem_type", "single_label_classification"))
    for warning in warnings:
        log.warning(warning)
    teacher_info = {**teacher_info, "warnings": warnings}  # results.json keeps them; the GLUE report prints them
    prefix = {name: f"{name}/" if len(plan) > 1 else "" for name, _, _ in plan}  # metric names per variant
    reusable = reusable_rows(cfg)
    rows = []
    for name, label, vcfg in plan:
        digest = variant_digest(vcfg)
        old = reusable.get(name)
        if old and same_variant(old, vcfg, digest) and old.get("metric_prefix") == prefix[name]:
            log.info("variant %s: reused from this folder's previous result (its own config is unchanged)", name)
            rows.append({**old, "label": label, "reused": True})
            continue
        row = train_student(vcfg, name, label, prefix[name], teacher, datamodule, loggers)
        rows.append({**row, "config_digest": digest, "metric_prefix": prefix[name]})

    metrics = dict(teacher_metrics)
    for row in rows:
        metrics.update(row["metrics"])
    main_row = next((r for r in rows if r["name"] == primary), rows[-1])

    def table_row(label: str, values: dict, prefix: str, params: dict, seconds: float | None) -> dict:
        return {"model": label, **{f"test {m}": values.get(f"{prefix}test/{m}") for m in cfg.data.metrics},
                f"val {cfg.data.metric}": values.get(f"{prefix}val/{cfg.data.metric}"),
                "train params": params["train"], "inference params": params["inference"], "train time (s)": seconds}

    table_rows = [table_row(f"teacher ({cfg.teacher.name})", teacher_metrics, TEACHER_PREFIX, teacher_info["params"],
                            teacher_info.get("train_time_s"))]
    table_rows += [table_row(row["label"], row["metrics"], prefix[row["name"]], row["params"], row["train_time_s"])
                   for row in rows]
    table = write_table(table_rows, Path(cfg.paths.output_dir) / "results_table", digits={"train time (s)": 1},
                        save=is_global_zero())
    log_final(loggers, {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                        for k, v in cfg.items() if k != "hydra"}, metrics)
    return {"metrics": metrics, "params": main_row["params"],
            "teacher": {"metrics": teacher_metrics, **teacher_info},
            "variants": rows, "tables": {"Results": table}}
