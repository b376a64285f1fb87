"""Where storage keeps its data, resolved from the environment.

The bot, the trainer and the CLI all call these helpers so that one pair of
environment variables (``CAPTIONBOT_DATA_DIR`` and ``DATABASE_URL``) points every
process at the same database and photo folder.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "CAPTIONBOT_DATA_DIR"
DATABASE_URL_ENV = "DATABASE_URL"
DEFAULT_DATA_DIR = "./data"
DB_FILENAME = "captionbot.db"


def data_dir(explicit: Path | str | None = None) -> Path:
    """The data directory as an absolute path.

    Made absolute at once so that a later ``chdir`` cannot move the database.
    """
    raw = explicit if explicit is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(raw).expanduser().resolve()


def default_database_url(directory: Path) -> str:
    """The SQLite URL used when ``DATABASE_URL`` is not set."""
    return f"sqlite+aiosqlite:///{(directory / DB_FILENAME).as_posix()}"


def database_url(explicit: str | None = None, directory: Path | str | None = None) -> str:
    """The database URL: an explicit one, else ``DATABASE_URL``, else SQLite in the data dir."""
    if explicit:
        return explicit
    from_env = os.environ.get(DATABASE_URL_ENV)
    if from_env:
        return from_env
    return default_database_url(data_dir(directory))


def photos_dir(directory: Path) -> Path:
    """The content-addressed photo folder inside the data directory."""
    return directory / "photos"
