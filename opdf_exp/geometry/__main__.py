"""``python -m opdf_exp.geometry predict``: critical width, kept features and predicted floors from F and alpha.

Examples::

    python -m opdf_exp.geometry predict --features 28665 --l0 218.29 --widths 128 256 512 768 1024
    python -m opdf_exp.geometry predict -F 40 --alpha 0.9 --widths 1-10 --ex2 0.0333
    python -m opdf_exp.geometry predict -F 28665 --l0 218.29 --widths 128,256 --importances sae_measurement.json

Floors: with ``--importances FILE`` (one value per feature: .npy, .json list or SAE measurement JSON with an
"importances" key, or text/CSV with one number per line) the Eq. 2 floor is sum of the importances beyond the
budget times ``--ex2`` (default 1, right for SAE E[z^2] values). Without importances but with ``--ex2``, all
features count as equally important (I = 1), so the floor is dropped x ex2. With neither, only kept/dropped counts.
Bad input prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from opdf_exp.errors import ConfigError, MissingFileError, UserError


def _parse_widths(values: list[str]) -> list[int]:
    widths: list[int] = []
    for value in values:
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                try:
                    widths += list(range(int(lo), int(hi) + 1))
                except ValueError:
                    raise ConfigError(f"width range '{part}' is not 'LO-HI' with integers, e.g. 1-10") from None
                continue
            try:
                number = float(part)
            except ValueError:
                raise ConfigError(f"width '{part}' is not a number; give integers such as --widths 128 256") from None
            if number != int(number) or number < 0:
                raise ConfigError(f"width {part} is not a non-negative integer; give hidden sizes such as 128")
            widths.append(int(number))
    if not widths:
        raise ConfigError("no widths given; pass --widths 128 256 512")
    return widths


def load_importances(path: str) -> np.ndarray:
    """One importance per feature from .npy, .json (list or {"importances": [...]}) or text/CSV (first column)."""
    file = Path(path)
    if not file.is_file():
        raise MissingFileError(f"--importances {path}: no such file; give a .npy, .json or text file of numbers")
    try:
        if file.suffix == ".npy":
            return np.load(file).astype(float).ravel()
        if file.suffix == ".json":
            data = json.loads(file.read_text())
            if isinstance(data, dict):
                if "importances" not in data:
                    raise ConfigError(f"{path} has no 'importances' key; give a list or an SAE measurement JSON")
                data = data["importances"]
            return np.asarray(data, dtype=float).ravel()
        values = []
        for line in file.read_text().splitlines():
            cell = line.replace(";", ",").split(",")[0].strip()
            if not cell or cell.startswith("#"):
                continue
            try:
                values.append(float(cell))
            except ValueError:
                if values:
                    raise
        return np.asarray(values, dtype=float)
    except (ValueError, json.JSONDecodeError) as error:
        raise ConfigError(f"could not read numbers from {path} ({error}); one importance per line or a JSON list") from None


def predict(args: argparse.Namespace) -> str:
    from opdf_exp.geometry import theory

    n = args.features
    if args.alpha is None and args.l0 is None:
        raise ConfigError("give the sparsity: --alpha A (0<A<1) or --l0 L0 (mean active features per token)")
    if args.alpha is not None and args.l0 is not None:
        raise ConfigError("give either --alpha or --l0, not both")
    alpha = args.alpha if args.alpha is not None else theory.alpha_from_l0(n, args.l0)
    g = theory.capacity(alpha)
    d_star = theory.critical_width(n, alpha)
    widths = _parse_widths(args.widths)
    importances = None
    if args.importances:
        importances = load_importances(args.importances)
        if importances.size != n:
            raise ConfigError(f"{args.importances} holds {importances.size} importances but -F is {n}; they must match")
    rows = theory.prediction_table(widths, alpha, n, importances, args.ex2, sort=args.sort)
    lines = [f"F = {n}   alpha = {alpha:.6f}" + (f"   (L0 = {args.l0:g})" if args.l0 is not None else ""),
             f"g(alpha) = {g:.4f} features per dimension",
             f"critical width d* = F / g(alpha) = {d_star:.1f}"]
    if args.l0 is not None:
        lines[-1] += f"   (= L0 ln(F/L0) = {theory.critical_width_from_l0(n, args.l0):.1f})"
    has_floor = rows[0].floor is not None
    if has_floor:
        source = "importances from " + args.importances if importances is not None else f"uniform importance, E[x^2] = {args.ex2:g}"
        lines.append(f"floor L*(d) = Eq. 2 ({source})")
    else:
        lines.append("floor: not computed (give --importances FILE or --ex2 VALUE)")
    header = f"{'width':>8} {'d/d*':>7} {'kept':>9} {'dropped':>9} {'dropped %':>9}" + (f" {'floor L*':>12}" if has_floor else "")
    lines += ["", header, "-" * len(header)]
    for r in rows:
        line = f"{r.width:>8d} {r.width / d_star:>7.3f} {r.kept:>9d} {r.dropped:>9d} {100 * r.dropped / n:>8.1f}%"
        if has_floor:
            line += f" {r.floor:>12.6g}"
        lines.append(line)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m opdf_exp.geometry",
                                     description="Minimum-width theorem of knowledge distillation (arXiv 2604.04037).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="critical width, kept features and predicted floors per width")
    p.add_argument("-F", "--features", "--n-features", dest="features", type=int, required=True,
                   help="number of features F (e.g. alive SAE latents)")
    p.add_argument("--alpha", type=float, help="feature sparsity in (0, 1)")
    p.add_argument("--l0", type=float, help="mean active features per token; alpha = 1 - L0/F")
    p.add_argument("--widths", "-w", nargs="+", required=True, help="widths: '128 256', '128,256' or ranges '1-10'")
    p.add_argument("--importances", help="file with one importance per feature (for the Eq. 2 floor)")
    p.add_argument("--ex2", type=float, default=None,
                   help="E[x^2] per feature (scalar); default 1 with --importances, required for floors without")
    p.add_argument("--sort", action="store_true", help="sort unsorted importances instead of rejecting them")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            print(predict(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
