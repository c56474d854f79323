"""The minimum-width theorem's formulas against the paper's numbers (arXiv 2604.04037), and the CLI."""
import math
import subprocess
import sys

import numpy as np
import pytest

from opdf_exp.errors import ConfigError
from opdf_exp.geometry import capacity, critical_width, fit_floor, kept_features, predicted_floor
from opdf_exp.geometry import theory

F_L12, L0_L12 = 28665, 218.29  # Pythia-410M layer 12 (paper / authors' measurements)
ALPHA_L12 = 1 - L0_L12 / F_L12


def test_capacity_matches_paper():
    assert round(capacity(0.9), 4) == 4.3429
    assert round(capacity(0.99), 4) == 21.7147
    assert capacity(0.8) == pytest.approx(3.1067, abs=1e-4)
    # increasing in alpha only above 1 - 1/e, where p ln(1/p) peaks: min g = e (the notes' "g is increasing"
    # holds on the sparse side, which is the only side the theorem is used on)
    grid = np.linspace(1 - 1 / math.e + 1e-6, 0.999, 200)
    assert np.all(np.diff(capacity(grid)) > 0)
    assert capacity(1 - 1 / math.e) == pytest.approx(math.e)
    assert capacity(0.3) > capacity(0.5) > math.e


def test_critical_width_layer12():
    assert critical_width(F_L12, 1 - 218.3 / F_L12) == pytest.approx(1064.7, abs=0.5)
    assert critical_width(F_L12, ALPHA_L12) == pytest.approx(1064.7, abs=0.1)
    assert critical_width(F_L12, ALPHA_L12) == pytest.approx(theory.critical_width_from_l0(F_L12, L0_L12), rel=1e-9)


def test_kept_counts_layer12():
    widths = [128, 256, 384, 512, 768, 1024]
    expected = [3446, 6892, 10338, 13784, 20676, 27568]
    assert list(kept_features(widths, ALPHA_L12, F_L12)) == expected
    assert kept_features(128, ALPHA_L12, F_L12) == 3446
    assert kept_features(2000, ALPHA_L12, F_L12) == F_L12  # capped at F


def test_floor_monotone_and_zero_beyond_dstar():
    rng = np.random.default_rng(0)
    imp = np.sort(rng.pareto(1.5, F_L12))[::-1]
    widths = np.arange(0, 1400, 16)
    floors = predicted_floor(widths, ALPHA_L12, imp, 1.0)
    assert np.all(np.diff(floors) <= 0)
    d_star = critical_width(F_L12, ALPHA_L12)
    assert np.all(floors[widths >= d_star] == 0)
    assert np.all(floors[widths < math.floor(d_star) - 1] > 0)
    assert floors[0] == pytest.approx(imp.sum())
    # toy: uniform importance, E[x^2] = (1 - alpha)/3 -> dropped * ex2
    ex2 = (1 - 0.9) / 3
    assert predicted_floor(3, 0.9, np.ones(40), ex2) == pytest.approx((40 - 13) * ex2)
    # a per-feature ex2 vector is charged feature by feature
    assert predicted_floor(1, 0.9, np.ones(10), np.arange(10.0)) == pytest.approx(sum(range(4, 10)))


def test_toy_dstar_table():
    table = {(10, 0.8): 3.22, (10, 0.9): 2.30, (10, 0.95): 1.50, (10, 0.99): 0.46,
             (20, 0.8): 6.44, (20, 0.9): 4.61, (20, 0.95): 3.00, (20, 0.99): 0.92,
             (40, 0.8): 12.88, (40, 0.9): 9.21, (40, 0.95): 5.99, (40, 0.99): 1.84}
    for (n, alpha), value in table.items():
        assert round(critical_width(n, alpha), 2) == value


@pytest.mark.parametrize("mode", ["ols", "B_at_dT"])
def test_affine_fit_recovers_planted(mode):
    pred = np.array([0.0795, 0.0400, 0.0111, 0.0016, 0.0])  # layer-12 L* at 128..1024 (last = d_T)
    obs = 8.97 * pred + 2.5
    fit = fit_floor(pred, obs, mode, widths=[128, 256, 512, 768, 1024])
    assert fit.C == pytest.approx(8.97, rel=1e-9)
    assert fit.B == pytest.approx(2.5, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.mode == mode and fit.n == 5


def test_affine_fit_noisy_modes_differ():
    rng = np.random.default_rng(1)
    pred = np.linspace(0.1, 0.0, 6)
    obs = 3 * pred + 1 + rng.normal(0, 0.01, 6)
    ols, bdt = fit_floor(pred, obs, "ols"), fit_floor(pred, obs, "B_at_dT")
    assert ols.r2 >= bdt.r2 and 0.9 < ols.r2 <= 1
    assert bdt.B == obs[-1]


@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, float("nan")])
def test_bad_alpha_raises(alpha):
    with pytest.raises(ConfigError, match="alpha"):
        capacity(alpha)
    with pytest.raises(ConfigError):
        critical_width(100, alpha)


@pytest.mark.parametrize("width", [-1, 2.5, [128, -4], [1.5], True, "abc"])
def test_bad_widths_raise(width):
    with pytest.raises(ConfigError):
        kept_features(width, 0.9, 100)


def test_bad_importances():
    with pytest.raises(ConfigError, match="not sorted"):
        predicted_floor(1, 0.9, [0.1, 0.5, 0.2], 1.0)
    with pytest.raises(ConfigError, match="NaN"):
        predicted_floor(1, 0.9, [0.5, float("nan"), 0.2], 1.0)
    with pytest.raises(ConfigError, match="NaN"):
        predicted_floor(1, 0.9, [0.5, float("nan"), 0.2], 1.0, sort=True)  # sorting never hides a NaN
    with pytest.raises(ConfigError, match="ex2"):
        predicted_floor(1, 0.9, [0.5, 0.2], [1.0, 2.0, 3.0])
    # sort=True sorts (and carries a per-feature ex2 along)
    assert predicted_floor(0, 0.9, [0.1, 0.5], [2.0, 1.0], sort=True) == pytest.approx(0.1 * 2 + 0.5 * 1)
    assert predicted_floor(1, 0.5, [0.1, 0.5, 0.3], sort=True) == pytest.approx(0.1)  # g(0.5)=2.885 -> keep 2
    with pytest.raises(ValueError):  # ConfigError is a ValueError
        fit_floor([1, 2], [1], "ols")
    with pytest.raises(ConfigError, match="mode"):
        fit_floor([1, 2], [1, 2], "bogus")


def test_cli_predict_prints_critical_width():
    out = subprocess.run([sys.executable, "-m", "opdf_exp.geometry", "predict", "-F", "28665", "--l0", "218.29",
                          "--widths", "128", "256", "384", "512", "768", "1024"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "critical width d* = F / g(alpha) = 1064.7" in out.stdout
    for kept in ("3446", "6892", "10338", "13784", "20676", "27568"):
        assert kept in out.stdout
    bad = subprocess.run([sys.executable, "-m", "opdf_exp.geometry", "predict", "-F", "40", "--alpha", "1.5",
                          "--widths", "3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "alpha" in bad.stderr


def test_cli_floor_with_importances(tmp_path):
    from opdf_exp.geometry.__main__ import main

    path = tmp_path / "imp.txt"
    path.write_text("\n".join(str(v) for v in [0.5, 0.3, 0.1, 0.05, 0.05]))
    assert main(["predict", "-F", "5", "--alpha", "0.5", "--widths", "0,1,2", "--importances", str(path)]) == 0
    assert main(["predict", "-F", "6", "--alpha", "0.5", "--widths", "1", "--importances", str(path)]) == 2
