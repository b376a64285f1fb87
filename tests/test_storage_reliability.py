"""Reliability: many concurrent writers on one SQLite file, and a writer killed mid-burst."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import storage.engine
from storage import CorrectionRejected, Storage

REPO = Path(__file__).resolve().parents[1]
WRITERS = 50
ROUNDS = 2
ENGINES = 5


@pytest.fixture(autouse=True)
def _no_env_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CAPTIONBOT_DATA_DIR", raising=False)


def _own_photo(writer: int, round_: int) -> bytes:
    return f"photo of writer {writer} round {round_}".encode() * 50


async def _writer(store: Storage, writer: int, shared_caption_id: int, shared_photo: bytes) -> None:
    """One writer: photos (one shared by all, one of its own), captions, votes, corrections."""
    person = 10_000 + writer
    await store.upsert_person(person, "en")
    for round_ in range(ROUNDS):
        shared = await store.record_photo(
            shared_photo, width=1, height=1, telegram_file_unique_id="shared", sender_telegram_id=person
        )
        own = await store.record_photo(
            _own_photo(writer, round_),
            width=2,
            height=2,
            telegram_file_unique_id=None,
            sender_telegram_id=person,
        )
        caption = await store.record_caption(
            own.id,
            model_version="m",
            text=f"caption {writer} {round_}",
            score=-1.0,
            beam_size=3,
            latency_ms=5.0,
            requester_telegram_id=person,
        )
        await store.record_caption(
            shared.id,
            model_version="m",
            text="shared caption",
            score=-1.0,
            beam_size=3,
            latency_ms=5.0,
            requester_telegram_id=person,
        )
        await store.record_vote(shared_caption_id, person, up=round_ % 2 == 0)
        await store.record_vote(caption.id, person + 1, up=True)
        await store.start_correction(person, shared_caption_id)
        await store.record_correction(shared_caption_id, person, f"writer {writer} says round {round_}")


def _count(db: Path, sql: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute(sql).fetchone()[0])


@pytest.mark.parametrize(
    "busy_timeout_ms", [storage.engine.BUSY_TIMEOUT_MS, 0], ids=["busy-wait", "retry-only"]
)
async def test_fifty_concurrent_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, busy_timeout_ms: int
) -> None:
    """No 'database is locked' reaches the caller, no row is lost, no photo is stored twice.

    With busy_timeout=0 SQLite fails at once on every lock conflict, so the
    service-layer retry alone has to absorb them.
    """
    pragmas = tuple(
        f"PRAGMA busy_timeout={busy_timeout_ms}" if p.startswith("PRAGMA busy_timeout") else p
        for p in storage.engine.SQLITE_PRAGMAS
    )
    monkeypatch.setattr(storage.engine, "SQLITE_PRAGMAS", pragmas)
    setup = await Storage.open(data_dir=tmp_path)
    shared_photo = b"the shared photo" * 100
    photo = await setup.record_photo(
        shared_photo, width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=1
    )
    shared_caption = await setup.record_caption(
        photo.id,
        model_version="m",
        text="a shared caption",
        score=0,
        beam_size=1,
        latency_ms=1,
        requester_telegram_id=1,
    )
    stores = [setup] + [await Storage.open(data_dir=tmp_path) for _ in range(ENGINES - 1)]
    try:
        results = await asyncio.gather(
            *(_writer(stores[w % ENGINES], w, shared_caption.id, shared_photo) for w in range(WRITERS)),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == [], errors[:3]
        if busy_timeout_ms == 0:
            assert sum(s.lock_retries for s in stores) > 0, "the retry path was not exercised"
        stats = await setup.stats()
    finally:
        await asyncio.gather(*(s.close() for s in stores))

    db = tmp_path / "captionbot.db"
    assert stats.photos == 1 + WRITERS * ROUNDS
    assert _count(db, "SELECT COUNT(*) FROM photos") == _count(
        db, "SELECT COUNT(DISTINCT sha256) FROM photos"
    )
    assert _count(db, f"SELECT COUNT(*) FROM photo_senders WHERE photo_id = {photo.id}") == 1 + WRITERS
    assert stats.captions == 1 + 2 * WRITERS * ROUNDS
    assert _count(db, f"SELECT COUNT(*) FROM votes WHERE caption_id = {shared_caption.id}") == WRITERS
    assert stats.votes_up + stats.votes_down == WRITERS + WRITERS * ROUNDS
    # One live correction per person and caption: each writer's later rounds replaced its first.
    assert stats.corrections == WRITERS
    assert _count(db, "SELECT COUNT(*) FROM pending_corrections") == 0
    assert stats.people == 1 + WRITERS + 1  # voters are person + 1: only the last is new
    photo_files = list((tmp_path / "photos").glob("*/*"))
    assert len(photo_files) == stats.photos, "one file per photo, no temp files"


WRITER_SCRIPT = r"""
import asyncio, os, sys
from pathlib import Path
from storage import Storage
from storage.screening import EntryPolicy

async def task(store, worker):
    i = 0
    while True:
        person = 500 + worker
        data = os.urandom(256 * 1024)
        photo = await store.record_photo(data, width=8, height=8, telegram_file_unique_id=None,
                                         sender_telegram_id=person)
        caption = await store.record_caption(photo.id, model_version="m", text=f"caption {worker} {i}",
                                             score=0.0, beam_size=1, latency_ms=1.0,
                                             requester_telegram_id=person)
        vote = await store.record_vote(caption.id, 900 + i % 3, up=True)
        correction = await store.record_correction(caption.id, person, f"corrected text {worker} {i}")
        print(f"{photo.id} {photo.sha256} {caption.id} {correction.id}", flush=True)
        i += 1

async def main():
    # a storm of writes from four people: no daily cap here
    store = await Storage.open(data_dir=Path(sys.argv[1]), policy=EntryPolicy(daily_cap=0))
    print("ready", flush=True)
    await asyncio.gather(*(task(store, w) for w in range(4)))

asyncio.run(main())
"""


def _run_writer_and_kill(data_dir: Path, script: Path, committed_target: int) -> list[list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines: list[list[str]] = []
    deadline = time.monotonic() + 45
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        while len(lines) < committed_target and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.split())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert len(lines) >= 20, "the writer made too little progress before the kill"
    return lines


async def test_sigkill_mid_burst_loses_nothing_committed(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SCRIPT)
    data_dir = tmp_path / "data"
    committed = _run_writer_and_kill(data_dir, script, committed_target=120)

    db = data_dir / "captionbot.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        photos = dict(conn.execute("SELECT id, sha256 FROM photos").fetchall())
        paths = conn.execute("SELECT sha256, rel_path FROM photos").fetchall()
        captions = {row[0] for row in conn.execute("SELECT id FROM captions")}
        corrections = {row[0] for row in conn.execute("SELECT id FROM corrections")}

    for photo_id, sha, caption_id, correction_id in committed:
        assert photos.get(int(photo_id)) == sha
        assert int(caption_id) in captions and int(correction_id) in corrections
    for sha, rel_path in paths:
        path = data_dir / "photos" / rel_path
        assert path.is_file(), f"row references missing file {rel_path}"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, f"half-written file {rel_path}"
    for path in (data_dir / "photos").glob("*/*.jpg"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.stem, "a final-named file is incomplete"

    async with await Storage.open(data_dir=data_dir) as store:
        caption = await store.get_caption(int(committed[-1][2]))
        assert caption is not None
        photo = await store.record_photo(
            b"after the crash", width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=1
        )
        assert photo.created
        with pytest.raises(CorrectionRejected):
            await store.record_correction(caption.id, 1, caption.text)
