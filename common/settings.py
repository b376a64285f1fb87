"""The process-level settings of every captionbot process, read from environment variables and a
``.env`` file (variables already set in the environment win over the file).

Each field names its variable once (``validation_alias``); ``.env.example`` documents every one of
them, and ``tests/test_settings.py`` keeps the two in step. An empty value means the default.

The caption service's tuning (batch size and wait, queue capacity and seconds, request timeout,
worker threads, beam size, precision) and the image checks' pixel limit default to None here: None means "the
caption service's own default", which lives in ``captioner.serving.config.ServiceConfig``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MB = 1024 * 1024
TELEGRAM_API_URL = "https://api.telegram.org/bot"
TELEGRAM_FILE_URL = "https://api.telegram.org/file/bot"
BOT_API_DOWNLOAD_LIMIT = 20 * MB  # getFile refuses bigger files (cloud Bot API)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A missing or malformed setting; ``str()`` names the variable and what is wrong."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_ignore_empty=True,  # VAR= means "the default", as .env.example promises
        extra="ignore",  # a .env file may hold other programs' variables too
        frozen=True,
        validate_by_name=True,  # Settings(photos_per_minute=...) in code and tests
        str_strip_whitespace=True,
        protected_namespaces=(),  # fields called model and model_poll_seconds
    )

    # Telegram
    token: SecretStr | None = Field(None, validation_alias="TELEGRAM_BOT_TOKEN")  # the bot requires it
    base_url: str = Field(TELEGRAM_API_URL, validation_alias="TELEGRAM_BASE_URL")
    base_file_url: str = Field(TELEGRAM_FILE_URL, validation_alias="TELEGRAM_BASE_FILE_URL")
    # a local Bot API server: no 20 MB download limit, file paths on disk
    local_mode: bool = Field(False, validation_alias="TELEGRAM_LOCAL_MODE")
    # storage (None: storage's own default, SQLite in ./data)
    database_url: str | None = Field(None, validation_alias="DATABASE_URL")
    data_dir: Path | None = Field(None, validation_alias="CAPTIONBOT_DATA_DIR")
    # model and caption service (None: the caption service's own default)
    model: str | None = Field(None, validation_alias="CAPTIONBOT_MODEL")  # None = the bundled model
    device: str | None = Field(None, validation_alias="CAPTIONBOT_DEVICE")
    worker_threads: int | None = Field(None, gt=0, validation_alias="CAPTIONBOT_WORKER_THREADS")
    beam_size: int | None = Field(None, gt=0, validation_alias="CAPTIONBOT_BEAM_SIZE")
    batch_size: int | None = Field(None, gt=0, validation_alias="CAPTIONBOT_BATCH_SIZE")
    batch_wait_ms: float | None = Field(None, ge=0, validation_alias="CAPTIONBOT_BATCH_WAIT_MS")
    queue_capacity: int | None = Field(None, gt=0, validation_alias="CAPTIONBOT_QUEUE_CAPACITY")
    max_queue_seconds: float | None = Field(None, gt=0, validation_alias="CAPTIONBOT_MAX_QUEUE_SECONDS")
    # float32, or autocast to bfloat16 / float16 on CUDA (refused on CPU)
    precision: Literal["float32", "bfloat16", "float16"] | None = Field(None, validation_alias="CAPTIONBOT_PRECISION")
    request_timeout: float | None = Field(None, gt=0, validation_alias="CAPTIONBOT_REQUEST_TIMEOUT")
    # 0 = never switch to a newly promoted model by itself
    # where photos are captioned: a worker process here, or a Ray Serve deployment (one or many machines)
    service: Literal["process", "ray"] = Field("process", validation_alias="CAPTIONBOT_SERVICE")
    ray_address: str = Field("auto", min_length=1, validation_alias="CAPTIONBOT_RAY_ADDRESS")
    ray_app: str = Field("captionbot", pattern=r"^[A-Za-z0-9_.-]{1,64}$", validation_alias="CAPTIONBOT_RAY_APP")
    model_poll_seconds: float = Field(60.0, ge=0, validation_alias="CAPTIONBOT_MODEL_POLL_SECONDS")
    # people and limits
    admin_ids: Annotated[frozenset[int], NoDecode] = Field(frozenset(), validation_alias="CAPTIONBOT_ADMIN_IDS")
    photos_per_minute: int = Field(6, ge=0, validation_alias="CAPTIONBOT_PHOTOS_PER_MINUTE")  # 0 = no limit
    # button presses, commands and texts one person may send per minute (0 = no limit)
    actions_per_minute: int = Field(30, ge=0, validation_alias="CAPTIONBOT_ACTIONS_PER_MINUTE")
    # photos of one person downloaded, queued or captioned at once; the rest of an album waits
    photos_in_flight: int = Field(2, gt=0, validation_alias="CAPTIONBOT_PHOTOS_IN_FLIGHT")
    max_file_mb: float = Field(BOT_API_DOWNLOAD_LIMIT / MB, gt=0, validation_alias="CAPTIONBOT_MAX_FILE_MB")
    max_megapixels: float | None = Field(None, gt=0, validation_alias="CAPTIONBOT_MAX_MEGAPIXELS")
    # tell people their queue position when this many are waiting; 0 = never
    queue_notice_at: int = Field(3, ge=0, validation_alias="CAPTIONBOT_QUEUE_NOTICE_AT")
    concurrent_updates: int = Field(64, gt=0, validation_alias="CAPTIONBOT_CONCURRENT_UPDATES")
    # stored photos: retention, per-person quota, and the free disk below which nothing is stored
    photo_retention_days: float = Field(30.0, gt=0, validation_alias="CAPTIONBOT_PHOTO_RETENTION_DAYS")
    trained_photo_retention_days: float = Field(
        365.0, gt=0, validation_alias="CAPTIONBOT_TRAINED_PHOTO_RETENTION_DAYS")
    photo_quota_mb: float = Field(50.0, gt=0, validation_alias="CAPTIONBOT_PHOTO_QUOTA_MB")
    min_free_disk_mb: float = Field(2048.0, ge=0, validation_alias="CAPTIONBOT_MIN_FREE_DISK_MB")
    log_level: str = Field("INFO", validation_alias="CAPTIONBOT_LOG_LEVEL")
    # trusted learning: what a correction meets on the way in, and who decides what the model learns
    corrections_per_day: int = Field(20, ge=0, validation_alias="CAPTIONBOT_CORRECTIONS_PER_DAY")  # 0 = no cap
    flags_before_hold: int = Field(3, ge=0, validation_alias="CAPTIONBOT_FLAGS_BEFORE_HOLD")  # 0 = never hold
    # None = blocklist.txt in the data folder
    blocklist_file: Path | None = Field(None, validation_alias="CAPTIONBOT_BLOCKLIST_FILE")
    promotion: Literal["review", "auto"] = Field("review", validation_alias="CAPTIONBOT_PROMOTION")
    # operations: Prometheus /metrics and /healthz on one port; None = off, 0 = a free port the OS picks
    metrics_port: int | None = Field(None, ge=0, le=65535, validation_alias="CAPTIONBOT_METRICS_PORT")
    metrics_host: str = Field("127.0.0.1", min_length=1, validation_alias="CAPTIONBOT_METRICS_HOST")

    @field_validator("token", mode="before")
    @classmethod
    def _token_shape(cls, value: Any) -> Any:
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str):
            return value
        text = text.strip()
        if not text:
            return None
        if any(ch.isspace() for ch in text) or ":" not in text:
            raise ValueError("does not look like a bot token (expected something like 123456:ABC-DEF...)")
        return text

    @field_validator("base_url", "base_file_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @field_validator("data_dir", "blocklist_file")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str) -> str:
        if value != "auto" and not value.startswith(("ray://", "ray+")) and ":" not in value:
            raise ValueError("expected auto, ray://HOST:10001 or HOST:6379")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str | None) -> str | None:
        if value is None:
            return None
        lowered = value.lower()
        if lowered not in ("auto", "cpu", "cuda") and not lowered.startswith("cuda:"):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return lowered

    @field_validator("batch_wait_ms", "max_queue_seconds", "request_timeout", "model_poll_seconds", "max_file_mb",
                     "max_megapixels", "photo_retention_days", "trained_photo_retention_days",
                     "photo_quota_mb", "min_free_disk_mb")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("expected a finite number")
        return value

    @field_validator("admin_ids", mode="before")
    @classmethod
    def _id_list(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        ids = set()
        for part in value.replace(";", ",").split(","):
            part = part.strip()
            if not part:
                continue
            if not part.isdigit():
                raise ValueError(f"{part!r} is not a numeric Telegram user id")
            ids.add(int(part))
        return frozenset(ids)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in LOG_LEVELS:
            raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
        return upper

    @property
    def photo_quota_bytes(self) -> int:
        return int(self.photo_quota_mb * MB)

    @property
    def min_free_disk_bytes(self) -> int:
        return int(self.min_free_disk_mb * MB)

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * MB)

    @property
    def max_pixels(self) -> int | None:
        return None if self.max_megapixels is None else int(self.max_megapixels * 1_000_000)

    @property
    def download_limit(self) -> int:
        """The largest file the bot will download (the Bot API's limit unless on a local server)."""
        if self.local_mode:
            return self.max_file_bytes
        return min(self.max_file_bytes, BOT_API_DOWNLOAD_LIMIT)

    def is_admin(self, telegram_id: int | None) -> bool:
        return telegram_id is not None and telegram_id in self.admin_ids

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Field name -> the environment variable it is read from."""
        return {name: str(field.validation_alias) for name, field in cls.model_fields.items()}


def load_settings(env_file: str | Path | None = None) -> Settings:
    """The settings from the environment and ``env_file`` (default: the nearest ``.env`` from the
    working directory up, if any); raises ConfigError naming the variable that is wrong."""
    target = _settings_file(env_file)
    try:
        return Settings(_env_file=target)
    except ValidationError as err:
        raise ConfigError(describe(err)) from None


def describe(err: ValidationError) -> str:
    """One line per bad variable: its name, its value (never a secret's) and what is wrong."""
    names = Settings.variables()
    secrets = {variable for name, variable in names.items() if _is_secret(name)}
    lines = []
    for problem in err.errors():
        where = str(problem["loc"][0]) if problem["loc"] else "?"
        variable = names.get(where, where)  # a field name when built in code, else the variable
        message = str(problem["msg"]).removeprefix("Value error, ")
        value = problem.get("input")
        if variable in secrets or not isinstance(value, str | int | float):
            lines.append(f"{variable} {message}")
        else:
            lines.append(f"{variable}={value!r} is not valid: {message}")
    return "; ".join(lines)


def _is_secret(field_name: str) -> bool:
    return "SecretStr" in str(Settings.model_fields[field_name].annotation)


def _settings_file(env_file: str | Path | None) -> Path | None:
    if env_file is not None:
        path = Path(env_file)
        if not path.is_file():
            raise ConfigError(f"the settings file {path} does not exist")
        return path
    from dotenv import find_dotenv

    found = find_dotenv(usecwd=True)
    return Path(found) if found else None

