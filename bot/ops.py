"""What operators look at: ``/metrics`` (Prometheus) and ``/healthz`` on one small HTTP server.

The server runs in the bot's own event loop (``asyncio.start_server``), so the health check reads
the bot's state and awaits the caption service without threads, and the bot gains no web
framework. It is off unless ``CAPTIONBOT_METRICS_PORT`` is set, and listens on
``CAPTIONBOT_METRICS_HOST`` (127.0.0.1 by default). Anyone who can reach the port is treated as
hostile: GET and HEAD only, a request head of at most 8 KiB read within a few seconds, no body
read, a bounded number of connections, one request per connection.

Health (:class:`HealthCheck`) is two questions:

* **Does the bot poll?** The Updater runs and a getUpdates call was answered recently.
  :class:`PollingRequest` (the HTTP client python-telegram-bot uses for getUpdates and nothing
  else) records every answer; an idle long poll is answered every ``POLL_TIMEOUT`` seconds, so
  silence for much longer means Telegram is unreachable or the polling task died.
* **Does the caption service answer?** ``status()`` works and the service captioned something
  recently with no failure since (real photos are the evidence); otherwise one small probe photo
  is captioned (one at a time however many checks ask, and not counted as a person's photo).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.exposition import choose_encoder
from telegram.request import HTTPXRequest

from bot.metrics import BotMetrics, PollWatch
from captioner.serving.base import CaptionService, QueueFullError

log = logging.getLogger("bot.ops")

MAX_HEAD_BYTES = 8192  # request line and headers; Prometheus and curl send a few hundred bytes
READ_TIMEOUT = 5.0  # seconds to send the request head (a slow client must not hold a slot)
MAX_CLIENTS = 16  # connections served at once; more are closed at once
TRUST_ANSWER_SECONDS = 30.0  # a caption this recent shows the service answers: no probe needed
PROBE_TIMEOUT = 20.0  # seconds a probe photo may take (it queues behind people's photos)
POLL_SLACK = 30.0  # seconds beyond one long poll (its timeout plus read slack) before polling is "stale"


class PollingRequest(HTTPXRequest):
    """The HTTP client for getUpdates only: records whether Telegram answered each call."""

    def __init__(self, watch: PollWatch, *, read_timeout: float) -> None:
        super().__init__(connection_pool_size=1, read_timeout=read_timeout)
        self.watch = watch

    async def do_request(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        try:
            code, payload = await super().do_request(*args, **kwargs)
        except Exception:
            self.watch.failed()
            raise
        if code == HTTPStatus.OK:
            self.watch.answered()
        else:
            self.watch.failed()
        return code, payload


def probe_photo() -> bytes:
    """A small plain JPEG: enough to run the whole caption path, cheap for any model."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 140, 150)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: dict[str, Any]


class HealthCheck:
    """Whether the bot polls Telegram and its caption service answers (see the module doc)."""

    def __init__(self, metrics: BotMetrics, polling: Callable[[], bool],
                 service: Callable[[], CaptionService | None], *, poll_max_quiet: float,
                 trust_seconds: float = TRUST_ANSWER_SECONDS, probe_timeout: float = PROBE_TIMEOUT) -> None:
        self.metrics = metrics
        self.polling = polling
        self.service = service
        self.poll_max_quiet = poll_max_quiet
        self.trust_seconds = trust_seconds
        self.probe_timeout = probe_timeout
        self._probe: asyncio.Task[Verdict] | None = None
        self._photo: bytes | None = None

    async def report(self) -> tuple[bool, dict[str, Any]]:
        poll = self.poll_verdict()
        service = await self.service_verdict()
        healthy = poll.ok and service.ok
        return healthy, {"healthy": healthy, "polling": poll.detail, "caption_service": service.detail}

    def poll_verdict(self) -> Verdict:
        watch = self.metrics.poll
        running = self.polling()
        quiet = watch.quiet_seconds()
        ok = running and quiet is not None and quiet <= self.poll_max_quiet
        return Verdict(ok, {"ok": ok, "running": running, "seconds_since_last_poll": _rounded(quiet),
                            "failed_polls": watch.failures})

    async def service_verdict(self) -> Verdict:
        service = self.service()
        if service is None:
            return Verdict(False, {"ok": False, "error": "not started"})
        try:
            status = service.status()
        except Exception as err:
            return Verdict(False, {"ok": False, "error": type(err).__name__})
        detail: dict[str, Any] = {"model_version": service.model_version, "queue_waiting": status.waiting,
                                  "queue_in_flight": status.in_flight, "queue_capacity": status.capacity}
        answered = self._recent_answer()
        if answered is not None:
            return Verdict(True, {"ok": True, "checked_by": "recent caption", "seconds_ago": answered} | detail)
        verdict = await self._probe_once(service)
        return Verdict(verdict.ok, verdict.detail | detail)

    def _recent_answer(self) -> float | None:
        """Seconds since the service's last caption, if recent and no failure came after it."""
        evidence = self.metrics.evidence
        last = evidence.last_answer
        if last is None or (evidence.last_failure is not None and evidence.last_failure >= last):
            return None
        age = time.monotonic() - last
        return _rounded(age) if age <= self.trust_seconds else None

    async def _probe_once(self, service: CaptionService) -> Verdict:
        """Caption the probe photo; concurrent checks share the one probe in flight."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._run_probe(service))
        return await asyncio.shield(self._probe)

    async def _run_probe(self, service: CaptionService) -> Verdict:
        if self._photo is None:
            self._photo = probe_photo()
        started = time.monotonic()
        try:
            await service.caption(self._photo, beam_size=1, timeout=self.probe_timeout)
        except QueueFullError:  # it answers, and it is full: people are told "busy", not ignored
            self.metrics.note_probe("busy")
            return Verdict(True, {"ok": True, "checked_by": "probe", "busy": True})
        except Exception as err:  # any failure of the one known-good photo means the service is down
            self.metrics.note_probe("failed")
            log.warning("health probe: the caption service did not answer: %s", type(err).__name__)
            return Verdict(False, {"ok": False, "checked_by": "probe", "error": type(err).__name__})
        self.metrics.note_probe("ok")
        self.metrics.evidence.last_answer = time.monotonic()
        return Verdict(True, {"ok": True, "checked_by": "probe",
                              "probe_seconds": _rounded(time.monotonic() - started)})


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass(frozen=True)
class Response:
    status: HTTPStatus
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


class OpsServer:
    """``GET /metrics`` and ``GET /healthz`` (also ``/health``) on one port, in the bot's loop."""

    def __init__(self, host: str, port: int, metrics: BotMetrics, health: HealthCheck) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.health = health
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The port listened on (the OS picks one when the setting is 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics server is not running")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, self.requested_port,
                                                  limit=MAX_HEAD_BYTES)
        log.info("metrics on http://%s:%d/metrics, health on /healthz", self.host, self.port)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        for task in list(self._clients):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._clients) >= MAX_CLIENTS:
            writer.close()
            return
        self._clients.add(task)
        try:
            response = await self._respond(reader)
            if response is not None:
                await self._write(writer, response[0], response[1])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[Response, bool] | None:
        """The response and whether it goes with its body (not for HEAD); None: just hang up."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _text(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large\n"), True
        except (TimeoutError, asyncio.IncompleteReadError):
            return None
        request = _parse_head(head)
        if request is None:
            return _text(HTTPStatus.BAD_REQUEST, "bad request\n"), True
        method, path, headers = request
        if method not in ("GET", "HEAD"):
            return _text(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD\n", (("Allow", "GET, HEAD"),)), True
        return await self._route(path, headers), method == "GET"

    async def _route(self, path: str, headers: dict[str, str]) -> Response:
        if path == "/metrics":
            return self._metrics(headers.get("accept", ""))
        if path in ("/healthz", "/health"):
            healthy, report = await self.health.report()
            status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
            return Response(status, "application/json", json.dumps(report, sort_keys=True).encode() + b"\n")
        if path == "/":
            return _text(HTTPStatus.OK, "captionbot: /metrics (Prometheus), /healthz (JSON)\n")
        return _text(HTTPStatus.NOT_FOUND, "not found: try /metrics or /healthz\n")

    def _metrics(self, accept: str) -> Response:
        try:  # the Accept header is the client's: a malformed version must not break the scrape
            encoder, content_type = choose_encoder(accept)
        except Exception:
            encoder, content_type = generate_latest, CONTENT_TYPE_LATEST
        return Response(HTTPStatus.OK, content_type, encoder(self.metrics.registry))

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, response: Response, with_body: bool) -> None:
        lines = [f"HTTP/1.1 {response.status.value} {response.status.phrase}",
                 f"Content-Type: {response.content_type}", f"Content-Length: {len(response.body)}",
                 "Cache-Control: no-store", "Connection: close",
                 *(f"{name}: {value}" for name, value in response.headers)]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if with_body:
            writer.write(response.body)
        await writer.drain()


def _text(status: HTTPStatus, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, "text/plain; charset=utf-8", text.encode(), headers)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, path without the query, lower-cased headers), or None when it is not HTTP/1.x."""
    text = head.decode("latin-1")  # every byte is a latin-1 character: this cannot fail
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1].split("?", 1)[0], headers
