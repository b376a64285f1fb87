"""How the caption service runs: a plain config object, built by its caller (the bot maps its
settings onto it; tools and tests construct it directly or with ``dataclasses.replace``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..images import ImageLimits

Precision = Literal["float32", "bfloat16", "float16"]
PRECISIONS: tuple[Precision, ...] = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Batching:
    """How the worker batches on one device: the effective values, resolved from the device."""

    max_batch_size: int
    max_wait_ms: float


# The batching a device gets when the config leaves it open (None). On a GPU a batch of 128 costs
# little more than a batch of 32 (issue 13's H100 figures, beam 3: 1,121 images/s at 32 and 2,700
# at 128). On a CPU, `python bench/worker.py --sweep 8,16,32,32,16,8` (bench/results/worker.json,
# "batch_size_sweep": a fresh worker per size, 64 callers, each size twice in reverse order) puts
# 16 and 32 within the noise of each other and both ahead of 8 on average; 16 keeps a batch, and
# so a photo's wait behind it, half as long. Re-run it on the machine that serves. The wait only
# holds an idle model for photos still being decoded (captioner/serving/worker.py; not swept).
DEVICE_BATCHING: dict[str, Batching] = {
    "cuda": Batching(max_batch_size=128, max_wait_ms=2.0),
    "cpu": Batching(max_batch_size=16, max_wait_ms=25.0),
}


def default_decode_threads() -> int:
    """The cores this process may run on (decoding releases the GIL, so threads run in parallel)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ServiceConfig:
    """How the caption worker runs. Every field has a sensible default except the checkpoint
    (None = the bundled default model)."""

    checkpoint: str | None = None
    device: str = "auto"  # "auto", "cpu", "cuda" or "cuda:N"
    threads: int | None = None  # torch intra-op threads in the worker (None = torch's default)
    # Photos captioned together, and how long a batch waits for more once it has one; None = the
    # device's default (DEVICE_BATCHING), resolved by the worker once it knows its device.
    max_batch_size: int | None = None
    max_wait_ms: float | None = None
    # A request is refused (QueueFullError) when the photos ahead of it would take longer than this
    # at the measured per-photo time: a fast GPU takes a long queue, a slow CPU says "busy" early.
    max_queue_seconds: float = 10.0
    # A hard bound on photos submitted and not yet answered, whatever the device's speed: the
    # memory bound (each holds its bytes, up to image_limits.max_bytes, in both processes).
    queue_capacity: int = 256
    request_timeout: float = 60.0  # default deadline of a request, in seconds
    default_beam_size: int | None = None  # None = the checkpoint's own decoding setting
    max_beam_size: int = 10
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    encoder_batch_size: int | None = None  # None = the Captioner's choice for the device
    start_timeout: float = 600.0  # seconds allowed for loading a model (start, restart, reload)
    hang_timeout: float = 300.0  # a batch running longer than this is treated as a hung worker
    shutdown_grace: float = 5.0  # seconds the worker gets to exit before it is killed
    warmup: bool = True  # run dummy images through a freshly loaded model before serving
    # Threads decoding and resizing photos in the worker; None = the cores it may run on.
    decode_threads: int | None = None
    # Autocast of the model on CUDA; anything but float32 is refused on CPU (it would be slower
    # there, and the captions it changes can only be measured on a GPU: bench/precision.py).
    precision: Precision = "float32"
    # Testing only: seconds every batch sleeps before computing (makes "mid-batch" observable).
    debug_batch_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_wait_ms is not None and not 0 <= self.max_wait_ms < float("inf"):
            raise ValueError("max_wait_ms must be >= 0 and finite")
        if not 0 < self.max_queue_seconds < float("inf"):
            raise ValueError("max_queue_seconds must be > 0 and finite")
        if self.decode_threads is not None and self.decode_threads < 1:
            raise ValueError("decode_threads must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
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

    def batching(self, device_type: str) -> Batching:
        """The batch size and wait on a device of this type: see :func:`resolve_batching`."""
        return resolve_batching(self.max_batch_size, self.max_wait_ms, device_type)


def resolve_batching(max_batch_size: int | None, max_wait_ms: float | None, device_type: str) -> Batching:
    """The values given where set, the device's default ("cpu", "cuda") otherwise; a device type
    without its own default gets the CPU's."""
    default = DEVICE_BATCHING.get(device_type, DEVICE_BATCHING["cpu"])
    return Batching(default.max_batch_size if max_batch_size is None else max_batch_size,
                    default.max_wait_ms if max_wait_ms is None else max_wait_ms)
