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
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import ImageOps

from .cli import comma_list
from .fit import TrainConfig
from .variants import Variant, add_variant_arguments, print_written, variant_id, write_with_variants

MIRROR_PREFIX = "mirror_"
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


MIRROR = Variant("mirrored", MIRROR_PREFIX, lambda photo, _index: ImageOps.mirror(photo), mirror_caption)


def mirrored_id(image_id: str) -> str:
    """``a/b.jpg`` -> ``a/mirror_b.jpg``: beside the original, in the same folder."""
    return variant_id(image_id, MIRROR_PREFIX)


def write_mirrored(spec: str, out: Path, splits: Sequence[str] = ("train", "val"),
                   mirror_split: str = "train") -> dict[str, int]:
    """Write ``spec``'s ``splits`` to ``out`` in the Flickr layout, ``mirror_split`` doubled with
    mirrored photos. Returns the number of images per split written."""
    return write_with_variants(spec, out, MIRROR, splits, mirror_split)


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser("mirror", help="write a dataset whose training split is doubled with mirrored photos",
                            description=__doc__, formatter_class=formatter)
    add_variant_arguments(parser, "--mirror-split", "mirrored")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    counts = write_mirrored(args.data, args.out, comma_list(args.splits), args.mirror_split)
    print_written(args.out, counts, f"; train on it with: python -m train fit --data flickr:{args.out} "
                                    f"--min-freq {MIN_FREQ} ...")
    return 0
