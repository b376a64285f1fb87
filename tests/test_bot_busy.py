"""A full caption queue, end to end: the real bot and worker against the fake Bot API.

Before issue 12 the busy answer could only come when the bot handled more updates at once than
the queue held: python-telegram-bot held further updates in silence until a handler finished, and
with the defaults (64 and 64) nobody was ever told. Now the bot admits photos itself, below both
the queue's capacity and the update cap, so the overflow is told "busy" at once with any settings,
the defaults included.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bot import texts
from bot.app import CaptionBot
from bot.service import service_config
from captioner.serving.base import CaptionService
from captioner.serving.config import DEVICE_BATCHING
from captioner.serving.process import ProcessCaptionService
from common.settings import Settings
from tests.bot_support import TOKEN, fast_checkpoint
from tests.fake_telegram import FakeTelegram
from tests.helpers import photo_bytes

pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:.*retry_after.*"),  # PTB's AIORateLimiter reads a deprecated field
]

QUEUE_CAPACITY = 2
BATCH_DELAY = 0.5  # seconds every batch of one photo takes: the queue stays full while photos arrive


def slow_worker(delay: float) -> Callable[[Settings, str | None], CaptionService]:
    """The bot's own worker, built from its settings, with every batch ``delay`` seconds slower."""
    def build(settings: Settings, checkpoint: str | None) -> CaptionService:
        return ProcessCaptionService(replace(service_config(settings, checkpoint), debug_batch_delay=delay))
    return build


@asynccontextmanager
async def running_bot(tmp: Path, concurrent_updates: int | None,
                      batch_delay: float = BATCH_DELAY) -> AsyncIterator[FakeTelegram]:
    """The bot with a slow worker; ``concurrent_updates`` None: every queue setting at its default."""
    fake = FakeTelegram(TOKEN)
    await fake.start()
    small_queue: dict[str, Any] = {} if concurrent_updates is None else {
        "queue_capacity": QUEUE_CAPACITY, "batch_size": 1, "batch_wait_ms": 0,
        "concurrent_updates": concurrent_updates, "queue_notice_at": 0, "photos_per_minute": 0,
    }
    settings = Settings(
        token=TOKEN, base_url=fake.base_url, base_file_url=fake.base_file_url, data_dir=tmp / "data",
        model=str(fast_checkpoint(tmp / "model")), device="cpu", worker_threads=1,
        model_poll_seconds=0, request_timeout=120, **small_queue,
    )
    bot = CaptionBot(settings, slow_worker(batch_delay))
    await bot.start()
    try:
        yield fake
    finally:
        await bot.stop()
        await fake.close()


async def send_at_once(fake: FakeTelegram, count: int) -> list[dict[str, Any]]:
    """One photo from each of ``count`` people, all before the bot answers any."""
    people = [fake.person(500 + i, f"P{i}") for i in range(count)]
    return list(await asyncio.gather(*(p.photo(photo_bytes(300 + i)) for i, p in enumerate(people))))


async def the_answers(fake: FakeTelegram, photos: list[dict[str, Any]]) -> list[str]:
    """The one reply each photo got, in its sender's chat."""
    for photo in photos:
        await fake.wait_reply(photo, timeout=120)
    await asyncio.sleep(0.5)  # would a second answer follow?
    answers = []
    for photo in photos:
        [reply] = fake.replies_to(photo["chat"]["id"], photo["message_id"])
        assert reply["chat"]["id"] == photo["from"]["id"]  # told in their own chat, quoting their photo
        answers.append(reply["text"])
    return answers


async def test_a_full_queue_tells_people_it_is_busy_and_they_can_try_again(tmp_path: Path) -> None:
    async with running_bot(tmp_path, concurrent_updates=12) as fake:
        photos = await send_at_once(fake, 12)
        answers = await the_answers(fake, photos)
        busy = [i for i, text in enumerate(answers) if text == texts.BUSY]
        captioned = [i for i, text in enumerate(answers) if text.startswith("📷")]
        print(f"\n{len(photos)} photos at once, queue of {QUEUE_CAPACITY}: {len(captioned)} captioned, "
              f"{len(busy)} told busy")
        assert busy, answers  # more photos in hand than places: the overflow must hear "busy"
        assert len(captioned) >= QUEUE_CAPACITY, answers
        assert len(busy) + len(captioned) == len(photos), answers
        # "Try again in a minute": once the queue has room, the same person gets a caption.
        retried = photos[busy[0]]
        person = fake.person(retried["from"]["id"], retried["from"]["first_name"])
        again = await person.photo(photo_bytes(399))
        [answer] = await fake.wait_reply(again, timeout=120)
        assert answer["text"].startswith("📷"), answer["text"]


async def test_with_no_more_handlers_than_places_the_overflow_is_still_told_busy(tmp_path: Path) -> None:
    # Before issue 12 everyone here waited in silence for their caption (the update cap swallowed
    # the busy path); now the bot keeps a handler free and tells the overflow at once.
    async with running_bot(tmp_path, concurrent_updates=QUEUE_CAPACITY) as fake:
        photos = await send_at_once(fake, 3 * QUEUE_CAPACITY)
        answers = await the_answers(fake, photos)
        assert any(text == texts.BUSY for text in answers), answers
        assert all(text == texts.BUSY or text.startswith("📷") for text in answers), answers


async def test_with_the_default_settings_a_full_bot_says_busy_at_once(tmp_path: Path) -> None:
    defaults = Settings()
    assert (defaults.concurrent_updates, defaults.queue_capacity) == (64, None)  # the queue's own 256
    # The 48 photos the bot admits take 12 s at a quarter of a second each, in batches of the CPU's
    # default size: the queue stays full well past the last arrival.
    batch_delay = 0.25 * DEVICE_BATCHING["cpu"].max_batch_size
    async with running_bot(tmp_path, concurrent_updates=None, batch_delay=batch_delay) as fake:
        photos = await send_at_once(fake, 100)
        answers = await the_answers(fake, photos)
        busy = [photo for photo, text in zip(photos, answers, strict=True) if text == texts.BUSY]
        captioned = [text for text in answers if text.startswith("📷")]
        assert busy and len(busy) + len(captioned) == len(photos), answers
        waits = sorted(fake.latency(photo, fake.replies_to(photo["chat"]["id"], photo["message_id"])[0])
                       for photo in busy)
        slowest_caption = max(fake.latency(p, fake.replies_to(p["chat"]["id"], p["message_id"])[0])
                              for p in photos if p not in busy)
        print(f"\n100 photos at once, default settings: {len(captioned)} captioned, {len(busy)} told busy "
              f"after {waits[len(waits) // 2]:.2f} s (median), {waits[-1]:.2f} s (slowest); "
              f"slowest caption {slowest_caption:.1f} s")
        # Told at once, not after the queue drained: sending 100 answers is itself paced by the
        # Bot API's 30 messages a second (AIORateLimiter), the rest is the shared CPU.
        assert waits[-1] < slowest_caption / 2, (waits, slowest_caption)
        # Those far back in the long queue were told their place, and that message became the caption.
        announced = [p for p in photos if p not in busy and any(
            edit.startswith("⏳") for reply in fake.replies_to(p["chat"]["id"], p["message_id"])
            for edit in reply.get("_edits", []))]
        assert announced, answers
