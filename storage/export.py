"""Export people's corrections as a training set in the Flickr8k layout.

The trainer reads ``../shared/data/flickr8k`` with one reader; writing the same
layout (``images/``, ``captions.txt`` as an ``image,caption`` CSV, and
``train.txt`` / ``val.txt``) lets it train on corrections with no new code.
The validation split is the held-out part of ``storage.holdout``, decided by the
photo hash under the data folder's secret salt, with no person correcting more than
a small share of it; ``train finetune --db`` holds out the very same photos. (A
photo moves from val to train only when one of its correctors reached their share.)

Every folder written is recorded in the database (``exports``) with its options, and /forget
writes each one still on disk again (``rewrite_exports``): the database no longer holds the
person's data, so the rewrite drops their captions and the images no one else's refer to.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import re
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from common.atomic import atomic_write, atomic_write_text
from storage.holdout import choose_held_out, load_or_create_salt
from storage.models import ExportFolder, utcnow
from storage.records import ExportFolderRecord, ExportReport, TrainingExample, record_from

if TYPE_CHECKING:  # storage.service imports this module to rewrite exports on /forget
    from storage.service import Storage

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"^[0-9a-f]{64}\.jpg$")


def image_name(sha256: str) -> str:
    return f"{sha256}.jpg"


def _sha256_of(name: str) -> str:
    """The photo hash an image name (``image_name``) was made from."""
    return name.removesuffix(".jpg")


def _captions_csv(rows: Sequence[tuple[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "caption"])
    writer.writerows(rows)
    return buffer.getvalue()


def _unique_rows(examples: Sequence[TrainingExample]) -> list[tuple[str, str]]:
    """(image, caption) pairs without repeats, in example order."""
    seen: set[tuple[str, str]] = set()
    rows = []
    for example in examples:
        row = (image_name(example.sha256), example.text)
        if row not in seen:
            seen.add(row)
            rows.append(row)
    return rows


def _copy_images(examples: Sequence[TrainingExample], images_dir: Path) -> set[str]:
    """Copy each photo once; returns the hashes whose source file was missing."""
    missing: set[str] = set()
    for example in {ex.sha256: ex for ex in examples}.values():
        target = images_dir / image_name(example.sha256)
        if _already_copied(example.path, target):
            continue
        try:
            _copy_atomically(example.path, target)
        except FileNotFoundError:  # the photo file is gone (e.g. forgotten meanwhile)
            missing.add(example.sha256)
    return missing


def _already_copied(source: Path, target: Path) -> bool:
    """Names are content hashes, so an existing target of the right size is the same photo."""
    try:
        return target.stat().st_size == source.stat().st_size
    except FileNotFoundError:
        return False


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy via a temp name so an interrupted export never leaves a truncated image."""

    def copy(tmp: Path) -> None:
        shutil.copyfile(source, tmp)

    atomic_write(target, copy)


def _remove_stale_images(images_dir: Path, keep: set[str]) -> None:
    """Drop images from earlier exports that are no longer exported (e.g. forgotten people's)."""
    for path in images_dir.iterdir():
        if IMAGE_NAME.match(path.name) and path.name not in keep:
            path.unlink()


def write_export(examples: Sequence[TrainingExample], out_dir: Path, salt: bytes) -> ExportReport:
    """Write the Flickr layout for ``examples`` into ``out_dir`` (blocking); ``salt`` picks the held-out photos."""
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    missing = _copy_images(examples, images_dir)
    kept = [ex for ex in examples if ex.sha256 not in missing]
    rows = _unique_rows(kept)
    names = sorted({name for name, _ in rows})
    _remove_stale_images(images_dir, set(names))
    held = choose_held_out(photo_contributors(kept), salt)
    val = [name for name in names if _sha256_of(name) in held]
    train = [name for name in names if _sha256_of(name) not in held]
    atomic_write_text(out_dir / "captions.txt", _captions_csv(rows))
    atomic_write_text(out_dir / "train.txt", "".join(f"{name}\n" for name in train))
    atomic_write_text(out_dir / "val.txt", "".join(f"{name}\n" for name in val))
    return ExportReport(out_dir, len(names), len(rows), len(train), len(val), len(missing))


async def export_training_data(
    storage: Storage, out_dir: Path, since: datetime | None = None, include_upvoted: bool = False
) -> ExportReport:
    """Export corrections (and optionally up-voted captions) from ``storage`` into ``out_dir``, and
    record the folder so that /forget rewrites it."""
    out_dir = out_dir.resolve()
    async with storage.export_lock:
        # Recorded first: a /forget that commits while this export is being written rewrites the folder after it.
        await storage.record_export(str(out_dir), since, include_upvoted)
        return await _write_from_database(storage, out_dir, since, include_upvoted)


async def _write_from_database(storage: Storage, out_dir: Path, since: datetime | None,
                               include_upvoted: bool) -> ExportReport:
    examples = await storage.corrections_for_training(since=since, include_upvoted=include_upvoted)
    salt = await asyncio.to_thread(load_or_create_salt, storage.data_dir)
    return await asyncio.to_thread(write_export, examples, out_dir, salt)


async def rewrite_exports(storage: Storage) -> tuple[int, list[str]]:
    """Write every recorded export folder that still exists again, with its recorded options.

    Returns how many were rewritten and the folders that failed (each logged as an error: the
    database no longer holds the person's data, but that folder still may, and only its operator
    can fix the cause). A folder that is gone is skipped: nothing of anyone is left in it.
    """
    rewritten, failed = 0, []
    async with storage.export_lock:
        for folder in await storage.known_exports():
            path = Path(folder.path)
            if not await asyncio.to_thread(path.is_dir):
                continue
            try:
                await _write_from_database(storage, path, folder.since, folder.include_upvoted)
            except OSError as exc:
                log.error("could not rewrite export folder %s after /forget: %s", path, exc)
                failed.append(folder.path)
            else:
                rewritten += 1
    return rewritten, failed


# ---------------------------------------------------------------------- the registry of export folders


async def record_export(session: AsyncSession, path: str, since: datetime | None, include_upvoted: bool) -> None:
    """Remember an export folder and the options it was (last) written with."""
    row = await session.scalar(select(ExportFolder).where(ExportFolder.path == path))
    if row is None:
        session.add(ExportFolder(path=path, since=since, include_upvoted=include_upvoted, created_at=utcnow()))
    else:
        row.since, row.include_upvoted = since, include_upvoted
    await session.flush()


async def known_exports(session: AsyncSession) -> list[ExportFolderRecord]:
    """Every export folder ever written, oldest first."""
    rows = await session.scalars(select(ExportFolder).order_by(ExportFolder.id))
    return [record_from(ExportFolderRecord, row) for row in rows]


def photo_contributors(examples: Sequence[TrainingExample]) -> dict[str, set[int]]:
    """Each photo's content hash and the people whose captions of it are in ``examples``."""
    contributors: dict[str, set[int]] = {}
    for example in examples:
        people = contributors.setdefault(example.sha256, set())
        if example.person_id is not None:
            people.add(example.person_id)
    return contributors
