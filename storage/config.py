"""Where storage keeps its data, from the values its caller passes.

Storage reads no environment variables: each process (the bot, the trainer, ``python -m storage``)
reads ``DATABASE_URL`` and ``CAPTIONBOT_DATA_DIR`` through ``common.settings`` and passes them here,
so one pair of settings points every process at the same database and photo folder.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA_DIR = "./data"
DB_FILENAME = "captionbot.db"


def data_dir(explicit: Path | str | None = None) -> Path:
    """The data directory as an absolute path.

    Made absolute at once so that a later ``chdir`` cannot move the database.
    """
    return Path(explicit if explicit is not None else DEFAULT_DATA_DIR).expanduser().resolve()


def default_database_url(directory: Path) -> str:
    """The SQLite URL used when no database URL is given."""
    return f"sqlite+aiosqlite:///{(directory / DB_FILENAME).as_posix()}"


def database_url(explicit: str | None = None, directory: Path | str | None = None) -> str:
    """The database URL: the one given, else SQLite in the data folder."""
    return explicit or default_database_url(data_dir(directory))


def photos_dir(directory: Path) -> Path:
    """The content-addressed photo folder inside the data directory."""
    return directory / "photos"


BLOCKLIST_FILENAME = "blocklist.txt"


def blocklist_file(explicit: Path | None, directory: Path | str | None = None) -> Path:
    """The operator's blocklist file: the one given, else ``blocklist.txt`` in the data folder."""
    return explicit if explicit is not None else data_dir(directory) / BLOCKLIST_FILENAME
