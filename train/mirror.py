"""``python -m train mirror``: a training split doubled with its photos mirrored left to right.

Flickr8k's 6,000 training photos are few for the decoder: on frozen features it overfits them
after two or three epochs. A photo flipped left to right is still a plausible photo with the same
captions, once "left" and "right" are swapped in them, so each training photo is added a second
time, mirrored. The result is written as a Flickr-layout dataset (``captions.txt``, one
``SPLIT.txt`` per split, ``images/``) that ``python -m train fit --data flickr:OUT`` reads:

- the original photos are symbolic links (nothing is copied); the mirrored ones are written beside
  them, named ``mirror_NAME``, in the format their name says (features are cached per file, so
  they are computed once, like any photo's);
- the other splits are kept unchanged, so models are still selected on the same photos;
- every word is seen twice as often, so pass ``--min-freq`` twice fit's default to keep the
  original dataset's vocabulary;
- "left" and "right" are swapped wherever they are words, also where they do not mean a side
  ("the dog left the water"): rare in captions of photos, and harmless to a caption's sense.

Run: python -m train mirror --data flickr:../shared/data/flickr8k --out data/flickr8k-mirror
Writing is resumable: mirrored photos already written are kept.
"""

from __future__ import annotations

import argparse
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from common.atomic import atomic_write_bytes

from .data import ImageRecord, link_image, load_dataset, write_flickr
from .fit import TrainConfig

log = logging.getLogger(__name__)

MIRROR_PREFIX = "mirror_"
JPEG_QUALITY = 95
MIN_FREQ = 2 * TrainConfig().min_freq  # each word is seen twice as often
_SIDES = {"left": "right", "right": "left"}
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_caption(caption: str) -> str:
    """The caption of the mirrored photo: "left" and "right" swapped, keeping their capitals."""
    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = _SIDES[word.lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other
    return _SIDE_WORD.sub(swap, caption)


def mirrored_id(image_id: str) -> str:
    """``a/b.jpg`` -> ``a/mirror_b.jpg``: beside the original, in the same folder."""
    parent, _, name = image_id.rpartition("/")
    return f"{parent}/{MIRROR_PREFIX}{name}" if parent else f"{MIRROR_PREFIX}{name}"


def mirrored_photo(path: Path) -> bytes:
    """The photo flipped left to right, upright as the captioner reads it (EXIF orientation applied),
    encoded in the format its file name says (JPEG when the name says nothing Pillow knows)."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "JPEG")
    out = io.BytesIO()
    ImageOps.mirror(upright).save(out, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_mirrored(spec: str, out: Path, splits: Sequence[str] = ("train", "val"),
                   mirror_split: str = "train") -> dict[str, int]:
    """Write ``spec``'s ``splits`` to ``out`` in the Flickr layout, ``mirror_split`` doubled with
    mirrored photos. Returns the number of images per split written."""
    if mirror_split not in splits:
        raise ValueError(f"the split to mirror ({mirror_split}) must be one of the splits written")
    dataset = load_dataset(spec, tuple(splits))
    already = [r.image_id for r in dataset.split(mirror_split) if Path(r.image_id).name.startswith(MIRROR_PREFIX)]
    if already:
        raise ValueError(f"{spec} already has mirrored photos ({already[0]}, ...): mirror the original dataset")
    images = out / "images"
    written: dict[str, list[ImageRecord]] = {}
    for split in splits:
        records = dataset.split(split)
        for record in records:
            link_image(record.path, images / record.image_id)
        written[split] = [*records, *(_write_mirrors(records, images) if split == mirror_split else [])]
    write_flickr(out, written)
    return {split: len(records) for split, records in written.items()}


def _write_mirrors(records: Sequence[ImageRecord], images: Path) -> list[ImageRecord]:
    mirrored = []
    for n, record in enumerate(records):
        name = mirrored_id(record.image_id)
        target = images / name
        if not target.is_file():  # resumable: a photo is written whole (atomically) or not at all
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, mirrored_photo(record.path))
        mirrored.append(ImageRecord(name, target, tuple(mirror_caption(c) for c in record.captions)))
        if (n + 1) % 1000 == 0:
            log.info("mirrored %d/%d photos", n + 1, len(records))
    return mirrored


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser("mirror", help="write a dataset whose training split is doubled with mirrored photos",
                            description=__doc__, formatter_class=formatter)
    parser.add_argument("--data", required=True, help="the dataset, FORMAT:PATH as for fit")
    parser.add_argument("--out", required=True, type=Path, help="the Flickr-layout folder to write")
    parser.add_argument("--splits", default="train,val", help="splits to write, comma-separated")
    parser.add_argument("--mirror-split", default="train", help="the split doubled with mirrored photos")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    counts = write_mirrored(args.data, args.out, splits, args.mirror_split)
    print(f"wrote {args.out}: " + ", ".join(f"{split} {n} images" for split, n in counts.items())
          + f"; train on it with: python -m train fit --data flickr:{args.out} --min-freq {MIN_FREQ} ...")
    return 0
