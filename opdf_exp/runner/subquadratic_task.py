"""Hydra task of the Transformer -> subquadratic experiments (``task=subquadratic``; docs/subquadratic.md).

One job = one teacher, one student (``student=subquadratic/<mixer>`` or ``student=transformer``), the stages of
``task.stages`` on disjoint slices of the training blocks, then the evaluation of ``task.evaluation`` for the
student and the teacher, written to ``results.json`` (metrics ``student/...`` and ``teacher/...``) and a table.
With ``decomposition=mpo`` (or ``svd``) the student is over-parameterized as an MPO for stage 3 only (OPDF), with
the optional tensor alignment against the teacher, and contracted back to dense before evaluation and saving
(``Stage3Decomposition``).
The runner is the only layer that reads the config: everything below it takes plain arguments.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from opdf_exp.errors import ConfigError, OfflineError
from opdf_exp.runner.stage_reuse import StageReuse

log = logging.getLogger(__name__)

STAGE_MODULES = {"attention_transfer": "AttentionTransferModule", "hidden_alignment": "HiddenAlignmentModule",
                 "end_to_end": "EndToEndKDModule"}
OPTIM_KEYS = ("lr", "weight_decay", "betas", "warmup_ratio", "scheduler", "min_lr_ratio", "decay_ratio",
              "gradient_clip")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


class _IndexDataset(Dataset):
    """Rows of a cached activation set (stage 1 on ``AttentionIO``)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"index": i}


CACHE_MODES = ("memory", "disk", "off")
STAGE_NAMES = ("attention_transfer", "hidden_alignment", "end_to_end")


def stage1_activations(cfg: DictConfig, student, teacher, blocks: torch.Tensor, val_blocks: torch.Tensor,
                       mode: str, batch_size: int, max_gb: float = 4.0):
    """The teacher's attention inputs/outputs of the stage-1 blocks and the validation blocks, collected once:
    in memory, or (``disk``) in ``<paths.cache_dir>/stage1/`` as safetensors keyed on teacher, tokens and layers."""
    from opdf_exp.subquadratic.attention_cache import cache_key, collect_attention_io, load_or_collect

    if mode not in CACHE_MODES:
        raise ConfigError(f"task.stages.attention_transfer.cache={mode!r} is unknown; use one of {list(CACHE_MODES)}")
    layers = list(student.mixers())
    size_gb = 2 * (blocks.numel() + val_blocks.numel()) * len(layers) * int(teacher.config.hidden_size) * 4 / 2 ** 30
    if size_gb > max_gb:
        raise ConfigError(f"the stage-1 activation cache would take {size_gb:.1f} GB ({blocks.shape[0]} blocks x "
                          f"{len(layers)} layers) > task.stages.attention_transfer.cache_max_gb={max_gb:g}; lower "
                          "the first share of task.stages.splits, raise cache_max_gb, or set cache=off")
    out = []
    for part in (blocks, val_blocks):
        if mode == "disk":
            name = cache_key(teacher, part, layers, torch.float32)["blocks"][:16]
            root = Path(str(cfg.paths.get("cache_dir") or cfg.paths.output_dir)).expanduser()
            out.append(load_or_collect(teacher, part, layers, root / "stage1" / f"{name}.safetensors", batch_size))
        else:
            out.append(collect_attention_io(teacher, part, layers, batch_size))
    return out


def write_stage1_curve(curve: list[dict], output_dir: Path | None) -> None:
    """The per-layer error curve of stage 1 as a markdown table (mean, worst, per layer) and a plot."""
    if output_dir is None or not curve:
        return
    layers = sorted(curve[0]["errors"])
    rows = ["| step | mean | max | " + " | ".join(f"L{i}" for i in layers) + " |", "|---" * (len(layers) + 3) + "|"]
    for point in curve:
        e = point["errors"]
        rows.append(f"| {point['step']} | {sum(e.values()) / len(e):.4f} | {max(e.values()):.4f} | "
                    + " | ".join(f"{e[i]:.3f}" for i in layers) + " |")
    (output_dir / "stage1_curve.md").write_text("\n".join(rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        steps = [p["step"] for p in curve]
        for i in layers:
            ax.plot(steps, [p["errors"][i] for p in curve], color="0.8", lw=0.7)
        ax.plot(steps, [sum(p["errors"].values()) / len(layers) for p in curve], color="C0", lw=2, label="mean")
        ax.set_yscale("log")
        ax.set_xlabel("stage-1 step")
        ax.set_ylabel("held-out attention-output rel. error")
        ax.legend()
        fig.tight_layout()
        fig.savefig(output_dir / "stage1_curve.png", dpi=100)
        plt.close(fig)
    except Exception as error:  # a plot must never fail a run
        log.warning("stage-1 curve plot skipped: %s", error)


class _BlockDataset(Dataset):
    """Full training blocks; ``with_index`` adds each block's row (stage 3 looks up cached teacher targets)."""

    def __init__(self, blocks: torch.Tensor, with_index: bool = False):
        self.blocks, self.with_index = blocks, with_index

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.blocks[i]
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.with_index:
            item["block_index"] = torch.tensor(i)
        return item


def stage3_teacher_targets(cfg: DictConfig, teacher, blocks: torch.Tensor, options: dict, batch_size: int):
    """The teacher's sparse next-token targets of the stage-3 blocks, from ``<paths.cache_dir>/stage3/`` when its
    key (teacher, vocabulary, blocks, block size, kind, k, temperature, seed) matches, else built and stored."""
    from opdf_exp.distill.sparse_targets import load_or_build_targets
    from opdf_exp.utils.keyed_file import tensor_digest

    options = dict(options)
    kind, k = str(options.pop("kind", "sampled")), options.pop("k", 64)
    temperature, seed = float(options.pop("temperature", 1.0)), int(options.pop("seed", 0))
    if options:
        raise ConfigError(f"task.stages.end_to_end.teacher_cache has unknown keys {sorted(options)}; use kind, k, "
                          "temperature, seed")
    root = Path(str(cfg.paths.get("cache_dir") or cfg.paths.output_dir)).expanduser()
    path = root / "stage3" / f"{tensor_digest(blocks)[:16]}_{kind}_k{k}.safetensors"
    return load_or_build_targets(teacher, blocks, path, kind, k, temperature, seed, batch_size)


def load_teacher(teacher_cfg: DictConfig, cache_dir: str | None):
    from opdf_exp.models import causal_lm

    kind = str(teacher_cfg.kind)
    if kind == "tiny_random":
        return causal_lm.tiny_llama(**_plain(teacher_cfg.get("config", {}) or {}))
    if kind == "gguf_package":
        return causal_lm.gguf_package(str(teacher_cfg.package), str(teacher_cfg.gguf_file), cache_dir)
    if kind == "pretrained":
        return causal_lm.pretrained(str(teacher_cfg.name_or_path), "teacher.name_or_path")
    raise ConfigError(f"teacher.kind={kind!r} is unknown; use tiny_random, gguf_package or pretrained")


def _hub_documents(data_cfg: DictConfig) -> list[tuple[str, str]]:
    from opdf_exp.hub import hub_reachable, offline_mode

    dataset = str(data_cfg.hub_dataset)
    if offline_mode() or not hub_reachable():
        raise OfflineError(f"the Hugging Face hub is unreachable, so data.hub_dataset={dataset} cannot stream; use "
                           f"+experiment=subquadratic_cpu (packaged BBC News) or data.source=text_files")
    import datasets

    stream = datasets.load_dataset(dataset, name=data_cfg.get("hub_config"), split="train", streaming=True)
    docs = []
    for i, row in enumerate(stream):
        if i >= int(data_cfg.max_documents):
            break
        docs.append((str(row.get("id", i)), str(row[str(data_cfg.get("text_field", "text"))])))
    return docs


def load_blocks(data_cfg: DictConfig, tokenizer):
    from opdf_exp.data import lm

    source = str(data_cfg.source)
    if source == "bbc":
        docs = lm.bbc_documents()
    elif source == "text_files":
        docs = lm.text_file_documents([str(p) for p in data_cfg.paths])
    elif source == "hub":
        docs = _hub_documents(data_cfg)
    else:
        raise ConfigError(f"data.source={source!r} is unknown; use bbc, text_files or hub")
    return lm.pack_blocks(docs, tokenizer.encode, tokenizer.eos_token_id, int(data_cfg.block_size),
                          float(data_cfg.held_out_fraction), int(data_cfg.split_seed),
                          data_cfg.get("max_train_tokens"))


def _stage_module(name: str, student, teacher, stage_cfg: dict, prefix: str, **extra):
    from opdf_exp.lit import subquadratic as lit

    options = {k: v for k, v in stage_cfg.items() if k not in ("max_steps", "epochs")}
    options.update(extra)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    return getattr(lit, STAGE_MODULES[name])(student, teacher, log_prefix=prefix, **options)


HYBRID_CRITERIA = {"auto": "fidelity", "auto_kl": "kl"}


def parse_attention_layers(value, num_layers: int | None = None) -> tuple[list[int], int | None, str | None]:
    """``[0, 15]`` -> (layers, None, None); ``"auto:K"`` -> ([], K, "fidelity"): keep as attention the K layers
    whose stage-1 mixer reproduces the attention output worst; ``"auto_kl:K"`` -> ([], K, "kl"): the K layers
    whose linearisation alone (every other layer attention) raises the KL to the teacher most (fla-org's
    hybrid-distillation criterion). ``num_layers`` bounds K."""
    if isinstance(value, str):
        prefix, _, k = value.partition(":")
        if prefix not in HYBRID_CRITERIA or not k.isdigit():
            raise ConfigError(f"student.attention_layers={value!r}: use a list of layer indices, auto:K (worst "
                              "stage-1 fidelity) or auto_kl:K (largest KL increase when linearised alone)")
        if num_layers is not None and not 1 <= int(k) <= num_layers:
            raise ConfigError(f"student.attention_layers={value!r}: K must be in 1..{num_layers} (the teacher's "
                              "layers)")
        return [], int(k), HYBRID_CRITERIA[prefix]
    return [int(i) for i in (value or [])], None, None


@torch.no_grad()
def layer_kl_increase(trained, teacher, blocks: torch.Tensor, rebuild) -> dict[int, float]:
    """Per mixer layer: KL(teacher || model) per token of the teacher with only that layer linearised (its
    stage-1 mixer; ``rebuild(attention_layers)`` converts the teacher), on ``blocks``. The teacher's own KL is 0,
    so this is the increase that linearising the layer alone causes."""
    from opdf_exp.subquadratic.evaluate import perplexity_and_kl

    layers = list(trained.mixers())
    total = teacher.config.num_hidden_layers
    out = {}
    for index in layers:
        single = rebuild([i for i in range(total) if i != index]).eval()
        single.load_state_dict(trained.state_dict(), strict=False)  # layer index's stage-1 mixer
        out[index] = perplexity_and_kl(single, teacher, blocks)["kl_per_token"]
    return out


def fidelity_report(student, teacher, blocks: torch.Tensor, output_dir: Path | None) -> dict[int, dict]:
    """Per-layer fidelity (``layer_fidelity``) as a dict, a markdown table and a bar plot in ``output_dir``."""
    from opdf_exp.subquadratic.teacher_forcing import layer_fidelity

    fidelity = layer_fidelity(student, teacher, blocks)
    if output_dir is not None and fidelity:
        rows = ["| layer | output rel. error | matrix MSE |", "|---|---|---|"]
        rows += [f"| {i} | {f['output_rel_err']:.4g} | {f.get('matrix_mse', float('nan')):.4g} |"
                 for i, f in fidelity.items()]
        (output_dir / "layer_fidelity.md").write_text("\n".join(rows) + "\n")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(fidelity)), 3))
            ax.bar(list(fidelity), [f["output_rel_err"] for f in fidelity.values()])
            ax.set_xlabel("layer")
            ax.set_ylabel("attention-output rel. error")
            fig.tight_layout()
            fig.savefig(output_dir / "layer_fidelity.png", dpi=100)
            plt.close(fig)
        except Exception as error:  # a plot must never fail a run
            log.warning("layer-fidelity plot skipped: %s", error)
    return fidelity


class Stage3Decomposition:
    """OPDF inside the subquadratic pipeline: MPO over-parameterization during stage 3 (end-to-end KD) only.

    Why only stage 3: stages 1 and 2 train the mixers layer by layer from the teacher's activations (a
    different objective, and the stage-1 ``materialize`` path reads mixer weights directly); OPDF's claim is about
    the optimisation of the full student under KD. Why contract before evaluation: every number reported and the
    saved checkpoint are then the deployable dense model (``AutoModelForCausalLM`` reloads it, dense parameter
    count); ``export`` measures the MPO -> dense logit difference on a held-out batch to show nothing changed.
    Reuses the distillation task's pieces (``_decomposition_kwargs``, ``_tensor_alignment``).
    """

    def __init__(self, cfg: DictConfig, teacher, probe: torch.Tensor):
        self.cfg, self.teacher, self.probe = cfg, teacher, probe
        self.kind = str(cfg.decomposition.kind)
        self.report: dict[str, Any] = {"kind": self.kind}
        self._logits: torch.Tensor | None = None
        # measured settings are the distillation task's; refused here before stage 1 rather than at stage 3
        if str(cfg.decomposition.get("lr_scale", 1)) == "auto":
            raise ConfigError("decomposition.lr_scale=auto is measured by the distillation task only; give the "
                              "subquadratic task a number (e.g. the amplification a distill job logged)")
        if str((cfg.decomposition.get("align") or {}).get("weight", 0)).startswith("auto:"):
            raise ConfigError("decomposition.align.weight=auto:<ratio> is measured by the distillation task only; "
                              "give the subquadratic task a number (e.g. the opdf/align_weight a distill job logged)")

    def apply(self, student) -> dict[str, Any]:
        """Decompose ``student`` in place; returns the extra ``EndToEndKDModule`` options (alignment term)."""
        from opdf_exp.mpo import apply_decomposition, count_params, mpo_layers
        from opdf_exp.runner.distill_task import _decomposition_kwargs, _tensor_alignment

        dense_params = sum(p.numel() for p in student.parameters())
        started = time.perf_counter()
        apply_decomposition(student, **_decomposition_kwargs(self.cfg.decomposition))
        layers = mpo_layers(student)
        counts = count_params(student)
        self.report.update({"matrices": len(layers), "seconds": round(time.perf_counter() - started, 2),
                            "params_before": int(dense_params),
                            "params_train_time": int(sum(p.numel() for p in student.parameters())),
                            "params_trainable": int(counts["train"]), "params_inference": int(counts["inference"])})
        log.info("stage 3: decomposition %s over %d matrices; params %d dense -> %d during training", self.kind,
                 len(layers), dense_params, self.report["params_train_time"])
        scale = self.cfg.decomposition.get("lr_scale", 1)
        options = {"mpo_lr_scale": float(scale), "mpo_weight_decay": float(self.cfg.decomposition.get("weight_decay", 0))}
        align = self.cfg.decomposition.get("align")
        if not align or float(align.weight) <= 0:
            return options
        # the token mixers have no teacher counterpart: only same-named, same-shaped matrices (MLPs, kept
        # attention layers) are aligned, against the teacher's weights decomposed with the student layer's factors
        # and gauge; the others are skipped and counted here
        if str(align.get("on_mismatch", "skip")) == "error":
            log.info("stage 3: decomposition.align.on_mismatch=error is read as skip (mixers have no teacher matrix)")
        alignment = _tensor_alignment(self.cfg, student, self.teacher, on_mismatch="skip", decompose_teacher=False)
        self.report["align"] = {"weight": float(align.weight), "pairs": len(alignment.pairs),
                                "layers": len({p.student for p in alignment.pairs}),
                                "skipped": len(alignment.skipped)}
        return {**options, "align": alignment, "align_weight": float(align.weight)}

    @torch.no_grad()
    def _probe_logits(self, student) -> torch.Tensor:
        device = next(student.parameters()).device
        was_training = student.training
        student.eval()
        ids = self.probe.to(device)
        logits = student(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits.float()
        student.train(was_training)
        return logits

    def export(self, student) -> dict[str, Any]:
        """Contract every MPO layer back to dense, in place; records the logit difference and parameter count."""
        from opdf_exp.mpo import export_dense, mpo_layers

        if not mpo_layers(student):
            return self.report
        before = self._probe_logits(student)
        export_dense(student)
        after = self._probe_logits(student)
        self.report.update({"params_dense_export": int(sum(p.numel() for p in student.parameters())),
                            "probe_tokens": int(self.probe.numel()),
                            "max_logit_diff": float((before - after).abs().max()),
                            "max_abs_logit": float(before.abs().max())})
        log.info("stage 3: MPO student contracted to dense (%d params); max logit difference %.3g",
                 self.report["params_dense_export"], self.report["max_logit_diff"])
        return self.report


class RecoveryCurve(pl.Callback):
    """Perplexity and KL(teacher || student) per token on a few held-out blocks every ``every`` optimizer steps of
    a stage (0: never inside it), appended to ``points`` as {"stage", "step", "tokens", "perplexity", "kl"}."""

    def __init__(self, stage: str, teacher, blocks: torch.Tensor, every: int, tokens_per_step: int,
                 points: list[dict]):
        self.stage, self.teacher, self.blocks, self.every = stage, teacher, blocks, int(every or 0)
        self.tokens_per_step, self.points = tokens_per_step, points

    def measure(self, student, step: int, offset_tokens: int) -> None:
        from opdf_exp.subquadratic.evaluate import perplexity_and_kl

        if self.points and (self.points[-1]["stage"], self.points[-1]["step"]) == (self.stage, step):
            return  # the stage's last step was already measured
        was_training = student.training
        student.eval()
        quality = perplexity_and_kl(student, self.teacher, self.blocks)
        student.train(was_training)
        self.points.append({"stage": self.stage, "step": step, "tokens": offset_tokens + step * self.tokens_per_step,
                            "perplexity": quality["perplexity"], "kl": quality["kl_per_token"]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every and step % self.every == 0:
            self.measure(pl_module.student, step, self._offset)

    def on_train_start(self, trainer, pl_module) -> None:
        self._offset = self.points[-1]["tokens"] if self.points else 0


def write_recovery_curve(points: list[dict], output_dir: Path | None) -> None:
    """The recovery curve (perplexity and KL against training tokens, stage by stage) as a table and a plot."""
    if output_dir is None or not points:
        return
    rows = ["| after | step | tokens | perplexity | KL per token |", "|---|---|---|---|---|"]
    rows += [f"| {p['stage']} | {p['step']} | {p['tokens']:,} | {p['perplexity']:.2f} | {p['kl']:.4f} |"
             for p in points]
    (output_dir / "recovery_curve.md").write_text("\n".join(rows) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        tokens = [p["tokens"] for p in points]
        for ax, key, label in ((axes[0], "perplexity", "held-out perplexity"), (axes[1], "kl", "KL per token")):
            ax.plot(tokens, [p[key] for p in points], marker="o")
            ax.set_yscale("log")
            ax.set_xlabel("training tokens (all stages)")
            ax.set_ylabel(label)
        fig.tight_layout()
        fig.savefig(output_dir / "recovery_curve.png", dpi=100)
        plt.close(fig)
    except Exception as error:  # a plot must never fail a run
        log.warning("recovery-curve plot skipped: %s", error)


def stage_data(cfg: DictConfig, name: str, stage_cfg: dict, student, teacher, blocks: torch.Tensor,
               val: DataLoader, batch_size: int, epochs: int, extra: dict):
    """A stage's (train loader, val loader, cache report, epochs). Stage 1 with ``cache`` steps over cached teacher
    activations (shuffled rows, as many epochs as ``max_steps`` asks); stage 3 with ``teacher_cache`` reads sparse
    teacher targets by block index. Fills ``extra`` with the module options they need; pops the cache keys off
    ``stage_cfg``."""
    started = time.perf_counter()
    loader = DataLoader(_BlockDataset(blocks), batch_size=batch_size, shuffle=False)
    targets_cfg = stage_cfg.pop("teacher_cache", None) if name == "end_to_end" else None
    if targets_cfg:
        max_steps = stage_cfg.get("max_steps")
        if max_steps and epochs == 1:  # one unshuffled pass stops after max_steps batches: cache only those
            blocks = blocks[: int(max_steps) * batch_size]
        targets = stage3_teacher_targets(cfg, teacher, blocks, _plain(targets_cfg), batch_size)
        extra["teacher_targets"] = targets
        vocab = int(teacher.get_output_embeddings().weight.shape[0])
        report = {"teacher_cache": {"kind": targets.kind, "k": int(targets.ids.shape[-1]),
                                    "blocks": int(targets.ids.shape[0]),
                                    "mb": round(targets.nbytes() / 2 ** 20, 2),
                                    "bytes_per_token": round(targets.nbytes() / max(targets.entropy.numel(), 1), 1),
                                    "full_fp16_logits_bytes_per_token": 2 * vocab,
                                    "seconds": round(time.perf_counter() - started, 2)}}
        return DataLoader(_BlockDataset(blocks, with_index=True), batch_size=batch_size), val, report, epochs
    if name != "attention_transfer":
        return loader, val, {}, epochs
    mode = str(stage_cfg.pop("cache", "off"))
    max_gb = float(stage_cfg.pop("cache_max_gb", 4.0))
    if mode == "off":
        return loader, val, {}, epochs
    acts, val_acts = stage1_activations(cfg, student, teacher, blocks, val.dataset.blocks, mode, batch_size, max_gb)
    extra.update(activations=acts, val_activations=val_acts)
    report = {"cache": mode, "cache_mb": round((acts.nbytes() + val_acts.nbytes()) / 2 ** 20, 1),
              "cache_seconds": round(time.perf_counter() - started, 2)}
    loader = DataLoader(_IndexDataset(acts.num_blocks), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(int(cfg.get("seed") or 0)))
    stage_val = DataLoader(_IndexDataset(val_acts.num_blocks), batch_size=batch_size)
    return loader, stage_val, report, (-1 if stage_cfg.get("max_steps") else epochs)


@dataclass
class _StageRun:
    """What every stage of one job shares: the config, the teacher, the held-out blocks (the validation loader
    and the recovery curve's blocks), the loggers, and the recovery points measured so far."""
    cfg: DictConfig
    teacher: Any
    held_out: torch.Tensor
    val: DataLoader
    batch_size: int
    loggers: list
    curve_blocks: int
    recovery: list
    output_dir: Path | None
    fresh_attention: bool


def _skip_reason(name: str, share: float, blocks: torch.Tensor, enabled: bool, student) -> dict | None:
    """The report of a stage that does not run, or None when it runs."""
    if share == 0 or blocks.shape[0] == 0:
        return {"skipped": True, "blocks": 0}
    if not enabled:  # a control: the stage is left out, every other stage keeps its slice and budget
        return {"skipped": "enabled=false", "blocks": int(blocks.shape[0])}
    if name == "attention_transfer" and not student.mixers():
        # the Transformer student has no mixer to transfer into; its slice is left unused so that every student
        # sees the same tokens in stages 2 and 3
        return {"skipped": "no token-mixer layers", "blocks": int(blocks.shape[0])}
    return None


def _set_stage_train_mode(run: _StageRun, name: str, stage_cfg: dict, student) -> dict:
    """Freeze what the stage leaves alone (``train``: mixers | lora | all; pops ``train`` and ``lora``); the
    report's ``train`` and ``params_*`` entries. Stage 1 trains the mixers by construction."""
    train_mode, lora = str(stage_cfg.pop("train", "all")), stage_cfg.pop("lora", None)
    if name == "attention_transfer":
        return {}
    if not student.mixers() and (train_mode == "mixers" or train_mode == "lora" and run.fresh_attention):
        # the Transformer student: no mixer to train alone; with its attention freshly initialised (the baseline)
        # nothing may stay frozen either. The teacher itself (init=qkv_copy) keeps its LoRA.
        log.warning("%s: the student has no token mixers%s; train=%s falls back to train=all", name,
                    " and fresh attention" if run.fresh_attention else "", train_mode)
        train_mode = "all"
    from opdf_exp.subquadratic.adapters import set_train_mode

    return {"train": train_mode, **{f"params_{k}": v for k, v in set_train_mode(student, train_mode, lora).items()}}


def fit_stage(run: _StageRun, name: str, stage_cfg: dict, student, blocks: torch.Tensor,
              decomposition: Stage3Decomposition | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Fit one stage on its slice ``blocks`` (N, block_size) with its own optimizer, schedule and Trainer; leave
    the student plain (adapters merged, MPO contracted) and in eval mode. Returns the stage's report and, for
    stage 3 with a decomposition, the decomposition's (contraction included)."""
    from opdf_exp.runner.trainer import build_trainer

    stage_cfg = dict(stage_cfg)
    stage_cfg.pop("enabled", None)
    eval_every = int(stage_cfg.pop("eval_every", 0) or 0)
    max_steps = stage_cfg.get("max_steps")
    epochs = int(stage_cfg.get("epochs", 1) or 1)
    extra = decomposition.apply(student) if decomposition is not None and name == "end_to_end" else {}
    started = time.perf_counter()
    loader, stage_val, cached, epochs = stage_data(run.cfg, name, stage_cfg, student, run.teacher, blocks, run.val,
                                                   run.batch_size, epochs, extra)
    trained = _set_stage_train_mode(run, name, stage_cfg, student)
    module = _stage_module(name, student, run.teacher, stage_cfg, f"{name}/", **extra)
    overrides = {"max_steps": int(max_steps) if max_steps else -1, "max_epochs": epochs,
                 "val_check_interval": None, "check_val_every_n_epoch": 1}
    if module.manual:
        overrides["gradient_clip_val"] = None  # the layer-wise stages clip themselves (manual optimisation)
    if "cache" in cached and max_steps:  # validate once, at the end, not after every pass over a small cache
        overrides.update(check_val_every_n_epoch=None, val_check_interval=int(max_steps))
    curve = RecoveryCurve(name, run.teacher, run.held_out[:run.curve_blocks], eval_every,
                          run.batch_size * blocks.shape[1], run.recovery) if run.curve_blocks else None
    trainer = build_trainer(run.cfg, name, f"{name}/", run.loggers, overrides, checkpoints=False,
                            extra_callbacks=[curve] if curve else None)
    trainer.fit(module, loader, stage_val)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{name}/")}
    if trained:
        from opdf_exp.subquadratic.adapters import merge_adapters

        merge_adapters(student)  # a plain model again for the next stage, the evaluation and the save
    report = {"blocks": int(blocks.shape[0]), "tokens": int(blocks.numel()), "steps": trainer.global_step,
              "tokens_seen": int(trainer.global_step * run.batch_size * blocks.shape[1]),
              "seconds": round(time.perf_counter() - started, 2), **cached, **trained, **metrics}
    if getattr(module, "curve", None):
        report["curve"] = [{"step": p["step"], "mean": sum(p["errors"].values()) / len(p["errors"]),
                            "layers": {str(i): e for i, e in p["errors"].items()}} for p in module.curve]
        write_stage1_curve(module.curve, run.output_dir)
    decomposed = decomposition.export(student) if decomposition is not None and name == "end_to_end" else None
    student.eval()
    if curve is not None:  # after the stage (adapters merged, MPO contracted): the deployable student
        curve.measure(student, trainer.global_step, curve._offset)
        report.update(perplexity=run.recovery[-1]["perplexity"], kl_per_token=run.recovery[-1]["kl"])
    return report, decomposed


def run_stages(cfg: DictConfig, student, teacher, train_blocks: torch.Tensor, held_out: torch.Tensor,
               stages_cfg: dict, batch_size: int, loggers: list, after_stage1=None,
               decomposition: Stage3Decomposition | None = None, output_dir: Path | None = None,
               reuse: StageReuse | None = None, shared: dict | None = None, rebuild=None,
               fresh_attention: bool = False) -> dict[str, Any]:
    """Each stage with a non-zero share fits on its own slice (its own optimizer and schedule). After stage 1
    (run or skipped) ``after_stage1(student) -> student`` may rebuild the student (``attention_layers=auto:K``).
    ``decomposition`` over-parameterizes the student for stage 3 and contracts it back right after. With
    ``reuse`` the longest stored prefix of stages starts the job (``rebuild(layers)`` makes a student with other
    kept-attention layers; ``shared`` is the job state the prefix restores besides the student), and the state
    after every stage but the last is stored. ``fresh_attention``: the student's softmax attention was
    re-initialised (the Transformer baseline), so its later stages train everything."""
    from opdf_exp.data.lm import parse_splits, split_blocks

    shares = parse_splits(stages_cfg["splits"])
    slices = split_blocks(train_blocks, shares)
    val = DataLoader(_BlockDataset(held_out[: int(stages_cfg.get("val_blocks", 16))]), batch_size=batch_size)
    run = _StageRun(cfg, teacher, held_out, val, batch_size, loggers, int(stages_cfg.get("curve_blocks", 0) or 0),
                    [], output_dir, fresh_attention)
    report: dict[str, Any] = {}
    names = list(shares)
    enabled = {n: bool((stages_cfg.get(n) or {}).get("enabled", True)) for n in names}
    last = max((i for i, n in enumerate(names) if shares[n] > 0 and slices[n].shape[0] > 0 and enabled[n]),
               default=-1)
    prefix = reuse.find(last) if reuse is not None else None
    if prefix is not None:
        student = reuse.restore(prefix, student, rebuild, output_dir)
        report.update(prefix.report)
        run.recovery.extend(prefix.recovery)
        if shared is not None:
            shared.update(prefix.shared)
        for name in names[: prefix.index + 1]:
            report[name]["reused_from"] = str(reuse.folder(prefix.index))
    elif run.curve_blocks:  # the converted (and calibrated) student before any training
        RecoveryCurve("conversion", teacher, held_out[:run.curve_blocks], 0, 0, run.recovery).measure(student, 0, 0)
    for index, (name, share) in enumerate(shares.items()):
        if prefix is not None and index <= prefix.index:
            continue
        if name == "hidden_alignment" and after_stage1 is not None:
            student = after_stage1(student)
        skipped = _skip_reason(name, share, slices[name], enabled[name], student)
        if skipped is not None:
            report[name] = skipped
            continue
        report[name], decomposed = fit_stage(run, name, stages_cfg.get(name) or {}, student, slices[name],
                                             decomposition)
        if decomposed is not None:
            report["decomposition"] = decomposed
        if reuse is not None and index < last:
            reuse.save(index, student, report, run.recovery, shared or {}, output_dir)
    if run.recovery:
        report["recovery_curve"] = run.recovery
        write_recovery_curve(run.recovery, output_dir)
    report["student"] = student
    return report


def stage_reuse(cfg: DictConfig, task: dict, teacher, data) -> StageReuse:
    """``task.stages.reuse=true``: the store of stage prefixes (runner/stage_reuse.py), keyed on everything the
    student after a stage depends on. Settings that only name folders or change the console are left out."""
    from opdf_exp.distill.teacher_cache import teacher_fingerprint
    from opdf_exp.utils.keyed_file import tensor_digest

    stages = task["stages"]
    trainer = {k: v for k, v in _plain(cfg.trainer).items()
               if k not in ("default_root_dir", "enable_progress_bar", "enable_model_summary")}
    base = {"teacher": teacher_fingerprint(teacher), "train_blocks": tensor_digest(data.train),
            "held_out_blocks": tensor_digest(data.held_out), "seed": _plain(cfg.get("seed")),
            "student": _plain(cfg.student), "data": _plain(cfg.data), "trainer": trainer,
            "calibration_blocks": task.get("calibration_blocks"),
            "fidelity_blocks": (task.get("evaluation") or {}).get("fidelity_blocks"),
            "stages": {k: v for k, v in stages.items() if k not in STAGE_NAMES + ("reuse",)}}
    root = Path(str(cfg.paths.get("cache_dir") or cfg.paths.output_dir)).expanduser() / "stages"
    return StageReuse(root, base, {name: stages.get(name) for name in STAGE_NAMES})


def evaluate(model, teacher, tokenizer, held_out: torch.Tensor, eval_cfg: dict, is_teacher: bool) -> dict[str, Any]:
    from opdf_exp.subquadratic import evaluate as ev

    out: dict[str, Any] = {}
    blocks = held_out[: int(eval_cfg.get("max_blocks", 32))]
    quality = ev.perplexity_and_kl(model, None if is_teacher else teacher, blocks, int(eval_cfg.get("batch_size", 4)))
    out["perplexity"] = quality["perplexity"]
    if not is_teacher:
        out["kl_per_token"] = quality["kl_per_token"]
    out["eval_tokens"] = quality["eval_tokens"]
    out["params"] = ev.count_parameters(model)
    tp = eval_cfg.get("throughput") or {}
    if tp:
        out.update(ev.throughput(model, int(tp.get("prompt_len", 128)), int(tp.get("decode_steps", 32)),
                                 repeats=int(tp.get("repeats", 1)), warmup=bool(tp.get("warmup", True))))
    for t in eval_cfg.get("state_bytes_at", [512, 4096]):
        out[f"state_bytes_T{int(t)}"] = ev.state_bytes(model, int(t))
    pk = eval_cfg.get("passkey") or {}
    for n in pk.get("context_tokens", []):
        out[f"passkey_acc_{int(n)}"] = ev.passkey_accuracy(model, tokenizer.encode, int(n), int(pk.get("trials", 5)))
    mq = eval_cfg.get("mqar") or {}
    if mq:
        pool = sorted(set(int(t) for t in held_out[:8].flatten().tolist()))  # tokens the model has seen in text
        out["mqar_acc"] = ev.mqar_accuracy(model, pool, int(mq.get("num_pairs", 16)), int(mq.get("num_queries", 16)),
                                           int(mq.get("trials", 8)))
    return out


def check_train_modes(student, stages_cfg: dict) -> None:
    """Before any stage runs: each later stage's ``train`` mode is known and its LoRA targets exist."""
    from opdf_exp.subquadratic.adapters import DEFAULT_TARGETS, TRAIN_MODES, check_lora_targets

    for name in ("hidden_alignment", "end_to_end"):
        stage = stages_cfg.get(name) or {}
        mode = str(stage.get("train", "all"))
        if mode not in TRAIN_MODES:
            raise ConfigError(f"task.stages.{name}.train={mode!r} is unknown; use one of {list(TRAIN_MODES)}")
        if mode == "lora":
            check_lora_targets(student, list((stage.get("lora") or {}).get("target_modules", DEFAULT_TARGETS)))
    stage3 = stages_cfg.get("end_to_end") or {}
    cache = stage3.get("teacher_cache")
    if cache:
        from opdf_exp.distill.sparse_targets import check_settings

        check_settings(str(cache.get("kind", "sampled")), cache.get("k", 64), cache.get("temperature", 1.0))
        conflicts = [f"{key}={stage3.get(key)}" for key, default in
                     (("divergence", "forward_kl"), ("on_policy", 0.0), ("chunk_size", None),
                      ("kl_reduction", "token_mean")) if stage3.get(key, default) != default]
        if conflicts:
            raise ConfigError(f"task.stages.end_to_end.teacher_cache estimates forward KL on whole student logits "
                              f"only, not with {', '.join(conflicts)}; set teacher_cache=null or change that option")
        if float(cache.get("temperature", 1.0)) != float(stage3.get("temperature", 1.0)):
            raise ConfigError("task.stages.end_to_end.teacher_cache.temperature must equal the stage's temperature "
                              f"({stage3.get('temperature', 1.0)})")


def calibrate(student, teacher, train_blocks: torch.Tensor, num_blocks: int, init: str) -> dict[str, Any]:
    """Fit the mixers' output scales to the teacher on the first ``num_blocks`` training blocks right after
    QKV copying (``subquadratic/calibrate.py``); 0 blocks, a random init or no mixer: skipped."""
    from opdf_exp.subquadratic.calibrate import calibrate_output_scales

    if num_blocks <= 0 or init != "qkv_copy" or not student.mixers():
        return {"skipped": True}
    started = time.perf_counter()
    errors = calibrate_output_scales(student, teacher, train_blocks[:num_blocks])
    mean = sum(errors.values()) / len(errors)
    log.info("calibrated the mixers' output scales on %d blocks: mean layer error %.3f", num_blocks, mean)
    return {"blocks": num_blocks, "mean_layer_error": mean, "seconds": round(time.perf_counter() - started, 2)}


def _table(rows: dict[str, dict]) -> str:
    cols = ["perplexity", "kl_per_token", "passkey", "mqar_acc", "params", "prefill_tokens_per_s",
            "decode_tokens_per_s", "state_bytes_T512", "state_bytes_T4096"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        pk = [v for k, v in r.items() if k.startswith("passkey_acc_")]
        cells = []
        for c in cols:
            v = (sum(pk) / len(pk) if pk else None) if c == "passkey" else r.get(c)
            cells.append("-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4g}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_blocks(cfg: DictConfig, teacher, tokenizer):
    """The job's blocks (``load_blocks``); with ``data.sequence_kd.enabled`` the training blocks are replaced by the
    teacher's own continuations (generated once, cached on disk)."""
    data = load_blocks(cfg.data, tokenizer)
    sequence_kd = _plain(cfg.data.get("sequence_kd")) or {}
    if sequence_kd.get("enabled"):
        from opdf_exp.subquadratic.sequence_kd import SequenceKDSettings, sequence_kd_blocks

        settings = SequenceKDSettings(**{k: v for k, v in sequence_kd.items() if k != "enabled"})
        data.train = sequence_kd_blocks(teacher, data.train, settings, cfg.paths.get("cache_dir"))
    log.info("blocks: %d train / %d held-out of %d tokens (%d / %d documents)", data.train.shape[0],
             data.held_out.shape[0], data.train.shape[1], len(data.train_docs), len(data.held_out_docs))
    return data


def student_builder(student_cfg: dict, teacher):
    """``build(attention_layers) -> student``: the teacher converted as ``student_cfg`` says (arch, init, the
    mixer options, RoPE, LoLCATs' window), with the given layers kept as softmax attention."""
    from opdf_exp.subquadratic import convert

    arch, init = str(student_cfg["arch"]), str(student_cfg.get("init", "qkv_copy"))
    options = dict(student_cfg.get("options") or {})
    if student_cfg.get("rope"):  # the teacher's rotary embedding on the mixers' queries and keys
        options["rope"] = True
    if student_cfg.get("window"):  # LoLCATs' sliding-window softmax branch (linear attention)
        options.update(window=int(student_cfg["window"]), normalize=True)
    return lambda layers: convert(teacher, arch, init=init, attention_layers=layers, **options)


class HybridChooser:
    """Runs after stage 1 (``run_stages``' ``after_stage1``): per-layer fidelity of the trained student; with
    ``auto:K`` / ``auto_kl:K``, rebuild it with the K layers the criterion picks kept as softmax attention (the
    other layers keep their stage-1 mixers). Both criteria's picks are reported in ``chosen``, which a stored
    stage prefix restores."""

    def __init__(self, teacher, build, blocks: torch.Tensor, output_dir: Path, auto_k: int | None,
                 criterion: str | None):
        self.teacher, self.build, self.blocks, self.output_dir = teacher, build, blocks, output_dir
        self.auto_k, self.criterion = auto_k, criterion
        self.chosen: dict[str, Any] = {}

    def __call__(self, trained):
        fidelity = fidelity_report(trained, self.teacher, self.blocks, self.output_dir)
        self.chosen["fidelity"] = {str(i): f for i, f in fidelity.items()}
        if not self.auto_k:
            return trained
        k = self.auto_k
        by_fidelity = sorted(sorted(fidelity, key=lambda i: fidelity[i]["output_rel_err"], reverse=True)[:k])
        kl = layer_kl_increase(trained, self.teacher, self.blocks, self.build)
        by_kl = sorted(sorted(kl, key=kl.get, reverse=True)[:k])
        self.chosen["layer_kl_increase"] = {str(i): v for i, v in kl.items()}
        self.chosen["picks"] = {"fidelity": by_fidelity, "kl": by_kl}
        worst = by_kl if self.criterion == "kl" else by_fidelity
        self.chosen["attention_layers"] = worst
        log.info("attention_layers=%s:%d keeps layers %s as attention (fidelity picks %s, KL increase picks %s)",
                 "auto_kl" if self.criterion == "kl" else "auto", k, worst, by_fidelity, by_kl)
        rebuilt = self.build(sorted(worst))
        rebuilt.load_state_dict(trained.state_dict(), strict=False)  # stage-1 mixers of the remaining layers
        return rebuilt


def subquadratic(cfg: DictConfig, **params: Any) -> dict[str, Any]:
    """Teacher -> ``convert`` -> stages -> evaluation (see the module docstring)."""
    from opdf_exp.runner.loggers import build_loggers, log_final

    task = {k: _plain(v) for k, v in params.items()}
    output_dir = Path(str(cfg.paths.output_dir))
    torch.set_num_threads(int(task.get("num_threads") or torch.get_num_threads()))
    started = time.perf_counter()
    teacher, tokenizer = load_teacher(cfg.teacher, cfg.paths.get("cache_dir"))
    data = training_blocks(cfg, teacher, tokenizer)
    student_cfg = _plain(cfg.student)
    init = str(student_cfg.get("init", "qkv_copy"))
    build = student_builder(student_cfg, teacher)
    attention_layers, auto_k, criterion = parse_attention_layers(student_cfg.get("attention_layers"),
                                                                 int(teacher.config.num_hidden_layers))
    student = build(attention_layers)
    check_train_modes(student, task["stages"])
    calibration = calibrate(student, teacher, data.train, int(task.get("calibration_blocks") or 0), init)
    fidelity_blocks = data.held_out[: int((task.get("evaluation") or {}).get("fidelity_blocks", 4))]
    chooser = HybridChooser(teacher, build, fidelity_blocks, output_dir, auto_k, criterion)
    chosen = chooser.chosen

    loggers = build_loggers(cfg.get("logger"))
    decomposition = None
    if cfg.get("decomposition") is not None and str(cfg.decomposition.kind) != "none":
        decomposition = Stage3Decomposition(cfg, teacher, data.held_out[: int(cfg.data.batch_size)])
    reuse = stage_reuse(cfg, task, teacher, data) if task["stages"].get("reuse") else None
    stages = run_stages(cfg, student, teacher, data.train, data.held_out, task["stages"],
                        int(cfg.data.batch_size), loggers, chooser, decomposition, output_dir, reuse=reuse,
                        shared=chosen, rebuild=build, fresh_attention=init == "random") \
        if cfg.get("train", True) else {}
    student = stages.pop("student", student)
    recovery = stages.pop("recovery_curve", [])
    decomposed = stages.pop("decomposition", None)
    if decomposition is not None and decomposed is None:
        log.warning("decomposition=%s had no effect: stage 3 (end_to_end) did not run", decomposition.kind)
        decomposed = {"kind": decomposition.kind, "skipped": "stage 3 (end_to_end) did not run"}
    student.eval()
    eval_cfg = task.get("evaluation") or {}
    rows = {f"student ({student_cfg.get('name', student_cfg['arch'])})":
            evaluate(student, teacher, tokenizer, data.held_out, eval_cfg, False)}
    if eval_cfg.get("teacher", True):
        rows["teacher"] = evaluate(teacher, None, tokenizer, data.held_out, eval_cfg, True)
    metrics = {f"{'teacher' if name == 'teacher' else 'student'}/{k}": v for name, r in rows.items()
               for k, v in r.items()}
    if task.get("save_student", True):
        student.save_pretrained(output_dir / "student")
    table = _table(rows)
    (output_dir / "results_table.md").write_text(table + "\n")
    if loggers:
        log_final(loggers, {k: _plain(v) for k, v in cfg.items() if k != "hydra"}, metrics)
    return {"metrics": metrics, "stages": stages, "layer_fidelity": chosen.get("fidelity", {}),
            "attention_layers": list(student.config.attention_layers or []), "tables": {"subquadratic": table},
            **({"hybrid_picks": chosen["picks"], "layer_kl_increase": chosen["layer_kl_increase"]}
               if "picks" in chosen else {}),
            "params": {"student": rows[next(iter(rows))]["params"],
                       **({"student_train_time": decomposed["params_train_time"],
                           "student_inference": decomposed["params_dense_export"]}
                          if decomposed and "params_dense_export" in decomposed else {})},
            "decomposition": decomposed or {"kind": "none"}, "calibration": calibration,
            "recovery_curve": recovery,
            "data": {"train_blocks": int(data.train.shape[0]), "held_out_blocks": int(data.held_out.shape[0]),
                     "block_size": int(data.train.shape[1]), "train_documents": len(data.train_docs),
                     "held_out_documents": len(data.held_out_docs)},
            "task_seconds": round(time.perf_counter() - started, 2)}
