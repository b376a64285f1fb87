"""Engine creation: SQLite tuned for a concurrent async service.

Every SQLite connection gets WAL (readers never block the writer), foreign keys
(SQLite leaves them off by default), a busy timeout (wait for the lock instead of
failing at once) and synchronous=NORMAL (durable at each WAL checkpoint, far
fewer fsyncs than FULL) and secure_delete (deleted rows are overwritten with zeros, not
left readable in free pages of the file: /forget must not leave people's texts behind in the
database file). SQLAlchemy emits BEGIN itself so that write
transactions can start with ``BEGIN IMMEDIATE``: taking the write lock up front
means a transaction never has to upgrade a read lock later, the case where
SQLite returns "database is locked" without waiting.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

BUSY_TIMEOUT_MS = 10_000
BEGIN_MODE_OPTION = "storage_sqlite_begin"
WAL_SWITCH_ATTEMPTS = 20
# busy_timeout first: switching to WAL needs a lock, and it should wait for it too.
SQLITE_PRAGMAS = (
    f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode=WAL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA secure_delete=ON",
)


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory / non-SQLite URLs."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database or "")


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``url``, with the SQLite set-up applied when it is SQLite."""
    kwargs: dict[str, Any] = {"pool_pre_ping": False}
    if is_sqlite(url) and sqlite_file(url) is not None:
        # Enough pooled connections for many concurrent tasks; SQLite serialises writers anyway.
        kwargs.update(pool_size=8, max_overflow=8, pool_timeout=120)
    engine = create_async_engine(url, **kwargs)
    if is_sqlite(url):
        _install_sqlite_hooks(engine)
    return engine


def write_engine(engine: AsyncEngine) -> AsyncEngine:
    """A view of ``engine`` whose transactions take the SQLite write lock at BEGIN."""
    return engine.execution_options(**{BEGIN_MODE_OPTION: "IMMEDIATE"})


async def truncate_wal(engine: AsyncEngine) -> bool:
    """Copy the SQLite write-ahead log into the database file and empty it; True if it was emptied.

    The WAL keeps earlier versions of pages (deleted rows' text among them) until it is
    overwritten; after /forget it is emptied now. False when a reader still needs it (the
    next checkpoint empties it) and for other databases (no such file).
    """
    if engine.dialect.name != "sqlite":
        return False
    async with engine.connect() as conn:
        # Outside any transaction: a checkpoint cannot run inside one.
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if driver is None:
            return False
        cursor = await driver.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        busy, _, _ = await cursor.fetchone()
        await cursor.close()
    return busy == 0


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Stop the driver from issuing its own (deferred, DML-only) BEGIN.
        dbapi_connection.isolation_level = None
        try:
            _apply_pragmas(dbapi_connection)
        except BaseException:
            dbapi_connection.close()  # the pool drops it; don't leak the driver's thread
            raise

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(BEGIN_MODE_OPTION, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


def _apply_pragmas(dbapi_connection: Any) -> None:
    """Run ``SQLITE_PRAGMAS`` on a new connection, riding out WAL-switch lock errors.

    Switching a brand-new file to WAL needs exclusive access and fails at once
    (no busy wait) while another connection does the same. That only happens
    in the first moments of a database's life, so a few short blocking pauses
    are acceptable here.
    """
    cursor = dbapi_connection.cursor()
    try:
        for pragma in SQLITE_PRAGMAS:
            for attempt in range(WAL_SWITCH_ATTEMPTS):
                try:
                    cursor.execute(pragma)
                    break
                except Exception as exc:
                    if "locked" not in str(exc).lower() or attempt == WAL_SWITCH_ATTEMPTS - 1:
                        raise
                    time.sleep(0.01 * (attempt + 1))
    finally:
        cursor.close()
