"""Every Prometheus metric of the bot, in one place, with the small functions the handlers call.

:class:`BotMetrics` owns a dedicated ``CollectorRegistry`` (never the global one), so two bots in
one process (the tests) never share a count. It is created with the bot and always counts (a few
dictionary updates per photo); ``bot/ops.py`` serves it only when ``CAPTIONBOT_METRICS_PORT`` is
set. Labels take values from fixed sets (enum codes, "up"/"down", the serving model's version)
and never a person's id, text or the token.

Values read at scrape time (queue depth, the serving model, the time of the last getUpdates)
come from :meth:`BotMetrics.watch_service` and :class:`PollWatch` instead of being copied on
every change, so they cannot go stale.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from captioner.images import ImageError
from captioner.serving.base import (
    CaptionResult,
    CaptionService,
    QueueFullError,
    RequestTimeoutError,
    ServiceClosedError,
    WorkerCrashedError,
)

PREFIX = "captionbot"
# From a cached tiny-model caption (a few ms) to a photo that waited for a long CPU queue.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")


def error_code(err: BaseException) -> str:
    """The label for a failed photo: the image problem's code, or the service error's kind."""
    if isinstance(err, ImageError):
        return safe_label(err.code.value)
    for kind, code in ((QueueFullError, "queue_full"), (RequestTimeoutError, "timeout"),
                       (ServiceClosedError, "service_closed"), (WorkerCrashedError, "worker_crashed")):
        if isinstance(err, kind):
            return code
    return "service_error"


def safe_label(value: str) -> str:
    """A label value from a fixed vocabulary of codes; anything else is "other" (labels must not
    grow without bound, and must not carry what an attacker chose)."""
    return value if _CODE.fullmatch(value) else "other"


class PollWatch:
    """When the bot last heard back from a getUpdates call (``bot/ops.py``'s request records it)."""

    def __init__(self) -> None:
        self.started_at: float | None = None  # monotonic, when polling was started
        self.last_ok: float | None = None  # monotonic, the last getUpdates answered with 200
        self.last_ok_unix: float | None = None
        self.failures = 0  # getUpdates calls that failed (network error or a non-200 answer)

    def polling_started(self) -> None:
        self.started_at = time.monotonic()

    def answered(self) -> None:
        self.last_ok = time.monotonic()
        self.last_ok_unix = time.time()

    def failed(self) -> None:
        self.failures += 1

    def quiet_seconds(self) -> float | None:
        """Seconds since the last good poll (or since polling started); None before it started."""
        last = self.last_ok if self.last_ok is not None else self.started_at
        return None if last is None else time.monotonic() - last


@dataclass
class ServiceEvidence:
    """What real traffic says about the caption service (the health check trusts it for a while)."""

    last_answer: float | None = None  # monotonic: the service returned a caption
    last_failure: float | None = None  # monotonic: it failed in a way that is not the photo's fault


class BotMetrics:
    """The bot's metrics. Call the ``note_*`` functions where the event happens."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.evidence = ServiceEvidence()
        self.poll = PollWatch()
        r = self.registry
        self._photos = Counter(f"{PREFIX}_photos_received", "Photo requests taken (photos, image files, "
                               "/caption), redeliveries not counted", registry=r)
        self._captions = Counter(f"{PREFIX}_captions_sent", "Captions sent to people", registry=r)
        self._busy = Counter(f"{PREFIX}_busy_answers", "Photos answered with 'busy': source=bot (the "
                             "bot's own limit on photos in hand) or service (the caption queue is full)",
                             ["source"], registry=r)
        self._errors = Counter(f"{PREFIX}_errors", "Photos or updates that ended in an error, by code",
                               ["code"], registry=r)
        self._rate_limited = Counter(f"{PREFIX}_rate_limited", "Photos refused by a person's rate limit",
                                     registry=r)
        self._batch = Histogram(f"{PREFIX}_batch_size_photos", "Photos in the batch each caption was "
                                "computed in", buckets=BATCH_BUCKETS, registry=r)
        self._queue_wait = Histogram(f"{PREFIX}_queue_wait_seconds", "From submission to the caption "
                                     "service until the photo's batch started", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self._model = Histogram(f"{PREFIX}_model_seconds", "Model time of the photo's batch (decode, "
                                "encoder, beam search)", buckets=LATENCY_BUCKETS, registry=r)
        self._end_to_end = Histogram(f"{PREFIX}_end_to_end_seconds", "From the bot taking the photo's "
                                     "update to the caption sent", buckets=LATENCY_BUCKETS, registry=r)
        self._votes = Counter(f"{PREFIX}_votes", "Votes recorded or changed, by kind", ["kind"], registry=r)
        self._corrections = Counter(f"{PREFIX}_corrections", "Corrections by outcome: screening's status "
                                    "(accepted, flagged, held_for_review) or rejected", ["outcome"], registry=r)
        self._rejections = Counter(f"{PREFIX}_corrections_rejected", "Corrections not recorded, by reason",
                                   ["reason"], registry=r)
        self._reloads = Counter(f"{PREFIX}_model_reloads", "Switches to a promoted model, by outcome",
                                ["outcome"], registry=r)
        self._probes = Counter(f"{PREFIX}_health_probes", "Photos the health check captioned to see that "
                               "the caption service answers, by outcome", ["outcome"], registry=r)
        self._live = _LiveCollector(self.poll)
        r.register(self._live)

    # --- live values -------------------------------------------------------------------------

    def watch_service(self, service: Callable[[], CaptionService | None]) -> None:
        """Read the queue and the serving model from whatever service ``service()`` returns now."""
        self._live.service = service

    # --- photos ------------------------------------------------------------------------------

    def note_photo_received(self) -> None:
        self._photos.inc()

    def note_busy(self, source: str) -> None:
        self._busy.labels(source=source).inc()

    def note_rate_limited(self) -> None:
        self._rate_limited.inc()

    def note_error(self, code: str) -> None:
        self._errors.labels(code=safe_label(code)).inc()

    def note_service_answered(self, result: CaptionResult) -> None:
        """The caption service returned a caption: its batch and timings."""
        self.evidence.last_answer = time.monotonic()
        self._batch.observe(result.batch_size)
        self._queue_wait.observe(max(0.0, result.queue_seconds))
        self._model.observe(max(0.0, result.compute_seconds))

    def note_service_failed(self, err: BaseException) -> None:
        """The caption service did not caption a photo; a failure that is not the photo's fault
        also tells the health check to look again instead of trusting the last answer."""
        code = error_code(err)
        if code == "queue_full":
            self.note_busy("service")
            return
        self.note_error(code)
        if not isinstance(err, ImageError):
            self.evidence.last_failure = time.monotonic()

    def note_caption_sent(self, seconds: float) -> None:
        self._captions.inc()
        self._end_to_end.observe(max(0.0, seconds))

    # --- votes, corrections, models ----------------------------------------------------------

    def note_vote(self, up: bool) -> None:
        self._votes.labels(kind="up" if up else "down").inc()

    def note_correction(self, status: str) -> None:
        self._corrections.labels(outcome=safe_label(status)).inc()

    def note_correction_rejected(self, reason: str) -> None:
        self._corrections.labels(outcome="rejected").inc()
        self._rejections.labels(reason=safe_label(reason)).inc()

    def note_reload(self, outcome: str) -> None:
        self._reloads.labels(outcome=safe_label(outcome)).inc()

    def note_probe(self, outcome: str) -> None:
        self._probes.labels(outcome=safe_label(outcome)).inc()


class _LiveCollector(Collector):
    """Gauges read when Prometheus scrapes: the caption queue, the serving model, the last poll."""

    def __init__(self, poll: PollWatch) -> None:
        self.poll = poll
        self.service: Callable[[], CaptionService | None] = lambda: None

    def collect(self) -> Iterable[Metric]:
        yield from self._polling()
        service = self.service()
        if service is None:
            return
        yield from self._queue(service)
        version = service.model_version
        if version:
            info = InfoMetricFamily(f"{PREFIX}_model", "The caption model serving now")
            info.add_metric([], {"version": version})
            yield info

    def _polling(self) -> Iterable[Metric]:
        if self.poll.last_ok_unix is not None:
            yield GaugeMetricFamily(f"{PREFIX}_telegram_last_poll_timestamp_seconds",
                                    "Unix time of the last getUpdates call Telegram answered",
                                    value=self.poll.last_ok_unix)
        yield CounterMetricFamily(f"{PREFIX}_telegram_poll_failures", "getUpdates calls that failed",
                                  value=self.poll.failures)

    @staticmethod
    def _queue(service: CaptionService) -> Iterable[Metric]:
        try:
            status = service.status()
        except Exception:  # the health check reports the service's trouble; a scrape must not fail
            return
        for name, help_text, value in (
            ("queue_waiting_photos", "Photos queued for the caption service, not yet in a batch", status.waiting),
            ("queue_in_flight_photos", "Photos in the batch being computed", status.in_flight),
            ("queue_capacity_photos", "The caption queue's bound", status.capacity),
            ("queue_estimated_wait_seconds", "Estimated wait of a photo submitted now",
             status.estimated_wait_seconds),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", help_text, value=value)
