"""``python -m opdf_exp.report <multirun-or-runs-dir> [--metric test/acc] [--by decomposition.n] [--wandb]``.

Tables (mean ± std, n seeds, 95% CI, parameters), paired differences over shared seeds, plots against the
numeric keys that vary, and the failed or unfinished jobs; see :mod:`opdf_exp.runner.report`.
"""
from __future__ import annotations

import sys

from opdf_exp.runner.report import main

if __name__ == "__main__":
    sys.exit(main())
