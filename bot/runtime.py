"""What the handlers share: settings, storage, the caption service and a few counters."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

from telegram.ext import CallbackContext

from bot.config import Settings
from bot.ratelimit import RateLimiter
from captioner.serving.base import CaptionService
from storage import Storage

RUNTIME_KEY = "captionbot.runtime"
CHAT_ACTION_EVERY = 4.0  # seconds; Telegram shows an action for about 5 s


@dataclass
class Runtime:
    settings: Settings
    storage: Storage
    service: CaptionService
    limiter: RateLimiter
    started_at: float = field(default_factory=time.monotonic)
    captioned: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    promoted_loaded: str | None = None  # name of the promoted model version now serving, if any
    # "name@path" -> error: versions that failed to load, not retried by the poll
    failed_models: dict[str, str] = field(default_factory=dict)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _chat_actions: dict[tuple[int, str], float] = field(default_factory=dict)

    def note_caption(self, latency_ms: float) -> None:
        self.captioned += 1
        self.latencies_ms.append(latency_ms)

    def median_latency_ms(self) -> float | None:
        return statistics.median(self.latencies_ms) if self.latencies_ms else None

    def chat_action_due(self, chat_id: int, action: str) -> bool:
        """Whether to send a chat action now (at most one of a kind per chat every few seconds)."""
        now = time.monotonic()
        last = self._chat_actions.get((chat_id, action))
        if last is not None and now - last < CHAT_ACTION_EVERY:
            return False
        if len(self._chat_actions) > 10_000:
            self._chat_actions = {k: v for k, v in self._chat_actions.items() if now - v < CHAT_ACTION_EVERY}
        self._chat_actions[(chat_id, action)] = now
        return True


def get_runtime(context: CallbackContext) -> Runtime:
    runtime = context.application.bot_data.get(RUNTIME_KEY)
    if not isinstance(runtime, Runtime):
        raise RuntimeError("the bot's runtime is not set up (post_init did not run)")
    return runtime
