"""The captioner as a Ray Serve deployment: one model per replica, requests batched with ``@serve.batch``.

Each replica decodes photos on a thread (so a batch can compute while the next photos are
decoded), batches concurrent requests, and captions them with the same functions as the worker
process (``compute.py``). Bad photos come back as a :class:`protocol.RequestFailed` value, not an
exception, so that the caller rebuilds the same ImageError class, code and details.

Hot reload: the deployment's ``user_config`` is a :class:`ModelChoice`. Serve calls
:meth:`CaptionerDeployment.reconfigure` on every running replica when it changes; a replica that
cannot load the new checkpoint keeps its model, and every replica reports what it serves to a
small detached actor (:class:`ModelBoard`), where the caller checks the outcome.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve

from ..images import ImageError
from ..inference import Captioner
from ..result import CaptionResult
from .compute import DecodedPhoto, attention_picture, caption_batch, decode_photo, model_inputs
from .protocol import RequestFailed
from .ray_spec import BOARD_NAMESPACE, CAPTIONER, ModelChoice, RaySpec, ReplicaModel, board_name

log = logging.getLogger("captioner.serving.ray")

Outcome = CaptionResult | RequestFailed


@ray.remote(num_cpus=0)
class ModelBoard:
    """The model each replica of one application serves, as last reported (keyed by replica id)."""

    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaModel] = {}

    def report(self, entry: ReplicaModel) -> None:
        self._replicas[entry.replica] = entry

    def entries(self) -> dict[str, ReplicaModel]:
        return dict(self._replicas)


def model_board(app_name: str) -> Any:
    """The application's board, created by the first replica that reports."""
    board: Any = ModelBoard  # a Ray actor class (its type stubs do not say so)
    return board.options(name=board_name(app_name), namespace=BOARD_NAMESPACE, lifetime="detached",
                         get_if_exists=True).remote()


def weights_sha256(checkpoint: str | None) -> str:
    from .. import checkpoint as checkpoints

    digest = hashlib.sha256()
    with open(checkpoints.resolve(checkpoint) / checkpoints.WEIGHTS_FILE, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class _Job:
    image: bytes
    photo: DecodedPhoto
    beam_size: int | None
    attention: bool
    arrived: float
    prep_seconds: float


@serve.deployment(name=CAPTIONER)
class CaptionerDeployment:
    def __init__(self, spec: dict[str, Any], app_name: str) -> None:
        self.spec = RaySpec.from_args(spec)
        self.app_name = app_name
        torch.set_num_threads(self.spec.torch_threads)
        self.captioner: Captioner | None = None
        self.choice: ModelChoice | None = None
        self._load_lock = threading.Lock()
        batched: Any = self._caption_batch  # serve.batch's wrapper: its limits are set per deployment
        batched.set_max_batch_size(self.spec.max_batch_size)
        batched.set_batch_wait_timeout_s(self.spec.batch_wait_ms / 1000.0)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.node = socket.gethostname()

    # --- the model -------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and whenever the user_config changes, on every replica.

        A replica without a model (just started) raises, so that Serve reports the deployment as
        failed instead of serving nothing; one with a model keeps it and reports the failure.
        """
        choice = ModelChoice.from_user_config(user_config)
        with self._load_lock:
            try:
                captioner = self._load(choice)
            except Exception as err:
                message = f"{type(err).__name__}: {err}"
                log.warning("replica %s could not load %s: %s", self.replica_id, choice.checkpoint, message)
                self._report(choice.generation, message)
                if self.captioner is None:
                    raise
                return
            self.captioner, self.choice = captioner, choice  # the next batch uses it
            gc.collect()
            self._report(choice.generation, None)

    def _load(self, choice: ModelChoice) -> Captioner:
        if choice.checkpoint is not None and not Path(choice.checkpoint).exists():
            raise FileNotFoundError(f"{choice.checkpoint} is not readable on node {self.node}")
        if choice.sha256 is not None:
            found = weights_sha256(choice.checkpoint)
            if found != choice.sha256:
                raise ValueError(f"the weights at {choice.checkpoint} on node {self.node} have sha256 "
                                 f"{found}, not {choice.sha256}")
        captioner = Captioner.load(choice.checkpoint, self.spec.device)
        captioner.freeze_encoder()
        captioner.calibrate_encoder_batch_size()
        if self.spec.warmup:
            size = captioner.model.config.image_size
            captioner.caption_tensors(torch.zeros(1, 3, size, size), attention=False)
        return captioner

    def _report(self, generation: int, error: str | None) -> None:
        captioner, choice = self.captioner, self.choice
        entry = ReplicaModel(self.replica_id, self.node, captioner.version if captioner else "",
                             choice.checkpoint if choice else None, generation, error, time.time())
        try:
            ray.get(model_board(self.app_name).report.remote(entry), timeout=30)
        except Exception as err:  # the report is for the operator; serving goes on without it
            log.warning("replica %s could not report its model: %r", self.replica_id, err)

    def status(self) -> ReplicaModel:
        captioner, choice = self.captioner, self.choice
        return ReplicaModel(self.replica_id, self.node, captioner.version if captioner else "",
                            choice.checkpoint if choice else None, choice.generation if choice else -1,
                            None, time.time())

    def describe(self) -> dict[str, Any]:
        """The builder's arguments this replica runs with (a reload redeploys the same ones)."""
        return self.spec.to_args()

    def check_health(self) -> None:
        if self.captioner is None:
            raise RuntimeError("no model loaded")

    # --- captions --------------------------------------------------------------------------

    async def caption(self, image: bytes, beam_size: int | None = None, attention: bool = False) -> Outcome:
        """Caption untrusted bytes: a CaptionResult, or a RequestFailed saying what is wrong."""
        arrived = time.monotonic()
        beam = self.spec.default_beam_size if beam_size is None else int(beam_size)
        if beam is not None and not 1 <= beam <= self.spec.max_beam_size:
            return RequestFailed(0, f"beam_size must be in 1..{self.spec.max_beam_size}, not {beam}")
        captioner = self.captioner
        if captioner is None:
            return RequestFailed(0, "no model loaded")
        started = time.perf_counter()
        try:
            photo = await asyncio.to_thread(decode_photo, captioner, bytes(image), self.spec.image_limits,
                                            bool(attention))
        except ImageError as err:
            return RequestFailed.bad_image(0, err)
        job = _Job(bytes(image), photo, beam, bool(attention), arrived, time.perf_counter() - started)
        outcome: Outcome = await self._caption_batch(job)
        return outcome

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.025)  # set from the spec in __init__
    async def _caption_batch(self, jobs: list[_Job]) -> list[Outcome]:
        batch_started = time.monotonic()
        captioner = self.captioner
        assert captioner is not None  # caption() checked; a reload only ever replaces it
        try:
            # Off the event loop, so the replica keeps taking and decoding requests meanwhile.
            return await asyncio.to_thread(self._compute, captioner, jobs, batch_started)
        except Exception as err:
            log.exception("a batch of %d failed", len(jobs))
            return [RequestFailed(0, f"captioning failed: {type(err).__name__}: {err}") for _ in jobs]

    def _compute(self, captioner: Captioner, jobs: list[_Job], batch_started: float) -> list[Outcome]:
        started = time.perf_counter()
        if self.spec.debug_batch_delay:
            time.sleep(self.spec.debug_batch_delay)
        inputs = model_inputs(captioner, [job.photo for job in jobs], [job.image for job in jobs],
                              self.spec.image_limits)
        captions = caption_batch(captioner, inputs, [job.beam_size for job in jobs], [job.attention for job in jobs])
        compute = time.perf_counter() - started
        outcomes: list[Outcome] = []
        for job, caption in zip(jobs, captions, strict=True):
            picture = attention_picture(job.photo.thumbnail, caption) if job.attention else None
            outcomes.append(replace(caption, width=job.photo.width, height=job.photo.height, batch_size=len(jobs),
                                    queue_seconds=max(0.0, batch_started - job.arrived),
                                    compute_seconds=compute + job.prep_seconds, attention=None,
                                    attention_png=picture))
        return outcomes
