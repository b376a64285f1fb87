"""API keys for the HTTP API, kept in one JSON file of hashes (no database, no secrets at rest).

A key's secret is ``cb_<key id>_<random>``: the id (12 hex digits) says which entry to check, the
random part carries 256 bits from :mod:`secrets`. It is shown once, at creation; the file keeps
only ``sha256(secret)``.

Why a plain SHA-256 and not a keyed hash (HMAC with a server-side pepper): salts and peppers
protect *guessable* secrets (passwords) from dictionary attacks on a stolen hash file. A 256-bit
random secret has no dictionary: inverting its SHA-256 is as hard as guessing the secret itself.
A pepper "stored next to the file" would leak together with it, and would be a second file every
serving machine must carry in sync with the first, so it would add a failure mode and no safety.

Verification is constant-time in the secret: the digest is compared with
:func:`hmac.compare_digest`, and an unknown key id is compared against a dummy digest, so the
time taken does not say whether an id exists.

The file is written atomically (``common.atomic``, mode 0600) under an exclusive lock, so two
``keys create`` commands cannot lose each other's key, and a running server re-reads it when it
changes (inode, size or mtime), so a revocation takes effect without a restart.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text

PREFIX = "cb"
FILE_FORMAT = 1
FILE_MODE = 0o600
_ID_HEX = 12  # 48 bits: ids only need to be unique, not secret
_SECRET_BYTES = 32  # 256 bits
_MAX_SECRET_CHARS = 128  # a real secret is 59 characters; longer input is rejected unread
_SECRET = re.compile(rf"^{PREFIX}_([0-9a-f]{{{_ID_HEX}}})_([A-Za-z0-9_-]{{40,64}})$")
_NAME = re.compile(r"^[\w .@:/+-]{1,64}$")
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()


class ApiKeysError(Exception):
    """The keys file cannot be read or written (corrupt, wrong format), or a bad name or id."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    created: str  # ISO 8601, UTC
    revoked: str | None = None  # when it was revoked, ISO 8601 UTC; None while it is valid

    @property
    def active(self) -> bool:
        return self.revoked is None


@dataclass(frozen=True)
class _Entry:
    key: ApiKey
    digest: str  # hex sha256 of the secret


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ApiKeys:
    """The API keys in ``path`` (created on the first ``create``); safe to use from many threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of what we read
        self._entries: dict[str, _Entry] = {}

    # --- administration (the ``python -m captioner keys`` command) ------------------------

    def create(self, name: str) -> tuple[str, str]:
        """A new key named ``name``: (key id, secret). The secret is not stored and cannot be shown again."""
        if not _NAME.fullmatch(name):
            raise ApiKeysError("a key name is 1-64 letters, digits, spaces or . _ @ : / + -")
        with self._exclusive():
            entries = self._read_file()
            key_id = secrets.token_hex(_ID_HEX // 2)
            while key_id in entries:  # 48 random bits: a clash is astronomically rare, but cheap to rule out
                key_id = secrets.token_hex(_ID_HEX // 2)
            secret = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
            entries[key_id] = _Entry(ApiKey(key_id, name, _now()), _digest(secret))
            self._write_file(entries)
        return key_id, secret

    def revoke(self, key_id: str) -> ApiKey:
        """Mark a key revoked (kept in the file so its id is never reused); raises if unknown."""
        with self._exclusive():
            entries = self._read_file()
            entry = entries.get(key_id)
            if entry is None:
                raise ApiKeysError(f"no key with id {key_id!r}")
            if entry.key.active:
                entries[key_id] = _Entry(ApiKey(**{**asdict(entry.key), "revoked": _now()}), entry.digest)
                self._write_file(entries)
            return entries[key_id].key

    def list(self) -> builtins.list[ApiKey]:
        with self._lock:
            self._refresh()
            return sorted((e.key for e in self._entries.values()), key=lambda k: (k.created, k.key_id))

    # --- serving ---------------------------------------------------------------------------

    def verify(self, secret: str) -> ApiKey | None:
        """The active key whose secret this is, or None (unknown, malformed or revoked)."""
        match = _SECRET.fullmatch(secret) if len(secret) <= _MAX_SECRET_CHARS else None
        with self._lock:
            self._refresh()
            entry = self._entries.get(match.group(1)) if match else None
        expected = entry.digest if entry is not None else _DUMMY_DIGEST
        # Hash and compare even when the id is unknown or the secret malformed: same work either way.
        same = hmac.compare_digest(_digest(secret[:_MAX_SECRET_CHARS]), expected)
        if entry is None or not same or not entry.key.active:
            return None
        return entry.key

    # --- the file --------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Re-read the file if it changed since we last read it (caller holds ``_lock``)."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._entries = None, {}  # no file, no keys: fail closed
            return
        stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
        if stamp != self._stamp:
            self._entries = self._read_file()
            self._stamp = stamp

    def _read_file(self) -> dict[str, _Entry]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(text)
            if data.get("format") != FILE_FORMAT:
                raise ApiKeysError(f"{self.path}: unknown format {data.get('format')!r}")
            return {row["key_id"]: _entry(row) for row in data["keys"]}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ApiKeysError(f"{self.path} is not a valid keys file ({err})") from err

    def _write_file(self, entries: dict[str, _Entry]) -> None:
        rows = [{**asdict(e.key), "sha256": e.digest} for e in entries.values()]
        text = json.dumps({"format": FILE_FORMAT, "keys": rows}, indent=2) + "\n"
        atomic_write_text(self.path, text, mode=FILE_MODE)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise read-modify-write of the file across processes (a lock file next to it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _entry(row: dict[str, Any]) -> _Entry:
    digest = str(row["sha256"])
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"key {row['key_id']!r} has no valid sha256")
    revoked = row.get("revoked")
    key = ApiKey(str(row["key_id"]), str(row["name"]), str(row["created"]),
                 None if revoked is None else str(revoked))
    return _Entry(key, digest)
