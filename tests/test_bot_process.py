"""``python -m bot`` as a real process: configuration errors, start-up, SIGTERM with a photo in
flight, and a restart between ✏️ and the reply. The token must never reach the logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from storage import Storage
from tests.bot_support import TOKEN, fast_checkpoint
from tests.fake_telegram import FakeTelegram
from tests.helpers import photo_bytes

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:.*retry_after.*")]
SECRET = TOKEN.split(":", 1)[1]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a bot process: no inherited bot settings, imports from the checkout."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TELEGRAM_", "CAPTIONBOT_")) and k != "DATABASE_URL"}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_bot_sync(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_a_token_it_explains_how_to_get_one(tmp_path: Path) -> None:
    result = run_bot_sync(tmp_path, clean_env())
    assert result.returncode == 2
    assert "@BotFather" in result.stderr and "/newbot" in result.stderr
    assert "python -m captioner caption" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bad_setting_is_named(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nCAPTIONBOT_PHOTOS_PER_MINUTE=lots\n")
    result = run_bot_sync(tmp_path, clean_env())
    assert result.returncode == 2
    assert "CAPTIONBOT_PHOTOS_PER_MINUTE" in result.stderr and ".env.example" in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeTelegram]:
    server = FakeTelegram(TOKEN)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class BotProcess:
    def __init__(self, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.cwd, self.env, self.log = cwd, env, log
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        handle = self.log.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", cwd=self.cwd, env=self.env, stdout=handle, stderr=handle)
        handle.close()

    async def stop(self, timeout: float = 90) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def wait(self, timeout: float = 60) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()


async def test_wrong_token_exits_with_a_clear_message(fake: FakeTelegram, tmp_path: Path) -> None:
    wrong = "7000001:AAF-not-the-right-token-000000000"
    env = clean_env(**{**fake.env(), "TELEGRAM_BOT_TOKEN": wrong, "CAPTIONBOT_DATA_DIR": str(tmp_path / "d")})
    bot = BotProcess(tmp_path, env, tmp_path / "bot.log")
    await bot.start()
    try:
        assert await bot.wait() == 1
    finally:
        bot.kill()
    output = bot.log.read_text()
    assert "rejected TELEGRAM_BOT_TOKEN" in output
    assert wrong.split(":")[1] not in output and "Traceback" not in output


async def test_sigterm_finishes_work_in_hand_and_a_restart_keeps_the_correction_flow(
        fake: FakeTelegram, tmp_path: Path) -> None:
    model = fast_checkpoint(tmp_path / "model")
    data_dir = tmp_path / "data"
    # The token comes from .env in the working directory, the rest from the environment.
    (tmp_path / ".env").write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\n")
    env = clean_env(
        TELEGRAM_BASE_URL=fake.base_url, TELEGRAM_BASE_FILE_URL=fake.base_file_url,
        CAPTIONBOT_DATA_DIR=str(data_dir), CAPTIONBOT_MODEL=str(model), CAPTIONBOT_DEVICE="cpu",
        CAPTIONBOT_WORKER_THREADS="1", CAPTIONBOT_LOG_LEVEL="DEBUG", CAPTIONBOT_MODEL_POLL_SECONDS="0",
    )
    log = tmp_path / "bot.log"
    rosa = fake.person(201, "Rosa")
    bot = BotProcess(tmp_path, env, log)
    await bot.start()
    try:
        await fake.wait_for(lambda: fake.polls, timeout=120, what="the first bot to start polling")
        assert [c["command"] for c in fake.commands["default"]][:2] == ["start", "help"]

        photo = await rosa.photo(photo_bytes(1))
        [answer] = await fake.wait_reply(photo)
        query = await rosa.press(answer, "✏️")
        await fake.wait_answer(query)
        [prompt] = await fake.wait_for(lambda: fake.replies_to(201, answer["message_id"]), what="the prompt")

        # A photo arrives, and SIGTERM follows as soon as the bot works on it: it still gets its caption.
        second = await rosa.photo(photo_bytes(2))
        file_id = second["photo"][-1]["file_id"]
        await fake.wait_for(lambda: any(c.params.get("file_id") == file_id for c in fake.calls_of("getFile")),
                            what="the bot to start on the photo")
        started = time.monotonic()
        assert await bot.stop() == 0
        stop_seconds = time.monotonic() - started
        [late] = fake.replies_to(201, second["message_id"])
        assert late["text"].startswith("📷")
    finally:
        bot.kill()

    # While the bot is down, Rosa replies to the prompt; the restarted bot takes the correction.
    correction = await rosa.text("a woman rides a bicycle in the rain", reply_to=prompt)
    bot = BotProcess(tmp_path, env, log)
    await bot.start()
    try:
        [ack] = await fake.wait_reply(correction, timeout=120)
        assert "saved" in ack["text"]
        await asyncio.sleep(0.5)
        assert len(fake.replies_to(201, second["message_id"])) == 1  # not answered twice after the restart
        assert await bot.stop() == 0
    finally:
        bot.kill()

    storage = await Storage.open(data_dir=data_dir)
    try:
        examples = await storage.corrections_for_training()
    finally:
        await storage.close()
    assert [ex.text for ex in examples] == ["a woman rides a bicycle in the rain"]

    output = log.read_text()
    assert "photo captioned" in output and "stopped in" in output
    assert TOKEN not in output and SECRET not in output
    assert fake.conflicts == 0
    print(f"\nSIGTERM to exit with a photo in flight: {stop_seconds:.1f} s")
