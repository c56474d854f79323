"""User-facing errors.

Why: researchers mistype overrides, point at missing files and run offline. Those are not bugs, so they get one
line that names the fix (and exit code 2), never a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input (config, shape, file, offline hub). The message is one line and says how to fix it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ConfigError(UserError, ValueError):
    """An invalid configuration value or combination of values."""


class MissingFileError(UserError, FileNotFoundError):
    """A local file or folder the config points at does not exist or lacks what we need."""


class OfflineError(UserError, ConnectionError):
    """A hub asset is needed but the hub cannot be reached and nothing is cached locally."""
