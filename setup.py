"""Package discovery only (metadata is in pyproject.toml).

The Hydra configs live in the top-level ``conf/`` folder but are installed as the package ``opdf_exp.conf``, so
``python -m opdf_exp`` finds them through ``pkg://opdf_exp.conf`` in editable and non-editable installs alike.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["opdf_exp", "opdf_exp.*"]) + ["opdf_exp.conf"],
    package_dir={"opdf_exp.conf": "conf"},
)
