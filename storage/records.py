"""Plain, immutable results returned by ``Storage``.

Callers never see ORM objects: these dataclasses are safe to keep after the
session closes, to pass between tasks, and to log.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import date, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "CaptionRecord",
    "CorrectionOutcome",
    "CorrectionRecord",
    "CorrectionStatus",
    "DayCount",
    "ExportFolderRecord",
    "ExportReport",
    "FlagReason",
    "ForgetReport",
    "InboxItem",
    "ModelStatus",
    "ModelVersionRecord",
    "PendingCorrection",
    "PersonInfo",
    "PhotoRecord",
    "Stats",
    "TrainingExample",
    "TrainingKind",
    "VoteRecord",
]

TrainingKind = Literal["correction", "upvoted"]
RecordT = TypeVar("RecordT", bound="DataclassInstance")


def record_from(record_type: type[RecordT], row: object, **given: Any) -> RecordT:
    """A ``record_type`` whose fields are ``given``, or else read from the same-named attributes of ``row``.

    The one way an ORM row becomes a record: a field is added in one place (the record) and
    filled from the column of the same name, or named in ``given`` by the aggregate's mapper.
    """
    names = [f.name for f in fields(record_type)]
    unknown = given.keys() - set(names)
    if unknown:
        raise TypeError(f"{record_type.__name__} has no fields {sorted(unknown)}")
    return record_type(**{name: given[name] if name in given else getattr(row, name) for name in names})


class ModelStatus(StrEnum):
    """Where a model version stands; the database's CHECK constraint is built from this list."""

    CANDIDATE = "candidate"  # trained, not yet judged
    ACTIVE = "active"  # the one the bot serves (at most one)
    REJECTED = "rejected"  # judged worse than its parent; never promoted
    RETIRED = "retired"  # was active, replaced by a newer one
    AWAITING_REVIEW = "awaiting_review"  # passed the gate, adds words: waits for an operator's approval


class CorrectionStatus(StrEnum):
    """What screening at entry decided; only ``accepted`` corrections are ever trained on."""

    ACCEPTED = "accepted"
    FLAGGED = "flagged"  # screening found abuse, spam or contact details: kept for review, never trained on
    HELD_FOR_REVIEW = "held_for_review"  # clean, but from a person whose corrections keep being flagged
    SUPERSEDED = "superseded"  # an older duplicate kept by migration 0002; the app never writes it


class FlagReason(StrEnum):
    """Why screening flagged a correction."""

    URL = "url"
    MENTION = "mention"
    EMAIL = "email"
    PHONE = "phone"
    PROFANITY = "profanity"
    BLOCKLIST = "blocklist"


class CorrectionOutcome(StrEnum):
    """What the fine-tune that looked at a correction did with it, so it is never retried."""

    TRAINED = "trained"  # used by a run whose candidate was activated (or awaits review)
    REJECTED_RUN = "rejected_run"  # used by a run whose candidate the gate (or an operator) rejected
    FLAGGED = "flagged"  # left out by the run's screening (words the blocklist gained since entry)


@dataclass(frozen=True, slots=True)
class PersonInfo:
    """Someone who talked to the bot."""

    id: int
    telegram_id: int
    language_code: str | None
    first_seen_at: datetime
    last_seen_at: datetime
    prior_flags: int  # flagged corrections they had when they last used /forget
    created: bool


@dataclass(frozen=True, slots=True)
class PhotoRecord:
    """A stored photo (its bytes live in the photo folder under ``rel_path``)."""

    id: int
    sha256: str
    rel_path: str
    size_bytes: int
    width: int
    height: int
    telegram_file_unique_id: str | None
    created_at: datetime
    created: bool  # False when the same bytes were already stored


@dataclass(frozen=True, slots=True)
class CaptionRecord:
    """A caption the model gave a photo, where it was posted, and its votes."""

    id: int
    photo_id: int
    photo_sha256: str
    photo_rel_path: str
    model_version: str
    text: str
    score: float
    beam_size: int
    latency_ms: float
    requester_telegram_id: int
    chat_id: int | None
    message_id: int | None
    created_at: datetime
    votes_up: int = 0
    votes_down: int = 0


@dataclass(frozen=True, slots=True)
class VoteRecord:
    """A person's vote on a caption, with the caption's totals after it."""

    caption_id: int
    telegram_id: int
    up: bool
    changed: bool  # False when the same vote was already recorded
    votes_up: int  # totals on the caption after this vote
    votes_down: int


@dataclass(frozen=True, slots=True)
class PendingCorrection:
    """The caption a person is correcting now, and the prompt message that asked them."""

    telegram_id: int
    caption_id: int
    caption_text: str
    prompt_chat_id: int | None
    prompt_message_id: int | None
    started_at: datetime


@dataclass(frozen=True, slots=True)
class CorrectionRecord:
    """A stored correction: the cleaned ``text`` and what the person typed (``text_raw``).

    ``trained_model_version`` names the fine-tune that looked at it and ``outcome`` says what
    that run did with it; both are None until a run looks at it.
    """

    id: int
    caption_id: int
    telegram_id: int
    text: str
    text_raw: str
    created_at: datetime
    trained_model_version: str | None
    status: CorrectionStatus = CorrectionStatus.ACCEPTED
    flag_reason: FlagReason | None = None
    outcome: CorrectionOutcome | None = None
    replaced: bool = False  # True when it replaced the person's earlier correction of this caption


@dataclass(frozen=True, slots=True)
class DayCount:
    """Captions made on one UTC day."""

    day: date
    captions: int


@dataclass(frozen=True, slots=True)
class Stats:
    """Counts for the operator."""

    captions_per_day: tuple[DayCount, ...]  # oldest first, UTC days, zero days included
    captions: int
    photos: int
    people: int  # not forgotten
    votes_up: int
    votes_down: int
    corrections: int
    corrections_untrained: int
    active_model: str | None


@dataclass(frozen=True, slots=True)
class ModelVersionRecord:
    """A trained checkpoint, its parent, its metrics and its status."""

    id: int
    name: str
    checkpoint_path: str
    parent: str | None
    metrics: dict[str, Any] = field(hash=False, compare=True)
    status: ModelStatus = ModelStatus.CANDIDATE
    reason: str | None = None
    created_at: datetime | None = None
    promoted_at: datetime | None = None
    forgotten_data: bool = False  # learned from a forgotten person's corrections (or descends from one that did)

    @property
    def is_active(self) -> bool:
        return self.status == ModelStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class ExportFolderRecord:
    """A folder ``python -m storage export`` wrote, with the options to write it again."""

    path: str
    since: datetime | None
    include_upvoted: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class TrainingExample:
    """One (photo, caption) pair to train on: a correction, or a caption voted up."""

    kind: TrainingKind
    source_id: int  # correction id for "correction", caption id for "upvoted"
    caption_id: int
    photo_id: int
    sha256: str
    rel_path: str
    path: Path
    text: str
    created_at: datetime
    trained_model_version: str | None = None
    person_id: int | None = None  # who wrote it (the requester, for an up-voted caption): caps count per person


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What ``storage export`` wrote."""

    out_dir: Path
    images: int
    captions: int
    train: int
    val: int
    missing_files: int


@dataclass(frozen=True, slots=True)
class ForgetReport:
    """What forgetting a person deleted (rows per table, photo files)."""

    telegram_id: int
    found: bool
    votes: int = 0
    corrections: int = 0
    captions: int = 0
    photos: int = 0
    files_deleted: int = 0
    pending: int = 0
    models_marked: int = 0  # model versions that learned from their corrections, and their descendants
    exports_rewritten: int = 0  # export folders written again without their data
    exports_failed: tuple[str, ...] = ()  # export folders that could not be rewritten (logged as errors)


@dataclass(frozen=True, slots=True)
class InboxItem:
    """A photo request as it arrived: enough to download and answer it again after a crash."""

    chat_id: int
    chat_type: str
    message_id: int
    sender_id: int
    kind: str  # "photo" or "document"
    file_id: str
    file_unique_id: str
    file_size: int | None
