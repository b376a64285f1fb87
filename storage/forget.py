"""Forgetting a person, and removing photo files no row refers to any more."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.models import (
    Caption,
    Correction,
    InboxEntry,
    PendingCorrectionRow,
    Person,
    Photo,
    PhotoSender,
    Vote,
    utcnow,
)
from storage.people import person_by_telegram_id
from storage.photos import PhotoStore
from storage.records import ForgetReport
from storage.transactions import chunks, rowcount


async def forget_person(session: AsyncSession, telegram_id: int) -> tuple[ForgetReport, list[str]]:
    """Delete what a person gave us: votes, corrections, pending state, the captions
    they asked for, and the photo rows no one else sent.

    The person row stays, marked forgotten and stripped of its language, so that
    a later visit is recognised as a fresh start (see ``people.ensure_person``).
    Returns the report and the photo files to remove (``delete_unreferenced_files``
    in a later transaction, once the rows are gone for good).
    """
    person = await person_by_telegram_id(session, telegram_id)
    if person is None:
        return ForgetReport(telegram_id, found=False), []
    return await _delete_person_data(session, person)


async def _delete_person_data(session: AsyncSession, person: Person) -> tuple[ForgetReport, list[str]]:
    pid = person.id
    other_sender = aliased(PhotoSender)
    orphan_photos = select(PhotoSender.photo_id).where(
        PhotoSender.person_id == pid,
        ~exists().where(other_sender.photo_id == PhotoSender.photo_id, other_sender.person_id != pid),
    )
    rel_paths = list((await session.scalars(select(Photo.rel_path).where(Photo.id.in_(orphan_photos)))).all())
    captions = select(Caption.id).where(or_(Caption.requester_id == pid, Caption.photo_id.in_(orphan_photos)))

    pending = await rowcount(
        session,
        delete(PendingCorrectionRow).where(
            or_(PendingCorrectionRow.person_id == pid, PendingCorrectionRow.caption_id.in_(captions))
        ),
    )
    votes = await rowcount(session, delete(Vote).where(or_(Vote.person_id == pid, Vote.caption_id.in_(captions))))
    corrections = await rowcount(
        session,
        delete(Correction).where(or_(Correction.person_id == pid, Correction.caption_id.in_(captions))),
    )
    caption_count = await rowcount(session, delete(Caption).where(Caption.id.in_(captions)))
    orphan_ids = list((await session.scalars(orphan_photos)).all())
    photos = 0
    for chunk in chunks(orphan_ids):
        await session.execute(delete(PhotoSender).where(PhotoSender.photo_id.in_(chunk)))
        photos += await rowcount(session, delete(Photo).where(Photo.id.in_(chunk)))
    await session.execute(delete(PhotoSender).where(PhotoSender.person_id == pid))
    await session.execute(delete(InboxEntry).where(InboxEntry.sender_id == person.telegram_id))

    person.is_forgotten = True
    person.forgotten_at = utcnow()
    person.language_code = None
    await session.flush()
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
