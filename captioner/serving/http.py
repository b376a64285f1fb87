"""The HTTP API over any :class:`CaptionService`: ``POST /v1/captions``, ``GET /v1/health``, OpenAPI.

It knows only the service interface, the image limits and error codes, and the API keys file,
so the same app runs over the embedded worker (``python -m captioner api``) and, mounted by a Ray
Serve ingress, over a Ray-backed service. FastAPI is an optional extra (``pip install -e '.[api]'``):
nothing the bot imports imports this module.

Every request is refused as early as possible and as cheaply as possible: the key and the rate
limit are checked before a byte of the body is read; a declared ``Content-Length`` over the limit
is refused unread; a body that turns out longer is refused as soon as the limit is passed (the
rest is never read); decoding happens in the service, which checks pixels and formats. Errors are
JSON ``{"error": {"code", "message", "details"}}`` with the image codes the bot uses
(:class:`captioner.images.ImageProblem`), and never carry internals.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations at runtime,
# and those name closures (``authenticate``) that string annotations could not resolve.
import asyncio
import base64
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from ..images import ImageError, ImageLimits, ImageProblem, image_error
from ..result import CaptionResult
from .base import (
    CaptionService,
    QueueFullError,
    RequestTimeoutError,
    ServiceClosedError,
    ServiceError,
    WorkerCrashedError,
)
from .keys import ApiKey, ApiKeys, ApiKeysError

log = logging.getLogger("captioner.http")

API_TITLE = "captionbot API"
REALM = "captionbot"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and option fields around the image
MAX_FIELD_BYTES = 1024  # a non-file form field ("beam", "attention") longer than this is malformed
RAW_TYPES = ("image/", "application/octet-stream")

# --- error wording ----------------------------------------------------------------------------
# The bot words these codes in bot/texts.py; the captioner cannot import the bot, so the API has
# its own sentences in the same spirit (addressed to a developer, not to a person in a chat).
# ``tests/test_http_api.py`` checks that every ImageProblem has one.

Details = Mapping[str, int | str]


def _megabytes(value: int | str) -> str:
    return f"{int(value) / 1e6:.1f} MB"


def _too_many_bytes(d: Details) -> str:
    if "size" in d:
        return f"The file is {_megabytes(d['size'])}; the limit is {_megabytes(d['limit'])}."
    return f"The file is larger than the limit of {_megabytes(d['limit'])}."


IMAGE_PROBLEMS: dict[ImageProblem, tuple[int, Callable[[Details], str]]] = {
    ImageProblem.TOO_MANY_BYTES: (413, _too_many_bytes),
    ImageProblem.TOO_MANY_PIXELS: (413, lambda d: (
        f"The image has too many pixels (the limit is {int(d['limit']) / 1e6:.0f} megapixels).")),
    ImageProblem.EMPTY: (422, lambda _: "The file is empty."),
    ImageProblem.NOT_AN_IMAGE: (422, lambda _: "This file is not an image that can be read (send a JPEG or PNG)."),
    ImageProblem.NO_PIXELS: (422, lambda _: "The image has no pixels."),
    ImageProblem.DAMAGED: (422, lambda _: "This image is damaged and cannot be decoded."),
    ImageProblem.TRUNCATED: (422, lambda _: "The image file is incomplete (it was cut short)."),
    ImageProblem.UNSUPPORTED_FORMAT: (415, lambda d: (
        f"{d.get('format', 'This')} images are not supported; send a JPEG, PNG, WebP or GIF.")),
}


class ApiError(Exception):
    """An HTTP error answer: status, a stable code, a sentence, details, extra headers."""

    def __init__(self, status: int, code: str, message: str, details: Details | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}")
        self.status, self.code, self.message = status, code, message
        self.details: dict[str, int | str] = dict(details or {})
        self.headers = headers or {}

    @classmethod
    def from_image_error(cls, err: ImageError) -> "ApiError":
        status, words = IMAGE_PROBLEMS[err.code]
        try:
            message = words(err.details)
        except (KeyError, ValueError):  # details missing or odd: still answer with the code
            message = "This image cannot be captioned."
        return cls(status, err.code.value, message, err.details)

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message, "details": self.details}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _unauthorized(code: str, message: str) -> ApiError:
    challenge = f'Bearer realm="{REALM}"' + ('' if code == "missing_api_key" else ', error="invalid_token"')
    return ApiError(401, code, message, headers={"WWW-Authenticate": challenge})


# --- response models (they are the OpenAPI page) ----------------------------------------------

class ErrorInfo(BaseModel):
    code: str = Field(description="stable, machine-readable: an image problem (captioner.images.ImageProblem) "
                                  "or one of the API's own codes (README, 'HTTP API')")
    message: str = Field(description="one English sentence for the developer")
    details: dict[str, int | str] = Field(default_factory=dict, description="the numbers behind the code")


class ErrorResponse(BaseModel):
    error: ErrorInfo


class Guess(BaseModel):
    label: str
    probability: float


class CaptionResponse(BaseModel):
    caption: str = Field(description="the caption, one sentence")
    words: list[str] = Field(description="the caption's words, as the model wrote them")
    score: float = Field(description="length-normalised log-probability (what beam search ranked by)")
    log_prob: float
    finished: bool = Field(description="false when the length limit cut the caption short")
    confident: bool = Field(description="false when the caption should not be trusted")
    seen: list[Guess] = Field(description="the encoder's ImageNet classifier's top guesses")
    model_version: str
    beam_size: int
    width: int = Field(description="of the photo after EXIF orientation, in pixels")
    height: int
    queue_seconds: float
    compute_seconds: float
    batch_size: int = Field(description="how many photos shared the model's batch")
    attention_png: str | None = Field(
        None, description="with attention=true: the attention picture (one heat map per word), base64 PNG")
    attention_maps: list[list[list[float]]] | None = Field(
        None, description="with attention=true, when the service returns them: one grid x grid map per word")


class QueueInfo(BaseModel):
    waiting: int
    in_flight: int
    capacity: int
    estimated_wait_seconds: float


class HealthResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    model_version: str
    queue: QueueInfo | None = None


def caption_response(result: CaptionResult) -> CaptionResponse:
    maps = None
    if result.attention is not None:
        maps = [[[round(float(v), 5) for v in row] for row in word] for word in result.attention.tolist()]
    return CaptionResponse(
        caption=result.text, words=list(result.words), score=result.score, log_prob=result.log_prob,
        finished=result.finished, confident=result.confident,
        seen=[Guess(label=label, probability=p) for label, p in result.seen],
        model_version=result.model_version, beam_size=result.beam_size, width=result.width, height=result.height,
        queue_seconds=result.queue_seconds, compute_seconds=result.compute_seconds, batch_size=result.batch_size,
        attention_png=base64.b64encode(result.attention_png).decode("ascii") if result.attention_png else None,
        attention_maps=maps)


# --- the per-key rate limit -------------------------------------------------------------------

@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per key: ``per_minute`` requests a minute, bursts of up to ``per_minute``.

    In memory, per process: with several API processes (Ray ingress replicas) each keeps its own
    buckets, so a key's limit is per replica. Buckets exist only for verified keys, so hostile
    requests cannot grow the table.
    """

    per_minute: int
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.per_minute < 1:
            raise ValueError("requests_per_minute must be >= 1")

    def take(self, key_id: str) -> float:
        """0.0 if the request may go ahead (a token is spent), else seconds until one is available."""
        rate = self.per_minute / 60.0
        now = self.clock()
        with self._lock:
            bucket = self._buckets.setdefault(key_id, _Bucket(float(self.per_minute), now))
            bucket.tokens = min(float(self.per_minute), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / rate


# --- reading the body -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Upload:
    image: bytes
    options: dict[str, str]  # option fields of a multipart body


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    if not value.isdigit() or len(value) > 18:
        raise ApiError(400, "invalid_request", "The Content-Length header is not a number.")
    return int(value)


async def _capped(request: Request, cap: int, limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks, stopping with 413 as soon as more than ``cap`` bytes have arrived."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > cap:
            raise ApiError.from_image_error(image_error(ImageProblem.TOO_MANY_BYTES, limit=limit))
        yield chunk


async def _read_raw(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _capped(request, limit, limit)])


async def _read_multipart(request: Request, limit: int) -> _Upload:
    parser = MultiPartParser(request.headers, _capped(request, limit + MULTIPART_OVERHEAD, limit),
                             max_files=1, max_fields=8, max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise ApiError(400, "invalid_request", f"The multipart body cannot be parsed: {err.message}") from None
    try:
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "missing_image",
                           'The multipart body has no file field "image" (a part with a filename).')
        image = await upload.read()
        options = {name: value for name, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()
    return _Upload(image, options)


async def read_upload(request: Request, limits: ImageLimits, timeout: float) -> _Upload:
    """The image (and multipart option fields) of a caption request, within the byte limit."""
    content_type = request.headers.get("content-type", "").lower()
    multipart = content_type.startswith("multipart/form-data")
    if not multipart and not content_type.startswith(RAW_TYPES):
        raise ApiError(415, "unsupported_media_type",
                       "Send the image as the body (Content-Type image/*) or as multipart/form-data field \"image\".")
    declared = _declared_length(request)
    cap = limits.max_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    if declared is not None and declared > cap:  # refused unread
        raise ApiError.from_image_error(image_error(ImageProblem.TOO_MANY_BYTES, size=declared,
                                                    limit=limits.max_bytes))
    try:
        async with asyncio.timeout(timeout):
            upload = (await _read_multipart(request, limits.max_bytes) if multipart
                      else _Upload(await _read_raw(request, limits.max_bytes), {}))
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"The body did not arrive within {timeout:g} s.") from None
    except ClientDisconnect:
        raise ApiError(400, "invalid_request", "The client went away before the body arrived.") from None
    if len(upload.image) > limits.max_bytes:  # a multipart image within the overhead allowance
        raise ApiError.from_image_error(image_error(ImageProblem.TOO_MANY_BYTES, size=len(upload.image),
                                                    limit=limits.max_bytes))
    return upload


# --- options ----------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _form_options(fields: Mapping[str, str], beam: int | None, attention: bool,
                  max_beam: int) -> tuple[int | None, bool]:
    """Multipart option fields win over the query string; both are bounded the same way."""
    if "beam" in fields:
        text = fields["beam"].strip()
        if not text.isdigit() or not 1 <= int(text) <= max_beam:
            raise ApiError(422, "invalid_request", f"beam must be a whole number from 1 to {max_beam}.",
                           {"field": "beam", "max": max_beam})
        beam = int(text)
    if "attention" in fields:
        flag = fields["attention"].strip().lower()
        if flag not in _TRUE | _FALSE:
            raise ApiError(422, "invalid_request", "attention must be true or false.", {"field": "attention"})
        attention = flag in _TRUE
    return beam, attention


# --- service errors ---------------------------------------------------------------------------

def _service_error(err: ServiceError, service: CaptionService) -> ApiError:
    """The answer for a service failure; ``str(err)`` goes to the log only."""
    if isinstance(err, QueueFullError):
        try:
            wait = service.status().estimated_wait_seconds
        except Exception:  # the estimate is a courtesy; never fail the answer over it
            wait = 5.0
        return ApiError(503, "busy", "The caption service is busy; try again shortly.", headers=_retry_after(wait))
    if isinstance(err, RequestTimeoutError):
        return ApiError(504, "timeout", "No caption came in time; try again shortly.")
    if isinstance(err, WorkerCrashedError):
        return ApiError(503, "worker_failed", "The caption worker failed on this request; try again or "
                        "try another image.", headers=_retry_after(5))
    if isinstance(err, ServiceClosedError):
        return ApiError(503, "unavailable", "The caption service is not running.", headers=_retry_after(30))
    return ApiError(500, "internal", "Something went wrong on the server.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text} for status, text in {
        400: "malformed request (Content-Length, multipart)",
        401: "missing, invalid or revoked API key (code missing_api_key or invalid_api_key)",
        408: "the body did not arrive in time (body_timeout)",
        413: "too_many_bytes (refused before or while reading) or too_many_pixels",
        415: "unsupported_media_type (not image/* or multipart), unsupported_format (image format)",
        422: "empty, not_an_image, no_pixels, damaged, truncated, missing_image, invalid_request",
        429: "rate_limited: this key's requests per minute; see Retry-After",
        500: "internal",
        503: "busy (see Retry-After), worker_failed, unavailable",
        504: "timeout",
    }.items()
}

_REQUEST_BODY: dict[str, Any] = {
    "required": True,
    "description": "The image: the raw bytes of the file, or a multipart form with a file field \"image\" "
                   "(and optionally fields \"beam\" and \"attention\", which win over the query string).",
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "string", "format": "binary"},
                           "beam": {"type": "integer", "minimum": 1},
                           "attention": {"type": "boolean"}}}},
    },
}


# --- the app ----------------------------------------------------------------------------------

def create_app(service: CaptionService, keys: ApiKeys, *, requests_per_minute: int = 60,
               image_limits: ImageLimits = ImageLimits(), max_beam_size: int = 10,  # noqa: B008 (frozen)
               body_timeout: float = 60.0) -> FastAPI:
    """The API over ``service`` (started and closed by the caller), with keys from ``keys``.

    ``max_beam_size`` should match the service's own bound; ``body_timeout`` bounds how long a
    client may take to send its body (a slow sender holds a connection).
    """
    limiter = RateLimiter(requests_per_minute)
    bearer = HTTPBearer(auto_error=False, description="an API key from `python -m captioner keys create NAME`")
    app = FastAPI(title=API_TITLE, version="1",
                  description="Captions for photos: one English sentence per image, with its score, the model "
                              "version and, on request, where the model looked for each word.")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                             for e in err.errors())
        return ApiError(422, "invalid_request", problems or "The request is not valid.").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return ApiError(err.status_code, code, str(err.detail), headers=dict(err.headers or {})).response()

    def authenticate(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
                     request: Request) -> ApiKey:
        """The caller's key, checked (and its rate limit spent) before any of the body is read."""
        if credentials is None:
            if request.headers.get("authorization"):
                raise _unauthorized("invalid_api_key", "The Authorization header must be 'Bearer <API key>'.")
            raise _unauthorized("missing_api_key", "Send an API key: 'Authorization: Bearer <API key>'.")
        try:
            key = keys.verify(credentials.credentials)
        except ApiKeysError:
            log.exception("the API keys file cannot be read")
            raise ApiError(500, "internal", "Something went wrong on the server.") from None
        if key is None:
            raise _unauthorized("invalid_api_key", "This API key is not valid (unknown or revoked).")
        wait = limiter.take(key.key_id)
        if wait > 0:
            raise ApiError(429, "rate_limited", f"This key may make {requests_per_minute} requests a minute.",
                           {"limit_per_minute": requests_per_minute}, headers=_retry_after(wait))
        return key

    @app.post("/v1/captions", response_model=CaptionResponse, responses=ERROR_RESPONSES,
              openapi_extra={"requestBody": _REQUEST_BODY}, summary="Caption an image")
    async def captions(request: Request, key: Annotated[ApiKey, Depends(authenticate)],
                       beam: Annotated[int | None, Query(ge=1, le=max_beam_size,
                                                         description="beam size (default: the model's)")] = None,
                       attention: Annotated[bool, Query(description="also return the attention picture")] = False,
                       ) -> CaptionResponse:
        started = time.monotonic()
        upload = await read_upload(request, image_limits, body_timeout)
        beam, attention = _form_options(upload.options, beam, attention, max_beam_size)
        try:
            result = await service.caption(upload.image, beam_size=beam, attention=attention)
        except ImageError as err:
            log.info("key %s: image refused: %s", key.key_id, err)
            raise ApiError.from_image_error(err) from None
        except ValueError as err:  # an option the service bounds tighter than max_beam_size
            raise ApiError(422, "invalid_request", str(err)) from None
        except ServiceError as err:
            log.warning("key %s: %s: %s", key.key_id, type(err).__name__, err)
            raise _service_error(err, service) from None
        log.info("key %s: captioned %d bytes in %.3f s (batch of %d)", key.key_id, len(upload.image),
                 time.monotonic() - started, result.batch_size)
        return caption_response(result)

    @app.get("/v1/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}},
             summary="Whether the caption service answers (no key needed)")
    def health() -> JSONResponse:
        try:
            status, version = service.status(), service.model_version
        except ServiceError as err:
            log.warning("health: %s: %s", type(err).__name__, err)
            status, version = None, ""
        queue = QueueInfo(waiting=status.waiting, in_flight=status.in_flight, capacity=status.capacity,
                          estimated_wait_seconds=status.estimated_wait_seconds) if status else None
        body = HealthResponse(status="ok" if version and status else "unavailable", model_version=version,
                              queue=queue)
        return JSONResponse(body.model_dump(), status_code=200 if body.status == "ok" else 503)

    return app
