"""Issue 12, a public bot: what strangers, careless or hostile, can and cannot do through it.

The real bot and worker against the fake Bot API over real HTTP; each test plays its own people.
"""

from __future__ import annotations

import asyncio
import io
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from PIL import Image

from bot import texts
from bot.app import CaptionBot
from tests.bot_support import ADMIN_ID, bot_over_fake_api
from tests.fake_telegram import FakeTelegram, Person
from tests.helpers import photo_bytes

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(300),
    pytest.mark.filterwarnings("ignore:.*retry_after.*"),  # PTB's AIORateLimiter reads a deprecated field
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FakeTelegram, CaptionBot]]:
    async with bot_over_fake_api(tmp_path_factory.mktemp("public")) as pair:
        yield pair


async def captioned(fake: FakeTelegram, bot: CaptionBot, person: Person, seed: int) -> tuple[dict[str, Any], Any]:
    """(the caption message, its stored record) for a photo the person sends."""
    photo = await person.photo(photo_bytes(seed))
    [answer] = await fake.wait_reply(photo)
    assert answer["text"].startswith("📷"), answer["text"]
    assert bot.storage is not None
    storage = bot.storage

    async def linked() -> Any:
        return await storage.find_caption_by_message(answer["chat"]["id"], answer["message_id"])

    for _ in range(200):
        record = await linked()
        if record is not None:
            return answer, record
        await asyncio.sleep(0.02)
    raise AssertionError("the caption was never linked to its message")


# ---------------------------------------------------------------------- buttons bound to their message


async def test_forged_buttons_from_another_person_do_nothing(running: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, bot = running
    assert bot.storage is not None
    ana, bob = fake.person(1201, "Ana"), fake.person(1202, "Bob")
    _, anas = await captioned(fake, bot, ana, seed=1)
    bobs_message, bobs = await captioned(fake, bot, bob, seed=2)
    photos_before = len(fake.calls_of("sendPhoto"))
    sent_to_bob_before = len(fake.bot_messages(bob.id))

    # Bob presses buttons on his own caption message whose data names Ana's caption.
    for data in (f"a:{anas.id}", f"c:{anas.id}", f"v:{anas.id}:d", f"v:{anas.id}:u"):
        answer = await fake.wait_answer(await bob.press_data(bobs_message, data))
        assert answer == {"text": texts.BUTTON_NOT_HERE, "show_alert": True}, data

    await asyncio.sleep(0.5)  # would anything follow?
    assert len(fake.calls_of("sendPhoto")) == photos_before  # no attention picture of Ana's photo
    assert len(fake.bot_messages(bob.id)) == sent_to_bob_before  # no ✏️ prompt quoting Ana's caption
    assert all(anas.text not in str(c.params) for c in fake.calls if c.params.get("chat_id") == str(bob.id))
    record = await bot.storage.get_caption(anas.id)
    assert (record.votes_up, record.votes_down) == (0, 0)  # no vote stored as Bob's
    assert await bot.storage.get_pending_correction(bob.id) is None  # nothing to store his text against
    # His own buttons still work.
    answer = await fake.wait_answer(await bob.press_data(bobs_message, f"v:{bobs.id}:u"))
    assert answer["text"] == texts.VOTE_UP_THANKS


# ---------------------------------------------------------------------- limits on every action


async def test_an_album_of_ten_gets_ten_captions_two_photos_at_a_time(
        running: tuple[FakeTelegram, CaptionBot], monkeypatch: pytest.MonkeyPatch) -> None:
    fake, bot = running
    assert bot.runtime is not None and bot.settings.photos_per_minute < 10  # the default limit, 6
    service = bot.runtime.service
    original = service.caption
    busy, most = 0, 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        try:
            # Each call lasts long enough that a second photo of the album is admitted meanwhile
            # if the cap allows it (an idle worker answers a lone photo in a few milliseconds).
            await asyncio.sleep(0.3)
            return await original(*args, **kwargs)
        finally:
            busy -= 1

    monkeypatch.setattr(service, "caption", counted)
    cai = fake.person(1210, "Cai")
    photos = await cai.album([photo_bytes(20 + i) for i in range(10)])
    for photo in photos:
        [answer] = await fake.wait_reply(photo, timeout=120)
        assert answer["text"].startswith("📷"), answer["text"]
    assert most == bot.settings.photos_in_flight == 2  # never more of one person's photos in the queue
    # The album paid the photo limit once: five more single photos still fit in this minute.
    for seed in range(5):
        [answer] = await fake.wait_reply(await cai.photo(photo_bytes(40 + seed)))
        assert answer["text"].startswith("📷"), answer["text"]
    [answer] = await fake.wait_reply(await cai.photo(photo_bytes(49)))
    assert answer["text"].startswith("🐢"), answer["text"]


async def test_one_persons_album_does_not_delay_another_persons_photo(
        running: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, _ = running
    ivy, jon = fake.person(1214, "Ivy"), fake.person(1215, "Jon")
    album = await ivy.album([photo_bytes(60 + i) for i in range(10)])
    single = await jon.photo(photo_bytes(70))
    [jons] = await fake.wait_reply(single, timeout=120)
    ivys = [(await fake.wait_reply(photo, timeout=120))[0] for photo in album]
    sent_at = {m["message_id"]: fake.latency(p, m) + fake.delivered_at[fake.update_of[(p["chat"]["id"],
                                                                                        p["message_id"])]]
               for p, m in [*zip(album, ivys, strict=True), (single, jons)]}
    later = [m for m in ivys if sent_at[m["message_id"]] > sent_at[jons["message_id"]]]
    # Jon's photo went into the queue behind at most two of Ivy's, not behind all ten.
    assert len(later) >= 6, (len(later), jons["text"])


async def test_presses_are_limited_per_person_with_a_friendly_answer(
        running: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, bot = running
    limit = bot.settings.actions_per_minute
    dee, eve = fake.person(1211, "Dee"), fake.person(1212, "Eve")
    message, record = await captioned(fake, bot, dee, seed=3)
    answers = [await fake.wait_answer(await dee.press_data(message, f"v:{record.id}:u"))
               for _ in range(limit + 1)]
    assert all(a["text"] in (texts.VOTE_UP_THANKS, texts.VOTE_UNCHANGED) for a in answers[:limit])
    assert answers[limit]["show_alert"] and answers[limit]["text"].startswith("🐢")
    # Another person is not affected.
    _, other = await captioned(fake, bot, eve, seed=4)
    assert other is not None


async def test_commands_and_texts_are_limited_and_the_limit_is_told_once(
        running: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, bot = running
    limit = bot.settings.actions_per_minute
    fay = fake.person(1213, "Fay")
    sent = [await fay.command("/help") for _ in range(limit)]
    await fake.wait_reply(sent[-1])
    extra = [await fay.command("/help"), await fay.text("hello?"), await fay.command("/privacy")]
    [slow] = await fake.wait_reply(extra[0])
    assert slow["text"].startswith("🐢") and "taps, commands and messages" in slow["text"]
    await asyncio.sleep(0.5)
    assert fake.replies_to(fay.id, extra[1]["message_id"]) == []  # told once, not once per message
    assert fake.replies_to(fay.id, extra[2]["message_id"]) == []
    # Photos have their own limit: still captioned.
    await captioned(fake, bot, fay, seed=5)


# ---------------------------------------------------------------------- overload and edges in words


async def test_a_file_too_big_for_telegram_is_not_given_a_made_up_size(
        running: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, _ = running
    gil = fake.person(1220, "Gil")
    stored = fake.add_file(photo_bytes(6), "documents", "jpg", declared_size=25 * 1024 * 1024)
    # Telegram did not declare the size in the message; getFile then refuses the file as too big.
    message = await gil._send(document={"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                        "file_name": "huge.jpg", "mime_type": "image/jpeg"})
    [answer] = await fake.wait_reply(message)
    assert answer["text"] == texts.file_too_big_for_telegram(None)
    assert "20.0 MB" not in answer["text"] and "25" not in answer["text"]  # no size claimed for the file


# ---------------------------------------------------------------------- photos stored safely


async def test_a_photo_is_stored_small_without_metadata_and_private(
        running: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, bot = running
    assert bot.storage is not None
    kai = fake.person(1230, "Kai")
    exif = Image.Exif()
    exif[0x8825] = {2: (51.0, 30.0, 0.0), 1: "N"}  # GPS latitude, as phones write it
    buffer = io.BytesIO()
    Image.effect_noise((2400, 1800), 30).convert("RGB").save(buffer, "JPEG", exif=exif)
    sent = await kai.document(buffer.getvalue(), mime_type="image/jpeg", file_name="IMG_0001.jpg")
    [answer] = await fake.wait_reply(sent)
    assert answer["text"].startswith("📷"), answer["text"]
    record = None
    for _ in range(200):
        record = await bot.storage.find_caption_by_message(kai.id, answer["message_id"])
        if record is not None:
            break
        await asyncio.sleep(0.02)
    assert record is not None
    path = bot.storage.resolve_photo_path(record)
    with Image.open(path) as stored:
        assert stored.format == "JPEG" and stored.size == (1024, 768)
        assert not stored.getexif() and "icc_profile" not in stored.info
    data_dir = bot.storage.data_dir
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for folder in (path.parent, path.parent.parent, data_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for database in data_dir.glob("*.db*"):
        assert stat.S_IMODE(database.stat().st_mode) == 0o600, database
    assert list(data_dir.glob("*.db"))


async def test_below_the_disk_floor_captions_go_out_and_nothing_is_stored(tmp_path: Path) -> None:
    async with bot_over_fake_api(tmp_path, min_free_disk_mb=1e12, admin_ids=frozenset({ADMIN_ID})) as (fake, bot):
        assert bot.storage is not None
        fake.person(ADMIN_ID, "Operator")
        lea = fake.person(1240, "Lea")
        for seed in (7, 8):
            [answer] = await fake.wait_reply(await lea.photo(photo_bytes(seed)))
            assert answer["text"].startswith("📷") and "reply_markup" not in answer
        warnings = [m for m in fake.bot_messages(ADMIN_ID) if m["text"].startswith("⚠️")]
        assert len(warnings) == 1 and "below the floor" in warnings[0]["text"]  # told once
        stats = await bot.storage.stats()
        assert (stats.photos, stats.captions) == (0, 0)
        assert not list((bot.storage.data_dir / "photos").rglob("*.jpg"))


# ---------------------------------------------------------------------- groups


async def test_in_a_group_a_photo_is_captioned_when_the_bot_is_mentioned(
        running: tuple[FakeTelegram, CaptionBot]) -> None:
    fake, bot = running
    assert bot.storage is not None
    group = fake.group(-1250)
    max_ = fake.person(1251, "Max").in_chat(group)
    before = await bot.storage.stats()
    quiet = await max_.photo(photo_bytes(80))
    asked = await max_.photo(photo_bytes(81), caption=f"what is this @{fake.bot_username}?")
    [answer] = await fake.wait_reply(asked)
    assert answer["text"].startswith("📷")
    await asyncio.sleep(0.5)
    assert fake.replies_to(group["id"], quiet["message_id"]) == []
    after = await bot.storage.stats()
    assert after.photos - before.photos == 1  # the photo nobody asked about left no trace
