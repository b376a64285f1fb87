"""Photos and image files in, captions with four buttons out."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from telegram import Message, Update
from telegram.constants import ChatAction
from telegram.error import BadRequest, NetworkError, TelegramError

from bot import keyboards, texts
from bot.handlers.common import Context, edit_or_reply, reply, send_chat_action
from bot.runtime import Runtime
from captioner.images import ImageError
from captioner.serving.base import (
    CaptionResult,
    QueueFullError,
    RequestTimeoutError,
    ServiceClosedError,
    ServiceError,
    WorkerCrashedError,
)
from common.settings import BOT_API_DOWNLOAD_LIMIT

log = logging.getLogger("bot.photos")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif")


@dataclass(frozen=True)
class Incoming:
    file_id: str
    file_unique_id: str
    file_size: int | None
    kind: str  # "photo" or "document"


def incoming_image(message: Message) -> Incoming | None:
    """The picture to caption: the largest size of a photo, or an image document."""
    if message.photo:
        best = max(message.photo, key=lambda size: (size.width * size.height, size.file_size or 0))
        return Incoming(best.file_id, best.file_unique_id, best.file_size, "photo")
    document = message.document
    if document is not None and is_image_document(document.mime_type, document.file_name):
        return Incoming(document.file_id, document.file_unique_id, document.file_size, "document")
    return None


def is_image_document(mime_type: str | None, file_name: str | None) -> bool:
    if mime_type and mime_type.lower().startswith("image/"):
        return True
    if mime_type and mime_type.lower() not in ("application/octet-stream", ""):
        return False
    return bool(file_name) and str(file_name).lower().endswith(IMAGE_EXTENSIONS)


def error_text(err: Exception) -> str:
    """What to tell a person when their photo could not be captioned."""
    if isinstance(err, ImageError):
        return texts.bad_image(err)
    if isinstance(err, QueueFullError):
        return texts.BUSY
    if isinstance(err, RequestTimeoutError):
        return texts.TIMEOUT
    if isinstance(err, ServiceClosedError):
        return texts.RESTARTING
    if isinstance(err, WorkerCrashedError | ServiceError):
        return texts.WORKER_FAILED
    return texts.ERROR


def size_problem(size: int | None, runtime: Runtime) -> str | None:
    settings = runtime.settings
    if size is None:
        return None
    if size > BOT_API_DOWNLOAD_LIMIT and not settings.local_mode:
        return texts.file_too_big_for_telegram(size)
    if size > settings.download_limit:
        return texts.file_too_big(size, settings.download_limit)
    return None


async def on_image(update: Update, context: Context) -> None:
    message = update.effective_message
    user = update.effective_user
    if message is None or user is None:
        return
    image = incoming_image(message)
    if image is None:
        return
    runtime = context.bot_data.runtime
    started = time.monotonic()
    ids = f"update={update.update_id} chat={message.chat.id} user={user.id} msg={message.message_id}"

    problem = size_problem(image.file_size, runtime)
    if problem is not None:
        log.info("photo refused %s: declared size %s bytes", ids, image.file_size)
        await reply(context, message, problem)
        return
    retry_after = runtime.limiter.acquire(user.id)
    if retry_after:
        log.info("photo rate-limited %s: retry in %.0f s", ids, retry_after)
        await reply(context, message, texts.rate_limited(runtime.limiter.limit, retry_after))
        return

    send_chat_action(context, runtime, message.chat.id, ChatAction.TYPING)
    data = await _download(context, image, runtime)
    downloaded = time.monotonic()
    if isinstance(data, str):
        log.info("photo not downloaded %s: %s", ids, data)
        await reply(context, message, data)
        return
    # Submit first, then (when the queue is long) tell the person where they stand.
    status = runtime.service.status()
    request = asyncio.ensure_future(runtime.service.caption(
        data, beam_size=runtime.settings.beam_size, timeout=runtime.settings.request_timeout
    ))
    await asyncio.sleep(0)  # let the request reach the queue (or be refused at once)
    notice = None
    threshold = runtime.settings.queue_notice_at
    if threshold and status.waiting >= threshold and not request.done():
        try:
            notice = await reply(
                context, message, texts.queue_position(status.waiting + 1, status.estimated_wait_seconds)
            )
        except TelegramError as err:
            log.info("queue notice not sent %s: %s", ids, err)
    try:
        result = await request
    except (ImageError, ServiceError) as err:
        log.info("photo not captioned %s bytes=%d: %s: %s", ids, len(data), type(err).__name__, err)
        await edit_or_reply(context, message, notice, error_text(err))
        return
    captioned = time.monotonic()
    try:
        await _answer(context, runtime, message, notice, image, data, result,
                      latency_ms=(captioned - started) * 1000)
    except TelegramError:
        raise
    except Exception:  # storage trouble: still give the person their caption, without buttons
        log.exception("could not store the caption %s; sending it without buttons", ids)
        await edit_or_reply(context, message, notice, texts.caption(result.text, result.confident, result.seen))
        return
    finished = time.monotonic()
    runtime.note_caption((finished - started) * 1000)
    log.info(
        "photo captioned %s bytes=%d %dx%d download=%.0fms queue=%.0fms compute=%.0fms batch=%d "
        "total=%.0fms model=%s",
        ids, len(data), result.width, result.height, (downloaded - started) * 1000,
        result.queue_seconds * 1000, result.compute_seconds * 1000, result.batch_size,
        (finished - started) * 1000, result.model_version,
    )


async def _download(context: Context, image: Incoming, runtime: Runtime) -> bytes | str:
    """The file's bytes, or a message for the person explaining why not."""
    try:
        file = await context.bot.get_file(image.file_id)
        size = file.file_size if file.file_size is not None else image.file_size
        problem = size_problem(size, runtime)
        if problem is not None:
            return problem
        data = bytes(await file.download_as_bytearray())
    except BadRequest as err:
        if "too big" in str(err).lower():
            return texts.file_too_big_for_telegram(image.file_size or BOT_API_DOWNLOAD_LIMIT + 1)
        log.warning("download of %s failed: %s", image.file_unique_id, err)
        return texts.DOWNLOAD_FAILED
    except (NetworkError, TelegramError, OSError) as err:
        log.warning("download of %s failed: %s", image.file_unique_id, err)
        return texts.DOWNLOAD_FAILED
    problem = size_problem(len(data), runtime)
    return problem if problem is not None else data


async def _answer(context: Context, runtime: Runtime, message: Message, notice: Message | None,
                  image: Incoming, data: bytes, result: CaptionResult, latency_ms: float) -> None:
    """Store the photo and caption, then post the caption with its buttons."""
    user = message.from_user
    sender = user.id if user is not None else message.chat.id
    storage = runtime.storage
    photo = await storage.record_photo(
        data, width=result.width, height=result.height,
        telegram_file_unique_id=image.file_unique_id, sender_telegram_id=sender,
    )
    caption = await storage.record_caption(
        photo.id, model_version=result.model_version, text=result.text, score=result.score,
        beam_size=result.beam_size, latency_ms=latency_ms, requester_telegram_id=sender,
        chat_id=message.chat.id,
    )
    sent = await edit_or_reply(context, message, notice, texts.caption(result.text, result.confident, result.seen),
                               keyboards.caption_keyboard(caption.id))
    try:
        await storage.set_caption_message(caption.id, sent.chat.id, sent.message_id)
    except Exception:  # the caption is shown and its buttons work; only reply-to-correct is lost
        log.exception("could not link caption %d to message %d", caption.id, sent.message_id)

