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
from bot.handlers.common import Context, edit_or_reply, is_private, reply, send_chat_action
from bot.runtime import Runtime
from bot.upkeep import may_store
from captioner.images import ImageError, storable_jpeg
from captioner.serving.base import (
    CaptionResult,
    QueueFullError,
    RequestTimeoutError,
    ServiceClosedError,
    ServiceError,
    WorkerCrashedError,
)
from common.settings import BOT_API_DOWNLOAD_LIMIT
from storage import InboxItem

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
    """Write the request to the durable inbox first, then answer it, then mark it answered."""
    message = update.effective_message
    user = update.effective_user
    if message is None or user is None:
        return
    image = incoming_image(message)
    if image is None:
        return
    if not is_private(message) and not mentions_bot(message, context.bot.username):
        return  # in a group the bot captions only when asked: a mention, or /caption in reply
    await take_request(update, context, message, user.id, image)


def mentions_bot(message: Message, username: str | None) -> bool:
    text = (message.caption or message.text or "").lower()
    return bool(username) and f"@{username}".lower() in text


async def take_request(update: Update, context: Context, message: Message, sender: int, image: Incoming) -> None:
    """Write the request to the durable inbox, then answer it (unless already in the inbox)."""
    storage = context.bot_data.runtime.storage
    item = InboxItem(message.chat.id, message.chat.type, message.message_id, sender, image.kind,
                     image.file_id, image.file_unique_id, image.file_size)
    try:
        fresh = await storage.inbox_receive(item)
    except Exception:  # storage trouble must not stop the caption; only crash safety is lost
        log.exception("could not write update %d to the inbox", update.update_id)
        fresh = True
    if not fresh:
        log.info("update %d: message %d is already in the inbox (redelivered); left to it",
                 update.update_id, message.message_id)
        return
    context.bot_data.runtime.metrics.note_photo_received()
    await answer_request(context, message, sender, image, f"update={update.update_id}")


async def answer_request(context: Context, message: Message, sender: int, image: Incoming, origin: str) -> None:
    """Answer one photo request (a new update, or one replayed from the inbox) and mark it answered."""
    try:
        await _handle(context, message, sender, image, origin)
    finally:
        try:
            await context.bot_data.runtime.storage.inbox_answered(message.chat.id, message.message_id)
        except Exception:
            log.exception("could not mark message %d of chat %d answered", message.message_id, message.chat.id)


async def _handle(context: Context, message: Message, sender: int, image: Incoming, origin: str) -> None:
    runtime = context.bot_data.runtime
    started = time.monotonic()
    ids = f"{origin} chat={message.chat.id} user={sender} msg={message.message_id}"

    problem = size_problem(image.file_size, runtime)
    if problem is not None:
        log.info("photo refused %s: declared size %s bytes", ids, image.file_size)
        runtime.metrics.note_error("file_too_big")
        await reply(context, message, problem)
        return
    retry_after = _photo_rate_limit(runtime, sender, message.media_group_id)
    if retry_after:
        log.info("photo rate-limited %s: retry in %.0f s", ids, retry_after)
        runtime.metrics.note_rate_limited()
        await reply(context, message, texts.rate_limited(runtime.limits.photos.limit, retry_after))
        return
    admission = runtime.limits.admission
    if not admission.enter():
        log.info("photo refused %s: %d photos in hand, the most the bot takes", ids, admission.in_hand)
        runtime.metrics.note_busy("bot")
        await reply(context, message, texts.BUSY)
        return
    try:
        async with runtime.limits.in_flight.slot(sender):
            await _serve(context, runtime, message, sender, image, ids, started)
    finally:
        admission.leave()


def _photo_rate_limit(runtime: Runtime, person: int, media_group_id: str | None) -> float:
    """Seconds until this photo may be sent (0: go ahead); an album pays once for up to 10 photos."""
    albums = runtime.limits.albums
    if albums.already_admitted(person, media_group_id):
        return 0.0
    retry_after = runtime.limits.photos.acquire(person)
    if not retry_after:
        albums.admit(person, media_group_id)
    return retry_after


async def _serve(context: Context, runtime: Runtime, message: Message, sender: int, image: Incoming,
                 ids: str, started: float) -> None:
    """Download, caption and answer one admitted photo."""
    send_chat_action(context, runtime, message.chat.id, ChatAction.TYPING)
    data = await _download(context, image, runtime)
    downloaded = time.monotonic()
    if isinstance(data, str):
        log.info("photo not downloaded %s: %s", ids, data)
        runtime.metrics.note_error("download_failed" if data == texts.DOWNLOAD_FAILED else "file_too_big")
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
        runtime.metrics.note_service_failed(err)
        await edit_or_reply(context, message, notice, error_text(err))
        return
    captioned = time.monotonic()
    runtime.metrics.note_service_answered(result)
    try:
        await _answer(context, runtime, message, sender, notice, image, data, result,
                      latency_ms=(captioned - started) * 1000)
    except TelegramError:
        raise
    except Exception:  # storage trouble: still give the person their caption, without buttons
        log.exception("could not store the caption %s; sending it without buttons", ids)
        runtime.metrics.note_error("storage")
        await edit_or_reply(context, message, notice, caption_text(result))
        runtime.metrics.note_caption_sent(time.monotonic() - started)
        return
    finished = time.monotonic()
    runtime.metrics.note_caption_sent(finished - started)
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
            return texts.file_too_big_for_telegram(image.file_size)  # None: size not declared
        log.warning("download of %s failed: %s", image.file_unique_id, err)
        return texts.DOWNLOAD_FAILED
    except (NetworkError, TelegramError, OSError) as err:
        log.warning("download of %s failed: %s", image.file_unique_id, err)
        return texts.DOWNLOAD_FAILED
    problem = size_problem(len(data), runtime)
    return problem if problem is not None else data


def caption_text(result: CaptionResult) -> str:
    """The caption as people read it: hedged, with what the classifier saw, when the model is unsure."""
    return texts.caption(result.text, result.confident, result.seen)


async def _answer(context: Context, runtime: Runtime, message: Message, sender: int, notice: Message | None,
                  image: Incoming, data: bytes, result: CaptionResult, latency_ms: float) -> None:
    """Store the photo and caption, then post the caption with its buttons."""
    storage = runtime.storage
    if not await may_store(runtime, context.bot):
        await edit_or_reply(context, message, notice, caption_text(result))
        return
    kept = await asyncio.to_thread(storable_jpeg, data, runtime.image_limits)
    photo = await storage.record_photo(
        kept, width=result.width, height=result.height,
        telegram_file_unique_id=image.file_unique_id, sender_telegram_id=sender,
    )
    caption = await storage.record_caption(
        photo.id, model_version=result.model_version, text=result.text, score=result.score,
        beam_size=result.beam_size, latency_ms=latency_ms, requester_telegram_id=sender,
        chat_id=message.chat.id,
    )
    sent = await edit_or_reply(context, message, notice, caption_text(result),
                               keyboards.caption_keyboard(caption.id))
    try:
        await storage.set_caption_message(caption.id, sent.chat.id, sent.message_id)
    except Exception:  # the caption is shown; its buttons and reply-to-correct need this link
        log.exception("could not link caption %d to message %d", caption.id, sent.message_id)
    dropped = await storage.enforce_quota(sender, runtime.settings.photo_quota_bytes)
    if dropped:
        log.info("quota: %d older photos of user %d deleted", dropped, sender)



async def on_caption_command(update: Update, context: Context) -> None:
    """/caption in reply to a photo: how a group asks for a caption (works in private chats too)."""
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    photo = message.reply_to_message
    image = incoming_image(photo) if photo is not None else None
    if photo is None or image is None:
        await reply(context, message, texts.CAPTION_HOW)
        return
    await take_request(update, context, photo, user.id, image)
