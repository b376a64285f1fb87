"""What the handlers share: settings, storage, the caption service and a few counters.

The Application keeps one :class:`BotData` (python-telegram-bot's ``bot_data``, typed through
:data:`CONTEXT_TYPES`); :class:`CaptionBot` attaches the :class:`Runtime` to it once storage and
the caption service are up, so a handler reads ``context.bot_data.runtime``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from telegram.ext import CallbackContext, ContextTypes, ExtBot

from bot.limits import Limits
from bot.metrics import BotMetrics
from captioner.images import ImageLimits
from captioner.serving.base import CaptionService
from common.settings import Settings
from storage import Storage

CHAT_ACTION_EVERY = 4.0  # seconds; Telegram shows an action for about 5 s


@dataclass
class Runtime:
    settings: Settings
    storage: Storage
    service: CaptionService
    limits: Limits
    image_limits: ImageLimits = field(default_factory=ImageLimits)  # the worker's, for re-encoding
    metrics: BotMetrics = field(default_factory=BotMetrics)  # the bot's own registry (bot/metrics.py)
    started_at: float = field(default_factory=time.monotonic)
    captioned: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    promoted_loaded: str | None = None  # name of the promoted model version now serving, if any
    # "name@path" -> error: versions that failed to load, not retried by the poll
    failed_models: dict[str, str] = field(default_factory=dict)
    disk_low_told: bool = False  # operators were told the disk is below the floor (until it recovers)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # candidates awaiting review the admins were told about, and the review messages' (chat, message)
    # -> model version id: Approve / Reject work only under the message sent for that candidate
    reviews_sent: set[str] = field(default_factory=set)
    review_messages: dict[tuple[int, int], int] = field(default_factory=dict)
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


class BotData:
    """The Application's ``bot_data``: the runtime, once the bot has started."""

    def __init__(self) -> None:
        self._runtime: Runtime | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise RuntimeError("the bot's runtime is not set up (CaptionBot.start has not run)")
        return self._runtime

    def attach(self, runtime: Runtime) -> None:
        self._runtime = runtime


# The context every handler gets: context.bot_data is a BotData.
Context = CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], BotData]
CONTEXT_TYPES = ContextTypes(bot_data=BotData)
