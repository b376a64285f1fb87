"""The worker process: owns the model, decodes photos, batches requests and answers them.

Threads inside the worker:

* the receiver reads messages from the parent as they come (so a full pipe never blocks it);
* one image-decoding thread turns image bytes into model inputs (bad photos are answered from there);
* the main thread batches prepared requests: it blocks for the first, then takes more until
  ``max_batch_size`` or ``max_wait_ms``; one batched encoder pass and one batched beam search
  per beam size; a request whose deadline passed or whose caller gave up is skipped before compute;
* a loader thread loads a new checkpoint while the old model keeps serving; the main thread
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
from ..inference import Captioner
from ..result import CaptionResult
from .compute import DecodedPhoto, attention_picture, caption_batch, decode_photo, model_inputs
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
_STOP = object()


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
        self._undecoded: deque[float] = deque()  # arrival times of requests in the decode queue
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.captioner = self._load(settings.checkpoint)
        self.checkpoint = settings.checkpoint
        warm = self._warmup(self.captioner)
        self._image_decoder = ThreadPoolExecutor(1, thread_name_prefix="image-decode")
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._renderer = ThreadPoolExecutor(1, thread_name_prefix="render")
        self._send(Ready(self.captioner.version, settings.checkpoint, os.getpid(), str(self.captioner.device),
                         torch.get_num_threads(), warm, peak_rss_bytes()))
        threading.Thread(target=self._receive, name="receive", daemon=True).start()

    # --- loading --------------------------------------------------------------------------

    def _load(self, checkpoint: str | None) -> Captioner:
        captioner = Captioner.load(checkpoint, self.settings.device)
        captioner.freeze_encoder()
        if self.settings.encoder_batch_size:
            captioner.encoder_batch_size = self.settings.encoder_batch_size
        else:
            captioner.calibrate_encoder_batch_size()
        return captioner

    def _warmup(self, captioner: Captioner) -> float:
        """First calls are slow (kernel selection, allocations): pay that before serving."""
        if not self.settings.warmup:
            return 0.0
        size = captioner.model.config.image_size
        started = time.perf_counter()
        captioner.caption_tensors(torch.zeros(1, 3, size, size), attention=False)
        return time.perf_counter() - started

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
                with self._lock:
                    self._live.add(message.id)
                    self._undecoded.append(time.monotonic())
                self._image_decoder.submit(self._prepare, message)
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

    def _prepare(self, request: Request) -> None:
        with self._lock:
            received = self._undecoded[0] if self._undecoded else time.monotonic()
        try:
            self._decode_image(request, received)
        finally:
            with self._lock:
                if self._undecoded:
                    self._undecoded.popleft()

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
        wait = self.settings.max_wait_ms / 1000.0
        while True:
            item = self._inbox.get()
            if item is _STOP:
                break
            if isinstance(item, _Loaded):
                self._switch(item)
                continue
            batch: list[_Prepared] = [item]
            deferred: list[_Loaded] = []
            stop = False
            # The window opens when the batch's first photo reached this process.
            until = item.received + wait
            while len(batch) < self.settings.max_batch_size:
                now = time.monotonic()
                if now < until:
                    timeout = until - now
                elif now < until + MAX_IMAGE_DECODE_WAIT and self._image_decoding_arrived_before(until):
                    timeout = 0.005  # re-check: a photo that fails to decode never shows up here
                else:
                    timeout = 0.0
                try:
                    item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
                except queue.Empty:
                    if timeout > 0:
                        continue
                    break
                if item is _STOP:
                    stop = True
                    break
                if isinstance(item, _Loaded):
                    deferred.append(item)
                else:
                    batch.append(item)
            self._run_batch(batch)
            for loaded in deferred:
                self._switch(loaded)
            if stop:
                break
        for pool in (self._image_decoder, self._loader, self._renderer):
            pool.shutdown(wait=False, cancel_futures=True)
        return 0

    def _image_decoding_arrived_before(self, moment: float) -> bool:
        with self._lock:
            return bool(self._undecoded) and self._undecoded[0] <= moment

    def _run_batch(self, items: list[_Prepared]) -> None:
        now = time.monotonic()
        live: list[_Prepared] = []
        expired: list[int] = []
        for item in items:
            reason = self._dropped(item.request, now)
            if reason is None:
                live.append(item)
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
            captions: list[CaptionResult | None] = list(self._compute(captioner, live))
        except Exception as err:
            if _is_fatal(err):
                log.error("fatal error in a batch of %d, exiting: %r", len(live), err)
                _exit(EXIT_FATAL)
            log.exception("batch of %d failed; captioning its photos one by one", len(live))
            captions = [self._compute_alone(captioner, item) for item in live]
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

    def _compute(self, captioner: Captioner, items: list[_Prepared]) -> list[CaptionResult]:
        """One batched encoder pass, then one batched beam search per beam size."""
        photos = [DecodedPhoto(item.tensor, item.key, item.width, item.height, item.thumbnail) for item in items]
        inputs = model_inputs(captioner, photos, [item.request.image for item in items], self.settings.image_limits)
        return caption_batch(captioner, inputs, [item.request.beam_size for item in items],
                             [item.request.attention for item in items])

    def _compute_alone(self, captioner: Captioner, item: _Prepared) -> CaptionResult | None:
        try:
            return self._compute(captioner, [item])[0]
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
