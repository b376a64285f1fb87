"""Alembic migrations: an empty database upgrades to head and matches the models exactly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table
from sqlalchemy.engine import Connection

from storage import Storage
from storage import migrate as migrations
from storage.engine import create_engine
from storage.models import Base

REPO = Path(__file__).resolve().parents[1]
EXPECTED_TABLES = {
    "alembic_version",
    "captions",
    "corrections",
    "exports",
    "forgotten_people",
    "inbox",
    "model_versions",
    "pending_corrections",
    "people",
    "photo_senders",
    "photos",
    "votes",
}


def _url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def _diff(connection: Connection, metadata: MetaData) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _table_names(connection: Connection) -> set[str]:
    rows = connection.exec_driver_sql("SELECT name FROM sqlite_master WHERE type='table'").all()
    return {name for (name,) in rows}


async def test_upgrade_empty_database_to_head_without_drift(tmp_path: Path) -> None:
    engine = create_engine(_url(tmp_path / "fresh.db"))
    try:
        assert await migrations.current_revision(engine) is None
        await migrations.upgrade(engine)
        assert await migrations.current_revision(engine) == migrations.head_revision() == "0004"
        async with engine.connect() as conn:
            assert await conn.run_sync(_table_names) == EXPECTED_TABLES
            assert await conn.run_sync(_diff, Base.metadata) == []
            # The comparison is not vacuous: a model change would show up.
            changed = MetaData()
            for table in Base.metadata.tables.values():
                table.to_metadata(changed)
            Table("extra", changed, Column("id", Integer, primary_key=True))
            diff = await conn.run_sync(_diff, changed)
            assert [entry[0] for entry in diff] == ["add_table"]
        await migrations.upgrade(engine)  # idempotent
    finally:
        await engine.dispose()


async def test_downgrade_to_base_removes_everything(tmp_path: Path) -> None:
    engine = create_engine(_url(tmp_path / "down.db"))

    def downgrade(connection: Connection) -> None:
        cfg = migrations.alembic_config()
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "base")

    try:
        await migrations.upgrade(engine)
        async with engine.begin() as conn:
            await conn.run_sync(downgrade)
        async with engine.connect() as conn:
            assert await conn.run_sync(_table_names) == {"alembic_version"}
    finally:
        await engine.dispose()


async def test_concurrent_start_up_migrates_once(tmp_path: Path) -> None:
    opened = await asyncio.gather(*(Storage.open(data_dir=tmp_path) for _ in range(6)))
    try:
        assert {await migrations.current_revision(s.engine) for s in opened} == {"0004"}
    finally:
        await asyncio.gather(*(s.close() for s in opened))


def _run_cli(args: list[str], cwd: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CAPTIONBOT_DATA_DIR")}
    env.update(PYTHONPATH=str(REPO), **extra_env)
    return subprocess.run(
        [sys.executable, "-m", "storage", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_upgrade_from_another_directory(tmp_path: Path, how: str) -> None:
    data = tmp_path / "somewhere" / "data"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    if how == "flag":
        result = _run_cli(["upgrade", "--data-dir", str(data)], workdir, {})
    else:
        result = _run_cli(["upgrade"], workdir, {"DATABASE_URL": _url(data / "captionbot.db")})
    assert result.returncode == 0, result.stderr
    assert "revision 0004" in result.stdout
    assert (data / "captionbot.db").is_file()
    assert not (workdir / "data").exists()
    again = _run_cli(["upgrade", "--data-dir", str(data)], workdir, {})
    assert again.returncode == 0, again.stderr
