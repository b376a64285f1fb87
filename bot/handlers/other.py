"""Everything that is not a photo, an image file, a command or a correction."""

from __future__ import annotations

from telegram import Update

from bot import texts
from bot.handlers.common import Context, is_private, reply


async def on_other(update: Update, context: Context) -> None:
    message = update.effective_message
    if message is None:
        return
    replied = message.reply_to_message
    to_bot = replied is not None and replied.from_user is not None and replied.from_user.id == context.bot.id
    if not (is_private(message) or to_bot):
        return  # in groups, only answer what is addressed to the bot
    if message.sticker is not None:
        text = texts.STICKER
    elif message.video is not None or message.animation is not None or message.video_note is not None:
        text = texts.VIDEO
    elif message.audio is not None or message.voice is not None:
        text = texts.AUDIO
    elif message.document is not None:
        text = texts.not_an_image_file(message.document.file_name, message.document.mime_type)
    else:
        text = texts.NOT_A_PHOTO
    await reply(context, message, text)
