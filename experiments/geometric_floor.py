"""Time the CPU LM width sweep (teacher, SAE, 5 students, probes) and print its floors and fit.

    .venv/bin/python experiments/geometric_floor.py                       # full sweep, output under logs/
    .venv/bin/python experiments/geometric_floor.py --smoke               # seconds
    .venv/bin/python experiments/geometric_floor.py --figures docs/figures task.num_threads=2

Extra arguments are Hydra overrides applied on top of ``+experiment=geometric_floor`` (the shipped configs), so this
measures exactly what ``python -m opdf_exp +experiment=geometric_floor`` runs, minus process start-up.
"""
from __future__ import annotations

from _shipped import parse_args, run_shipped


def main() -> None:
    result, _, _ = run_shipped("geometric_floor", parse_args(__doc__.split("\n")[0], "geometric_floor"))
    m = result["metrics"]
    print(f"SAE: F={m['F_alive']:.0f} L0={m['L0']:.2f} alpha={m['alpha']:.5f} g={m['g_alpha']:.3f} d*={m['d_star']:.1f}")
    print(f"fit (primary): C={m['C']:.4g} B={m['B']:.4g} R2={m['r2']:.4f}; OLS R2={m['ols_r2']:.4f}, "
          f"B_at_dT R2={m['B_at_dT_r2']:.4f}; Spearman rho={m['spearman_rho']:.3f}; monotone={bool(m['monotone'])}")


if __name__ == "__main__":
    main()
