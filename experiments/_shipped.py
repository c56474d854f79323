"""Run one shipped ``+experiment=NAME`` in-process and time its task: shared by the geometry benchmark scripts,
so each measures exactly what ``python -m opdf_exp +experiment=NAME`` runs, minus process start-up."""
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


def parse_args(description: str, experiment: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help=f"use +experiment={experiment}_smoke")
    parser.add_argument("--out", default=None, help=f"output folder (default logs/{experiment}/bench_<time>)")
    parser.add_argument("--figures", default=None, help="also copy the PNGs here (e.g. docs/figures)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. task.seeds=2")
    return parser.parse_args()


def run_shipped(experiment: str, args: argparse.Namespace) -> tuple[dict, float, Path]:
    """Compose the shipped configs, run the task, print its tables and timings, copy figures; returns
    ``(result, task wall seconds, output folder)``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import hydra
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from opdf_exp.runner import resolvers

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
    print(f"outputs: {out}")
    if args.figures:
        dest = Path(args.figures)
        dest.mkdir(parents=True, exist_ok=True)
        for path in result.get("figures", {}).values():
            shutil.copy(path, dest / Path(path).name)
            print(f"copied {Path(path).name} -> {dest}")
    return result, wall, out
