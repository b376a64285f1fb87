"""The async service layer: everything the bot and the trainer ask of storage.

Each public method runs one short transaction and returns plain values
(``storage.records``), never ORM objects, so callers cannot trigger lazy loads
after the session is gone. Writes start with ``BEGIN IMMEDIATE`` on SQLite and
are retried when SQLite still reports "database is locked", so that error never
reaches the caller under load.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Self, TypeVar, cast

from sqlalchemy import Select, and_, case, delete, exists, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased
from sqlalchemy.sql.dml import Delete, Update

from storage import config
from storage import migrate as migrations
from storage.engine import create_engine, is_sqlite, sqlite_file, write_engine
from storage.errors import CorrectionRejected, ModelVersionError, NotFound, Rejection
from storage.models import (
    MODEL_STATUSES,
    Caption,
    Correction,
    ModelVersion,
    PendingCorrectionRow,
    Person,
    Photo,
    PhotoSender,
    Vote,
    utcnow,
)
from storage.photos import PhotoStore, sha256_hex
from storage.records import (
    CaptionRecord,
    CorrectionRecord,
    DayCount,
    ForgetReport,
    ModelVersionRecord,
    PendingCorrection,
    PersonInfo,
    PhotoRecord,
    Stats,
    TrainingExample,
    VoteRecord,
)
from storage.retry import MAX_LOCKED_ATTEMPTS, Backoff, is_locked
from storage.validation import validate_correction

log = logging.getLogger(__name__)

T = TypeVar("T")
SessionOp = Callable[[AsyncSession], Awaitable[T]]

INTEGRITY_ATTEMPTS = 3
LANGUAGE_CODE_MAX = 16
ID_CHUNK = 500
LAST_SEEN_PRECISION = timedelta(minutes=1)
PhotoRef = PhotoRecord | CaptionRecord | TrainingExample | str | Path


async def _rowcount(session: AsyncSession, stmt: Delete | Update) -> int:
    result = cast(CursorResult[Any], await session.execute(stmt))
    return max(result.rowcount, 0)


def _chunks(ids: Sequence[int]) -> Iterable[Sequence[int]]:
    for start in range(0, len(ids), ID_CHUNK):
        yield ids[start : start + ID_CHUNK]


def _clean_json(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf become null (PostgreSQL rejects them), unknown objects become str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _clean_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_clean_json(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.loads(json.dumps(value, default=str))


def _day_of(value: Any) -> date:
    """``func.date`` yields a str on SQLite and a date on PostgreSQL."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _person_info(person: Person, created: bool) -> PersonInfo:
    return PersonInfo(
        id=person.id,
        telegram_id=person.telegram_id,
        language_code=person.language_code,
        first_seen_at=person.first_seen_at,
        last_seen_at=person.last_seen_at,
        is_forgotten=person.is_forgotten,
        created=created,
    )


def _photo_record(photo: Photo, created: bool) -> PhotoRecord:
    return PhotoRecord(
        id=photo.id,
        sha256=photo.sha256,
        rel_path=photo.rel_path,
        size_bytes=photo.size_bytes,
        width=photo.width,
        height=photo.height,
        telegram_file_unique_id=photo.telegram_file_unique_id,
        created_at=photo.created_at,
        created=created,
    )


def _model_record(row: ModelVersion) -> ModelVersionRecord:
    return ModelVersionRecord(
        id=row.id,
        name=row.name,
        checkpoint_path=row.checkpoint_path,
        parent=row.parent,
        metrics=dict(row.metrics or {}),
        status=row.status,
        reason=row.reason,
        created_at=row.created_at,
        promoted_at=row.promoted_at,
    )


def _correction_record(row: Correction, telegram_id: int) -> CorrectionRecord:
    return CorrectionRecord(
        id=row.id,
        caption_id=row.caption_id,
        telegram_id=telegram_id,
        text=row.text,
        text_raw=row.text_raw,
        created_at=row.created_at,
        trained_model_version=row.trained_model_version,
    )


def _caption_select() -> Select[Caption, str, str, int]:
    return (
        select(Caption, Photo.sha256, Photo.rel_path, Person.telegram_id)
        .join(Photo, Caption.photo_id == Photo.id)
        .join(Person, Caption.requester_id == Person.id)
    )


class Storage:
    """Durable memory of the bot. Create with ``await Storage.open()``, end with ``await close()``."""

    def __init__(self, engine: AsyncEngine, url: str, data_dir: Path) -> None:
        self.url = url
        self.data_dir = data_dir
        self.photos = PhotoStore(config.photos_dir(data_dir))
        self._engine = engine
        self._read_sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._write_sessions = async_sessionmaker(write_engine(engine), expire_on_commit=False)
        # SQLite admits one writer at a time. Queuing this process's writers on an
        # asyncio lock is much cheaper than letting them poll the file lock (the
        # busy handler sleeps in steps of up to 100 ms); other processes still
        # meet the file lock, handled by busy_timeout and the retry in ``_run``.
        self.lock_retries = 0  # how often SQLite said "locked" and a transaction was retried
        self._write_lock: asyncio.Lock | None = asyncio.Lock() if is_sqlite(url) else None

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

    # ------------------------------------------------------------------ transactions

    async def _run(
        self, factory: async_sessionmaker[AsyncSession], op: SessionOp[T], retry_integrity: bool = False
    ) -> T:
        """Run ``op`` in one transaction, retrying the whole of it when SQLite is locked.

        With ``retry_integrity`` a unique-key clash (two writers creating the same
        row at once, possible on PostgreSQL) is retried too: the next attempt finds the row.
        """
        backoff = Backoff()
        locked = clashes = 0
        while True:
            try:
                async with factory() as session, session.begin():
                    return await op(session)
            except OperationalError as exc:
                locked += 1
                if not is_locked(exc) or locked >= MAX_LOCKED_ATTEMPTS:
                    raise
                self.lock_retries += 1
                log.debug("database locked (attempt %d); retrying", locked)
            except IntegrityError:
                clashes += 1
                if not retry_integrity or clashes >= INTEGRITY_ATTEMPTS:
                    raise
            await backoff.sleep()

    async def _write(self, op: SessionOp[T], retry_integrity: bool = False) -> T:
        if self._write_lock is None:
            return await self._run(self._write_sessions, op, retry_integrity)
        async with self._write_lock:
            return await self._run(self._write_sessions, op, retry_integrity)

    async def _read(self, op: SessionOp[T]) -> T:
        return await self._run(self._read_sessions, op)

    # ------------------------------------------------------------------ people

    @staticmethod
    async def _person_by_telegram_id(session: AsyncSession, telegram_id: int) -> Person | None:
        return await session.scalar(select(Person).where(Person.telegram_id == telegram_id))

    async def _ensure_person(
        self, session: AsyncSession, telegram_id: int, language_code: str | None = None
    ) -> tuple[Person, bool]:
        """Get or create a person; someone forgotten who interacts again starts afresh."""
        now = utcnow()
        language = language_code[:LANGUAGE_CODE_MAX] if language_code else None
        person = await self._person_by_telegram_id(session, telegram_id)
        if person is None:
            person = Person(
                telegram_id=telegram_id,
                language_code=language,
                first_seen_at=now,
                last_seen_at=now,
                is_forgotten=False,
            )
            session.add(person)
            await session.flush()
            return person, True
        if person.is_forgotten:
            person.is_forgotten = False
            person.first_seen_at = now
        # last_seen_at is kept to the minute: skipping the UPDATE on busy people saves a write.
        if now - person.last_seen_at >= LAST_SEEN_PRECISION or person.first_seen_at == now:
            person.last_seen_at = now
        if language is not None and language != person.language_code:
            person.language_code = language
        if session.is_modified(person):
            await session.flush()
        return person, False

    async def upsert_person(self, telegram_id: int, language_code: str | None) -> PersonInfo:
        """Create or refresh a person; a None language keeps the one already known."""

        async def op(session: AsyncSession) -> PersonInfo:
            person, created = await self._ensure_person(session, telegram_id, language_code)
            return _person_info(person, created)

        return await self._write(op, retry_integrity=True)

    async def get_person(self, telegram_id: int) -> PersonInfo | None:
        async def op(session: AsyncSession) -> PersonInfo | None:
            person = await self._person_by_telegram_id(session, telegram_id)
            return None if person is None else _person_info(person, False)

        return await self._read(op)

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

        The file is written (atomically) before the row exists, so a row never
        points at a missing or partial file; a crash in between leaves at worst
        an unreferenced file, which the next identical photo reuses.
        """
        if not data:
            raise ValueError("empty photo")
        sha = await asyncio.to_thread(sha256_hex, data)
        rel_path = await asyncio.to_thread(self.photos.ensure, sha, data)

        async def op(session: AsyncSession) -> PhotoRecord:
            person, _ = await self._ensure_person(session, sender_telegram_id)
            photo = await session.scalar(select(Photo).where(Photo.sha256 == sha))
            created = photo is None
            if photo is None:
                photo = Photo(
                    sha256=sha,
                    size_bytes=len(data),
                    width=width,
                    height=height,
                    telegram_file_unique_id=telegram_file_unique_id,
                    rel_path=rel_path,
                    created_at=utcnow(),
                )
                session.add(photo)
                await session.flush()
            elif photo.telegram_file_unique_id is None and telegram_file_unique_id:
                photo.telegram_file_unique_id = telegram_file_unique_id
            # A concurrent forget may have removed the file since it was written above;
            # forget deletes files inside its own write transaction, so checking here is race-free.
            await asyncio.to_thread(self.photos.ensure, sha, data)
            if await session.get(PhotoSender, (photo.id, person.id)) is None:
                session.add(PhotoSender(photo_id=photo.id, person_id=person.id, first_sent_at=utcnow()))
                await session.flush()
            return _photo_record(photo, created)

        return await self._write(op, retry_integrity=True)

    async def get_photo(self, photo_id: int) -> PhotoRecord | None:
        async def op(session: AsyncSession) -> PhotoRecord | None:
            photo = await session.get(Photo, photo_id)
            return None if photo is None else _photo_record(photo, False)

        return await self._read(op)

    def resolve_photo_path(self, photo: PhotoRef) -> Path:
        """Absolute path of a photo (record, caption, training example or relative path); no I/O."""
        if isinstance(photo, PhotoRecord | TrainingExample):
            rel = photo.rel_path
        elif isinstance(photo, CaptionRecord):
            rel = photo.photo_rel_path
        else:
            rel = Path(photo).as_posix()
        return self.photos.path(rel)

    async def photo_path(self, photo: PhotoRef) -> Path:
        """Async twin of ``resolve_photo_path``, for callers that await every storage call."""
        return self.resolve_photo_path(photo)

    # ------------------------------------------------------------------ captions

    @staticmethod
    async def _vote_counts(session: AsyncSession, caption_id: int) -> tuple[int, int]:
        rows = await session.execute(
            select(Vote.up, func.count()).where(Vote.caption_id == caption_id).group_by(Vote.up)
        )
        counts = {bool(up): int(n) for up, n in rows}
        return counts.get(True, 0), counts.get(False, 0)

    async def _caption_record(self, session: AsyncSession, where: Any) -> CaptionRecord | None:
        stmt = _caption_select().where(where).order_by(Caption.id.desc()).limit(1)
        row = (await session.execute(stmt)).first()
        if row is None:
            return None
        caption, sha, rel_path, telegram_id = row
        ups, downs = await self._vote_counts(session, caption.id)
        return CaptionRecord(
            id=caption.id,
            photo_id=caption.photo_id,
            photo_sha256=sha,
            photo_rel_path=rel_path,
            model_version=caption.model_version,
            text=caption.text,
            score=caption.score,
            beam_size=caption.beam_size,
            latency_ms=caption.latency_ms,
            requester_telegram_id=telegram_id,
            chat_id=caption.chat_id,
            message_id=caption.message_id,
            created_at=caption.created_at,
            votes_up=ups,
            votes_down=downs,
        )

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

        async def op(session: AsyncSession) -> CaptionRecord:
            photo = await session.get(Photo, photo_id)
            if photo is None:
                raise NotFound(f"photo {photo_id} does not exist")
            person, _ = await self._ensure_person(session, requester_telegram_id)
            caption = Caption(
                photo_id=photo_id,
                requester_id=person.id,
                model_version=model_version,
                text=text,
                score=float(score),
                beam_size=int(beam_size),
                latency_ms=float(latency_ms),
                chat_id=chat_id,
                message_id=message_id,
                created_at=utcnow(),
            )
            session.add(caption)
            await session.flush()
            return CaptionRecord(
                id=caption.id,
                photo_id=photo_id,
                photo_sha256=photo.sha256,
                photo_rel_path=photo.rel_path,
                model_version=model_version,
                text=text,
                score=caption.score,
                beam_size=caption.beam_size,
                latency_ms=caption.latency_ms,
                requester_telegram_id=requester_telegram_id,
                chat_id=chat_id,
                message_id=message_id,
                created_at=caption.created_at,
            )

        return await self._write(op, retry_integrity=True)

    async def set_caption_message(self, caption_id: int, chat_id: int, message_id: int) -> CaptionRecord:
        """Remember which Telegram message shows the caption, so replies map back to it."""

        async def op(session: AsyncSession) -> CaptionRecord:
            updated = await _rowcount(
                session,
                update(Caption)
                .where(Caption.id == caption_id)
                .values(chat_id=chat_id, message_id=message_id),
            )
            record = await self._caption_record(session, Caption.id == caption_id) if updated else None
            if record is None:
                raise NotFound(f"caption {caption_id} does not exist")
            return record

        return await self._write(op)

    async def get_caption(self, caption_id: int) -> CaptionRecord | None:
        async def op(session: AsyncSession) -> CaptionRecord | None:
            return await self._caption_record(session, Caption.id == caption_id)

        return await self._read(op)

    async def find_caption_by_message(self, chat_id: int, message_id: int) -> CaptionRecord | None:
        """The caption shown in a given message (the latest, should a message be reused)."""

        async def op(session: AsyncSession) -> CaptionRecord | None:
            return await self._caption_record(
                session, and_(Caption.chat_id == chat_id, Caption.message_id == message_id)
            )

        return await self._read(op)

    # ------------------------------------------------------------------ votes

    async def record_vote(self, caption_id: int, telegram_id: int, up: bool) -> VoteRecord:
        """One vote per person per caption: a new vote replaces the old one."""

        async def op(session: AsyncSession) -> VoteRecord:
            if await session.get(Caption, caption_id) is None:
                raise NotFound(f"caption {caption_id} does not exist")
            person, _ = await self._ensure_person(session, telegram_id)
            vote = await session.scalar(
                select(Vote).where(Vote.caption_id == caption_id, Vote.person_id == person.id)
            )
            now = utcnow()
            changed = vote is None or vote.up != up
            if vote is None:
                session.add(
                    Vote(caption_id=caption_id, person_id=person.id, up=up, created_at=now, updated_at=now)
                )
            elif changed:
                vote.up = up
                vote.updated_at = now
            await session.flush()
            ups, downs = await self._vote_counts(session, caption_id)
            return VoteRecord(caption_id, telegram_id, up, changed, ups, downs)

        return await self._write(op, retry_integrity=True)

    # ------------------------------------------------------------------ corrections

    async def start_correction(
        self,
        telegram_id: int,
        caption_id: int,
        prompt_chat_id: int | None = None,
        prompt_message_id: int | None = None,
    ) -> PendingCorrection:
        """Remember that this person is now correcting this caption (replacing any earlier one)."""

        async def op(session: AsyncSession) -> PendingCorrection:
            caption = await session.get(Caption, caption_id)
            if caption is None:
                raise NotFound(f"caption {caption_id} does not exist")
            person, _ = await self._ensure_person(session, telegram_id)
            row = await session.get(PendingCorrectionRow, person.id)
            if row is None:
                row = PendingCorrectionRow(person_id=person.id)
                session.add(row)
            row.caption_id = caption_id
            row.prompt_chat_id = prompt_chat_id
            row.prompt_message_id = prompt_message_id
            row.started_at = utcnow()
            await session.flush()
            return PendingCorrection(
                telegram_id, caption_id, caption.text, prompt_chat_id, prompt_message_id, row.started_at
            )

        return await self._write(op, retry_integrity=True)

    async def get_pending_correction(self, telegram_id: int) -> PendingCorrection | None:
        async def op(session: AsyncSession) -> PendingCorrection | None:
            stmt = (
                select(PendingCorrectionRow, Caption.text)
                .join(Person, PendingCorrectionRow.person_id == Person.id)
                .join(Caption, PendingCorrectionRow.caption_id == Caption.id)
                .where(Person.telegram_id == telegram_id)
            )
            row = (await session.execute(stmt)).first()
            if row is None:
                return None
            pending, caption_text = row
            return PendingCorrection(
                telegram_id,
                pending.caption_id,
                caption_text,
                pending.prompt_chat_id,
                pending.prompt_message_id,
                pending.started_at,
            )

        return await self._read(op)

    async def cancel_correction(self, telegram_id: int) -> bool:
        """Drop the person's pending correction; True if there was one."""

        async def op(session: AsyncSession) -> bool:
            person_ids = select(Person.id).where(Person.telegram_id == telegram_id)
            stmt = delete(PendingCorrectionRow).where(PendingCorrectionRow.person_id.in_(person_ids))
            return await _rowcount(session, stmt) > 0

        return await self._write(op)

    async def record_correction(self, caption_id: int, telegram_id: int, text: str) -> CorrectionRecord:
        """Validate and store a correction; raises ``CorrectionRejected`` with the reason.

        Sending the same correction twice (a double tap) returns the first one.
        The person's pending correction of this caption is cleared; a rejected
        correction leaves it in place so they can try again.
        """

        async def op(session: AsyncSession) -> CorrectionRecord:
            caption = await session.get(Caption, caption_id)
            if caption is None:
                raise CorrectionRejected(Rejection.NO_CAPTION)
            normalized = validate_correction(text, caption.text)
            person, _ = await self._ensure_person(session, telegram_id)
            await session.execute(
                delete(PendingCorrectionRow).where(
                    PendingCorrectionRow.person_id == person.id, PendingCorrectionRow.caption_id == caption_id
                )
            )
            existing = await session.scalar(
                select(Correction).where(
                    Correction.caption_id == caption_id,
                    Correction.person_id == person.id,
                    Correction.text == normalized,
                )
            )
            if existing is not None:
                return _correction_record(existing, telegram_id)
            row = Correction(
                caption_id=caption_id,
                person_id=person.id,
                text_raw=text,
                text=normalized,
                created_at=utcnow(),
            )
            session.add(row)
            await session.flush()
            return _correction_record(row, telegram_id)

        return await self._write(op, retry_integrity=True)

    # ------------------------------------------------------------------ forgetting

    async def forget_person(self, telegram_id: int) -> ForgetReport:
        """Delete what a person gave us: votes, corrections, pending state, the captions
        they asked for, and the photos (rows and files) no one else sent.

        The person row stays, marked forgotten and stripped of its language, so
        that a later visit is recognised as a fresh start (see ``upsert_person``).
        """

        async def op(session: AsyncSession) -> tuple[ForgetReport, list[str]]:
            person = await self._person_by_telegram_id(session, telegram_id)
            if person is None:
                return ForgetReport(telegram_id, found=False), []
            return await _delete_person_data(session, person)

        report, rel_paths = await self._write(op)
        files = await self._delete_unreferenced_files(rel_paths)
        return dataclasses.replace(report, files_deleted=files)

    async def _delete_unreferenced_files(self, rel_paths: Sequence[str]) -> int:
        """Unlink photo files whose rows are gone, inside a write transaction.

        Holding the write lock while checking and unlinking means a concurrent
        ``record_photo`` of the same bytes either commits first (the file is kept)
        or runs after (and rewrites the file before committing its row).
        """
        if not rel_paths:
            return 0

        async def op(session: AsyncSession) -> int:
            deleted = 0
            for rel_path in rel_paths:
                still_used = await session.scalar(select(exists().where(Photo.rel_path == rel_path)))
                if not still_used and await asyncio.to_thread(self.photos.delete, rel_path):
                    deleted += 1
            return deleted

        return await self._write(op)

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

        async def referenced(session: AsyncSession) -> set[str]:
            return set((await session.scalars(select(Photo.rel_path))).all())

        known = await self._read(referenced)
        return await self._delete_unreferenced_files([rel for rel in on_disk if rel not in known])

    # ------------------------------------------------------------------ statistics

    async def stats(self, days: int = 7) -> Stats:
        """Counts for the operator: captions per UTC day (oldest first), totals, active model."""
        days = max(days, 1)

        async def op(session: AsyncSession) -> Stats:
            first_day = datetime.now(UTC).date() - timedelta(days=days - 1)
            since = datetime.combine(first_day, datetime.min.time(), tzinfo=UTC)
            day_col = func.date(Caption.created_at)
            rows = await session.execute(
                select(day_col, func.count()).where(Caption.created_at >= since).group_by(day_col)
            )
            per_day = {_day_of(day): int(n) for day, n in rows}
            series = tuple(
                DayCount(first_day + timedelta(days=i), per_day.get(first_day + timedelta(days=i), 0))
                for i in range(days)
            )
            ups, downs = await _scalar_pair(
                session,
                select(
                    func.coalesce(func.sum(case((Vote.up.is_(True), 1), else_=0)), 0),
                    func.coalesce(func.sum(case((Vote.up.is_(False), 1), else_=0)), 0),
                ),
            )
            return Stats(
                captions_per_day=series,
                captions=await _count(session, select(func.count(Caption.id))),
                photos=await _count(session, select(func.count(Photo.id))),
                people=await _count(
                    session, select(func.count(Person.id)).where(Person.is_forgotten.is_(False))
                ),
                votes_up=ups,
                votes_down=downs,
                corrections=await _count(session, select(func.count(Correction.id))),
                corrections_untrained=await _count(
                    session,
                    select(func.count(Correction.id)).where(Correction.trained_model_version.is_(None)),
                ),
                active_model=await session.scalar(
                    select(ModelVersion.name).where(ModelVersion.status == "active")
                ),
            )

        return await self._read(op)

    # ------------------------------------------------------------------ model versions

    @staticmethod
    async def _model_by_name(session: AsyncSession, name: str) -> ModelVersion:
        row = await session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if row is None:
            raise NotFound(f"model version {name!r} does not exist")
        return row

    @staticmethod
    async def _promote(session: AsyncSession, row: ModelVersion) -> None:
        # Retire the old active model first: the partial unique index allows one 'active' row.
        await session.execute(
            update(ModelVersion)
            .where(ModelVersion.status == "active", ModelVersion.id != row.id)
            .values(status="retired")
        )
        row.status = "active"
        row.promoted_at = utcnow()
        await session.flush()

    async def register_model_version(
        self,
        name: str,
        checkpoint_path: str | Path,
        parent: str | None,
        metrics: dict[str, Any],
        status: str = "candidate",
        reason: str | None = None,
    ) -> ModelVersionRecord:
        """Record a trained checkpoint; ``status='active'`` registers and promotes it at once."""
        if status not in MODEL_STATUSES:
            raise ModelVersionError(f"unknown status {status!r}; expected one of {MODEL_STATUSES}")

        async def op(session: AsyncSession) -> ModelVersionRecord:
            if await session.scalar(select(exists().where(ModelVersion.name == name))):
                raise ModelVersionError(f"model version {name!r} already exists")
            row = ModelVersion(
                name=name,
                checkpoint_path=str(checkpoint_path),
                parent=parent,
                metrics=_clean_json(dict(metrics)),
                status="candidate" if status == "active" else status,
                reason=reason,
                created_at=utcnow(),
            )
            session.add(row)
            await session.flush()
            if status == "active":
                await self._promote(session, row)
            return _model_record(row)

        return await self._write(op)

    async def promote_model_version(self, name: str) -> ModelVersionRecord:
        """Make this version the one the bot serves; the previous active one becomes 'retired'."""

        async def op(session: AsyncSession) -> ModelVersionRecord:
            row = await self._model_by_name(session, name)
            if row.status == "rejected":
                raise ModelVersionError(f"model version {name!r} was rejected: {row.reason or 'no reason'}")
            if row.status != "active":
                await self._promote(session, row)
            return _model_record(row)

        return await self._write(op)

    async def reject_model_version(self, name: str, reason: str) -> ModelVersionRecord:
        """Mark a candidate as not good enough, with the reason (e.g. the failed metric)."""

        async def op(session: AsyncSession) -> ModelVersionRecord:
            row = await self._model_by_name(session, name)
            if row.status == "active":
                raise ModelVersionError(f"model version {name!r} is active; promote another one first")
            row.status = "rejected"
            row.reason = reason
            await session.flush()
            return _model_record(row)

        return await self._write(op)

    async def active_model_version(self) -> ModelVersionRecord | None:
        async def op(session: AsyncSession) -> ModelVersionRecord | None:
            row = await session.scalar(select(ModelVersion).where(ModelVersion.status == "active"))
            return None if row is None else _model_record(row)

        return await self._read(op)

    async def get_model_version(self, name: str) -> ModelVersionRecord | None:
        async def op(session: AsyncSession) -> ModelVersionRecord | None:
            row = await session.scalar(select(ModelVersion).where(ModelVersion.name == name))
            return None if row is None else _model_record(row)

        return await self._read(op)

    async def list_model_versions(self) -> list[ModelVersionRecord]:
        async def op(session: AsyncSession) -> list[ModelVersionRecord]:
            rows = await session.scalars(
                select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id)
            )
            return [_model_record(row) for row in rows]

        return await self._read(op)

    # ------------------------------------------------------------------ training data

    async def corrections_for_training(
        self, since: datetime | None = None, include_upvoted: bool = False, untrained_only: bool = False
    ) -> list[TrainingExample]:
        """Captions to train on: corrections, plus (optionally) captions voted up more than down.

        Forgotten people's data is excluded even if a deletion were incomplete.
        ``untrained_only`` keeps corrections no model has trained on yet; it does
        not apply to up-voted captions, which carry no such mark.
        """

        async def op(session: AsyncSession) -> list[TrainingExample]:
            examples = await self._correction_examples(session, since, untrained_only)
            if include_upvoted:
                examples += await self._upvoted_examples(session, since)
            return sorted(examples, key=lambda ex: (ex.created_at, ex.kind, ex.source_id))

        return await self._read(op)

    async def _correction_examples(
        self, session: AsyncSession, since: datetime | None, untrained_only: bool
    ) -> list[TrainingExample]:
        author = aliased(Person)
        requester = aliased(Person)
        stmt = (
            select(Correction, Caption.photo_id, Photo.sha256, Photo.rel_path)
            .join(Caption, Correction.caption_id == Caption.id)
            .join(Photo, Caption.photo_id == Photo.id)
            .join(author, Correction.person_id == author.id)
            .join(requester, Caption.requester_id == requester.id)
            .where(author.is_forgotten.is_(False), requester.is_forgotten.is_(False))
        )
        if since is not None:
            stmt = stmt.where(Correction.created_at >= since)
        if untrained_only:
            stmt = stmt.where(Correction.trained_model_version.is_(None))
        rows = (await session.execute(stmt)).all()
        return [
            TrainingExample(
                kind="correction",
                source_id=row.id,
                caption_id=row.caption_id,
                photo_id=photo_id,
                sha256=sha,
                rel_path=rel_path,
                path=self.photos.path(rel_path),
                text=row.text,
                created_at=row.created_at,
                trained_model_version=row.trained_model_version,
            )
            for row, photo_id, sha, rel_path in rows
        ]

    async def _upvoted_examples(self, session: AsyncSession, since: datetime | None) -> list[TrainingExample]:
        voter = aliased(Person)
        requester = aliased(Person)
        net = func.sum(case((Vote.up.is_(True), 1), else_=-1))
        liked = (
            select(Vote.caption_id)
            .join(voter, Vote.person_id == voter.id)
            .where(voter.is_forgotten.is_(False))
            .group_by(Vote.caption_id)
            .having(net > 0)
        )
        stmt = (
            select(Caption, Photo.sha256, Photo.rel_path)
            .join(Photo, Caption.photo_id == Photo.id)
            .join(requester, Caption.requester_id == requester.id)
            .where(requester.is_forgotten.is_(False), Caption.id.in_(liked))
        )
        if since is not None:
            stmt = stmt.where(Caption.created_at >= since)
        rows = (await session.execute(stmt)).all()
        return [
            TrainingExample(
                kind="upvoted",
                source_id=caption.id,
                caption_id=caption.id,
                photo_id=caption.photo_id,
                sha256=sha,
                rel_path=rel_path,
                path=self.photos.path(rel_path),
                text=caption.text,
                created_at=caption.created_at,
            )
            for caption, sha, rel_path in rows
        ]

    async def mark_corrections_trained(self, correction_ids: Iterable[int], model_version: str) -> int:
        """Record which model version trained on these corrections; returns rows updated."""
        ids = sorted(set(correction_ids))

        async def op(session: AsyncSession) -> int:
            now = utcnow()
            total = 0
            for chunk in _chunks(ids):
                total += await _rowcount(
                    session,
                    update(Correction)
                    .where(Correction.id.in_(chunk))
                    .values(trained_model_version=model_version, trained_at=now),
                )
            return total

        return await self._write(op) if ids else 0


async def _count(session: AsyncSession, stmt: Select[int]) -> int:
    return int(await session.scalar(stmt) or 0)


async def _scalar_pair(session: AsyncSession, stmt: Select[Any, Any]) -> tuple[int, int]:
    first, second = (await session.execute(stmt)).one()
    return int(first or 0), int(second or 0)


async def _delete_person_data(session: AsyncSession, person: Person) -> tuple[ForgetReport, list[str]]:
    """The deleting half of ``forget_person``; returns the report and the photo files to remove."""
    pid = person.id
    other_sender = aliased(PhotoSender)
    orphan_photos = select(PhotoSender.photo_id).where(
        PhotoSender.person_id == pid,
        ~exists().where(other_sender.photo_id == PhotoSender.photo_id, other_sender.person_id != pid),
    )
    rel_paths = list((await session.scalars(select(Photo.rel_path).where(Photo.id.in_(orphan_photos)))).all())
    captions = select(Caption.id).where(or_(Caption.requester_id == pid, Caption.photo_id.in_(orphan_photos)))

    pending = await _rowcount(
        session,
        delete(PendingCorrectionRow).where(
            or_(PendingCorrectionRow.person_id == pid, PendingCorrectionRow.caption_id.in_(captions))
        ),
    )
    votes = await _rowcount(
        session, delete(Vote).where(or_(Vote.person_id == pid, Vote.caption_id.in_(captions)))
    )
    corrections = await _rowcount(
        session,
        delete(Correction).where(or_(Correction.person_id == pid, Correction.caption_id.in_(captions))),
    )
    caption_count = await _rowcount(session, delete(Caption).where(Caption.id.in_(captions)))
    orphan_ids = list((await session.scalars(orphan_photos)).all())
    photos = 0
    for chunk in _chunks(orphan_ids):
        await session.execute(delete(PhotoSender).where(PhotoSender.photo_id.in_(chunk)))
        photos += await _rowcount(session, delete(Photo).where(Photo.id.in_(chunk)))
    await session.execute(delete(PhotoSender).where(PhotoSender.person_id == pid))

    person.is_forgotten = True
    person.forgotten_at = utcnow()
    person.language_code = None
    await session.flush()
    report = ForgetReport(
        person.telegram_id,
        found=True,
        votes=votes,
        corrections=corrections,
        captions=caption_count,
        photos=photos,
        pending=pending,
    )
    return report, rel_paths


def _prepare_folders(directory: Path, db_file: Path | None) -> None:
    config.photos_dir(directory).mkdir(parents=True, exist_ok=True)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
