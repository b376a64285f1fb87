"""Nothing lost to a crash (issue 12): a photo that arrived just before a ``kill -9`` is answered,
once, by the next run, from the durable inbox (a real bot process against the fake Bot API)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from storage import Storage
from tests.bot_support import TOKEN, fast_checkpoint
from tests.fake_telegram import FakeTelegram
from tests.helpers import photo_bytes
from tests.test_bot_process import BotProcess, clean_env
from tests.test_bot_process import fake as fake  # the fake Bot API fixture

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:.*retry_after.*")]


SECRET = TOKEN.split(":", 1)[1]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def environment_of(pid: int) -> str:
    """The environment a process was started with (as the kernel keeps it)."""
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")


async def test_a_photo_received_just_before_kill_9_is_answered_once_after_the_restart(
        fake: FakeTelegram, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    env = clean_env(
        TELEGRAM_BOT_TOKEN=TOKEN, TELEGRAM_BASE_URL=fake.base_url, TELEGRAM_BASE_FILE_URL=fake.base_file_url,
        CAPTIONBOT_DATA_DIR=str(data_dir), CAPTIONBOT_MODEL=str(fast_checkpoint(tmp_path / "model")),
        CAPTIONBOT_DEVICE="cpu", CAPTIONBOT_WORKER_THREADS="1", CAPTIONBOT_MODEL_POLL_SECONDS="0",
    )
    log = tmp_path / "bot.log"
    uma = fake.person(301, "Uma")
    bot = BotProcess(tmp_path, env, log)
    await bot.start()
    try:
        await fake.wait_for(lambda: fake.polls, timeout=120, what="the bot to start polling")
        fake.download_delay = 30.0  # the photo is in the bot's hands, its download stalls
        photo = await uma.photo(photo_bytes(1))
        await fake.wait_for(lambda: fake.calls_of("download"), what="the bot to start downloading")
        await fake.wait_for(lambda: not fake.updates, what="the update to be confirmed to Telegram")
        bot.kill()  # SIGKILL: no shutdown, no answer
        await bot.wait()
    finally:
        bot.kill()
    assert fake.replies_to(301, photo["message_id"]) == []
    assert not fake.updates  # Telegram will not deliver it again: only the inbox knows of it

    fake.download_delay = 0.0
    bot = BotProcess(tmp_path, env, log)
    await bot.start()
    try:
        [answer] = await fake.wait_reply(photo, timeout=120)
        assert answer["text"].startswith("📷"), answer["text"]
        # The token was read once and removed from the environment the caption worker inherits.
        assert bot.process is not None
        workers = children(bot.process.pid)
        assert workers and all(SECRET not in environment_of(pid) for pid in workers)
        assert await bot.stop() == 0
    finally:
        bot.kill()

    bot = BotProcess(tmp_path, env, log)  # a third run answers nothing again
    polls = fake.polls
    await bot.start()
    try:
        await fake.wait_for(lambda: fake.polls > polls, timeout=120, what="the third run to poll")
        await asyncio.sleep(1.0)
        assert len(fake.replies_to(301, photo["message_id"])) == 1
        assert await bot.stop() == 0
    finally:
        bot.kill()
    storage = await Storage.open(data_dir=data_dir)
    try:
        assert await storage.inbox_take_for_replay() == []
        assert (await storage.stats()).captions == 1
    finally:
        await storage.close()
