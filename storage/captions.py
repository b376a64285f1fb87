"""Photos, the captions the model gave them, and people's votes on those captions."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Caption, Person, Photo, PhotoSender, Vote, utcnow
from storage.people import ensure_person
from storage.photos import PhotoStore
from storage.records import CaptionRecord, PhotoRecord, VoteRecord, record_from
from storage.transactions import found, get_or_raise


def photo_record(photo: Photo, created: bool) -> PhotoRecord:
    return record_from(PhotoRecord, photo, created=created)


def caption_record(
    caption: Caption, photo_sha256: str, photo_rel_path: str, requester_telegram_id: int, votes: tuple[int, int]
) -> CaptionRecord:
    """The record of a caption, given what lives in other tables: its photo, requester and (up, down) votes."""
    return record_from(
        CaptionRecord,
        caption,
        photo_sha256=photo_sha256,
        photo_rel_path=photo_rel_path,
        requester_telegram_id=requester_telegram_id,
        votes_up=votes[0],
        votes_down=votes[1],
    )


# ---------------------------------------------------------------------- photos


async def record_photo(
    session: AsyncSession,
    photos: PhotoStore,
    data: bytes,
    sha256: str,
    *,
    width: int,
    height: int,
    telegram_file_unique_id: str | None,
    sender_telegram_id: int,
) -> PhotoRecord:
    """The photo row for these bytes (created if new), with the sender remembered.

    The file is (re)written here too, inside the write transaction: a concurrent
    forget may have removed it since the caller first wrote it, and forget deletes
    files inside its own write transaction, so checking here is race-free.
    """
    rel_path = await asyncio.to_thread(photos.ensure, sha256, data)
    person, _ = await ensure_person(session, sender_telegram_id)
    photo = await session.scalar(select(Photo).where(Photo.sha256 == sha256))
    created = photo is None
    if photo is None:
        photo = Photo(
            sha256=sha256,
            size_bytes=len(data),
            width=width,
            height=height,
            telegram_file_unique_id=telegram_file_unique_id,
            rel_path=rel_path,
            created_at=utcnow(),
        )
        session.add(photo)
        await session.flush()
    elif photo.telegram_file_unique_id is None and telegram_file_unique_id:
        photo.telegram_file_unique_id = telegram_file_unique_id
    if await session.get(PhotoSender, (photo.id, person.id)) is None:
        session.add(PhotoSender(photo_id=photo.id, person_id=person.id, first_sent_at=utcnow()))
        await session.flush()
    return photo_record(photo, created)


async def get_photo(session: AsyncSession, photo_id: int) -> PhotoRecord | None:
    photo = await session.get(Photo, photo_id)
    return None if photo is None else photo_record(photo, False)


# ---------------------------------------------------------------------- captions


async def vote_counts(session: AsyncSession, caption_id: int) -> tuple[int, int]:
    """(up, down) votes on a caption."""
    rows = await session.execute(
        select(Vote.up, func.count()).where(Vote.caption_id == caption_id).group_by(Vote.up)
    )
    counts = {bool(up): int(n) for up, n in rows}
    return counts.get(True, 0), counts.get(False, 0)


async def _latest_caption(session: AsyncSession, where: Any) -> CaptionRecord | None:
    """The newest caption matching ``where``, with its photo, requester and votes."""
    stmt = (
        select(Caption, Photo.sha256, Photo.rel_path, Person.telegram_id)
        .join(Photo, Caption.photo_id == Photo.id)
        .join(Person, Caption.requester_id == Person.id)
        .where(where)
        .order_by(Caption.id.desc())
        .limit(1)
    )
    row = (await session.execute(stmt)).first()
    if row is None:
        return None
    caption, sha, rel_path, telegram_id = row
    return caption_record(caption, sha, rel_path, telegram_id, await vote_counts(session, caption.id))


async def record_caption(
    session: AsyncSession,
    photo_id: int,
    *,
    model_version: str,
    text: str,
    score: float,
    beam_size: int,
    latency_ms: float,
    requester_telegram_id: int,
    chat_id: int | None = None,
    message_id: int | None = None,
) -> CaptionRecord:
    """Remember a caption the model produced for a stored photo."""
    photo = await get_or_raise(session, Photo, photo_id, f"photo {photo_id}")
    person, _ = await ensure_person(session, requester_telegram_id)
    caption = Caption(
        photo_id=photo_id,
        requester_id=person.id,
        model_version=model_version,
        text=text,
        score=float(score),
        beam_size=int(beam_size),
        latency_ms=float(latency_ms),
        chat_id=chat_id,
        message_id=message_id,
        created_at=utcnow(),
    )
    session.add(caption)
    await session.flush()
    return caption_record(caption, photo.sha256, photo.rel_path, requester_telegram_id, (0, 0))


async def set_caption_message(
    session: AsyncSession, caption_id: int, chat_id: int, message_id: int
) -> CaptionRecord:
    """Remember which Telegram message shows the caption, so replies map back to it."""
    what = f"caption {caption_id}"
    caption = await get_or_raise(session, Caption, caption_id, what)
    caption.chat_id = chat_id
    caption.message_id = message_id
    await session.flush()
    return found(await _latest_caption(session, Caption.id == caption_id), what)


async def get_caption(session: AsyncSession, caption_id: int) -> CaptionRecord | None:
    return await _latest_caption(session, Caption.id == caption_id)


async def find_caption_by_message(session: AsyncSession, chat_id: int, message_id: int) -> CaptionRecord | None:
    """The caption shown in a given message (the latest, should a message be reused)."""
    return await _latest_caption(session, and_(Caption.chat_id == chat_id, Caption.message_id == message_id))


# ---------------------------------------------------------------------- votes


async def record_vote(session: AsyncSession, caption_id: int, telegram_id: int, up: bool) -> VoteRecord:
    """One vote per person per caption: a new vote replaces the old one."""
    await get_or_raise(session, Caption, caption_id, f"caption {caption_id}")
    person, _ = await ensure_person(session, telegram_id)
    vote = await session.scalar(select(Vote).where(Vote.caption_id == caption_id, Vote.person_id == person.id))
    now = utcnow()
    changed = vote is None or vote.up != up
    if vote is None:
        session.add(Vote(caption_id=caption_id, person_id=person.id, up=up, created_at=now, updated_at=now))
    elif changed:
        vote.up = up
        vote.updated_at = now
    await session.flush()
    ups, downs = await vote_counts(session, caption_id)
    return VoteRecord(caption_id, telegram_id, up, changed, ups, downs)
