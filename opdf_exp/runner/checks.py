"""Checks of a composed job config that need no training: run on the submitting machine and again at job start.

Why: a bad value must fail in one line before any teacher fine-tunes, and on a cluster before anything is
submitted. Two kinds of check, kept apart because they run on different machines:

* *config* checks (:func:`check_job_config`): types and values of the trainer, the decomposition, the KD method
  and the optimizer, for the job and each of its student variants. They hold anywhere, so the submitting process
  runs them whatever the launcher, and the job runs them again before its first stage.
* *machine* checks (``check_trainer_config`` in :mod:`opdf_exp.runner.trainer`: is there a GPU?) hold only where
  the job runs. :func:`check_launch` runs them on the submitting machine only when the jobs run there (a single
  run, or a local launcher); ``--cfg`` and a SLURM launcher leave them to the job, which writes the one-line
  failure into its ``error.txt`` so the sweep goes on. The SLURM job's shape is checked against the trainer on the
  submitting machine, where it is known.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from omegaconf import DictConfig, OmegaConf

from opdf_exp.errors import ConfigError
from opdf_exp.runner.resolvers import PROCESS_PER_DEVICE, device_count

# Hydra launchers whose jobs run on the submitting machine (anything else runs elsewhere, e.g. SLURM).
LOCAL_LAUNCHERS = ("BasicLauncher", "JoblibLauncher", "hydra_submitit_launcher.submitit_launcher.LocalLauncher")
TRAINER_INTEGERS = ("max_epochs", "min_epochs", "max_steps", "min_steps", "num_nodes", "log_every_n_steps",
                    "check_val_every_n_epoch", "accumulate_grad_batches", "num_sanity_val_steps")
TRAINER_NUMBERS = ("gradient_clip_val", "val_check_interval", "limit_train_batches", "limit_val_batches",
                   "limit_test_batches", "overfit_batches")
PRECISIONS = ("64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed",
              "transformer-engine", "transformer-engine-float16")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_values(trainer: DictConfig | dict, where: str = "trainer") -> None:
    """Types and values Lightning would only reject mid-run (``max_epochs=abc`` is a TypeError deep in the loop)."""
    for key in TRAINER_INTEGERS:
        value = trainer.get(key)
        if value is not None and not _is_int(value):
            raise ConfigError(f"{where}.{key}={value!r} must be an integer")
    for key in TRAINER_NUMBERS:
        value = trainer.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}.{key}={value!r} must be a number")
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in PRECISIONS:
        raise ConfigError(f"{where}.precision={precision!r} is unknown; use one of 32-true, bf16-mixed, 16-mixed, "
                          "bf16-true, 64-true")
    devices = trainer.get("devices")
    try:
        count = device_count(devices) if devices is not None else 1
    except (TypeError, ValueError):
        count = 0
    if count is not None and count < 1:
        raise ConfigError(f"{where}.devices={devices!r} must be a positive integer, a list of device ids, -1 or auto")


def check_optim_values(optim: DictConfig | dict) -> None:
    for key in ("lr", "weight_decay", "warmup_ratio"):
        value = optim.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"optim.{key}={value!r} must be a number")
    if optim.get("lr") is not None and float(optim.lr) <= 0:
        raise ConfigError(f"optim.lr={optim.lr} must be > 0")


def check_job_config(cfg: DictConfig) -> None:
    """Every check of one composed config that needs neither a model nor a GPU (see the module docstring)."""
    if "trainer" in cfg:
        check_trainer_values(cfg.trainer)
    finetune_trainer = OmegaConf.select(cfg, "teacher.finetune.trainer")
    if finetune_trainer is not None:
        check_trainer_values(finetune_trainer, "teacher.finetune.trainer")
    if "optim" in cfg and cfg.optim is not None:
        check_optim_values(cfg.optim)
    decomposition = cfg.get("decomposition")
    if decomposition is not None and "kind" in decomposition:
        check_decomposition_values(OmegaConf.to_container(decomposition, resolve=True))
    check_fsdp_sharding(cfg)
    end_to_end = OmegaConf.select(cfg, "task.stages.end_to_end")
    if end_to_end is not None:
        check_lm_objective_values(OmegaConf.to_container(end_to_end, resolve=True))
    check_student_values(cfg)
    if OmegaConf.select(cfg, "distill.name") is not None and "terms" in cfg.distill:
        from opdf_exp.distill.methods import create_method

        options = cfg.distill.get("method")
        create_method(str(cfg.distill.name), **(OmegaConf.to_container(options, resolve=True) if options else {}))


def check_decomposition_values(options: dict) -> None:
    """The decomposition group: what ``apply_decomposition`` would refuse, the MPO group's rate and decay, and the
    alignment's weight, reduction and map name."""
    from opdf_exp.mpo import check_decomposition
    from opdf_exp.mpo.align import REDUCTIONS

    try:
        check_decomposition(**{k: v for k, v in options.items() if k != "align"})
    except ConfigError as error:
        raise ConfigError(f"decomposition: {error}") from None
    check_mpo_optim_values(options)
    align = options.get("align") or {}
    align_weight(align.get("weight", 0))
    reduction = align.get("reduction", "mean")
    if reduction not in REDUCTIONS:
        raise ConfigError(f"decomposition.align.reduction={reduction!r} is unknown; use one of {', '.join(REDUCTIONS)}")
    layer_map = align.get("layer_map")
    if isinstance(layer_map, str) and layer_map not in ALIGN_MAPS:
        raise ConfigError(f"decomposition.align.layer_map={layer_map!r} is unknown; use one of "
                          f"{', '.join(ALIGN_MAPS)}, a dict {{student_block: teacher_block}} or a list")


def align_weight(value) -> tuple[float, float | None]:
    """``decomposition.align.weight``: a number λ >= 0 -> (λ, None); ``auto:<ratio>`` -> (1.0, ratio): λ is set at
    the fit's start so that the alignment gradient is ``ratio`` times the rest of the gradient on the MPO tensors
    (``lit/module.py``), because a fixed λ's strength depends on the tensors' sizes and norms (MRPC, relative
    reduction: λ = 0.1 gave a gradient ratio of 1e-4)."""
    if isinstance(value, str) and value.startswith("auto:"):
        try:
            ratio = float(value[len("auto:"):])
        except ValueError:
            ratio = -1.0
        if ratio > 0:
            return 1.0, ratio
    elif not isinstance(value, bool) and isinstance(value, (int, float)) and value >= 0:
        return float(value), None
    raise ConfigError(f"decomposition.align.weight={value!r} must be a number >= 0 or auto:<ratio> with ratio > 0 "
                      "(e.g. auto:0.1: the alignment gradient starts at 10% of the task gradient)")


WINDOW_FAMILIES = ("linear_attention",)


def check_student_values(cfg: DictConfig) -> None:
    """A subquadratic student's RoPE only where its family has queries and keys to rotate; a sliding window only
    on linear attention (LoLCATs) and no longer than the training blocks."""
    window = OmegaConf.select(cfg, "student.window") or 0
    if window:
        arch = str(OmegaConf.select(cfg, "student.arch"))
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise ConfigError(f"student.window={window!r} must be a number of tokens >= 0 (0: no window)")
        if arch not in WINDOW_FAMILIES:
            raise ConfigError(f"student.window is defined for {', '.join(WINDOW_FAMILIES)} (LoLCATs' sliding-window "
                              f"softmax branch), not {arch}")
        block = OmegaConf.select(cfg, "data.block_size")
        if block is not None and window > int(block):
            raise ConfigError(f"student.window={window} is larger than data.block_size={block}: the softmax branch "
                              "would cover every token and train no linear part; use a window < block_size")
    if OmegaConf.select(cfg, "student.rope") and OmegaConf.select(cfg, "student.arch") is not None:
        from opdf_exp.mixers import rope_families

        arch = str(cfg.student.arch)
        if arch not in rope_families():
            raise ConfigError(f"student.rope=true is not defined for {arch} (no per-head queries and keys to "
                              f"rotate); it is for {', '.join(rope_families())}")


ALIGN_MAPS = ("uniform", "public", "preceding", "from_student")


def check_mpo_optim_values(options: dict) -> None:
    """``decomposition.lr_scale``: a number > 0 or ``auto``; ``decomposition.weight_decay``: a number >= 0."""
    scale = options.get("lr_scale", 1)
    if str(scale) != "auto":
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"decomposition.lr_scale={scale!r} must be a number > 0 or auto (divide the MPO "
                              "tensors' rate by the step amplification measured on the first batch)")
    decay = options.get("weight_decay", 0.0)
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
        raise ConfigError(f"decomposition.weight_decay={decay!r} must be a number >= 0")


def check_lr_scale_has_effect(configs: Iterable[DictConfig]) -> None:
    """``lr_scale=auto`` where no student of the job has MPO layers would silently do nothing: say so."""
    configs = list(configs)
    asked = any(str(OmegaConf.select(c, "decomposition.lr_scale", default=1)) == "auto" for c in configs)
    if asked and all(str(OmegaConf.select(c, "decomposition.kind", default="none")) == "none" for c in configs):
        raise ConfigError("decomposition.lr_scale=auto has no effect: no student of this job has MPO layers (the "
                          "step amplification is the MPO form's over the dense one); use decomposition=mpo or drop it")


def check_fsdp_sharding(cfg: DictConfig) -> None:
    """FSDP with ``use_orig_params=false`` flattens each wrapped module's parameters into one FlatParameter, which
    must be all trainable or all frozen; an MPO student with frozen central or auxiliary tensors (or any frozen
    student parameter) mixes both in one module and FSDP stops at wrap time, on the GPU node."""
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if not OmegaConf.is_dict(strategy) or "fsdp" not in str(strategy.get("_target_", "")).lower():
        return
    if strategy.get("use_orig_params", True):
        return  # Lightning's default: per-parameter requires_grad is kept
    decomposition = cfg.get("decomposition") or {}
    frozen = []
    if decomposition.get("kind", "none") != "none":
        frozen += [f"decomposition.{k}=false" for k in ("train_central", "train_aux") if decomposition.get(k) is False]
    if OmegaConf.select(cfg, "student.freeze"):
        frozen.append(f"student.freeze={list(cfg.student.freeze)}")
    if frozen:
        raise ConfigError(f"FSDP with use_orig_params=false cannot shard a student that freezes part of a module "
                          f"({', '.join(frozen)}); set trainer.strategy.use_orig_params=true (Lightning's default)")


def check_lm_objective_values(stage: dict) -> None:
    """Stage 3's objective options (``distill/lm_objectives.py``), so a bad β, λ or chunk fails before the teacher
    loads instead of after stages 1 and 2."""
    from opdf_exp.distill.lm_objectives import DIVERGENCES, LMObjective

    divergence = stage.get("divergence", "forward_kl")
    if divergence not in DIVERGENCES:
        raise ConfigError(f"task.stages.end_to_end.divergence={divergence!r} is unknown; use one of "
                          f"{', '.join(DIVERGENCES)}")
    try:
        LMObjective({"ce": float(stage.get("ce_weight", 1.0)), divergence: float(stage.get("kl_weight", 1.0))},
                    temperature=float(stage.get("temperature", 1.0)), beta=float(stage.get("beta", 0.5)),
                    chunk_size=stage.get("chunk_size"))
    except (TypeError, ValueError) as error:
        raise ConfigError(f"task.stages.end_to_end: {error}") from None
    on_policy = stage.get("on_policy", 0.0)
    if isinstance(on_policy, bool) or not isinstance(on_policy, (int, float)) or not 0.0 <= on_policy <= 1.0:
        raise ConfigError(f"task.stages.end_to_end.on_policy={on_policy!r} is the share of on-policy batches "
                          "(GKD's lambda); use a value in [0, 1]")


def variant_overrides(cfg: DictConfig) -> Iterable[tuple[str, list[str]]]:
    """``(name, overrides)`` of each student variant of a distillation job (none for other tasks)."""
    variants = OmegaConf.select(cfg, "task.variants")
    for name, spec in (variants or {}).items():
        if spec is not None:
            yield str(name), list(spec.get("overrides", []) or [])


def check_job_and_variants(cfg: DictConfig, compose: Callable[[list[str]], DictConfig]) -> None:
    """:func:`check_job_config` on the job and on each variant (``compose(extra)`` composes the job's overrides
    plus the variant's); an error names the variant."""
    check_job_config(cfg)
    variants = list(variant_overrides(cfg))
    composed = []
    for name, extra in variants:
        try:
            variant_cfg = compose(extra) if extra else cfg
            check_job_config(variant_cfg)
        except ConfigError as error:
            raise ConfigError(f"variant '{name}': {error}") from None
        composed.append(variant_cfg)
    check_lr_scale_has_effect(composed or [cfg])


def launcher_target(cfg: DictConfig) -> str:
    return str(OmegaConf.select(cfg, "hydra.launcher._target_") or "")


def runs_elsewhere(cfg: DictConfig, multirun: bool) -> bool:
    """Whether the jobs run on another machine: only a multirun hands its jobs to the launcher."""
    target = launcher_target(cfg)
    return multirun and bool(target) and not target.endswith(LOCAL_LAUNCHERS)


def check_slurm_shape(cfg: DictConfig) -> None:
    """The SLURM job asked for must fit the trainer: enough GPUs per node for ``trainer.devices``, and no CPU
    DDP on a GPU allocation unless asked for explicitly."""
    launcher = cfg.hydra.launcher
    trainer = cfg.trainer
    gpus = launcher.get("gpus_per_node")
    devices = device_count(trainer.get("devices", 1))
    accelerator = str(trainer.get("accelerator", "auto"))
    strategy = str(trainer.get("strategy", "auto"))
    if accelerator != "cpu" and devices is not None and gpus is not None and devices > int(gpus):
        raise ConfigError(f"trainer.devices={devices} but hydra.launcher.gpus_per_node={gpus}: the job would get "
                          f"fewer GPUs than Lightning uses; set hydra.launcher.gpus_per_node={devices} (or leave it "
                          "unset: it follows trainer.devices)")
    if accelerator == "cpu" and strategy.startswith(PROCESS_PER_DEVICE) and not cfg.get("allow_cpu_ddp_on_cluster"):
        raise ConfigError("trainer=ddp_sim runs DDP on CPU processes, which wastes a GPU allocation; use trainer=ddp "
                          "for GPUs, or set allow_cpu_ddp_on_cluster=true to run CPU DDP on the cluster on purpose")
    tasks = int(launcher.get("tasks_per_node") or 1)
    if strategy.startswith(PROCESS_PER_DEVICE) and not strategy.startswith("ddp_spawn") and devices is not None \
            and tasks != devices:
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: Lightning under "
                          f"SLURM needs one task per device; set hydra.launcher.tasks_per_node={devices} (with "
                          "hydra/launcher=slurm leave it unset: it follows trainer.devices)")


def check_launch(cfg: DictConfig, *, multirun: bool, printing: bool) -> None:
    """Machine checks on the submitting process: the accelerator only when the jobs run here, the SLURM shape
    when they are submitted to SLURM; nothing when only printing the config."""
    from opdf_exp.runner.trainer import check_trainer_config

    if printing:
        return
    if runs_elsewhere(cfg, multirun):
        if launcher_target(cfg).endswith("SlurmLauncher"):
            check_slurm_shape(cfg)
        return
    check_trainer_config(cfg.trainer)


# ----------------------------------------------------------------------------------------------- shapes
def teacher_skeleton(model_cfg: DictConfig):
    """The teacher's architecture on the meta device (no weights read, no memory): from its ``config.json`` for a
    pretrained transformers model, from the builder itself for random or timm models without weights. ``None``
    for builders it does not know (their shapes are checked when they are built)."""
    import hydra
    import torch

    target = str(model_cfg.get("_target_", ""))
    options = {k: v for k, v in OmegaConf.to_container(model_cfg, resolve=True).items() if k != "_target_"}
    if target.endswith("load_classifier"):
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from opdf_exp.hub import resolve_model_path

        path = resolve_model_path(options.pop("name_or_path"), override_key=options.pop("override_key",
                                                                                     "teacher.model.name_or_path"))
        config = AutoConfig.from_pretrained(path, num_labels=options.pop("num_labels"),
                                            problem_type=options.pop("problem_type", None), **options)
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config)
    weightless = not options.get("pretrained") and not options.get("checkpoint_path")
    if target.endswith(("random_classifier", "create_timm_classifier")) and weightless:
        with torch.device("meta"):
            return hydra.utils.instantiate(model_cfg)
    return None


def check_model_shapes(cfg: DictConfig, variant_cfgs: Iterable[tuple[str, DictConfig]]) -> bool:
    """Build the teacher and each variant's student on the meta device and plan each variant's decomposition,
    so a student layer map past the teacher's depth or MPO factors that do not fit a matrix fail at job start,
    before the teacher fine-tunes. Returns whether the check could run (a builder it does not know skips it)."""
    import hydra
    import torch

    from opdf_exp.mpo import plan_decomposition

    teacher = teacher_skeleton(cfg.teacher.model)
    if teacher is None:
        return False
    for name, variant_cfg in variant_cfgs:
        builder = variant_cfg.student.model
        if not str(builder.get("_target_", "")).endswith(("student_from_teacher", "timm_student")) or \
                builder.get("pretrained") or builder.get("checkpoint_path"):
            continue
        prefix = f"variant '{name}': " if name else ""
        try:
            with torch.device("meta"):
                student = hydra.utils.instantiate(builder)(teacher=teacher)
            decomposition = variant_cfg.decomposition
            if decomposition.kind != "none":
                options = OmegaConf.to_container(decomposition, resolve=True)
                n = 2 if options["kind"] == "svd" else options.get("n")
                plan = plan_decomposition(student, targets=options.get("targets"), factors=options.get("factors"),
                                          n=n, max_bond=options.get("max_bond"),
                                          layout=options.get("layout", "balanced"))
                align = options.get("align") or {}
                layer_map = align.get("layer_map")
                if align_weight(align.get("weight", 0) or 0)[0] > 0 and layer_map not in (None, "uniform",
                                                                                          "from_student"):
                    from opdf_exp.mpo import TensorAlignmentLoss

                    try:  # the map's blocks against both depths (the same check the loss makes after the fine-tune)
                        TensorAlignmentLoss._resolve_map(student, teacher, layer_map, {e.name: None for e in plan})
                    except ConfigError as error:
                        raise ConfigError(f"decomposition.align.layer_map: {error}") from None
        except ConfigError as error:
            raise ConfigError(f"{prefix}{error}") from None
    return True
