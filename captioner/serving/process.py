"""The default caption service: a worker process on this machine, fed through pipes.

The parent keeps one future per request, keyed by request id, and two threads:

* the writer sends requests to the current worker (waiting while a worker starts);
* the monitor reads the worker's answers, resolves futures on their callers' event loops, and
  notices the worker's death (pipe EOF or process sentinel): it then starts a new worker and
  resubmits the requests the dead one had; a request that was with two dead workers fails with
  :class:`WorkerCrashedError`. Every request has a deadline, so no caller waits forever.

Nothing here runs on the caller's event loop but bookkeeping: photos are decoded in the worker.
Helpers: ``spawn`` starts and stops worker processes, ``calls`` keeps the calls waiting for an
answer, ``stats`` counts; ``protocol`` (imported as ``wire``) has the messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from ..result import CaptionResult
from . import protocol as wire
from .base import (
    CaptionService,
    ModelLoadError,
    QueueFullError,
    QueueStatus,
    RequestTimeoutError,
    ServiceClosedError,
    WorkerCrashedError,
)
from .calls import PendingReload, PendingRequest, fail_all, mark_sent, resolve, take_from_dead_worker
from .config import ServiceConfig
from .spawn import POLL, WorkerHandle, restart_delay, spawn_worker, stop_process
from .stats import Counters, ServiceStats

log = logging.getLogger("captioner.serving")

_NEW, _STARTING, _RUNNING, _CLOSING, _CLOSED = "new", "starting", "running", "closing", "closed"
_STOP = object()


class ProcessCaptionService(CaptionService):
    """Captions photos in a separate worker process (spawn) that batches concurrent requests.

    Use it from any event loop (or several); ``start()`` once, ``close()`` at the end::

        service = ProcessCaptionService(ServiceConfig(checkpoint="runs/best", device="auto"))
        await service.start()
        result = await service.caption(photo_bytes, beam_size=3)
        await service.close()
    """

    def __init__(self, config: ServiceConfig | None = None) -> None:
        self.config = config or ServiceConfig()
        self._lock = threading.Lock()
        self._state = _NEW
        self._pending: dict[int, PendingRequest] = {}
        self._reloads: dict[int, PendingReload] = {}
        self._ids = itertools.count(1)
        self._outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._child: WorkerHandle | None = None
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
        self._threads: list[threading.Thread] = []
        self._counts = Counters()

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
            self._admit()
            now = time.monotonic()
            request = wire.Request(next(self._ids), data, beam, bool(attention), now + limit, now)
            pending = PendingRequest(request, loop.create_future(), loop)
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
            estimate = self._estimated_wait(len(self._pending))
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
            pending = PendingReload(wire.Reload(next(self._ids), path), loop.create_future(), loop)
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

    # --- admission ------------------------------------------------------------------------

    def _estimated_wait(self, ahead: int) -> float:
        """Seconds until a request submitted behind ``ahead`` others is answered, at the measured
        seconds per photo (0 until a warm-up or a batch measured it; caller holds the lock)."""
        child = self._child
        window = child.ready.max_wait_ms if child is not None else (self.config.max_wait_ms or 0.0)
        return self._counts.per_image_seconds * (ahead + 1) + window / 1000.0

    def _admit(self) -> None:
        """Raise QueueFullError unless one more request fits (caller holds the lock)."""
        ahead = len(self._pending)
        refusal = queue_refusal(ahead, self._estimated_wait(ahead) if ahead else 0.0,
                                self.config.queue_capacity, self.config.max_queue_seconds)
        if refusal is not None:
            self._counts.rejected += 1
            raise QueueFullError(f"{refusal}; try again shortly")

    # --- extras of this implementation ----------------------------------------------------

    @property
    def worker_pid(self) -> int | None:
        child = self._child
        return child.ready.pid if child is not None else None

    def stats(self) -> ServiceStats:
        with self._lock:
            child = self._child
            return self._counts.snapshot(child.ready if child else None, self._version)

    # --- the worker process ---------------------------------------------------------------

    def _spawn(self) -> WorkerHandle:
        """Start a worker and wait until its model is loaded (blocking; raises ModelLoadError)."""
        self._last_start = time.monotonic()
        settings = wire.WorkerSettings.of(self.config, self._checkpoint)
        child = spawn_worker(settings, self.config.start_timeout, self._stopping)
        with self._lock:
            self._generation += 1
            child.generation = self._generation
        return child

    def _install(self, child: WorkerHandle) -> None:
        """Make ``child`` the current worker (caller holds the lock)."""
        self._child = child
        self._version = child.ready.version
        self._checkpoint = child.ready.checkpoint
        self._broken = None
        self._batch_started = None
        self._counts.worker_started(child.ready)
        self._child_ready.set()

    # --- the writer thread ----------------------------------------------------------------

    def _write(self) -> None:
        while True:
            message = self._outbox.get()
            if message is _STOP:
                return
            while True:
                if self._stopping.is_set() and not isinstance(message, wire.Shutdown):
                    break
                if not self._child_ready.wait(POLL):
                    if self._stopping.is_set():
                        break
                    continue
                with self._lock:
                    child = self._child
                    if child is None or not self._child_ready.is_set():
                        continue
                    if not mark_sent(message, child.generation, self._pending, self._reloads):
                        break
                with contextlib.suppress(OSError, ValueError):  # if it died, the monitor resubmits
                    child.send.send(message)
                break

    def _abandon(self, request_id: int) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            tell = pending is not None and pending.sent_to is not None and pending.sent_to == self._generation
        if tell:
            self._outbox.put(wire.Cancel((request_id,)))

    # --- the monitor thread ---------------------------------------------------------------

    def _monitor(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                child = self._child
            if child is None:
                if self._stopping.wait(max(self._restart_delay, POLL)):
                    return
                self._restart()
                continue
            try:
                ready = wait([child.receive, child.process.sentinel], timeout=POLL)
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

    def _drain(self, child: WorkerHandle) -> None:
        """Answers the worker sent before it died are still in the pipe."""
        try:
            while child.receive.poll():
                self._dispatch(child, child.receive.recv())
        except (EOFError, OSError):
            pass

    def _check_hang(self, child: WorkerHandle) -> None:
        started = self._batch_started
        if started is not None and time.monotonic() - started > self.config.hang_timeout:
            log.error("caption worker %d spent over %g s on one batch; killing it", child.ready.pid,
                      self.config.hang_timeout)
            self._batch_started = None
            child.process.kill()

    def _dispatch(self, child: WorkerHandle, message: object) -> None:
        if isinstance(message, wire.BatchStarted):
            with self._lock:
                self._batch_started = time.monotonic()
                for request_id in message.ids:
                    pending = self._pending.get(request_id)
                    if pending is not None and pending.sent_to == child.generation:
                        pending.running = True
        elif isinstance(message, wire.BatchDone):
            with self._lock:
                self._batch_started = None
                self._counts.batch_done(message)
            for answer in message.results:
                self._answer(answer.id, value=answer.result)
        elif isinstance(message, wire.Captioned):
            self._answer(message.id, value=message.result)
        elif isinstance(message, wire.RequestFailed):
            self._answer(message.id, error=message.error())
        elif isinstance(message, wire.Expired):
            with self._lock:
                self._counts.expired += len(message.ids)
            for request_id in message.ids:
                self._answer(request_id, error=RequestTimeoutError(
                    "the request's deadline passed before the worker reached it"))
        elif isinstance(message, wire.ReloadDone):
            self._reload_done(message)
        elif isinstance(message, wire.ReloadFailed):
            self._settle_reload(message.id, error=ModelLoadError(message.message))

    def _answer(self, request_id: int, value: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is not None:
            resolve(pending.loop, pending.future, value, error)

    def _reload_done(self, message: wire.ReloadDone) -> None:
        with self._lock:
            self._version, self._checkpoint = message.version, message.checkpoint
        log.info("caption worker now serves model %s (%s)", message.version, message.checkpoint)
        self._settle_reload(message.id, value=message.version)

    def _settle_reload(self, reload_id: int, value: str | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            reload = self._reloads.pop(reload_id, None)
        if reload is not None:
            resolve(reload.loop, reload.future, value, error)

    def _take_all(self) -> tuple[list[PendingRequest], list[PendingReload]]:
        """Every call still waiting, which nobody else will answer now (caller holds the lock)."""
        requests, reloads = list(self._pending.values()), list(self._reloads.values())
        self._pending.clear()
        self._reloads.clear()
        return requests, reloads

    def _on_exit(self, child: WorkerHandle) -> None:
        stop_process(child.process, grace=1.0)
        code = child.process.exitcode
        child.close_pipes()
        with self._lock:
            self._child_ready.clear()
            if self._child is child:
                self._child = None
            self._batch_started = None
            if self._stopping.is_set():
                return
            self._counts.crashes += 1
            retry, failed = take_from_dead_worker(self._pending, child.generation)
            lost = [r for r in self._reloads.values() if r.sent_to == child.generation]
            for reload in lost:
                del self._reloads[reload.message.id]
        log.warning("caption worker %d died (exit code %s) with %d requests; restarting it and retrying %d",
                    child.ready.pid, code, len(failed) + len(retry), len(retry))
        for pending in retry:
            self._outbox.put(pending.request)
        fail_all(failed, WorkerCrashedError,
                 f"the caption worker died twice while handling this photo (last exit code {code})")
        for reload in lost:
            resolve(reload.loop, reload.future, error=ModelLoadError(
                f"the worker died while loading {reload.message.checkpoint} (exit code {code}); "
                "it was restarted with the previous model"))
        self._restart_delay = restart_delay(self._restart_delay, time.monotonic() - self._last_start)
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
                failed, reloads = self._take_all()
            fail_all(failed, WorkerCrashedError, message)
            fail_all(reloads, ModelLoadError, message)
            self._restart_delay = restart_delay(self._restart_delay, start_failed=True)
            return
        with self._lock:
            stale = self._stopping.is_set()
            if not stale:
                self._install(child)
                self._counts.restarts += 1
        if stale:
            stop_process(child.process)
            return
        log.warning("caption worker restarted (pid %d, model %s)", child.ready.pid, child.ready.version)

    # --- shutting down --------------------------------------------------------------------

    def _shutdown(self) -> None:
        with self._lock:
            self._stopping.set()
            self._state = _CLOSED
            leftovers, reloads = self._take_all()
            child = self._child
        fail_all(leftovers, ServiceClosedError, "the service shut down before this photo was captioned")
        fail_all(reloads, ServiceClosedError, "the service shut down")
        self._outbox.put(wire.Shutdown())
        self._outbox.put(_STOP)
        if child is not None:
            stop_process(child.process, grace=self.config.shutdown_grace)
        for thread in self._threads:
            thread.join(timeout=self.config.shutdown_grace + 5.0)
        if child is not None:
            child.close_pipes()
        with self._lock:
            self._child = None
            self._child_ready.clear()
        self._closed.set()


def queue_refusal(ahead: int, estimated_wait: float, capacity: int, max_seconds: float) -> str | None:
    """Why a request behind ``ahead`` others, answered in about ``estimated_wait`` seconds, is
    refused; None when it is taken.

    The limit is seconds of work: the photos ahead at the measured seconds per photo must be done
    within ``max_seconds``. A request to an idle service is always taken (however slow the
    device), and ``capacity`` bounds the photos held whatever the speed (memory).
    """
    if ahead >= capacity:
        return f"{ahead} photos are queued (the limit is {capacity})"
    if ahead and estimated_wait > max_seconds:
        return f"{ahead} photos are queued, about {estimated_wait:.1f} s of work (the limit is {max_seconds:g} s)"
    return None
