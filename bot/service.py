"""Building the caption service (a worker process on this machine) from the bot's settings."""

from __future__ import annotations

from collections.abc import Callable

from bot.config import Settings
from captioner.images import ImageLimits
from captioner.serving.base import CaptionService
from captioner.serving.config import ServiceConfig

ServiceFactory = Callable[[Settings, str | None], CaptionService]


def service_config(settings: Settings, checkpoint: str | None) -> ServiceConfig:
    return ServiceConfig(
        checkpoint=checkpoint,
        device=settings.device,
        threads=settings.worker_threads,
        max_batch_size=settings.batch_size,
        max_wait_ms=settings.batch_wait_seconds * 1000,
        queue_capacity=settings.queue_capacity,
        request_timeout=settings.request_timeout,
        default_beam_size=settings.beam_size,
        image_limits=ImageLimits(max_bytes=settings.download_limit, max_pixels=settings.max_pixels),
    )


def create_service(settings: Settings, checkpoint: str | None) -> CaptionService:
    """The process-based service (imported lazily: it pulls in torch and multiprocessing)."""
    from captioner.serving.process import ProcessCaptionService

    return ProcessCaptionService(service_config(settings, checkpoint))
