"""End-to-end latency of the bot for one photo: update received -> caption sent.

Runs the real bot (Application + worker process) in-process against the tests' fake Bot API server
on 127.0.0.1, sends photos one at a time (idle queue) and reports, per photo, the time from the
moment getUpdates handed the photo to the bot until the bot's sendMessage with the caption arrived.

    python bench/bot_latency.py                       # the bundled model, or a tiny one if none
    python bench/bot_latency.py --model runs/best --photos 20 --size 1280x960
    python bench/bot_latency.py --tiny                # a tiny random model (plumbing only)

Run from the repository root (it imports tests/fake_telegram.py). Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bot.app import CaptionBot  # noqa: E402
from captioner.checkpoint import DEFAULT_MODEL_DIR  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.fake_telegram import FakeTelegram  # noqa: E402
from tests.helpers import photo_bytes  # noqa: E402

TOKEN = "7000001:AAF-fake-token-For_Bench_0123456789"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--photos", type=int, default=10, help="photos to send, one at a time")
    parser.add_argument("--warmup", type=int, default=2, help="photos sent first and not counted")
    parser.add_argument("--size", default="800x600", help="photo size WxH (a JPEG, as Telegram compresses)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the worker")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the model's)")
    parser.add_argument("--verbose", action="store_true", help="show the bot's log")
    return parser.parse_args(argv)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="bot-latency-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if args.tiny or (model is None and not (DEFAULT_MODEL_DIR / "model.json").exists()):
            from tests.bot_support import fast_checkpoint

            model = str(fast_checkpoint(tmp / "tiny"))
            print("using a tiny random model" + ("" if args.tiny else " (no bundled model found)"))
        fake = FakeTelegram(TOKEN)
        await fake.start()
        settings = Settings(
            token=TOKEN, base_url=fake.base_url, base_file_url=fake.base_file_url, data_dir=tmp / "data",
            model=model, device=args.device, worker_threads=args.threads, beam_size=args.beam,
            photos_per_minute=0, model_poll_seconds=0,
        )
        started = time.monotonic()
        bot = CaptionBot(settings)
        await bot.start()
        start_seconds = time.monotonic() - started
        assert bot.service is not None
        version = bot.service.model_version
        person = fake.person(4242, "Bench")
        samples: list[float] = []
        captions: list[str] = []
        try:
            for i in range(args.warmup + args.photos):
                await asyncio.sleep(0.3)  # an idle queue: no batching with the previous photo
                photo = await person.photo(photo_bytes(i, size=(width, height)))
                [answer] = await fake.wait_reply(photo, timeout=300)
                if i >= args.warmup:
                    samples.append(fake.latency(photo, answer))
                    captions.append(answer["text"])
        finally:
            await bot.stop()
            await fake.close()
    samples_ms = sorted(s * 1000 for s in samples)
    return {
        "model": version,
        "device": args.device,
        "photo": f"{width}x{height} JPEG",
        "photos": len(samples_ms),
        "start_seconds": round(start_seconds, 1),
        "median_ms": round(statistics.median(samples_ms), 1),
        "p90_ms": round(samples_ms[min(len(samples_ms) - 1, int(0.9 * len(samples_ms)))], 1),
        "min_ms": round(samples_ms[0], 1),
        "max_ms": round(samples_ms[-1], 1),
        "example_caption": captions[0] if captions else "",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = asyncio.run(measure(args))
    width = max(len(key) for key in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
