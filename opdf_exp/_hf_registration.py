"""Register the subquadratic students with transformers' Auto* factories as soon as transformers is imported.

Why a post-import hook: ``import opdf_exp`` must stay free of transformers (``opdf_exp.mixers`` and ``opdf_exp.mpo``
are pure torch and tested as such), yet ``AutoModelForCausalLM.from_pretrained(<student folder>)`` must work after
``import opdf_exp`` without ``trust_remote_code``. A one-shot meta-path finder wraps the loading of the top-level
``transformers`` module and registers right after it has executed; if transformers is already imported, it
registers at once.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys


def _register() -> None:
    partial = sys.modules.get("opdf_exp.subquadratic.modeling")
    if partial is not None and not hasattr(partial, "register"):
        return  # transformers was first imported by modeling.py itself; the package registers once it is loaded
    from opdf_exp.subquadratic.modeling import register

    register()


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing into this finder
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
