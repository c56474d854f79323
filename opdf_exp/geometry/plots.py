"""Figures for the geometry experiments (matplotlib, Agg backend, small PNGs written atomically)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 90) -> Path:
    """Save to a temporary file next to ``path`` and move it into place (never a half-written PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; figures are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _plt().close(fig)
    return path


def plot_toy_floors(rows: Sequence[dict], path, predictor: str = "eq2") -> Path:
    """Floor vs student width, one panel per (n, alpha): observed per teacher width, predicted (dashed), d*."""
    plt = _plt()
    ns = sorted({r["n"] for r in rows})
    alphas = sorted({r["alpha"] for r in rows})
    teacher_widths = sorted({r["d_T"] for r in rows})
    colors = dict(zip(teacher_widths, plt.cm.viridis(np.linspace(0.05, 0.85, len(teacher_widths)))))
    fig, axes = plt.subplots(len(ns), len(alphas), figsize=(3.1 * len(alphas), 2.5 * len(ns)), squeeze=False)
    for i, n in enumerate(ns):
        for j, alpha in enumerate(alphas):
            ax = axes[i][j]
            sel = [r for r in rows if r["n"] == n and r["alpha"] == alpha]
            for d_t in teacher_widths:
                rs = sorted((r for r in sel if r["d_T"] == d_t), key=lambda r: r["d_S"])
                if rs:
                    ax.plot([r["d_S"] for r in rs], [r["observed"] for r in rs], "o-", ms=3, lw=1.2,
                            color=colors[d_t], label=f"obs, d_T={d_t}")
            by_width = {r["d_S"]: r for r in sel}
            ws = sorted(by_width)
            ax.plot(ws, [by_width[w][predictor] for w in ws], "k--", lw=1.3, label=f"pred ({predictor})")
            if any(np.isfinite(by_width[w].get("control_loss", np.nan)) for w in ws):
                ax.plot(ws, [by_width[w].get("control_loss", np.nan) for w in ws], ":", color="gray", lw=1.2,
                        label="direct (no teacher)")
            if sel:
                ax.axvline(sel[0]["d_star"], color="tab:red", lw=0.8, alpha=0.6)
            ax.set_title(f"n={n}, alpha={alpha:g}, d*={n / _g(alpha):.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(ns) - 1:
                ax.set_xlabel("student width d_S", fontsize=8)
            if j == 0:
                ax.set_ylabel("floor (task loss)", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="upper right")
    fig.suptitle("Toy superposition: observed floors (solid) vs Eq. 2 (dashed); red line: d*", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _g(alpha: float) -> float:
    p = 1 - alpha
    return 1 / (p * np.log(1 / p))


def plot_pred_vs_obs(rows: Sequence[dict], path, predictors: Sequence[str] = ("eq2", "equilibrium", "measured_kept"),
                     stats: dict | None = None) -> Path:
    """Predicted vs observed floors (every student config), one panel per predictor, colour = alpha."""
    plt = _plt()
    alphas = sorted({r["alpha"] for r in rows})
    colors = dict(zip(alphas, plt.cm.plasma(np.linspace(0.0, 0.85, len(alphas)))))
    fig, axes = plt.subplots(1, len(predictors), figsize=(3.6 * len(predictors), 3.4), squeeze=False)
    obs_all = np.array([r["observed"] for r in rows])
    for ax, name in zip(axes[0], predictors):
        for alpha in alphas:
            rs = [r for r in rows if r["alpha"] == alpha]
            ax.scatter([r[name] for r in rs], [r["observed"] for r in rs], s=9, color=colors[alpha],
                       label=f"alpha={alpha:g}", alpha=0.8)
        hi = max(obs_all.max(), max(r[name] for r in rows)) * 1.05
        ax.plot([0, hi], [0, hi], "k-", lw=0.7)
        title = name
        if stats and name in stats:
            title += f"  (R2_abs={stats[name]['r2_abs']:.2f}, r={stats[name]['pearson']:.3f})"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("predicted floor", fontsize=8)
        ax.set_ylabel("observed floor", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lm_floor(widths: Sequence[int], observed: Sequence[float], predicted: Sequence[float], fits: dict,
                  importances: np.ndarray, kept: Sequence[int], d_star: float, path, title: str = "") -> Path:
    """Three panels: observed KD floor vs width with the calibrated fits; observed vs predicted; the sorted
    SAE importances with each student's kept budget."""
    plt = _plt()
    w = np.asarray(widths, dtype=float)
    o = np.asarray(observed, dtype=float)
    p = np.asarray(predicted, dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(w, o, "o-", color="tab:blue", label="observed KD floor")
    for (mode, fit), style in zip(fits.items(), ("--", ":")):
        ax.plot(w, fit["C"] * p + fit["B"], style, color="k",
                label=f"{mode}: C={fit['C']:.3g}, B={fit['B']:.3g}, R2={fit['r2']:.3f}")
    ax.axvline(d_star, color="tab:red", lw=0.8, label=f"d*={d_star:.1f}")
    ax.set_xlabel("student width")
    ax.set_ylabel("KL(T) x T^2 per token")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.scatter(p, o, color="tab:blue")
    for wi, pi, oi in zip(w, p, o):
        ax.annotate(f"{int(wi)}", (pi, oi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("predicted L* (Eq. 2, sum of dropped E[z^2])")
    ax.set_ylabel("observed floor")
    ax = axes[2]
    ranks = np.arange(1, len(importances) + 1)
    ax.loglog(ranks, np.clip(importances, 1e-30, None), color="tab:purple", lw=1)
    for wi, k in zip(w, kept):
        if 0 < k < len(importances):
            ax.axvline(k, color="gray", lw=0.6, ls="--")
            ax.annotate(f"d={int(wi)}", (k, importances[k]), fontsize=6, rotation=90)
    ax.set_xlabel("latent rank")
    ax.set_ylabel("E[z^2]")
    ax.set_title("SAE importances and kept budgets", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_probes(rows: Sequence[dict], widths: dict[str, int], path, teacher_name: str = "teacher") -> Path:
    """Probe accuracy vs width: mean over concepts of each family (topic, latent block, single latent)."""
    plt = _plt()
    families = {"coarse: topic": lambda c: c.startswith("topic:"),
                "coarse: latent block (OR)": lambda c: c.startswith("block:"),
                "fine: single latent": lambda c: c.startswith("latent:")}
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    models = sorted(widths, key=lambda m: widths[m])
    for (label, test), color in zip(families.items(), ("tab:green", "tab:blue", "tab:orange")):
        xs, ys = [], []
        for m in models:
            accs = [r["accuracy"] for r in rows if r["model"] == m and test(r["concept"]) and np.isfinite(r["accuracy"])]
            if accs:
                xs.append(widths[m])
                ys.append(np.mean(accs))
        if xs:
            ax.plot(xs, ys, "o-", color=color, label=label)
        t = [r["accuracy"] for r in rows if r["model"] == teacher_name and test(r["concept"]) and np.isfinite(r["accuracy"])]
        if t:
            ax.scatter([widths.get(teacher_name, max(widths.values()))], [np.mean(t)], marker="*", s=120, color=color)
    ax.axhline(0.5, color="gray", lw=0.7, ls=":")
    ax.set_xlabel("width (stars: teacher)")
    ax.set_ylabel("probe accuracy (balanced, chance 0.5)")
    ax.set_ylim(0.45, 1.01)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
