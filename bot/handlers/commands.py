"""Commands: /start, /help, /privacy, /forget, and the operators' /stats and /reload."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from telegram import Update

from bot import keyboards, texts
from bot.handlers.common import Context, is_private, reply
from bot.model_updates import reload_promoted

log = logging.getLogger("bot.commands")


async def on_start(update: Update, context: Context) -> None:
    message, user = update.effective_message, update.effective_user
    if message is None or user is None:
        return
    await context.bot_data.runtime.storage.upsert_person(user.id, user.language_code)
    await reply(context, message, texts.start(user.first_name))


async def on_help(update: Update, context: Context) -> None:
    if update.effective_message is not None:
        await reply(context, update.effective_message, texts.HELP)


async def on_privacy(update: Update, context: Context) -> None:
    if update.effective_message is not None:
        settings = context.bot_data.runtime.settings
        await reply(context, update.effective_message,
                    texts.privacy(settings.photo_retention_days, settings.trained_photo_retention_days))


async def on_forget(update: Update, context: Context) -> None:
    message, user = update.effective_message, update.effective_user
    if message is not None and user is not None:
        await reply(context, message, texts.FORGET_CONFIRM, keyboards.forget_keyboard(user.id))


async def on_unknown_command(update: Update, context: Context) -> None:
    if is_private(update.effective_message) and update.effective_message is not None:
        await reply(context, update.effective_message, texts.UNKNOWN_COMMAND)


async def _refuse_unless_admin(update: Update, context: Context, command: str) -> bool:
    """True if the sender may run an operator command; otherwise answer politely and return False."""
    user = update.effective_user
    message = update.effective_message
    if user is not None and context.bot_data.runtime.settings.is_admin(user.id):
        return False
    if message is not None:
        log.info("refused /%s for user %s", command, user.id if user else "?")
        await reply(context, message, texts.admin_only(command))
    return True


async def on_stats(update: Update, context: Context) -> None:
    message = update.effective_message
    if message is None or await _refuse_unless_admin(update, context, "stats"):
        return
    runtime = context.bot_data.runtime
    stats = await runtime.storage.stats(days=1)
    queue = runtime.service.status()
    today = datetime.now(UTC).date()
    captions_today = sum(day.captions for day in stats.captions_per_day if day.day == today)
    await reply(context, message, texts.stats(
        captions=stats.captions, photos=stats.photos, people=stats.people,
        votes_up=stats.votes_up, votes_down=stats.votes_down,
        corrections=stats.corrections, corrections_untrained=stats.corrections_untrained,
        captions_today=captions_today, active_model=stats.active_model,
        serving_model=runtime.service.model_version,
        waiting=queue.waiting, in_flight=queue.in_flight, capacity=queue.capacity,
        wait_seconds=queue.estimated_wait_seconds,
        uptime_seconds=time.monotonic() - runtime.started_at,
        captioned_since_start=runtime.captioned, median_latency_ms=runtime.median_latency_ms(),
    ))


async def on_reload(update: Update, context: Context) -> None:
    message = update.effective_message
    if message is None or await _refuse_unless_admin(update, context, "reload"):
        return
    runtime = context.bot_data.runtime
    outcome = await reload_promoted(runtime)
    serving = runtime.service.model_version
    if outcome.status == "none":
        text = texts.reload_message(texts.RELOAD_NO_PROMOTED, serving=serving)
    elif outcome.status == "same":
        text = texts.reload_message(texts.RELOAD_SAME, serving=serving)
    elif outcome.status == "done":
        text = texts.reload_message(texts.RELOAD_DONE, name=outcome.name or serving, old=outcome.old)
    else:
        text = texts.reload_message(texts.RELOAD_FAILED, name=outcome.name or "?", reason=outcome.reason,
                                    serving=serving)
    await reply(context, message, text)
