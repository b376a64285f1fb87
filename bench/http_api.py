"""What the HTTP API costs on top of the caption service it serves.

One ProcessCaptionService (the embedded worker) serves both paths in the same run:

* through HTTP: ``POST /v1/captions`` (raw JPEG body, a real API key) to ``create_app`` served by
  uvicorn on 127.0.0.1, from an aiohttp client;
* baseline: the same photo bytes straight to ``service.caption`` (no HTTP, no keys).

Measured: one request at a time on an idle queue (p50/p90 latency of both and the overhead ratio),
then a burst of ``--requests`` photos from ``--callers`` concurrent callers each way (photos/s and
the ratio; two rounds each way, alternating, the better of each), and whether the captions are
identical. Results go to bench/results/http_api.json.

    python bench/http_api.py                        # the bundled model
    python bench/http_api.py --tiny --photos 2 --requests 8 --callers 4   # a tiny random model (plumbing)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import uvicorn  # noqa: E402

from bench.report import RESULTS, Run, latency_summary_ms, start_run, write_result  # noqa: E402
from captioner.checkpoint import DEFAULT_MODEL_DIR  # noqa: E402
from captioner.serving.config import ServiceConfig  # noqa: E402
from captioner.serving.http import create_app  # noqa: E402
from captioner.serving.keys import ApiKeys  # noqa: E402
from captioner.serving.process import ProcessCaptionService  # noqa: E402
from tests.helpers import photo_bytes  # noqa: E402

IDLE_SECONDS = 0.2  # between single requests, so that none shares a batch with the previous one


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the worker")
    parser.add_argument("--photos", type=int, default=10, help="single requests each way")
    parser.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    parser.add_argument("--requests", type=int, default=64, help="photos in the concurrent burst")
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers in the burst")
    parser.add_argument("--size", default="500x375", help="photo size WxH (JPEG)")
    parser.add_argument("--out", type=Path, default=RESULTS / "http_api.json")
    return parser.parse_args(argv)


class ThreadServer:
    """uvicorn on a free loopback port, in its own thread and event loop."""

    def __init__(self, app: Any) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()


async def timed(call: Callable[[bytes], Awaitable[str]], photo: bytes) -> tuple[float, str]:
    started = time.perf_counter()
    caption = await call(photo)
    return time.perf_counter() - started, caption


async def burst(call: Callable[[bytes], Awaitable[str]], photos: list[bytes], callers: int) -> tuple[float, list[str]]:
    """Photos/s and the captions (in photo order) for ``photos`` sent by ``callers`` concurrent callers."""
    captions: list[str] = [""] * len(photos)
    cursor = iter(range(len(photos)))

    async def caller() -> None:
        for index in cursor:
            captions[index] = await call(photos[index])

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(photos) / (time.perf_counter() - started), captions


def summary(seconds: list[float]) -> dict[str, float]:
    return {**latency_summary_ms(seconds), "mean_ms": round(statistics.fmean(seconds) * 1000, 1)}


async def measure(args: argparse.Namespace, run: Run, tmp: Path) -> dict[str, Any]:
    width, height = (int(v) for v in args.size.lower().split("x"))
    model = args.model
    if args.tiny or (model is None and not (DEFAULT_MODEL_DIR / "model.json").exists()):
        from tests.bot_support import fast_checkpoint

        model = str(fast_checkpoint(tmp / "tiny"))
    keys = ApiKeys(tmp / "api_keys.json")
    _, secret = keys.create("bench")
    # The burst must not be refused: a queue that holds it, a rate limit it never reaches.
    service = ProcessCaptionService(ServiceConfig(checkpoint=model, device=args.device, threads=args.threads,
                                                  queue_capacity=max(64, args.requests)))
    await service.start()
    run.started("caption worker process (ProcessCaptionService)")
    server = ThreadServer(create_app(service, keys, requests_per_minute=1_000_000))
    run.started("uvicorn serving the HTTP API in a thread of this process, on 127.0.0.1")
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "image/jpeg"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:

            async def over_http(photo: bytes) -> str:
                async with session.post(f"{server.url}/v1/captions", data=photo) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {body}")
                    return str(body["caption"])

            async def directly(photo: bytes) -> str:
                return (await service.caption(photo)).text

            single_http: list[float] = []
            single_direct: list[float] = []
            single_same = 0
            for i in range(args.warmup + args.photos):
                photo = photo_bytes(i, size=(width, height))
                await asyncio.sleep(IDLE_SECONDS)
                bare, expected = await timed(directly, photo)
                await asyncio.sleep(IDLE_SECONDS)
                through, got = await timed(over_http, photo)
                if i >= args.warmup:
                    single_direct.append(bare)
                    single_http.append(through)
                    single_same += got == expected
            photos = [photo_bytes(1000 + i, size=(width, height)) for i in range(args.requests)]
            # Two rounds each way, alternating, the better of each: the first burst also warms the worker.
            direct_rates, http_rates = [], []
            for _ in range(2):
                rate, direct_captions = await burst(directly, photos, args.callers)
                direct_rates.append(rate)
                rate, http_captions = await burst(over_http, photos, args.callers)
                http_rates.append(rate)
            direct_rate, http_rate = max(direct_rates), max(http_rates)
    finally:
        server.stop()
        await service.close()
    http_summary, direct_summary = summary(single_http), summary(single_direct)
    return {
        "context": run.context(args.device),
        "model": service.model_version,
        "photo": f"{width}x{height} JPEG",
        "single_request": {
            "through_http": http_summary, "caption_service_directly": direct_summary,
            "overhead_ratio_p50": round(http_summary["p50_ms"] / direct_summary["p50_ms"], 3),
            "overhead_ms_p50": round(http_summary["p50_ms"] - direct_summary["p50_ms"], 1),
            "identical_captions": f"{single_same}/{args.photos}",
        },
        "burst": {
            "requests": args.requests, "callers": args.callers,
            "through_http_photos_per_second": round(http_rate, 2),
            "directly_photos_per_second": round(direct_rate, 2),
            "ratio_http_over_direct": round(http_rate / direct_rate, 3),
            "rounds_photos_per_second": {"through_http": [round(r, 2) for r in http_rates],
                                         "directly": [round(r, 2) for r in direct_rates]},
            "identical_captions": f"{sum(a == b for a, b in zip(http_captions, direct_captions, strict=True))}"
                                  f"/{args.requests}",
        },
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run = start_run(None if argv is None else ["bench/http_api.py", *argv])
    with tempfile.TemporaryDirectory(prefix="http-api-") as tmp:
        result = asyncio.run(measure(args, run, Path(tmp)))
    for key, value in result.items():
        if key != "context":
            print(f"{key}: {value}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
