"""SQLAlchemy ORM models: the single source of truth for the schema.

Alembic migrations are written to match these models exactly; a test compares
the migrated database with this metadata so the two never drift apart.
Types are kept dialect-neutral (no SQLite-only types) so PostgreSQL works too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from storage.records import CorrectionOutcome, CorrectionStatus, ModelStatus

# Deterministic constraint names so migrations can refer to (and drop) them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MODEL_STATUSES = tuple(status.value for status in ModelStatus)
CORRECTION_STATUSES = tuple(status.value for status in CorrectionStatus)
CORRECTION_OUTCOMES = tuple(outcome.value for outcome in CorrectionOutcome)
MODEL_NAME_LEN = 128
CORRECTION_MAX_LEN = 300


def utcnow() -> datetime:
    """Current time, timezone-aware UTC: every timestamp is set in Python, not by the server."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that always goes in and comes out as aware UTC.

    SQLite has no time zones: SQLAlchemy would store the wall-clock digits and
    return naive values. Normalising to naive UTC on the way in and re-attaching
    UTC on the way out gives the same aware values on SQLite and PostgreSQL.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Person(Base):
    """Someone who talked to the bot, keyed by Telegram user id."""

    __tablename__ = "people"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    telegram_id: Mapped[int] = mapped_column(BigInteger, unique=True)
    language_code: Mapped[str | None] = mapped_column(String(16))
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Flagged corrections this person had when they last used /forget (``ForgottenPerson.flags``):
    # the hold rule counts them, so /forget does not wash a record of abuse.
    prior_flags: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ForgottenPerson(Base):
    """What stays of a person after /forget, only when some of their corrections had been flagged:
    a keyed hash of their Telegram id (``storage.keys.person_hash``) and how many were flagged."""

    __tablename__ = "forgotten_people"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    forgotten_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    flags: Mapped[int] = mapped_column(Integer)


class Photo(Base):
    """A photo's bytes, stored once per content hash in the photo folder."""

    __tablename__ = "photos"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    telegram_file_unique_id: Mapped[str | None] = mapped_column(String(128), index=True)
    rel_path: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PhotoSender(Base):
    """Who sent a photo: a photo is deleted when the last of its senders is forgotten."""

    __tablename__ = "photo_senders"

    photo_id: Mapped[int] = mapped_column(ForeignKey("photos.id", ondelete="CASCADE"), primary_key=True)
    person_id: Mapped[int] = mapped_column(
        ForeignKey("people.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    first_sent_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Caption(Base):
    """A caption the bot produced, and where it posted it (to map replies back)."""

    __tablename__ = "captions"
    __table_args__ = (Index("ix_captions_chat_message", "chat_id", "message_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    photo_id: Mapped[int] = mapped_column(ForeignKey("photos.id", ondelete="CASCADE"), index=True)
    requester_id: Mapped[int] = mapped_column(ForeignKey("people.id", ondelete="CASCADE"), index=True)
    model_version: Mapped[str] = mapped_column(String(MODEL_NAME_LEN))
    text: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)
    beam_size: Mapped[int] = mapped_column(Integer)
    latency_ms: Mapped[float] = mapped_column(Float)
    chat_id: Mapped[int | None] = mapped_column(BigInteger)
    message_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class Vote(Base):
    """One person's up/down vote on one caption; a new vote overwrites the old one."""

    __tablename__ = "votes"
    __table_args__ = (UniqueConstraint("caption_id", "person_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    caption_id: Mapped[int] = mapped_column(ForeignKey("captions.id", ondelete="CASCADE"))
    person_id: Mapped[int] = mapped_column(ForeignKey("people.id", ondelete="CASCADE"), index=True)
    up: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


def _sql_list(values: tuple[str, ...]) -> str:
    """``'a', 'b'``: plain identifiers quoted as SQL string literals."""
    return ", ".join(f"'{value}'" for value in values)


_ONLY_ACTIVE = f"status = '{ModelStatus.ACTIVE.value}'"
_NOT_SUPERSEDED = f"status <> '{CorrectionStatus.SUPERSEDED.value}'"


class Correction(Base):
    """A caption rewritten by a person: the training signal for the next model.

    One live row per person and caption (a later correction updates it in place, keeping its id);
    ``status`` is what screening at entry decided, ``outcome`` what the fine-tune named in
    ``trained_model_version`` did with it.
    """

    __tablename__ = "corrections"
    __table_args__ = (
        CheckConstraint(f"status IN ({_sql_list(CORRECTION_STATUSES)})", name="status_valid"),
        CheckConstraint(f"outcome IS NULL OR outcome IN ({_sql_list(CORRECTION_OUTCOMES)})", name="outcome_valid"),
        Index(
            "uq_corrections_one_per_person",
            "caption_id",
            "person_id",
            unique=True,
            sqlite_where=text(_NOT_SUPERSEDED),
            postgresql_where=text(_NOT_SUPERSEDED),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    caption_id: Mapped[int] = mapped_column(ForeignKey("captions.id", ondelete="CASCADE"), index=True)
    person_id: Mapped[int] = mapped_column(ForeignKey("people.id", ondelete="CASCADE"), index=True)
    text_raw: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(String(CORRECTION_MAX_LEN))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(
        String(16), default=CorrectionStatus.ACCEPTED.value, server_default=CorrectionStatus.ACCEPTED.value
    )
    flag_reason: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(16))
    trained_model_version: Mapped[str | None] = mapped_column(String(MODEL_NAME_LEN))
    trained_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class PendingCorrectionRow(Base):
    """Which caption a person is correcting right now, kept so a restart keeps the context."""

    __tablename__ = "pending_corrections"

    person_id: Mapped[int] = mapped_column(ForeignKey("people.id", ondelete="CASCADE"), primary_key=True)
    caption_id: Mapped[int] = mapped_column(ForeignKey("captions.id", ondelete="CASCADE"), index=True)
    prompt_chat_id: Mapped[int | None] = mapped_column(BigInteger)
    prompt_message_id: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelVersion(Base):
    """A trained checkpoint and its lineage; at most one row has status 'active'."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(f"status IN ({_sql_list(MODEL_STATUSES)})", name="status_valid"),
        # A partial unique index: the database itself refuses two active models.
        Index(
            "uq_model_versions_one_active",
            "status",
            unique=True,
            sqlite_where=text(_ONLY_ACTIVE),
            postgresql_where=text(_ONLY_ACTIVE),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(MODEL_NAME_LEN), unique=True)
    checkpoint_path: Mapped[str] = mapped_column(String(1024))
    parent: Mapped[str | None] = mapped_column(String(MODEL_NAME_LEN))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.CANDIDATE.value)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Trained (or descends from a model trained) on corrections of a person who later used /forget:
    # never a fine-tune's base again, never promoted or approved again.
    forgotten_data: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ExportFolder(Base):
    """A folder ``python -m storage export`` wrote, and its options, so /forget can rewrite it."""

    __tablename__ = "exports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(1024), unique=True)
    since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    include_upvoted: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class InboxEntry(Base):
    """A photo request as it arrived, kept until it is answered (python-telegram-bot confirms an
    update to Telegram before its handler finishes, so a crash would otherwise lose it)."""

    __tablename__ = "inbox"
    __table_args__ = (UniqueConstraint("chat_id", "message_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    chat_id: Mapped[int] = mapped_column(BigInteger)
    chat_type: Mapped[str] = mapped_column(String(16))
    message_id: Mapped[int] = mapped_column(BigInteger)
    sender_id: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # "photo" or "document"
    file_id: Mapped[str] = mapped_column(String(255))
    file_unique_id: Mapped[str] = mapped_column(String(128))
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    replayed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    answered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
