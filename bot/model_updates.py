"""Switching to a newly promoted model: the background poll and the operators' /reload."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bot.runtime import Runtime
from captioner.serving.base import ModelLoadError, ServiceError
from storage import ModelVersionRecord

log = logging.getLogger("bot.model_updates")


@dataclass(frozen=True)
class ReloadOutcome:
    status: str  # "none" (nothing promoted), "same", "done", "failed", "skipped" (failed before)
    name: str | None
    old: str
    reason: str = ""


def checkpoint_path(record: ModelVersionRecord, data_dir: Path) -> Path:
    """The promoted checkpoint's folder: absolute, or relative to the working or data directory."""
    path = Path(record.checkpoint_path).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    in_data = data_dir / path
    return in_data if in_data.exists() else path.resolve()


def _key(record: ModelVersionRecord) -> str:
    return f"{record.name}@{record.checkpoint_path}"


async def reload_promoted(runtime: Runtime, *, automatic: bool = False) -> ReloadOutcome:
    """Serve the promoted model if it is not the one serving. ``automatic`` calls (the poll)
    do not retry a version that failed to load before; /reload always tries."""
    async with runtime.reload_lock:
        old = runtime.service.model_version
        active = await runtime.storage.active_model_version()
        if active is None:
            return ReloadOutcome("none", None, old)
        if active.name in (runtime.promoted_loaded, old):
            runtime.promoted_loaded = active.name
            return ReloadOutcome("same", active.name, old)
        if automatic and _key(active) in runtime.failed_models:
            return ReloadOutcome("skipped", active.name, old, runtime.failed_models[_key(active)])
        path = checkpoint_path(active, runtime.storage.data_dir)
        log.info("loading promoted model %s from %s (serving %s)", active.name, path, old)
        try:
            version = await runtime.service.reload(path)
        except (ModelLoadError, ServiceError) as err:
            runtime.failed_models[_key(active)] = str(err)
            runtime.metrics.note_reload("failed")
            log.error("could not load promoted model %s: %s; still serving %s", active.name, err, old)
            return ReloadOutcome("failed", active.name, old, str(err))
        runtime.promoted_loaded = active.name
        runtime.failed_models.pop(_key(active), None)
        runtime.metrics.note_reload("done")
        log.info("now serving model %s (version %s, was %s)", active.name, version, old)
        return ReloadOutcome("done", active.name, old)


async def follow_promoted(runtime: Runtime, interval: float,
                          also: Callable[[], Awaitable[object]] | None = None) -> None:
    """Every ``interval`` seconds, switch to a newly promoted model, then run ``also`` (the bot tells
    its admins about candidates awaiting review, ``bot/review.py``); runs until cancelled."""
    while True:
        await asyncio.sleep(interval)
        try:
            await reload_promoted(runtime, automatic=True)
            if also is not None:
                await also()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("checking for a promoted model failed; will try again in %.0f s", interval)
