"""Per-variant table of one or more sweep folders, with differences paired by seed against one baseline variant.

The report (``python -m opdf_exp.report``) pairs students inside the same job; this pairs across sweeps that share
seed, teacher, data and budget but ran their variants in separate jobs (a search extended by a second sweep).

    python experiments/paired_by_seed.py logs/sst2_cpu_selection logs/sst2_cpu_selection_lambda --baseline kd
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweeps", nargs="+", type=Path)
    parser.add_argument("--baseline", default="kd", help="variant name the others are paired against")
    parser.add_argument("--metric", default="acc")
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    for sweep in args.sweeps:
        for path in sorted(sweep.glob("*/results.json")):
            result = json.loads(path.read_text())
            if result.get("status") != "complete":
                continue
            for variant in result["variants"]:
                name, metrics = variant["name"], variant["metrics"]
                entry = rows.setdefault(name, {"label": variant["label"], "seeds": {}})
                entry["seeds"][result["seed"]] = (100 * metrics[f"{name}/val/{args.metric}"],
                                                  100 * metrics[f"{name}/test/{args.metric}"])
    if args.baseline not in rows:
        raise SystemExit(f"error: no variant named {args.baseline!r}; found {', '.join(rows)}")
    base = rows[args.baseline]["seeds"]

    def spread(values: list[float]) -> str:
        return f"{statistics.fmean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    print(f"| variant | seeds | val {args.metric} | test {args.metric} | test − {rows[args.baseline]['label']} "
          f"(same seed): mean (per seed) |\n|---|---|---|---|---|")
    for name, entry in rows.items():
        seeds = sorted(entry["seeds"])
        val = [entry["seeds"][s][0] for s in seeds]
        test = [entry["seeds"][s][1] for s in seeds]
        diffs = [entry["seeds"][s][1] - base[s][1] for s in seeds if s in base]
        paired = "–" if name == args.baseline or not diffs else \
            f"{statistics.fmean(diffs):+.2f} ({' / '.join(f'{d:+.2f}' for d in diffs)})"
        print(f"| {entry['label']} | {len(seeds)} | {spread(val)} | {spread(test)} | {paired} |")


if __name__ == "__main__":
    main()
