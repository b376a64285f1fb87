"""The same storage against a real PostgreSQL server (asyncpg), started for these tests.

Skipped when asyncpg or the PostgreSQL server binaries are missing. Proves the
schema, the migrations and the queries are not SQLite-only.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from storage import CorrectionRejected, ModelVersionError, Storage
from storage.models import Base

pytest.importorskip("asyncpg")
INITDB = shutil.which("initdb")
PG_CTL = shutil.which("pg_ctl")
pytestmark = pytest.mark.skipif(not (INITDB and PG_CTL), reason="PostgreSQL server binaries not installed")


def _pg(args: list[str]) -> None:
    """Run a server command, as the 'postgres' account when we are root (the server refuses root)."""
    command = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="storage-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "cluster", _free_port()
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    try:
        _pg([str(INITDB), "-D", str(data), "-U", "captionbot", "-A", "trust"])
        _pg([str(PG_CTL), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"])
    except (subprocess.CalledProcessError, OSError) as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start a PostgreSQL server here: {exc}")
    try:
        yield f"postgresql+asyncpg://captionbot@127.0.0.1:{port}/postgres"
    finally:
        _pg([str(PG_CTL), "-D", str(data), "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def pg_store(pg_url: str, tmp_path: Path) -> AsyncIterator[Storage]:
    store = await Storage.open(pg_url, data_dir=tmp_path)
    try:
        yield store
    finally:
        async with store.engine.begin() as conn:
            tables = ", ".join(t.name for t in reversed(Base.metadata.sorted_tables))
            await conn.exec_driver_sql(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        await store.close()


def _diff(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_postgres_migrations_match_models(pg_store: Storage) -> None:
    async with pg_store.engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


async def test_postgres_full_flow(pg_store: Storage) -> None:
    store = pg_store
    photo = await store.record_photo(
        b"pg photo", width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=7
    )
    again = await store.record_photo(
        b"pg photo", width=1, height=1, telegram_file_unique_id="u", sender_telegram_id=8
    )
    assert again.id == photo.id and not again.created
    caption = await store.record_caption(
        photo.id, model_version="m", text="a thing", score=0, beam_size=1, latency_ms=1,
        requester_telegram_id=7, chat_id=-(10**12), message_id=3,
    )  # fmt: skip
    assert (await store.find_caption_by_message(-(10**12), 3)) is not None
    vote = await store.record_vote(caption.id, 8, up=True)
    assert (vote.votes_up, vote.votes_down) == (1, 0)
    await store.start_correction(8, caption.id)
    with pytest.raises(CorrectionRejected):
        await store.record_correction(caption.id, 8, "a thing")
    await store.record_correction(caption.id, 8, "a better thing")
    assert len(await store.corrections_for_training(include_upvoted=True)) == 2
    await store.register_model_version("a", "/a", None, {"bleu": 0.2}, status="active")
    await store.register_model_version("b", "/b", "a", {})
    await store.promote_model_version("b")
    with pytest.raises(ModelVersionError):
        await store.reject_model_version("b", "no")
    stats = await store.stats()
    assert (stats.captions_per_day[-1].captions, stats.corrections, stats.active_model) == (1, 1, "b")
    report = await store.forget_person(7)
    assert (report.captions, report.photos) == (1, 0), "the photo stays: person 8 sent it too"


async def test_postgres_concurrent_writers(pg_store: Storage) -> None:
    photo = await pg_store.record_photo(
        b"p", width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=1
    )
    caption = await pg_store.record_caption(
        photo.id, model_version="m", text="t", score=0, beam_size=1, latency_ms=1, requester_telegram_id=1
    )

    async def writer(n: int) -> None:
        await pg_store.record_photo(
            b"same", width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=n
        )
        await pg_store.record_vote(caption.id, n, up=n % 2 == 0)

    await asyncio.gather(*(writer(100 + n) for n in range(30)))
    stats = await pg_store.stats()
    assert (stats.photos, stats.votes_up + stats.votes_down) == (2, 30)
