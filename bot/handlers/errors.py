"""The last line of defence: log unexpected errors with the update id, apologise to the person."""

from __future__ import annotations

import contextlib
import logging

from telegram import Update
from telegram.error import Forbidden, NetworkError, TelegramError, TimedOut

from bot import texts
from bot.handlers.common import Context, quietly, replying_to

log = logging.getLogger("bot.errors")


def note_unhandled(context: Context) -> None:
    """Count the error (an error before the bot's runtime exists is only logged)."""
    with contextlib.suppress(RuntimeError):
        context.bot_data.runtime.metrics.note_error("unhandled")


async def on_error(update: object, context: Context) -> None:
    error = context.error
    if not isinstance(update, Update):
        if isinstance(error, NetworkError):
            log.warning("network problem talking to Telegram: %s", error)
        else:
            log.error("error outside an update: %r", error, exc_info=error)
        return
    log.error("error while handling update %d: %r", update.update_id, error, exc_info=error)
    note_unhandled(context)
    if isinstance(error, Forbidden):
        return  # the person blocked the bot; nothing to tell them
    if isinstance(error, TimedOut):
        # Telegram stalled: the answer we were sending may well have been delivered, and a
        # "something went wrong" after a caption would contradict it. Say nothing more.
        return
    query = update.callback_query
    if query is not None:
        await quietly(query.answer(texts.ERROR, show_alert=True), "answering a failed button")
        return
    message = update.effective_message
    if message is not None and update.effective_chat is not None:
        try:
            await context.bot.send_message(update.effective_chat.id, texts.ERROR,
                                           reply_parameters=replying_to(message.message_id))
        except TelegramError as err:
            log.warning("could not tell the person about the error: %s", err)
