"""Telegram update handlers; :func:`register` wires them into an Application."""

from __future__ import annotations

from telegram import Message, Update
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, MessageHandler, TypeHandler, filters

from bot.handlers.buttons import on_button
from bot.handlers.commands import (
    on_forget,
    on_help,
    on_privacy,
    on_reload,
    on_start,
    on_stats,
    on_unknown_command,
)
from bot.handlers.corrections import on_cancel, on_text
from bot.handlers.errors import on_error
from bot.handlers.gate import limit_actions
from bot.handlers.other import on_other
from bot.handlers.photos import is_image_document, on_caption_command, on_image
from bot.review import CALLBACK_PREFIX as REVIEW_PREFIX
from bot.review import on_review_button


class _ImageDocument(filters.MessageFilter):
    """Documents that are images (by MIME type, or by file name when the type is generic)."""

    __slots__ = ()

    def filter(self, message: Message) -> bool:
        document = message.document
        return document is not None and is_image_document(document.mime_type, document.file_name)


IMAGE_DOCUMENT = _ImageDocument(name="ImageDocument")


def register(app: Application) -> None:
    new = filters.UpdateType.MESSAGE  # edits and channel posts are not answered
    app.add_handler(TypeHandler(Update, limit_actions), group=-1)  # before any handler below
    app.add_handler(CommandHandler("start", on_start, filters=new))
    app.add_handler(CommandHandler("help", on_help, filters=new))
    app.add_handler(CommandHandler("privacy", on_privacy, filters=new))
    app.add_handler(CommandHandler("forget", on_forget, filters=new))
    app.add_handler(CommandHandler("cancel", on_cancel, filters=new))
    app.add_handler(CommandHandler("caption", on_caption_command, filters=new))
    app.add_handler(CommandHandler("stats", on_stats, filters=new))
    app.add_handler(CommandHandler("reload", on_reload, filters=new))
    app.add_handler(MessageHandler(new & filters.COMMAND, on_unknown_command))
    app.add_handler(MessageHandler(new & (filters.PHOTO | IMAGE_DOCUMENT), on_image))
    app.add_handler(MessageHandler(new & filters.TEXT, on_text))
    app.add_handler(MessageHandler(new, on_other))
    app.add_handler(CallbackQueryHandler(on_review_button, pattern=f"^{REVIEW_PREFIX}"))
    app.add_handler(CallbackQueryHandler(on_button))
    app.add_error_handler(on_error)
