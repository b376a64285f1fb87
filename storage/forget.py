"""Forgetting a person (``/forget``), and removing photo files no row refers to any more."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

from sqlalchemy import ColumnElement, Select, delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.keys import person_hash, session_forget_key
from storage.models import (
    Caption,
    Correction,
    ForgottenPerson,
    InboxEntry,
    ModelVersion,
    PendingCorrectionRow,
    Person,
    Photo,
    PhotoSender,
    Vote,
    utcnow,
)
from storage.people import person_by_telegram_id
from storage.photos import PhotoStore
from storage.records import CorrectionOutcome, CorrectionStatus, ForgetReport, ModelStatus
from storage.transactions import chunks, count, rowcount


async def forget_person(session: AsyncSession, telegram_id: int) -> tuple[ForgetReport, list[str]]:
    """Delete a person and what they gave us: votes, corrections, pending state, the captions they
    asked for, their inbox entries, the photo rows no one else sent, and their person row.

    What stays: if some of their corrections had been flagged, a keyed hash of their Telegram id
    and that count (``ForgottenPerson``), so /forget cannot wash a record of abuse. Every model
    version trained on one of the deleted corrections, and every version descending from it, is
    marked ``forgotten_data`` (never a fine-tune's base again; one awaiting review is rejected), and
    the other corrections those versions learned from are offered to the next run again.
    Returns the report and the photo files to remove (``delete_unreferenced_files`` in a later
    transaction, once the rows are gone for good).
    """
    person = await person_by_telegram_id(session, telegram_id)
    if person is None:
        return ForgetReport(telegram_id, found=False), []
    pid = person.id
    flags = person.prior_flags + await count(session, select(func.count(Correction.id)).where(
        Correction.person_id == pid, Correction.status == CorrectionStatus.FLAGGED))
    orphans = _orphan_photos(pid)
    captions = select(Caption.id).where(or_(Caption.requester_id == pid, Caption.photo_id.in_(orphans)))
    theirs = or_(Correction.person_id == pid, Correction.caption_id.in_(captions))
    models = await _mark_models_trained_on(session, theirs)
    report, rel_paths = await _delete_person_data(session, person, orphans, captions, theirs)
    await _remember_flags(session, telegram_id, flags)
    await session.execute(delete(Person).where(Person.id == pid))
    return dataclasses.replace(report, models_marked=len(models)), rel_paths


def _orphan_photos(pid: int) -> Select[int]:
    """The photos this person sent and no one else did."""
    other_sender = aliased(PhotoSender)
    return select(PhotoSender.photo_id).where(
        PhotoSender.person_id == pid,
        ~exists().where(other_sender.photo_id == PhotoSender.photo_id, other_sender.person_id != pid),
    )


async def _delete_person_data(
    session: AsyncSession, person: Person, orphan_photos: Select[int], captions: Select[int],
    theirs: ColumnElement[bool],
) -> tuple[ForgetReport, list[str]]:
    pid = person.id
    rel_paths = list((await session.scalars(select(Photo.rel_path).where(Photo.id.in_(orphan_photos)))).all())
    pending = await rowcount(
        session,
        delete(PendingCorrectionRow).where(
            or_(PendingCorrectionRow.person_id == pid, PendingCorrectionRow.caption_id.in_(captions))
        ),
    )
    votes = await rowcount(session, delete(Vote).where(or_(Vote.person_id == pid, Vote.caption_id.in_(captions))))
    corrections = await rowcount(session, delete(Correction).where(theirs))
    caption_count = await rowcount(session, delete(Caption).where(Caption.id.in_(captions)))
    orphan_ids = list((await session.scalars(orphan_photos)).all())
    photos = 0
    for chunk in chunks(orphan_ids):
        await session.execute(delete(PhotoSender).where(PhotoSender.photo_id.in_(chunk)))
        photos += await rowcount(session, delete(Photo).where(Photo.id.in_(chunk)))
    await session.execute(delete(PhotoSender).where(PhotoSender.person_id == pid))
    await session.execute(delete(InboxEntry).where(InboxEntry.sender_id == person.telegram_id))
    report = ForgetReport(
        person.telegram_id,
        found=True,
        votes=votes,
        corrections=corrections,
        captions=caption_count,
        photos=photos,
        pending=pending,
    )
    return report, rel_paths


# A run whose outcome is ``flagged`` left the correction out: it did not learn from it.
_LEARNED_FROM = (CorrectionOutcome.TRAINED.value, CorrectionOutcome.REJECTED_RUN.value)


async def _mark_models_trained_on(session: AsyncSession, corrections: ColumnElement[bool]) -> set[str]:
    """Mark every model version that learned from ``corrections``, and its descendants; returns their names.

    A marked candidate awaiting review is rejected (no operator can activate it any more). The
    other people's corrections a marked version learned from lose their ``trained`` outcome, so the
    next fine-tune, which starts from an unmarked ancestor, learns them again. Corrections of a
    rejected run stay as they are: no model kept them, and they are not retried.
    """
    runs = set((await session.scalars(
        select(Correction.trained_model_version).distinct().where(
            corrections, Correction.trained_model_version.is_not(None), Correction.outcome.in_(_LEARNED_FROM))
    )).all())
    marked = await _with_descendants(session, {run for run in runs if run is not None})
    for chunk in chunks(sorted(marked)):
        await session.execute(update(ModelVersion).where(ModelVersion.name.in_(chunk)).values(forgotten_data=True))
        await session.execute(
            update(ModelVersion)
            .where(ModelVersion.name.in_(chunk), ModelVersion.status == ModelStatus.AWAITING_REVIEW)
            .values(status=ModelStatus.REJECTED.value, reason=FORGOTTEN_DATA_REASON)
        )
        await session.execute(
            update(Correction)
            .where(Correction.trained_model_version.in_(chunk), Correction.outcome == CorrectionOutcome.TRAINED)
            .values(outcome=None, trained_model_version=None, trained_at=None)
        )
    return marked


FORGOTTEN_DATA_REASON = "trained on corrections of a person who used /forget"


async def _with_descendants(session: AsyncSession, names: set[str]) -> set[str]:
    """``names`` and every model version whose lineage (``parent``) leads to one of them."""
    found, frontier = set(names), set(names)
    while frontier:
        children: set[str] = set()
        for chunk in chunks(sorted(frontier)):
            found_children = await session.scalars(select(ModelVersion.name).where(ModelVersion.parent.in_(chunk)))
            children |= set(found_children.all())
        frontier = children - found
        found |= frontier
    return found


async def _remember_flags(session: AsyncSession, telegram_id: int, flags: int) -> None:
    """Keep the keyed hash and the flag count of a person whose corrections had been flagged; no
    flags, nothing kept."""
    if flags <= 0:
        return
    key = person_hash(session_forget_key(session), telegram_id)
    row = await session.get(ForgottenPerson, key)
    if row is None:
        session.add(ForgottenPerson(hash=key, forgotten_at=utcnow(), flags=flags))
    else:
        row.flags, row.forgotten_at = flags, utcnow()
    await session.flush()


async def delete_unreferenced_files(session: AsyncSession, photos: PhotoStore, rel_paths: Sequence[str]) -> int:
    """Unlink the photo files among ``rel_paths`` that no row refers to; returns how many went.

    Run it in a write transaction: holding the write lock while checking and
    unlinking means a concurrent ``record_photo`` of the same bytes either commits
    first (the file is kept) or runs after (and rewrites the file before committing its row).
    """
    deleted = 0
    for rel_path in rel_paths:
        still_used = await session.scalar(select(exists().where(Photo.rel_path == rel_path)))
        if not still_used and await asyncio.to_thread(photos.delete, rel_path):
            deleted += 1
    return deleted


async def referenced_paths(session: AsyncSession) -> set[str]:
    """The relative paths of every photo that has a row."""
    return set((await session.scalars(select(Photo.rel_path))).all())
