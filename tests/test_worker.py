"""The caption worker: batching, backpressure, timeouts, crash recovery, hot reload, shutdown.

Services are started once per module where tests can share them (a worker start costs seconds).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from captioner.images import ImageError, ImageProblem, NotAnImageError, TruncatedImageError, image_error, load_image
from captioner.inference import Captioner
from captioner.result import CaptionResult
from captioner.serving.base import (
    ModelLoadError,
    QueueFullError,
    RequestTimeoutError,
    ServiceClosedError,
    ServiceError,
    WorkerCrashedError,
)
from captioner.serving.config import ServiceConfig
from captioner.serving.process import ProcessCaptionService
from captioner.serving.protocol import RequestFailed
from captioner.serving.spawn import clean_environment
from tests.helpers import make_checkpoint, photo_bytes

BASE: dict[str, Any] = dict(device="cpu", threads=1, request_timeout=60.0)


def _service(checkpoint: Path, **overrides: object) -> ProcessCaptionService:
    """A service (not started) on ``checkpoint`` with single-threaded CPU workers."""
    return ProcessCaptionService(ServiceConfig(checkpoint=str(checkpoint), **{**BASE, **overrides}))


def _start(checkpoint: Path, **overrides: object) -> ProcessCaptionService:
    service = _service(checkpoint, **overrides)
    asyncio.run(service.start())
    return service


async def _until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[ProcessCaptionService]:
    s = _start(tiny_checkpoint, max_batch_size=16, max_wait_ms=50, queue_capacity=16)
    yield s
    asyncio.run(s.close(drain_timeout=5))


@pytest.fixture(scope="module")
def slow_service(tiny_checkpoint: Path) -> Iterator[ProcessCaptionService]:
    """Every batch takes at least 0.5 s, so 'mid-batch' and 'queued' are observable."""
    s = _start(tiny_checkpoint, max_batch_size=4, max_wait_ms=20, debug_batch_delay=0.5)
    yield s
    asyncio.run(s.close(drain_timeout=5))


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Iterator[Captioner]:
    """The in-process model, single-threaded like the workers (two OpenMP threads stall badly
    when the CPU is shared with other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Captioner.load(tiny_checkpoint, "cpu")
    torch.set_num_threads(threads)


# --- configuration (no worker) ---------------------------------------------------------------


def test_config_validation_and_factory(tiny_checkpoint: Path) -> None:
    # Reading the environment is the bot's job (tests/test_settings.py, tests/test_bot_units.py).
    for bad in ({"queue_capacity": 0}, {"max_wait_ms": -1}, {"request_timeout": 0}, {"threads": 0},
                {"default_beam_size": 11}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServiceConfig(**bad)
    with pytest.raises(ValueError):
        ServiceConfig(max_batch_size=0)
    service = _service(tiny_checkpoint, queue_capacity=3)
    assert service.config.queue_capacity == 3 and service.config.checkpoint == str(tiny_checkpoint.resolve())


@pytest.mark.parametrize("code", list(ImageProblem))
def test_image_errors_cross_the_pipe_unchanged(code: ImageProblem) -> None:
    sent = image_error(code, limit=7)
    failure = pickle.loads(pickle.dumps(RequestFailed.bad_image(3, sent)))
    received = failure.error()
    assert type(received) is type(sent) and isinstance(received, ImageError)
    assert (received.code, received.details, str(received)) == (code, {"limit": 7}, str(sent))


def test_internal_failures_become_service_errors() -> None:
    received = RequestFailed(4, "captioning failed: RuntimeError: boom").error()
    assert type(received) is ServiceError and "boom" in str(received)


async def test_not_started_service_refuses_requests(tiny_checkpoint: Path) -> None:
    service = _service(tiny_checkpoint)
    with pytest.raises(ServiceClosedError):
        await service.caption(photo_bytes(0))
    await service.close()


async def test_start_with_a_broken_checkpoint_raises(tmp_path: Path) -> None:
    service = _service(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="not found"):
        await service.start()


# --- batching ----------------------------------------------------------------------------


async def test_concurrent_requests_are_batched_and_match_single_image(
        service: ProcessCaptionService, reference: Captioner) -> None:
    photos = [photo_bytes(seed) for seed in range(16)]
    results = await asyncio.gather(*(service.caption(p, beam_size=3) for p in photos))
    assert max(r.batch_size for r in results) > 1
    for photo, result in zip(photos, results, strict=True):
        alone = reference.caption_bytes(photo, replace(reference.beam, beam_size=3), attention=False)
        assert result.text == alone.text
        assert result.words == alone.words
        assert result.score == pytest.approx(alone.score, abs=1e-4)
        assert result.model_version == "test-v1" and result.beam_size == 3
        assert (result.width, result.height) == (96, 80)
        assert result.queue_seconds >= 0 and result.compute_seconds > 0 and result.attention_png is None


async def test_mixed_beam_sizes_in_one_batch(service: ProcessCaptionService, reference: Captioner) -> None:
    photos = [photo_bytes(100 + seed) for seed in range(6)]
    beams = [1, 2, 3, 1, 2, 3]
    results = await asyncio.gather(*(service.caption(p, beam_size=b, attention=(i == 0))
                                     for i, (p, b) in enumerate(zip(photos, beams, strict=True))))
    assert max(r.batch_size for r in results) > 1
    for photo, beam, result in zip(photos, beams, results, strict=True):
        alone = reference.caption_bytes(photo, replace(reference.beam, beam_size=beam), attention=False)
        assert (result.text, result.beam_size) == (alone.text, beam)
        assert result.score == pytest.approx(alone.score, abs=1e-4)
    png = results[0].attention_png
    assert png is not None and png.startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        await service.caption(photos[0], beam_size=0)


async def test_bad_image_bytes_fail_only_their_request(service: ProcessCaptionService) -> None:
    good = [photo_bytes(200 + seed) for seed in range(6)]
    junk = b"definitely not a photo"
    photo = photo_bytes(7, size=(320, 240))
    truncated = photo[: len(photo) // 2]
    header_only = photo[:600]  # Pillow fails inside Image.open: still only this request's error
    outcomes = await asyncio.gather(
        *(service.caption(p) for p in [*good[:3], junk, truncated, header_only, *good[3:]]),
        return_exceptions=True)
    for bad, outcome in ((junk, outcomes[3]), (truncated, outcomes[4])):
        with pytest.raises(ImageError) as expected:
            load_image(bad)
        assert type(outcome) is type(expected.value) and str(outcome) == str(expected.value)
        assert isinstance(outcome, ImageError)
        assert (outcome.code, outcome.details) == (expected.value.code, expected.value.details)
    assert isinstance(outcomes[3], NotAnImageError) and isinstance(outcomes[4], TruncatedImageError)
    assert isinstance(outcomes[5], ImageError)
    assert all(isinstance(o, CaptionResult) for o in outcomes[:3] + outcomes[6:])
    assert max(o.batch_size for o in outcomes if isinstance(o, CaptionResult)) > 1


# --- backpressure and status --------------------------------------------------------------


async def test_queue_full_fails_at_once_and_status_reports_the_queue(service: ProcessCaptionService) -> None:
    assert service.status().waiting == 0
    tasks = [asyncio.create_task(service.caption(photo_bytes(300 + i))) for i in range(16)]
    await asyncio.sleep(0)  # every task has submitted its request
    status = service.status()
    assert (status.waiting + status.in_flight, status.capacity) == (16, 16)
    assert status.estimated_wait_seconds > 0
    with pytest.raises(QueueFullError):
        await service.caption(photo_bytes(399))
    assert not any(task.done() for task in tasks)  # refused at once, not after waiting for room
    results = await asyncio.gather(*tasks)
    assert len(results) == 16 and service.stats().rejected >= 1
    assert service.status().waiting == service.status().in_flight == 0


# --- timeouts ------------------------------------------------------------------------------


async def test_timed_out_and_cancelled_requests_are_dropped_before_compute(
        slow_service: ProcessCaptionService) -> None:
    s = slow_service
    images_before = s.stats().images
    first = asyncio.create_task(s.caption(photo_bytes(400)))
    await _until(lambda: s.status().in_flight == 1)
    with pytest.raises(RequestTimeoutError):
        await s.caption(photo_bytes(401), timeout=0.1)
    assert not first.done()  # the caller was not held until the worker got to its request
    abandoned = asyncio.create_task(s.caption(photo_bytes(402)))
    await asyncio.sleep(0.05)
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    assert (await first).batch_size == 1
    later = await s.caption(photo_bytes(403))  # queued behind the dropped ones
    assert later.text
    assert s.stats().images - images_before == 2  # `first` and `later`: the other two were skipped
    assert s.status().waiting == s.status().in_flight == 0


# --- crash recovery -----------------------------------------------------------------------


async def test_worker_killed_mid_batch_every_request_is_answered(slow_service: ProcessCaptionService) -> None:
    s = slow_service
    pid = s.worker_pid
    assert pid is not None
    tasks = [asyncio.create_task(s.caption(photo_bytes(500 + i))) for i in range(8)]
    await _until(lambda: s.status().in_flight > 0)
    os.kill(pid, signal.SIGKILL)
    results = await asyncio.gather(*tasks)
    assert all(r.text for r in results)
    stats = s.stats()
    assert stats.crashes >= 1 and stats.restarts >= 1 and s.worker_pid not in (None, pid)
    assert not _alive(pid)


async def test_request_with_two_dead_workers_gets_worker_crashed_error(
        slow_service: ProcessCaptionService) -> None:
    s = slow_service
    victim = asyncio.create_task(s.caption(photo_bytes(600)))
    await _until(lambda: s.status().in_flight == 1)
    first = s.worker_pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    await _until(lambda: s.worker_pid not in (None, first) and s.status().in_flight == 1)
    second = s.worker_pid
    assert second is not None
    os.kill(second, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError):
        await victim
    assert (await s.caption(photo_bytes(601))).text  # a third worker serves again


# --- hot reload ---------------------------------------------------------------------------


async def test_reload_while_requests_flow(tiny_checkpoint: Path, tmp_path: Path) -> None:
    v2 = make_checkpoint(tmp_path / "v2", version="test-v2", seed=1)
    broken = tmp_path / "broken"
    shutil.copytree(v2, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    s = ProcessCaptionService(ServiceConfig(checkpoint=str(tiny_checkpoint), max_batch_size=4, **BASE))
    await s.start()
    try:
        assert s.model_version == "test-v1"
        stop = asyncio.Event()
        seen: list[list[str]] = [[] for _ in range(4)]

        async def caller(k: int) -> None:
            i = 0
            while not stop.is_set():
                seen[k].append((await s.caption(photo_bytes(700 + 50 * k + i))).model_version)
                i += 1

        callers = [asyncio.create_task(caller(k)) for k in range(4)]
        await _until(lambda: all(seen))
        assert await s.reload(v2) == "test-v2"
        assert s.model_version == "test-v2"
        with pytest.raises(ModelLoadError):
            await s.reload(broken)
        with pytest.raises(ModelLoadError):
            await s.reload(tmp_path / "missing")
        await _until(lambda: all(versions[-1] == "test-v2" for versions in seen))
        stop.set()
        await asyncio.gather(*callers)  # raises if any request failed
        for versions in seen:
            assert versions == sorted(versions)  # never back to v1 once v2 served
        flat = [v for versions in seen for v in versions]
        assert "test-v1" in flat and "test-v2" in flat
        assert s.model_version == "test-v2"
        assert (await s.caption(photo_bytes(799))).model_version == "test-v2"
    finally:
        await s.close()


# --- shutdown -----------------------------------------------------------------------------


async def test_close_answers_queued_requests_then_stops_the_worker(tiny_checkpoint: Path) -> None:
    config = ServiceConfig(checkpoint=str(tiny_checkpoint), max_batch_size=2, max_wait_ms=5,
                           debug_batch_delay=0.3, **BASE)
    drained, limited = ProcessCaptionService(config), ProcessCaptionService(config)
    await asyncio.gather(drained.start(), limited.start())

    tasks = [asyncio.create_task(drained.caption(photo_bytes(800 + i))) for i in range(6)]
    await _until(lambda: drained.status().in_flight > 0)
    pid = drained.worker_pid
    assert pid is not None
    await drained.close(drain_timeout=30)
    results = await asyncio.gather(*tasks)
    assert all(isinstance(r, CaptionResult) for r in results)
    assert not _alive(pid)
    with pytest.raises(ServiceClosedError):
        await drained.caption(photo_bytes(0))
    with pytest.raises(ServiceClosedError):
        await drained.reload(tiny_checkpoint)

    tasks = [asyncio.create_task(limited.caption(photo_bytes(900 + i))) for i in range(6)]
    await _until(lambda: limited.status().in_flight > 0)
    pid = limited.worker_pid
    assert pid is not None
    started = time.monotonic()
    await limited.close(drain_timeout=0.1)
    assert time.monotonic() - started < 5.0
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, CaptionResult | ServiceClosedError) for o in outcomes)
    assert any(isinstance(o, ServiceClosedError) for o in outcomes)
    assert not _alive(pid)


def test_the_worker_keeps_only_the_environment_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    # A copy stands in for this process's environment, which the test must leave as it is.
    monkeypatch.setattr(os, "environ", dict(os.environ, TELEGRAM_BOT_TOKEN="123:secret", OMP_NUM_THREADS="1",
                                            DATABASE_URL="postgresql+asyncpg://u:password@h/db"))
    dropped = clean_environment()
    assert {"TELEGRAM_BOT_TOKEN", "DATABASE_URL"} <= set(dropped)
    assert "TELEGRAM_BOT_TOKEN" not in os.environ and "DATABASE_URL" not in os.environ
    assert os.environ["OMP_NUM_THREADS"] == "1" and "PATH" in os.environ
