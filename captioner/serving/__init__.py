"""Serving the captioner to many callers: a batching worker behind an async interface.

Build the service from a :class:`ServiceConfig`, start it, await captions::

    service = create_service("runs/best", device="auto", max_batch_size=16)
    await service.start()
    result = await service.caption(photo, beam_size=3)
    await service.close()
"""

from __future__ import annotations

from dataclasses import replace
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
from .process import ProcessCaptionService, ServiceStats


def create_service(checkpoint: str | Path | None = None, device: str | None = None,
                   config: ServiceConfig | None = None, **options: Any) -> ProcessCaptionService:
    """The default CaptionService (a worker process), not started yet.

    ``checkpoint`` None keeps ``config``'s (by default the bundled model); ``options`` are
    :class:`ServiceConfig` fields.
    """
    settings = config or ServiceConfig()
    if checkpoint is not None:
        options["checkpoint"] = str(checkpoint)
    if device is not None:
        options["device"] = device
    return ProcessCaptionService(replace(settings, **options))


__all__ = [
    "CaptionResult",
    "CaptionService",
    "ModelLoadError",
    "ProcessCaptionService",
    "QueueFullError",
    "QueueStatus",
    "RequestTimeoutError",
    "ServiceClosedError",
    "ServiceConfig",
    "ServiceError",
    "ServiceStats",
    "WorkerCrashedError",
    "create_service",
]
