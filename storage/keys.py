"""Secrets kept in the data folder, and the keyed hash of a forgotten person's Telegram id.

Telegram ids are small integers (about ten digits): a plain SHA-256 of one is reversed by trying
them all in minutes. A keyed hash (HMAC-SHA256) under a random key that never leaves the data
folder cannot be reversed or matched without that key, yet lets the bot recognise the same id
when it comes back. The key is its own file, not the held-out salt: an operator may delete the
salt to reshuffle the held-out photos without also losing every forgotten person's record.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

KEY_BYTES = 32
MIN_KEY_BYTES = 16
FORGET_KEY_FILENAME = "forget_key"
# Where ``Storage`` puts the forget key in each session's ``info`` (see ``storage.transactions``):
# ``people.ensure_person`` is reached from many aggregate functions, none of which should carry it.
SESSION_FORGET_KEY = "captionbot.forget_key"
_PERSON_DOMAIN = b"forgotten-person:"  # domain separation: this key hashes nothing else today, nor ever the same way


def load_or_create_key(path: Path) -> bytes:
    """The secret in ``path``, created (random, owner-only file) on first use.

    The key is written to a private temporary file and hard-linked into place: the link either
    creates ``path`` whole or fails because another process got there first, so two first runs
    cannot pick different keys and none can read a file that is still being written.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # created 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(KEY_BYTES) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            os.unlink(temp)
    key = bytes.fromhex(path.read_text().strip())
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path} holds no usable key; delete it to make a new one")
    return key


def load_or_create_forget_key(data_dir: Path) -> bytes:
    return load_or_create_key(data_dir / FORGET_KEY_FILENAME)


def person_hash(key: bytes, telegram_id: int) -> str:
    """The keyed hash a forgotten person is remembered by (64 hex digits)."""
    return hmac.new(key, _PERSON_DOMAIN + str(int(telegram_id)).encode(), hashlib.sha256).hexdigest()


def session_forget_key(session: AsyncSession) -> bytes:
    """The forget key ``Storage`` attached to this session; an error if none was attached."""
    key = session.info.get(SESSION_FORGET_KEY)
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise RuntimeError("this session carries no forget key: open sessions through Storage, or put the key "
                           f"in session.info[{SESSION_FORGET_KEY!r}]")
    return key
