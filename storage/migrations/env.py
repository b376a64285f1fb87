"""Alembic environment for storage (async).

Two ways in: ``storage.migrate.upgrade`` passes an open connection through
``config.attributes["connection"]`` (start-up and ``python -m storage upgrade``);
the plain ``alembic -c storage/alembic.ini ...`` CLI gets none, so an async
engine is created from the configured URL (or DATABASE_URL / the data dir).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from common.settings import load_settings
from storage.config import database_url
from storage.engine import create_engine, is_sqlite, write_engine
from storage.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds tables when needed.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    # Run by hand (`alembic upgrade head`): the same settings the bot reads.
    settings = load_settings()
    return config.get_main_option("sqlalchemy.url") or database_url(settings.database_url, settings.data_dir)


async def _run_async() -> None:
    url = _url()
    engine = create_engine(url)
    try:
        target = write_engine(engine) if is_sqlite(url) else engine
        async with target.begin() as conn:
            await conn.run_sync(_configure_and_run)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
