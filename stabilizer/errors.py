"""Errors a user sees: each says what was found, where, and what to do next."""

from __future__ import annotations


class StabilizerError(Exception):
    """Base class for errors stabilizer reports to the user without a traceback."""


class ConfigError(StabilizerError, ValueError):
    """A configuration value is invalid. The message names the field or option."""


class ModelLoadError(StabilizerError):
    """A model could not be built or loaded (missing folder, offline hub, bad preset)."""


class LoraScopeError(StabilizerError):
    """A trainable parameter lies outside the components LoRA is allowed to touch."""


class BadSampleError(StabilizerError):
    """One data record cannot be used.

    ``source`` names the file and the record (``"problems.json, record 'pid-42'"``),
    ``reason`` says what is wrong, ``hint`` what to do about it.
    """

    def __init__(self, source: str, reason: str, hint: str = "") -> None:
        self.source = source
        self.reason = reason
        self.hint = hint
        message = f"{source}: {reason}"
        if hint:
            message += f". {hint}"
        super().__init__(message)


class CheckpointError(StabilizerError):
    """A checkpoint is missing, incomplete, or does not match the run."""
