"""The 48-config toy study: batched toy models of superposition, teachers distilled into every smaller width.

Model (Elhage et al. 2022): ``h = W x``, ``x_hat = ReLU(W^T W x + b)``, ``W`` in R^{d x n}; feature ``i`` is active
with probability ``1 - alpha`` and then uniform on [0, 1]; the task loss is ``E[sum_i I_i (x_hat_i - x_i)^2]``.

Protocol (reconstructed, the paper does not state it; see docs/geometry.md):

1. *Phase 1* trains every teacher (``n x alpha x d_T x seed``) on the task, together with optional *controls*
   (students of each width trained directly on ``x``, no teacher).
2. *Phase 2* trains, for every teacher, one student per smaller width on the teacher's output with the
   importance-weighted MSE ``E[sum_i I_i (x_hat_S,i - x_hat_T,i)^2]``.
3. The *observed floor* of a student is its task loss (or, with ``floor_metric="distill"``, its distillation loss)
   on a fixed evaluation set.

Why it is fast: all models of one feature count ``n`` live in one ``(M, d_max, n)`` parameter tensor (rows beyond a
model's width are masked) and train together with two ``bmm`` calls per step; all models of one ``(n, alpha,
seed)`` share each batch of ``x``, so sampling costs almost nothing. One Lightning ``Trainer`` run per phase trains
the whole sweep. This module does not import Hydra.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import IterableDataset

from opdf_exp.errors import ConfigError
from opdf_exp.geometry import theory

log = logging.getLogger(__name__)

IMPORTANCE_KINDS = ("zipf", "geometric", "uniform")
FLOOR_METRICS = ("task", "distill")


def importance_profile(n: int, kind: str = "zipf", s: float = 1.0, base: float = 0.7) -> np.ndarray:
    """Feature importances, non-increasing: ``zipf`` I_i = i^-s (i = 1..n), ``geometric`` I_i = base^(i-1)
    (the TMS demos use 0.7), ``uniform`` I_i = 1."""
    i = np.arange(1, int(n) + 1, dtype=float)
    if kind == "zipf":
        return i ** (-float(s))
    if kind == "geometric":
        if not 0 < base <= 1:
            raise ConfigError(f"importance base={base} must be in (0, 1] for the geometric profile")
        return float(base) ** (i - 1)
    if kind == "uniform":
        return np.ones(int(n))
    raise ConfigError(f"importance kind '{kind}' is unknown; use one of {', '.join(IMPORTANCE_KINDS)}")


def toy_ex2(alpha: float) -> float:
    """E[x_i^2] for x_i ~ U[0,1] with probability 1 - alpha, else 0: (1 - alpha) / 3."""
    return (1.0 - float(alpha)) / 3.0


def sample_sparse(generator: torch.Generator, p_active: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """x of shape (G, batch, n): feature on with probability p_active[g], then U[0,1] (one uniform draw per entry:
    ``u < p`` decides, ``u / p`` is the value, which is U[0,1] given ``u < p``)."""
    u = torch.rand(p_active.numel(), batch, n, generator=generator)
    p = p_active.view(-1, 1, 1)
    return torch.where(u < p, u / p, torch.zeros((), dtype=u.dtype))


# ----------------------------------------------------------------------------------------------------- the sweep
@dataclass
class ToyModelSpec:
    role: str  # teacher | student | control
    n: int
    alpha: float
    width: int
    seed: int
    teacher_width: int | None = None  # students only
    teacher_id: int | None = None  # students only: index of the teacher in the sweep's model list


@dataclass
class ToySweep:
    """What to train. ``models`` lists teachers and controls (phase 1) and students (phase 2)."""

    n_features: list[int]
    alphas: list[float]
    teacher_widths: list[int]
    seeds: list[int]
    importance: dict = field(default_factory=lambda: {"kind": "zipf", "s": 1.0})
    include_teacher_width: bool = False
    controls: bool = True
    models: list[ToyModelSpec] = field(default_factory=list)

    def __post_init__(self):
        for name in ("n_features", "teacher_widths"):
            values = list(getattr(self, name))
            theory.check_widths(values)
            if any(int(v) < 1 for v in values):
                raise ConfigError(f"{name}={values} must be positive integers")
            setattr(self, name, [int(v) for v in values])
        theory.capacity(np.asarray(self.alphas, dtype=float))
        self.alphas = [float(a) for a in self.alphas]
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ConfigError("seeds is empty; give at least one seed, e.g. seeds=1")
        for n in self.n_features:
            for d in self.teacher_widths:
                if d > n:
                    raise ConfigError(f"teacher width {d} exceeds n={n} features; use widths <= n")
        if not self.models:
            self.models = self._enumerate()

    def importances(self, n: int) -> np.ndarray:
        return importance_profile(n, **self.importance)

    def student_widths(self, d_t: int) -> list[int]:
        return list(range(1, d_t + (1 if self.include_teacher_width else 0)))

    def _enumerate(self) -> list[ToyModelSpec]:
        models: list[ToyModelSpec] = []
        teacher_ids = {}
        for seed in self.seeds:
            for n in self.n_features:
                for alpha in self.alphas:
                    for d_t in self.teacher_widths:
                        teacher_ids[(seed, n, alpha, d_t)] = len(models)
                        models.append(ToyModelSpec("teacher", n, alpha, d_t, seed))
                    if self.controls:
                        for d in range(1, max(self.teacher_widths) + (1 if self.include_teacher_width else 0)):
                            models.append(ToyModelSpec("control", n, alpha, d, seed))
        for seed in self.seeds:
            for n in self.n_features:
                for alpha in self.alphas:
                    for d_t in self.teacher_widths:
                        for d_s in self.student_widths(d_t):
                            models.append(ToyModelSpec("student", n, alpha, d_s, seed, d_t,
                                                       teacher_ids[(seed, n, alpha, d_t)]))
        return models


class TmsLoss(torch.autograd.Function):
    """Per-model importance-weighted MSE of the tied-weight toy model, with a hand-written backward.

    ``loss_m = mean_b sum_i I_i (ReLU(W_m^T W_m x + b_m)_i - target_i)^2``. Autograd keeps about twice as many
    (M, batch, n) intermediates; this version is ~2x faster on CPU, where the sweep is memory-bound.
    Gradients match autograd to float32 rounding (tested).

    Always float32, autocast or not: the study measures loss floors to a few parts in 10^4, which bf16 (8 bits of
    mantissa) cannot resolve, and a backward written by hand must see the dtypes its forward saved.
    """

    @staticmethod
    def forward(ctx, w, b, x, target, imp):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return TmsLoss._forward(ctx, w.float(), b.float(), x.float(), target.float(), imp.float())

    @staticmethod
    def _forward(ctx, w, b, x, target, imp):
        m, batch, _ = x.shape
        h = torch.bmm(x, w.transpose(1, 2))
        out = torch.baddbmm(b, h, w).clamp_min_(0)
        r = out - target
        ir = r * imp
        loss = torch.linalg.vecdot(ir.view(m, -1), r.view(m, -1)) / batch
        grad_pre = torch.ops.aten.threshold_backward(ir, out, 0.0)  # I * r where the ReLU is active
        ctx.save_for_backward(w, x, h, grad_pre)
        return loss

    @staticmethod
    def backward(ctx, grad):
        w, x, h, g = ctx.saved_tensors
        m, batch, _ = x.shape
        scale = (grad * (2.0 / batch)).view(m, 1, 1)
        dh = torch.bmm(g, w.transpose(1, 2))
        dw = torch.bmm(h.transpose(1, 2), g).add_(torch.bmm(dh.transpose(1, 2), x))
        return dw * scale, g.sum(1, keepdim=True) * scale, None, None, None


class _Bank(nn.Module):
    """All models with ``n`` features: W (M, d_max, n) with rows >= width masked, b (M, 1, n)."""

    def __init__(self, n: int, widths: Sequence[int], group_index: Sequence[int], importances: np.ndarray,
                 generator: torch.Generator, teacher: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        widths_t = torch.as_tensor(list(widths), dtype=torch.long)
        m, d_max = len(widths), int(widths_t.max())
        rows = torch.arange(d_max).view(1, -1, 1) < widths_t.view(-1, 1, 1)
        bound = torch.sqrt(6.0 / (widths_t.float() + n)).view(-1, 1, 1)  # Xavier-uniform per model
        weight = (torch.rand(m, d_max, n, generator=generator) * 2 - 1) * bound * rows
        self.n = n
        self.W = nn.Parameter(weight)
        self.b = nn.Parameter(torch.zeros(m, 1, n))
        self.register_buffer("rows", rows.float())
        self.register_buffer("imp", torch.as_tensor(importances, dtype=torch.float32).view(m, 1, n))
        self.register_buffer("group_index", torch.as_tensor(list(group_index), dtype=torch.long))
        if teacher is not None:
            self.register_buffer("tW", teacher[0])
            self.register_buffer("tb", teacher[1])
        else:
            self.tW = self.tb = None

    def weights(self) -> torch.Tensor:
        return self.W * self.rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights()
        return torch.relu(torch.bmm(torch.bmm(x, w.transpose(1, 2)), w) + self.b)

    @torch.no_grad()
    def teacher_out(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(torch.bmm(torch.bmm(x, self.tW.transpose(1, 2)), self.tW) + self.tb)

    def losses(self, x_groups: torch.Tensor) -> torch.Tensor:
        """Per-model importance-weighted MSE against ``x`` (no teacher) or the teacher's output."""
        x = x_groups.index_select(0, self.group_index)
        target = x if self.tW is None else self.teacher_out(x)
        return TmsLoss.apply(self.weights(), self.b, x, target, self.imp)


class SparseStream(IterableDataset):
    """Endless batches: a dict ``{str(n): x of shape (G_n, batch, n)}``, one slice per (alpha, seed) group."""

    def __init__(self, p_active: dict[int, torch.Tensor], batch_size: int, seed: int):
        self.p_active, self.batch_size, self.seed = p_active, batch_size, seed

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield {str(n): sample_sparse(gen, p, self.batch_size, n) for n, p in self.p_active.items()}


@dataclass
class ToyTrainConfig:
    steps: int = 1500
    student_steps: int | None = None  # defaults to ``steps``
    batch_size: int = 512
    lr: float = 3e-3
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant
    eval_samples: int = 65536
    eval_seed: int = 1234
    eval_chunk: int = 2048
    survival_threshold: float = 0.5
    log_every: int = 0


@dataclass
class ToyRun:
    """Per-model results of a sweep (arrays aligned with ``sweep.models``)."""

    sweep: ToySweep
    task_loss: np.ndarray
    distill_loss: np.ndarray  # NaN for teachers and controls
    kept: np.ndarray  # measured kept count (||W_i||^2 > threshold)
    kept_mask: list[np.ndarray]
    capacity_used: np.ndarray  # sum_i C_i / d (Scherlis et al. fractional capacity)
    timings: dict[str, float]


def p_active_per_n(sweep: ToySweep) -> tuple[dict[int, torch.Tensor], dict[tuple, int]]:
    """One sampling group per (n, alpha, seed); returns p_active per n and the group index lookup."""
    p_active, index = {}, {}
    for n in sweep.n_features:
        probs = []
        for alpha in sweep.alphas:
            for seed in sweep.seeds:
                index[(n, alpha, seed)] = len(probs)
                probs.append(1.0 - alpha)
        p_active[n] = torch.tensor(probs, dtype=torch.float32)
    return p_active, index


def build_banks(sweep: ToySweep, ids: list[int], group_lookup: dict, seed: int,
                 teachers: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> tuple[dict[int, _Bank], dict[int, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    banks, members = {}, {}
    for n in sweep.n_features:
        chosen = [i for i in ids if sweep.models[i].n == n]
        if not chosen:
            continue
        specs = [sweep.models[i] for i in chosen]
        imp = np.stack([sweep.importances(n)] * len(specs))
        teacher = None
        if teachers is not None:
            d_t_max = max(teachers[s.teacher_id][0].shape[0] for s in specs)
            tw = torch.zeros(len(specs), d_t_max, n)
            tb = torch.zeros(len(specs), 1, n)
            for j, s in enumerate(specs):
                w, b = teachers[s.teacher_id]
                tw[j, : w.shape[0]] = w
                tb[j, 0] = b
            teacher = (tw, tb)
        banks[n] = _Bank(n, [s.width for s in specs], [group_lookup[(n, s.alpha, s.seed)] for s in specs], imp, gen,
                         teacher)
        members[n] = chosen
    return banks, members


@torch.no_grad()
def evaluate_sweep(sweep: ToySweep, banks: dict[int, _Bank], members: dict[int, list[int]], cfg: ToyTrainConfig,
              out: ToyRun) -> None:
    """Task loss (and distillation loss) on a fixed evaluation set per (n, alpha), plus kept features."""
    for n, bank in banks.items():
        ids = members[n]
        alphas = [sweep.models[i].alpha for i in ids]
        alpha_index = torch.as_tensor([sweep.alphas.index(a) for a in alphas])
        gen = torch.Generator().manual_seed(cfg.eval_seed + n)
        p = torch.tensor([1 - a for a in sweep.alphas])
        task = torch.zeros(len(ids), dtype=torch.float64)
        dist = torch.zeros(len(ids), dtype=torch.float64)
        done = 0
        while done < cfg.eval_samples:
            chunk = min(cfg.eval_chunk, cfg.eval_samples - done)
            x = sample_sparse(gen, p, chunk, n).index_select(0, alpha_index)
            y = bank(x)
            task += (bank.imp * (y - x).square()).sum(-1).sum(-1).double()
            if bank.tW is not None:
                dist += (bank.imp * (y - bank.teacher_out(x)).square()).sum(-1).sum(-1).double()
            done += chunk
        w = bank.weights()
        norms = w.square().sum(1)  # (M, n): ||W_i||^2
        gram = torch.bmm(w.transpose(1, 2), w)  # (M, n, n)
        cap = norms.square() / gram.square().sum(-1).clamp_min(1e-12)
        for j, i in enumerate(ids):
            out.task_loss[i] = float(task[j]) / cfg.eval_samples
            out.distill_loss[i] = float(dist[j]) / cfg.eval_samples if bank.tW is not None else float("nan")
            mask = (norms[j] > cfg.survival_threshold).numpy()
            out.kept_mask[i] = mask
            out.kept[i] = int(mask.sum())
            out.capacity_used[i] = float(cap[j].sum()) / sweep.models[i].width


# ------------------------------------------------------------------------------------------- predicted vs observed
PREDICTORS = ("eq2", "naive", "equilibrium", "measured_kept")


def floor_rows(run: ToyRun, floor_metric: str = "task", equilibrium: tuple[float, float] = (1.03, 0.53)) -> list[dict]:
    """One row per (n, alpha, d_T, d_S): observed floor (mean and std over seeds) and every predictor."""
    if floor_metric not in FLOOR_METRICS:
        raise ConfigError(f"floor_metric='{floor_metric}' is unknown; use one of {', '.join(FLOOR_METRICS)}")
    sweep = run.sweep
    observed = run.task_loss if floor_metric == "task" else run.distill_loss
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(sweep.models):
        if s.role == "student":
            groups.setdefault((s.n, s.alpha, s.teacher_width, s.width), []).append(i)
    teacher_loss = {}
    for i, s in enumerate(sweep.models):
        if s.role == "teacher":
            teacher_loss.setdefault((s.n, s.alpha, s.width), []).append(run.task_loss[i])
    control = {}
    for i, s in enumerate(sweep.models):
        if s.role == "control":
            control.setdefault((s.n, s.alpha, s.width), []).append(run.task_loss[i])
    rows = []
    a, b = equilibrium
    for (n, alpha, d_t, d_s), ids in sorted(groups.items()):
        imp = sweep.importances(n)
        ex2 = toy_ex2(alpha)
        l_zero = float(np.sum(imp) * ex2)
        d_star = theory.critical_width(n, alpha)
        obs = observed[ids]
        measured = [theory.floor_measured_kept(imp, ex2, run.kept_mask[i]) for i in ids]
        rows.append({
            "n": n, "alpha": alpha, "d_T": d_t, "d_S": d_s, "seeds": len(ids),
            "d_star": d_star, "d_over_dstar": d_s / d_star, "stratum": str(theory.stratum_of(d_s / d_star)),
            "kept_eq2": theory.kept_features(d_s, alpha, n),
            "kept_equilibrium": theory.equilibrium_kept(d_s, alpha, n, a, b),
            "kept_measured": float(np.mean(run.kept[ids])),
            "observed": float(np.mean(obs)), "observed_std": float(np.std(obs)),
            "eq2": theory.predicted_floor(d_s, alpha, imp, ex2),
            "naive": theory.floor_naive(d_s, alpha, n, l_zero),
            "equilibrium": theory.floor_from_kept(theory.equilibrium_kept(d_s, alpha, n, a, b), imp, ex2),
            "measured_kept": float(np.mean(measured)),
            "teacher_loss": float(np.mean(teacher_loss[(n, alpha, d_t)])),
            "distill_loss": float(np.nanmean(run.distill_loss[ids])),
            "control_loss": float(np.mean(control[(n, alpha, d_s)])) if (n, alpha, d_s) in control else float("nan"),
            "capacity_used": float(np.mean(run.capacity_used[ids])),
            "l_zero": l_zero,
        })
    return rows


def fitted_packing_law(run: ToyRun) -> tuple[float, float] | None:
    """Fit g_hat = a g^b to the measured kept counts of teachers and controls that are not capped at n."""
    g, g_hat = [], []
    for i, s in enumerate(run.sweep.models):
        if s.role in ("teacher", "control") and 0 < run.kept[i] < s.n:
            g.append(theory.capacity(s.alpha))
            g_hat.append(run.kept[i] / s.width)
    if len(set(g)) < 2:
        return None
    return theory.fit_packing_law(g, g_hat)


def _median(values) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    return float(np.median(arr)) if arr.size else float("nan")


def accuracy_summary(rows: list[dict], predictor: str = "eq2") -> dict:
    """The metrics of notes section 2.3, per alpha and pooled, for one predictor.

    * ``ratio``: median over configs of the per-width median of min(p, o) / max(p, o);
    * ``normalized``: the same for 1 - |p - o| / L_zero;
    * ``pearson_config``: median over configs (n, alpha, d_T) of Pearson r(p, o) across d_S;
    * pooled ``r2_abs`` (1 - SS_res / SS_tot with p as the fit, no calibration) overall and per d/d* stratum;
    * pooled ``pearson`` and ``r2_affine`` (after observed = C p + B by OLS, the paper's style of R^2).
    """
    if predictor not in PREDICTORS:
        raise ConfigError(f"predictor '{predictor}' is unknown; use one of {', '.join(PREDICTORS)}")
    alphas = sorted({r["alpha"] for r in rows})
    configs: dict[tuple, list[dict]] = {}
    for r in rows:
        configs.setdefault((r["n"], r["alpha"], r["d_T"]), []).append(r)
    per_config = {}
    for key, rs in configs.items():
        p = np.array([r[predictor] for r in rs])
        o = np.array([r["observed"] for r in rs])
        per_config[key] = {
            "ratio": _median(theory.ratio_accuracy(p, o)),
            "normalized": _median(theory.normalized_accuracy(p, o, rs[0]["l_zero"])),
            "pearson": theory.pearson_r(p, o),
        }
    out: dict = {"by_alpha": {}, "pooled": {}}
    for alpha in alphas:
        keys = [k for k in per_config if k[1] == alpha]
        out["by_alpha"][alpha] = {
            "ratio": _median([per_config[k]["ratio"] for k in keys]),
            "normalized": _median([per_config[k]["normalized"] for k in keys]),
            "pearson_config": _median([per_config[k]["pearson"] for k in keys]),
        }
    p = np.array([r[predictor] for r in rows])
    o = np.array([r["observed"] for r in rows])
    pooled = {"pearson": theory.pearson_r(p, o), "r2_abs": theory.r_squared(o, p),
              "r2_affine": theory.fit_floor(p, o, "ols").r2 if len(rows) > 1 else float("nan"),
              "pearson_config_median": _median([v["pearson"] for v in per_config.values()]),
              "ratio_median": _median([v["ratio"] for v in per_config.values()]),
              "normalized_median": _median([v["normalized"] for v in per_config.values()])}
    strata = np.array([r["stratum"] for r in rows])
    for name, _, _ in theory.STRATA:
        sel = strata == name
        pooled[f"r2_abs_{name}"] = theory.r_squared(o[sel], p[sel]) if sel.sum() > 1 else float("nan")
        pooled[f"n_{name}"] = int(sel.sum())
    out["pooled"] = pooled
    out["per_config"] = {f"n{k[0]}_a{k[1]}_dT{k[2]}": v for k, v in per_config.items()}
    return out
