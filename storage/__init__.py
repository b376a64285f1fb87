"""Durable storage for captionbot: people, photos, captions, votes, corrections, model versions.

Plain values in and out; no torch, no Telegram. Start with::

    storage = await Storage.open()          # DATABASE_URL / CAPTIONBOT_DATA_DIR, migrates to head
    photo = await storage.record_photo(data, width=w, height=h,
                                       telegram_file_unique_id=uid, sender_telegram_id=user_id)
    ...
    await storage.close()

``Storage`` (``storage.service``) is a thin front: the work is done by one module per
aggregate (``people``, ``captions``, ``corrections``, ``model_versions``, ``forget``,
``stats``), plain ``async def f(session, ...)`` functions run by ``storage.transactions``.
"""

from storage import records
from storage.errors import CorrectionRejected, ModelVersionError, NotFound, StorageError
from storage.records import *  # noqa: F403 - every record type is public; records.__all__ lists them once
from storage.service import Storage

__all__ = [
    *records.__all__,
    "CorrectionRejected",
    "ModelVersionError",
    "NotFound",
    "Storage",
    "StorageError",
]
