"""Answering, once, the photo requests a crash left in the durable inbox.

python-telegram-bot confirms updates to Telegram at its next poll, before their handlers finish,
so a photo that arrived just before a ``kill -9`` is never delivered again. Each request is in
the inbox (``bot/handlers/photos.py`` writes it first); on start-up the bot answers those not
answered yet, each once (a request replayed before and still unanswered is not tried again).
Telegram file ids stay valid, so the photo is downloaded again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from telegram import Chat, Message, User
from telegram.ext import Application, CallbackContext

from bot.handlers.photos import Incoming, answer_request
from bot.runtime import BotData, Context
from storage import InboxItem

log = logging.getLogger("bot.inbox")


def _message(item: InboxItem, app: Application[Any, Any, Any, Any, BotData, Any]) -> Message:
    """The photo message as far as answering it needs: its chat, its id and its sender."""
    message = Message(item.message_id, datetime.now(UTC), Chat(item.chat_id, item.chat_type),
                      from_user=User(item.sender_id, "", is_bot=False))
    message.set_bot(app.bot)
    return message


async def replay_inbox(app: Application[Any, Any, Any, Any, BotData, Any]) -> int:
    """Start answering what the inbox still holds; returns how many requests were taken up."""
    items = await app.bot_data.runtime.storage.inbox_take_for_replay()
    for item in items:
        context: Context = CallbackContext(app)
        image = Incoming(item.file_id, item.file_unique_id, item.file_size, item.kind)
        app.create_task(answer_request(context, _message(item, app), item.sender_id, image,
                                       f"inbox-replay msg={item.message_id}"), name="inbox-replay")
    if items:
        log.warning("answering %d photo requests left unanswered by the last run", len(items))
    return len(items)
