"""A per-person sliding-window rate limit (photos per minute), kept in memory."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """At most ``limit`` events per ``period`` seconds per key; ``limit`` 0 disables it."""

    def __init__(self, limit: int, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.period = period
        self._clock = clock
        self._events: dict[int, deque[float]] = {}
        self._last_sweep = clock()

    def acquire(self, key: int) -> float:
        """Record an event and return 0.0, or return the seconds until one is allowed (no event recorded)."""
        if self.limit <= 0:
            return 0.0
        now = self._clock()
        self._sweep(now)
        events = self._events.setdefault(key, deque())
        while events and now - events[0] >= self.period:
            events.popleft()
        if len(events) >= self.limit:
            return max(0.01, events[0] + self.period - now)
        events.append(now)
        return 0.0

    def _sweep(self, now: float) -> None:
        """Drop idle people now and then, so memory stays bounded by recent senders."""
        if now - self._last_sweep < self.period:
            return
        self._last_sweep = now
        stale = [key for key, events in self._events.items() if not events or now - events[-1] >= self.period]
        for key in stale:
            del self._events[key]

    def __len__(self) -> int:
        return len(self._events)
