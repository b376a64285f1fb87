"""``Storage``: the one object the bot and the trainer talk to.

It opens and closes the engine, and runs each call of the aggregate modules
(``people``, ``captions``, ``corrections``, ``model_versions``, ``forget``,
``stats``) in one short transaction of ``storage.transactions``. Every call
returns plain values (``storage.records``), never ORM objects, so callers cannot
trigger lazy loads after the session is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

from sqlalchemy.ext.asyncio import AsyncEngine

from storage import captions, config, corrections, forget, model_versions, people
from storage import migrate as migrations
from storage import stats as statistics
from storage.engine import create_engine, sqlite_file
from storage.photos import PhotoStore, sha256_hex
from storage.records import (
    CaptionRecord,
    CorrectionRecord,
    ForgetReport,
    ModelStatus,
    ModelVersionRecord,
    PendingCorrection,
    PersonInfo,
    PhotoRecord,
    Stats,
    TrainingExample,
    VoteRecord,
)
from storage.transactions import Transactions

PhotoRef = PhotoRecord | CaptionRecord | TrainingExample | str | Path


class Storage:
    """Durable memory of the bot. Create with ``await Storage.open()``, end with ``await close()``."""

    def __init__(self, engine: AsyncEngine, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self.photos = PhotoStore(config.photos_dir(data_dir))
        self._engine = engine
        self._tx = Transactions(engine, url)

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls, database_url: str | None = None, data_dir: Path | None = None, migrate: bool = True
    ) -> Self:
        """Open storage, creating the data folders and migrating the schema to head unless told not to."""
        directory = config.data_dir(data_dir)
        url = config.database_url(database_url, directory)
        await asyncio.to_thread(_prepare_folders, directory, sqlite_file(url))
        engine = create_engine(url)
        try:
            if migrate:
                await migrations.upgrade(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, url, directory)

    async def close(self) -> None:
        await self._engine.dispose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def lock_retries(self) -> int:
        """How often SQLite said "locked" and a transaction was retried."""
        return self._tx.lock_retries

    # ------------------------------------------------------------------ people

    async def upsert_person(self, telegram_id: int, language_code: str | None) -> PersonInfo:
        """Create or refresh a person; a None language keeps the one already known."""
        return await self._tx.write(
            lambda s: people.upsert_person(s, telegram_id, language_code), retry_integrity=True
        )

    async def get_person(self, telegram_id: int) -> PersonInfo | None:
        return await self._tx.read(lambda s: people.get_person(s, telegram_id))

    # ------------------------------------------------------------------ photos

    async def record_photo(
        self,
        data: bytes,
        *,
        width: int,
        height: int,
        telegram_file_unique_id: str | None,
        sender_telegram_id: int,
    ) -> PhotoRecord:
        """Store photo bytes once per hash and remember who sent them.

        The file is written (atomically) before the row exists, and outside the
        write lock, so a row never points at a missing or partial file; a crash in
        between leaves at worst an unreferenced file, which the next identical photo reuses.
        """
        if not data:
            raise ValueError("empty photo")
        sha = await asyncio.to_thread(sha256_hex, data)
        await asyncio.to_thread(self.photos.ensure, sha, data)
        return await self._tx.write(
            lambda s: captions.record_photo(
                s,
                self.photos,
                data,
                sha,
                width=width,
                height=height,
                telegram_file_unique_id=telegram_file_unique_id,
                sender_telegram_id=sender_telegram_id,
            ),
            retry_integrity=True,
        )

    async def get_photo(self, photo_id: int) -> PhotoRecord | None:
        return await self._tx.read(lambda s: captions.get_photo(s, photo_id))

    def resolve_photo_path(self, photo: PhotoRef) -> Path:
        """Absolute path of a photo (record, caption, training example or relative path); no I/O."""
        if isinstance(photo, PhotoRecord | TrainingExample):
            rel = photo.rel_path
        elif isinstance(photo, CaptionRecord):
            rel = photo.photo_rel_path
        else:
            rel = Path(photo).as_posix()
        return self.photos.path(rel)

    # ------------------------------------------------------------------ captions and votes

    async def record_caption(
        self,
        photo_id: int,
        *,
        model_version: str,
        text: str,
        score: float,
        beam_size: int,
        latency_ms: float,
        requester_telegram_id: int,
        chat_id: int | None = None,
        message_id: int | None = None,
    ) -> CaptionRecord:
        """Remember a caption the model produced for a stored photo."""
        return await self._tx.write(
            lambda s: captions.record_caption(
                s,
                photo_id,
                model_version=model_version,
                text=text,
                score=score,
                beam_size=beam_size,
                latency_ms=latency_ms,
                requester_telegram_id=requester_telegram_id,
                chat_id=chat_id,
                message_id=message_id,
            ),
            retry_integrity=True,
        )

    async def set_caption_message(self, caption_id: int, chat_id: int, message_id: int) -> CaptionRecord:
        """Remember which Telegram message shows the caption, so replies map back to it."""
        return await self._tx.write(lambda s: captions.set_caption_message(s, caption_id, chat_id, message_id))

    async def get_caption(self, caption_id: int) -> CaptionRecord | None:
        return await self._tx.read(lambda s: captions.get_caption(s, caption_id))

    async def find_caption_by_message(self, chat_id: int, message_id: int) -> CaptionRecord | None:
        """The caption shown in a given message (the latest, should a message be reused)."""
        return await self._tx.read(lambda s: captions.find_caption_by_message(s, chat_id, message_id))

    async def record_vote(self, caption_id: int, telegram_id: int, up: bool) -> VoteRecord:
        """One vote per person per caption: a new vote replaces the old one."""
        return await self._tx.write(
            lambda s: captions.record_vote(s, caption_id, telegram_id, up), retry_integrity=True
        )

    # ------------------------------------------------------------------ corrections

    async def start_correction(
        self,
        telegram_id: int,
        caption_id: int,
        prompt_chat_id: int | None = None,
        prompt_message_id: int | None = None,
    ) -> PendingCorrection:
        """Remember that this person is now correcting this caption (replacing any earlier one)."""
        return await self._tx.write(
            lambda s: corrections.start_correction(s, telegram_id, caption_id, prompt_chat_id, prompt_message_id),
            retry_integrity=True,
        )

    async def get_pending_correction(self, telegram_id: int) -> PendingCorrection | None:
        return await self._tx.read(lambda s: corrections.get_pending_correction(s, telegram_id))

    async def cancel_correction(self, telegram_id: int) -> bool:
        """Drop the person's pending correction; True if there was one."""
        return await self._tx.write(lambda s: corrections.cancel_correction(s, telegram_id))

    async def record_correction(self, caption_id: int, telegram_id: int, text: str) -> CorrectionRecord:
        """Validate and store a correction; raises ``CorrectionRejected`` with a message for the person.

        Sending the same correction twice (a double tap) returns the first one.
        """
        return await self._tx.write(
            lambda s: corrections.record_correction(s, caption_id, telegram_id, text), retry_integrity=True
        )

    async def corrections_for_training(
        self, since: datetime | None = None, include_upvoted: bool = False, untrained_only: bool = False
    ) -> list[TrainingExample]:
        """Captions to train on: corrections, plus (optionally) captions voted up more than down.

        Forgotten people's data is excluded. ``untrained_only`` keeps corrections no
        model has trained on yet; it does not apply to up-voted captions.
        """
        return await self._tx.read(
            lambda s: corrections.corrections_for_training(s, self.photos, since, include_upvoted, untrained_only)
        )

    async def mark_corrections_trained(self, correction_ids: Iterable[int], model_version: str) -> int:
        """Record which model version trained on these corrections; returns rows updated."""
        ids = sorted(set(correction_ids))
        if not ids:
            return 0
        return await self._tx.write(lambda s: corrections.mark_corrections_trained(s, ids, model_version))

    # ------------------------------------------------------------------ forgetting

    async def forget_person(self, telegram_id: int) -> ForgetReport:
        """Delete what a person gave us: votes, corrections, pending state, the captions
        they asked for, and the photos (rows and files) no one else sent.

        The person row stays, marked forgotten, so that a later visit is a fresh start.
        """
        report, rel_paths = await self._tx.write(lambda s: forget.forget_person(s, telegram_id))
        files = await self._delete_unreferenced_files(rel_paths)
        return dataclasses.replace(report, files_deleted=files)

    async def sweep_orphan_files(self, older_than: timedelta = timedelta(hours=1)) -> int:
        """Delete photo files no row refers to, and stale temp files (left by crashes).

        Only files older than ``older_than`` go: a younger one may belong to a
        ``record_photo`` that has written its file and not yet committed its row.
        """
        age_s = older_than.total_seconds()
        await asyncio.to_thread(self.photos.remove_stale_temp_files, age_s)
        cutoff = datetime.now(UTC).timestamp() - age_s
        on_disk = await asyncio.to_thread(
            lambda: [rel for rel, path in self.photos.iter_photos() if path.stat().st_mtime < cutoff]
        )
        if not on_disk:
            return 0
        known = await self._tx.read(forget.referenced_paths)
        return await self._delete_unreferenced_files([rel for rel in on_disk if rel not in known])

    async def _delete_unreferenced_files(self, rel_paths: list[str]) -> int:
        if not rel_paths:
            return 0
        return await self._tx.write(lambda s: forget.delete_unreferenced_files(s, self.photos, rel_paths))

    # ------------------------------------------------------------------ statistics

    async def stats(self, days: int = 7) -> Stats:
        """Counts for the operator: captions per UTC day (oldest first), totals, active model."""
        return await self._tx.read(lambda s: statistics.stats(s, days))

    # ------------------------------------------------------------------ model versions

    async def register_model_version(
        self,
        name: str,
        checkpoint_path: str | Path,
        parent: str | None,
        metrics: dict[str, Any],
        status: str = ModelStatus.CANDIDATE,
        reason: str | None = None,
    ) -> ModelVersionRecord:
        """Record a trained checkpoint; ``status='active'`` registers and promotes it at once."""
        checked = model_versions.check_status(status)
        return await self._tx.write(
            lambda s: model_versions.register_model_version(s, name, checkpoint_path, parent, metrics, checked, reason)
        )

    async def promote_model_version(self, name: str) -> ModelVersionRecord:
        """Make this version the one the bot serves; the previous active one becomes 'retired'."""
        return await self._tx.write(lambda s: model_versions.promote_model_version(s, name))

    async def reject_model_version(self, name: str, reason: str) -> ModelVersionRecord:
        """Mark a candidate as not good enough, with the reason (e.g. the failed metric)."""
        return await self._tx.write(lambda s: model_versions.reject_model_version(s, name, reason))

    async def active_model_version(self) -> ModelVersionRecord | None:
        return await self._tx.read(model_versions.active_model_version)

    async def get_model_version(self, name: str) -> ModelVersionRecord | None:
        return await self._tx.read(lambda s: model_versions.get_model_version(s, name))

    async def list_model_versions(self) -> list[ModelVersionRecord]:
        return await self._tx.read(model_versions.list_model_versions)


def _prepare_folders(directory: Path, db_file: Path | None) -> None:
    config.photos_dir(directory).mkdir(parents=True, exist_ok=True)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
