"""Capture intermediate module outputs by module path with forward hooks, without rewriting the model."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from opdf_exp.errors import ConfigError


class ForwardTaps:
    """Registers forward hooks on named submodules and stores their latest outputs.

    ``taps.outputs[path]`` holds the module's output (the first element when the module returns a tuple, as HF
    blocks do). Use as a context manager or call :meth:`remove`. Unknown paths raise a one-line error listing
    close matches.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]):
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for path in paths:
            if path not in modules:
                close = [name for name in modules if path.split(".")[-1] in name][:5]
                raise ConfigError(f"module path '{path}' names no module of {type(model).__name__}"
                                  + (f"; close matches: {', '.join(close)}" if close else ""))
            self._handles.append(modules[path].register_forward_hook(self._hook(path)))

    def _hook(self, path: str):
        def store(_module, _inputs, output):
            self.outputs[path] = output[0] if isinstance(output, (tuple, list)) else output
        return store

    def clear(self) -> None:
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "ForwardTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
