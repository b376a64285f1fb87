"""End-to-end latency of the bot for one photo: update received -> caption sent, against the bare caption call.

Runs the real bot (Application + worker process) in-process against the tests' fake Bot API server
on 127.0.0.1 and sends photos one at a time (idle queue). For each photo, in the same run:

* through the bot: the time from the moment getUpdates handed the photo to the bot until the
  bot's message with the caption arrived (download, checks, storage, queue notice logic, replies);
* baseline: the same photo bytes straight to the bot's own caption service (the same worker and
  model, no Telegram, no storage), just before.

Reported: p50/p90 of both and the overhead ratio (bot p50 / direct p50). Results go to
bench/results/bot_latency.json.

    python bench/bot_latency.py                       # the bundled model, or a tiny one if none
    python bench/bot_latency.py --model runs/best --photos 20 --size 1280x960
    python bench/bot_latency.py --tiny --photos 2 --warmup 1   # a tiny random model (plumbing only)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, Run, latency_summary_ms, start_run, write_result  # noqa: E402
from bot.app import CaptionBot  # noqa: E402
from captioner.checkpoint import DEFAULT_MODEL_DIR  # noqa: E402
from captioner.serving.base import CaptionService  # noqa: E402
from common.settings import Settings  # noqa: E402
from tests.fake_telegram import FakeTelegram  # noqa: E402
from tests.helpers import photo_bytes  # noqa: E402

TOKEN = "7000001:AAF-fake-token-For_Bench_0123456789"
IDLE_SECONDS = 0.3  # between requests, so that no photo shares a batch with the previous one


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
    parser.add_argument("--out", type=Path, default=RESULTS / "bot_latency.json")
    return parser.parse_args(argv)


async def caption_directly(service: CaptionService, photo: bytes, beam: int | None) -> float:
    """The baseline: the same photo straight to the bot's caption service (same worker, no Telegram)."""
    started = time.perf_counter()
    await service.caption(photo, beam_size=beam)
    return time.perf_counter() - started


def summary(seconds: list[float]) -> dict[str, float]:
    return {**latency_summary_ms(seconds), "mean_ms": round(statistics.fmean(seconds) * 1000, 1)}


async def measure(args: argparse.Namespace, run: Run) -> dict[str, object]:
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
        run.started("fake Bot API server (tests/fake_telegram.py) in this process on 127.0.0.1")
        settings = Settings(
            token=TOKEN, base_url=fake.base_url, base_file_url=fake.base_file_url, data_dir=tmp / "data",
            model=model, device=args.device, worker_threads=args.threads, beam_size=args.beam,
            photos_per_minute=0, model_poll_seconds=0,
        )
        started = time.monotonic()
        bot = CaptionBot(settings)
        await bot.start()
        run.started("the bot (CaptionBot) in this process, with its caption worker process and SQLite database")
        start_seconds = time.monotonic() - started
        assert bot.service is not None
        version = bot.service.model_version
        person = fake.person(4242, "Bench")
        through_bot: list[float] = []
        direct: list[float] = []
        captions: list[str] = []
        try:
            for i in range(args.warmup + args.photos):
                data = photo_bytes(i, size=(width, height))
                await asyncio.sleep(IDLE_SECONDS)  # an idle queue: no batching with the previous photo
                bare = await caption_directly(bot.service, data, args.beam)
                await asyncio.sleep(IDLE_SECONDS)
                photo = await person.photo(data)
                [answer] = await fake.wait_reply(photo, timeout=300)
                if i >= args.warmup:
                    direct.append(bare)
                    through_bot.append(fake.latency(photo, answer))
                    captions.append(answer["text"])
        finally:
            await bot.stop()
            await fake.close()
    bot_summary, direct_summary = summary(through_bot), summary(direct)
    return {
        "context": run.context(args.device),
        "model": version,
        "photo": f"{width}x{height} JPEG",
        "beam_size": args.beam if args.beam is not None else "the model's",
        "worker_threads": args.threads if args.threads is not None else "torch's default",
        "start_seconds": round(start_seconds, 1),
        "through_bot": bot_summary,
        "caption_service_directly": direct_summary,
        "overhead_ratio_p50": round(bot_summary["p50_ms"] / direct_summary["p50_ms"], 2),
        "overhead_ms_p50": round(bot_summary["p50_ms"] - direct_summary["p50_ms"], 1),
        "example_caption": captions[0] if captions else "",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = start_run(None if argv is None else ["bench/bot_latency.py", *argv])
    result = asyncio.run(measure(args, run))
    width = max(len(key) for key in result)
    for key, value in result.items():
        if key != "context":
            print(f"{key:<{width}}  {value}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
