"""Counters of the process caption service, for logs, metrics and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import BatchDone, Ready

EMA_WEIGHT = 0.2  # of the newest batch in the moving average of per-image compute time


@dataclass(frozen=True)
class ServiceStats:
    """A snapshot of the counters (not part of the CaptionService interface)."""

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
    per_image_seconds: float  # moving average of batch compute time / batch size, weighted by batch size
    worker_rss_bytes: int
    worker_peak_rss_bytes: int  # the largest peak RSS reported by any worker process
    # What the worker resolved for its device (0 / "" before it started).
    max_batch_size: int = 0
    max_wait_ms: float = 0.0
    decode_threads: int = 0
    precision: str = ""


@dataclass
class Counters:
    """What the service counts as it runs (the caller holds the service's lock)."""

    batches: int = 0
    images: int = 0
    largest_batch: int = 0
    expired: int = 0
    rejected: int = 0
    crashes: int = 0
    restarts: int = 0
    rss: int = 0
    peak_rss: int = 0
    per_image_seconds: float = 0.0
    full_batch: int = 1  # the worker's batch size

    def worker_started(self, ready: Ready) -> None:
        self.full_batch = max(1, ready.max_batch_size)
        if ready.per_image_seconds and not self.per_image_seconds:
            self.per_image_seconds = ready.per_image_seconds  # the warm-up's, until batches run
        self.peak_rss = max(self.peak_rss, ready.peak_rss_bytes)

    def batch_done(self, done: BatchDone) -> None:
        self.batches += 1
        self.images += done.batch_size
        self.largest_batch = max(self.largest_batch, done.batch_size)
        self.rss = done.rss_bytes
        self.peak_rss = max(self.peak_rss, done.peak_rss_bytes)
        sample = done.compute_seconds / done.batch_size
        previous = self.per_image_seconds
        # A batch counts in proportion to its size: the batches of one an idle service runs cost
        # more per photo than the full batches a long queue gets, and admission is about the latter.
        weight = EMA_WEIGHT * min(1.0, done.batch_size / max(1, self.full_batch))
        self.per_image_seconds = sample if not previous else (1 - weight) * previous + weight * sample

    def snapshot(self, worker: Ready | None, model_version: str) -> ServiceStats:
        return ServiceStats(
            worker_pid=worker.pid if worker else None, device=worker.device if worker else "",
            threads=worker.threads if worker else 0, model_version=model_version, batches=self.batches,
            images=self.images, largest_batch=self.largest_batch, expired=self.expired,
            rejected=self.rejected, crashes=self.crashes, restarts=self.restarts,
            per_image_seconds=self.per_image_seconds, worker_rss_bytes=self.rss,
            worker_peak_rss_bytes=self.peak_rss, max_batch_size=worker.max_batch_size if worker else 0,
            max_wait_ms=worker.max_wait_ms if worker else 0.0, decode_threads=worker.decode_threads if worker else 0,
            precision=worker.precision if worker else "")
