"""Retrying work that SQLite refused with "database is locked".

SQLite's busy handler covers most lock waits, but not all: switching a fresh
database to WAL, or a read lock that would have to be upgraded, fail at once.
Those attempts are safe to repeat after a short, jittered pause.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import OperationalError

T = TypeVar("T")

MAX_LOCKED_ATTEMPTS = 60  # with the backoff cap, about 30 s of retrying
FIRST_BACKOFF_S = 0.005
MAX_BACKOFF_S = 0.5
LOCKED_MARKERS = ("database is locked", "database is busy", "database table is locked")


def is_locked(exc: OperationalError) -> bool:
    message = str(exc.orig if exc.orig is not None else exc).lower()
    return any(marker in message for marker in LOCKED_MARKERS)


class Backoff:
    """Exponential, jittered pauses between attempts."""

    def __init__(self) -> None:
        self._next = FIRST_BACKOFF_S

    async def sleep(self) -> None:
        await asyncio.sleep(self._next * random.uniform(0.5, 1.5))
        self._next = min(self._next * 2, MAX_BACKOFF_S)


async def retry_locked(fn: Callable[[], Awaitable[T]]) -> T:
    """Await ``fn()`` until it does not fail with a lock error (or attempts run out)."""
    backoff = Backoff()
    for attempt in range(1, MAX_LOCKED_ATTEMPTS + 1):
        try:
            return await fn()
        except OperationalError as exc:
            if not is_locked(exc) or attempt == MAX_LOCKED_ATTEMPTS:
                raise
        await backoff.sleep()
    raise AssertionError("unreachable")
