"""The minimum-width theorem of Sarkar & Deka (arXiv 2604.04037) as plain NumPy functions.

Why a separate module: every number in the geometry experiments (critical widths, kept counts, predicted floors,
the affine calibration of observed floors) comes from these few formulas, so they are pure, vectorised,
unit-tested and free of Lightning/Hydra. Notation (see docs/geometry.md):

* ``alpha``  feature sparsity, the probability that a feature is *off* (0 < alpha < 1);
* ``g(alpha) = 1 / ((1 - alpha) * ln(1 / (1 - alpha)))``  features packed per hidden dimension (:func:`capacity`);
* ``F``      number of features the teacher represents; ``d`` a (student) width;
* kept features ``F_S = min(F, floor(d * g))``; critical width ``d* = F / g`` (:func:`critical_width`);
* Eq. 2 floor ``L*(d) = sum_{i > F_S} I_(i) * E[x_(i)^2]`` over features sorted by importance (:func:`predicted_floor`).

Bad input raises :class:`~opdf_exp.errors.ConfigError` with a one-line message that names the fix.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from opdf_exp.errors import ConfigError

# Relative slack when flooring d * g(alpha): 3446.0000000000005 and 3445.9999999999995 both mean 3446 kept.
_FLOOR_EPS = 1e-9


# --------------------------------------------------------------------------------------------------- validation
def _check_alpha(alpha) -> np.ndarray:
    arr = np.asarray(alpha, dtype=float)
    if arr.size == 0:
        raise ConfigError("alpha is empty; give a sparsity strictly between 0 and 1, e.g. alpha=0.9")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0.0) or np.any(arr >= 1.0):
        bad = arr[~(np.isfinite(arr) & (arr > 0) & (arr < 1))].ravel()[0]
        raise ConfigError(f"alpha={bad} is outside (0, 1); the sparsity is the probability a feature is off, "
                          f"e.g. alpha=0.9 (or alpha = 1 - L0/F from an SAE)")
    return arr


def _check_n_features(n_features, name: str = "n_features") -> int:
    if isinstance(n_features, bool) or not _is_integral(n_features) or int(n_features) < 1:
        raise ConfigError(f"{name}={n_features!r} must be a positive integer (the number of features F)")
    return int(n_features)


def _is_integral(value) -> bool:
    try:
        return float(value) == math.floor(float(value)) and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def check_widths(width) -> np.ndarray:
    """Widths as an int64 array; negative, non-integer, NaN or boolean widths raise :class:`ConfigError`."""
    if isinstance(width, bool) or (isinstance(width, np.ndarray) and width.dtype == bool):
        raise ConfigError(f"width={width!r} is a boolean; give integer widths >= 0, e.g. widths=[128,256]")
    try:
        arr = np.asarray(width, dtype=float)
    except (TypeError, ValueError):
        raise ConfigError(f"width={width!r} is not numeric; give integer widths >= 0, e.g. widths=[128,256]") from None
    if arr.size == 0:
        raise ConfigError("no widths given; pass at least one integer width, e.g. widths=[128,256]")
    bad = ~np.isfinite(arr) | (arr < 0) | (arr != np.floor(arr))
    if np.any(bad):
        value = arr[bad].ravel()[0]
        raise ConfigError(f"width={value:g} is not a non-negative integer; widths are hidden sizes such as 128")
    return arr.astype(np.int64)


def check_importances(importances, *, sort: bool = False, name: str = "importances") -> tuple[np.ndarray, np.ndarray]:
    """Validate a 1-D importance vector; returns ``(values in non-increasing order, permutation applied)``.

    NaN/inf or negative values are always rejected. Unsorted input is rejected unless ``sort=True`` (then it is
    sorted in non-increasing order, stably, and the permutation is returned so per-feature E[x^2] can follow).
    """
    arr = np.asarray(importances, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(f"{name} must be a non-empty 1-D vector (one value per feature), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"{name} contains NaN or inf at index {int(np.flatnonzero(~np.isfinite(arr))[0])}; "
                          f"drop dead latents / fix the measurement before predicting floors")
    if np.any(arr < 0):
        raise ConfigError(f"{name} has a negative value at index {int(np.flatnonzero(arr < 0)[0])}; "
                          f"importances are weights >= 0")
    order = np.arange(arr.size)
    if np.any(np.diff(arr) > 0):
        if not sort:
            first = int(np.flatnonzero(np.diff(arr) > 0)[0])
            raise ConfigError(f"{name} are not sorted in non-increasing order (index {first + 1} > index {first}); "
                              f"sort them descending or pass sort=True")
        order = np.argsort(-arr, kind="stable")
        arr = arr[order]
    return arr, order


# ------------------------------------------------------------------------------------------------------ theory
def capacity(alpha):
    """g(alpha) = 1 / ((1 - alpha) ln(1 / (1 - alpha))): how many alpha-sparse features one dimension can carry.

    ``capacity(0.9) = 4.3429``, ``capacity(0.99) = 21.7147``. Scalars in, float out; arrays in, arrays out.
    """
    arr = _check_alpha(alpha)
    p = 1.0 - arr
    g = 1.0 / (p * np.log(1.0 / p))
    return float(g) if np.ndim(alpha) == 0 else g


def alpha_from_l0(n_features, l0) -> float:
    """alpha = 1 - L0 / F (L0 = mean number of active latents per token, F = alive latents)."""
    n = float(n_features)
    if not n > 0 or not 0 < float(l0) < n:
        raise ConfigError(f"L0={l0} must lie strictly between 0 and F={n_features}; measure L0 as active latents per token")
    return 1.0 - float(l0) / n


def critical_width(n_features, alpha) -> float:
    """d* = F / g(alpha): the smallest width predicted to carry all F features (floor 0 at and above it)."""
    n = _check_n_features(n_features)
    return n / capacity(alpha) if np.ndim(alpha) == 0 else n / capacity(np.asarray(alpha))


d_star = critical_width


def critical_width_from_l0(n_features, l0) -> float:
    """The same critical width written with L0: d* = L0 ln(F / L0) (the compressed-sensing count k ln(n/k))."""
    _check_n_features(n_features)
    alpha_from_l0(n_features, l0)
    return float(l0) * math.log(float(n_features) / float(l0))


d_star_from_l0 = critical_width_from_l0


def kept_features(width, alpha, n_features, *, rounding: str = "floor"):
    """F_S = min(F, floor(d g(alpha))): features a width-d student can keep (``rounding``: floor | round)."""
    widths = check_widths(width)
    n = _check_n_features(n_features)
    raw = widths * capacity(alpha)
    if rounding == "floor":
        kept = np.floor(raw * (1 + _FLOOR_EPS))
    elif rounding == "round":
        kept = np.round(raw)
    else:
        raise ConfigError(f"rounding='{rounding}' is unknown; use floor or round")
    kept = np.minimum(kept, n).astype(np.int64)
    return int(kept) if np.ndim(width) == 0 else kept


def _charges(importances, ex2, sort: bool) -> np.ndarray:
    imp, order = check_importances(importances, sort=sort)
    if np.ndim(ex2) == 0:
        e = float(ex2)
        if not math.isfinite(e) or e < 0:
            raise ConfigError(f"ex2={ex2} must be a finite value >= 0 (E[x^2] of an active-or-not feature)")
        return imp * e
    e = np.asarray(ex2, dtype=float)
    if e.shape != imp.shape:
        raise ConfigError(f"ex2 has shape {e.shape} but importances have {imp.shape}; give one E[x^2] per feature or a scalar")
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ConfigError("ex2 contains NaN, inf or negative values; E[x^2] must be finite and >= 0")
    return imp * e[order]


def _tail_sums(charges: np.ndarray) -> np.ndarray:
    """tail[k] = sum(charges[k:]) for k = 0..F, with tail[F] = 0 exactly."""
    tail = np.zeros(charges.size + 1)
    tail[:-1] = np.cumsum(charges[::-1])[::-1]
    return tail


def predicted_floor(width, alpha, importances, ex2=1.0, *, sort: bool = False, rounding: str = "floor"):
    """Eq. 2: L*(d) = sum of I_(i) E[x_(i)^2] over the features beyond the budget F_S = min(F, floor(d g)).

    ``importances`` are per-feature importances in non-increasing order (unsorted input raises unless
    ``sort=True``, NaN always raises); ``ex2`` is E[x_i^2], a scalar (toy: (1 - alpha)/3) or one value per feature
    (aligned with the *given* order of ``importances``). For an SAE pass the sorted E[z^2] as importances and
    ``ex2=1``. Returns a float for a scalar width, an array for an array of widths.
    """
    charges = _charges(importances, ex2, sort)
    kept = kept_features(width, alpha, charges.size, rounding=rounding)
    tail = _tail_sums(charges)
    floors = tail[np.asarray(kept)]
    return float(floors) if np.ndim(width) == 0 else floors


def floor_from_kept(kept, importances, ex2=1.0, *, sort: bool = False):
    """The Eq. 2 charge for an arbitrary kept *count* (e.g. the audit's equilibrium count round(d * a g^b))."""
    charges = _charges(importances, ex2, sort)
    k = np.clip(check_widths(kept), 0, charges.size)
    floors = _tail_sums(charges)[k]
    return float(floors) if np.ndim(kept) == 0 else floors


def floor_naive(width, alpha, n_features, eps_inf: float):
    """Uniform-importance formula of the authors' docs: L*(d) = eps_inf * max(0, 1 - d g(alpha) / F)."""
    widths = check_widths(width)
    n = _check_n_features(n_features)
    floors = float(eps_inf) * np.clip(1.0 - widths * capacity(alpha) / n, 0.0, None)
    return float(floors) if np.ndim(width) == 0 else floors


def floor_measured_kept(importances, ex2, kept_mask) -> float:
    """The audit's predictor (b'): charge I_i E[x_i^2] for every feature *not* in the measured kept set."""
    imp = np.asarray(importances, dtype=float)
    mask = np.asarray(kept_mask, dtype=bool)
    if mask.shape != imp.shape:
        raise ConfigError(f"kept_mask has shape {mask.shape} but importances have {imp.shape}")
    e = np.broadcast_to(np.asarray(ex2, dtype=float), imp.shape)
    return float(np.sum((imp * e)[~mask]))


def equilibrium_kept(width, alpha, n_features, a: float = 1.03, b: float = 0.53):
    """The audit's "superposition equilibrium" count: min(F, round(d * a * g(alpha)^b)) (Zipf s=1: a=1.03, b=0.53)."""
    widths = check_widths(width)
    n = _check_n_features(n_features)
    kept = np.minimum(np.round(widths * a * capacity(alpha) ** b), n).astype(np.int64)
    return int(kept) if np.ndim(width) == 0 else kept


def fit_packing_law(g, g_hat) -> tuple[float, float]:
    """Fit g_hat = a * g^b in log-log space (least squares); returns (a, b)."""
    x, y = np.log(np.asarray(g, dtype=float)), np.log(np.asarray(g_hat, dtype=float))
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        raise ConfigError("fit_packing_law needs at least two distinct positive g values")
    b, log_a = np.polyfit(x[ok], y[ok], 1)
    return float(np.exp(log_a)), float(b)


# --------------------------------------------------------------------------------------------- floor calibration
class FloorFit(NamedTuple):
    """observed ~= C * predicted + B; ``r2 = 1 - SS_res / SS_tot`` over the points used."""

    C: float
    B: float
    r2: float
    mode: str
    n: int

    def as_dict(self) -> dict:
        return dict(self._asdict())


FIT_MODES = ("ols", "B_at_dT")


def fit_floor(predicted, observed, mode: str = "ols", *, widths: Sequence[int] | None = None) -> FloorFit:
    """Calibrate observed floors against predicted ones: observed = C * predicted + B.

    * ``mode="ols"``: ordinary least squares for (C, B).
    * ``mode="B_at_dT"``: B is the observed floor at the widest width (the teacher's width, where the geometric
      term is ~0; the widest of ``widths`` if given, else the last point), then C by least squares through the
      origin on ``observed - B``. (The paper's exact recipe is unknown; both are reconstructions.)
    """
    p = np.asarray(predicted, dtype=float).ravel()
    o = np.asarray(observed, dtype=float).ravel()
    if p.shape != o.shape or p.size < 2:
        raise ConfigError(f"fit_floor needs two equally long vectors with >= 2 points, got {p.size} and {o.size}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(o))):
        raise ConfigError("fit_floor got NaN or inf floors; check the runs that produced them")
    if mode == "ols":
        if np.ptp(p) == 0:
            C, B = 0.0, float(o.mean())
        else:
            C, B = (float(v) for v in np.polyfit(p, o, 1))
    elif mode == "B_at_dT":
        if widths is None:
            ref = p.size - 1
        else:
            w = np.asarray(widths, dtype=float).ravel()
            if w.shape != p.shape:
                raise ConfigError(f"widths has {w.size} entries but there are {p.size} floors")
            ref = int(np.argmax(w))
        B = float(o[ref])
        denom = float(np.dot(p, p))
        C = float(np.dot(p, o - B) / denom) if denom > 0 else 0.0
    else:
        raise ConfigError(f"fit mode '{mode}' is unknown; use one of {', '.join(FIT_MODES)}")
    return FloorFit(C=C, B=B, r2=r_squared(o, C * p + B), mode=mode, n=int(p.size))


# --------------------------------------------------------------------------------------------- accuracy metrics
def r_squared(observed, fitted) -> float:
    """1 - SS_res / SS_tot (can be negative for a bad predictor; NaN when SS_tot = 0 and SS_res > 0)."""
    o = np.asarray(observed, dtype=float).ravel()
    f = np.asarray(fitted, dtype=float).ravel()
    ss_res = float(np.sum((o - f) ** 2))
    ss_tot = float(np.sum((o - o.mean()) ** 2))
    if ss_tot == 0:
        return 1.0 if ss_res <= 1e-24 else float("nan")
    return 1.0 - ss_res / ss_tot


def pearson_r(x, y) -> float:
    """Pearson correlation; NaN when either side is constant or fewer than 2 points."""
    a, b = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def spearman_rho(x, y) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def ratio_accuracy(predicted, observed) -> np.ndarray:
    """min(p, o) / max(p, o) per point (1 when both are 0)."""
    p, o = np.asarray(predicted, dtype=float), np.asarray(observed, dtype=float)
    hi, lo = np.maximum(p, o), np.minimum(p, o)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(hi > 0, np.clip(lo, 0, None) / np.where(hi > 0, hi, 1), 1.0)


def normalized_accuracy(predicted, observed, l_zero) -> np.ndarray:
    """1 - |p - o| / L_zero per point, L_zero = sum_i I_i E[x_i^2] (the loss of the all-zero output)."""
    p, o = np.asarray(predicted, dtype=float), np.asarray(observed, dtype=float)
    return 1.0 - np.abs(p - o) / np.asarray(l_zero, dtype=float)


STRATA = (("below", 0.0, 0.8), ("near", 0.8, 1.2), ("above", 1.2, np.inf))


def stratum_of(ratio) -> np.ndarray:
    """'below' (d/d* < 0.8), 'near' (0.8 <= d/d* <= 1.2) or 'above' (> 1.2), as in the audit's tables."""
    r = np.asarray(ratio, dtype=float)
    return np.where(r < 0.8, "below", np.where(r <= 1.2, "near", "above"))


@dataclass
class Prediction:
    """Everything the CLI and the reports print for one width."""

    width: int
    kept: int
    dropped: int
    floor: float | None

    as_dict = asdict


def prediction_table(widths: Iterable[int], alpha: float, n_features: int, importances=None, ex2=None,
                     *, sort: bool = False) -> list[Prediction]:
    """Kept/dropped counts per width, plus the Eq. 2 floor when importances (or a uniform ``ex2``) are known."""
    widths = check_widths(list(widths))
    kept = kept_features(widths, alpha, n_features)
    if importances is not None:
        imp = np.asarray(importances, dtype=float)
        if imp.size != n_features:
            raise ConfigError(f"{imp.size} importances given but F={n_features}; give one importance per feature")
        floors = predicted_floor(widths, alpha, imp, 1.0 if ex2 is None else ex2, sort=sort)
    elif ex2 is not None:
        floors = predicted_floor(widths, alpha, np.ones(n_features), ex2)
    else:
        floors = [None] * len(widths)
    return [Prediction(int(w), int(k), int(n_features - k), None if f is None else float(f))
            for w, k, f in zip(widths, kept, floors)]
