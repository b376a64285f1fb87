"""Building the caption service from the bot's settings: a worker process on this machine
(CAPTIONBOT_SERVICE=process) or a Ray Serve deployment (CAPTIONBOT_SERVICE=ray)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from captioner.images import ImageLimits
from captioner.serving.base import CaptionService
from captioner.serving.config import ServiceConfig
from common.settings import Settings

ServiceFactory = Callable[[Settings, str | None], CaptionService]


def service_config(settings: Settings, checkpoint: str | None) -> ServiceConfig:
    """The worker's configuration; a setting left unset keeps ServiceConfig's own default."""
    tuning: dict[str, Any] = {
        "device": settings.device,
        "threads": settings.worker_threads,
        "max_batch_size": settings.batch_size,
        "max_wait_ms": settings.batch_wait_ms,
        "queue_capacity": settings.queue_capacity,
        "max_queue_seconds": settings.max_queue_seconds,
        "precision": settings.precision,
        "request_timeout": settings.request_timeout,
        "default_beam_size": settings.beam_size,
    }
    limits = replace(ImageLimits(), max_bytes=settings.download_limit)
    if settings.max_pixels is not None:
        limits = replace(limits, max_pixels=settings.max_pixels)
    return ServiceConfig(checkpoint=checkpoint, image_limits=limits,
                         **{name: value for name, value in tuning.items() if value is not None})


def create_service(settings: Settings, checkpoint: str | None) -> CaptionService:
    """The service the settings choose (imported lazily: the process one spawns torch workers,
    the Ray one needs the optional Ray extra, which fails here with what to install)."""
    if settings.service == "ray":
        from captioner.serving.ray_service import RayCaptionService, RayServiceConfig

        timeout = service_config(settings, None).request_timeout
        return RayCaptionService(RayServiceConfig(address=settings.ray_address, app_name=settings.ray_app,
                                                  checkpoint=service_config(settings, checkpoint).checkpoint,
                                                  request_timeout=timeout))
    from captioner.serving.process import ProcessCaptionService

    return ProcessCaptionService(service_config(settings, checkpoint))
