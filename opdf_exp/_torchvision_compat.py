"""Make the CUDA-only torchvision 0.28 wheel importable next to a CPU torch.

Why: PyPI has no CPU build of torchvision 0.28. Its ``_C.so`` links against ``libtorch_cuda.so``, so on a CPU
torch ``import torchvision`` dies in ``_meta_registrations`` (``operator torchvision::nms does not exist``), and
with it ``import timm``, ``import pytorch_lightning`` (through torchmetrics) and parts of transformers.

What: before torchvision is first imported, try to load its ``_C.so``. If that works (a CUDA torch, a GPU
machine) nothing else happens. If it fails, define only the two op schemas that torchvision's Python code
registers fake kernels for. C++ ops (``nms``, ``roi_align``) and image IO stay unavailable, which this
project never uses.

Tied to torchvision 0.28 internals: re-check on upgrade (tests/test_install.py does).

Child processes started with the ``spawn`` method (Lightning's ``ddp_spawn``, DataLoader workers on macOS)
unpickle Lightning objects before anything imports ``opdf_exp``, so they would crash the same way while the parent
waits forever. When the patch is needed, :func:`_make_spawn_children_patch_first` makes every such child import
this package first (see there).
"""
from __future__ import annotations

import importlib.util
import os
import sys

_LIBRARY = None  # the torch.library.Library must stay referenced, or its schema definitions disappear
PATCH_STATE = "not-applied"


def apply() -> str:
    """Apply the work-around once. Returns the state: 'native', 'patched', 'absent' or 'too-late'."""
    global _LIBRARY, PATCH_STATE
    if PATCH_STATE != "not-applied":
        return PATCH_STATE
    spec = importlib.util.find_spec("torchvision")  # does not import torchvision
    if spec is None or not spec.submodule_search_locations:
        PATCH_STATE = "absent"
        return PATCH_STATE
    if "torchvision" in sys.modules:
        # Imported before us: either it worked (native) or the import already failed.
        PATCH_STATE = "too-late"
        return PATCH_STATE
    import torch

    so_path = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
    try:
        torch.ops.load_library(so_path)
        PATCH_STATE = "native"
    except (OSError, ImportError, RuntimeError):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBRARY = lib
        PATCH_STATE = "patched"
        _make_spawn_children_patch_first()
    return PATCH_STATE


SPAWN_MAIN = "opdf_exp._spawn_main"


def _make_spawn_children_patch_first() -> None:
    """A spawned child runs ``init_main_from_name`` (the parent's ``__main__`` module) before it unpickles its
    target, except when that module is a package's ``__main__`` (``python -m opdf_exp``, ``pytest``), which it
    skips. In those cases we name a tiny module of ours instead, whose import applies the patch; a parent started
    from a script keeps its own main (the script imports ``opdf_exp`` itself before starting children)."""
    import multiprocessing.spawn as spawn

    if getattr(spawn.get_preparation_data, "_opdf_patched", False):
        return
    original = spawn.get_preparation_data

    def get_preparation_data(name):
        data = original(name)
        main_name = data.get("init_main_from_name")
        if "init_main_from_path" not in data and (main_name is None or main_name.endswith("__main__")):
            data["init_main_from_name"] = SPAWN_MAIN
        return data

    get_preparation_data._opdf_patched = True
    spawn.get_preparation_data = get_preparation_data
