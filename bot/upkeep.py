"""Keeping stored photos bounded: the daily retention sweep and the free-disk floor."""

from __future__ import annotations

import asyncio
import logging
import shutil
from datetime import timedelta

from telegram import Bot
from telegram.error import TelegramError

from bot import texts
from bot.runtime import Runtime

log = logging.getLogger("bot.upkeep")

SWEEP_EVERY = 24 * 3600.0  # seconds
INBOX_KEPT = timedelta(days=1)  # answered requests are remembered this long (redelivered updates)


async def sweep_daily(runtime: Runtime, every: float = SWEEP_EVERY) -> None:
    """Apply photo retention now and then every ``every`` seconds (runs until cancelled)."""
    settings = runtime.settings
    while True:
        try:
            expired = await runtime.storage.apply_retention(settings.photo_retention_days,
                                                            settings.trained_photo_retention_days)
            orphans = await runtime.storage.sweep_orphan_files()
            await runtime.storage.inbox_prune(INBOX_KEPT)
            log.info("retention sweep: %d photos past retention deleted, %d unreferenced files", expired, orphans)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the retention sweep failed; will try again in %.0f s", every)
        await asyncio.sleep(every)


def free_disk_bytes(runtime: Runtime) -> int:
    return shutil.disk_usage(runtime.storage.data_dir).free


async def may_store(runtime: Runtime, bot: Bot) -> bool:
    """Whether there is room to store a photo; below the floor, tell the operators (once until
    the disk has room again) and store nothing, while captions still go out."""
    free = await asyncio.to_thread(free_disk_bytes, runtime)
    floor = runtime.settings.min_free_disk_bytes
    if free >= floor:
        runtime.disk_low_told = False
        return True
    if not runtime.disk_low_told:
        runtime.disk_low_told = True
        log.error("free disk %d MB is below the floor of %d MB: storing nothing", free >> 20, floor >> 20)
        for admin in sorted(runtime.settings.admin_ids):
            try:
                await bot.send_message(admin, texts.disk_low(free, floor))
            except TelegramError as err:
                log.info("could not tell operator %d about the disk: %s", admin, err)
    return False
