"""Time to the first reply (busy, slow down, queue notice or caption) for a burst of photos from
many people, with the bot's DEFAULT settings (issue 12: overload gets words, not silence).

Runs the real bot (Application + worker process) in-process against the tests' fake Bot API on
127.0.0.1. ``--people`` people each send ``--per-person`` photos, all at once; for each photo the
time from getUpdates handing it to the bot to the bot's first message quoting it. Only the token,
the fake server's URLs, a scratch data folder, the model, the device and the worker's threads
are set; every limit (photos per minute, photos in flight, queue, concurrent updates) is the
default. Results go to bench/results/bot_burst.json.

    python bench/bot_burst.py --people 50 --per-person 10            # 500 photos, the bundled model
    python bench/bot_burst.py --tiny --people 10 --per-person 5      # a tiny random model
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, latency_summary_ms, start_run, write_result  # noqa: E402
from bot.app import CaptionBot  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.fake_telegram import FakeTelegram  # noqa: E402
from tests.helpers import photo_bytes  # noqa: E402

TOKEN = "7000001:AAF-fake-token-For_Bench_0123456789"
# A caption starts with 📷, or with 🤔 when the model is unsure (bot/texts.py words it with a hedge).
KINDS = {"📷": "caption", "🤔": "unsure caption", "⏳": "queue notice", "🐢": "slow down", "😮": "busy"}


def first_replies(fake: FakeTelegram, photos: list[dict[str, Any]]) -> list[tuple[float, str]]:
    """(seconds from delivery to the bot's first message quoting the photo, what it was) per photo."""
    first: dict[tuple[int, int], tuple[float, str]] = {}
    for call in fake.calls:
        result = call.result
        if call.method != "sendMessage" or not isinstance(result, dict) or "reply_to_message" not in result:
            continue
        key = (result["chat"]["id"], result["reply_to_message"]["message_id"])
        if key not in first:
            first[key] = (call.at, KINDS.get(result["text"][:1], "other: " + result["text"][:30]))
    out = []
    for photo in photos:
        key = (photo["chat"]["id"], photo["message_id"])
        sent_at, kind = first[key]
        out.append((sent_at - fake.delivered_at[fake.update_of[key]], kind))
    return out


async def burst(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        model = args.model
        if args.tiny:
            from tests.bot_support import fast_checkpoint

            model = str(fast_checkpoint(tmp / "tiny"))
        fake = FakeTelegram(TOKEN)
        await fake.start()
        settings = Settings(token=TOKEN, base_url=fake.base_url, base_file_url=fake.base_file_url,
                            data_dir=tmp / "data", model=model, device=args.device,
                            worker_threads=args.threads, model_poll_seconds=0)
        bot = CaptionBot(settings)
        await bot.start()
        try:
            people = [fake.person(10_000 + i, f"P{i}") for i in range(args.people)]
            data = [photo_bytes(i, size=(320, 240)) for i in range(args.per_person)]
            started = time.monotonic()
            sent = await asyncio.gather(*(asyncio.gather(*(p.photo(d) for d in data)) for p in people))
            photos = [photo for group in sent for photo in group]
            for photo in photos:
                await fake.wait_reply(photo, timeout=args.timeout, final=False)
            replies = first_replies(fake, photos)
            wall = time.monotonic() - started
        finally:
            await bot.stop()
            await fake.close()
    kinds = Counter(kind for _, kind in replies)
    return {
        "people": args.people, "photos_per_person": args.per_person, "photos": len(photos),
        "model": "tiny random model" if args.tiny else (args.model or "bundled"),
        "first_reply_ms": latency_summary_ms([s for s, _ in replies]),
        "first_reply_kinds": dict(kinds),
        "first_reply_ms_by_kind": {kind: latency_summary_ms([s for s, k in replies if k == kind])
                                   for kind in kinds},
        "seconds_until_every_photo_had_a_reply": round(wall, 2),
        "settings": {"photos_per_minute": settings.photos_per_minute,
                     "photos_in_flight": settings.photos_in_flight,
                     "concurrent_updates": settings.concurrent_updates,
                     "queue_capacity": "default (captioner ServiceConfig)"},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (the bot's plumbing only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the worker")
    parser.add_argument("--people", type=int, default=50)
    parser.add_argument("--per-person", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each reply")
    parser.add_argument("--out", type=Path, default=RESULTS / "bot_burst.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run = start_run(None if argv is None else ["bench/bot_burst.py", *argv])
    result = asyncio.run(burst(args))
    print(f"{result['photos']} photos from {result['people']} people: first reply "
          f"p50 {result['first_reply_ms']['p50_ms']:.0f} ms, p95 {result['first_reply_ms']['p95_ms']:.0f} ms; "
          f"kinds {result['first_reply_kinds']}")
    write_result(args.out, {"context": run.context(args.device), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
