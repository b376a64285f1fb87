"""Throughput of ``Storage.record_caption`` on a temporary SQLite database, against a bare INSERT.

    python bench/storage_throughput.py [--rows 2000] [--tasks 8] [--out bench/results/storage_throughput.json]

* storage: rows/s recording captions one after another through the ``Storage`` front (one
  transaction per caption: it checks the photo, finds or creates the person, inserts, returns a
  record), and with ``--tasks`` concurrent tasks sharing one Storage (the bot's situation: many
  chats, one process);
* baseline, in the same run and the same database file: the same row (copied from the last one
  Storage wrote) inserted with the raw ``sqlite3`` module, one transaction per row, with the
  connection settings read from Storage's own connection (synchronous, busy timeout, foreign keys);
  sequentially, and from ``--tasks`` threads each with its own connection.

Reported: rows/s of each, per-row latency of the sequential runs, and how many times slower the
front is than the bare INSERT. A smoke run: ``--rows 40 --tasks 2``.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, Run, latency_summary_ms, start_run, write_result  # noqa: E402
from storage import Storage  # noqa: E402

WARMUP_ROWS = 50
# Per-connection settings that decide what a commit costs; read from Storage's connection.
CONNECTION_PRAGMAS = ("synchronous", "busy_timeout", "foreign_keys")


async def _record(store: Storage, photo_id: int, count: int, requester: int) -> list[float]:
    """Record ``count`` captions one after another; each call's seconds."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        await store.record_caption(
            photo_id,
            model_version="bench",
            text=f"a caption number {i}",
            score=-2.0,
            beam_size=3,
            latency_ms=40.0,
            requester_telegram_id=requester,
        )
        times.append(time.perf_counter() - started)
    return times


async def storage_pragmas(store: Storage) -> dict[str, Any]:
    async with store.engine.connect() as connection:
        return {name: (await connection.exec_driver_sql(f"PRAGMA {name}")).scalar()
                for name in CONNECTION_PRAGMAS}


class BareInsert:
    """The same caption row inserted with the raw sqlite3 module, one transaction per row."""

    def __init__(self, database: Path, pragmas: dict[str, Any]) -> None:
        self.database, self.pragmas = database, pragmas
        with self.connect() as connection:
            cursor = connection.execute("SELECT * FROM captions ORDER BY id DESC LIMIT 1")
            row = cursor.fetchone()
            columns = [d[0] for d in cursor.description if d[0] != "id"]
            self.values = tuple(value for d, value in zip(cursor.description, row, strict=True) if d[0] != "id")
        self.sql = f"INSERT INTO captions ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.database, isolation_level=None, check_same_thread=False)
        for name, value in self.pragmas.items():
            connection.execute(f"PRAGMA {name}={value}")
        return connection

    def insert(self, count: int) -> list[float]:
        times = []
        connection = self.connect()
        try:
            for _ in range(count):
                started = time.perf_counter()
                connection.execute("BEGIN IMMEDIATE")
                connection.execute(self.sql, self.values)
                connection.execute("COMMIT")
                times.append(time.perf_counter() - started)
        finally:
            connection.close()
        return times


async def timed_rate(work: Callable[[], Awaitable[object]], rows: int) -> float:
    started = time.perf_counter()
    await work()
    return rows / (time.perf_counter() - started)


async def measure(data_dir: Path, rows: int, tasks: int) -> dict[str, Any]:
    database = data_dir / "bench.db"
    async with await Storage.open(f"sqlite+aiosqlite:///{database}", data_dir=data_dir) as store:
        photo = await store.record_photo(
            b"bench photo", width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=1
        )
        await _record(store, photo.id, WARMUP_ROWS, 1)  # warm the pool and caches
        pragmas = await storage_pragmas(store)
        bare = BareInsert(database, pragmas)
        bare.insert(WARMUP_ROWS)
        per_task = max(1, rows // tasks)

        storage_times = await _record(store, photo.id, rows, 1)
        storage_concurrent = await timed_rate(lambda: asyncio.gather(
            *(_record(store, photo.id, per_task, 100 + t) for t in range(tasks))), per_task * tasks)
        bare_times = bare.insert(rows)
        bare_concurrent = await timed_rate(lambda: asyncio.gather(
            *(asyncio.to_thread(bare.insert, per_task) for _ in range(tasks))), per_task * tasks)

    storage_rate, bare_rate = rows / sum(storage_times), rows / sum(bare_times)
    return {
        "database": "SQLite (temporary file)", "rows": rows, "tasks": tasks, "rows_per_task": per_task,
        "connection_pragmas": pragmas,
        "storage": {"sequential_rows_per_second": round(storage_rate, 1),
                    "concurrent_rows_per_second": round(storage_concurrent, 1),
                    "sequential_latency": latency_summary_ms(storage_times)},
        "bare_insert": {"sequential_rows_per_second": round(bare_rate, 1),
                        "concurrent_rows_per_second": round(bare_concurrent, 1),
                        "sequential_latency": latency_summary_ms(bare_times)},
        "slowdown_sequential": round(bare_rate / storage_rate, 2),
        "slowdown_concurrent": round(bare_concurrent / storage_concurrent, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "storage_throughput.json")
    args = parser.parse_args(argv)
    run: Run = start_run(None if argv is None else ["bench/storage_throughput.py", *argv])
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        result = asyncio.run(measure(Path(tmp), args.rows, args.tasks))
    storage, bare = result["storage"], result["bare_insert"]
    print(f"record_caption sequential: {storage['sequential_rows_per_second']:8.0f} rows/s; "
          f"bare INSERT {bare['sequential_rows_per_second']:8.0f} rows/s ({result['slowdown_sequential']}x)")
    print(f"record_caption {args.tasks} tasks:   {storage['concurrent_rows_per_second']:8.0f} rows/s; "
          f"bare INSERT {bare['concurrent_rows_per_second']:8.0f} rows/s ({result['slowdown_concurrent']}x)")
    write_result(args.out, {"context": run.context("cpu"), **result})


if __name__ == "__main__":
    main()
