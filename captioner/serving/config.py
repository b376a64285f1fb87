"""How the caption service runs: a plain config object, built by its caller (the bot maps its
settings onto it; tools and tests construct it directly or with ``dataclasses.replace``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..images import ImageLimits


@dataclass(frozen=True)
class ServiceConfig:
    """How the caption worker runs. Every field has a sensible default except the checkpoint
    (None = the bundled default model)."""

    checkpoint: str | None = None
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # torch intra-op threads in the worker (None = torch's default)
    max_batch_size: int = 8  # photos captioned together; 8 / 25 ms is what the bot has always served with
    max_wait_ms: float = 25.0  # how long a batch waits for more requests once it has one
    queue_capacity: int = 64  # requests submitted and not yet answered; more -> QueueFullError
    request_timeout: float = 60.0  # default deadline of a request, in seconds
    default_beam_size: int | None = None  # None = the checkpoint's own decoding setting
    max_beam_size: int = 10
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    encoder_batch_size: int | None = None  # None = the Captioner's choice for the device
    start_timeout: float = 600.0  # seconds allowed for loading a model (start, restart, reload)
    hang_timeout: float = 300.0  # a batch running longer than this is treated as a hung worker
    shutdown_grace: float = 5.0  # seconds the worker gets to exit before it is killed
    warmup: bool = True  # run one dummy image through a freshly loaded model before serving
    # Testing only: seconds every batch sleeps before computing (makes "mid-batch" observable).
    debug_batch_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.queue_capacity < 1:
            raise ValueError("queue_capacity must be >= 1")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.max_beam_size < 1:
            raise ValueError("max_beam_size must be >= 1")
        if self.default_beam_size is not None and not 1 <= self.default_beam_size <= self.max_beam_size:
            raise ValueError(f"default_beam_size must be in 1..{self.max_beam_size}")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser().resolve()))
