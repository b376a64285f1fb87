"""`python -m train mirror`: the training split doubled with mirrored photos, read back by fit's reader."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.__main__ import main
from train.data import load_dataset
from train.mirror import mirror_caption, mirrored_id, write_mirrored


def _flickr_layout(root: Path, train: tuple[str, ...] = ("a.jpg", "b.jpg", "c.jpg")) -> Path:
    """Training photos and one validation photo; each photo's left half is red, right half blue."""
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:, :24] = (255, 0, 0)
    pixels[:, 24:] = (0, 0, 255)
    for name in (*train, "v.jpg"):
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / name, quality=95)
    with (root / "captions.txt").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for name in (*train, "v.jpg"):
            writer.writerow([name, "A dog on the left of a man"])
            writer.writerow([name, "Right side: a red wall"])
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("v.jpg\n")
    return root


def _red_on_the_right(path: Path) -> bool:
    flipped = np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB"))
    left, right = flipped[:, :20].mean(axis=(0, 1)), flipped[:, -20:].mean(axis=(0, 1))
    return bool(left[2] > 200 > left[0] and right[0] > 200 > right[2])


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
    assert _red_on_the_right(train["mirror_a.jpg"].path)  # blue now on the left
    assert not _red_on_the_right(train["a.jpg"].path)


def test_writing_again_keeps_the_mirrored_photos_already_written(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    out = tmp_path / "mirror"
    write_mirrored(f"flickr:{source}", out)
    photo = out / "images" / "mirror_b.jpg"
    before = photo.stat().st_mtime_ns

    assert main(["mirror", "--data", f"flickr:{source}", "--out", str(out)]) == 0

    assert photo.stat().st_mtime_ns == before
    assert len(load_dataset(f"flickr:{out}").split("train")) == 6


def test_photos_in_folders_are_mirrored_beside_them_in_their_own_format(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src", train=("2014/a.jpg", "b.png"))

    write_mirrored(f"flickr:{source}", tmp_path / "mirror")

    train = {r.image_id: r for r in load_dataset(f"flickr:{tmp_path / 'mirror'}").split("train")}
    assert set(train) == {"2014/a.jpg", "2014/mirror_a.jpg", "b.png", "mirror_b.png"}
    assert _red_on_the_right(train["2014/mirror_a.jpg"].path)
    assert Image.open(train["mirror_b.png"].path).format == "PNG"


def test_the_source_dataset_is_never_written_over_nor_mirrored_twice(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()}

    with pytest.raises(FileExistsError):
        write_mirrored(f"flickr:{source}", source)
    assert {p: p.read_bytes() for p in source.rglob("*") if p.is_file()} == before

    write_mirrored(f"flickr:{source}", tmp_path / "mirror")
    with pytest.raises(ValueError, match="already has photos named mirror_"):
        write_mirrored(f"flickr:{tmp_path / 'mirror'}", tmp_path / "again")
