"""Export people's corrections as a training set in the Flickr8k layout.

The trainer reads ``../shared/data/flickr8k`` with one reader; writing the same
layout (``images/``, ``captions.txt`` as an ``image,caption`` CSV, and
``train.txt`` / ``val.txt``) lets it train on corrections with no new code.
The split is decided by the photo hash, so a photo stays on the same side
across exports and never leaks from train into val.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from storage.records import ExportReport, TrainingExample
from storage.service import Storage

VAL_MODULUS = 10  # about 1 photo in 10 goes to validation
IMAGE_NAME = re.compile(r"^[0-9a-f]{64}\.jpg$")


def image_name(sha256: str) -> str:
    return f"{sha256}.jpg"


def is_validation(sha256: str) -> bool:
    """Deterministic split: the same photo always lands on the same side."""
    return int(sha256[:8], 16) % VAL_MODULUS == 0


def _write_text_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_images(images_dir: Path, keep: set[str]) -> None:
    """Drop images from earlier exports that are no longer exported (e.g. forgotten people's)."""
    for path in images_dir.iterdir():
        if IMAGE_NAME.match(path.name) and path.name not in keep:
            path.unlink()


def write_export(examples: Sequence[TrainingExample], out_dir: Path) -> ExportReport:
    """Write the Flickr layout for ``examples`` into ``out_dir`` (blocking)."""
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    missing = _copy_images(examples, images_dir)
    kept = [ex for ex in examples if ex.sha256 not in missing]
    rows = _unique_rows(kept)
    names = sorted({name for name, _ in rows})
    _remove_stale_images(images_dir, set(names))
    val = [name for name in names if is_validation(name[:64])]
    train = [name for name in names if not is_validation(name[:64])]
    _write_text_atomically(out_dir / "captions.txt", _captions_csv(rows))
    _write_text_atomically(out_dir / "train.txt", "".join(f"{name}\n" for name in train))
    _write_text_atomically(out_dir / "val.txt", "".join(f"{name}\n" for name in val))
    return ExportReport(out_dir, len(names), len(rows), len(train), len(val), len(missing))


async def export_training_data(
    storage: Storage, out_dir: Path, since: datetime | None = None, include_upvoted: bool = False
) -> ExportReport:
    """Export corrections (and optionally up-voted captions) from ``storage`` into ``out_dir``."""
    examples = await storage.corrections_for_training(since=since, include_upvoted=include_upvoted)
    return await asyncio.to_thread(write_export, examples, out_dir.resolve())
