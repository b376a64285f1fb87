"""Admins decide what the model learns: a message per candidate awaiting review, Approve / Reject.

The model-update poll (``bot/model_updates.py``) calls :func:`notify_waiting` each round: every
admin gets, once per candidate, the new words with a few of the corrections and photos that
taught each, the gate's figures, and two buttons. The buttons carry the candidate's name and
only work under the message the bot sent for it (``Runtime.review_messages``) and only for an
admin; approval activates the candidate (the next poll loads it), rejection marks the run.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from telegram import Bot, CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.error import TelegramError

from bot import texts
from bot.handlers.common import Context, quietly
from bot.runtime import Runtime
from storage import ModelVersionError, ModelVersionRecord, NotFound, TrainingExample

log = logging.getLogger("bot.review")

CALLBACK_PREFIX = "r:"  # r:a:<model version id> approve, r:r:<id> reject
EXAMPLES_PER_WORD = 3
PHOTOS_PER_WORD = 2
_WORDS = re.compile(r"[a-z0-9']+")


def review_keyboard(version_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(texts.BUTTON_APPROVE, callback_data=f"{CALLBACK_PREFIX}a:{version_id}"),
        InlineKeyboardButton(texts.BUTTON_REJECT, callback_data=f"{CALLBACK_PREFIX}r:{version_id}"),
    ]])


def examples_by_word(words: Sequence[str], examples: Sequence[TrainingExample]) -> dict[str, list[TrainingExample]]:
    """For each new word, the first few corrections that use it (one pass over the corrections)."""
    wanted = set(words)
    found: dict[str, list[TrainingExample]] = {word: [] for word in words}
    for example in examples:
        for word in wanted.intersection(_WORDS.findall(example.text.casefold())):
            if len(found[word]) < EXAMPLES_PER_WORD:
                found[word].append(example)
    return found


async def notify_waiting(runtime: Runtime, bot: Bot) -> int:
    """Tell the admins about candidates awaiting review they have not been told about; returns how many."""
    waiting = [v for v in await runtime.storage.list_model_versions() if v.status == "awaiting_review"]
    told = 0
    for version in waiting:
        if version.name in runtime.reviews_sent:
            continue
        runtime.reviews_sent.add(version.name)
        examples = examples_by_word(version.metrics.get("new_words", []),
                                    await runtime.storage.corrections_of_run(version.name))
        for admin in sorted(runtime.settings.admin_ids):
            try:
                await _send_review(runtime, bot, admin, version, examples)
            except TelegramError as err:
                log.warning("could not send the review of %s to admin %d: %s", version.name, admin, err)
        told += 1
    return told


async def _send_review(runtime: Runtime, bot: Bot, admin: int, version: ModelVersionRecord,
                       examples: dict[str, list[TrainingExample]]) -> None:
    for word, found in examples.items():
        for example in found[:PHOTOS_PER_WORD]:
            with example.path.open("rb") as photo:
                await bot.send_photo(admin, photo, caption=texts.review_photo(word, example.text))
    message = await bot.send_message(
        admin, texts.review_request(version.name, version.parent, version.metrics,
                                    {w: [e.text for e in found] for w, found in examples.items()}),
        reply_markup=review_keyboard(version.id),
    )
    runtime.review_messages[(message.chat.id, message.message_id)] = version.id


async def on_review_button(update: Update, context: Context) -> None:
    query = update.callback_query
    if query is None or query.data is None:
        return
    runtime = context.bot_data.runtime
    if not runtime.settings.is_admin(query.from_user.id):
        await quietly(query.answer(texts.REVIEW_ADMINS_ONLY, show_alert=True), "answerCallbackQuery")
        return
    decision, _, version_id = query.data.removeprefix(CALLBACK_PREFIX).partition(":")
    message = query.message if isinstance(query.message, Message) else None
    bound = None if message is None else runtime.review_messages.get((message.chat.id, message.message_id))
    if decision not in ("a", "r") or bound is None or str(bound) != version_id:
        await quietly(query.answer(texts.REVIEW_EXPIRED, show_alert=True), "answerCallbackQuery")
        return
    await _decide(query, runtime, bound, approve=decision == "a")


async def _decide(query: CallbackQuery, runtime: Runtime, version_id: int, approve: bool) -> None:
    name = next((v.name for v in await runtime.storage.list_model_versions() if v.id == version_id), None)
    try:
        if name is None:
            raise NotFound(f"model version {version_id}")
        if approve:
            await runtime.storage.approve_model_version(name)
        else:
            await runtime.storage.reject_after_review(name, f"rejected in Telegram by admin {query.from_user.id}")
    except (ModelVersionError, NotFound) as err:
        log.info("review of %s by %d refused: %s", name, query.from_user.id, err)
        await quietly(query.answer(texts.REVIEW_ALREADY_DECIDED, show_alert=True), "answerCallbackQuery")
        return
    log.info("model %s %s by admin %d", name, "approved" if approve else "rejected", query.from_user.id)
    await quietly(query.answer(), "answerCallbackQuery")
    outcome = texts.review_approved(name) if approve else texts.review_rejected(name)
    await quietly(query.edit_message_reply_markup(None), "editMessageReplyMarkup")
    if isinstance(query.message, Message):
        await quietly(query.message.reply_text(outcome), "sendMessage")
