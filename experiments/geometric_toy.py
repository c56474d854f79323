"""Time the full 48-config toy sweep and print its figures (R^2, Pearson r, accuracy metrics).

    .venv/bin/python experiments/geometric_toy.py                       # full sweep, output under logs/
    .venv/bin/python experiments/geometric_toy.py --smoke               # seconds
    .venv/bin/python experiments/geometric_toy.py --figures docs/figures task.seeds=2 task.num_threads=2

Extra arguments are Hydra overrides applied on top of ``+experiment=geometric_toy`` (the shipped configs), so this
measures exactly what ``python -m opdf_exp +experiment=geometric_toy`` runs, minus process start-up.
"""
from __future__ import annotations

from _shipped import parse_args, run_shipped


def main() -> None:
    result, _, _ = run_shipped("geometric_toy", parse_args(__doc__.split("\n")[0], "geometric_toy"))
    m = result["metrics"]
    print(f"configs={m['n_configs']:.0f} points={m['n_points']:.0f} models={m['n_models']:.0f} seeds={result['params']['seeds']}")
    print(f"Eq. 2: pooled Pearson r={m['pearson_r']:.4f}  R2_abs={m['r2_abs']:.4f}  R2_affine={m['r2_affine']:.4f}  "
          f"median per-config r={m['pearson_config_median']:.4f}")
    print(f"R2_abs by d/d*: below={m['r2_abs_below']:.3f} near={m['r2_abs_near']:.3f} above={m['r2_abs_above']:.3f}")


if __name__ == "__main__":
    main()
