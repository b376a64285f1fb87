"""The worker process: owns the model, decodes photos, batches requests and answers them.

Threads inside the worker:

* the receiver reads messages from the parent as they come (so a full pipe never blocks it);
* a pool of image-decoding threads, one per core by default (Pillow and the resize release the
  GIL), turns image bytes into model inputs (bad photos are answered from there);
* the batcher (the main thread) forms batches of prepared requests: it blocks for the first, then
  takes more until the batch is full, or until the model is free and no photo is still being
  decoded (photos being decoded are waited for up to ``max_wait_ms`` from the first photo's
  arrival); an idle model with nothing on the way starts at once. While the model computes one batch the next one
  fills up, copied photo by photo into a staging buffer (pinned memory on CUDA), and a full one
  is handed over at once, so the model never waits for stacking or the copy to the device;
* the compute thread runs one batched encoder pass and one batched beam search per beam size; a
  request whose deadline passed or whose caller gave up is skipped before compute;
* a loader thread loads a new checkpoint while the old model keeps serving; the compute thread
  switches models between batches;
* a render thread draws attention pictures, so other requests are not held up by them.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..images import ImageError
from ..inference import Captioner, photo_like_images, preprocess
from ..result import CaptionResult
from .compute import DecodedPhoto, attention_picture, caption_batch, decode_photo, model_inputs, preprocessing_key
from .config import Batching, default_decode_threads, resolve_batching
from .protocol import (
    BatchDone,
    BatchStarted,
    Cancel,
    Captioned,
    Expired,
    LoadFailed,
    Ready,
    Reload,
    ReloadDone,
    ReloadFailed,
    Request,
    RequestFailed,
    Shutdown,
    WorkerSettings,
)
from .spawn import clean_environment

log = logging.getLogger("captioner.serving.worker")

EXIT_FATAL = 70  # the worker exits with this code after a CUDA error or running out of memory
# A batch waits this long past its window for photos that arrived in the window but are still
# being decoded (decoding is faster than compute, so a short wait fills the batch).
MAX_IMAGE_DECODE_WAIT = 0.25
# Batches handed to the compute thread and not finished: the one computing and the next one,
# prepared. A third would only wait longer and be smaller than if it kept filling.
PIPELINE_DEPTH = 2
_STOP = object()
_IDLE = object()  # compute -> batcher: a batch is finished


@dataclass
class _Prepared:
    request: Request
    received: float
    tensor: Tensor
    key: tuple[Any, ...]  # the preprocessing it went through
    width: int
    height: int
    thumbnail: Image.Image | None  # for the attention picture
    prep_seconds: float


@dataclass
class _Batch:
    items: list[_Prepared]
    inputs: Tensor | None  # the staged (stacked) inputs of every item, when all could be staged
    key: tuple[Any, ...]  # the preprocessing of the staged inputs


class _StagingRing:
    """Buffers that batches are stacked into as their photos arrive, one per batch that can be
    alive at once (computing, handed over, filling); pinned on CUDA so that the copy to the
    device is asynchronous. A buffer is reused only after its batch has finished."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._buffers: list[Tensor | None] = [None] * (PIPELINE_DEPTH + 1)
        self._next = 0

    def take(self, rows: int, shape: torch.Size) -> Tensor:
        index = self._next
        self._next = (index + 1) % len(self._buffers)
        buffer = self._buffers[index]
        if buffer is None or buffer.shape[0] < rows or buffer.shape[1:] != shape:
            buffer = torch.empty((rows, *shape), dtype=torch.float32, pin_memory=self.pin)
            self._buffers[index] = buffer
        return buffer


class _Filling:
    """The batch being formed: its photos, and their inputs stacked into a staging buffer."""

    def __init__(self, ring: _StagingRing, capacity: int, key: tuple[Any, ...]) -> None:
        self.ring = ring
        self.capacity = capacity
        self.key = key
        self.items: list[_Prepared] = []
        self.buffer: Tensor | None = None
        self.staged = True  # every item's input is in the buffer

    def add(self, item: _Prepared) -> None:
        if self.buffer is None and item.key == self.key:
            self.buffer = self.ring.take(self.capacity, item.tensor.shape)
        row = len(self.items)
        self.items.append(item)
        if item.key == () and not item.tensor.numel():
            return  # dropped before decoding: skipped before compute, its row is never read
        if self.buffer is None or item.key != self.key or item.tensor.shape != self.buffer.shape[1:]:
            self.staged = False
            return
        self.buffer[row].copy_(item.tensor)

    def window_closes(self, wait: float) -> float:
        return min(item.received for item in self.items) + wait

    def close(self) -> _Batch:
        inputs = self.buffer[: len(self.items)] if self.staged and self.buffer is not None else None
        return _Batch(self.items, inputs, self.key)


@dataclass
class _Loaded:
    reload: Reload
    captioner: Captioner


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _is_fatal(err: BaseException) -> bool:
    """Errors after which this process should not go on (the parent restarts it)."""
    if isinstance(err, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return "CUDA" in str(err) or "cuDNN" in str(err) or "CUBLAS" in str(err)


class Worker:
    def __init__(self, settings: WorkerSettings, requests: Connection, results: Connection) -> None:
        self.settings = settings
        self.requests = requests
        self.results = results
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._live: set[int] = set()  # received and not answered
        self._cancelled: set[int] = set()
        # Arrival times of the requests being decoded, oldest first (dicts keep insertion order).
        self._undecoded: dict[int, float] = {}
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()  # -> the batcher
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()  # batcher -> the compute thread
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.captioner = self._load(settings.checkpoint)
        self.checkpoint = settings.checkpoint
        self.batching: Batching = resolve_batching(settings.max_batch_size, settings.max_wait_ms,
                                                   self.captioner.device.type)
        warm = self._warmup(self.captioner)
        self.decode_threads = settings.decode_threads or default_decode_threads()
        self._ring = _StagingRing(pin=self.captioner.device.type == "cuda")
        self._image_decoder = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="image-decode")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="render")
        self._compute_thread = threading.Thread(target=self._compute_loop, name="compute", daemon=True)
        self._compute_thread.start()
        self._send(Ready(self.captioner.version, settings.checkpoint, os.getpid(), str(self.captioner.device),
                         torch.get_num_threads(), warm, peak_rss_bytes(), self.batching.max_batch_size,
                         self.batching.max_wait_ms, self.decode_threads, settings.precision))
        threading.Thread(target=self._receive, name="receive", daemon=True).start()

    # --- loading --------------------------------------------------------------------------

    def _load(self, checkpoint: str | None) -> Captioner:
        captioner = Captioner.load(checkpoint, self.settings.device, precision=self.settings.precision)
        captioner.freeze_encoder()
        if self.settings.encoder_batch_size:
            captioner.encoder_batch_size = self.settings.encoder_batch_size
        else:
            captioner.calibrate_encoder_batch_size()
        return captioner

    def _warmup(self, captioner: Captioner) -> float:
        """First calls are slow (kernel selection, allocations): pay that before serving. Returns
        the seconds per photo of a full batch of photo-like images, timed after that: what a
        full queue costs, which is what the service's admission needs to know first."""
        if not self.settings.warmup:
            return 0.0
        size = captioner.model.config.image_size
        captioner.caption_tensors(torch.zeros(1, 3, size, size), attention=False)
        count = self.batching.max_batch_size
        # A few distinct pictures, repeated: making 128 of them would cost more than captioning.
        pictures = photo_like_images(min(count, 4), size=size)
        batch = torch.stack([preprocess(captioner.model, pictures[i % len(pictures)]) for i in range(count)])
        started = time.perf_counter()
        captioner.caption_tensors(batch, attention=False)
        return (time.perf_counter() - started) / count

    def _load_new(self, message: Reload) -> None:
        try:
            captioner = self._load(message.checkpoint)
            self._warmup(captioner)
        except Exception as err:
            log.warning("reload of %s failed: %s", message.checkpoint, err)
            self._send(ReloadFailed(message.id, f"{type(err).__name__}: {err}"))
            return
        self._inbox.put(_Loaded(message, captioner))

    def _switch(self, loaded: _Loaded) -> None:
        self.captioner = loaded.captioner
        self.checkpoint = loaded.reload.checkpoint
        self._send(ReloadDone(loaded.reload.id, self.captioner.version, loaded.reload.checkpoint))
        gc.collect()

    # --- messages in and out --------------------------------------------------------------

    def _send(self, message: object) -> None:
        with self._send_lock:
            try:
                self.results.send(message)
            except (OSError, ValueError):  # the parent is gone: nothing left to serve
                _exit(0)

    def _receive(self) -> None:
        while True:
            try:
                message = self.requests.recv()
            except (EOFError, OSError):
                self._inbox.put(_STOP)
                return
            if isinstance(message, Request):
                arrived = time.monotonic()
                with self._lock:
                    self._live.add(message.id)
                    self._undecoded[message.id] = arrived
                self._image_decoder.submit(self._prepare, message, arrived)
            elif isinstance(message, Cancel):
                with self._lock:
                    self._cancelled.update(i for i in message.ids if i in self._live)
            elif isinstance(message, Reload):
                self._loader.submit(self._load_new, message)
            elif isinstance(message, Shutdown):
                self._inbox.put(_STOP)
                return

    def _forget(self, request_id: int) -> None:
        with self._lock:
            self._live.discard(request_id)
            self._cancelled.discard(request_id)

    def _dropped(self, request: Request, now: float) -> str | None:
        with self._lock:
            if request.id in self._cancelled:
                return "cancelled"
        return "expired" if request.deadline <= now else None

    # --- decoding photos ------------------------------------------------------------------

    def _prepare(self, request: Request, received: float) -> None:
        try:
            self._decode_image(request, received)
        finally:
            with self._lock:
                self._undecoded.pop(request.id, None)

    def _decode_image(self, request: Request, received: float) -> None:
        if self._dropped(request, time.monotonic()):  # no decoding for nobody; the batcher answers
            self._inbox.put(_Prepared(request, received, torch.empty(0), (), 0, 0, None, 0.0))
            return
        started = time.perf_counter()
        try:
            photo = decode_photo(self.captioner, request.image, self.settings.image_limits, request.attention)
        except ImageError as err:
            self._forget(request.id)
            self._send(RequestFailed.bad_image(request.id, err))
            return
        self._inbox.put(_Prepared(request, received, photo.tensor, photo.key, photo.width, photo.height,
                                  photo.thumbnail, time.perf_counter() - started))

    # --- batching -------------------------------------------------------------------------

    def run(self) -> int:
        """The batcher: forms batches and hands them to the compute thread (see the module doc)."""
        filling: _Filling | None = None
        backlog: deque[_Prepared] = deque()  # prepared while the batch being filled is full
        outstanding = 0  # batches handed over and not finished
        stopping = False
        while True:
            while backlog and (filling is None or len(filling.items) < self.batching.max_batch_size):
                if filling is None:
                    filling = _Filling(self._ring, self.batching.max_batch_size, preprocessing_key(self.captioner))
                filling.add(backlog.popleft())
            if filling is not None:
                timeout = self._batch_timeout(filling, outstanding, stopping)
                if timeout == 0:
                    self._work.put(filling.close())
                    filling, outstanding = None, outstanding + 1
                    continue
            elif stopping:
                break
            else:
                timeout = None
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                continue
            if item is _STOP:
                stopping = True
            elif item is _IDLE:
                outstanding -= 1
            elif isinstance(item, _Loaded):
                self._work.put(item)  # switched between batches, in order, by the compute thread
            else:
                backlog.append(item)
        self._work.put(_STOP)
        self._compute_thread.join()
        for pool in (self._image_decoder, self._loader, self._renderer):
            pool.shutdown(wait=False, cancel_futures=True)
        return 0

    def _batch_timeout(self, filling: _Filling, outstanding: int, stopping: bool) -> float | None:
        """0: hand the batch over now; None: wait for the next message; else wait at most this long."""
        if outstanding >= PIPELINE_DEPTH:
            return None  # one computing and one ready: this one fills up until the first finishes
        if len(filling.items) >= self.batching.max_batch_size or stopping:
            return 0
        if outstanding:
            return None  # the model is busy: keep filling this batch until it is free
        now = time.monotonic()
        if not self._image_decoding_arrived_before(now):
            # The model is idle and no photo is on its way: waiting would only add latency. Under
            # load, batches fill up while the model computes (above), so this costs no throughput.
            return 0
        until = filling.window_closes(self.batching.max_wait_ms / 1000.0)
        if now < until:
            return until - now
        if now < until + MAX_IMAGE_DECODE_WAIT and self._image_decoding_arrived_before(until):
            return 0.005  # re-check: a photo that fails to decode never shows up here
        return 0

    def _image_decoding_arrived_before(self, moment: float) -> bool:
        with self._lock:
            oldest = next(iter(self._undecoded.values()), None)
        return oldest is not None and oldest <= moment

    # --- computing ------------------------------------------------------------------------

    def _compute_loop(self) -> None:
        while True:
            work = self._work.get()
            if work is _STOP:
                return
            if isinstance(work, _Loaded):
                self._switch(work)
                continue
            try:
                self._run_batch(work)
            finally:
                self._inbox.put(_IDLE)

    def _run_batch(self, batch: _Batch) -> None:
        now = time.monotonic()
        live: list[_Prepared] = []
        rows: list[int] = []
        expired: list[int] = []
        for row, item in enumerate(batch.items):
            reason = self._dropped(item.request, now)
            if reason is None:
                live.append(item)
                rows.append(row)
                continue
            self._forget(item.request.id)
            if reason == "expired":
                expired.append(item.request.id)
        if expired:
            self._send(Expired(tuple(expired)))
        if not live:
            return
        self._send(BatchStarted(tuple(item.request.id for item in live), now))
        started = time.perf_counter()
        if self.settings.debug_batch_delay:
            time.sleep(self.settings.debug_batch_delay)
        captioner = self.captioner
        try:
            inputs = self._inputs(captioner, batch, live, rows)
            captions: list[CaptionResult | None] = list(self._compute(captioner, live, inputs))
        except Exception as err:
            if _is_fatal(err):
                log.error("fatal error in a batch of %d, exiting: %r", len(live), err)
                _exit(EXIT_FATAL)
            log.exception("batch of %d failed; captioning its photos one by one", len(live))
            captions = [self._compute_alone(captioner, item) for item in live]
        finally:
            if captioner.device.type == "cuda":  # the staged inputs' copy is done before the buffer is reused
                torch.cuda.synchronize(captioner.device)
        compute = time.perf_counter() - started
        results = []
        for item, caption in zip(live, captions, strict=True):
            self._forget(item.request.id)
            if caption is None:
                continue
            result = replace(caption, width=item.width, height=item.height, batch_size=len(live),
                             queue_seconds=max(0.0, now - item.request.submitted),
                             compute_seconds=compute + item.prep_seconds)
            if item.request.attention:
                self._renderer.submit(self._render, item.request.id, result, item.thumbnail)
            else:
                results.append(Captioned(item.request.id, replace(result, attention=None)))
        self._send(BatchDone(tuple(results), len(live), compute, rss_bytes(), peak_rss_bytes()))

    def _inputs(self, captioner: Captioner, batch: _Batch, live: list[_Prepared], rows: list[int]) -> Tensor:
        """The live photos' inputs: the staged ones when they were prepared for this model, else
        stacked here (photos prepared for a model that a reload replaced are prepared again)."""
        key = preprocessing_key(captioner)
        if batch.inputs is not None and batch.key == key:
            if len(rows) == len(batch.items):
                return batch.inputs
            return batch.inputs.index_select(0, torch.tensor(rows))
        return self._stacked(captioner, live)

    def _stacked(self, captioner: Captioner, items: list[_Prepared]) -> Tensor:
        photos = [DecodedPhoto(item.tensor, item.key, item.width, item.height, item.thumbnail) for item in items]
        return model_inputs(captioner, photos, [item.request.image for item in items], self.settings.image_limits)

    def _compute(self, captioner: Captioner, items: list[_Prepared], inputs: Tensor) -> list[CaptionResult]:
        """One batched encoder pass, then one batched beam search per beam size."""
        return caption_batch(captioner, inputs, [item.request.beam_size for item in items],
                             [item.request.attention for item in items])

    def _compute_alone(self, captioner: Captioner, item: _Prepared) -> CaptionResult | None:
        try:
            return self._compute(captioner, [item], self._stacked(captioner, [item]))[0]
        except Exception as err:
            if _is_fatal(err):
                _exit(EXIT_FATAL)
            log.exception("request %d failed", item.request.id)
            self._send(RequestFailed(item.request.id, f"captioning failed: {type(err).__name__}: {err}"))
            return None

    def _render(self, request_id: int, result: CaptionResult, thumbnail: Image.Image | None) -> None:
        picture = attention_picture(thumbnail, result)
        self._send(Captioned(request_id, replace(result, attention=None, attention_png=picture)))


def _exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def worker_main(settings: WorkerSettings, requests: Connection, results: Connection) -> None:
    """Entry point of the worker process (started with the spawn method)."""
    clean_environment()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which shuts us down
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s caption-worker[%(process)d] %(levelname)s %(message)s")
    try:
        worker = Worker(settings, requests, results)
    except Exception as err:
        with contextlib.suppress(OSError, ValueError):
            results.send(LoadFailed(f"{type(err).__name__}: {err}"))
        _exit(2)
    _exit(worker.run())
