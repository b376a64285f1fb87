"""Logging for operators: one line per event, and never the bot token.

The HTTP client (httpx) logs every request URL at INFO, and Bot API URLs contain the token, so
its loggers are raised to WARNING; on top of that every handler formats through
:class:`RedactingFormatter`, which masks the token wherever it appears (messages, arguments,
tracebacks of network errors).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

NOISY_LOGGERS = (
    "httpx", "httpcore", "telegram.request", "telegram._bot", "telegram.ext.ExtBot", "aiosqlite", "alembic",
)
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
MASK = "<token>"


class RedactingFormatter(logging.Formatter):
    """Formats as usual, then replaces each secret (and its token id's secret half) with a mask."""

    def __init__(self, secrets: Iterable[str], fmt: str = FORMAT, datefmt: str | None = None) -> None:
        super().__init__(fmt, datefmt)
        self.secrets = sorted(_variants(secrets), key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record), self.secrets)


def _variants(secrets: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for secret in secrets:
        if not secret:
            continue
        found.add(secret)
        # The part after "123:" is the actual secret; it may show up on its own or URL-encoded.
        _, _, tail = secret.partition(":")
        if len(tail) >= 8:
            found.add(tail)
        found.add(secret.replace(":", "%3A"))
    return found


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, MASK)
    return text


def configure_logging(level: str, secrets: Iterable[str]) -> None:
    """Root logging to stderr through the redacting formatter; quiet the HTTP loggers."""
    formatter = RedactingFormatter(secrets)
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:
        handler.setFormatter(formatter)
    root.setLevel(level)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.captureWarnings(True)

