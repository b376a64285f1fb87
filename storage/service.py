"""``Storage``: the one object the bot and the trainer talk to.

A thin front: it opens and closes the engine and runs each function of the
aggregate modules (``people``, ``captions``, ``corrections``, ``model_versions``,
``forget``, ``stats``) in one short transaction of ``storage.transactions``.
Most methods are those functions, bound with ``_reading`` / ``_writing``: same
parameters (less the session), same docstring. Every call returns plain values
(``storage.records``), never ORM objects, so callers cannot trigger lazy loads
after the session is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, Self, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from storage import captions, config, corrections, export, forget, inbox, model_versions, people, retention
from storage import migrate as migrations
from storage import stats as statistics
from storage.engine import create_engine, is_sqlite, sqlite_file, truncate_wal
from storage.keys import SESSION_FORGET_KEY, load_or_create_forget_key
from storage.photos import FOLDER_MODE, PhotoStore, sha256_hex
from storage.records import (
    CaptionRecord,
    CorrectionOutcome,
    CorrectionRecord,
    ForgetReport,
    PhotoRecord,
    TrainingExample,
)
from storage.screening import EntryPolicy
from storage.transactions import Transactions

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
SessionFunction = Callable[Concatenate[AsyncSession, P], Awaitable[T]]
Method = Callable[Concatenate["Storage", P], Coroutine[Any, Any, T]]
PhotoRef = PhotoRecord | CaptionRecord | TrainingExample | str | Path


def _reading(function: SessionFunction[P, T]) -> Method[P, T]:
    """A ``Storage`` method that runs ``function`` in a read transaction."""

    async def method(self: Storage, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._tx.read(lambda session: function(session, *args, **kwargs))

    return _named_after(method, function)


def _writing(function: SessionFunction[P, T], retry_integrity: bool = False) -> Method[P, T]:
    """A ``Storage`` method that runs ``function`` in a write transaction.

    ``retry_integrity`` for functions that create rows another writer may create at the same moment.
    """

    async def method(self: Storage, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._tx.write(lambda session: function(session, *args, **kwargs), retry_integrity)

    return _named_after(method, function)


def _named_after(method: Method[P, T], function: Callable[..., Any]) -> Method[P, T]:
    method.__name__ = method.__qualname__ = function.__name__
    method.__doc__ = function.__doc__
    return method


class Storage:
    """Durable memory of the bot. Create with ``await Storage.open()``, end with ``await close()``."""

    def __init__(self, engine: AsyncEngine, url: str, data_dir: Path, forget_key: bytes,
                 policy: EntryPolicy | None = None) -> None:
        """``forget_key``: the data folder's secret for forgotten people's hashes (``storage.keys``)."""
        self.url = url
        self.policy = policy or EntryPolicy()
        self.data_dir = data_dir
        self.photos = PhotoStore(config.photos_dir(data_dir))
        self._engine = engine
        self._tx = Transactions(engine, url, {SESSION_FORGET_KEY: forget_key})
        # One export (re)write at a time: a rewrite that read the database before a second /forget
        # committed must not finish after that /forget's own rewrite (it would bring the data back).
        self.export_lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(
        cls,
        database_url: str | None = None,
        data_dir: Path | None = None,
        migrate: bool = True,
        policy: EntryPolicy | None = None,
    ) -> Self:
        """Open storage, creating the data folders and migrating the schema to head unless told not to.

        ``policy``: the rules corrections meet on the way in (daily cap, screening); the defaults if None.
        """
        directory = config.data_dir(data_dir)
        url = config.database_url(database_url, directory)
        await asyncio.to_thread(_prepare_folders, directory, sqlite_file(url))
        forget_key = await asyncio.to_thread(load_or_create_forget_key, directory)
        engine = create_engine(url)
        try:
            if migrate:
                await migrations.upgrade(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, url, directory, forget_key, policy)

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

    upsert_person = _writing(people.upsert_person, retry_integrity=True)
    get_person = _reading(people.get_person)

    # ------------------------------------------------------------------ photos, captions, votes

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
            lambda session: captions.record_photo(
                session,
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

    get_photo = _reading(captions.get_photo)

    def resolve_photo_path(self, photo: PhotoRef) -> Path:
        """Absolute path of a photo (record, caption, training example or relative path); no I/O."""
        if isinstance(photo, PhotoRecord | TrainingExample):
            rel = photo.rel_path
        elif isinstance(photo, CaptionRecord):
            rel = photo.photo_rel_path
        else:
            rel = Path(photo).as_posix()
        return self.photos.path(rel)

    record_caption = _writing(captions.record_caption, retry_integrity=True)
    set_caption_message = _writing(captions.set_caption_message)
    get_caption = _reading(captions.get_caption)
    find_caption_by_message = _reading(captions.find_caption_by_message)
    record_vote = _writing(captions.record_vote, retry_integrity=True)

    # ------------------------------------------------------------------ corrections

    start_correction = _writing(corrections.start_correction, retry_integrity=True)
    get_pending_correction = _reading(corrections.get_pending_correction)
    cancel_correction = _writing(corrections.cancel_correction)

    async def record_correction(self, caption_id: int, telegram_id: int, text: str) -> CorrectionRecord:
        """Validate, screen and store a correction under this storage's entry policy.

        One per person and caption (a later one replaces it in place); raises ``CorrectionRejected``
        (its code says why, e.g. the daily cap). The record's ``status`` says whether screening
        accepted it, flagged it, or holds it for review.
        """
        return await self._tx.write(
            lambda session: corrections.record_correction(session, caption_id, telegram_id, text, self.policy),
            retry_integrity=True,
        )

    async def corrections_for_training(
        self, since: datetime | None = None, include_upvoted: bool = False, untrained_only: bool = False
    ) -> list[TrainingExample]:
        """Captions to train on: corrections, plus (optionally) captions voted up more than down.

        Forgotten people's data is excluded. ``untrained_only`` keeps corrections no
        model has trained on yet; it does not apply to up-voted captions.
        """
        return await self._tx.read(
            lambda session: corrections.corrections_for_training(
                session, self.photos, since, include_upvoted, untrained_only
            )
        )

    async def corrections_of_run(self, model_version: str) -> list[TrainingExample]:
        """The corrections the fine-tune ``model_version`` trained on (what an operator reviews)."""
        return await self._tx.read(
            lambda session: corrections.corrections_of_run(session, self.photos, model_version)
        )

    async def mark_corrections_trained(
        self,
        correction_ids: Iterable[int],
        model_version: str,
        outcome: CorrectionOutcome = CorrectionOutcome.TRAINED,
    ) -> int:
        """Record which fine-tune looked at these corrections and its outcome; returns rows updated."""
        ids = sorted(set(correction_ids))
        if not ids:
            return 0  # no write transaction (and no SQLite write lock) for nothing
        return await self._tx.write(
            lambda session: corrections.mark_corrections_trained(session, ids, model_version, outcome)
        )

    async def corrections_under_review(self, limit: int = 100) -> list[CorrectionRecord]:
        """Flagged and held corrections, oldest first (``python -m storage review``)."""
        return await self._tx.read(lambda session: corrections.corrections_under_review(session, limit))

    async def release_corrections(self, correction_ids: Iterable[int]) -> int:
        """Make flagged or held corrections trainable; returns how many changed."""
        ids = sorted(set(correction_ids))
        return await self._tx.write(lambda session: corrections.release_corrections(session, ids)) if ids else 0

    async def delete_corrections_under_review(self, correction_ids: Iterable[int]) -> int:
        """Delete flagged or held corrections (never accepted ones); returns how many went."""
        ids = sorted(set(correction_ids))
        if not ids:
            return 0
        return await self._tx.write(lambda session: corrections.delete_corrections_under_review(session, ids))

    # ------------------------------------------------------------------ forgetting

    async def forget_person(self, telegram_id: int) -> ForgetReport:
        """Delete a person and what they gave us: votes, corrections, pending state, the captions
        they asked for, the photos (rows and files) no one else sent, and their person row; then
        rewrite every export folder still on disk without them.

        Only a keyed hash of their id and their flag count stay, and only if they had flags; model
        versions that learned from their corrections are marked (see ``storage.forget``).
        """
        report, rel_paths = await self._tx.write(lambda session: forget.forget_person(session, telegram_id))
        files = await self._delete_unreferenced_files(rel_paths)
        report = dataclasses.replace(report, files_deleted=files)
        if not report.found:
            return report
        if is_sqlite(self.url) and not await truncate_wal(self._engine):
            log.warning("the write-ahead log is in use; the deleted rows leave it at its next checkpoint")
        rewritten, failed = await export.rewrite_exports(self)
        return dataclasses.replace(report, exports_rewritten=rewritten, exports_failed=tuple(failed))

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

    async def apply_retention(self, untouched_days: float, trained_days: float,
                              now: datetime | None = None) -> int:
        """Delete the photos (rows, captions, votes, corrections, files) whose retention is over;
        returns how many photos went. See ``storage.retention``."""
        moment = now or datetime.now(UTC)
        return await self._delete_photos(
            lambda session: retention.expired_photos(session, moment, untouched_days, trained_days))

    async def enforce_quota(self, telegram_id: int, quota_bytes: int) -> int:
        """Delete a person's oldest photos beyond their quota; returns how many went."""
        return await self._delete_photos(
            lambda session: retention.over_quota_photos(session, telegram_id, quota_bytes))

    async def _delete_photos(self, choose: Callable[[AsyncSession], Awaitable[list[int]]]) -> int:
        async def chosen_and_deleted(session: AsyncSession) -> tuple[int, list[str]]:
            return await retention.delete_photos(session, await choose(session))

        deleted, rel_paths = await self._tx.write(chosen_and_deleted)
        await self._delete_unreferenced_files(rel_paths)
        return deleted

    async def _delete_unreferenced_files(self, rel_paths: list[str]) -> int:
        if not rel_paths:
            return 0
        return await self._tx.write(lambda session: forget.delete_unreferenced_files(session, self.photos, rel_paths))

    # ------------------------------------------------------------------ the durable inbox

    inbox_receive = _writing(inbox.receive)
    inbox_answered = _writing(inbox.mark_answered)
    inbox_take_for_replay = _writing(inbox.take_for_replay)
    inbox_prune = _writing(inbox.prune)

    # ------------------------------------------------------------------ statistics and model versions

    stats = _reading(statistics.stats)
    register_model_version = _writing(model_versions.register_model_version)
    promote_model_version = _writing(model_versions.promote_model_version)
    reject_model_version = _writing(model_versions.reject_model_version)
    approve_model_version = _writing(model_versions.approve_model_version)
    reject_after_review = _writing(model_versions.reject_after_review)
    active_model_version = _reading(model_versions.active_model_version)
    get_model_version = _reading(model_versions.get_model_version)
    list_model_versions = _reading(model_versions.list_model_versions)
    clean_base = _reading(model_versions.clean_base)

    # ------------------------------------------------------------------ export folders

    record_export = _writing(export.record_export)
    known_exports = _reading(export.known_exports)


DATABASE_MODE = 0o600  # the database holds who sent what: the bot's own user only


def _prepare_folders(directory: Path, db_file: Path | None) -> None:
    """The data and photo folders (0700) and the SQLite file (0600), tightened if older and looser."""
    photos = config.photos_dir(directory)
    photos.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    for folder in {directory, photos}:
        os.chmod(folder, FOLDER_MODE)
    if db_file is not None:
        db_file.parent.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        os.close(os.open(db_file, os.O_CREAT | os.O_WRONLY, DATABASE_MODE))  # SQLite takes an empty file
        os.chmod(db_file, DATABASE_MODE)
