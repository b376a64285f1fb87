"""Durable storage for captionbot: people, photos, captions, votes, corrections, model versions.

Plain values in and out; no torch, no Telegram. Start with::

    storage = await Storage.open()          # DATABASE_URL / CAPTIONBOT_DATA_DIR, migrates to head
    photo = await storage.record_photo(data, width=w, height=h,
                                       telegram_file_unique_id=uid, sender_telegram_id=user_id)
    ...
    await storage.close()
"""

from storage.errors import CorrectionRejected, ModelVersionError, NotFound, StorageError
from storage.records import (
    CaptionRecord,
    CorrectionRecord,
    DayCount,
    ExportReport,
    ForgetReport,
    ModelVersionRecord,
    PendingCorrection,
    PersonInfo,
    PhotoRecord,
    Stats,
    TrainingExample,
    VoteRecord,
)
from storage.service import Storage

__all__ = [
    "CaptionRecord",
    "CorrectionRecord",
    "CorrectionRejected",
    "DayCount",
    "ExportReport",
    "ForgetReport",
    "ModelVersionError",
    "ModelVersionRecord",
    "NotFound",
    "PendingCorrection",
    "PersonInfo",
    "PhotoRecord",
    "Stats",
    "Storage",
    "StorageError",
    "TrainingExample",
    "VoteRecord",
]
