"""The default caption service: a worker process on this machine, fed through pipes.

The parent keeps one future per request, keyed by request id, and two threads:

* the writer sends requests to the current worker (waiting while a worker starts);
* the monitor reads the worker's answers, resolves futures on their callers' event loops, and
  notices the worker's death (pipe EOF or process sentinel): it then starts a new worker and
  resubmits the requests the dead one had; a request that was with two dead workers fails with
  :class:`WorkerCrashedError`. Every request has a deadline, so no caller waits forever.

Nothing here runs on the caller's event loop but bookkeeping: photos are decoded in the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from .base import (
    CaptionResult,
    CaptionService,
    ModelLoadError,
    QueueFullError,
    QueueStatus,
    RequestTimeoutError,
    ServiceClosedError,
    ServiceError,
    WorkerCrashedError,
)
from .config import ServiceConfig
from .protocol import (
    BatchDone,
    BatchStarted,
    Cancel,
    Expired,
    LoadFailed,
    Ready,
    Reload,
    ReloadDone,
    ReloadFailed,
    Request,
    RequestFailed,
    Result,
    Shutdown,
    WorkerSettings,
)
from .worker import worker_main

log = logging.getLogger("captioner.serving")

_NEW, _STARTING, _RUNNING, _CLOSING, _CLOSED = "new", "starting", "running", "closing", "closed"
_STOP = object()
_EMA_WEIGHT = 0.2  # of the newest batch in the moving average of per-image compute time
_POLL = 0.25  # seconds between checks of the stop flag in blocking waits


@dataclass
class _Pending:
    request: Request
    future: asyncio.Future[CaptionResult]
    loop: asyncio.AbstractEventLoop
    attempts: int = 0  # workers that died while holding this request
    sent_to: int | None = None  # generation of the worker it was sent to
    running: bool = False  # in the batch being computed


@dataclass
class _PendingReload:
    message: Reload
    future: asyncio.Future[str]
    loop: asyncio.AbstractEventLoop
    sent_to: int | None = None


@dataclass
class _Child:
    process: BaseProcess
    send: Connection
    receive: Connection
    generation: int
    ready: Ready


@dataclass(frozen=True)
class ServiceStats:
    """Counters for logs, metrics and benchmarks (not part of the CaptionService interface)."""

    worker_pid: int | None
    device: str
    threads: int
    model_version: str
    batches: int
    images: int
    largest_batch: int
    expired: int
    rejected: int
    crashes: int
    restarts: int
    per_image_seconds: float  # moving average of batch compute time / batch size
    worker_rss_bytes: int
    worker_peak_rss_bytes: int  # the largest peak RSS reported by any worker process


def _deliver(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any = None,
             error: BaseException | None = None) -> None:
    """Thread-safe: settle ``future`` on its own loop (ignored if the loop is gone)."""
    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(_deliver, future, value, error)


def _image_error(name: str, message: str) -> Exception:
    from .. import images

    cls = getattr(images, name, None)
    if isinstance(cls, type) and issubclass(cls, images.ImageError):
        return cls(message)
    return images.ImageError(message)


def _to_result(r: Result) -> CaptionResult:
    return CaptionResult(caption=r.caption, words=r.words, score=r.score, model_version=r.model_version,
                         beam_size=r.beam_size, width=r.width, height=r.height, queue_seconds=r.queue_seconds,
                         compute_seconds=r.compute_seconds, batch_size=r.batch_size,
                         attention_png=r.attention_png)


class ProcessCaptionService(CaptionService):
    """Captions photos in a separate worker process (spawn) that batches concurrent requests.

    Use it from any event loop (or several); ``start()`` once, ``close()`` at the end::

        service = ProcessCaptionService(ServiceConfig(checkpoint="runs/best", device="auto"))
        await service.start()
        result = await service.caption(photo_bytes, beam_size=3)
        await service.close()
    """

    def __init__(self, config: ServiceConfig | None = None, **overrides: Any) -> None:
        base = config or ServiceConfig()
        self.config = replace(base, **overrides) if overrides else base
        self._lock = threading.Lock()
        self._state = _NEW
        self._pending: dict[int, _Pending] = {}
        self._reloads: dict[int, _PendingReload] = {}
        self._ids = itertools.count(1)
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._child: _Child | None = None
        self._child_ready = threading.Event()
        self._stopping = threading.Event()
        self._closed = threading.Event()
        self._generation = 0
        self._checkpoint = self.config.checkpoint
        self._version = ""
        self._broken: str | None = None  # why the worker cannot be restarted, while it cannot
        self._restart_delay = 0.0
        self._last_start = 0.0
        self._batch_started: float | None = None
        self._per_image = 0.0
        self._threads: list[threading.Thread] = []
        self._counts = dict(batches=0, images=0, largest_batch=0, expired=0, rejected=0, crashes=0,
                            restarts=0, rss=0, peak_rss=0)

    # --- the CaptionService interface -----------------------------------------------------

    async def start(self) -> None:
        with self._lock:
            if self._state != _NEW:
                raise ServiceClosedError(f"the service cannot start: it is {self._state}")
            self._state = _STARTING
        try:
            child = await asyncio.to_thread(self._spawn)
        except BaseException:
            with self._lock:
                self._state = _NEW
            raise
        with self._lock:
            self._install(child)
            self._state = _RUNNING
        for target, name in ((self._write, "caption-writer"), (self._monitor, "caption-monitor")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    async def caption(self, image: bytes, *, beam_size: int | None = None, attention: bool = False,
                      timeout: float | None = None) -> CaptionResult:
        loop = asyncio.get_running_loop()
        beam = self.config.default_beam_size if beam_size is None else int(beam_size)
        if beam is not None and not 1 <= beam <= self.config.max_beam_size:
            raise ValueError(f"beam_size must be in 1..{self.config.max_beam_size}, not {beam}")
        limit = self.config.request_timeout if timeout is None else float(timeout)
        if limit <= 0:
            raise ValueError("timeout must be > 0")
        data = bytes(image)
        with self._lock:
            if self._state != _RUNNING:
                raise ServiceClosedError("the caption service is not running")
            if self._broken is not None:
                raise WorkerCrashedError(self._broken)
            if len(self._pending) >= self.config.queue_capacity:
                self._counts["rejected"] += 1
                raise QueueFullError(f"{len(self._pending)} photos are queued (the limit is "
                                     f"{self.config.queue_capacity}); try again shortly")
            now = time.monotonic()
            request = Request(next(self._ids), data, beam, bool(attention), now + limit, now)
            pending = _Pending(request, loop.create_future(), loop)
            self._pending[request.id] = pending
        self._outbox.put(request)
        try:
            async with asyncio.timeout(limit):
                return await pending.future
        except TimeoutError:
            self._abandon(request.id)
            raise RequestTimeoutError(f"no caption within {limit:g} s") from None
        except asyncio.CancelledError:
            self._abandon(request.id)
            raise

    def status(self) -> QueueStatus:
        with self._lock:
            in_flight = sum(1 for p in self._pending.values() if p.running)
            waiting = len(self._pending) - in_flight
            per_image = self._per_image
        ahead = waiting + in_flight
        estimate = per_image * (ahead + 1) + self.config.max_wait_ms / 1000.0
        return QueueStatus(waiting, in_flight, self.config.queue_capacity, estimate)

    @property
    def model_version(self) -> str:
        return self._version

    async def reload(self, checkpoint: str | Path) -> str:
        loop = asyncio.get_running_loop()
        path = str(Path(checkpoint).expanduser().resolve())
        with self._lock:
            if self._state != _RUNNING:
                raise ServiceClosedError("the caption service is not running")
            pending = _PendingReload(Reload(next(self._ids), path), loop.create_future(), loop)
            self._reloads[pending.message.id] = pending
        self._outbox.put(pending.message)
        try:
            async with asyncio.timeout(self.config.start_timeout):
                return await pending.future
        except TimeoutError:
            raise ModelLoadError(f"loading {path} took more than {self.config.start_timeout:g} s") from None
        finally:
            with self._lock:
                self._reloads.pop(pending.message.id, None)

    async def close(self, drain_timeout: float = 10.0) -> None:
        while self._state == _STARTING:
            await asyncio.sleep(0.05)
        with self._lock:
            state = self._state
            if state in (_NEW, _CLOSED) and not self._threads:
                self._state = _CLOSED
                return
            if state == _RUNNING:
                self._state = _CLOSING
        if state != _RUNNING:  # someone else is closing it
            await asyncio.to_thread(self._closed.wait)
            return
        end = time.monotonic() + max(0.0, drain_timeout)
        while time.monotonic() < end:
            with self._lock:
                busy = bool(self._pending or self._reloads)
            if not busy:
                break
            await asyncio.sleep(0.02)
        await asyncio.to_thread(self._shutdown)

    # --- extras of this implementation ----------------------------------------------------

    @property
    def worker_pid(self) -> int | None:
        child = self._child
        return child.ready.pid if child is not None else None

    def stats(self) -> ServiceStats:
        with self._lock:
            child = self._child
            counts = dict(self._counts)
            per_image = self._per_image
        return ServiceStats(
            worker_pid=child.ready.pid if child else None, device=child.ready.device if child else "",
            threads=child.ready.threads if child else 0, model_version=self._version,
            batches=counts["batches"], images=counts["images"], largest_batch=counts["largest_batch"],
            expired=counts["expired"], rejected=counts["rejected"], crashes=counts["crashes"],
            restarts=counts["restarts"], per_image_seconds=per_image, worker_rss_bytes=counts["rss"],
            worker_peak_rss_bytes=counts["peak_rss"])

    # --- the worker process ---------------------------------------------------------------

    def _settings(self) -> WorkerSettings:
        c = self.config
        return WorkerSettings(self._checkpoint, c.device, c.threads, c.max_batch_size, c.max_wait_ms,
                              c.image_limits, c.encoder_batch_size, c.warmup, c.debug_batch_delay)

    def _spawn(self) -> _Child:
        """Start a worker and wait until its model is loaded (blocking; raises ModelLoadError)."""
        context = multiprocessing.get_context("spawn")
        request_out, request_in = context.Pipe(duplex=False)
        result_out, result_in = context.Pipe(duplex=False)
        process = context.Process(target=worker_main, args=(self._settings(), request_out, result_in),
                                  name="caption-worker", daemon=True)
        self._last_start = time.monotonic()
        process.start()
        request_out.close()  # the child has its own copies: the parent sees EOF when it dies
        result_in.close()
        deadline = time.monotonic() + self.config.start_timeout
        try:
            while True:
                if self._stopping.is_set():
                    raise ModelLoadError("the service is shutting down")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ModelLoadError(
                        f"the worker did not load the model within {self.config.start_timeout:g} s")
                ready = wait([result_out, process.sentinel], timeout=min(left, _POLL))
                if result_out in ready:
                    try:
                        message = result_out.recv()
                    except (EOFError, OSError):
                        process.join(5)
                        raise ModelLoadError(
                            f"the worker exited with code {process.exitcode} while loading") from None
                    if isinstance(message, LoadFailed):
                        raise ModelLoadError(message.message)
                    if isinstance(message, Ready):
                        with self._lock:
                            self._generation += 1
                            generation = self._generation
                        return _Child(process, request_in, result_out, generation, message)
                elif process.sentinel in ready:
                    process.join(5)
                    raise ModelLoadError(f"the worker exited with code {process.exitcode} while loading")
        except BaseException:
            self._stop_process(process)
            request_in.close()
            result_out.close()
            raise

    def _install(self, child: _Child) -> None:
        """Make ``child`` the current worker (caller holds the lock)."""
        self._child = child
        self._version = child.ready.version
        self._checkpoint = child.ready.checkpoint
        self._broken = None
        self._batch_started = None
        if child.ready.per_image_seconds and not self._per_image:
            self._per_image = child.ready.per_image_seconds
        self._counts["peak_rss"] = max(self._counts["peak_rss"], child.ready.peak_rss_bytes)
        self._child_ready.set()

    def _stop_process(self, process: BaseProcess, grace: float = 0.0) -> None:
        process.join(grace)
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(5.0)

    # --- the writer thread ----------------------------------------------------------------

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            if message is _STOP:
                return
            while True:
                if self._stopping.is_set() and not isinstance(message, Shutdown):
                    break
                if not self._child_ready.wait(_POLL):
                    if self._stopping.is_set():
                        break
                    continue
                with self._lock:
                    child = self._child
                    if child is None or not self._child_ready.is_set():
                        continue
                    if not self._mark_sent(message, child.generation):
                        break
                with contextlib.suppress(OSError, ValueError):  # if it died, the monitor resubmits
                    child.send.send(message)
                break

    def _mark_sent(self, message: object, generation: int) -> bool:
        """Record which worker got the message; False if nobody waits for it any more."""
        if isinstance(message, Request):
            pending = self._pending.get(message.id)
            if pending is None or pending.request is not message:
                return False
            pending.sent_to = generation
        elif isinstance(message, Reload):
            reload = self._reloads.get(message.id)
            if reload is None:
                return False
            reload.sent_to = generation
        return True

    def _abandon(self, request_id: int) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            tell = pending is not None and pending.sent_to is not None and pending.sent_to == self._generation
        if tell:
            self._outbox.put(Cancel((request_id,)))

    # --- the monitor thread ---------------------------------------------------------------

    def _monitor(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                child = self._child
            if child is None:
                if self._stopping.wait(max(self._restart_delay, _POLL)):
                    return
                self._restart()
                continue
            try:
                ready = wait([child.receive, child.process.sentinel], timeout=_POLL)
            except OSError:
                ready = [child.process.sentinel]
            if child.receive in ready:
                try:
                    message = child.receive.recv()
                except (EOFError, OSError):
                    self._on_exit(child)
                    continue
                self._dispatch(child, message)
            elif child.process.sentinel in ready:
                self._drain(child)
                self._on_exit(child)
            else:
                self._check_hang(child)

    def _drain(self, child: _Child) -> None:
        """Answers the worker sent before it died are still in the pipe."""
        try:
            while child.receive.poll():
                self._dispatch(child, child.receive.recv())
        except (EOFError, OSError):
            pass

    def _check_hang(self, child: _Child) -> None:
        started = self._batch_started
        if started is not None and time.monotonic() - started > self.config.hang_timeout:
            log.error("caption worker %d spent over %g s on one batch; killing it", child.ready.pid,
                      self.config.hang_timeout)
            self._batch_started = None
            child.process.kill()

    def _dispatch(self, child: _Child, message: object) -> None:
        if isinstance(message, BatchStarted):
            with self._lock:
                self._batch_started = time.monotonic()
                for request_id in message.ids:
                    pending = self._pending.get(request_id)
                    if pending is not None and pending.sent_to == child.generation:
                        pending.running = True
        elif isinstance(message, BatchDone):
            with self._lock:
                self._batch_started = None
                counts = self._counts
                counts["batches"] += 1
                counts["images"] += message.batch_size
                counts["largest_batch"] = max(counts["largest_batch"], message.batch_size)
                counts["rss"] = message.rss_bytes
                counts["peak_rss"] = max(counts["peak_rss"], message.peak_rss_bytes)
                sample = message.compute_seconds / message.batch_size
                self._per_image = sample if not self._per_image else (
                    (1 - _EMA_WEIGHT) * self._per_image + _EMA_WEIGHT * sample)
                done = [(self._pending.pop(r.id), r) for r in message.results if r.id in self._pending]
            for pending, result in done:
                _resolve(pending.loop, pending.future, _to_result(result))
        elif isinstance(message, Result):
            self._answer(message.id, value=_to_result(message))
        elif isinstance(message, RequestFailed):
            error = (_image_error(message.error_type, message.message) if message.error_type
                     else ServiceError(message.message))
            self._answer(message.id, error=error)
        elif isinstance(message, Expired):
            with self._lock:
                self._counts["expired"] += len(message.ids)
            for request_id in message.ids:
                self._answer(request_id, error=RequestTimeoutError(
                    "the request's deadline passed before the worker reached it"))
        elif isinstance(message, ReloadDone):
            with self._lock:
                self._version = message.version
                self._checkpoint = message.checkpoint
                reload = self._reloads.pop(message.id, None)
            log.info("caption worker now serves model %s (%s)", message.version, message.checkpoint)
            if reload is not None:
                _resolve(reload.loop, reload.future, message.version)
        elif isinstance(message, ReloadFailed):
            with self._lock:
                reload = self._reloads.pop(message.id, None)
            if reload is not None:
                _resolve(reload.loop, reload.future, error=ModelLoadError(message.message))

    def _answer(self, request_id: int, value: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is not None:
            _resolve(pending.loop, pending.future, value, error)

    def _on_exit(self, child: _Child) -> None:
        self._stop_process(child.process, grace=1.0)
        code = child.process.exitcode
        child.send.close()
        child.receive.close()
        with self._lock:
            self._child_ready.clear()
            if self._child is child:
                self._child = None
            self._batch_started = None
            if self._stopping.is_set():
                return
            self._counts["crashes"] += 1
            failed: list[_Pending] = []
            retry: list[_Pending] = []
            for pending in list(self._pending.values()):
                if pending.sent_to != child.generation:
                    continue  # not sent yet: the writer still has it
                pending.sent_to = None
                pending.running = False
                pending.attempts += 1
                if pending.attempts >= 2:
                    del self._pending[pending.request.id]
                    failed.append(pending)
                else:
                    retry.append(pending)
            lost = [r for r in self._reloads.values() if r.sent_to == child.generation]
            for reload in lost:
                del self._reloads[reload.message.id]
        log.warning("caption worker %d died (exit code %s) with %d requests; restarting it and retrying %d",
                    child.ready.pid, code, len(failed) + len(retry), len(retry))
        for pending in retry:
            self._outbox.put(pending.request)
        for pending in failed:
            _resolve(pending.loop, pending.future, error=WorkerCrashedError(
                f"the caption worker died twice while handling this photo (last exit code {code})"))
        for reload in lost:
            _resolve(reload.loop, reload.future, error=ModelLoadError(
                f"the worker died while loading {reload.message.checkpoint} (exit code {code}); "
                "it was restarted with the previous model"))
        # A worker that dies right after starting is not restarted in a tight loop.
        if time.monotonic() - self._last_start < 10.0:
            self._restart_delay = min(max(2 * self._restart_delay, 0.5), 30.0)
        else:
            self._restart_delay = 0.0
        if self._restart_delay and self._stopping.wait(self._restart_delay):
            return
        self._restart()

    def _restart(self) -> None:
        try:
            child = self._spawn()
        except ModelLoadError as err:
            if self._stopping.is_set():
                return
            message = f"the caption worker cannot be restarted: {err}"
            log.error(message)
            with self._lock:
                self._broken = message
                failed = list(self._pending.values())
                self._pending.clear()
                reloads = list(self._reloads.values())
                self._reloads.clear()
            for pending in failed:
                _resolve(pending.loop, pending.future, error=WorkerCrashedError(message))
            for reload in reloads:
                _resolve(reload.loop, reload.future, error=ModelLoadError(message))
            self._restart_delay = min(max(2 * self._restart_delay, 1.0), 30.0)
            return
        with self._lock:
            if self._stopping.is_set():
                stale = child
            else:
                stale = None
                self._install(child)
                self._counts["restarts"] += 1
        if stale is not None:
            self._stop_process(stale.process)
            return
        log.warning("caption worker restarted (pid %d, model %s)", child.ready.pid, child.ready.version)

    # --- shutting down --------------------------------------------------------------------

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping.set()
            self._state = _CLOSED
            leftovers = list(self._pending.values())
            self._pending.clear()
            reloads = list(self._reloads.values())
            self._reloads.clear()
            child = self._child
        for pending in leftovers:
            _resolve(pending.loop, pending.future,
                     error=ServiceClosedError("the service shut down before this photo was captioned"))
        for reload in reloads:
            _resolve(reload.loop, reload.future, error=ServiceClosedError("the service shut down"))
        self._outbox.put(Shutdown())
        self._outbox.put(_STOP)
        if child is not None:
            self._stop_process(child.process, grace=self.config.shutdown_grace)
        for thread in self._threads:
            thread.join(timeout=self.config.shutdown_grace + 5.0)
        if child is not None:
            child.send.close()
            child.receive.close()
        with self._lock:
            self._child = None
            self._child_ready.clear()
        self._closed.set()
