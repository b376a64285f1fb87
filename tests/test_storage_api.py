"""Unit tests of every public ``storage.Storage`` method, on a temporary SQLite database."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError

from storage import (
    CaptionRecord,
    CorrectionRejected,
    ModelVersionError,
    NotFound,
    PhotoRecord,
    Storage,
)
from storage import config as storage_config
from storage.models import Caption, Correction
from storage.validation import comparison_key, normalize_text, validate_correction

ALICE, BOB, CAROL = 101, 202, 303


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = await Storage.open(data_dir=tmp_path / "data", database_url=None)
    try:
        yield storage
    finally:
        await storage.close()


@pytest.fixture(autouse=True)
def _no_env_database(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests must not pick up a developer's DATABASE_URL."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CAPTIONBOT_DATA_DIR", raising=False)


async def add_photo(store: Storage, payload: bytes = b"photo-bytes", sender: int = ALICE) -> PhotoRecord:
    return await store.record_photo(
        payload, width=640, height=480, telegram_file_unique_id=None, sender_telegram_id=sender
    )


async def add_caption(
    store: Storage, photo: PhotoRecord, requester: int = ALICE, caption: str = "a dog runs on the grass"
) -> CaptionRecord:
    return await store.record_caption(
        photo.id,
        model_version="base",
        text=caption,
        score=-3.5,
        beam_size=3,
        latency_ms=42.0,
        requester_telegram_id=requester,
    )


# ---------------------------------------------------------------- config and opening


def test_config_uses_only_what_the_caller_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # The environment is the caller's business (common.settings): storage itself ignores it.
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u@h/db")
    monkeypatch.setenv("CAPTIONBOT_DATA_DIR", str(tmp_path / "ignored"))
    assert storage_config.data_dir() == tmp_path / "data"
    assert storage_config.database_url() == f"sqlite+aiosqlite:///{tmp_path}/data/captionbot.db"
    assert storage_config.database_url(directory=tmp_path / "elsewhere").endswith("/elsewhere/captionbot.db")
    assert storage_config.database_url("sqlite+aiosqlite:///x.db") == "sqlite+aiosqlite:///x.db"


async def test_open_creates_folders_and_sets_pragmas(tmp_path: Path) -> None:
    async with await Storage.open(data_dir=tmp_path / "d") as store:
        assert (tmp_path / "d" / "photos").is_dir()
        assert (tmp_path / "d" / "captionbot.db").is_file()
        async with store.engine.connect() as conn:
            values = {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
            }
    assert values == {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 10_000, "synchronous": 1}


async def test_open_without_migrate_leaves_database_empty(tmp_path: Path) -> None:
    async with await Storage.open(data_dir=tmp_path, migrate=False) as store, store.engine.connect() as conn:
        tables = (await conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'")).all()
    assert tables == []


async def test_foreign_keys_are_enforced(store: Storage) -> None:
    async with store.engine.begin() as conn:
        with pytest.raises(IntegrityError):
            await conn.execute(
                text(
                    "INSERT INTO votes (caption_id, person_id, up, created_at, updated_at) "
                    "VALUES (999, 999, 1, '2024-01-01', '2024-01-01')"
                )
            )


# ---------------------------------------------------------------- people


async def test_upsert_person_creates_then_updates(store: Storage) -> None:
    first = await store.upsert_person(ALICE, "en")
    assert first.created and first.language_code == "en" and first.prior_flags == 0
    second = await store.upsert_person(ALICE, None)
    assert not second.created and second.id == first.id
    assert second.language_code == "en", "a missing language keeps the known one"
    third = await store.upsert_person(ALICE, "pt-br-with-a-very-long-tag")
    assert third.language_code == "pt-br-with-a-ver"
    assert third.last_seen_at >= first.last_seen_at
    assert (await store.get_person(ALICE)) is not None
    assert await store.get_person(999) is None


# ---------------------------------------------------------------- photos


async def test_record_photo_stores_file_once(store: Storage) -> None:
    data = os.urandom(5000)
    first = await store.record_photo(
        data, width=10, height=20, telegram_file_unique_id=None, sender_telegram_id=ALICE
    )
    sha = hashlib.sha256(data).hexdigest()
    assert first.created and first.sha256 == sha and first.size_bytes == 5000
    assert first.rel_path == f"{sha[:2]}/{sha}.jpg"
    path = store.resolve_photo_path(first)
    assert path == store.data_dir / "photos" / first.rel_path
    assert path.read_bytes() == data
    again = await store.record_photo(
        data, width=10, height=20, telegram_file_unique_id="uniq", sender_telegram_id=BOB
    )
    assert not again.created and again.id == first.id
    assert again.telegram_file_unique_id == "uniq", "a later upload fills in the Telegram id"
    assert list(path.parent.iterdir()) == [path], "no temp files left behind"
    fetched = await store.get_photo(first.id)
    assert fetched is not None and fetched.sha256 == sha and not fetched.created
    assert await store.get_photo(12345) is None


async def test_record_photo_rewrites_a_missing_file(store: Storage) -> None:
    photo = await add_photo(store, b"will vanish")
    path = store.resolve_photo_path(photo)
    path.unlink()
    await add_photo(store, b"will vanish")
    assert path.read_bytes() == b"will vanish"


async def test_record_photo_rejects_empty_bytes(store: Storage) -> None:
    with pytest.raises(ValueError, match="empty"):
        await add_photo(store, b"")


async def test_photo_path_accepts_every_reference(store: Storage) -> None:
    photo = await add_photo(store)
    caption = await add_caption(store, photo)
    expected = store.data_dir / "photos" / photo.rel_path
    assert store.resolve_photo_path(photo.rel_path) == expected
    assert store.resolve_photo_path(Path(photo.rel_path)) == expected
    assert store.resolve_photo_path(caption) == expected
    assert store.resolve_photo_path(photo) == expected
    with pytest.raises(ValueError, match="escapes"):
        store.resolve_photo_path("../captionbot.db")


# ---------------------------------------------------------------- captions


async def test_record_caption_and_lookups(store: Storage) -> None:
    photo = await add_photo(store)
    caption = await add_caption(store, photo)
    assert caption.photo_sha256 == photo.sha256 and caption.requester_telegram_id == ALICE
    assert caption.chat_id is None and caption.created_at.tzinfo is not None
    assert await store.find_caption_by_message(1, 2) is None

    updated = await store.set_caption_message(caption.id, chat_id=-100123, message_id=77)
    assert (updated.chat_id, updated.message_id) == (-100123, 77)
    found = await store.find_caption_by_message(-100123, 77)
    assert found is not None and found.id == caption.id and found.text == caption.text
    got = await store.get_caption(caption.id)
    assert got == found
    assert await store.get_caption(9999) is None


async def test_record_caption_with_message_ids_and_big_telegram_ids(store: Storage) -> None:
    photo = await add_photo(store, sender=2**40)
    caption = await store.record_caption(
        photo.id,
        model_version="v1",
        text="x y",
        score=0.0,
        beam_size=1,
        latency_ms=1.0,
        requester_telegram_id=2**40,
        chat_id=-(10**12),
        message_id=5,
    )
    found = await store.find_caption_by_message(-(10**12), 5)
    assert found is not None and found.id == caption.id and found.requester_telegram_id == 2**40


async def test_caption_errors_for_missing_rows(store: Storage) -> None:
    with pytest.raises(NotFound):
        await store.record_caption(
            42, model_version="v", text="t", score=0, beam_size=1, latency_ms=0, requester_telegram_id=ALICE
        )
    with pytest.raises(NotFound):
        await store.set_caption_message(42, 1, 1)


# ---------------------------------------------------------------- votes


async def test_record_vote_one_per_person(store: Storage) -> None:
    caption = await add_caption(store, await add_photo(store))
    first = await store.record_vote(caption.id, BOB, up=True)
    assert first.changed and (first.votes_up, first.votes_down) == (1, 0)
    same = await store.record_vote(caption.id, BOB, up=True)
    assert not same.changed and (same.votes_up, same.votes_down) == (1, 0)
    flipped = await store.record_vote(caption.id, BOB, up=False)
    assert flipped.changed and (flipped.votes_up, flipped.votes_down) == (0, 1)
    other = await store.record_vote(caption.id, CAROL, up=True)
    assert (other.votes_up, other.votes_down) == (1, 1)
    got = await store.get_caption(caption.id)
    assert got is not None and (got.votes_up, got.votes_down) == (1, 1)
    with pytest.raises(NotFound):
        await store.record_vote(9999, BOB, up=True)


# ---------------------------------------------------------------- corrections


async def test_pending_correction_lifecycle(store: Storage) -> None:
    photo = await add_photo(store)
    first = await add_caption(store, photo)
    second = await add_caption(store, photo, caption="a cat sleeps")
    assert await store.get_pending_correction(BOB) is None
    pending = await store.start_correction(BOB, first.id, prompt_chat_id=5, prompt_message_id=6)
    assert (pending.caption_id, pending.caption_text, pending.prompt_message_id) == (first.id, first.text, 6)
    assert await store.get_pending_correction(BOB) == pending
    replaced = await store.start_correction(BOB, second.id)
    assert replaced.caption_id == second.id and replaced.prompt_chat_id is None
    got = await store.get_pending_correction(BOB)
    assert got is not None and got.caption_id == second.id
    assert await store.cancel_correction(BOB) is True
    assert await store.cancel_correction(BOB) is False
    assert await store.cancel_correction(99999) is False
    assert await store.get_pending_correction(BOB) is None
    with pytest.raises(NotFound):
        await store.start_correction(BOB, 9999)


async def test_pending_correction_survives_reopen(tmp_path: Path) -> None:
    async with await Storage.open(data_dir=tmp_path) as store:
        caption = await add_caption(store, await add_photo(store))
        await store.start_correction(BOB, caption.id, 1, 2)
    async with await Storage.open(data_dir=tmp_path) as store:
        pending = await store.get_pending_correction(BOB)
    assert pending is not None and pending.caption_id == caption.id


async def test_record_correction_normalises_and_clears_pending(store: Storage) -> None:
    photo = await add_photo(store)
    caption = await add_caption(store, photo)
    other = await add_caption(store, photo, caption="a bird")
    await store.start_correction(BOB, caption.id)
    record = await store.record_correction(caption.id, BOB, "  A brown\tdog\x07 jumps\n over a  log  ")
    assert record.text == "A brown dog jumps over a log"
    assert record.text_raw == "  A brown\tdog\x07 jumps\n over a  log  "
    assert record.telegram_id == BOB and record.trained_model_version is None
    assert await store.get_pending_correction(BOB) is None

    await store.start_correction(BOB, other.id)
    await store.record_correction(caption.id, BOB, "a second different text")
    pending = await store.get_pending_correction(BOB)
    assert pending is not None and pending.caption_id == other.id, "only the corrected caption is cleared"

    duplicate = await store.record_correction(caption.id, BOB, "A brown dog jumps over a log")
    assert duplicate.id == record.id, "a double send is stored once"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "too_short"),
        ("   \x00\n ", "too_short"),
        ("x", "too_short"),
        ("doggo", "too_few_words"),
        ("!! ??", "too_few_words"),
        ("word " * 70, "too_long"),
        ("A dog runs on the grass.", "unchanged"),
        ("  a   DOG runs on the grass ", "unchanged"),
    ],
)
async def test_record_correction_rejections(store: Storage, text: str, reason: str) -> None:
    caption = await add_caption(store, await add_photo(store))
    await store.start_correction(BOB, caption.id)
    with pytest.raises(CorrectionRejected) as info:
        await store.record_correction(caption.id, BOB, text)
    assert info.value.reason == reason
    message = str(info.value)
    assert message and message[0].isupper() and "Traceback" not in message
    assert await store.get_pending_correction(BOB) is not None, "a rejected correction keeps the context"
    assert (await store.stats()).corrections == 0


async def test_record_correction_of_missing_caption(store: Storage) -> None:
    with pytest.raises(CorrectionRejected) as info:
        await store.record_correction(12345, BOB, "a valid text")
    assert info.value.reason == "no_caption"


def test_validation_helpers() -> None:
    assert normalize_text(" a\u200b b\r\nc\x1b ") == "a b c"
    assert comparison_key("A dog, running!") == comparison_key("a dog running")
    assert validate_correction("ok then", "something else") == "ok then"
    assert validate_correction("x" * 150 + " " + "y" * 149, "z") == "x" * 150 + " " + "y" * 149
    with pytest.raises(CorrectionRejected):
        validate_correction("x" * 150 + " " + "y" * 150, "z")


# ---------------------------------------------------------------- statistics


async def test_stats_counts_and_days(store: Storage) -> None:
    empty = await store.stats(days=3)
    assert len(empty.captions_per_day) == 3 and empty.captions == 0 and empty.active_model is None
    photo = await add_photo(store)
    today = await add_caption(store, photo)
    old = await add_caption(store, photo, caption="an old caption")
    ancient = await add_caption(store, photo, caption="an ancient caption")
    now = datetime.now(UTC)
    async with store.engine.begin() as conn:
        await conn.execute(
            update(Caption).where(Caption.id == old.id).values(created_at=now - timedelta(days=2))
        )
        await conn.execute(
            update(Caption).where(Caption.id == ancient.id).values(created_at=now - timedelta(days=30))
        )
    await store.record_vote(today.id, BOB, True)
    await store.record_vote(today.id, CAROL, False)
    await store.record_vote(old.id, CAROL, True)
    await store.record_correction(today.id, BOB, "a cat sits on a mat")
    await store.register_model_version("m1", "/ckpt/m1", None, {}, status="active")

    stats = await store.stats(days=7)
    assert [d.day for d in stats.captions_per_day] == [now.date() - timedelta(days=6 - i) for i in range(7)]
    assert [d.captions for d in stats.captions_per_day] == [0, 0, 0, 0, 1, 0, 1]
    assert (stats.captions, stats.photos, stats.people) == (3, 1, 3)
    assert (stats.votes_up, stats.votes_down) == (2, 1)
    assert (stats.corrections, stats.corrections_untrained, stats.active_model) == (1, 1, "m1")


# ---------------------------------------------------------------- model versions


async def test_model_version_lifecycle(store: Storage) -> None:
    assert await store.active_model_version() is None
    base = await store.register_model_version(
        "base", Path("/ckpt/base.safetensors"), None, {"bleu4": 0.19, "loss": float("nan")}
    )
    assert base.status == "candidate" and not base.is_active and base.promoted_at is None
    assert base.metrics == {"bleu4": 0.19, "loss": None}, "non-finite floats become null"
    assert base.checkpoint_path == "/ckpt/base.safetensors"
    with pytest.raises(ModelVersionError, match="already exists"):
        await store.register_model_version("base", "/x", None, {})
    with pytest.raises(ModelVersionError, match="unknown status"):
        await store.register_model_version("odd", "/x", None, {}, status="weird")

    promoted = await store.promote_model_version("base")
    assert promoted.is_active and promoted.promoted_at is not None
    child = await store.register_model_version("ft-1", "/ckpt/ft1", "base", {"bleu4": 0.21})
    await store.promote_model_version("ft-1")
    active = await store.active_model_version()
    assert active is not None and active.name == "ft-1" and active.parent == "base"
    statuses = {m.name: m.status for m in await store.list_model_versions()}
    assert statuses == {"base": "retired", "ft-1": "active"}
    assert [m.name for m in await store.list_model_versions()] == ["base", child.name]

    bad = await store.register_model_version("ft-2", "/ckpt/ft2", "ft-1", {"bleu4": 0.1})
    rejected = await store.reject_model_version(bad.name, "BLEU-4 fell from 0.21 to 0.10")
    assert rejected.status == "rejected" and rejected.reason == "BLEU-4 fell from 0.21 to 0.10"
    with pytest.raises(ModelVersionError, match="rejected"):
        await store.promote_model_version("ft-2")
    with pytest.raises(ModelVersionError, match="active"):
        await store.reject_model_version("ft-1", "no")
    with pytest.raises(NotFound):
        await store.promote_model_version("nope")
    with pytest.raises(NotFound):
        await store.reject_model_version("nope", "x")
    assert await store.get_model_version("nope") is None

    rollback = await store.promote_model_version("base")
    assert rollback.is_active
    again = await store.promote_model_version("base")
    assert again.promoted_at == rollback.promoted_at, "promoting the active model changes nothing"
    with pytest.raises(FrozenInstanceError):
        rollback.name = "x"  # type: ignore[misc]


async def test_database_refuses_two_active_models(store: Storage) -> None:
    await store.register_model_version("a", "/a", None, {}, status="active")
    await store.register_model_version("b", "/b", None, {})
    async with store.engine.begin() as conn:
        with pytest.raises(IntegrityError):
            await conn.execute(text("UPDATE model_versions SET status='active' WHERE name='b'"))


# ---------------------------------------------------------------- training data


async def test_corrections_for_training_filters(store: Storage) -> None:
    photo = await add_photo(store, b"first photo")
    liked_photo = await add_photo(store, b"second photo", sender=BOB)
    caption = await add_caption(store, photo)
    liked = await add_caption(store, liked_photo, requester=BOB, caption="two kids play football")
    disputed = await add_caption(store, liked_photo, requester=BOB, caption="a ball")
    old = await store.record_correction(caption.id, BOB, "a puppy rolls in the grass")
    new = await store.record_correction(caption.id, CAROL, "a small dog plays outside")
    await store.record_vote(liked.id, ALICE, True)
    await store.record_vote(disputed.id, ALICE, True)
    await store.record_vote(disputed.id, CAROL, False)
    cutoff = datetime.now(UTC)
    async with store.engine.begin() as conn:
        await conn.execute(
            update(Correction).where(Correction.id == old.id).values(created_at=cutoff - timedelta(days=1))
        )

    examples = await store.corrections_for_training()
    assert [(e.kind, e.source_id) for e in examples] == [("correction", old.id), ("correction", new.id)]
    first = examples[0]
    assert first.sha256 == photo.sha256 and first.path == store.resolve_photo_path(photo)
    assert first.text == "a puppy rolls in the grass" and first.photo_id == photo.id

    recent = await store.corrections_for_training(since=cutoff - timedelta(hours=1))
    assert [e.source_id for e in recent] == [new.id]

    with_votes = await store.corrections_for_training(include_upvoted=True)
    upvoted = [e for e in with_votes if e.kind == "upvoted"]
    assert [(e.caption_id, e.text) for e in upvoted] == [(liked.id, "two kids play football")]

    assert await store.mark_corrections_trained([old.id, old.id], "ft-1") == 1
    assert await store.mark_corrections_trained([], "ft-1") == 0
    untrained = await store.corrections_for_training(untrained_only=True)
    assert [e.source_id for e in untrained] == [new.id]
    trained = [e for e in await store.corrections_for_training() if e.source_id == old.id]
    assert trained[0].trained_model_version == "ft-1"


# ---------------------------------------------------------------- forgetting and sweeping


async def test_forget_unknown_person(store: Storage) -> None:
    report = await store.forget_person(4242)
    assert not report.found and report.photos == 0


async def test_sweep_orphan_files(store: Storage) -> None:
    photo = await add_photo(store, b"kept")
    orphan = store.photos.path("ab/" + "ab" * 32 + ".jpg")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    temp = orphan.parent / ".tmp-crashed"
    temp.write_bytes(b"half")
    assert await store.sweep_orphan_files() == 0, "young files may belong to a live writer"
    old = datetime.now(UTC).timestamp() - 7200
    for path in (orphan, temp, store.resolve_photo_path(photo)):
        os.utime(path, (old, old))
    assert await store.sweep_orphan_files() == 1
    assert not orphan.exists() and not temp.exists()
    assert store.resolve_photo_path(photo).read_bytes() == b"kept"
