"""Content-addressed photo folder: ``photos/ab/abcdef....jpg``.

A file appears at its final name only complete (``common.atomic``): a killed
writer can leave a ``.tmp-*`` file behind, never a half-written photo, and
``remove_stale_temp_files`` sweeps those.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

from common.atomic import TMP_PREFIX, atomic_write_bytes

PHOTO_MODE = 0o600  # people's photos: readable by the bot's own user only (the trainer runs as it)
FOLDER_MODE = 0o700
PHOTO_SUFFIX = ".jpg"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def relative_path(sha256: str) -> str:
    """Relative path (POSIX style, as stored in the database) of a photo with this hash."""
    return f"{sha256[:2]}/{sha256}{PHOTO_SUFFIX}"


class PhotoStore:
    """The photo folder; every method is blocking and meant for ``asyncio.to_thread``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, rel_path: str) -> Path:
        """Absolute path of a stored relative path; refuses paths escaping the folder."""
        candidate = (self.root / rel_path).resolve()
        if not candidate.is_relative_to(self.root.resolve()):
            raise ValueError(f"photo path escapes the photo folder: {rel_path!r}")
        return candidate

    def ensure(self, sha256: str, data: bytes) -> str:
        """Make sure the photo with this hash is on disk, complete; returns its relative path."""
        rel = relative_path(sha256)
        target = self.path(rel)
        if not self._is_complete(target, len(data)):
            target.parent.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
            atomic_write_bytes(target, data, mode=PHOTO_MODE)
        return rel

    def delete(self, rel_path: str) -> bool:
        """Remove a photo file; True if it was there."""
        try:
            self.path(rel_path).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_photos(self) -> Iterator[tuple[str, Path]]:
        """Every stored photo as (relative path, absolute path)."""
        for path in self.root.glob(f"??/*{PHOTO_SUFFIX}"):
            if not path.name.startswith(TMP_PREFIX):
                yield path.relative_to(self.root).as_posix(), path

    def remove_stale_temp_files(self, older_than_s: float) -> int:
        """Delete temp files left by killed writers; young ones may belong to a live writer."""
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.glob(f"??/{TMP_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    @staticmethod
    def _is_complete(target: Path, size: int) -> bool:
        try:
            return target.stat().st_size == size
        except FileNotFoundError:
            return False
