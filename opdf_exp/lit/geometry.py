"""LightningModules and training loops of the geometry studies (moved out of ``opdf_exp.geometry``, which holds
only maths and models).

Every loop takes ``make_trainer(stage, **trainer_overrides) -> pl.Trainer`` from the runner
(:class:`opdf_exp.runner.trainer.StageTrainers`), so these studies get the same loggers (W&B included),
progress bars, precision and devices as every other task; each stage logs under its own prefix
(``toy_teachers/train/loss``, ``sae/train/loss``, ``student_16/val/kd``).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Protocol, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from opdf_exp.distill.adapters import model_logits
from opdf_exp.distill.terms import soft_target_kl
from opdf_exp.errors import ConfigError
from opdf_exp.geometry import toy
from opdf_exp.geometry.distill_lm import LMTrainConfig, eval_loader, lm_cross_entropy, train_loader
from opdf_exp.geometry.sae import SAETrainConfig, SparseAutoencoder
from opdf_exp.geometry.toy import _Bank
from opdf_exp.utils.optim import adamw, fused_for, with_schedule
from opdf_exp.utils.threads import torch_threads


class TrainerFactory(Protocol):
    def __call__(self, stage: str, **trainer_overrides) -> pl.Trainer: ...


@contextlib.contextmanager
def quiet_lightning():
    """Silence Lightning's per-fit banner lines (GPU available, ...) for the many small fits of a study."""
    names = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fit_module(module: pl.LightningModule, loader: DataLoader, max_steps: int, make_trainer: TrainerFactory,
               stage: str) -> None:
    """One fit with no validation or checkpoints (the studies evaluate themselves) and no gradient clipping."""
    module.log_prefix = f"{stage}/"
    with quiet_lightning():
        trainer = make_trainer(stage, max_steps=max_steps, max_epochs=-1, limit_val_batches=0,
                               num_sanity_val_steps=0, gradient_clip_val=None, val_check_interval=None)
        trainer.fit(module, train_dataloaders=loader)


# ------------------------------------------------------------------------------------------------ toy study
class BatchedToyModule(pl.LightningModule):
    """Trains every bank at once: the loss is the *sum* of the per-model losses, so each model receives exactly
    its own gradient (Adam is per-parameter, so models do not interact)."""

    def __init__(self, banks: dict[int, _Bank], lr: float, max_steps: int, warmup_steps: int = 0,
                 schedule: str = "cosine", log_every: int = 0):
        super().__init__()
        self.banks = nn.ModuleDict({str(n): bank for n, bank in banks.items()})
        self.lr, self.max_steps, self.warmup_steps, self.schedule = lr, max_steps, warmup_steps, schedule
        self.log_every = log_every
        self.history: list[tuple[int, float]] = []
        self.log_prefix = ""

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total = sum(bank.losses(batch[key]).sum() for key, bank in self.banks.items())
        if self.log_every and batch_idx % self.log_every == 0:
            self.history.append((batch_idx, float(total.detach())))
        self.log(f"{self.log_prefix}train/loss", total.detach(), prog_bar=True)
        return total

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        return with_schedule(opt, self.warmup_steps, self.max_steps, self.schedule)



def run_toy_sweep(sweep: toy.ToySweep, cfg: toy.ToyTrainConfig | None = None, *, seed: int = 0,
                  num_threads: int | None = 1, make_trainer: TrainerFactory) -> toy.ToyRun:
    """Train phase 1 (teachers, controls) then phase 2 (students) and evaluate every model."""
    cfg = cfg or toy.ToyTrainConfig()
    if cfg.batch_size < 1 or cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} and batch_size={cfg.batch_size} must be >= 1")
    m = len(sweep.models)
    out = toy.ToyRun(sweep, np.full(m, np.nan), np.full(m, np.nan), np.zeros(m, dtype=int), [None] * m,
                 np.full(m, np.nan), {})
    p_active, lookup = toy.p_active_per_n(sweep)
    phase1 = [i for i, s in enumerate(sweep.models) if s.role in ("teacher", "control")]
    phase2 = [i for i, s in enumerate(sweep.models) if s.role == "student"]
    with torch_threads(num_threads):
        started = time.perf_counter()
        banks, members = toy.build_banks(sweep, phase1, lookup, seed)
        module = BatchedToyModule(banks, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.log_every)
        loader = DataLoader(toy.SparseStream(p_active, cfg.batch_size, seed + 1), batch_size=None)
        fit_module(module, loader, cfg.steps, make_trainer, "toy_teachers")
        module.cpu()
        out.timings["phase1_s"] = time.perf_counter() - started
        toy.evaluate_sweep(sweep, banks, members, cfg, out)
        teachers = {}
        for n, bank in banks.items():
            w = bank.weights().detach()
            for j, i in enumerate(members[n]):
                if sweep.models[i].role == "teacher":
                    teachers[i] = (w[j, : sweep.models[i].width].clone(), bank.b[j, 0].detach().clone())
        out.timings["eval1_s"] = time.perf_counter() - started - out.timings["phase1_s"]
        if phase2:
            started = time.perf_counter()
            steps2 = cfg.student_steps or cfg.steps
            banks2, members2 = toy.build_banks(sweep, phase2, lookup, seed + 2, teachers)
            module2 = BatchedToyModule(banks2, cfg.lr, steps2, cfg.warmup_steps, cfg.schedule, cfg.log_every)
            loader2 = DataLoader(toy.SparseStream(p_active, cfg.batch_size, seed + 3), batch_size=None)
            fit_module(module2, loader2, steps2, make_trainer, "toy_students")
            module2.cpu()
            out.timings["phase2_s"] = time.perf_counter() - started
            started = time.perf_counter()
            toy.evaluate_sweep(sweep, banks2, members2, cfg, out)
            out.timings["eval2_s"] = time.perf_counter() - started
    return out



# ------------------------------------------------------------------------------------------------ LM floor
class _LMBase(pl.LightningModule):
    def __init__(self, lr: float, betas: Sequence[float], weight_decay: float, warmup_steps: int, max_steps: int):
        super().__init__()
        self.lr, self.betas, self.weight_decay = lr, tuple(betas), weight_decay
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.eval_history: list[dict[str, float]] = []
        self.log_prefix = ""
        self._eval_sums: dict[str, float] = {}
        self._eval_count = 0

    def trainable(self) -> nn.Module:
        raise NotImplementedError

    def configure_optimizers(self):
        opt = adamw([self.trainable()], self.lr, self.weight_decay, self.betas, fused_for(self))
        return with_schedule(opt, self.warmup_steps, self.max_steps, "cosine", min_ratio=0.1)

    def on_validation_epoch_start(self) -> None:
        self._eval_sums, self._eval_count = {}, 0

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self._eval_sums[key] = self._eval_sums.get(key, 0.0) + float(value)
        self._eval_count += 1

    def on_validation_epoch_end(self) -> None:
        if self._eval_count:
            record = {k: v / self._eval_count for k, v in self._eval_sums.items()}
            record["step"] = int(self.global_step)
            self.eval_history.append(record)
            self.log_dict({f"{self.log_prefix}val/{k}": v for k, v in record.items() if k != "step"})


class CausalLMModule(_LMBase):
    """Next-token cross-entropy training of a (teacher) causal LM; eval CE on held-out windows."""

    def __init__(self, model: nn.Module, lr: float = 3e-3, betas=(0.9, 0.95), weight_decay: float = 0.01,
                 warmup_steps: int = 50, max_steps: int = 1000):
        super().__init__(lr, betas, weight_decay, warmup_steps, max_steps)
        self.model = model

    def trainable(self) -> nn.Module:
        return self.model

    def training_step(self, batch, batch_idx):
        loss = lm_cross_entropy(model_logits(self.model, input_ids=batch), batch)
        self.log(f"{self.log_prefix}train/loss", loss.detach(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self._accumulate({"ce": lm_cross_entropy(model_logits(self.model, input_ids=batch), batch)})


class KDModule(_LMBase):
    """Distils a frozen teacher into ``student`` with :func:`soft_target_kl`; evaluation reports the same KD loss,
    the T=1 KL and the student's next-token CE on held-out windows."""

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 2.0, lr: float = 3e-3,
                 betas=(0.9, 0.95), weight_decay: float = 0.01, warmup_steps: int = 50, max_steps: int = 1000):
        super().__init__(lr, betas, weight_decay, warmup_steps, max_steps)
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature = float(temperature)

    def trainable(self) -> nn.Module:
        return self.student

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            t_logits = model_logits(self.teacher, input_ids=batch)
        loss = soft_target_kl(model_logits(self.student, input_ids=batch), t_logits, self.temperature)
        self.log(f"{self.log_prefix}train/loss", loss.detach(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        t_logits = model_logits(self.teacher, input_ids=batch)
        s_logits = model_logits(self.student, input_ids=batch)
        self._accumulate({"kd": soft_target_kl(s_logits, t_logits, self.temperature),
                          "kl_t1": soft_target_kl(s_logits, t_logits, 1.0),
                          "ce": lm_cross_entropy(s_logits, batch)})



def fit_lm(module: _LMBase, train_windows: torch.Tensor, eval_windows: torch.Tensor, cfg: LMTrainConfig, seed: int,
           make_trainer: TrainerFactory, stage: str = "lm") -> list[dict]:
    """Train with a Lightning Trainer, validating every ``eval_every`` steps on the first ``eval_batches`` held-out
    batches; returns the evaluation history."""
    if cfg.steps < 1:
        raise ConfigError(f"steps={cfg.steps} must be >= 1")
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, cfg.steps // 10)
    module.warmup_steps, module.max_steps = warmup, cfg.steps
    every = max(1, min(cfg.eval_every, cfg.steps))
    module.log_prefix = f"{stage}/"
    with quiet_lightning():
        trainer = make_trainer(stage, max_steps=cfg.steps, max_epochs=1, val_check_interval=every,
                               check_val_every_n_epoch=None, limit_val_batches=cfg.eval_batches,
                               num_sanity_val_steps=0, gradient_clip_val=cfg.gradient_clip_val)
        trainer.fit(module, train_dataloaders=train_loader(train_windows, cfg.batch_size, cfg.steps, seed),
                    val_dataloaders=eval_loader(eval_windows, cfg.eval_batch_size))
    module.cpu()
    return module.eval_history



# ------------------------------------------------------------------------------------------------ SAE
class SAEModule(pl.LightningModule):
    """Lightning wrapper: Adam, decoder renormalised after every optimizer step, optional gradient clipping."""

    def __init__(self, sae: SparseAutoencoder, lr: float = 1e-3, betas=(0.9, 0.999), warmup_steps: int = 0,
                 max_steps: int = 1000, lr_decay: bool = True):
        super().__init__()
        self.sae = sae
        self.lr, self.betas, self.warmup_steps, self.max_steps, self.lr_decay = lr, tuple(betas), warmup_steps, max_steps, lr_decay
        self.history: list[dict[str, float]] = []
        self.log_prefix = ""

    def training_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        loss, parts = self.sae.loss(x)
        self.log(f"{self.log_prefix}train/loss", loss.detach(), prog_bar=True)
        if batch_idx % 50 == 0:
            self.history.append({"step": batch_idx, "loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.sae.normalize_decoder()

    def configure_optimizers(self):
        # constant, then linear decay to 0 over the last 20% (as in Gao et al. / common SAE recipes)
        opt = torch.optim.Adam(self.parameters(), lr=self.lr, betas=self.betas)
        return with_schedule(opt, self.warmup_steps, self.max_steps, "tail_linear" if self.lr_decay else "constant")



def train_sae(activations: torch.Tensor, cfg: SAETrainConfig, make_trainer: TrainerFactory) -> tuple[SparseAutoencoder, float]:
    """Train an SAE on ``activations`` (tokens x d_in). Returns the SAE and the input scale it was trained at
    (the SAE sees ``activations * scale``; :func:`measure` takes the same scale and reports original units)."""
    x = activations.detach().float().reshape(-1, activations.shape[-1])
    if x.shape[0] < 2:
        raise ConfigError(f"only {x.shape[0]} activation vectors were collected; feed more tokens to the SAE")
    d_in = x.shape[1]
    n_latents = int(round(cfg.expansion * d_in)) if cfg.expansion else int(cfg.n_latents)
    scale = 1.0
    if cfg.normalize:
        centered_sq = (x - x.mean(0)).square().sum(-1).mean()
        scale = float(math.sqrt(d_in / max(float(centered_sq), 1e-12)))
    xs = x * scale
    torch.manual_seed(cfg.seed)
    sae = SparseAutoencoder(d_in, n_latents, cfg.kind, cfg.k, cfg.l1_coeff, cfg.aux_k, cfg.aux_coeff,
                            cfg.dead_after_tokens, seed=cfg.seed)
    with torch.no_grad():
        sae.b_pre.copy_(xs.mean(0))
    module = SAEModule(sae, cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=cfg.steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(TensorDataset(xs), batch_size=min(cfg.batch_size, xs.shape[0]), shuffle=True, generator=gen,
                        drop_last=xs.shape[0] >= cfg.batch_size)
    fit_module(module, loader, cfg.steps, make_trainer, "sae")
    sae.cpu()
    sae.history = module.history
    return sae.eval(), scale


