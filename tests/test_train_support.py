"""Builders shared by the train tests: tiny datasets in each on-disk format, written by the tests.

Each image is a generated photo (tests/helpers.photo_bytes) with its own caption. No test lives
here; pytest collects the module and finds nothing to run.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from tests.helpers import photo_bytes, tiny_config

# One distinct caption per image: small enough to overfit in a few hundred steps.
CAPTIONS = [
    "a dog runs on the grass",
    "a man in a red shirt",
    "two cats in the water",
    "the man is on the grass",
    "a red dog in the water",
    "two men run on the grass",
]
# Only in validation captions: the vocabulary must not learn it.
VAL_ONLY_WORD = "zebra"
# photo_bytes seeds whose features from the (random) tiny encoder lie far apart, so that a tiny
# model can tell the images apart after a few hundred steps (seeds 2 and 3, say, look alike to it).
DISTINCT_SEEDS = (2, 9, 18, 21, 26, 28)


def variants(caption: str, n: int = 5) -> list[str]:
    """n references for an image: the caption as written, in capitals, with punctuation..."""
    forms = [caption, caption.capitalize() + ".", caption.upper(), caption + " .", " " + caption + " !"]
    return forms[:n]


def write_images(directory: Path, names: list[str], seed0: int = 0, seeds: tuple[int, ...] = ()) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        target = directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(photo_bytes(seeds[n] if n < len(seeds) else seed0 + n))


def make_flickr(root: Path, n_train: int = 4, n_val: int = 2, per_image: int = 5) -> Path:
    """The Flickr layout: captions.txt (image,caption CSV), images/, train.txt, val.txt."""
    root.mkdir(parents=True, exist_ok=True)
    train = [f"train_{i}.jpg" for i in range(n_train)]
    val = [f"val_{i}.jpg" for i in range(n_val)]
    write_images(root / "images", train + val, seed0=100, seeds=DISTINCT_SEEDS)
    with (root / "captions.txt").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i, name in enumerate(train):
            for text in variants(CAPTIONS[i % len(CAPTIONS)], per_image):
                writer.writerow([name, text])
        for i, name in enumerate(val):
            for text in variants(CAPTIONS[i % len(CAPTIONS)] + f" near a {VAL_ONLY_WORD}", per_image):
                writer.writerow([name, text])
        writer.writerow(["not_in_any_split.jpg", "a cat"])
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("\n".join(val) + "\n\n")
    return root


def make_karpathy(root: Path) -> Path:
    """Karpathy's dataset_*.json: splits train/restval/val/test, filepath + filename, sentences."""
    images: list[dict[str, Any]] = []
    layout = [("train", 2), ("restval", 1), ("val", 1), ("test", 1)]
    n = 0
    for split, count in layout:
        for _ in range(count):
            folder = "val2014" if split in ("restval", "val", "test") else "train2014"
            name = f"COCO_{folder}_{n:012d}.jpg"
            caption = CAPTIONS[n % len(CAPTIONS)]
            sentences = [{"tokens": caption.split(), "raw": text, "imgid": n} for text in variants(caption)]
            images.append({"filepath": folder, "filename": name, "imgid": n, "split": split,
                           "sentences": sentences, "cocoid": 1000 + n})
            write_images(root / "images" / folder, [name], seed0=n)
            n += 1
    # Karpathy's Flickr files have no filepath and sometimes only tokens.
    images.append({"filename": "flat.jpg", "imgid": n, "split": "train",
                   "sentences": [{"tokens": ["a", "cat", "on", "grass"], "imgid": n}]})
    write_images(root / "images", ["flat.jpg"], seed0=n)
    file = root / "dataset_coco.json"
    file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return file


def make_coco(root: Path) -> Path:
    """Official annotations/captions_{train,val}2017.json with images under ROOT/{train,val}2017."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 1
    for split, count, seed0 in (("train2017", 3, 0), ("val2017", 2, 10)):
        images, annotations = [], []
        for i in range(count):
            image_id = seed0 * 100 + i + 1
            name = f"{image_id:012d}.jpg"
            images.append({"id": image_id, "file_name": name, "height": 80, "width": 96})
            for text in variants(CAPTIONS[i % len(CAPTIONS)], 5):
                annotations.append({"id": ann_id, "image_id": image_id, "caption": text + "\n"})
                ann_id += 1
            write_images(root / split, [name], seed0=seed0 + i)
        # An image without captions is left out.
        images.append({"id": 99999 + seed0, "file_name": "uncaptioned.jpg", "height": 1, "width": 1})
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "info": {}, "licenses": []}))
    return root / "annotations"


def tiny_fit_args(data: str, out: Path, cache: Path, **options: object) -> list[str]:
    """Command-line arguments of a fast `fit` on the tiny encoder (64 px, 4 regions)."""
    config = tiny_config()
    values: dict[str, object] = {
        "data": data, "out": out, "cache": cache, "encoder": config.encoder, "image_size": config.image_size,
        "embed_dim": config.embed_dim, "attention_dim": config.attention_dim, "hidden_dim": config.hidden_dim,
        "dropout": 0.0, "min_freq": 1, "batch_size": 4, "epochs": 2, "warmup_steps": 2, "lr": 3e-3,
        "val_beam": 2, "val_max_len": 8, "threads": 1, "feature_batch_size": 2,
    }
    values.update(options)
    args = ["fit"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + key.replace("_", "-"))
        else:
            args += [flag, str(value)]
    return args
