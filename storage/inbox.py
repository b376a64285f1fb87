"""The durable inbox: photo requests written on arrival, answered ones pruned after a while."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import InboxEntry, utcnow
from storage.records import InboxItem, record_from
from storage.transactions import rowcount


async def receive(session: AsyncSession, item: InboxItem) -> bool:
    """Write the request; False if this message is already in the inbox (a redelivered update,
    or one a replay is answering), which its caller must then leave alone."""
    existing = await session.scalar(select(InboxEntry.id).where(
        InboxEntry.chat_id == item.chat_id, InboxEntry.message_id == item.message_id))
    if existing is not None:
        return False
    session.add(InboxEntry(
        chat_id=item.chat_id, chat_type=item.chat_type, message_id=item.message_id, sender_id=item.sender_id,
        kind=item.kind, file_id=item.file_id, file_unique_id=item.file_unique_id, file_size=item.file_size,
        received_at=utcnow(),
    ))
    await session.flush()
    return True


async def mark_answered(session: AsyncSession, chat_id: int, message_id: int) -> bool:
    changed = await rowcount(session, update(InboxEntry).where(
        InboxEntry.chat_id == chat_id, InboxEntry.message_id == message_id, InboxEntry.answered_at.is_(None),
    ).values(answered_at=utcnow()))
    return changed > 0


async def take_for_replay(session: AsyncSession) -> list[InboxItem]:
    """The unanswered requests not replayed before, marked replayed: each is replayed once only."""
    rows = (await session.scalars(select(InboxEntry).where(
        InboxEntry.answered_at.is_(None), InboxEntry.replayed_at.is_(None)).order_by(InboxEntry.id))).all()
    now = utcnow()
    for row in rows:
        row.replayed_at = now
    await session.flush()
    return [record_from(InboxItem, row) for row in rows]


async def prune(session: AsyncSession, older_than: timedelta, now: datetime | None = None) -> int:
    """Forget requests received before ``older_than`` ago (answered, or replayed once already)."""
    cutoff = (now or utcnow()) - older_than
    return await rowcount(session, delete(InboxEntry).where(InboxEntry.received_at < cutoff))
