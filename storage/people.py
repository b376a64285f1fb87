"""People: the Telegram users who talk to the bot, created on first contact, deleted by /forget."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.keys import person_hash, session_forget_key
from storage.models import ForgottenPerson, Person, utcnow
from storage.records import PersonInfo, record_from

LANGUAGE_CODE_MAX = 16
LAST_SEEN_PRECISION = timedelta(minutes=1)


def person_info(person: Person, created: bool) -> PersonInfo:
    return record_from(PersonInfo, person, created=created)


async def person_by_telegram_id(session: AsyncSession, telegram_id: int) -> Person | None:
    return await session.scalar(select(Person).where(Person.telegram_id == telegram_id))


async def ensure_person(
    session: AsyncSession, telegram_id: int, language_code: str | None = None
) -> tuple[Person, bool]:
    """Get or create a person (and whether it was created).

    Someone who used /forget and comes back gets a new row, which starts with the flags their
    corrections had then (``ForgottenPerson``): the hold rule counts them, so /forget does not wash
    a record of abuse. The hash row goes: from now on the person row carries the count.
    """
    now = utcnow()
    language = language_code[:LANGUAGE_CODE_MAX] if language_code else None
    person = await person_by_telegram_id(session, telegram_id)
    if person is None:
        person = Person(
            telegram_id=telegram_id,
            language_code=language,
            first_seen_at=now,
            last_seen_at=now,
            prior_flags=await _take_prior_flags(session, telegram_id),
        )
        session.add(person)
        await session.flush()
        return person, True
    # last_seen_at is kept to the minute: skipping the UPDATE on busy people saves a write.
    if now - person.last_seen_at >= LAST_SEEN_PRECISION:
        person.last_seen_at = now
    if language is not None and language != person.language_code:
        person.language_code = language
    if session.is_modified(person):
        await session.flush()
    return person, False


async def _take_prior_flags(session: AsyncSession, telegram_id: int) -> int:
    """The flags a forgotten person left behind (0 if none), removing their hash row."""
    forgotten = await session.get(ForgottenPerson, person_hash(session_forget_key(session), telegram_id))
    if forgotten is None:
        return 0
    await session.delete(forgotten)
    return forgotten.flags


async def upsert_person(session: AsyncSession, telegram_id: int, language_code: str | None) -> PersonInfo:
    """Create or refresh a person; a None language keeps the one already known."""
    person, created = await ensure_person(session, telegram_id, language_code)
    return person_info(person, created)


async def get_person(session: AsyncSession, telegram_id: int) -> PersonInfo | None:
    person = await person_by_telegram_id(session, telegram_id)
    return None if person is None else person_info(person, False)
