"""Exceptions raised by storage. The one a person hears about carries a code, not a sentence:
the bot words it (``bot/texts.py``)."""

from __future__ import annotations

from enum import StrEnum


class StorageError(Exception):
    """Base class of every storage error."""


class NotFound(StorageError, LookupError):
    """A row the caller referred to (caption, photo, model version) does not exist."""


class Rejection(StrEnum):
    """Why a correction was not recorded; the error's ``details`` say what is in brackets."""

    NO_CAPTION = "no_caption"  # the caption it corrects is gone
    TOO_SHORT = "too_short"  # (limit) in characters, after normalising
    TOO_LONG = "too_long"  # (length, limit) in characters
    TOO_FEW_WORDS = "too_few_words"  # (limit) in words
    UNCHANGED = "unchanged"  # the same words as the caption
    DAILY_LIMIT = "daily_limit"  # (limit) corrections by this person in the last 24 hours


class CorrectionRejected(StorageError, ValueError):
    """A correction that was not recorded: ``code`` says why, ``details`` give the numbers.

    ``str()`` is for logs.
    """

    def __init__(self, code: Rejection, **details: int) -> None:
        self.code = Rejection(code)
        self.details = dict(details)
        shown = ", ".join(f"{key}={value}" for key, value in sorted(self.details.items()))
        super().__init__(f"Correction rejected: {self.code.value}" + (f" ({shown})" if shown else ""))

    @property
    def reason(self) -> Rejection:
        """The code under its older name (logs and metrics read ``reason``)."""
        return self.code


class ModelVersionError(StorageError, ValueError):
    """An impossible model-version operation (duplicate name, rejecting the active model...)."""
