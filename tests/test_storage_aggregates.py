"""The aggregate modules of ``storage`` on a bare session: no ``Storage``, no transaction runner."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import CheckConstraint, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession

from storage import captions, corrections, forget, model_versions, people, stats
from storage.engine import create_engine
from storage.errors import CorrectionRejected, ModelVersionError, NotFound
from storage.keys import SESSION_FORGET_KEY
from storage.migrate import MIGRATIONS_DIR
from storage.models import Base, Caption, ModelVersion, Person, Photo
from storage.photos import PhotoStore, sha256_hex
from storage.records import CaptionRecord, ModelStatus, PersonInfo, PhotoRecord, record_from
from storage.transactions import ID_CHUNK, Transactions, chunks, get_or_raise

ALICE, BOB = 11, 22


@pytest.fixture
async def session(tmp_path: Path) -> AsyncIterator[AsyncSession]:
    """A session on a fresh SQLite file with the schema created from the models."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'bare.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        async with AsyncSession(engine, expire_on_commit=False, info={SESSION_FORGET_KEY: b"k" * 32}) as bare, \
                bare.begin():
            yield bare
    finally:
        await engine.dispose()


@pytest.fixture
def photo_store(tmp_path: Path) -> PhotoStore:
    return PhotoStore(tmp_path / "photos")


async def new_photo(session: AsyncSession, store: PhotoStore, data: bytes, sender: int = ALICE) -> PhotoRecord:
    return await captions.record_photo(
        session, store, data, sha256_hex(data), width=4, height=3, telegram_file_unique_id=None,
        sender_telegram_id=sender,
    )


async def new_caption(session: AsyncSession, photo: PhotoRecord, requester: int = ALICE) -> CaptionRecord:
    return await captions.record_caption(
        session, photo.id, model_version="base", text="a dog on grass", score=-1.5, beam_size=3,
        latency_ms=12.0, requester_telegram_id=requester,
    )


# ---------------------------------------------------------------------- records and transactions


def test_record_from_reads_columns_and_refuses_unknown_fields() -> None:
    row = type("Row", (), {"id": 1, "telegram_id": 5, "language_code": "de", "first_seen_at": None,
                           "last_seen_at": None, "prior_flags": 0})()
    info = record_from(PersonInfo, row, created=True)
    assert (info.id, info.telegram_id, info.language_code, info.created) == (1, 5, "de", True)
    with pytest.raises(TypeError, match="no fields"):
        record_from(PersonInfo, row, created=True, nickname="x")
    with pytest.raises(AttributeError):
        record_from(PersonInfo, row)  # 'created' is neither given nor a column


def test_chunks_cover_every_id_once() -> None:
    ids = list(range(2 * ID_CHUNK + 3))
    parts = list(chunks(ids))
    assert [len(p) for p in parts] == [ID_CHUNK, ID_CHUNK, 3]
    assert [i for part in parts for i in part] == ids


async def test_get_or_raise(session: AsyncSession) -> None:
    with pytest.raises(NotFound, match="photo 99 does not exist"):
        await get_or_raise(session, Photo, 99, "photo 99")
    person, _ = await people.ensure_person(session, ALICE)
    assert await get_or_raise(session, Person, person.id, "person") is person


async def test_transactions_retry_locks_and_only_asked_integrity_clashes(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'tx.db'}")
    tx = Transactions(engine, str(engine.url))
    attempts: list[int] = []

    def failing(error: Exception, times: int) -> Any:
        async def op(_session: AsyncSession) -> int:
            attempts.append(1)
            if len(attempts) <= times:
                raise error
            return len(attempts)

        return op

    try:
        locked = OperationalError("BEGIN", {}, Exception("database is locked"))
        assert await tx.write(failing(locked, 2)) == 3 and tx.lock_retries == 2
        attempts.clear()
        assert await tx.read(failing(locked, 1)) == 2 and tx.lock_retries == 3
        clash = IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed"))
        attempts.clear()
        with pytest.raises(IntegrityError):
            await tx.write(failing(clash, 1))
        attempts.clear()
        assert await tx.write(failing(clash, 1), retry_integrity=True) == 2
        attempts.clear()
        other = OperationalError("SELECT", {}, Exception("no such table: x"))
        with pytest.raises(OperationalError):
            await tx.write(failing(other, 1))
        assert len(attempts) == 1, "only lock errors are retried"
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------- people


async def test_people_created_once_and_forgotten_come_back_fresh(session: AsyncSession) -> None:
    first = await people.upsert_person(session, ALICE, "en-GB-oxendict-extra-long")
    assert first.created and first.language_code == "en-GB-oxendict-e", "cut to the column's 16 characters"
    again = await people.upsert_person(session, ALICE, None)
    assert not again.created and again.id == first.id and again.language_code == first.language_code
    await forget.forget_person(session, ALICE)
    back = await people.upsert_person(session, ALICE, "fr")
    assert back.created and back.first_seen_at >= first.first_seen_at and back.language_code == "fr"
    assert await people.get_person(session, BOB) is None


# ---------------------------------------------------------------------- captions


async def test_photos_captions_and_votes(session: AsyncSession, photo_store: PhotoStore) -> None:
    photo = await new_photo(session, photo_store, b"bare photo")
    assert photo.created and photo_store.path(photo.rel_path).read_bytes() == b"bare photo"
    same = await new_photo(session, photo_store, b"bare photo", sender=BOB)
    assert not same.created and same.id == photo.id

    with pytest.raises(NotFound, match="photo 999"):
        await captions.record_caption(
            session, 999, model_version="m", text="t", score=0.0, beam_size=1, latency_ms=1.0,
            requester_telegram_id=ALICE,
        )
    made = await new_caption(session, photo)
    assert (made.photo_sha256, made.photo_rel_path, made.requester_telegram_id) == (
        photo.sha256, photo.rel_path, ALICE
    )
    shown = await captions.set_caption_message(session, made.id, chat_id=7, message_id=70)
    assert shown == CaptionRecord(**{**_fields(made), "chat_id": 7, "message_id": 70})
    assert await captions.find_caption_by_message(session, 7, 70) == shown

    await captions.record_vote(session, made.id, ALICE, True)
    vote = await captions.record_vote(session, made.id, BOB, True)
    assert (vote.votes_up, vote.votes_down, vote.changed) == (2, 0, True)
    flipped = await captions.record_vote(session, made.id, BOB, False)
    assert (flipped.votes_up, flipped.votes_down) == (1, 1)
    fetched = await captions.get_caption(session, made.id)
    assert fetched is not None and (fetched.votes_up, fetched.votes_down) == (1, 1)
    with pytest.raises(NotFound):
        await captions.record_vote(session, 12345, ALICE, True)


def _fields(record: CaptionRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in CaptionRecord.__dataclass_fields__}


# ---------------------------------------------------------------------- corrections


async def test_pending_and_stored_corrections(session: AsyncSession, photo_store: PhotoStore) -> None:
    caption = await new_caption(session, await new_photo(session, photo_store, b"to correct"))
    pending = await corrections.start_correction(session, BOB, caption.id, 5, 50)
    assert (pending.caption_text, pending.prompt_message_id) == ("a dog on grass", 50)
    assert await corrections.get_pending_correction(session, BOB) == pending

    with pytest.raises(CorrectionRejected):
        await corrections.record_correction(session, caption.id, BOB, "a dog on grass")
    assert await corrections.get_pending_correction(session, BOB) is not None, "kept after a rejection"
    stored = await corrections.record_correction(session, caption.id, BOB, "  a cat   on a sofa ")
    assert stored.text == "a cat on a sofa" and stored.telegram_id == BOB
    assert await corrections.get_pending_correction(session, BOB) is None
    assert await corrections.record_correction(session, caption.id, BOB, "a cat on a sofa") == stored
    assert not await corrections.cancel_correction(session, BOB)

    examples = await corrections.corrections_for_training(session, photo_store)
    assert [(e.kind, e.source_id, e.text) for e in examples] == [("correction", stored.id, "a cat on a sofa")]
    assert examples[0].path == photo_store.path(caption.photo_rel_path)
    assert await corrections.mark_corrections_trained(session, [stored.id], "v2") == 1
    assert await corrections.corrections_for_training(session, photo_store, untrained_only=True) == []


async def test_upvoted_examples_skip_forgotten_voters(session: AsyncSession, photo_store: PhotoStore) -> None:
    caption = await new_caption(session, await new_photo(session, photo_store, b"liked"))
    await captions.record_vote(session, caption.id, BOB, True)
    examples = await corrections.corrections_for_training(session, photo_store, include_upvoted=True)
    assert [(e.kind, e.source_id, e.caption_id, e.trained_model_version) for e in examples] == [
        ("upvoted", caption.id, caption.id, None)
    ]
    await forget.forget_person(session, BOB)  # his vote goes with him
    assert await corrections.corrections_for_training(session, photo_store, include_upvoted=True) == []


# ---------------------------------------------------------------------- model versions


async def test_model_version_lifecycle(session: AsyncSession) -> None:
    base = await model_versions.register_model_version(session, "base", "/ckpt/base", None, {"bleu": 0.2},
                                                       status="active")
    assert base.status is ModelStatus.ACTIVE and base.promoted_at is not None
    nan = float("nan")
    child = await model_versions.register_model_version(session, "child", Path("/ckpt/c"), "base", {"x": nan})
    assert child.status == "candidate" and child.metrics == {"x": None}
    with pytest.raises(ModelVersionError, match="already exists"):
        await model_versions.register_model_version(session, "child", "/x", None, {})
    with pytest.raises(ModelVersionError, match="unknown status"):
        await model_versions.register_model_version(session, "odd", "/x", None, {}, status="paused")

    promoted = await model_versions.promote_model_version(session, "child")
    assert promoted.is_active
    statuses = {m.name: m.status for m in await model_versions.list_model_versions(session)}
    assert statuses == {"base": ModelStatus.RETIRED, "child": ModelStatus.ACTIVE}
    with pytest.raises(ModelVersionError, match="is active"):
        await model_versions.reject_model_version(session, "child", "worse")
    rejected = await model_versions.reject_model_version(session, "base", "worse")
    assert rejected.status is ModelStatus.REJECTED and rejected.reason == "worse"
    with pytest.raises(ModelVersionError, match="was rejected"):
        await model_versions.promote_model_version(session, "base")
    with pytest.raises(NotFound, match="'ghost'"):
        await model_versions.promote_model_version(session, "ghost")
    active = await model_versions.active_model_version(session)
    assert active is not None and active.name == "child"


def test_status_check_constraint_is_built_from_the_enum() -> None:
    """The generated SQL must stay what migration 0002 created (it added 'awaiting_review')."""
    table = Base.metadata.tables[ModelVersion.__tablename__]
    checks = [str(c.sqltext) for c in table.constraints if isinstance(c, CheckConstraint)]
    assert checks == ["status IN ('candidate', 'active', 'rejected', 'retired', 'awaiting_review')"]
    listed = checks[0].removeprefix("status IN (").removesuffix(")")
    migration = (MIGRATIONS_DIR / "versions" / "0002_trusted_learning.py").read_text()
    assert f'NEW_MODEL_STATUSES = "{listed}"' in migration
    assert [s.value for s in ModelStatus] == ["candidate", "active", "rejected", "retired", "awaiting_review"]


# ---------------------------------------------------------------------- forget and stats


async def test_forget_person_then_delete_files(session: AsyncSession, photo_store: PhotoStore) -> None:
    private = await new_photo(session, photo_store, b"alice only")
    shared = await new_photo(session, photo_store, b"shared")
    await new_photo(session, photo_store, b"shared", sender=BOB)
    caption = await new_caption(session, private)
    await captions.record_vote(session, caption.id, BOB, True)

    report, rel_paths = await forget.forget_person(session, ALICE)
    assert report.found and (report.photos, report.captions, report.votes) == (1, 1, 1)
    assert rel_paths == [private.rel_path]
    assert await forget.referenced_paths(session) == {shared.rel_path}
    deleted = await forget.delete_unreferenced_files(session, photo_store, [private.rel_path, shared.rel_path])
    assert deleted == 1
    assert not photo_store.path(private.rel_path).exists() and photo_store.path(shared.rel_path).exists()
    unknown, none = await forget.forget_person(session, 404)
    assert not unknown.found and none == []


async def test_stats_counts(session: AsyncSession, photo_store: PhotoStore) -> None:
    caption = await new_caption(session, await new_photo(session, photo_store, b"counted"))
    await captions.record_vote(session, caption.id, BOB, False)
    await corrections.record_correction(session, caption.id, BOB, "a cat on a sofa")
    await model_versions.register_model_version(session, "base", "/b", None, {}, status="active")

    counted = await stats.stats(session, days=3)
    assert [d.captions for d in counted.captions_per_day] == [0, 0, 1]
    assert counted.captions_per_day[-1].day == datetime.now(UTC).date()
    assert (counted.captions, counted.photos, counted.people) == (1, 1, 2)
    assert (counted.votes_up, counted.votes_down, counted.corrections_untrained) == (0, 1, 1)
    assert counted.active_model == "base"
    assert await session.scalar(select(Caption.id)) == caption.id
