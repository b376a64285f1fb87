"""Corrections: the reply after ✏️, a reply straight to a caption, and /cancel."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from telegram import Message, Update

from bot import texts
from bot.handlers.common import Context, is_private, reply
from storage import CorrectionRecord, CorrectionRejected, CorrectionStatus, PendingCorrection

log = logging.getLogger("bot.corrections")

# A pending correction also catches plain (non-reply) text in a private chat for this long;
# replies to the ✏️ prompt itself count however old they are.
PENDING_PLAIN_TEXT_WINDOW = timedelta(hours=6)


async def on_text(update: Update, context: Context) -> None:
    message = update.effective_message
    user = update.effective_user
    if message is None or user is None or message.text is None:
        return
    if not is_private(message):
        return  # corrections are taken in private chats only: group members never saw /privacy
    runtime = context.bot_data.runtime
    storage = runtime.storage
    replied = message.reply_to_message
    to_bot = replied is not None and replied.from_user is not None and replied.from_user.id == context.bot.id

    caption_id: int | None = None
    how = ""
    pending: PendingCorrection | None = None
    if to_bot and replied is not None:
        caption = await storage.find_caption_by_message(message.chat.id, replied.message_id)
        if caption is not None:
            caption_id, how = caption.id, "reply to caption"
        else:
            pending = await storage.get_pending_correction(user.id)
            if pending is not None and (_is_prompt(pending, replied) or _recent(pending)):
                # the prompt, or an older prompt of theirs: either way they are answering ✏️
                caption_id, how = pending.caption_id, "reply to prompt"
    elif is_private(message):
        pending = await storage.get_pending_correction(user.id)
        if pending is not None and _recent(pending):
            caption_id, how = pending.caption_id, "after prompt"

    if caption_id is None:
        if to_bot:
            await reply(context, message, texts.REPLY_NOT_CAPTION)
        elif is_private(message):
            await reply(context, message, texts.NOT_A_PHOTO)
        return  # chatter in a group that merely mentions the bot: stay quiet

    try:
        correction = await storage.record_correction(caption_id, user.id, message.text)
    except CorrectionRejected as err:
        log.info("correction rejected caption=%d user=%d reason=%s", caption_id, user.id, err.code)
        runtime.metrics.note_correction_rejected(err.code.value)
        await reply(context, message, texts.correction_rejected(err))
        return
    log.info(
        "correction saved caption=%d user=%d id=%d status=%s (%s)", caption_id, user.id, correction.id,
        correction.status, how,
    )
    runtime.metrics.note_correction(correction.status.value)
    await reply(context, message, correction_answer(correction))


def correction_answer(correction: CorrectionRecord) -> str:
    """Thanks for an accepted correction; a neutral receipt for one screening flagged or holds."""
    if correction.status != CorrectionStatus.ACCEPTED:
        return texts.CORRECTION_RECEIVED
    if correction.replaced:
        return texts.correction_replaced(correction.text)
    return texts.correction_saved(correction.text)


def _is_prompt(pending: PendingCorrection, replied: Message) -> bool:
    return pending.prompt_message_id == replied.message_id and (
        pending.prompt_chat_id is None or pending.prompt_chat_id == replied.chat.id
    )


def _recent(pending: PendingCorrection) -> bool:
    started = pending.started_at if pending.started_at.tzinfo else pending.started_at.replace(tzinfo=UTC)
    return datetime.now(UTC) - started < PENDING_PLAIN_TEXT_WINDOW


async def on_cancel(update: Update, context: Context) -> None:
    message = update.effective_message
    user = update.effective_user
    if message is None or user is None:
        return
    cancelled = await context.bot_data.runtime.storage.cancel_correction(user.id)
    await reply(context, message, texts.CANCELLED if cancelled else texts.NOTHING_TO_CANCEL)
