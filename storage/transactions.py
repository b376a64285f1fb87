"""The transaction runner every ``Storage`` call goes through, and small session helpers.

Each call runs one short transaction. Writes start with ``BEGIN IMMEDIATE`` on
SQLite (see ``storage.engine``) and are retried when SQLite still reports
"database is locked", so that error never reaches the caller under load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from sqlalchemy import Select
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.sql.dml import Delete, Update

from storage.engine import is_sqlite, write_engine
from storage.errors import NotFound
from storage.models import Base
from storage.retry import MAX_LOCKED_ATTEMPTS, Backoff, is_locked

log = logging.getLogger(__name__)

T = TypeVar("T")
RowT = TypeVar("RowT", bound=Base)
K = TypeVar("K", int, str)  # a key in an IN (...) list
SessionOp = Callable[[AsyncSession], Awaitable[T]]

INTEGRITY_ATTEMPTS = 3
ID_CHUNK = 500  # ids per IN (...) list: well under SQLite's bound-parameter limit


class Transactions:
    """Runs session operations in transactions: reads on plain sessions, writes one at a time."""

    def __init__(self, engine: AsyncEngine, url: str, info: dict[str, Any] | None = None) -> None:
        """``info``: what every session carries in ``session.info`` (e.g. ``storage.keys.SESSION_FORGET_KEY``)."""
        self._read_sessions = async_sessionmaker(engine, expire_on_commit=False, info=dict(info or {}))
        self._write_sessions = async_sessionmaker(write_engine(engine), expire_on_commit=False, info=dict(info or {}))
        # SQLite admits one writer at a time. Queuing this process's writers on an
        # asyncio lock is much cheaper than letting them poll the file lock (the
        # busy handler sleeps in steps of up to 100 ms); other processes still
        # meet the file lock, handled by busy_timeout and the retry in ``_run``.
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if is_sqlite(url) else None
        self.lock_retries = 0  # how often SQLite said "locked" and a transaction was retried

    async def read(self, op: SessionOp[T]) -> T:
        return await self._run(self._read_sessions, op)

    async def write(self, op: SessionOp[T], retry_integrity: bool = False) -> T:
        """Run ``op`` in a write transaction.

        With ``retry_integrity`` a unique-key clash (two writers creating the same
        row at once, possible on PostgreSQL) is retried too: the next attempt finds the row.
        """
        if self._write_lock is None:
            return await self._run(self._write_sessions, op, retry_integrity)
        async with self._write_lock:
            return await self._run(self._write_sessions, op, retry_integrity)

    async def _run(
        self, factory: async_sessionmaker[AsyncSession], op: SessionOp[T], retry_integrity: bool = False
    ) -> T:
        """Run ``op`` in one transaction, retrying the whole of it when SQLite is locked."""
        backoff = Backoff()
        locked = clashes = 0
        while True:
            try:
                async with factory() as session, session.begin():
                    return await op(session)
            except OperationalError as exc:
                locked += 1
                if not is_locked(exc) or locked >= MAX_LOCKED_ATTEMPTS:
                    raise
                self.lock_retries += 1
                log.debug("database locked (attempt %d); retrying", locked)
            except IntegrityError:
                clashes += 1
                if not retry_integrity or clashes >= INTEGRITY_ATTEMPTS:
                    raise
            await backoff.sleep()


def found(row: T | None, what: str) -> T:
    """``row``, or ``NotFound`` naming ``what`` (e.g. "caption 7") when there is none."""
    if row is None:
        raise NotFound(f"{what} does not exist")
    return row


async def get_or_raise(session: AsyncSession, model: type[RowT], key: Any, what: str) -> RowT:
    """The row of ``model`` with primary key ``key``, or ``NotFound`` naming ``what``."""
    return found(await session.get(model, key), what)


async def rowcount(session: AsyncSession, stmt: Delete | Update) -> int:
    """Rows a DELETE or UPDATE touched (drivers may report -1 for "unknown": counted as 0)."""
    result = cast(CursorResult[Any], await session.execute(stmt))
    return max(result.rowcount, 0)


async def count(session: AsyncSession, stmt: Select[int]) -> int:
    return int(await session.scalar(stmt) or 0)


def chunks(ids: Sequence[K]) -> Iterable[Sequence[K]]:
    for start in range(0, len(ids), ID_CHUNK):
        yield ids[start : start + ID_CHUNK]
