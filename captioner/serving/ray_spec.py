"""What a Ray Serve caption application is made of, as plain JSON-able values (no torch, no Ray).

Two parts, because Serve treats them differently:

* :class:`RaySpec`, the application builder's arguments: replicas, resources, batching, queue
  bounds, HTTP. Changing them redeploys the replicas.
* :class:`ModelChoice`, the captioner deployment's ``user_config``: which checkpoint. Changing it
  makes Serve call ``reconfigure`` on every running replica in place (a hot reload), and every
  replica started later loads the same one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..images import ImageLimits

APP_NAME = "captionbot"
CAPTIONER = "Captioner"  # the deployment that holds the model
INGRESS = "HttpIngress"  # the FastAPI ingress, when the application answers HTTP
BUILDER = "captioner.serving.ray_deploy:build_app"  # import path Serve builds the application from
BOARD_NAMESPACE = "captionbot"


def board_name(app_name: str) -> str:
    """The detached actor where each replica of ``app_name`` reports the model it serves."""
    return f"{app_name}-models"


@dataclass(frozen=True)
class RaySpec:
    """How the captioner deployment runs; every field is a JSON value (Serve's ``args``)."""

    replicas: int = 1
    autoscale_min: int | None = None  # both set: an autoscaling config instead of ``replicas``
    autoscale_max: int | None = None
    gpus_per_replica: float = 0.0  # 1 on GPU machines: Serve places one replica per GPU
    cpus_per_replica: float = 1.0  # fractions share a core (tests, small CPU machines)
    resources: dict[str, float] = field(default_factory=dict)  # custom resources a replica needs
    device: str = "auto"
    threads: int | None = None  # torch threads per replica; None: the replica's CPUs, at least 1
    max_batch_size: int = 8
    batch_wait_ms: float = 25.0
    # Requests one replica holds at once (decoding, waiting for a batch, in a batch): at least a
    # batch, or batches could never fill.
    max_ongoing_requests: int = 16
    # Requests each caller (a bot's handle, the HTTP proxy) queues while every replica is full;
    # beyond it Serve refuses at once (BackPressureError), which callers see as QueueFullError.
    max_queued_requests: int = 64
    default_beam_size: int | None = None
    max_beam_size: int = 10
    max_image_bytes: int = ImageLimits().max_bytes
    max_image_pixels: int = ImageLimits().max_pixels
    warmup: bool = True
    http: bool = False  # the FastAPI ingress (captioner.serving.http) in front of the captioner
    keys_file: str | None = None  # API keys of the HTTP API
    requests_per_minute: int = 60  # per API key
    debug_batch_delay: float = 0.0  # testing only: seconds every batch sleeps before computing

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError("replicas must be >= 1")
        if (self.autoscale_min is None) != (self.autoscale_max is None):
            raise ValueError("autoscaling needs both a minimum and a maximum")
        if self.autoscale_min is not None and not 0 <= self.autoscale_min <= (self.autoscale_max or 0):
            raise ValueError("autoscaling needs 0 <= min <= max")
        for name in ("gpus_per_replica", "cpus_per_replica", "batch_wait_ms", "debug_batch_delay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.max_batch_size < 1 or self.max_beam_size < 1 or self.requests_per_minute < 0:
            raise ValueError("max_batch_size and max_beam_size must be >= 1, requests_per_minute >= 0")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size, or batches never fill")
        if self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.cpus_per_replica))

    def to_args(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> RaySpec:
        """Parse the builder's arguments; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown captioner deployment arguments: {sorted(unknown)}")
        return cls(**args)

    def deployment_options(self) -> dict[str, Any]:
        """The captioner deployment's Serve options (placement, scaling, queue bounds)."""
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica}
        if self.resources:
            actor["resources"] = dict(self.resources)
        options: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            # Loading a model (and the first warm-up) may take a while on a cold node.
            "health_check_timeout_s": 60.0,
        }
        if self.autoscale_min is not None:
            options["autoscaling_config"] = {
                "min_replicas": self.autoscale_min, "max_replicas": self.autoscale_max,
                "initial_replicas": max(1, self.autoscale_min),
                # a replica is "busy" at a full batch in flight
                "target_ongoing_requests": self.max_batch_size,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


@dataclass(frozen=True)
class ModelChoice:
    """The captioner deployment's ``user_config``: which model every replica serves.

    ``checkpoint`` must be readable at the same path on every node that runs a replica (a shared
    file system, or the same copy on each); ``sha256`` (of ``model.safetensors``), when given, makes
    a replica refuse a copy that differs. ``generation`` makes every reload a change Serve passes on,
    even to the same path, and tells which reload a replica's report answers.
    """

    checkpoint: str | None = None  # None: the bundled default model
    sha256: str | None = None
    generation: int = 0

    def to_user_config(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_user_config(cls, config: dict[str, Any] | None) -> ModelChoice:
        config = dict(config or {})
        checkpoint, sha256, generation = config.get("checkpoint"), config.get("sha256"), config.get("generation", 0)
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise ValueError("user_config checkpoint must be a path or null")
        if sha256 is not None and not (isinstance(sha256, str) and len(sha256) == 64):
            raise ValueError("user_config sha256 must be 64 hex digits or null")
        if not isinstance(generation, int) or isinstance(generation, bool):
            raise ValueError("user_config generation must be an integer")
        return cls(checkpoint, sha256.lower() if sha256 else None, generation)


@dataclass(frozen=True)
class ReplicaModel:
    """What one replica reports after every (re)load: the model it serves and its last failure."""

    replica: str
    node: str
    version: str  # serving now ("" while none is loaded)
    checkpoint: str | None
    generation: int  # of the last ModelChoice the replica acted on
    error: str | None  # why that ModelChoice failed to load (the previous model keeps serving)
    reported: float  # time.time() of the report
