"""The caption service on a Ray Serve deployment (another machine, or many): a ``CaptionService``
that forwards to the captioner deployment through a DeploymentHandle. No torch in this process.

Errors map onto the interface's: Serve's BackPressureError (every replica full and this caller's
queue at ``max_queued_requests``) is :class:`QueueFullError`; a replica that died while holding
the request is retried once (Serve routes the retry to a live replica, or to the one it restarts),
then :class:`WorkerCrashedError`; the deadline is :class:`RequestTimeoutError`; a bad photo is the
same ImageError class, code and details the replica found.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..result import CaptionResult
from .base import (
    CaptionService,
    ModelLoadError,
    QueueFullError,
    QueueStatus,
    RequestTimeoutError,
    ServiceClosedError,
    ServiceError,
    WorkerCrashedError,
)
from .calls import MAX_ATTEMPTS
from .protocol import RequestFailed
from .ray_spec import APP_NAME, CAPTIONER, ModelChoice, RaySpec

log = logging.getLogger("captioner.serving.ray")

RAY_MISSING = ("the Ray caption service needs Ray Serve, which is not installed: "
               "pip install -e '.[ray]' (or set CAPTIONBOT_SERVICE=process)")
EMA_WEIGHT = 0.2


def require_ray() -> None:
    """Fail loudly, with what to do, when the optional Ray extra is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as err:
        raise ImportError(RAY_MISSING) from err


@dataclass(frozen=True)
class RayServiceConfig:
    address: str | None = "auto"  # "auto", "ray://HOST:10001", or None: start a local cluster
    app_name: str = APP_NAME
    checkpoint: str | None = None  # None: whatever the deployment serves; else switch it to this one
    request_timeout: float = 60.0
    reload_timeout: float = 600.0
    namespace: str = "captionbot"

    def __post_init__(self) -> None:
        if self.request_timeout <= 0 or self.reload_timeout <= 0:
            raise ValueError("timeouts must be > 0")


class RayCaptionService(CaptionService):
    def __init__(self, config: RayServiceConfig | None = None) -> None:
        require_ray()
        self.config = config or RayServiceConfig()
        self._handle: Any = None
        self._client: Any = None
        self._spec = RaySpec()
        self._version = ""
        self._lock = threading.Lock()
        self._in_flight = 0
        self.retried = 0  # requests sent again because the replica holding them died
        self._per_image = 0.0
        self._closed = False
        self._started_ray = False
        self._reload_lock = asyncio.Lock()

    @classmethod
    def over_handle(cls, handle: Any, spec: RaySpec, config: RayServiceConfig | None = None) -> RayCaptionService:
        """A started service over a handle the caller already has (the HTTP ingress's replicas)."""
        service = cls(config)
        service._handle, service._spec = handle, spec
        return service

    # --- the CaptionService interface -----------------------------------------------------

    async def start(self) -> None:
        if self._handle is None:
            await asyncio.to_thread(self._connect)
        replica = await self._handle.status.remote()
        self._version = replica.version
        if self.config.checkpoint is not None and replica.checkpoint != self.config.checkpoint:
            await self.reload(self.config.checkpoint)

    def _connect(self) -> None:
        import ray
        from ray import serve

        from .ray_deploy import serve_client

        if not ray.is_initialized():
            try:
                ray.init(address=self.config.address, namespace=self.config.namespace, log_to_driver=False,
                         include_dashboard=False if self.config.address is None else None)
            except (ConnectionError, RuntimeError) as err:
                raise ServiceClosedError(f"cannot reach the Ray cluster at {self.config.address}: {err}") from err
            self._started_ray = True
        self._client = serve_client()
        try:
            self._handle = serve.get_deployment_handle(CAPTIONER, self.config.app_name)
            self._spec = RaySpec.from_args(self._handle.describe.remote().result(timeout_s=120))
        except Exception as err:
            raise ServiceClosedError(f"no caption deployment {self.config.app_name!r} on the Ray cluster "
                                     f"({type(err).__name__}: {err}); start it with `python -m captioner serve`"
                                     ) from err

    async def caption(self, image: bytes, *, beam_size: int | None = None, attention: bool = False,
                      timeout: float | None = None) -> CaptionResult:
        if self._closed or self._handle is None:
            raise ServiceClosedError("the caption service is not running")
        if beam_size is not None and not 1 <= int(beam_size) <= self._spec.max_beam_size:
            raise ValueError(f"beam_size must be in 1..{self._spec.max_beam_size}, not {beam_size}")
        limit = self.config.request_timeout if timeout is None else float(timeout)
        if limit <= 0:
            raise ValueError("timeout must be > 0")
        submitted = time.monotonic()
        with self._lock:
            self._in_flight += 1
        try:
            async with asyncio.timeout(limit):
                outcome = await self._call(bytes(image), beam_size, bool(attention))
        except TimeoutError:
            raise RequestTimeoutError(f"no caption within {limit:g} s") from None
        finally:
            with self._lock:
                self._in_flight -= 1
        if isinstance(outcome, RequestFailed):
            raise outcome.error()
        elapsed = time.monotonic() - submitted
        self._learn(outcome)
        # The replica's clock measures its own queue; the caller's adds the trip to the replica.
        return replace(outcome, queue_seconds=max(outcome.queue_seconds, elapsed - outcome.compute_seconds))

    async def _call(self, image: bytes, beam_size: int | None, attention: bool) -> CaptionResult | RequestFailed:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(1, MAX_ATTEMPTS + 1):
            response = self._handle.caption.remote(image, beam_size, attention)
            try:
                outcome: CaptionResult | RequestFailed = await response
                return outcome
            except BackPressureError as err:
                raise QueueFullError(f"every caption replica is busy and the queue is full ({err})") from None
            except (ActorDiedError, ActorUnavailableError, RayActorError) as err:
                if attempt == MAX_ATTEMPTS:
                    raise WorkerCrashedError(f"caption replicas died twice while handling this photo: {err}") from None
                log.warning("a caption replica died while handling a photo (%s); retrying once", type(err).__name__)
                with self._lock:
                    self.retried += 1
            except RayTaskError as err:
                raise ServiceError(f"the caption replica failed: {err}") from None
            except asyncio.CancelledError:
                response.cancel()  # the deadline or the caller gave up: the replica may skip it
                raise
        raise AssertionError("unreachable")

    def _learn(self, result: CaptionResult) -> None:
        sample = result.compute_seconds / max(1, result.batch_size)
        with self._lock:
            previous = self._per_image
            self._per_image = sample if not previous else (1 - EMA_WEIGHT) * previous + EMA_WEIGHT * sample
            self._version = result.model_version

    def status(self) -> QueueStatus:
        """This caller's view: the requests it has out, against the replicas' batch slots.

        Other callers of the same deployment (another bot, the HTTP API) are not counted; Serve's
        own bound (``max_queued_requests``) is what refuses work.
        """
        spec = self._spec
        replicas = spec.autoscale_max if spec.autoscale_max is not None else spec.replicas
        slots = max(1, replicas) * spec.max_batch_size
        with self._lock:
            out, per_image = self._in_flight, self._per_image
        running = min(out, slots)
        waiting = out - running
        estimate = per_image * (waiting + running + 1) / max(1, replicas) + spec.batch_wait_ms / 1000.0
        return QueueStatus(waiting, running, spec.max_queued_requests + max(1, replicas) * spec.max_ongoing_requests,
                           estimate)

    @property
    def model_version(self) -> str:
        return self._version

    async def reload(self, checkpoint: str | Path, sha256: str | None = None) -> str:
        """Switch every replica to ``checkpoint`` (a path readable on every node).

        If any replica fails to load it, the deployment is switched back to the previous
        checkpoint (so that replicas started later load a model that works) and ModelLoadError
        says which replicas failed and why.
        """
        if self._closed or self._handle is None:
            raise ServiceClosedError("the caption service is not running")
        if self._client is None:
            from .ray_deploy import serve_client

            self._client = await asyncio.to_thread(serve_client)
        path = str(Path(checkpoint).expanduser().resolve())
        async with self._reload_lock:
            return await asyncio.to_thread(self._reload, path, sha256)

    def _reload(self, path: str, sha256: str | None) -> str:
        from . import ray_deploy

        app, timeout = self.config.app_name, self.config.reload_timeout
        previous = ray_deploy.current_model(self._client, app)
        target = ModelChoice(path, sha256, previous.generation + 1)
        ray_deploy.set_model(self._client, self._spec, target, app)
        try:
            reports = ray_deploy.wait_for_generation(self._client, target.generation, app, timeout)
        except TimeoutError as err:
            reports, problem = {}, str(err)
        else:
            failed = {r: e.error for r, e in reports.items() if e.error}
            problem = "; ".join(f"replica {r} on {reports[r].node}: {msg}" for r, msg in sorted(failed.items()))
        if not problem:
            versions = {e.version for e in reports.values()}
            self._version = versions.pop() if len(versions) == 1 else ",".join(sorted(versions))
            log.info("every caption replica now serves %s (%s)", self._version, path)
            return self._version
        back = replace(previous, generation=target.generation + 1)
        ray_deploy.set_model(self._client, self._spec, back, app)
        with_back = ray_deploy.wait_for_generation(self._client, back.generation, app, timeout)
        self._version = next(iter(with_back.values())).version if with_back else self._version
        raise ModelLoadError(f"loading {path} failed ({problem}); every replica serves "
                             f"{previous.checkpoint or 'the bundled model'} again")

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop taking photos and wait for the ones out; the deployment itself keeps running."""
        self._closed = True
        end = time.monotonic() + max(0.0, drain_timeout)
        while time.monotonic() < end:
            with self._lock:
                if not self._in_flight:
                    break
            await asyncio.sleep(0.02)
        if self._started_ray and self.config.address is not None:
            import ray

            await asyncio.to_thread(ray.shutdown)  # our connection only; the cluster runs on
