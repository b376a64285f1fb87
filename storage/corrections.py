"""Corrections: the one a person is typing (pending), the ones stored, and the training examples."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Row, case, delete, func, null, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.errors import CorrectionRejected, Rejection
from storage.models import Caption, Correction, PendingCorrectionRow, Person, Photo, Vote, utcnow
from storage.people import ensure_person
from storage.photos import PhotoStore
from storage.records import CorrectionRecord, PendingCorrection, TrainingExample, TrainingKind, record_from
from storage.transactions import chunks, get_or_raise, rowcount
from storage.validation import validate_correction

# source id, caption id, photo id, sha256, relative path, text, created at, trained by
ExampleRow = Row[int, int, int, str, str, str, datetime, str | None]


def correction_record(row: Correction, telegram_id: int) -> CorrectionRecord:
    return record_from(CorrectionRecord, row, telegram_id=telegram_id)


def pending_correction(row: PendingCorrectionRow, telegram_id: int, caption_text: str) -> PendingCorrection:
    return record_from(PendingCorrection, row, telegram_id=telegram_id, caption_text=caption_text)


# ---------------------------------------------------------------------- pending


async def start_correction(
    session: AsyncSession,
    telegram_id: int,
    caption_id: int,
    prompt_chat_id: int | None = None,
    prompt_message_id: int | None = None,
) -> PendingCorrection:
    """Remember that this person is now correcting this caption (replacing any earlier one)."""
    caption = await get_or_raise(session, Caption, caption_id, f"caption {caption_id}")
    person, _ = await ensure_person(session, telegram_id)
    row = await session.get(PendingCorrectionRow, person.id)
    if row is None:
        row = PendingCorrectionRow(person_id=person.id)
        session.add(row)
    row.caption_id = caption_id
    row.prompt_chat_id = prompt_chat_id
    row.prompt_message_id = prompt_message_id
    row.started_at = utcnow()
    await session.flush()
    return pending_correction(row, telegram_id, caption.text)


async def get_pending_correction(session: AsyncSession, telegram_id: int) -> PendingCorrection | None:
    stmt = (
        select(PendingCorrectionRow, Caption.text)
        .join(Person, PendingCorrectionRow.person_id == Person.id)
        .join(Caption, PendingCorrectionRow.caption_id == Caption.id)
        .where(Person.telegram_id == telegram_id)
    )
    row = (await session.execute(stmt)).first()
    return None if row is None else pending_correction(row[0], telegram_id, row[1])


async def cancel_correction(session: AsyncSession, telegram_id: int) -> bool:
    """Drop the person's pending correction; True if there was one."""
    person_ids = select(Person.id).where(Person.telegram_id == telegram_id)
    stmt = delete(PendingCorrectionRow).where(PendingCorrectionRow.person_id.in_(person_ids))
    return await rowcount(session, stmt) > 0


# ---------------------------------------------------------------------- stored


async def record_correction(session: AsyncSession, caption_id: int, telegram_id: int, text: str) -> CorrectionRecord:
    """Validate and store a correction; raises ``CorrectionRejected`` with a message for the person.

    Sending the same correction twice (a double tap) returns the first one.
    The person's pending correction of this caption is cleared; a rejected
    correction leaves it in place so they can try again.
    """
    caption = await session.get(Caption, caption_id)
    if caption is None:
        raise CorrectionRejected(Rejection.NO_CAPTION)
    normalized = validate_correction(text, caption.text)
    person, _ = await ensure_person(session, telegram_id)
    await session.execute(
        delete(PendingCorrectionRow).where(
            PendingCorrectionRow.person_id == person.id, PendingCorrectionRow.caption_id == caption_id
        )
    )
    existing = await session.scalar(
        select(Correction).where(
            Correction.caption_id == caption_id,
            Correction.person_id == person.id,
            Correction.text == normalized,
        )
    )
    if existing is not None:
        return correction_record(existing, telegram_id)
    row = Correction(
        caption_id=caption_id, person_id=person.id, text_raw=text, text=normalized, created_at=utcnow()
    )
    session.add(row)
    await session.flush()
    return correction_record(row, telegram_id)


async def mark_corrections_trained(session: AsyncSession, correction_ids: Sequence[int], model_version: str) -> int:
    """Record which model version trained on these corrections; returns rows updated."""
    now = utcnow()
    total = 0
    for chunk in chunks(correction_ids):
        total += await rowcount(
            session,
            update(Correction)
            .where(Correction.id.in_(chunk))
            .values(trained_model_version=model_version, trained_at=now),
        )
    return total


# ---------------------------------------------------------------------- training examples


async def corrections_for_training(
    session: AsyncSession,
    photos: PhotoStore,
    since: datetime | None = None,
    include_upvoted: bool = False,
    untrained_only: bool = False,
) -> list[TrainingExample]:
    """Captions to train on: corrections, plus (optionally) captions voted up more than down.

    Forgotten people's data is excluded even if a deletion were incomplete.
    ``untrained_only`` keeps corrections no model has trained on yet; it does
    not apply to up-voted captions, which carry no such mark.
    """
    examples = await _correction_examples(session, photos, since, untrained_only)
    if include_upvoted:
        examples += await _upvoted_examples(session, photos, since)
    return sorted(examples, key=lambda ex: (ex.created_at, ex.kind, ex.source_id))


async def _correction_examples(
    session: AsyncSession, photos: PhotoStore, since: datetime | None, untrained_only: bool
) -> list[TrainingExample]:
    author = aliased(Person)
    requester = aliased(Person)
    stmt = (
        select(
            Correction.id,
            Correction.caption_id,
            Caption.photo_id,
            Photo.sha256,
            Photo.rel_path,
            Correction.text,
            Correction.created_at,
            Correction.trained_model_version,
        )
        .join(Caption, Correction.caption_id == Caption.id)
        .join(Photo, Caption.photo_id == Photo.id)
        .join(author, Correction.person_id == author.id)
        .join(requester, Caption.requester_id == requester.id)
        .where(author.is_forgotten.is_(False), requester.is_forgotten.is_(False))
    )
    if since is not None:
        stmt = stmt.where(Correction.created_at >= since)
    if untrained_only:
        stmt = stmt.where(Correction.trained_model_version.is_(None))
    return _training_examples("correction", (await session.execute(stmt)).all(), photos)


async def _upvoted_examples(
    session: AsyncSession, photos: PhotoStore, since: datetime | None
) -> list[TrainingExample]:
    voter = aliased(Person)
    requester = aliased(Person)
    net = func.sum(case((Vote.up.is_(True), 1), else_=-1))
    liked = (
        select(Vote.caption_id)
        .join(voter, Vote.person_id == voter.id)
        .where(voter.is_forgotten.is_(False))
        .group_by(Vote.caption_id)
        .having(net > 0)
    )
    stmt = (
        # The caption is its own source: its id fills both the source and the caption column.
        select(
            Caption.id,
            Caption.id.label("caption_id"),
            Caption.photo_id,
            Photo.sha256,
            Photo.rel_path,
            Caption.text,
            Caption.created_at,
            type_coerce(null(), Correction.trained_model_version.type).label("trained_model_version"),
        )
        .join(Photo, Caption.photo_id == Photo.id)
        .join(requester, Caption.requester_id == requester.id)
        .where(requester.is_forgotten.is_(False), Caption.id.in_(liked))
    )
    if since is not None:
        stmt = stmt.where(Caption.created_at >= since)
    return _training_examples("upvoted", (await session.execute(stmt)).all(), photos)


def _training_examples(kind: TrainingKind, rows: Sequence[ExampleRow], photos: PhotoStore) -> list[TrainingExample]:
    return [
        TrainingExample(kind, source_id, caption_id, photo_id, sha, rel, photos.path(rel), text, created, trained)
        for source_id, caption_id, photo_id, sha, rel, text, created, trained in rows
    ]
