"""Time a geometry study through the shipped configs and print its figures.

    .venv/bin/python experiments/bench_geometry.py toy                    # the 48-config toy sweep (about 2 min)
    .venv/bin/python experiments/bench_geometry.py floor                  # the CPU LM width sweep (about 4 min)
    .venv/bin/python experiments/bench_geometry.py toy --smoke            # seconds
    .venv/bin/python experiments/bench_geometry.py toy --figures docs/figures task.seeds=2 task.num_threads=2

Extra arguments are Hydra overrides applied on top of ``+experiment=geometric_<study>``, so this measures exactly
what ``python -m opdf_exp +experiment=geometric_<study>`` runs, minus process start-up.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opdf_exp  # noqa: E402,F401  (patches torchvision before Lightning loads)


def summarize_toy(result: dict) -> None:
    m = result["metrics"]
    print(f"configs={m['n_configs']:.0f} points={m['n_points']:.0f} models={m['n_models']:.0f} seeds={result['params']['seeds']}")
    print(f"Eq. 2: pooled Pearson r={m['pearson_r']:.4f}  R2_abs={m['r2_abs']:.4f}  R2_affine={m['r2_affine']:.4f}  "
          f"median per-config r={m['pearson_config_median']:.4f}")
    print(f"R2_abs by d/d*: below={m['r2_abs_below']:.3f} near={m['r2_abs_near']:.3f} above={m['r2_abs_above']:.3f}")


def summarize_floor(result: dict) -> None:
    m = result["metrics"]
    print(f"SAE: F={m['F_alive']:.0f} L0={m['L0']:.2f} alpha={m['alpha']:.5f} g={m['g_alpha']:.3f} d*={m['d_star']:.1f}")
    print(f"fit (primary): C={m['C']:.4g} B={m['B']:.4g} R2={m['r2']:.4f}; OLS R2={m['ols_r2']:.4f}, "
          f"B_at_dT R2={m['B_at_dT_r2']:.4f}; Spearman rho={m['spearman_rho']:.3f}; monotone={bool(m['monotone'])}")


SUMMARIES = {"toy": summarize_toy, "floor": summarize_floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("study", choices=sorted(SUMMARIES))
    parser.add_argument("--smoke", action="store_true", help="use the study's _smoke experiment (seconds)")
    parser.add_argument("--out", default=None, help="output folder (default logs/geometric_<study>/bench_<time>)")
    parser.add_argument("--figures", default=None, help="also copy the PNGs here (e.g. docs/figures)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task.seeds=2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import hydra
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from opdf_exp.runner import resolvers

    experiment = f"geometric_{args.study}"
    name = f"{experiment}_smoke" if args.smoke else experiment
    out = Path(args.out or ROOT / "logs" / experiment / f"bench_{time.strftime('%Y%m%d_%H%M%S')}")
    resolvers.register()
    GlobalHydra.instance().clear()
    with initialize_config_module("opdf_exp.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={name}", f"paths.output_dir={out}", *args.overrides])
    task = hydra.utils.instantiate(cfg.task, _partial_=True)
    started = time.perf_counter()
    result = task(cfg)
    wall = time.perf_counter() - started
    for title, table in result["tables"].items():
        print(f"\n{title}\n{table}")
    stages = ", ".join(f"{k[5:]}={v:.1f}s" for k, v in result["metrics"].items() if k.startswith("time_"))
    print(f"\nwall time (task only): {wall:.1f} s   [{stages}]")
    SUMMARIES[args.study](result)
    print(f"outputs: {out}")
    if args.figures:
        dest = Path(args.figures)
        dest.mkdir(parents=True, exist_ok=True)
        for path in result.get("figures", {}).values():
            shutil.copy(path, dest / Path(path).name)
            print(f"copied {Path(path).name} -> {dest}")


if __name__ == "__main__":
    main()
