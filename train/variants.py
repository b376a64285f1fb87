"""A dataset written again with one new photo beside each photo of a split (mirrored, cropped...).

Shared by ``python -m train mirror`` and ``python -m train crop``: the photos of every split are
linked (nothing is copied), each photo of the chosen split gets one variant, written beside it as
``PREFIXNAME`` in the format its name says, and the result is a Flickr-layout dataset that
``python -m train fit --data flickr:OUT`` reads. Features are cached per file, so a variant's are
computed once, like any photo's. Writing is resumable: variants already written are kept (each is
written whole, atomically, or not at all).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from common.atomic import atomic_write_bytes

from .data import ImageRecord, link_image, load_dataset, write_flickr

log = logging.getLogger(__name__)

JPEG_QUALITY = 95


@dataclass(frozen=True)
class Variant:
    """How one photo's variant is made: its file name's prefix, its pixels and its captions."""

    name: str  # what the log says: "mirrored", "cropped"
    prefix: str  # "mirror_": a/b.jpg -> a/mirror_b.jpg
    photo: Callable[[Image.Image, int], Image.Image]  # (upright RGB photo, its index in the split) -> variant
    caption: Callable[[str], str] = lambda caption: caption


def variant_id(image_id: str, prefix: str) -> str:
    """``a/b.jpg`` -> ``a/PREFIXb.jpg``: beside the original, in the same folder."""
    parent, _, name = image_id.rpartition("/")
    return f"{parent}/{prefix}{name}" if parent else f"{prefix}{name}"


def encoded_variant(path: Path, variant: Variant, index: int) -> bytes:
    """``variant`` of the photo at ``path``, upright as the captioner reads it (EXIF orientation
    applied), encoded in the format its file name says (JPEG when the name says nothing Pillow knows)."""
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    fmt = Image.registered_extensions().get(path.suffix.lower(), "JPEG")
    out = io.BytesIO()
    variant.photo(upright, index).save(out, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_with_variants(spec: str, out: Path, variant: Variant, splits: Sequence[str] = ("train", "val"),
                        split: str = "train") -> dict[str, int]:
    """Write ``spec``'s ``splits`` to ``out`` in the Flickr layout, ``split`` doubled with ``variant``'s
    photos. Returns the number of images per split written."""
    if split not in splits:
        raise ValueError(f"the split to add photos to ({split}) must be one of the splits written")
    dataset = load_dataset(spec, tuple(splits))
    already = [r.image_id for r in dataset.split(split) if Path(r.image_id).name.startswith(variant.prefix)]
    if already:
        raise ValueError(f"{spec} already has {variant.name} photos ({already[0]}, ...): "
                         f"write from the dataset they were made from")
    images = out / "images"
    written: dict[str, list[ImageRecord]] = {}
    for name in splits:
        records = dataset.split(name)
        for record in records:
            link_image(record.path, images / record.image_id)
        written[name] = [*records, *(_write_variants(records, images, variant) if name == split else [])]
    write_flickr(out, written)
    return {name: len(records) for name, records in written.items()}


def _write_variants(records: Sequence[ImageRecord], images: Path, variant: Variant) -> list[ImageRecord]:
    made = []
    for n, record in enumerate(records):
        name = variant_id(record.image_id, variant.prefix)
        target = images / name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, encoded_variant(record.path, variant, n))
        made.append(ImageRecord(name, target, tuple(variant.caption(c) for c in record.captions)))
        if (n + 1) % 1000 == 0:
            log.info("%s %d/%d photos", variant.name, n + 1, len(records))
    return made
