"""The caption worker against one photo at a time: throughput, latency, identical captions.

    python bench/worker.py [--device auto] [--callers 1,8,64,256] [--photos 64] [--beam 3]
                           [--threads 1] [--sweep 4,8,16,32] [--checkpoint DIR]
                           [--out bench/results/worker.json]

* worker, at each number of concurrent callers (``--callers``): ``max(--photos, 2 x callers)``
  requests (the ``--photos`` distinct photos, cycled) through ProcessCaptionService with its
  default settings for the device (batch size and wait resolved by the worker, admission by
  seconds of work, a decoding pool). A caller told the queue is full (QueueFullError, the bot's
  "busy" answer) waits the service's estimated wait (at least 50 ms) and sends the photo again,
  as a person told "busy" does; busy answers are counted, and a photo's latency includes them.
  Each level reports photos/s, p50/p95 latency and the ratio to one photo at a time;
* baseline: the photos one at a time in this process, as a tutorial caption script does
  (decode + preprocess + encode + beam search per photo, in a loop), with the encoder the worker
  serves (``Captioner.freeze_encoder``: TorchScript-frozen on CPU), so the ratio is the worker's
  own: batching and decoding beside compute;
* freezing: the same one-photo-at-a-time loop with the eager encoder, interleaved photo by photo
  with the frozen one: what freezing alone gives at batch 1;
* single request: one photo through the idle worker vs a bare in-process call (interleaved);
* identical captions: the worker's caption of each photo equals the baseline's;
* ``--sweep``: a fresh worker per batch size, at ``--sweep-callers`` callers: how the CPU default
  batch size in captioner/serving/config.py was chosen.

Photos come from ../shared/data/flickr8k/images when present (generated otherwise). The model is
captioner/default_model when present; otherwise a model with the default configuration
(EfficientNet-Lite0 with its ImageNet weights, 512-d decoder, ~2,500-word vocabulary) and a
random decoder, which is as slow as a trained one or slower (its captions never end early).
Both sides use the same torch thread count (``--threads``, default 1); the worker also has its
decoding threads (one per core). The baseline is also sampled with torch's default thread count
(``--single`` photos), and ``throughput_ratio`` is taken against the faster of the two
baselines. A tiny smoke run: ``--callers 1,6 --photos 8 --single 2 --checkpoint <a tiny checkpoint>``.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import RESULTS, Run, percentile, relative, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.beam import BeamConfig  # noqa: E402
from captioner.checkpoint import DEFAULT_MODEL_DIR, META_FILE, CaptionModel  # noqa: E402
from captioner.inference import Captioner  # noqa: E402
from captioner.model import ModelConfig  # noqa: E402
from captioner.result import CaptionResult  # noqa: E402
from captioner.serving.base import QueueFullError  # noqa: E402
from captioner.serving.config import ServiceConfig  # noqa: E402
from captioner.serving.process import ProcessCaptionService  # noqa: E402
from captioner.vocab import SPECIAL_TOKENS, Vocabulary  # noqa: E402
from tests.helpers import SHARED_FLICKR8K, photo_bytes  # noqa: E402

VOCAB_SIZE = 2500
MIN_BACKOFF_SECONDS = 0.05
MAX_BACKOFF_SECONDS = 2.0


def prepare_model(workdir: Path, explicit: str | None) -> tuple[str | None, str]:
    """(checkpoint path or None for the bundled model, description)."""
    if explicit:
        return explicit, f"checkpoint {relative(explicit)}"
    if (DEFAULT_MODEL_DIR / META_FILE).is_file():
        return None, "the bundled default model (captioner/default_model)"
    captions_file = SHARED_FLICKR8K / "captions.txt"
    if captions_file.is_file():
        lines = captions_file.read_text().splitlines()[1:]
        vocab = Vocabulary.build((line.split(",", 1)[1] for line in lines if "," in line),
                                 min_freq=5, max_size=VOCAB_SIZE)
        source = "Flickr8k captions, min_freq 5"
    else:
        vocab = Vocabulary([*SPECIAL_TOKENS, *(f"word{i}" for i in range(VOCAB_SIZE - len(SPECIAL_TOKENS)))])
        source = "synthetic words"
    torch.manual_seed(0)
    model = CaptionModel.create(ModelConfig(), vocab, {"version": "bench-random-decoder"})
    path = checkpoint.save(model, workdir / "bench-random-decoder")
    return str(path), (f"RANDOM-WEIGHT model (no captioner/default_model): default config, "
                       f"EfficientNet-Lite0 ImageNet encoder, random 512-d decoder, {len(vocab)}-word "
                       f"vocabulary ({source})")


def load_photos(count: int) -> tuple[list[bytes], str]:
    folder = SHARED_FLICKR8K / "images"
    names = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(names) >= count:
        step = len(names) // count
        return [names[i * step].read_bytes() for i in range(count)], f"Flickr8k photos from {relative(folder)}"
    return [photo_bytes(seed, size=(500, 375)) for seed in range(count)], "generated 500x375 JPEGs"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Caller:
    """Sends photos to the service as the bot does, and counts the service's busy answers."""

    service: ProcessCaptionService
    beam: int
    busy_answers: int = 0

    async def caption(self, photo: bytes) -> CaptionResult:
        while True:
            try:
                return await self.service.caption(photo, beam_size=self.beam)
            except QueueFullError:
                # The bot answers "busy" and the person sends the photo again: here after a short wait.
                self.busy_answers += 1
                wait = self.service.status().estimated_wait_seconds
                await asyncio.sleep(min(MAX_BACKOFF_SECONDS, max(MIN_BACKOFF_SECONDS, wait)))


def level_requests(photos: int, callers: int) -> int:
    """Requests at one level: every photo, and at least two per caller so each waits its turn."""
    return max(photos, 2 * callers)


async def through_worker(caller: Caller, photos: list[bytes], callers: int,
                         requests: int | None = None) -> tuple[list[CaptionResult], list[float], float]:
    """Each request's result (request i is photo i mod len(photos); default one request a photo)
    and latency (busy answers and retries included), and the wall time."""
    requests = len(photos) if requests is None else requests
    work: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        work.put_nowait(index)
    results: list[CaptionResult | None] = [None] * requests
    latencies: list[float] = [0.0] * requests

    async def one_caller() -> None:
        while not work.empty():
            index = work.get_nowait()
            started = time.perf_counter()
            results[index] = await caller.caption(photos[index % len(photos)])
            latencies[index] = time.perf_counter() - started

    started = time.perf_counter()
    await asyncio.gather(*(one_caller() for _ in range(callers)))
    wall = time.perf_counter() - started
    return [r for r in results if r is not None], latencies, wall


async def measure_level(caller: Caller, photos: list[bytes], callers: int) -> dict[str, Any]:
    """One level of concurrency: throughput, latency, batch sizes, busy answers, the captions."""
    caller.busy_answers = 0
    requests = level_requests(len(photos), callers)
    results, latencies, wall = await through_worker(caller, photos, callers, requests)
    sizes = Counter(r.batch_size for r in results)
    level = {"callers": callers, "requests": requests, "photos_per_second": round(requests / wall, 3),
             "wall_seconds": round(wall, 2), "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
             "latency_p95_ms": round(percentile(latencies, 95) * 1000, 1),
             "batch_sizes": {str(k): v for k, v in sorted(sizes.items())}, "busy_answers": caller.busy_answers,
             "captions": [r.text for r in results]}
    print(f"{callers:4d} callers: {requests / wall:7.2f} photos/s ({wall:.1f} s), latency p50 "
          f"{level['latency_p50_ms']:.0f} ms p95 {level['latency_p95_ms']:.0f} ms, batch sizes "
          f"{dict(sorted(sizes.items()))}, busy answers {caller.busy_answers}", flush=True)
    return level


async def sweep_batch_sizes(args: argparse.Namespace, model_path: str | None, photos: list[bytes],
                            threads: int) -> list[dict[str, Any]]:
    """A fresh worker per batch size (the device's default wait), at ``--sweep-callers`` callers."""
    rows = []
    for size in args.sweep:
        service = ProcessCaptionService(ServiceConfig(checkpoint=model_path, device=args.device, threads=threads,
                                                      request_timeout=3600, max_batch_size=size))
        await service.start()
        try:
            caller = Caller(service, args.beam)
            await asyncio.gather(*(caller.caption(p) for p in photos[: args.warmup]))
            print(f"sweep: max_batch_size {size}", end=" ", flush=True)
            level = await measure_level(caller, photos, args.sweep_callers)
        finally:
            await service.close()
        level.pop("captions")
        rows.append({"max_batch_size": size, **level})
    return rows


def timed_caption(captioner: Captioner, photo: bytes, beam: BeamConfig) -> tuple[Any, float]:
    """The in-process caption (``Captioner.caption_bytes``'s result) and its seconds."""
    started = time.perf_counter()
    caption = captioner.caption_bytes(photo, beam, attention=False)
    return caption, time.perf_counter() - started


def loop_summary(times: list[float]) -> dict[str, float]:
    """A one-photo-at-a-time loop's rate and per-photo latency."""
    return {"photos_per_second": round(len(times) / sum(times), 3), "wall_seconds": round(sum(times), 2),
            "per_photo_p50_ms": round(percentile(times, 50) * 1000, 1),
            "per_photo_p95_ms": round(percentile(times, 95) * 1000, 1)}


def frozen_and_eager_loops(frozen: Captioner, eager: Captioner, photos: list[bytes],
                           beam: BeamConfig) -> tuple[list[Any], list[float], list[Any], list[float]]:
    """Both loops photo by photo, alternating, so that drifting load hits them alike."""
    frozen_caps, frozen_times, eager_caps, eager_times = [], [], [], []
    for photo in photos:
        caption, seconds = timed_caption(frozen, photo, beam)
        frozen_caps.append(caption)
        frozen_times.append(seconds)
        caption, seconds = timed_caption(eager, photo, beam)
        eager_caps.append(caption)
        eager_times.append(seconds)
    return frozen_caps, frozen_times, eager_caps, eager_times


def default_threads_rate(captioner: Captioner, sample: list[bytes], beam: BeamConfig, threads: int,
                         default_threads: int) -> float:
    torch.set_num_threads(default_threads)
    try:
        captioner.caption_bytes(sample[0], beam, attention=False)  # warm-up at this thread count
        times = [timed_caption(captioner, photo, beam)[1] for photo in sample]
    finally:
        torch.set_num_threads(threads)
    return len(times) / sum(times)


async def single_requests(caller: Caller, captioner: Captioner, sample: list[bytes],
                          beam: BeamConfig) -> dict[str, Any]:
    """One photo at a time through the idle worker vs in this process, interleaved."""
    through, bare = [], []
    for photo in sample:
        started = time.perf_counter()
        await caller.caption(photo)
        through.append(time.perf_counter() - started)
        bare.append(timed_caption(captioner, photo, beam)[1])
    worker_ms, bare_ms = statistics.median(through) * 1000, statistics.median(bare) * 1000
    print(f"single request: worker {worker_ms:.0f} ms vs in-process {bare_ms:.0f} ms "
          f"(median of {len(through)}): {worker_ms / bare_ms:.2f}x")
    return {"worker_ms": round(worker_ms, 1), "in_process_ms": round(bare_ms, 1),
            "ratio": round(worker_ms / bare_ms, 3), "samples": len(through)}


def mismatches(first: list[str], second: list[str]) -> int:
    return sum(a != b for a, b in zip(first, second, strict=True))


async def bench(args: argparse.Namespace, run: Run) -> dict[str, Any]:
    default_threads = torch.get_num_threads()
    threads = args.threads or default_threads
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        model_path, model_note = prepare_model(Path(tmp), args.checkpoint)
        photos, photo_note = load_photos(args.photos)
        print(f"model:  {model_note}")
        print(f"photos: {len(photos)} {photo_note}; beam {args.beam}; callers {args.callers}; "
              f"torch threads {threads}; load average {run.load_average_before[0]:.1f}")

        config = ServiceConfig(checkpoint=model_path, device=args.device, threads=threads,
                               request_timeout=3600, queue_capacity=args.queue_capacity)
        service = ProcessCaptionService(config)
        started = time.perf_counter()
        await service.start()
        start_seconds = time.perf_counter() - started
        stats = service.stats()
        warm_per_photo = stats.per_image_seconds
        run.started(f"caption worker process (ProcessCaptionService, pid {stats.worker_pid})")
        print(f"worker: pid {stats.worker_pid} on {stats.device}, started in {start_seconds:.1f} s; batches of up "
              f"to {stats.max_batch_size}, wait {stats.max_wait_ms:g} ms, {stats.decode_threads} decoding "
              f"threads, warm-up {warm_per_photo * 1000:.1f} ms per photo")

        # The baseline serves the encoder the worker serves (the worker calls freeze_encoder too).
        captioner = Captioner.load(model_path, args.device)
        encoder_frozen = captioner.freeze_encoder()
        eager = Captioner.load(model_path, args.device)
        beam = replace(captioner.beam, beam_size=args.beam)
        caller = Caller(service, args.beam)
        try:
            # Warm both paths up (first calls pay for kernel selection and allocation).
            await asyncio.gather(*(caller.caption(p) for p in photos[: args.warmup]))
            for photo in photos[:2]:
                captioner.caption_bytes(photo, beam, attention=False)
                eager.caption_bytes(photo, beam, attention=False)
            warmup_busy = caller.busy_answers

            levels = [await measure_level(caller, photos, callers) for callers in args.callers]

            baseline, baseline_times, eager_caps, eager_times = frozen_and_eager_loops(captioner, eager, photos,
                                                                                        beam)
            baseline_rate = len(photos) / sum(baseline_times)
            eager_rate = len(photos) / sum(eager_times)
            print(f"baseline: {baseline_rate:6.2f} photos/s, encoder frozen: {encoder_frozen}; eager encoder "
                  f"{eager_rate:6.2f} photos/s: freezing alone {baseline_rate / eager_rate:.2f}x at batch 1")
            default_rate = default_threads_rate(captioner, photos[: args.single], beam, threads, default_threads)
            print(f"baseline with torch's default {default_threads} threads: {default_rate:6.2f} photos/s")
            best_baseline = max(baseline_rate, default_rate)
            expected = [b.text for b in baseline]
            for level in levels:
                texts = level.pop("captions")
                level["ratio_vs_one_at_a_time"] = round(level["photos_per_second"] / baseline_rate, 3)
                level["caption_mismatches"] = sum(text != expected[i % len(expected)] for i, text in enumerate(texts))
                print(f"{level['callers']:4d} callers: {level['ratio_vs_one_at_a_time']:.2f}x one at a time, "
                      f"{level['caption_mismatches']} captions differ from the baseline's")
            best = max(levels, key=lambda level: level["photos_per_second"])
            worker_rate = best["photos_per_second"]
            print(f"ratio:    {worker_rate / best_baseline:.2f}x the best baseline's photos/s "
                  f"({worker_rate / baseline_rate:.2f}x the same-threads baseline), at {best['callers']} callers")

            single = await single_requests(caller, captioner, photos[: args.single], beam)
            mismatched = sum(level["caption_mismatches"] for level in levels)
            print(f"identical captions: {not mismatched} ({mismatched} differ over "
                  f"{sum(level['requests'] for level in levels)} requests)")
            print(f"example caption: {expected[0]!r}")
        finally:
            stats = service.stats()
            await service.close()
        sweep = await sweep_batch_sizes(args, model_path, photos, threads) if args.sweep else []
    worker_peak = stats.worker_peak_rss_bytes / 2**20
    print(f"peak RSS: worker process {worker_peak:.0f} MB; this process (two baseline models + torch) "
          f"{peak_rss_mb():.0f} MB")
    document: dict[str, Any] = {
        "context": run.context(stats.device or args.device),
        "model": model_note,
        "photos": photo_note,
        "distinct_photos": len(photos), "beam_size": args.beam,
        "worker": {"max_batch_size": stats.max_batch_size, "max_wait_ms": stats.max_wait_ms,
                   "decode_threads": stats.decode_threads, "precision": stats.precision,
                   "queue_capacity": config.queue_capacity, "max_queue_seconds": config.max_queue_seconds,
                   "warmup_per_photo_ms": round(warm_per_photo * 1000, 2),
                   "per_photo_ms_when_done": round(stats.per_image_seconds * 1000, 2),
                   "start_seconds": round(start_seconds, 2), "busy_answers_during_warmup": warmup_busy,
                   "best_callers": best["callers"], "photos_per_second": worker_rate,
                   "latency_p50_ms": best["latency_p50_ms"], "latency_p95_ms": best["latency_p95_ms"]},
        "levels": levels,
        "baseline": {"encoder_frozen": encoder_frozen, **loop_summary(baseline_times)},
        "baseline_default_threads": {"threads": default_threads, "photos": len(photos[: args.single]),
                                     "photos_per_second": round(default_rate, 3)},
        "throughput_ratio": round(worker_rate / best_baseline, 3),
        "throughput_ratio_same_threads": round(worker_rate / baseline_rate, 3),
        "freezing_at_batch_1": {"eager": loop_summary(eager_times),
                                "ratio_frozen_over_eager": round(baseline_rate / eager_rate, 3),
                                "caption_mismatches": mismatches(expected, [e.text for e in eager_caps])},
        "single_request": single,
        "identical_captions": not mismatched, "caption_mismatches": mismatched,
        "worker_peak_rss_mb": round(worker_peak, 1),
        "bench_process_peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if sweep:
        document["batch_size_sweep"] = {"callers": args.sweep_callers, "rows": sweep}
    return document


def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers separated by commas")
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--callers", type=int_list, default=[1, 8, 64, 256],
                        help="concurrent callers at each level, comma-separated")
    parser.add_argument("--photos", type=int, default=64, help="distinct photos (the baseline captions each once)")
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--single", type=int, default=8, help="photos for the single-request latency")
    parser.add_argument("--warmup", type=int, default=16, help="photos sent through the worker before timing")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the worker and the baseline (0 = torch's default)")
    parser.add_argument("--queue-capacity", type=int, default=ServiceConfig().queue_capacity,
                        help="the worker's bound on photos held (fewer than the callers makes it answer busy)")
    parser.add_argument("--sweep", type=int_list, default=None,
                        help="also measure a fresh worker at each of these batch sizes, comma-separated")
    parser.add_argument("--sweep-callers", type=int, default=64, help="concurrent callers in the sweep")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint instead")
    parser.add_argument("--out", type=Path, default=RESULTS / "worker.json")
    args = parser.parse_args(argv)
    run = start_run(None if argv is None else ["bench/worker.py", *argv])
    write_result(args.out, asyncio.run(bench(args, run)))


if __name__ == "__main__":
    main()
