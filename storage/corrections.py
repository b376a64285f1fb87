"""Corrections: the one a person is typing (pending), the ones stored, and the training examples."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Row, case, delete, func, null, select, type_coerce, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.errors import CorrectionRejected, Rejection
from storage.models import Caption, Correction, PendingCorrectionRow, Person, Photo, Vote, utcnow
from storage.people import ensure_person
from storage.photos import PhotoStore
from storage.records import (
    CorrectionOutcome,
    CorrectionRecord,
    CorrectionStatus,
    FlagReason,
    PendingCorrection,
    TrainingExample,
    TrainingKind,
    record_from,
)
from storage.screening import EntryPolicy
from storage.transactions import chunks, get_or_raise, rowcount
from storage.validation import validate_correction

# source id, caption id, photo id, sha256, relative path, text, created at, trained by, person id
ExampleRow = Row[int, int, int, str, str, str, datetime, str | None, int]


def correction_record(row: Correction, telegram_id: int, replaced: bool = False) -> CorrectionRecord:
    return record_from(
        CorrectionRecord,
        row,
        telegram_id=telegram_id,
        status=CorrectionStatus(row.status),
        flag_reason=None if row.flag_reason is None else FlagReason(row.flag_reason),
        outcome=None if row.outcome is None else CorrectionOutcome(row.outcome),
        replaced=replaced,
    )


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


async def record_correction(
    session: AsyncSession, caption_id: int, telegram_id: int, text: str, policy: EntryPolicy | None = None
) -> CorrectionRecord:
    """Validate, screen and store a correction; raises ``CorrectionRejected`` with a code for the person.

    One correction per person and caption: a later one replaces the earlier in place (same id,
    ``replaced=True``), and sending the same text twice (a double tap) changes nothing. A new one
    counts against the person's daily cap. Screening sets the status: ``flagged`` (never trained
    on), ``held_for_review`` when the person's corrections keep being flagged, else ``accepted``.
    The person's pending correction of this caption is cleared; a rejected correction leaves it
    in place so they can try again.
    """
    policy = policy or EntryPolicy()
    caption = await session.get(Caption, caption_id)
    if caption is None:
        raise CorrectionRejected(Rejection.NO_CAPTION)
    normalized = validate_correction(text, caption.text)
    person, _ = await ensure_person(session, telegram_id)
    existing = await session.scalar(
        select(Correction).where(
            Correction.caption_id == caption_id, Correction.person_id == person.id, _live(Correction)
        )
    )
    if existing is not None and existing.text == normalized:
        await _clear_pending(session, person.id, caption_id)
        return correction_record(existing, telegram_id)
    if existing is None:
        await _check_daily_cap(session, person.id, policy.daily_cap)
    status, reason = await _screened(session, person, normalized, policy)
    await _clear_pending(session, person.id, caption_id)
    now = utcnow()
    row = existing or Correction(caption_id=caption_id, person_id=person.id, created_at=now)
    row.text_raw, row.text, row.status, row.flag_reason = text, normalized, status, reason
    # New words, not yet looked at by any run.
    row.outcome = row.trained_model_version = row.trained_at = None
    if existing is None:
        session.add(row)
    else:
        row.updated_at = now
    await session.flush()
    return correction_record(row, telegram_id, replaced=existing is not None)


def _live(table: type[Correction]) -> ColumnElement[bool]:
    """Rows that are a person's current correction (not an older duplicate kept by migration 0002)."""
    return table.status != CorrectionStatus.SUPERSEDED


async def _clear_pending(session: AsyncSession, person_id: int, caption_id: int) -> None:
    await session.execute(
        delete(PendingCorrectionRow).where(
            PendingCorrectionRow.person_id == person_id, PendingCorrectionRow.caption_id == caption_id
        )
    )


async def _check_daily_cap(session: AsyncSession, person_id: int, cap: int) -> None:
    if cap <= 0:
        return
    since = utcnow() - timedelta(days=1)
    added = await session.scalar(
        select(func.count(Correction.id)).where(Correction.person_id == person_id, Correction.created_at >= since)
    )
    if (added or 0) >= cap:
        raise CorrectionRejected(Rejection.DAILY_LIMIT, limit=cap)


async def _screened(
    session: AsyncSession, person: Person, text: str, policy: EntryPolicy
) -> tuple[CorrectionStatus, FlagReason | None]:
    reason = policy.screen().flag_reason(text)
    if reason is not None:
        return CorrectionStatus.FLAGGED, reason
    if policy.flags_before_hold > 0:
        flagged = await session.scalar(
            select(func.count(Correction.id)).where(
                Correction.person_id == person.id, Correction.status == CorrectionStatus.FLAGGED
            )
        )
        # Flags from before a /forget count too (``Person.prior_flags``).
        if (flagged or 0) + person.prior_flags >= policy.flags_before_hold:
            return CorrectionStatus.HELD_FOR_REVIEW, None
    return CorrectionStatus.ACCEPTED, None


# ---------------------------------------------------------------------- operator review

_UNDER_REVIEW = (CorrectionStatus.FLAGGED, CorrectionStatus.HELD_FOR_REVIEW)


async def corrections_under_review(session: AsyncSession, limit: int) -> list[CorrectionRecord]:
    """Flagged and held corrections, oldest first: what an operator may release or delete."""
    rows = await session.execute(
        select(Correction, Person.telegram_id)
        .join(Person, Person.id == Correction.person_id)
        .where(Correction.status.in_(_UNDER_REVIEW))
        .order_by(Correction.id)
        .limit(limit)
    )
    return [correction_record(row, telegram_id) for row, telegram_id in rows.all()]


async def release_corrections(session: AsyncSession, ids: Sequence[int]) -> int:
    """An operator found these flagged or held corrections fine: they become trainable.

    Only corrections under review change (an accepted or trained one is left as it is); the
    next fine-tune sees them as new. Returns how many were released.
    """
    released = 0
    for chunk in chunks(ids):
        released += await rowcount(session, (
            update(Correction)
            .where(Correction.id.in_(chunk), Correction.status.in_(_UNDER_REVIEW))
            .values(status=CorrectionStatus.ACCEPTED.value, flag_reason=None, outcome=None,
                    trained_model_version=None, trained_at=None)
        ))
    return released


async def delete_corrections_under_review(session: AsyncSession, ids: Sequence[int]) -> int:
    """An operator confirmed these flagged or held corrections are junk: delete them.

    Accepted corrections are never deleted this way (a person's own /forget does that).
    """
    deleted = 0
    for chunk in chunks(ids):
        deleted += await rowcount(session, (
            delete(Correction).where(Correction.id.in_(chunk), Correction.status.in_(_UNDER_REVIEW))
        ))
    return deleted


async def mark_corrections_trained(
    session: AsyncSession,
    correction_ids: Sequence[int],
    model_version: str,
    outcome: CorrectionOutcome = CorrectionOutcome.TRAINED,
) -> int:
    """Record which fine-tune looked at these corrections and what it did with them; returns rows updated.

    A marked correction is never offered to a run again (``untrained_only``), whatever the outcome.
    """
    outcome = CorrectionOutcome(outcome)
    now = utcnow()
    total = 0
    for chunk in chunks(correction_ids):
        total += await rowcount(
            session,
            update(Correction)
            .where(Correction.id.in_(chunk))
            .values(trained_model_version=model_version, trained_at=now, outcome=outcome.value),
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

    Only corrections screening accepted are offered (never flagged or held ones). A forgotten
    person's data is gone with their row (``storage.forget``). ``untrained_only`` keeps
    corrections no run has looked at yet; it does not apply to up-voted captions, which carry
    no such mark.
    """
    examples = await _correction_examples(session, photos, since, untrained_only)
    if include_upvoted:
        examples += await _upvoted_examples(session, photos, since)
    return sorted(examples, key=lambda ex: (ex.created_at, ex.kind, ex.source_id))


async def corrections_of_run(session: AsyncSession, photos: PhotoStore, model_version: str) -> list[TrainingExample]:
    """The corrections the fine-tune ``model_version`` trained on (what an operator reviews)."""
    return await _correction_examples(session, photos, None, False, model_version)


async def _correction_examples(
    session: AsyncSession, photos: PhotoStore, since: datetime | None, untrained_only: bool, run: str | None = None
) -> list[TrainingExample]:
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
            Correction.person_id,
        )
        .join(Caption, Correction.caption_id == Caption.id)
        .join(Photo, Caption.photo_id == Photo.id)
        .where(Correction.status == CorrectionStatus.ACCEPTED)
    )
    if since is not None:
        stmt = stmt.where(Correction.created_at >= since)
    if untrained_only:
        stmt = stmt.where(Correction.trained_model_version.is_(None))
    if run is not None:
        stmt = stmt.where(Correction.trained_model_version == run)
    return _training_examples("correction", (await session.execute(stmt)).all(), photos)


async def _upvoted_examples(
    session: AsyncSession, photos: PhotoStore, since: datetime | None
) -> list[TrainingExample]:
    net = func.sum(case((Vote.up.is_(True), 1), else_=-1))
    liked = select(Vote.caption_id).group_by(Vote.caption_id).having(net > 0)
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
            Caption.requester_id,
        )
        .join(Photo, Caption.photo_id == Photo.id)
        .where(Caption.id.in_(liked))
    )
    if since is not None:
        stmt = stmt.where(Caption.created_at >= since)
    return _training_examples("upvoted", (await session.execute(stmt)).all(), photos)


def _training_examples(kind: TrainingKind, rows: Sequence[ExampleRow], photos: PhotoStore) -> list[TrainingExample]:
    return [
        TrainingExample(
            kind, source_id, caption_id, photo_id, sha, rel, photos.path(rel), text, created, trained, person
        )
        for source_id, caption_id, photo_id, sha, rel, text, created, trained, person in rows
    ]
