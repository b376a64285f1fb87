"""Messages between the service (parent) and its worker process, sent pickled over pipes.

Times are ``time.monotonic()`` readings, a clock shared by all processes of one machine.
Results travel as :class:`captioner.result.CaptionResult`; errors as an :class:`ImageProblem`
code and its details, turned back into the same exception by :meth:`RequestFailed.error`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..images import Details, ImageError, ImageLimits, ImageProblem, image_error
from ..result import CaptionResult
from .base import ServiceError
from .config import Precision, ServiceConfig

# --- parent -> worker ---------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker process needs to start (picklable)."""

    checkpoint: str | None
    device: str
    threads: int | None
    max_batch_size: int | None  # None: the device's default (config.resolve_batching)
    max_wait_ms: float | None
    image_limits: ImageLimits
    encoder_batch_size: int | None
    warmup: bool
    debug_batch_delay: float
    decode_threads: int | None = None  # None: the cores
    precision: Precision = "float32"

    @classmethod
    def of(cls, config: ServiceConfig, checkpoint: str | None) -> WorkerSettings:
        return cls(checkpoint, config.device, config.threads, config.max_batch_size, config.max_wait_ms,
                   config.image_limits, config.encoder_batch_size, config.warmup, config.debug_batch_delay,
                   config.decode_threads, config.precision)


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
    per_image_seconds: float  # of the warm-up's full batch, 0 when none
    peak_rss_bytes: int
    # What the worker resolved for its device (the config may leave them open).
    max_batch_size: int = 0
    max_wait_ms: float = 0.0
    decode_threads: int = 1
    precision: Precision = "float32"


@dataclass(frozen=True)
class LoadFailed:
    message: str


@dataclass(frozen=True)
class BatchStarted:
    ids: tuple[int, ...]
    started: float


@dataclass(frozen=True)
class Captioned:
    id: int
    result: CaptionResult  # without attention maps: the picture drawn from them, if asked for


@dataclass(frozen=True)
class BatchDone:
    """The results of a batch (those that asked for an attention picture follow on their own)."""

    results: tuple[Captioned, ...]
    batch_size: int
    compute_seconds: float
    rss_bytes: int
    peak_rss_bytes: int


@dataclass(frozen=True)
class RequestFailed:
    id: int
    message: str  # for logs
    code: ImageProblem | None = None  # what is wrong with the photo; None: an internal failure
    details: Details = field(default_factory=dict)

    @classmethod
    def bad_image(cls, request_id: int, err: ImageError) -> RequestFailed:
        return cls(request_id, str(err), err.code, err.details)

    def error(self) -> Exception:
        """The exception the caller gets: the worker's ImageError again, or a ServiceError."""
        if self.code is None:
            return ServiceError(self.message)
        return image_error(self.code, **self.details)


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
