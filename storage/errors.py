"""Exceptions raised by storage; the ones a person may see carry a friendly message."""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every storage error."""


class NotFound(StorageError, LookupError):
    """A row the caller referred to (caption, photo, model version) does not exist."""


class CorrectionRejected(StorageError, ValueError):
    """A correction that was not recorded; ``str()`` is a message to show the person as is.

    ``reason`` is a short machine-readable code for logs and metrics.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ModelVersionError(StorageError, ValueError):
    """An impossible model-version operation (duplicate name, rejecting the active model...)."""
