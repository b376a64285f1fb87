"""A dataset written again with one new photo beside each photo of a split (mirrored, cropped...).

Shared by ``python -m train mirror`` and ``python -m train crop``: the photos of every split are
linked (nothing is copied), each photo of the chosen split gets one variant, written beside it as
``PREFIXNAME`` in the format its name says, and the result is a Flickr-layout dataset that
``python -m train fit --data flickr:OUT`` reads. Features are cached per file, so a variant's are
computed once, like any photo's. Writing is resumable: variants already written are kept (each is
written whole, atomically, or not at all), and ``OUT/variants.json`` records what made them (the
source, the variant and its settings), so a write with other settings into the same folder is
refused instead of mixing two kinds of photos.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from common.atomic import atomic_write_bytes, atomic_write_text

from .data import ImageRecord, load_to_rewrite, parse_spec, write_linked

log = logging.getLogger(__name__)

JPEG_QUALITY = 95
MANIFEST = "variants.json"
MAX_LINEAGE = 32  # datasets written from datasets: a bound, in case a folder was written from itself


@dataclass(frozen=True)
class Variant:
    """How one photo's variant is made: its file name's prefix, its pixels and its captions."""

    name: str  # what the log says: "mirrored", "cropped"
    prefix: str  # "mirror_": a/b.jpg -> a/mirror_b.jpg
    photo: Callable[[Image.Image, int], Image.Image]  # (upright RGB photo, its index in the split) -> variant
    caption: Callable[[str], str] = lambda caption: caption
    settings: Mapping[str, Any] = field(default_factory=dict)  # what else decides its photos (seed...)


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
    dataset = load_to_rewrite(spec, splits, split, "to add photos to")
    already = [r.image_id for r in dataset.split(split) if Path(r.image_id).name.startswith(variant.prefix)]
    if already:
        raise ValueError(f"{spec} already has photos named {variant.prefix}* ({already[0]}, ...): write "
                         f"from the dataset they were made from, or choose another prefix")
    manifest = {"source": spec, "split": split, "variant": variant.name, "prefix": variant.prefix,
                "settings": dict(variant.settings)}
    _check_manifest(out, manifest)

    def with_variants(records: list[ImageRecord]) -> list[ImageRecord]:
        # recorded once the photos are linked (the source folder is refused), before any variant is written
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        return [*records, *_write_variants(records, out / "images", variant)]

    return write_linked(dataset, out, splits, {split: with_variants})


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


def made_from(spec: str) -> list[dict[str, Any]]:
    """The manifests of ``spec`` and of the datasets it was written from, nearest first (a dataset this
    module did not write, or not in the Flickr layout, ends the chain)."""
    chain: list[dict[str, Any]] = []
    while len(chain) < MAX_LINEAGE:
        fmt, path, _ = parse_spec(spec)
        file = path / MANIFEST
        if fmt != "flickr" or not file.is_file():
            break
        chain.append(json.loads(file.read_text(encoding="utf-8")))
        spec = str(chain[-1]["source"])
    return chain


def _check_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Refuse a folder whose variants were written with other settings (or from another source)."""
    path = out / MANIFEST
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8"))
        if recorded != manifest:
            raise ValueError(f"{out} holds photos written with {recorded}, not {manifest}: write to a new folder")


def add_variant_arguments(parser: argparse.ArgumentParser, split_option: str, what: str) -> None:
    """The options every dataset-with-variants command takes (``split_option``: its split's flag)."""
    parser.add_argument("--data", required=True, help="the dataset, FORMAT:PATH as for fit")
    parser.add_argument("--out", required=True, type=Path, help="the Flickr-layout folder to write")
    parser.add_argument("--splits", default="train,val", help="splits to write, comma-separated")
    parser.add_argument(split_option, default="train", help=f"the split doubled with {what} photos")


def print_written(out: Path, counts: Mapping[str, int], hint: str) -> None:
    print(f"wrote {out}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()) + hint)
