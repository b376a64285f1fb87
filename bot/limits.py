"""Per-person limits on everything people can make the bot do (issue 12).

* :class:`ActionGate`: button presses, commands, texts and other messages share one per-person
  rate limit (photos have their own, :attr:`Limits.photos`). It runs before every other handler
  (group -1) and stops the update when the person is over the limit; they are told once per
  window, so a flood of presses does not turn into a flood of answers.
* :class:`Albums`: an album (one ``media_group_id``, at most Telegram's 10 photos) counts as one
  request against the photo rate limit.
* :class:`InFlight`: at most N photos of one person are downloaded, queued or captioned at once;
  the rest of an album or burst waits its turn in the bot, so one person never fills the
  caption queue and others' photos get their places in it.
* :class:`Admission`: the bot's own count of photos in hand (from admission to answer). Beyond
  it a photo is told "busy" at once. It is kept below the number of updates handled at once, so
  python-telegram-bot's concurrency cap never holds photos in silence while the queue is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from bot.ratelimit import RateLimiter

ALBUM_MAX_PHOTOS = 10  # Telegram's limit on one media group
ALBUM_MEMORY = 10_000  # media groups remembered (oldest forgotten first)


class Albums:
    """Which media groups already paid the photo rate limit, and how many photos each brought."""

    def __init__(self, period: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._clock = clock
        self._seen: OrderedDict[tuple[int, str], tuple[float, int]] = OrderedDict()

    def already_admitted(self, person: int, media_group_id: str | None) -> bool:
        """True (and counted) for the 2nd..10th photo of an album whose first photo was admitted."""
        if media_group_id is None:
            return False
        key = (person, media_group_id)
        seen = self._seen.get(key)
        if seen is None:
            return False
        admitted_at, count = seen
        if count >= ALBUM_MAX_PHOTOS or self._clock() - admitted_at > self.period:
            return False
        self._seen[key] = (admitted_at, count + 1)
        return True

    def admit(self, person: int, media_group_id: str | None) -> None:
        """Note the album's first photo, which paid the rate limit."""
        if media_group_id is None:
            return
        self._seen[(person, media_group_id)] = (self._clock(), 1)
        while len(self._seen) > ALBUM_MEMORY:
            self._seen.popitem(last=False)


class InFlight:
    """At most ``per_person`` photos of one person in flight; further ones wait in order."""

    def __init__(self, per_person: int) -> None:
        self.per_person = per_person
        self._slots: dict[int, asyncio.Semaphore] = {}
        self._users: dict[int, int] = {}

    @contextlib.asynccontextmanager
    async def slot(self, person: int) -> AsyncIterator[None]:
        semaphore = self._slots.setdefault(person, asyncio.Semaphore(self.per_person))
        self._users[person] = self._users.get(person, 0) + 1
        try:
            async with semaphore:
                yield
        finally:
            self._users[person] -= 1
            if not self._users[person]:  # nobody holds or waits: keep memory to active senders
                del self._users[person]
                del self._slots[person]


# Update handlers kept free of photos (a quarter, 1 to 16): for "busy" answers, buttons and
# commands under load.
RESERVED_HANDLERS = 16


class Admission:
    """At most ``capacity`` photos in hand at once; :meth:`enter` says whether this one is."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.in_hand = 0

    @classmethod
    def for_settings(cls, queue_capacity: int, concurrent_updates: int) -> Admission:
        """No more photos than the queue holds, nor than the handlers that leave some free."""
        reserved = max(1, min(RESERVED_HANDLERS, concurrent_updates // 4))
        return cls(min(queue_capacity, concurrent_updates - reserved))

    def enter(self) -> bool:
        if self.in_hand >= self.capacity:
            return False
        self.in_hand += 1
        return True

    def leave(self) -> None:
        self.in_hand -= 1


@dataclass
class Limits:
    """Every per-person limit the bot keeps, built from the settings."""

    photos: RateLimiter
    actions: RateLimiter
    in_flight: InFlight
    admission: Admission
    albums: Albums = field(default_factory=Albums)
    _told: dict[int, float] = field(default_factory=dict)

    def should_tell(self, person: int, retry_after: float) -> bool:
        """Whether to tell a rate-limited person (once until their window opens again)."""
        now = time.monotonic()
        if len(self._told) > 10_000:
            self._told = {k: v for k, v in self._told.items() if v > now}
        if self._told.get(person, 0.0) > now:
            return False
        self._told[person] = now + retry_after
        return True
