"""`python -m train mirror`: the training split doubled with mirrored photos, read back by fit's reader."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

from train.__main__ import main
from train.data import load_dataset
from train.mirror import mirror_caption, mirrored_id, write_mirrored


def _flickr_layout(root: Path) -> Path:
    """Three training photos and one validation photo; each photo's left half is red, right half blue."""
    (root / "images").mkdir(parents=True)
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (255, 0, 0)
    pixels[:, 24:] = (0, 0, 255)
    for name in ("a.jpg", "b.jpg", "c.jpg", "v.jpg"):
        Image.fromarray(pixels).save(root / "images" / name, quality=95)
    with (root / "captions.txt").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for name in ("a.jpg", "b.jpg", "c.jpg", "v.jpg"):
            writer.writerow([name, "A dog on the left of a man"])
            writer.writerow([name, "Right side: a red wall"])
    (root / "train.txt").write_text("a.jpg\nb.jpg\nc.jpg\n")
    (root / "val.txt").write_text("v.jpg\n")
    return root


def test_captions_swap_left_and_right_and_keep_everything_else() -> None:
    assert mirror_caption("A dog on the left, a cat on the right .") == "A dog on the right, a cat on the left ."
    assert mirror_caption("Left hand up; RIGHT foot") == "Right hand up; LEFT foot"
    assert mirror_caption("leftover bright rights") == "leftover bright rights"
    assert mirrored_id("photo.jpg") == "mirror_photo.jpg"
    assert mirrored_id("train2014/x.jpg") == "train2014/mirror_x.jpg"


def test_the_training_split_is_doubled_with_flipped_photos_and_the_other_splits_are_unchanged(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    out = tmp_path / "mirror"

    counts = write_mirrored(f"flickr:{source}", out)

    assert counts == {"train": 6, "val": 1}
    data = load_dataset(f"flickr:{out}")
    train = {r.image_id: r for r in data.split("train")}
    assert set(train) == {"a.jpg", "b.jpg", "c.jpg", "mirror_a.jpg", "mirror_b.jpg", "mirror_c.jpg"}
    assert [r.image_id for r in data.split("val")] == ["v.jpg"]
    assert train["a.jpg"].captions == ("A dog on the left of a man", "Right side: a red wall")
    assert train["mirror_a.jpg"].captions == ("A dog on the right of a man", "Left side: a red wall")
    assert (out / "images" / "a.jpg").is_symlink()
    flipped = np.asarray(Image.open(io.BytesIO(train["mirror_a.jpg"].path.read_bytes())).convert("RGB"))
    left, right = flipped[:, :20].mean(axis=(0, 1)), flipped[:, -20:].mean(axis=(0, 1))
    assert left[2] > 200 > left[0] and right[0] > 200 > right[2]  # blue now on the left, red on the right


def test_writing_again_keeps_the_mirrored_photos_already_written(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    out = tmp_path / "mirror"
    write_mirrored(f"flickr:{source}", out)
    photo = out / "images" / "mirror_b.jpg"
    before = photo.stat().st_mtime_ns

    assert main(["mirror", "--data", f"flickr:{source}", "--out", str(out)]) == 0

    assert photo.stat().st_mtime_ns == before
    assert len(load_dataset(f"flickr:{out}").split("train")) == 6
