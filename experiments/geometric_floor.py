"""Time the CPU LM width sweep (teacher, SAE, 5 students, probes) and print its floors and fit.

    .venv/bin/python experiments/geometric_floor.py                       # full sweep, output under logs/
    .venv/bin/python experiments/geometric_floor.py --smoke               # seconds
    .venv/bin/python experiments/geometric_floor.py --figures docs/figures task.num_threads=2

Extra arguments are Hydra overrides applied on top of ``+experiment=geometric_floor`` (the shipped configs), so this
measures exactly what ``python -m opdf_exp +experiment=geometric_floor`` runs, minus process start-up.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import opdf_exp  # noqa: E402,F401  (patches torchvision before Lightning loads)
import logging  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="use +experiment=geometric_floor_smoke")
    parser.add_argument("--out", default=None, help="output folder (default logs/geometric_floor/bench_<time>)")
    parser.add_argument("--figures", default=None, help="also copy the PNGs here (e.g. docs/figures)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task.seeds=2")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")

    import hydra
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from opdf_exp.runner import resolvers

    name = "geometric_floor_smoke" if args.smoke else "geometric_floor"
    out = Path(args.out or ROOT / "logs" / "geometric_floor" / f"bench_{time.strftime('%Y%m%d_%H%M%S')}")
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
    m = result["metrics"]
    print(f"\nwall time (task only): {wall:.1f} s   [{', '.join(f'{k[5:]}={v:.1f}s' for k, v in m.items() if k.startswith('time_'))}]")
    print(f"SAE: F={m['F_alive']:.0f} L0={m['L0']:.2f} alpha={m['alpha']:.5f} g={m['g_alpha']:.3f} d*={m['d_star']:.1f}")
    print(f"fit (primary): C={m['C']:.4g} B={m['B']:.4g} R2={m['r2']:.4f}; OLS R2={m['ols_r2']:.4f}, "
          f"B_at_dT R2={m['B_at_dT_r2']:.4f}; Spearman rho={m['spearman_rho']:.3f}; monotone={bool(m['monotone'])}")
    print(f"outputs: {out}")
    if args.figures:
        dest = Path(args.figures)
        dest.mkdir(parents=True, exist_ok=True)
        for key, path in result.get("figures", {}).items():
            shutil.copy(path, dest / Path(path).name)
            print(f"copied {Path(path).name} -> {dest}")


if __name__ == "__main__":
    main()
