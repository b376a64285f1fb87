"""The HTTP API over real HTTP on loopback: uvicorn in a thread, the tiny checkpoint's worker behind it.

Two servers per module: one over a real ProcessCaptionService (captions, keys, image errors,
OpenAPI) and one over a test double (service failures, byte limits, the rate limit: none of these
reach a model).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from captioner.images import ImageLimits, ImageProblem, image_error
from captioner.result import CaptionResult
from captioner.serving.base import (
    CaptionService,
    QueueFullError,
    QueueStatus,
    RequestTimeoutError,
    ServiceError,
    WorkerCrashedError,
)
from captioner.serving.config import ServiceConfig
from captioner.serving.http import IMAGE_PROBLEMS, ApiError, RateLimiter, caption_response, create_app
from captioner.serving.keys import ApiKeys
from captioner.serving.process import ProcessCaptionService
from tests.helpers import ROOT, photo_bytes

SMALL_LIMIT = 50_000  # bytes, the double's server


class LiveServer:
    """uvicorn serving ``app`` on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port: int = self.socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < end and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.socket.close()

    def call(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            raw = response.read()
            found = {name.lower(): value for name, value in response.getheaders()}
        finally:
            connection.close()
        data = json.loads(raw) if found.get("content-type", "").startswith("application/json") else raw
        return response.status, found, data


def bearer(secret: str, content_type: str = "image/jpeg") -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", "Content-Type": content_type}


def multipart(fields: dict[str, str], image: bytes, filename: str = "photo.jpg") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class DoubleService(CaptionService):
    """Answers every caption with the error it is told to raise; counts calls."""

    def __init__(self) -> None:
        self.error: Exception = AssertionError("this test should not reach the service")
        self.calls = 0
        self.version = "double-v1"

    async def start(self) -> None:
        pass

    async def caption(self, image: bytes, *, beam_size: int | None = None, attention: bool = False,
                      timeout: float | None = None) -> CaptionResult:
        self.calls += 1
        raise self.error

    def status(self) -> QueueStatus:
        return QueueStatus(waiting=7, in_flight=2, capacity=9, estimated_wait_seconds=3.2)

    @property
    def model_version(self) -> str:
        return self.version

    async def reload(self, checkpoint: str | Path) -> str:
        raise NotImplementedError

    async def close(self, drain_timeout: float = 10.0) -> None:
        pass


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> ApiKeys:
    return ApiKeys(tmp_path_factory.mktemp("api") / "api_keys.json")


@pytest.fixture(scope="module")
def service(tiny_checkpoint: Path) -> Iterator[ProcessCaptionService]:
    s = ProcessCaptionService(ServiceConfig(checkpoint=str(tiny_checkpoint), device="cpu", threads=1,
                                            max_batch_size=4, max_wait_ms=10))
    asyncio.run(s.start())
    yield s
    asyncio.run(s.close(drain_timeout=5))


@pytest.fixture(scope="module")
def live(service: ProcessCaptionService, keys: ApiKeys) -> Iterator[LiveServer]:
    server = LiveServer(create_app(service, keys, requests_per_minute=1000))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def double() -> DoubleService:
    return DoubleService()


@pytest.fixture(scope="module")
def guarded(double: DoubleService, keys: ApiKeys) -> Iterator[LiveServer]:
    server = LiveServer(create_app(double, keys, requests_per_minute=3,
                                   image_limits=ImageLimits(max_bytes=SMALL_LIMIT)))
    yield server
    server.stop()


@pytest.fixture
def secret(keys: ApiKeys) -> str:
    """A fresh key per test, so rate limits of one test do not spill into another."""
    return keys.create("test")[1]


# --- captions ---------------------------------------------------------------------------------

def test_a_photo_is_captioned_as_the_service_captions_it(live: LiveServer, service: ProcessCaptionService,
                                                          secret: str) -> None:
    photo = photo_bytes(3, size=(120, 90))
    status, _, body = live.call("POST", "/v1/captions", photo, bearer(secret))
    assert status == 200, body
    expected = asyncio.run(service.caption(photo))
    assert body["caption"] == expected.text and body["words"] == list(expected.words)
    assert body["score"] == pytest.approx(expected.score, abs=1e-4)
    assert (body["model_version"], body["beam_size"]) == (service.model_version, expected.beam_size)
    assert (body["width"], body["height"]) == (120, 90)
    assert isinstance(body["confident"], bool) and isinstance(body["seen"], list)
    assert body["attention_png"] is None and body["batch_size"] >= 1


def test_multipart_with_options_and_the_attention_picture(live: LiveServer, service: ProcessCaptionService,
                                                          secret: str) -> None:
    photo = photo_bytes(4)
    body, content_type = multipart({"beam": "1", "attention": "true"}, photo)
    status, _, answer = live.call("POST", "/v1/captions?beam=5", body, bearer(secret, content_type))
    assert status == 200, answer
    assert answer["beam_size"] == 1  # the form field wins over the query string
    assert answer["caption"] == asyncio.run(service.caption(photo, beam_size=1)).text
    assert base64.b64decode(answer["attention_png"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_query_options_and_their_bounds(live: LiveServer, secret: str) -> None:
    status, _, body = live.call("POST", "/v1/captions?beam=2", photo_bytes(5), bearer(secret))
    assert status == 200 and body["beam_size"] == 2
    status, _, body = live.call("POST", "/v1/captions?beam=11", photo_bytes(5), bearer(secret))
    assert status == 422 and body["error"]["code"] == "invalid_request"
    form, content_type = multipart({"beam": "-1"}, photo_bytes(5))
    status, _, body = live.call("POST", "/v1/captions", form, bearer(secret, content_type))
    assert status == 422 and body["error"]["details"]["field"] == "beam"


def test_a_non_image_is_refused_with_its_code(live: LiveServer, secret: str) -> None:
    status, _, body = live.call("POST", "/v1/captions", b"%PDF-1.4 not a photo" * 20, bearer(secret))
    assert status == 422
    assert body["error"]["code"] == ImageProblem.NOT_AN_IMAGE.value and body["error"]["message"]
    status, _, body = live.call("POST", "/v1/captions", photo_bytes(1)[:300], bearer(secret))
    assert status == 422 and body["error"]["code"] == ImageProblem.TRUNCATED.value
    form, content_type = multipart({"beam": "2"}, b"")
    status, _, body = live.call("POST", "/v1/captions", form.replace(b'name="image"', b'name="picture"'),
                                bearer(secret, content_type))
    assert status == 422 and body["error"]["code"] == "missing_image"


# --- keys -------------------------------------------------------------------------------------

def test_missing_wrong_and_revoked_keys_get_401(live: LiveServer, keys: ApiKeys) -> None:
    photo = photo_bytes(6)
    status, headers, body = live.call("POST", "/v1/captions", photo, {"Content-Type": "image/jpeg"})
    assert status == 401 and body["error"]["code"] == "missing_api_key"
    assert headers["www-authenticate"].startswith("Bearer")
    key_id, secret = keys.create("soon revoked")
    status, headers, body = live.call("POST", "/v1/captions", photo, bearer(secret[:-2] + "xx"))
    assert status == 401 and body["error"]["code"] == "invalid_api_key" and "invalid_token" in headers[
        "www-authenticate"]
    status, _, _ = live.call("POST", "/v1/captions", photo, {"Authorization": f"Basic {secret}"})
    assert status == 401
    assert live.call("POST", "/v1/captions", photo, bearer(secret))[0] == 200
    ApiKeys(keys.path).revoke(key_id)  # as `python -m captioner keys revoke` would, while the server runs
    status, _, body = live.call("POST", "/v1/captions", photo, bearer(secret))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_the_key_is_checked_before_anything_else(live: LiveServer) -> None:
    status, _, body = live.call("POST", "/v1/captions?beam=999", b"junk", {"Content-Type": "text/plain"})
    assert status == 401 and body["error"]["code"] == "missing_api_key"


# --- limits -----------------------------------------------------------------------------------

def _response_head(sock: socket.socket, limit: float = 10.0) -> bytes:
    sock.settimeout(limit)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return head


def test_a_declared_oversized_body_is_refused_unread(guarded: LiveServer, secret: str) -> None:
    """Content-Length over the limit: 413 at once, though not a byte of the body was sent."""
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
                     f"Content-Type: image/jpeg\r\nContent-Length: 1000000000\r\n\r\n".encode())
        head = _response_head(sock)
    assert head.startswith(b"HTTP/1.1 413")
    status, _, body = guarded.call("POST", "/v1/captions", b"x" * (SMALL_LIMIT + 1), bearer(secret))
    assert status == 413 and body["error"]["code"] == "too_many_bytes"
    assert body["error"]["details"] == {"size": SMALL_LIMIT + 1, "limit": SMALL_LIMIT}
    form, content_type = multipart({}, b"x" * (SMALL_LIMIT + 100))  # within the multipart allowance
    status, _, body = guarded.call("POST", "/v1/captions", form, bearer(secret, content_type))
    assert status == 413 and body["error"]["details"] == {"size": SMALL_LIMIT + 100, "limit": SMALL_LIMIT}


def test_an_undeclared_oversized_body_is_cut_off_at_the_limit(guarded: LiveServer, secret: str) -> None:
    """Chunked, no Content-Length: the server answers 413 once past the limit and reads no further."""
    total, chunk = 50 * SMALL_LIMIT, b"x" * 8192
    sent = 0
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        sock.sendall(f"POST /v1/captions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\r\n"
                     f"Content-Type: image/jpeg\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        answered = False
        while sent < total and not answered:
            try:
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed the connection after answering
            sent += len(chunk)
            answered = bool(select.select([sock], [], [], 0.005)[0])
        head = _response_head(sock)
    assert head.startswith(b"HTTP/1.1 413"), head
    assert sent < total / 2  # the socket buffers hold a little; nowhere near the whole body


def test_the_rate_limit_answers_429_with_retry_after(guarded: LiveServer, keys: ApiKeys, secret: str) -> None:
    for _ in range(3):  # the key's bucket holds 3; refused requests spend their token too
        assert guarded.call("POST", "/v1/captions", b"x", bearer(secret, "text/plain"))[0] == 415
    status, headers, body = guarded.call("POST", "/v1/captions", b"x", bearer(secret, "text/plain"))
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert 1 <= int(headers["retry-after"]) <= 20
    other = keys.create("another caller")[1]
    assert guarded.call("POST", "/v1/captions", b"x", bearer(other, "text/plain"))[0] == 415  # per key


def test_the_token_bucket_refills_at_its_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(6, clock=lambda: now[0])  # one token every 10 s, bursts of 6
    assert [limiter.take("k") for _ in range(6)] == [0.0] * 6
    assert limiter.take("k") == pytest.approx(10.0)
    now[0] = 5.0
    assert limiter.take("k") == pytest.approx(5.0)
    assert limiter.take("other") == 0.0
    now[0] = 10.0
    assert limiter.take("k") == 0.0
    now[0] = 1000.0
    assert [limiter.take("k") for _ in range(7)][-2:] == [0.0, pytest.approx(10.0)]  # the burst stays capped


# --- service failures -------------------------------------------------------------------------

@pytest.mark.parametrize(("error", "status", "code", "retry"), [
    (QueueFullError("64 photos are queued in /secret/path"), 503, "busy", True),
    (RequestTimeoutError("no caption within 60 s"), 504, "timeout", False),
    (WorkerCrashedError("worker pid 1234 died: /secret/path"), 503, "worker_failed", True),
    (ServiceError("CUDA error at /secret/path"), 500, "internal", False),
])
def test_service_failures_map_to_statuses_without_internals(guarded: LiveServer, double: DoubleService, secret: str,
                                                            error: Exception, status: int, code: str,
                                                            retry: bool) -> None:
    double.error = error
    got, headers, body = guarded.call("POST", "/v1/captions", photo_bytes(0), bearer(secret))
    assert (got, body["error"]["code"]) == (status, code)
    assert "secret" not in json.dumps(body) and "pid" not in json.dumps(body)
    assert ("retry-after" in headers) is retry
    if code == "busy":
        assert headers["retry-after"] == "4"  # the service's own estimate (3.2 s), rounded up


def test_wrong_media_type_is_415(guarded: LiveServer, secret: str) -> None:
    status, _, body = guarded.call("POST", "/v1/captions", b"{}", bearer(secret, "application/json"))
    assert status == 415 and body["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("code", list(ImageProblem))
def test_every_image_problem_has_a_status_and_a_sentence(code: ImageProblem) -> None:
    assert set(IMAGE_PROBLEMS) == set(ImageProblem)
    full: dict[str, int | str] = {"size": 21_000_000, "limit": 20_000_000, "format": "PCX"}
    for details in (full, {}):
        err = ApiError.from_image_error(image_error(code, **details))
        assert 400 <= err.status < 500 and err.code == code.value and err.message.endswith(".")


def test_attention_maps_are_returned_when_the_service_gives_them() -> None:
    """The embedded worker sends the picture only; a service that returns the maps has them passed on."""
    import numpy as np

    maps = np.full((2, 3, 3), 1 / 9, dtype=np.float32)
    result = CaptionResult(text="a dog", words=("a", "dog"), score=-1.0, log_prob=-2.0, finished=True,
                           model_version="v", beam_size=3, seen=(("dog", 0.9),), attention=maps,
                           attention_png=b"\x89PNG")
    body = caption_response(result)
    assert body.attention_maps is not None and len(body.attention_maps) == 2
    assert body.attention_maps[1][2][2] == pytest.approx(1 / 9, abs=1e-5)
    assert base64.b64decode(body.attention_png or "") == b"\x89PNG"
    assert body.seen[0].label == "dog" and body.caption == "a dog"


# --- health and documentation -----------------------------------------------------------------

def test_health_needs_no_key_and_says_whether_the_service_answers(live: LiveServer, guarded: LiveServer,
                                                                   double: DoubleService,
                                                                   service: ProcessCaptionService) -> None:
    status, _, body = live.call("GET", "/v1/health")
    assert status == 200 and body["status"] == "ok" and body["model_version"] == service.model_version
    double.version = ""  # not loaded
    try:
        status, _, body = guarded.call("GET", "/v1/health")
    finally:
        double.version = "double-v1"
    assert status == 503 and body["status"] == "unavailable"


def test_the_openapi_page_documents_the_endpoint(live: LiveServer) -> None:
    status, _, spec = live.call("GET", "/openapi.json")
    assert status == 200
    post = spec["paths"]["/v1/captions"]["post"]
    assert {"image/*", "multipart/form-data"} <= set(post["requestBody"]["content"])
    assert post["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("CaptionResponse")
    assert {"401", "413", "429", "503"} <= set(post["responses"])
    assert {p["name"] for p in post["parameters"]} == {"beam", "attention"}
    assert "caption" in spec["components"]["schemas"]["CaptionResponse"]["properties"]
    assert "/v1/health" in spec["paths"]
    assert live.call("GET", "/docs")[0] == 200
    status, _, body = live.call("GET", "/nowhere")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_the_caption_command_does_not_need_fastapi() -> None:
    """FastAPI is the optional 'api' extra: `python -m captioner caption` must import without it."""
    code = ("import sys, captioner.__main__ as m; m.build_parser();"
            "assert not [n for n in sys.modules if n.split('.')[0] in ('fastapi', 'uvicorn', 'starlette')]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
