"""How long photos are kept, and how much one person may keep: rows to delete, chosen here.

* Retention: a photo none of whose captions was corrected goes ``untouched_days`` after it
  arrived; a photo whose corrections were all trained on goes ``trained_days`` after the last
  training; a photo with a correction no model has trained on yet stays until it is trained.
* Quota: when the photos a person alone sent take more than their quota, their oldest such
  photos go first (photos with untrained corrections stay).

Deleting a photo deletes its captions and what hangs on them (votes, corrections, pending
corrections); the files go afterwards, through ``forget.delete_unreferenced_files``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Select, delete, exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from storage.models import Caption, Correction, PendingCorrectionRow, Photo, PhotoSender, Vote
from storage.people import person_by_telegram_id
from storage.transactions import chunks, rowcount


def _corrections_of_photo() -> Select[int]:
    return select(Correction.id).join(Caption, Correction.caption_id == Caption.id).where(
        Caption.photo_id == Photo.id)


def _has_untrained_correction() -> Select[int]:
    return _corrections_of_photo().where(Correction.trained_at.is_(None))


async def expired_photos(session: AsyncSession, now: datetime, untouched_days: float,
                         trained_days: float) -> list[int]:
    """Ids of the photos whose retention period is over."""
    untouched = select(Photo.id).where(
        Photo.created_at < now - timedelta(days=untouched_days), ~exists(_corrections_of_photo()))
    last_trained = (select(func.max(Correction.trained_at)).join(Caption, Correction.caption_id == Caption.id)
                    .where(Caption.photo_id == Photo.id).scalar_subquery())
    trained = select(Photo.id).where(
        exists(_corrections_of_photo()), ~exists(_has_untrained_correction()),
        last_trained < now - timedelta(days=trained_days))
    return sorted(set((await session.scalars(untouched)).all()) | set((await session.scalars(trained)).all()))


async def over_quota_photos(session: AsyncSession, telegram_id: int, quota_bytes: int) -> list[int]:
    """Ids of a person's oldest photos (sent by them alone) beyond their quota, oldest first."""
    person = await person_by_telegram_id(session, telegram_id)
    if person is None:
        return []
    other = aliased(PhotoSender)
    rows = (await session.execute(
        select(Photo.id, Photo.size_bytes)
        .join(PhotoSender, PhotoSender.photo_id == Photo.id)
        .where(PhotoSender.person_id == person.id,
               ~exists().where(other.photo_id == Photo.id, other.person_id != person.id),
               ~exists(_has_untrained_correction()))
        .order_by(Photo.created_at.desc(), Photo.id.desc())
    )).all()
    kept, over = 0, []
    for photo_id, size in rows:  # newest first: the newest fit, the rest is over
        kept += size
        if kept > quota_bytes:
            over.append(photo_id)
    return over


async def delete_photos(session: AsyncSession, photo_ids: Sequence[int]) -> tuple[int, list[str]]:
    """Delete these photos with their captions, votes and corrections; (photos deleted, their files)."""
    rel_paths: list[str] = []
    deleted = 0
    for chunk in chunks(list(photo_ids)):
        rel_paths += (await session.scalars(select(Photo.rel_path).where(Photo.id.in_(chunk)))).all()
        captions = select(Caption.id).where(Caption.photo_id.in_(chunk))
        for table in (PendingCorrectionRow, Vote, Correction):
            await session.execute(delete(table).where(table.caption_id.in_(captions)))
        await session.execute(delete(Caption).where(Caption.photo_id.in_(chunk)))
        await session.execute(delete(PhotoSender).where(PhotoSender.photo_id.in_(chunk)))
        deleted += await rowcount(session, delete(Photo).where(Photo.id.in_(chunk)))
    return deleted, rel_paths
