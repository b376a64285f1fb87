"""Small helpers shared by the handlers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from telegram import InlineKeyboardMarkup, Message, ReplyParameters
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest, TelegramError

from bot.runtime import Context, Runtime

log = logging.getLogger("bot")


def replying_to(message_id: int) -> ReplyParameters:
    """Quote a message, but still deliver the answer if that message was deleted meanwhile."""
    return ReplyParameters(message_id=message_id, allow_sending_without_reply=True)


async def reply(context: Context, message: Message, text: str,
                markup: InlineKeyboardMarkup | None = None) -> Message:
    return await context.bot.send_message(
        message.chat.id, text, reply_parameters=replying_to(message.message_id), reply_markup=markup
    )


def is_private(message: Message | None) -> bool:
    return message is not None and message.chat.type == ChatType.PRIVATE


def is_not_modified(err: BadRequest) -> bool:
    return "not modified" in str(err).lower()


async def quietly(coro: Coroutine[Any, Any, Any], what: str) -> None:
    """Run a best-effort Telegram call (chat action, keyboard tidy-up): log failures, never raise."""
    try:
        await coro
    except BadRequest as err:
        if not is_not_modified(err):
            log.info("%s failed: %s", what, err)
    except TelegramError as err:
        log.info("%s failed: %s", what, err)


def send_chat_action(context: Context, runtime: Runtime, chat_id: int,
                     action: str = ChatAction.TYPING) -> None:
    """Show "typing…" in the background, at most every few seconds per chat."""
    if runtime.chat_action_due(chat_id, action):
        context.application.create_task(
            quietly(context.bot.send_chat_action(chat_id, action), "sendChatAction"),
            name="chat-action",
        )


async def edit_or_reply(context: Context, message: Message, notice: Message | None, text: str,
                        markup: InlineKeyboardMarkup | None = None) -> Message:
    """Turn the queue notice into the answer, or reply to the photo when there is none."""
    if notice is not None:
        with contextlib.suppress(TelegramError):
            edited = await context.bot.edit_message_text(
                text, chat_id=notice.chat.id, message_id=notice.message_id, reply_markup=markup
            )
            if isinstance(edited, Message):
                return edited
    return await reply(context, message, text, markup)
