"""Settings of the bot, read from environment variables (and a ``.env`` file).

Every variable read here is documented in ``.env.example`` at the repository root; the test
``tests/test_bot_config.py`` keeps the two in step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

TELEGRAM_API_URL = "https://api.telegram.org/bot"
TELEGRAM_FILE_URL = "https://api.telegram.org/file/bot"
BOT_API_DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile refuses bigger files (cloud Bot API)
MB = 1024 * 1024

# Every variable the bot reads, with its default as written in .env.example ("" = unset).
VARIABLES: dict[str, str] = {
    "TELEGRAM_BOT_TOKEN": "",
    "TELEGRAM_BASE_URL": TELEGRAM_API_URL,
    "TELEGRAM_BASE_FILE_URL": TELEGRAM_FILE_URL,
    "TELEGRAM_LOCAL_MODE": "false",
    "DATABASE_URL": "",
    "CAPTIONBOT_DATA_DIR": "./data",
    "CAPTIONBOT_MODEL": "",
    "CAPTIONBOT_DEVICE": "auto",
    "CAPTIONBOT_ADMIN_IDS": "",
    "CAPTIONBOT_PHOTOS_PER_MINUTE": "6",
    "CAPTIONBOT_MAX_FILE_MB": "20",
    "CAPTIONBOT_MAX_MEGAPIXELS": "50",
    "CAPTIONBOT_QUEUE_CAPACITY": "64",
    "CAPTIONBOT_WORKER_THREADS": "",
    "CAPTIONBOT_BATCH_SIZE": "8",
    "CAPTIONBOT_BATCH_WAIT_MS": "25",
    "CAPTIONBOT_REQUEST_TIMEOUT": "60",
    "CAPTIONBOT_BEAM_SIZE": "",
    "CAPTIONBOT_QUEUE_NOTICE_AT": "3",
    "CAPTIONBOT_MODEL_POLL_SECONDS": "60",
    "CAPTIONBOT_CONCURRENT_UPDATES": "64",
    "CAPTIONBOT_LOG_LEVEL": "INFO",
}

T = TypeVar("T")


class ConfigError(ValueError):
    """A missing or malformed setting; ``str()`` names the variable and what is wrong."""


class MissingTokenError(ConfigError):
    pass


@dataclass(frozen=True)
class Settings:
    token: str
    base_url: str = TELEGRAM_API_URL
    base_file_url: str = TELEGRAM_FILE_URL
    local_mode: bool = False  # a local Bot API server (no 20 MB download limit, file paths on disk)
    database_url: str | None = None
    data_dir: Path | None = None
    model: str | None = None  # checkpoint folder; None = the bundled default model
    device: str = "auto"
    admin_ids: frozenset[int] = field(default_factory=frozenset)
    photos_per_minute: int = 6  # per person; 0 = no limit
    max_file_bytes: int = BOT_API_DOWNLOAD_LIMIT
    max_pixels: int = 50_000_000
    worker_threads: int | None = None  # torch threads in the worker; None = torch's default
    queue_capacity: int = 64
    batch_size: int = 8
    batch_wait_seconds: float = 0.025
    request_timeout: float = 60.0
    beam_size: int | None = None  # None = the model's own setting
    queue_notice_at: int = 3  # tell people their queue position when this many are waiting; 0 = never
    model_poll_seconds: float = 60.0  # 0 = never switch to a newly promoted model by itself
    concurrent_updates: int = 64
    log_level: str = "INFO"

    @property
    def download_limit(self) -> int:
        """The largest file the bot will download (the Bot API's limit unless on a local server)."""
        if self.local_mode:
            return self.max_file_bytes
        return min(self.max_file_bytes, BOT_API_DOWNLOAD_LIMIT)

    def is_admin(self, telegram_id: int | None) -> bool:
        return telegram_id is not None and telegram_id in self.admin_ids

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``environ`` (default: ``os.environ``); raises ConfigError naming the variable."""
        env = os.environ if environ is None else environ

        def raw(name: str) -> str:
            return (env.get(name) or "").strip()

        token = raw("TELEGRAM_BOT_TOKEN")
        if not token:
            raise MissingTokenError("TELEGRAM_BOT_TOKEN is not set")
        if any(ch.isspace() for ch in token) or ":" not in token:
            raise ConfigError(
                "TELEGRAM_BOT_TOKEN does not look like a bot token "
                "(expected something like 123456:ABC-DEF...)"
            )
        return cls(
            token=token,
            base_url=_url(raw("TELEGRAM_BASE_URL") or TELEGRAM_API_URL, "TELEGRAM_BASE_URL"),
            base_file_url=_url(raw("TELEGRAM_BASE_FILE_URL") or TELEGRAM_FILE_URL, "TELEGRAM_BASE_FILE_URL"),
            local_mode=_parse(env, "TELEGRAM_LOCAL_MODE", _bool, False),
            database_url=raw("DATABASE_URL") or None,
            data_dir=Path(raw("CAPTIONBOT_DATA_DIR")).expanduser() if raw("CAPTIONBOT_DATA_DIR") else None,
            model=raw("CAPTIONBOT_MODEL") or None,
            device=_parse(env, "CAPTIONBOT_DEVICE", _device, "auto"),
            admin_ids=_parse(env, "CAPTIONBOT_ADMIN_IDS", _id_set, frozenset()),
            photos_per_minute=_parse(env, "CAPTIONBOT_PHOTOS_PER_MINUTE", _non_negative_int, 6),
            max_file_bytes=int(_parse(env, "CAPTIONBOT_MAX_FILE_MB", _positive_float, 20.0) * MB),
            max_pixels=int(_parse(env, "CAPTIONBOT_MAX_MEGAPIXELS", _positive_float, 50.0) * 1_000_000),
            worker_threads=_parse(env, "CAPTIONBOT_WORKER_THREADS", _optional_positive_int, None),
            queue_capacity=_parse(env, "CAPTIONBOT_QUEUE_CAPACITY", _positive_int, 64),
            batch_size=_parse(env, "CAPTIONBOT_BATCH_SIZE", _positive_int, 8),
            batch_wait_seconds=_parse(env, "CAPTIONBOT_BATCH_WAIT_MS", _non_negative_float, 25.0) / 1000,
            request_timeout=_parse(env, "CAPTIONBOT_REQUEST_TIMEOUT", _positive_float, 60.0),
            beam_size=_parse(env, "CAPTIONBOT_BEAM_SIZE", _optional_positive_int, None),
            queue_notice_at=_parse(env, "CAPTIONBOT_QUEUE_NOTICE_AT", _non_negative_int, 3),
            model_poll_seconds=_parse(env, "CAPTIONBOT_MODEL_POLL_SECONDS", _non_negative_float, 60.0),
            concurrent_updates=_parse(env, "CAPTIONBOT_CONCURRENT_UPDATES", _positive_int, 64),
            log_level=_parse(env, "CAPTIONBOT_LOG_LEVEL", _log_level, "INFO"),
        )


def load_dotenv_file(path: str | Path | None = None) -> Path | None:
    """Load ``path`` (default: the nearest ``.env`` from the working directory up) without
    overriding variables already set; returns the file loaded, if any."""
    from dotenv import find_dotenv, load_dotenv

    target = str(path) if path is not None else find_dotenv(usecwd=True)
    if not target:
        return None
    if path is not None and not Path(target).is_file():
        raise ConfigError(f"the settings file {target} does not exist")
    load_dotenv(target, override=False)
    return Path(target)


def _parse(env: Mapping[str, str], name: str, convert: Callable[[str], T], default: T) -> T:
    value = (env.get(name) or "").strip()
    if not value:
        return default
    try:
        return convert(value)
    except ValueError as err:
        raise ConfigError(f"{name}={value!r} is not valid: {err}") from None


def _url(value: str, name: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must start with http:// or https://, got {value!r}")
    return value


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _device(value: str) -> str:
    lowered = value.lower()
    if lowered not in ("auto", "cpu", "cuda") and not lowered.startswith("cuda:"):
        raise ValueError("expected auto, cpu or cuda")
    return lowered


def _id_set(value: str) -> frozenset[int]:
    ids = set()
    for part in value.replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            ids.add(int(part))
        except ValueError:
            raise ValueError(f"{part!r} is not a numeric Telegram user id") from None
    return frozenset(ids)


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("expected a whole number above 0")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("expected a whole number, 0 or more")
    return number


def _optional_positive_int(value: str) -> int | None:
    return _positive_int(value)


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("expected a number above 0")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("expected a number, 0 or more")
    return number


def _log_level(value: str) -> str:
    upper = value.upper()
    if upper not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return upper
