"""``python -m train crop``: a training split doubled with a random crop of each photo.

Mirroring doubled the training photos once (``python -m train mirror``); a crop that keeps most of
the photo (by default 75-92% of each side, the same share of both so the photo keeps its
proportions, anywhere in it, resized back to the photo's size) doubles them again with views the
frozen encoder has not seen, while the captions still hold: the people and things a caption names
are rarely all at one edge. Run it on the mirrored dataset to get four views of each photo (the
photo, its mirror, and a crop of each):

    python -m train crop --data flickr:data/flickr8k-mirror --out data/flickr8k-aug

The crops are drawn in the split's order from ``--seed``, so the same source and seed write the
same photos, also when writing resumes after an interruption (``OUT/variants.json`` records the
seed and side, and a write with others into the same folder is refused). A cropped dataset can be
cropped again for eight views under another ``--prefix`` (its crops then include crops of crops):

    python -m train crop --data flickr:data/flickr8k-aug --out data/flickr8k-aug8 --prefix crop2_ --seed 1

A seed that already cropped a dataset the source was made from is refused: those photos lead the
source's split in the same order, so the same seed would draw the same crops of them again. The
other splits are kept unchanged, so models are still selected on the same photos. Every word is
seen twice as often again: pass ``--min-freq`` accordingly when training a new vocabulary, or
start from a checkpoint (``--init-from``), which keeps its own.
"""

from __future__ import annotations

import argparse
import random
import re
from typing import Any

from PIL import Image

from .cli import comma_list
from .fit import TrainConfig
from .variants import Variant, add_variant_arguments, made_from, print_written, write_with_variants

CROP_PREFIX = "crop_"
DEFAULT_SIDE = (0.75, 0.92)
PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_-]+")  # a file-name prefix: no folders, nothing a shell or CSV reads


class RandomCrops:
    """The ``index``-th photo's crop: a random share of each side (the same for width and height)
    at a random place, drawn from one generator in index order, so a photo's crop does not depend
    on which photos were written before an interruption."""

    def __init__(self, seed: int = 0, side: tuple[float, float] = DEFAULT_SIDE) -> None:
        low, high = side
        if not 0 < low <= high <= 1:
            raise ValueError(f"a crop's side must be a share of the photo's in (0, 1], got {low}-{high}")
        self.side = side
        self._rng = random.Random(seed)
        self._boxes: list[tuple[float, float, float]] = []  # (side, left, top) as shares of the photo

    def box(self, index: int) -> tuple[float, float, float]:
        while len(self._boxes) <= index:
            side = self._rng.uniform(*self.side)
            left, top = self._rng.uniform(0, 1 - side), self._rng.uniform(0, 1 - side)
            self._boxes.append((side, left, top))
        return self._boxes[index]

    def __call__(self, photo: Image.Image, index: int) -> Image.Image:
        side, left, top = self.box(index)
        width, height = photo.size
        pixels = (round(left * width), round(top * height), round((left + side) * width), round((top + side) * height))
        return photo.crop(pixels).resize((width, height), Image.Resampling.BICUBIC)


def crop_variant(seed: int = 0, side: tuple[float, float] = DEFAULT_SIDE, prefix: str = CROP_PREFIX) -> Variant:
    if not PREFIX_PATTERN.fullmatch(prefix):
        raise ValueError(f"a crop prefix is letters, digits, '_' and '-', got {prefix!r}")
    return Variant("cropped", prefix, RandomCrops(seed, side), settings={"seed": seed, "side": list(side)})


def check_new_seed(spec: str, seed: int) -> None:
    """Refuse ``seed`` when it already drew crops for ``spec`` or a dataset ``spec`` was made from."""
    for manifest in made_from(spec):
        if manifest["variant"] == "cropped" and manifest["settings"].get("seed") == seed:
            raise ValueError(f"{manifest['source']} was already cropped with seed {seed}, and its photos lead "
                             f"{spec}'s split in the same order: the seed would draw the same crops; "
                             "pass another --seed")


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser("crop", help="write a dataset whose training split is doubled with random crops",
                            description=__doc__, formatter_class=formatter)
    add_variant_arguments(parser, "--crop-split", "cropped")
    parser.add_argument("--seed", type=int, default=0, help="where the crops are drawn from")
    parser.add_argument("--side", type=float, nargs=2, default=DEFAULT_SIDE, metavar=("MIN", "MAX"),
                        help="a crop's side as a share of the photo's, drawn uniformly in [MIN, MAX]")
    parser.add_argument("--prefix", default=CROP_PREFIX,
                        help="the crops' file-name prefix (another one, with another --seed, crops a cropped "
                             "dataset again)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_new_seed(args.data, args.seed)
    variant = crop_variant(args.seed, (args.side[0], args.side[1]), args.prefix)
    counts = write_with_variants(args.data, args.out, variant, comma_list(args.splits), args.crop_split)
    print_written(args.out, counts, "; each training photo now has twice the views: scale fit's --min-freq "
                                    f"(default {TrainConfig().min_freq}) with them for a new vocabulary, or start "
                                    "from a checkpoint with --init-from, which keeps its own")
    return 0
