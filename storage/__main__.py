"""Command line: ``python -m storage {upgrade,export,stats,sweep,review}``.

Every command takes ``--database-url`` and ``--data-dir``; without them the
``DATABASE_URL`` and ``CAPTIONBOT_DATA_DIR`` settings apply (environment or ``.env``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common.settings import ConfigError, load_settings
from storage import config
from storage import migrate as migrations
from storage.engine import create_engine, sqlite_file
from storage.export import export_training_data
from storage.service import Storage


def parse_since(value: str) -> datetime:
    """An ISO date or date-time; naive values are taken as UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO date: {value!r}") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m storage", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="SQLAlchemy async URL (default: $DATABASE_URL or SQLite)")
    common.add_argument("--data-dir", type=Path, help="data folder (default: $CAPTIONBOT_DATA_DIR or ./data)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("upgrade", parents=[common], help="migrate the database schema to the latest revision")
    export = sub.add_parser("export", parents=[common], help="write corrections as a Flickr-style dataset")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.add_argument("--since", type=parse_since, help="only data from this ISO date/time on")
    export.add_argument("--include-upvoted", action="store_true", help="also export captions voted up")
    stats = sub.add_parser("stats", parents=[common], help="print counts")
    stats.add_argument("--days", type=int, default=7)
    sweep = sub.add_parser("sweep", parents=[common],
                           help="delete photos past their retention, and photo files no row refers to")
    sweep.add_argument("--older-than-hours", type=float, default=1.0, help="age of unreferenced files to delete")
    sweep.add_argument("--retention-days", type=float,
                       help="photos never corrected (default: $CAPTIONBOT_PHOTO_RETENTION_DAYS)")
    sweep.add_argument("--trained-retention-days", type=float,
                       help="photos trained on (default: $CAPTIONBOT_TRAINED_PHOTO_RETENTION_DAYS)")
    review = sub.add_parser("review", parents=[common],
                            help="list flagged and held corrections; release or delete them")
    review.add_argument("--limit", type=int, default=100, help="how many to list")
    review.add_argument("--release", type=int, nargs="+", metavar="ID",
                        help="make these corrections trainable (an operator found them fine)")
    review.add_argument("--delete", type=int, nargs="+", metavar="ID", help="delete these corrections (junk)")
    return parser


async def _review(args: argparse.Namespace) -> None:
    async with await Storage.open(args.database_url, args.data_dir) as storage:
        if args.release or args.delete:
            released = await storage.release_corrections(args.release or [])
            deleted = await storage.delete_corrections_under_review(args.delete or [])
            print(f"released {released} and deleted {deleted} corrections "
                  "(only flagged or held ones change)")
            return
        waiting = await storage.corrections_under_review(args.limit)
    if not waiting:
        print("no flagged or held corrections")
    for record in waiting:
        why = record.flag_reason.value if record.flag_reason else "person held"
        print(f"{record.id:8d}  {record.status.value:15s}  {why:10s}  {record.created_at:%Y-%m-%d}  "
              f"{record.text_raw!r}")


async def _upgrade(args: argparse.Namespace) -> None:
    directory = config.data_dir(args.data_dir)
    url = config.database_url(args.database_url, directory)
    db_file = sqlite_file(url)
    if db_file is not None:
        db_file.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    try:
        await migrations.upgrade(engine)
        print(f"database at revision {await migrations.current_revision(engine)}")
    finally:
        await engine.dispose()


async def _export(args: argparse.Namespace) -> None:
    async with await Storage.open(args.database_url, args.data_dir) as storage:
        report = await export_training_data(storage, args.out, args.since, args.include_upvoted)
    print(
        f"exported {report.captions} captions of {report.images} images to {report.out_dir} "
        f"(train {report.train}, val {report.val}, missing files {report.missing_files})"
    )


async def _stats(args: argparse.Namespace) -> None:
    async with await Storage.open(args.database_url, args.data_dir) as storage:
        stats = await storage.stats(days=args.days)
    for day in stats.captions_per_day:
        print(f"{day.day.isoformat()}  {day.captions:6d} captions")
    print(f"captions {stats.captions}  photos {stats.photos}  people {stats.people}")
    print(f"votes up {stats.votes_up}  down {stats.votes_down}")
    print(f"corrections {stats.corrections} (untrained {stats.corrections_untrained})")
    print(f"active model {stats.active_model or '-'}")


async def _sweep(args: argparse.Namespace) -> None:
    async with await Storage.open(args.database_url, args.data_dir) as storage:
        expired = await storage.apply_retention(args.retention_days, args.trained_retention_days)
        deleted = await storage.sweep_orphan_files(timedelta(hours=args.older_than_hours))
    print(f"deleted {expired} photos past their retention and {deleted} unreferenced photo files")


COMMANDS = {"upgrade": _upgrade, "export": _export, "stats": _stats, "sweep": _sweep, "review": _review}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.database_url = args.database_url or settings.database_url
    args.data_dir = args.data_dir or settings.data_dir
    if args.command == "sweep":
        args.retention_days = args.retention_days or settings.photo_retention_days
        args.trained_retention_days = args.trained_retention_days or settings.trained_photo_retention_days
    asyncio.run(COMMANDS[args.command](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
