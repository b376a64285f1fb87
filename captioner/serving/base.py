"""The caption service interface the bot talks to: no process, thread or torch details leak out.

Implementations: :class:`captioner.serving.process.ProcessCaptionService` (a worker process on
this machine). A remote worker would be another implementation of the same interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..result import CaptionResult


class ServiceError(Exception):
    """Base of the service's errors; ``str(err)`` is safe to log, not meant for end users."""


class QueueFullError(ServiceError):
    """The bounded queue is full: ask the person to try again shortly."""


class RequestTimeoutError(ServiceError):
    """The request's deadline passed before it was answered."""


class WorkerCrashedError(ServiceError):
    """The worker died twice while this request was in flight."""


class ModelLoadError(ServiceError):
    """A checkpoint failed to load; the previous model keeps serving."""


class ServiceClosedError(ServiceError):
    """The service is shutting down or was never started."""


@dataclass(frozen=True)
class QueueStatus:
    waiting: int  # requests queued and not yet in a batch
    in_flight: int  # requests in the batch being computed
    capacity: int  # the queue's bound
    estimated_wait_seconds: float  # for a request submitted now


class CaptionService(ABC):
    """Caption photos asynchronously; safe to call from many coroutines at once."""

    @abstractmethod
    async def start(self) -> None:
        """Load the model (in the worker) and start serving; raises ModelLoadError."""

    @abstractmethod
    async def caption(self, image: bytes, *, beam_size: int | None = None, attention: bool = False,
                      timeout: float | None = None) -> CaptionResult:
        """Caption untrusted image bytes.

        Raises captioner.images.ImageError subclasses (same type, code and details as the
        captioner's) for bad photos, QueueFullError at once when the queue is full, RequestTimeoutError,
        WorkerCrashedError, ServiceClosedError.
        """

    @abstractmethod
    def status(self) -> QueueStatus:
        """What a request submitted now would face (position and estimated wait)."""

    @property
    @abstractmethod
    def model_version(self) -> str:
        """The version currently serving."""

    @abstractmethod
    async def reload(self, checkpoint: str | Path) -> str:
        """Switch to another checkpoint between batches; returns its version.

        On failure raises ModelLoadError and the old model keeps serving.
        """

    @abstractmethod
    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, answer what is queued (up to ``drain_timeout``), stop the worker."""
