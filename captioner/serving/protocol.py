"""Messages between the service (parent) and its worker process, sent pickled over pipes.

Times are ``time.monotonic()`` readings, a clock shared by all processes of one machine.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..images import ImageLimits

# --- parent -> worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker process needs to start (picklable)."""

    checkpoint: str | None
    device: str
    threads: int | None
    max_batch_size: int
    max_wait_ms: float
    image_limits: ImageLimits
    encoder_batch_size: int | None
    warmup: bool
    debug_batch_delay: float


@dataclass(frozen=True)
class Request:
    id: int
    image: bytes
    beam_size: int | None  # None = the model's own
    attention: bool
    deadline: float
    submitted: float


@dataclass(frozen=True)
class Cancel:
    """The callers of these requests gave up: skip them if not computed yet."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class Reload:
    id: int
    checkpoint: str


@dataclass(frozen=True)
class Shutdown:
    pass


# --- worker -> parent ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    version: str
    checkpoint: str | None
    pid: int
    device: str
    threads: int
    per_image_seconds: float  # of the warm-up, 0 when none
    peak_rss_bytes: int


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class BatchStarted:
    ids: tuple[int, ...]
    started: float


@dataclass(frozen=True)
class Result:
    id: int
    caption: str
    words: tuple[str, ...]
    score: float
    model_version: str
    beam_size: int
    width: int
    height: int
    queue_seconds: float
    compute_seconds: float
    batch_size: int
    attention_png: bytes | None = None


@dataclass(frozen=True)
class BatchDone:
    """The results of a batch (those that asked for an attention picture follow on their own)."""

    results: tuple[Result, ...]
    batch_size: int
    compute_seconds: float
    rss_bytes: int
    peak_rss_bytes: int


@dataclass(frozen=True)
class RequestFailed:
    id: int
    error_type: str  # a captioner.images.ImageError subclass name, or "" for an internal failure
    message: str


@dataclass(frozen=True)
class Expired:
    """Requests dropped before compute because their deadline passed."""

    ids: tuple[int, ...]


@dataclass(frozen=True)
class ReloadDone:
    id: int
    version: str
    checkpoint: str


@dataclass(frozen=True)
class ReloadFailed:
    id: int
    message: str
