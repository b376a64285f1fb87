"""The buttons under captions (vote, correct, attention) and the /forget confirmation."""

from __future__ import annotations

import asyncio
import logging

from telegram import CallbackQuery, ForceReply, Message, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType
from telegram.error import BadRequest

from bot import keyboards, texts
from bot.handlers.common import Context, quietly, replying_to, send_chat_action
from bot.handlers.photos import error_text
from bot.runtime import Runtime
from captioner.images import ImageError
from captioner.serving.base import ServiceError
from storage import CaptionRecord, NotFound

log = logging.getLogger("bot.buttons")


async def on_button(update: Update, context: Context) -> None:
    query = update.callback_query
    if query is None:
        return
    action = keyboards.parse(query.data)
    runtime = context.bot_data.runtime
    user = query.from_user
    if action is None:
        log.info("unknown button %r from user %d", query.data, user.id)
        await _answer(query, texts.BUTTON_UNKNOWN, show_alert=True)
        return
    if action.kind == "forget":
        if action.user_id != user.id:
            await _answer(query, texts.FORGET_NOT_YOURS, show_alert=True)
            return
        await _forget(query, runtime, bool(action.confirm))
        return
    assert action.caption_id is not None
    caption = await _bound_caption(query, runtime, action.caption_id)
    if caption is None:
        return
    if action.kind == "vote":
        await _vote(query, runtime, caption.id, bool(action.up))
    elif action.kind == "correct":
        await _correct(query, context, runtime, caption)
    elif action.kind == "attention":
        await _attention(query, context, runtime, caption)


async def _answer(query: CallbackQuery, text: str | None = None, show_alert: bool = False) -> None:
    """Answer the button press; a press too old to answer (the bot was down) is not an error."""
    await quietly(query.answer(text, show_alert=show_alert), "answerCallbackQuery")


def _message(query: CallbackQuery) -> Message | None:
    """The message the button is under, when Telegram still gives it to us."""
    return query.message if isinstance(query.message, Message) else None


async def _gone(query: CallbackQuery, text: str = texts.CAPTION_GONE) -> None:
    await _answer(query, text, show_alert=True)
    message = _message(query)
    if message is not None and message.reply_markup is not None:
        await quietly(query.edit_message_reply_markup(None), "removing stale buttons")


async def _vote(query: CallbackQuery, runtime: Runtime, caption_id: int, up: bool) -> None:
    user = query.from_user
    try:
        vote = await runtime.storage.record_vote(caption_id, user.id, up)
    except NotFound:
        await _gone(query)
        return
    thanks = texts.VOTE_UP_THANKS if up else texts.VOTE_DOWN_THANKS
    await _answer(query, thanks if vote.changed else texts.VOTE_UNCHANGED)
    log.info("vote caption=%d user=%d up=%s changed=%s", caption_id, user.id, up, vote.changed)
    if vote.changed:
        runtime.metrics.note_vote(up)
    if vote.changed and _message(query) is not None:
        if _is_private(query):
            markup = keyboards.caption_keyboard(caption_id, my_vote=up)
        else:
            markup = keyboards.caption_keyboard(caption_id, counts=(vote.votes_up, vote.votes_down))
        await quietly(query.edit_message_reply_markup(markup), "showing the vote")


def _is_private(query: CallbackQuery) -> bool:
    message = _message(query)
    return message is None or message.chat.type == ChatType.PRIVATE


async def _bound_caption(query: CallbackQuery, runtime: Runtime, caption_id: int) -> CaptionRecord | None:
    """The caption a button acts on, or None after telling the presser why not.

    Callback data is chosen by the client, so a crafted press can name any caption id. The id
    is honoured only when it is the caption stored for the very chat and message the button
    was pressed under; anything else (another person's caption, a deleted one, a message
    Telegram no longer gives us) is refused without reading or changing that caption.
    """
    message = _message(query)
    if message is None:
        await _answer(query, texts.CAPTION_GONE, show_alert=True)
        return None
    caption = await runtime.storage.find_caption_by_message(message.chat.id, message.message_id)
    if caption is None:
        caption = await _being_linked(runtime, caption_id, message)
    if caption is None:
        await _gone(query)
        return None
    if caption.id != caption_id:
        log.warning("button %r refused: message %d in chat %d shows caption %d (user %d)",
                    query.data, message.message_id, message.chat.id, caption.id, query.from_user.id)
        await _answer(query, texts.BUTTON_NOT_HERE, show_alert=True)
        return None
    return caption


async def _being_linked(runtime: Runtime, caption_id: int, message: Message) -> CaptionRecord | None:
    """A caption of this chat whose message is being linked (a press in the moment between
    sending the caption and storing its message id, or linked since the first look)."""
    caption = await runtime.storage.get_caption(caption_id)
    if caption is None or caption.chat_id != message.chat.id:
        return None
    return caption if caption.message_id in (None, message.message_id) else None


def _answer_place(query: CallbackQuery) -> tuple[int, ReplyParameters | None]:
    """Where to answer a button: quoting the message it is under, else in the person's own chat."""
    message = _message(query)
    if message is None:
        return query.from_user.id, None
    return message.chat.id, replying_to(message.message_id)


async def _correct(query: CallbackQuery, context: Context, runtime: Runtime, caption: CaptionRecord) -> None:
    if not _is_private(query):
        await _answer(query, texts.CORRECT_IN_PRIVATE, show_alert=True)
        return
    caption_id = caption.id
    user = query.from_user
    chat_id, reply_parameters = _answer_place(query)
    await _answer(query, texts.CORRECTION_CALLBACK)
    prompt = await context.bot.send_message(
        chat_id,
        texts.correction_prompt(caption.text),
        reply_parameters=reply_parameters,
        reply_markup=ForceReply(selective=True, input_field_placeholder=texts.CORRECTION_PROMPT_PLACEHOLDER),
    )
    try:
        await runtime.storage.start_correction(user.id, caption_id, prompt.chat.id, prompt.message_id)
    except NotFound:  # deleted between the two calls (a /forget in another chat)
        await quietly(context.bot.edit_message_text(texts.CAPTION_GONE, chat_id=prompt.chat.id,
                                                    message_id=prompt.message_id), "retracting prompt")
        return
    log.info("correction started caption=%d user=%d prompt=%d", caption_id, user.id, prompt.message_id)


async def _attention(query: CallbackQuery, context: Context, runtime: Runtime, caption: CaptionRecord) -> None:
    caption_id = caption.id
    user = query.from_user
    try:
        path = runtime.storage.resolve_photo_path(caption)
        data = await asyncio.to_thread(path.read_bytes)
    except OSError:
        await _gone(query, texts.PHOTO_GONE)
        return
    photos = runtime.limits.photos
    retry_after = photos.acquire(user.id)
    if retry_after:
        await _answer(query, texts.rate_limited(photos.limit, retry_after), show_alert=True)
        return
    await _answer(query, texts.ATTENTION_CALLBACK)
    chat_id, reply_parameters = _answer_place(query)
    send_chat_action(context, runtime, chat_id, ChatAction.UPLOAD_PHOTO)
    try:
        result = await runtime.service.caption(
            data, beam_size=runtime.settings.beam_size, attention=True,
            timeout=runtime.settings.request_timeout,
        )
    except (ImageError, ServiceError) as err:
        log.info("attention failed caption=%d: %s: %s", caption_id, type(err).__name__, err)
        runtime.metrics.note_service_failed(err)
        await context.bot.send_message(chat_id, error_text(err), reply_parameters=reply_parameters)
        return
    runtime.metrics.note_service_answered(result)
    if not result.attention_png:
        log.warning("attention for caption %d came back without a picture", caption_id)
        await context.bot.send_message(chat_id, texts.WORKER_FAILED, reply_parameters=reply_parameters)
        return
    await context.bot.send_photo(
        chat_id, result.attention_png, caption=texts.attention_caption(caption.text, result.text),
        reply_parameters=reply_parameters,
    )
    log.info("attention sent caption=%d user=%d words=%d", caption_id, user.id, len(result.words))


async def _forget(query: CallbackQuery, runtime: Runtime, confirm: bool) -> None:
    user = query.from_user
    if not confirm:
        await _answer(query)
        await _replace(query, texts.FORGET_KEPT)
        return
    report = await runtime.storage.forget_person(user.id)
    await _answer(query, texts.FORGET_ANSWER)
    log.info("forget user=%d found=%s captions=%d photos=%d models_marked=%d exports_rewritten=%d", user.id,
             report.found, report.captions, report.photos, report.models_marked, report.exports_rewritten)
    if not report.found or not (report.votes or report.corrections or report.captions or report.photos):
        await _replace(query, texts.FORGET_NOTHING)
    else:
        await _replace(query, texts.forget_done(
            report.votes, report.corrections, report.captions, report.photos
        ))


async def _replace(query: CallbackQuery, text: str) -> None:
    if _message(query) is None:
        return
    try:
        await query.edit_message_text(text, reply_markup=None)
    except BadRequest as err:
        log.info("could not edit the /forget question: %s", err)

