"""The one atomic-write helper: complete files only, old content kept on failure, no debris."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common.atomic import TMP_PREFIX, atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_bytes_and_text_and_creates_the_folder(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a" / "c.txt", "héllo\n")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a" / "c.txt").read_text(encoding="utf-8") == "héllo\n"


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_text(target, "old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert not any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())


def test_mode_is_applied_even_when_the_writer_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "photo.jpg"

    def replace_file(tmp: Path) -> None:
        tmp.unlink()
        tmp.write_bytes(b"new file, umask permissions")

    atomic_write(target, replace_file, mode=0o600)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    atomic_write_bytes(target, b"x", mode=0o644)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o644
