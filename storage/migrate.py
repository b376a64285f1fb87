"""Apply Alembic migrations programmatically, from any working directory.

The Alembic configuration is built in code from the package location, so the
upgrade works from a checkout and from an installed wheel alike (no alembic.ini
lookup relative to the current directory).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.engine import write_engine
from storage.retry import retry_locked

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    """An Alembic Config pointing at the packaged migrations."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        # '%' is ConfigParser interpolation syntax; URLs may contain it (escaped passwords).
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade_sync(connection: Connection, revision: str) -> None:
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    command.upgrade(cfg, revision)


def _current_sync(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` on a connection of ``engine``.

    The migration runs in one write transaction (BEGIN IMMEDIATE on SQLite), so
    several processes starting at once apply it exactly once; a lock error
    (e.g. two connections switching a brand-new file to WAL) is retried.
    """

    async def attempt() -> None:
        async with write_engine(engine).begin() as conn:
            await conn.run_sync(_upgrade_sync, revision)

    await retry_locked(attempt)


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current_sync)
