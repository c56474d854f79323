"""``python -m opdf_exp`` runs the configured experiment (the offline quickstart with no overrides)."""
from opdf_exp.runner.cli import main

if __name__ == "__main__":
    main()
