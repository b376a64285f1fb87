"""Counts for the operator (``/stats`` in the bot, ``python -m storage stats``)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.model_versions import active_model_name
from storage.models import Caption, Correction, Person, Photo, Vote
from storage.records import DayCount, Stats
from storage.transactions import count


async def stats(session: AsyncSession, days: int = 7) -> Stats:
    """Captions per UTC day (the last ``days``, oldest first, zero days included), totals, active model."""
    days = max(days, 1)
    ups, downs = await _vote_totals(session)
    return Stats(
        captions_per_day=await _captions_per_day(session, days),
        captions=await count(session, select(func.count(Caption.id))),
        photos=await count(session, select(func.count(Photo.id))),
        people=await count(session, select(func.count(Person.id))),
        votes_up=ups,
        votes_down=downs,
        corrections=await count(session, select(func.count(Correction.id))),
        corrections_untrained=await count(
            session, select(func.count(Correction.id)).where(Correction.trained_model_version.is_(None))
        ),
        active_model=await active_model_name(session),
    )


async def _captions_per_day(session: AsyncSession, days: int) -> tuple[DayCount, ...]:
    first_day = datetime.now(UTC).date() - timedelta(days=days - 1)
    since = datetime.combine(first_day, datetime.min.time(), tzinfo=UTC)
    day_col = func.date(Caption.created_at)
    rows = await session.execute(
        select(day_col, func.count()).where(Caption.created_at >= since).group_by(day_col)
    )
    per_day = {_day_of(day): int(n) for day, n in rows}
    series = (first_day + timedelta(days=i) for i in range(days))
    return tuple(DayCount(day, per_day.get(day, 0)) for day in series)


async def _vote_totals(session: AsyncSession) -> tuple[int, int]:
    ups, downs = (
        await session.execute(
            select(
                func.coalesce(func.sum(case((Vote.up.is_(True), 1), else_=0)), 0),
                func.coalesce(func.sum(case((Vote.up.is_(False), 1), else_=0)), 0),
            )
        )
    ).one()
    return int(ups or 0), int(downs or 0)


def _day_of(value: Any) -> date:
    """``func.date`` yields a str on SQLite and a date on PostgreSQL."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])
