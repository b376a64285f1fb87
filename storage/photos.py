"""Content-addressed photo folder: ``photos/ab/abcdef....jpg``.

A file appears at its final name only complete: bytes go to a temporary file in
the same folder, are fsynced, and are renamed over the final name (atomic on
POSIX), then the folder is fsynced so the rename itself survives a crash. A
killed writer can leave a ``.tmp-*`` file behind, never a half-written photo.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TMP_PREFIX = ".tmp-"
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
            self._write_atomically(target, data)
        return rel

    def exists(self, rel_path: str) -> bool:
        return self.path(rel_path).is_file()

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

    @staticmethod
    def _write_atomically(target: Path, data: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o644)  # mkstemp makes 0600; the trainer may be another user
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: the directory entry must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
