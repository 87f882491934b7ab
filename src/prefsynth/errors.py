"""The small error hierarchy. The CLI maps each class to a one-line message and an exit code.

Library code raises these for problems a user can fix (bad config, bad input, missing extra,
missing key); per-request model failures never raise: they travel as ``ChatResult.error``.
"""

from __future__ import annotations


class PrefsynthError(Exception):
    """Base class: a problem the user can act on. ``str(err)`` is the one-line message."""

    exit_code = 1


class ConfigError(PrefsynthError):
    """The YAML config is invalid: unknown key, wrong type, inconsistent settings."""

    exit_code = 2


class InputError(PrefsynthError):
    """A prompt file or dataset is unusable: missing, malformed, empty, wrong field."""

    exit_code = 3


class MissingExtraError(PrefsynthError):
    """An optional dependency is not installed; the message names the pip install to run."""

    exit_code = 4

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs an optional dependency: pip install 'prefsynth[{extra}]'")


class BackendError(PrefsynthError):
    """A backend cannot start at all (missing API key, model file not found, server down)."""

    exit_code = 5


class StoreError(PrefsynthError):
    """The request store is unusable (corrupt file, written by an incompatible version)."""

    exit_code = 6
