"""The per-person limit on presses, commands and texts, checked before any other handler runs."""

from __future__ import annotations

import logging

from telegram import Update
from telegram.ext import ApplicationHandlerStop

from bot import texts
from bot.handlers.common import Context, is_private, quietly, reply
from bot.handlers.photos import incoming_image

log = logging.getLogger("bot.limits")


async def limit_actions(update: Update, context: Context) -> None:
    """Stop the update here when its sender is over their action limit (photos have their own)."""
    user = update.effective_user
    message = update.effective_message
    if user is None or (update.callback_query is None and message is not None and incoming_image(message)):
        return
    limits = context.bot_data.runtime.limits
    retry_after = limits.actions.acquire(user.id)
    if not retry_after:
        return
    log.info("update %d from user %d rate-limited: retry in %.0f s", update.update_id, user.id, retry_after)
    text = texts.actions_limited(limits.actions.limit, retry_after)
    query = update.callback_query
    if query is not None:  # a press must be answered, or the button keeps spinning
        await quietly(query.answer(text, show_alert=True), "answerCallbackQuery")
    elif message is not None and is_private(message) and limits.should_tell(user.id, retry_after):
        await reply(context, message, text)
    raise ApplicationHandlerStop
