"""The caption worker on its device: batching resolved per device, admission by seconds of work,
the decoding pool, the next batch filling while one computes, and the model's precision.

Only CPU is tested here; the CUDA paths (pinned staging buffers, non-blocking copies, autocast)
are exercised by ``bench/worker.py --device cuda`` and ``bench/precision.py --device cuda``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import pytest
import torch

from captioner.images import ImageLimits
from captioner.inference import Captioner, check_precision
from captioner.serving.base import ModelLoadError, QueueFullError
from captioner.serving.config import DEVICE_BATCHING, Batching, ServiceConfig
from captioner.serving.process import ProcessCaptionService, queue_refusal
from captioner.serving.protocol import BatchDone, Ready, Request, Shutdown, WorkerSettings
from captioner.serving.stats import Counters
from captioner.serving.worker import Worker
from tests.helpers import photo_bytes

BASE: dict[str, Any] = dict(device="cpu", threads=1, request_timeout=60.0)


def _service(checkpoint: Path, **overrides: Any) -> ProcessCaptionService:
    return ProcessCaptionService(ServiceConfig(checkpoint=str(checkpoint), **{**BASE, **overrides}))


# --- batching per device (no worker) -----------------------------------------------------------


def test_batching_left_open_resolves_to_the_devices_default_and_settings_override_it() -> None:
    config = ServiceConfig()
    assert (config.max_batch_size, config.max_wait_ms) == (None, None)
    assert config.batching("cuda") == DEVICE_BATCHING["cuda"] and config.batching("cpu") == DEVICE_BATCHING["cpu"]
    assert DEVICE_BATCHING["cuda"].max_batch_size >= 64  # a GPU is wasted on small batches
    assert config.batching("mps") == DEVICE_BATCHING["cpu"]  # a device without its own default
    assert ServiceConfig(max_batch_size=5).batching("cuda") == Batching(5, DEVICE_BATCHING["cuda"].max_wait_ms)
    assert ServiceConfig(max_wait_ms=0).batching("cpu") == Batching(DEVICE_BATCHING["cpu"].max_batch_size, 0.0)
    for bad in ({"max_queue_seconds": 0}, {"max_queue_seconds": float("inf")}, {"decode_threads": 0},
                {"max_wait_ms": float("nan")}, {"precision": "float64"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServiceConfig(**bad)


# --- admission by seconds of work --------------------------------------------------------------


def test_admission_counts_seconds_of_work_with_a_hard_cap_on_photos() -> None:
    assert queue_refusal(0, 99.0, 256, 10.0) is None  # an idle service takes a photo however slow it is
    assert queue_refusal(3, 9.9, 256, 10.0) is None
    refusal = queue_refusal(3, 10.1, 256, 10.0)
    assert refusal is not None and "10.1 s of work" in refusal
    refusal = queue_refusal(256, 0.5, 256, 10.0)  # a fast device still holds at most `capacity` photos
    assert refusal is not None and "the limit is 256" in refusal


def test_batches_of_one_move_the_time_per_photo_less_than_full_batches() -> None:
    # An idle service runs batches of one, dearer per photo than the full batches of a long queue:
    # they must not make admission think a long queue is slower than it is.
    def counters() -> Counters:
        counts = Counters()
        counts.worker_started(Ready("v", None, 1, "cpu", 1, 0.1, 0, max_batch_size=8))
        return counts

    alone, full = counters(), counters()
    alone.batch_done(BatchDone((), 1, 0.5, 0, 0))  # 0.5 s per photo, one photo
    full.batch_done(BatchDone((), 8, 4.0, 0, 0))  # 0.5 s per photo, a full batch
    assert full.per_image_seconds == pytest.approx(0.1 + 0.2 * 0.4)
    assert alone.per_image_seconds - 0.1 == pytest.approx((full.per_image_seconds - 0.1) / 8)


async def test_a_slow_queue_is_refused_by_its_estimated_wait_and_a_short_one_admitted(tiny_checkpoint: Path) -> None:
    # No warm-up: the first batch's time (at least the 0.4 s debug delay) becomes the measured
    # time per photo, so a few photos ahead are over the 2 s limit while the photo cap is far away.
    limit = 2.0
    service = _service(tiny_checkpoint, warmup=False, max_batch_size=1, max_wait_ms=0,
                       debug_batch_delay=0.4, max_queue_seconds=limit, queue_capacity=100)
    await service.start()
    try:
        assert service.stats().per_image_seconds == 0  # nothing measured yet: only the photo cap applies
        await service.caption(photo_bytes(1))
        per_photo = service.stats().per_image_seconds
        assert per_photo >= 0.4
        taken: list[asyncio.Task[Any]] = []
        with pytest.raises(QueueFullError, match="s of work"):
            for i in range(100):
                wait = service.status().estimated_wait_seconds
                taken.append(asyncio.create_task(service.caption(photo_bytes(2 + i))))
                await asyncio.sleep(0)  # submitted (or refused at once)
                if taken[-1].done():
                    await taken.pop()
        # Admitted while the estimate was within the limit (the first always), refused beyond it.
        assert wait > limit and len(taken) == max(1, int(limit / per_photo))
        assert wait == pytest.approx(per_photo * (len(taken) + 1), abs=0.01)
        assert service.stats().rejected == 1
        results = await asyncio.gather(*taken)
        assert all(r.text for r in results)
        assert (await service.caption(photo_bytes(200))).text  # the queue drained: admitted again
    finally:
        await service.close()


async def test_the_worker_reports_what_it_resolved_and_the_warm_up_seeds_the_time_per_photo(
        tiny_checkpoint: Path) -> None:
    service = _service(tiny_checkpoint, decode_threads=3)
    await service.start()
    try:
        stats = service.stats()
        cpu = DEVICE_BATCHING["cpu"]
        assert (stats.max_batch_size, stats.max_wait_ms, stats.decode_threads) == (cpu.max_batch_size,
                                                                                  cpu.max_wait_ms, 3)
        assert stats.precision == "float32" and stats.per_image_seconds > 0  # the warm-up measured a full batch
        status = service.status()
        assert status.capacity == ServiceConfig().queue_capacity
        assert status.estimated_wait_seconds == pytest.approx(stats.per_image_seconds + cpu.max_wait_ms / 1000)
    finally:
        await service.close()


# --- the next batch fills while one computes ---------------------------------------------------


async def test_batches_never_exceed_their_size_while_the_model_is_busy(tiny_checkpoint: Path) -> None:
    # Photos keep arriving while a batch computes and the next is already full: they wait for a
    # later batch (a batch beyond its size crashed the first version of the pipelined worker).
    service = _service(tiny_checkpoint, max_batch_size=2, max_wait_ms=0, debug_batch_delay=0.2)
    await service.start()
    reference = Captioner.load(tiny_checkpoint, "cpu")
    try:
        photos = [photo_bytes(40 + i) for i in range(11)]
        results = await asyncio.gather(*(service.caption(p, beam_size=2) for p in photos))
        assert max(r.batch_size for r in results) == 2 and service.stats().largest_batch == 2
        for photo, result in zip(photos, results, strict=True):
            assert result.text == reference.caption_bytes(photo, replace(reference.beam, beam_size=2)).text
    finally:
        await service.close()


# --- the decoding pool (a worker in this process) ----------------------------------------------


@pytest.fixture
def worker_in_process(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A Worker in a thread of this process, with two decoding threads whose image decoding
    waits until two decodes run at once (it fails after 10 s if the pool decodes one at a time)."""
    both_decoding = threading.Barrier(2, timeout=10)
    real_decode = Worker._decode_image

    def decode_in_pairs(self: Worker, *args: Any, **kwargs: Any) -> Any:
        both_decoding.wait()
        return real_decode(self, *args, **kwargs)

    monkeypatch.setattr(Worker, "_decode_image", decode_in_pairs)
    requests_out, requests_in = Pipe(duplex=False)
    results_out, results_in = Pipe(duplex=False)
    settings = WorkerSettings(str(tiny_checkpoint), "cpu", 1, None, 5.0, ImageLimits(), None, False, 0.0,
                              decode_threads=2)
    threads = torch.get_num_threads()
    worker = Worker(settings, requests_out, results_in)
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    yield requests_in, results_out
    requests_in.send(Shutdown())
    runner.join(timeout=30)
    torch.set_num_threads(threads)
    assert not runner.is_alive()


def test_the_pool_decodes_photos_in_parallel(worker_in_process: Any) -> None:
    send, receive = worker_in_process
    ready = receive.recv()
    assert isinstance(ready, Ready) and ready.decode_threads == 2
    assert (ready.max_batch_size, ready.max_wait_ms) == (DEVICE_BATCHING["cpu"].max_batch_size, 5.0)
    for request_id in (1, 2):
        send.send(Request(request_id, photo_bytes(request_id), 2, False, deadline=1e12, submitted=0.0))
    answered: set[int] = set()
    while len(answered) < 2:
        assert receive.poll(30), "no answer: the two decodes did not run at once"
        message = receive.recv()
        if isinstance(message, BatchDone):
            answered.update(result.id for result in message.results)
    assert answered == {1, 2}


# --- precision ---------------------------------------------------------------------------------


async def test_16_bit_precision_is_refused_on_cpu_loudly(tiny_checkpoint: Path) -> None:
    cpu = torch.device("cpu")
    assert check_precision("float32", cpu) is None
    for precision in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match="needs a CUDA device"):
            check_precision(precision, cpu)
    with pytest.raises(ValueError, match="must be one of"):
        check_precision("float8", cpu)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Captioner.load(tiny_checkpoint, "cpu", precision="bfloat16")
    service = _service(tiny_checkpoint, precision="float16")
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        await service.start()
