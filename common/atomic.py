"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

The data goes to a temporary file in the target's folder (same file system, so the rename is
atomic on POSIX), the file is fsynced, renamed over the target, and the folder is fsynced so
that the rename itself survives a power cut. A killed writer leaves at most a ``.tmp-*`` file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"
DEFAULT_MODE = 0o644


def atomic_write(target: str | Path, write: Callable[[Path], object], mode: int = DEFAULT_MODE) -> None:
    """Call ``write(tmp_path)`` to produce the file, then move it over ``target`` atomically.

    ``write`` gets a path rather than a handle because some writers (safetensors, numpy) only take
    paths; it may replace the file at that path.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp makes 0600, and the writer may have made a new file
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(target: str | Path, data: bytes, mode: int = DEFAULT_MODE) -> None:
    atomic_write(target, lambda tmp: tmp.write_bytes(data), mode)


def atomic_write_text(target: str | Path, text: str, mode: int = DEFAULT_MODE) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""), mode)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(directory: str | Path) -> None:
    """Persist a rename: the folder's entry must reach the disk too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
