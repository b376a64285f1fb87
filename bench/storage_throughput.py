"""Throughput of ``Storage.record_caption`` on a temporary SQLite database.

    python bench/storage_throughput.py [--rows 2000] [--tasks 8]

Prints rows/s recording captions one after another, and with N concurrent tasks
sharing one Storage (the bot's situation: many chats, one process).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import Storage


async def _record(store: Storage, photo_id: int, count: int, requester: int) -> None:
    for i in range(count):
        await store.record_caption(
            photo_id,
            model_version="bench",
            text=f"a caption number {i}",
            score=-2.0,
            beam_size=3,
            latency_ms=40.0,
            requester_telegram_id=requester,
        )


async def measure(data_dir: Path, rows: int, tasks: int) -> tuple[float, float]:
    async with await Storage.open(data_dir=data_dir) as store:
        photo = await store.record_photo(
            b"bench photo", width=1, height=1, telegram_file_unique_id=None, sender_telegram_id=1
        )
        await _record(store, photo.id, 50, 1)  # warm the pool and caches
        start = time.perf_counter()
        await _record(store, photo.id, rows, 1)
        sequential = rows / (time.perf_counter() - start)
        per_task = rows // tasks
        start = time.perf_counter()
        await asyncio.gather(*(_record(store, photo.id, per_task, 100 + t) for t in range(tasks)))
        concurrent = per_task * tasks / (time.perf_counter() - start)
    return sequential, concurrent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sequential, concurrent = asyncio.run(measure(Path(tmp), args.rows, args.tasks))
    print(f"record_caption sequential: {sequential:8.0f} rows/s")
    print(f"record_caption {args.tasks} tasks:   {concurrent:8.0f} rows/s")


if __name__ == "__main__":
    main()
