"""The bot's small parts: settings -> caption service, callback data, rate limit, texts, log redaction.
(The settings themselves: tests/test_settings.py.)"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from telegram import Update
from telegram.error import NetworkError, TimedOut

from bot import keyboards, texts
from bot.handlers.errors import on_error
from bot.limits import ALBUM_MAX_PHOTOS, Admission, Albums, InFlight
from bot.logs import MASK, RedactingFormatter, configure_logging
from bot.ratelimit import RateLimiter
from bot.runtime import BotData
from bot.service import service_config
from captioner.images import ImageLimits, ImageProblem, image_error
from captioner.serving.config import ServiceConfig
from common.settings import BOT_API_DOWNLOAD_LIMIT, Settings
from storage.errors import CorrectionRejected, Rejection
from tests.fake_telegram import ApiError, check_reply_markup, parse_html

TOKEN = "123456:AAE-secret-part-of-the-token_xyz"


# ---------------------------------------------------------------------- settings -> caption service


def test_unset_service_settings_keep_the_caption_services_defaults() -> None:
    config = service_config(Settings(token=TOKEN), None)
    defaults = ServiceConfig()
    tuning = ("device", "threads", "max_batch_size", "max_wait_ms", "queue_capacity", "max_queue_seconds",
              "precision", "request_timeout", "default_beam_size")
    assert {f: getattr(config, f) for f in tuning} == {f: getattr(defaults, f) for f in tuning}
    assert config.image_limits.max_pixels == ImageLimits().max_pixels
    assert config.image_limits.max_bytes == BOT_API_DOWNLOAD_LIMIT and config.checkpoint is None


def test_service_settings_are_passed_through_unchanged(tmp_path: Path) -> None:
    settings = Settings(token=TOKEN, batch_size=8, batch_wait_ms=25, max_file_mb=5, max_megapixels=2,
                        request_timeout=30, worker_threads=2, queue_capacity=3, beam_size=1, device="cpu",
                        max_queue_seconds=4, precision="bfloat16")
    config = service_config(settings, str(tmp_path))
    assert (config.max_queue_seconds, config.precision) == (4.0, "bfloat16")  # the worker refuses it on CPU
    assert (config.max_batch_size, config.max_wait_ms) == (8, 25.0)
    assert (config.request_timeout, config.threads, config.queue_capacity) == (30.0, 2, 3)
    assert (config.default_beam_size, config.device) == (1, "cpu")
    assert config.image_limits == ImageLimits(max_bytes=5 * 1024 * 1024, max_pixels=2_000_000)
    assert config.checkpoint == str(tmp_path.resolve())


# ---------------------------------------------------------------------- keyboards


def test_callback_data_round_trips_and_fits_in_64_bytes() -> None:
    for caption_id in (1, 42, 10**17):
        markup = keyboards.caption_keyboard(caption_id, my_vote=True, counts=(3, 1))
        data = [b.callback_data for row in markup.inline_keyboard for b in row]
        assert all(isinstance(d, str) and 0 < len(d.encode()) <= 64 for d in data)
        actions = [keyboards.parse(str(d)) for d in data]
        assert [a.kind for a in actions if a] == ["vote", "vote", "correct", "attention"]
        assert all(a is not None and a.caption_id == caption_id for a in actions)
        assert check_reply_markup(markup.to_json()) is not None  # what Telegram would accept
    assert keyboards.parse("v:7:u") == keyboards.Action("vote", 7, up=True)
    assert keyboards.parse("f:y:5") == keyboards.Action("forget", confirm=True, user_id=5)
    assert keyboards.parse("f:y") is None
    for junk in (None, "", "v:7", "v:x:u", "v:-1:u", "c:1:2", "a:" + "9" * 40, "zzz", "v:7:sideways"):
        assert keyboards.parse(junk) is None


def test_keyboard_labels_start_with_the_four_emoji_and_mark_the_vote() -> None:
    labels = [b.text for row in keyboards.caption_keyboard(5, my_vote=False).inline_keyboard for b in row]
    assert [label.split()[0] for label in labels] == ["👍", "👎", "✏️", "🔍"]
    assert labels[1].endswith("✓") and not labels[0].endswith("✓")


# ---------------------------------------------------------------------- rate limit


def test_rate_limit_sliding_window() -> None:
    now = [1000.0]
    limiter = RateLimiter(3, 60, clock=lambda: now[0])
    assert [limiter.acquire(1) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire(1) == pytest.approx(60)
    assert limiter.acquire(2) == 0.0  # per person
    now[0] += 30
    assert limiter.acquire(1) == pytest.approx(30)
    now[0] += 30
    assert limiter.acquire(1) == 0.0
    now[0] += 1000
    limiter.acquire(3)
    assert len(limiter) == 1  # idle people are forgotten
    assert RateLimiter(0).acquire(1) == 0.0


# ---------------------------------------------------------------------- texts


def _all_texts() -> list[str]:
    samples: dict[str, object] = {
        "first_name": "<Zoë & co>", "text": "a <dog> & a cat", "caption_text": "a dog",
        "current_text": "a cat",
        "position": 4, "wait_seconds": 12.3, "size": 25 * 1024 * 1024, "limit": 6, "reason": "bad <x>",
        "retry_after": 42.0, "file_name": "<cv>.pdf", "mime_type": "application/pdf", "votes": 1,
        "corrections": 2, "captions": 3, "photos": 4, "command": "stats",
        "free": 1 << 30, "floor": 2 << 30,
        "retention_days": 30.0, "trained_retention_days": 365.0, "days": 1.0,
        # operator review
        "name": "m<2>", "parent": "m<1>", "word": "<uni>", "correction": "a <uni> & a cycle",
        "examples": {"<uni>": ["a <uni> cycle"]},
        "metrics": {"new_words": ["<uni>"], "reason": "better <x>", "base": {"corrections": {"CIDEr": 0.1}},
                    "candidate": {"corrections": {"CIDEr": 0.5}}},
        "confident": False, "seen": (("<tabby & co>", 0.6),),
    }
    out: list[str] = []
    for name, value in vars(texts).items():
        if name.startswith("_") or (name.isupper() and not isinstance(value, str)):
            continue
        if isinstance(value, str) and name.isupper():
            out.append(value.format(serving="v1", name="v2", old="v1", reason="x") if "{" in value else value)
        elif inspect.isfunction(value) and value.__module__ == texts.__name__ and name not in (
                "bot_commands", "reload_message", "stats", "bad_image", "correction_rejected"):
            params = inspect.signature(value).parameters
            out.append(value(**{p: samples[p] for p in params}))
    out.append(texts.stats(captions=1, photos=1, people=1, votes_up=1, votes_down=0, corrections=0,
                           corrections_untrained=0, captions_today=1, active_model=None, serving_model="m<1>",
                           waiting=0, in_flight=0, capacity=8, wait_seconds=0.1, uptime_seconds=4000,
                           captioned_since_start=1, median_latency_ms=None))
    out += [texts.bad_image(image_error(code, size=25 * 1024 * 1024, limit=6, format="<x>")) for code in ImageProblem]
    out += [texts.correction_rejected(CorrectionRejected(code, length=400, limit=300)) for code in Rejection]
    return out


def test_every_text_is_valid_telegram_html_and_short_enough() -> None:
    all_texts = _all_texts()
    assert len(all_texts) > 40
    for text in all_texts:
        try:
            plain = parse_html(text)
        except ApiError as err:
            raise AssertionError(f"{text!r}: {err}") from None
        assert 0 < len(plain) <= 4096


def test_person_supplied_text_is_escaped() -> None:
    assert parse_html(texts.caption("a <b>dog</b> & cat")) == "📷 A <b>dog</b> & cat."
    assert parse_html(texts.correction_saved("x < y")).count("x < y") == 1
    assert texts.caption("") and texts.caption("is it?").endswith("?")


def test_an_untrusted_caption_is_hedged_with_what_the_classifier_saw() -> None:
    hedged = texts.caption("a brown dog runs", confident=False, seen=(("tabby", 0.62), ("tiger cat", 0.2)))
    assert hedged == "🤔 I'm not sure. It may be a tabby; my best sentence is: A brown dog runs."
    assert "an espresso" in texts.caption("a dog", False, (("espresso", 0.9),))
    assert parse_html(texts.caption("a <dog>", False, (("<b>", 0.9),))).count("<b>") == 1
    assert texts.caption("a dog", False) == "🤔 I'm not sure. My best sentence is: A dog."
    assert texts.caption("a dog", True, (("tabby", 0.9),)) == "📷 A dog."


def test_button_answers_fit_in_a_callback_answer() -> None:
    for text in (texts.VOTE_UP_THANKS, texts.VOTE_DOWN_THANKS, texts.VOTE_UNCHANGED, texts.CAPTION_GONE,
                 texts.PHOTO_GONE, texts.BUTTON_UNKNOWN, texts.BUTTON_NOT_HERE, texts.ERROR,
                 texts.CORRECTION_CALLBACK, texts.ATTENTION_CALLBACK, texts.rate_limited(6, 59),
                 texts.actions_limited(30, 59)):
        assert len(text) <= 200 and "<" not in text


# ---------------------------------------------------------------------- logs


def test_token_is_redacted_from_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter([TOKEN]))
    logger = logging.getLogger("test.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("POST https://api.telegram.org/bot%s/getUpdates", TOKEN)
        logger.warning(f"url-encoded https://x/bot{TOKEN.replace(':', '%3A')}/getMe")
        try:
            raise RuntimeError(f"connect failed for https://api.telegram.org/bot{TOKEN}/sendMessage")
        except RuntimeError:
            logger.exception("boom")
        logger.warning("only the secret half: %s", TOKEN.split(":")[1])
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    assert TOKEN.split(":")[1] not in output and TOKEN not in output
    assert output.count(MASK) == 4


def test_configure_logging_quiets_the_http_client() -> None:
    root = logging.getLogger()
    saved = (root.level, [h.formatter for h in root.handlers])
    try:
        configure_logging("DEBUG", [TOKEN])
        assert logging.getLogger("httpx").getEffectiveLevel() >= logging.WARNING
        assert logging.getLogger("httpcore").getEffectiveLevel() >= logging.WARNING
        assert all(isinstance(h.formatter, RedactingFormatter) for h in root.handlers)
    finally:
        root.setLevel(saved[0])
        for handler, formatter in zip(root.handlers, saved[1], strict=False):
            handler.setFormatter(formatter)


# ---------------------------------------------------------------------- issue 12 limits


def test_an_album_pays_the_photo_limit_once_for_up_to_ten_photos() -> None:
    now = [0.0]
    albums = Albums(period=60, clock=lambda: now[0])
    assert not albums.already_admitted(1, "g")  # the first photo pays
    albums.admit(1, "g")
    assert all(albums.already_admitted(1, "g") for _ in range(ALBUM_MAX_PHOTOS - 1))
    assert not albums.already_admitted(1, "g")  # an 11th photo under the same id pays again
    assert not albums.already_admitted(2, "g")  # another person's group id is theirs alone
    assert not albums.already_admitted(1, None)
    albums.admit(3, "h")
    now[0] = 61
    assert not albums.already_admitted(3, "h")  # an old album id does not open the gate forever


async def test_in_flight_lets_two_photos_of_a_person_through_and_forgets_idle_people() -> None:
    in_flight = InFlight(2)
    inside, most = 0, 0
    release = asyncio.Event()

    async def one(person: int) -> None:
        nonlocal inside, most
        async with in_flight.slot(person):
            inside += 1
            most = max(most, inside)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(one(7)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert inside == 2
    other = asyncio.create_task(one(8))  # someone else is not held up by person 7
    await asyncio.sleep(0.05)
    assert inside == 3
    release.set()
    await asyncio.gather(*tasks, other)
    assert most == 3 and not in_flight._slots


def test_admission_keeps_handlers_free_for_busy_answers_whatever_the_settings() -> None:
    assert Admission.for_settings(64, 64).capacity == 48  # the defaults: 16 handlers stay free
    assert Admission.for_settings(64, 12).capacity == 9
    assert Admission.for_settings(2, 12).capacity == 2
    assert Admission.for_settings(2, 2).capacity == 1
    admission = Admission(2)
    assert admission.enter() and admission.enter() and not admission.enter()
    admission.leave()
    assert admission.enter()


async def test_a_send_that_timed_out_is_not_followed_by_an_apology() -> None:
    """A Telegram stall: the caption's sendMessage timed out (it may have been delivered)."""
    sent: list[str] = []

    async def send_message(chat_id: int, text: str, **_: object) -> None:
        sent.append(text)

    update = Update.de_json({"update_id": 1, "message": {
        "message_id": 5, "date": 0, "chat": {"id": 77, "type": "private"},
        "from": {"id": 77, "is_bot": False, "first_name": "Hal"}, "text": "x"}}, None)
    for error, told in ((TimedOut(), []), (NetworkError("connection reset"), [texts.ERROR])):
        sent.clear()
        context = SimpleNamespace(error=error, bot=SimpleNamespace(send_message=send_message),
                                  bot_data=BotData())  # no runtime yet: the error is logged, not counted
        await on_error(update, context)  # type: ignore[arg-type]
        assert sent == told


def test_privacy_states_the_retention_the_bot_runs_with() -> None:
    text = parse_html(texts.privacy(30, 365))
    assert "30 days" in text and "365 days" in text and "1024 px" in text
    assert "keeps what it learned" in text and "keyed hash" in text and "marked as forgotten" not in text
