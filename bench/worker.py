"""The caption worker against one photo at a time: throughput, latency, identical captions.

    python bench/worker.py [--device auto] [--requests 64] [--callers 32] [--beam 3] [--single 8]
                           [--threads 1]

* worker: ``--requests`` photos captioned by ``--callers`` concurrent callers through
  ProcessCaptionService (dynamic batching in a worker process, default settings);
* baseline: the same photos one at a time in this process, as a tutorial caption script does:
  decode + preprocess + encode + beam search per photo, in a loop;
* single request: one photo through the idle worker vs a bare in-process call (interleaved);
* identical captions: the worker's caption of each photo equals the baseline's.

Photos come from ../shared/data/flickr8k/images when present (generated otherwise). The model is
captioner/default_model when present; otherwise a model with the default configuration
(EfficientNet-Lite0 with its ImageNet weights, 512-d decoder, ~2,500-word vocabulary) and a
random decoder, which is as slow as a trained one or slower (its captions never end early).
Both sides use the same torch thread count (``--threads``, default 1). On a 2-core machine shared
with a higher-priority training job, two OpenMP threads per process stall at every barrier when
the other thread is preempted, which makes a one-photo-at-a-time loop several times slower; the
baseline is therefore also sampled with torch's default thread count, and the ratio is taken
against the faster of the two baselines. Results go to bench/results/worker.json as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from captioner import checkpoint  # noqa: E402
from captioner.checkpoint import DEFAULT_MODEL_DIR, META_FILE, CaptionModel  # noqa: E402
from captioner.inference import Captioner  # noqa: E402
from captioner.model import ModelConfig  # noqa: E402
from captioner.result import CaptionResult  # noqa: E402
from captioner.serving.config import ServiceConfig  # noqa: E402
from captioner.serving.process import ProcessCaptionService  # noqa: E402
from captioner.vocab import SPECIAL_TOKENS, Vocabulary  # noqa: E402
from tests.helpers import SHARED_FLICKR8K, photo_bytes  # noqa: E402

VOCAB_SIZE = 2500


def prepare_model(workdir: Path, explicit: str | None) -> tuple[str | None, str]:
    """(checkpoint path or None for the bundled model, description)."""
    if explicit:
        return explicit, f"checkpoint {explicit}"
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
        return [names[i * step].read_bytes() for i in range(count)], f"Flickr8k photos from {folder}"
    return [photo_bytes(seed, size=(500, 375)) for seed in range(count)], "generated 500x375 JPEGs"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def through_worker(service: ProcessCaptionService, photos: list[bytes], callers: int,
                         beam: int) -> tuple[list[CaptionResult], list[float], float]:
    work: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(photos)):
        work.put_nowait(index)
    results: list[CaptionResult | None] = [None] * len(photos)
    latencies: list[float] = [0.0] * len(photos)

    async def caller() -> None:
        while not work.empty():
            index = work.get_nowait()
            started = time.perf_counter()
            results[index] = await service.caption(photos[index], beam_size=beam)
            latencies[index] = time.perf_counter() - started

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    wall = time.perf_counter() - started
    return [r for r in results if r is not None], latencies, wall


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    default_threads = torch.get_num_threads()
    threads = args.threads or default_threads
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as tmp:
        model_path, model_note = prepare_model(Path(tmp), args.checkpoint)
        photos, photo_note = load_photos(args.requests)
        print(f"model:  {model_note}")
        print(f"photos: {len(photos)} {photo_note}; beam {args.beam}; {args.callers} concurrent callers; "
              f"torch threads {threads}; load average {load_before[0]:.1f}")

        config = ServiceConfig(checkpoint=model_path, device=args.device, threads=threads,
                               request_timeout=3600)
        service = ProcessCaptionService(config)
        started = time.perf_counter()
        await service.start()
        start_seconds = time.perf_counter() - started
        stats = service.stats()
        print(f"worker: pid {stats.worker_pid} on {stats.device}, started in {start_seconds:.1f} s")

        captioner = Captioner.load(model_path, args.device)
        beam = replace(captioner.beam, beam_size=args.beam)
        try:
            # Warm both paths up (first calls pay for kernel selection and allocation).
            await asyncio.gather(*(service.caption(p, beam_size=args.beam) for p in photos[:16]))
            for photo in photos[:2]:
                captioner.caption_bytes(photo, beam, attention=False)

            results, latencies, worker_wall = await through_worker(service, photos, args.callers, args.beam)
            worker_rate = len(photos) / worker_wall
            sizes = Counter(r.batch_size for r in results)
            print(f"worker:   {worker_rate:6.2f} photos/s ({worker_wall:.1f} s), latency p50 "
                  f"{percentile(latencies, 50) * 1000:.0f} ms p95 {percentile(latencies, 95) * 1000:.0f} ms, "
                  f"batch sizes {dict(sorted(sizes.items()))}")

            baseline_times: list[float] = []
            baseline = []
            started = time.perf_counter()
            for photo in photos:
                t0 = time.perf_counter()
                baseline.append(captioner.caption_bytes(photo, beam, attention=False))
                baseline_times.append(time.perf_counter() - t0)
            baseline_wall = time.perf_counter() - started
            baseline_rate = len(photos) / baseline_wall
            print(f"baseline: {baseline_rate:6.2f} photos/s ({baseline_wall:.1f} s), per photo p50 "
                  f"{percentile(baseline_times, 50) * 1000:.0f} ms p95 "
                  f"{percentile(baseline_times, 95) * 1000:.0f} ms")
            sample = photos[: args.single]
            torch.set_num_threads(default_threads)
            captioner.caption_bytes(sample[0], beam, attention=False)
            started = time.perf_counter()
            for photo in sample:
                captioner.caption_bytes(photo, beam, attention=False)
            default_rate = len(sample) / (time.perf_counter() - started)
            torch.set_num_threads(threads)
            print(f"baseline with torch's default {default_threads} threads: {default_rate:6.2f} photos/s "
                  f"({len(sample)} photos)")
            best_baseline = max(baseline_rate, default_rate)
            print(f"ratio:    {worker_rate / best_baseline:.2f}x the best baseline's photos/s "
                  f"({worker_rate / baseline_rate:.2f}x the same-threads baseline)")

            single_worker, single_bare = [], []
            for photo in photos[: args.single]:
                t0 = time.perf_counter()
                await service.caption(photo, beam_size=args.beam)
                single_worker.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                captioner.caption_bytes(photo, beam, attention=False)
                single_bare.append(time.perf_counter() - t0)
            worker_single = statistics.median(single_worker)
            bare_single = statistics.median(single_bare)
            print(f"single request: worker {worker_single * 1000:.0f} ms vs in-process "
                  f"{bare_single * 1000:.0f} ms (median of {len(single_worker)}): "
                  f"{worker_single / bare_single:.2f}x")

            pairs = list(zip(results, baseline, strict=True))
            mismatches = [i for i, (r, b) in enumerate(pairs) if r.text != b.text]
            score_diff = max(abs(r.score - b.score) for r, b in pairs)
            print(f"identical captions: {not mismatches} ({len(photos) - len(mismatches)}/{len(photos)}), "
                  f"max score difference {score_diff:.2e}")
            print(f"example caption: {results[0].text!r}")
        finally:
            stats = service.stats()
            await service.close()
    worker_peak = stats.worker_peak_rss_bytes / 2**20
    print(f"peak RSS: worker process {worker_peak:.0f} MB; this process (baseline model + torch) "
          f"{peak_rss_mb():.0f} MB")
    load_after = os.getloadavg()
    return {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": threads, "device": stats.device or args.device,
                    "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
                    "note": "other jobs (model training at higher priority) shared the CPU; run under nice"},
        "model": model_note,
        "photos": photo_note,
        "requests": len(photos), "callers": args.callers, "beam_size": args.beam,
        "worker": {"photos_per_second": round(worker_rate, 3), "wall_seconds": round(worker_wall, 2),
                   "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
                   "latency_p95_ms": round(percentile(latencies, 95) * 1000, 1),
                   "batch_sizes": {str(k): v for k, v in sorted(sizes.items())},
                   "max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms,
                   "start_seconds": round(start_seconds, 2)},
        "baseline": {"photos_per_second": round(baseline_rate, 3), "wall_seconds": round(baseline_wall, 2),
                     "per_photo_p50_ms": round(percentile(baseline_times, 50) * 1000, 1),
                     "per_photo_p95_ms": round(percentile(baseline_times, 95) * 1000, 1)},
        "baseline_default_threads": {"threads": default_threads, "photos": args.single,
                                     "photos_per_second": round(default_rate, 3)},
        "throughput_ratio": round(worker_rate / best_baseline, 3),
        "throughput_ratio_same_threads": round(worker_rate / baseline_rate, 3),
        "single_request": {"worker_ms": round(worker_single * 1000, 1),
                           "in_process_ms": round(bare_single * 1000, 1),
                           "ratio": round(worker_single / bare_single, 3), "samples": len(single_worker)},
        "identical_captions": not mismatches, "caption_mismatches": len(mismatches),
        "max_score_difference": score_diff,
        "worker_peak_rss_mb": round(worker_peak, 1),
        "bench_process_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--beam", type=int, default=3)
    parser.add_argument("--single", type=int, default=8, help="photos for the single-request latency")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the worker and the baseline (0 = torch's default)")
    parser.add_argument("--checkpoint", default=None, help="use this checkpoint instead")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "worker.json")
    args = parser.parse_args()
    report = asyncio.run(bench(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
