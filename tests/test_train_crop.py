"""`python -m train crop`: the training split doubled with random crops, the same ones on every write."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.__main__ import main
from train.crop import RandomCrops, crop_variant
from train.data import load_dataset
from train.variants import write_with_variants


def _flickr_layout(root: Path, train: tuple[str, ...] = ("a.png", "b.png", "c.png", "d.png")) -> Path:
    """Photos whose every pixel says where it is (red grows left to right, green top to bottom) and
    which photo it is (blue: 20 per photo, in the order named)."""
    xs, ys = np.meshgrid(np.arange(64), np.arange(48))
    for n, name in enumerate((*train, "v.png")):
        pixels = np.stack([xs * 4, ys * 5, np.full_like(xs, 20 * (n + 1))], axis=-1).astype(np.uint8)
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "images" / name)
    with (root / "captions.txt").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for name in (*train, "v.png"):
            writer.writerow([name, "A dog on the left of a man"])
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "val.txt").write_text("v.png\n")
    return root


def test_each_photo_gets_a_crop_inside_it_drawn_from_the_seed() -> None:
    crops = RandomCrops(seed=3, side=(0.5, 0.8))
    boxes = [crops.box(i) for i in range(200)]

    for side, left, top in boxes:
        assert 0.5 <= side <= 0.8 and 0 <= left <= 1 - side and 0 <= top <= 1 - side
    assert len(set(boxes)) == 200
    assert RandomCrops(seed=3, side=(0.5, 0.8)).box(150) == boxes[150]  # not the order asked
    assert RandomCrops(seed=4, side=(0.5, 0.8)).box(0) != boxes[0]
    with pytest.raises(ValueError, match="share"):
        RandomCrops(side=(0.5, 1.2))


def test_a_crop_shows_its_part_of_the_photo_at_the_photo_size() -> None:
    width, height = 120, 80  # not square: width and height must not be swapped
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    photo = Image.fromarray(np.stack([xs * 2, ys * 3, xs * 0], axis=-1).astype(np.uint8))
    crops = RandomCrops(seed=0, side=(0.6, 0.6))
    side, left, top = crops.box(0)

    cropped = np.asarray(crops(photo, 0)).astype(int)

    assert cropped.shape == (height, width, 3)
    # The crop's corners hold the photo's pixels at the box's corners (within resampling).
    assert abs(cropped[0, 0, 0] - 2 * width * left) <= 4 and abs(cropped[0, 0, 1] - 3 * height * top) <= 5
    assert abs(cropped[-1, -1, 0] - 2 * width * (left + side)) <= 6
    assert abs(cropped[-1, -1, 1] - 3 * height * (top + side)) <= 7


def test_the_training_split_is_doubled_and_the_other_splits_and_captions_are_unchanged(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    out = tmp_path / "aug"

    assert main(["crop", "--data", f"flickr:{source}", "--out", str(out), "--seed", "1", "--side", "0.5", "0.6"]) == 0

    data = load_dataset(f"flickr:{out}")
    train = {r.image_id: r for r in data.split("train")}
    assert set(train) == {"a.png", "b.png", "c.png", "d.png", "crop_a.png", "crop_b.png", "crop_c.png", "crop_d.png"}
    assert [r.image_id for r in data.split("val")] == ["v.png"]
    assert train["crop_a.png"].captions == train["a.png"].captions
    assert Image.open(train["crop_a.png"].path).size == (64, 48)
    for name, blue in (("a.png", 20), ("c.png", 60)):  # each crop is made from its own photo
        original = np.asarray(Image.open(train[name].path)).astype(int)
        cropped = np.asarray(Image.open(train[f"crop_{name}"].path)).astype(int)
        assert (cropped[..., 2] == blue).all()
        # --side 0.5 0.6: the crop spans half to 0.6 of the photo's reds, not all of them
        span = cropped[0, -1, 0] - cropped[0, 0, 0]
        assert 0.45 * original[0, -1, 0] <= span <= 0.65 * original[0, -1, 0]


def test_resuming_after_an_interruption_writes_the_same_crops(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    out = tmp_path / "aug"
    write_with_variants(f"flickr:{source}", out, crop_variant(seed=5))
    first = {p.name: p.read_bytes() for p in (out / "images").glob("crop_*")}
    (out / "images" / "crop_a.png").unlink()
    (out / "images" / "crop_c.png").unlink()

    write_with_variants(f"flickr:{source}", out, crop_variant(seed=5))

    assert {p.name: p.read_bytes() for p in (out / "images").glob("crop_*")} == first


def test_a_cropped_dataset_is_not_cropped_again(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    write_with_variants(f"flickr:{source}", tmp_path / "aug", crop_variant())

    with pytest.raises(ValueError, match="already has photos named crop_"):
        write_with_variants(f"flickr:{tmp_path / 'aug'}", tmp_path / "again", crop_variant())


def test_a_cropped_dataset_is_cropped_again_under_another_prefix(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src", train=("a.png", "b.png"))
    assert main(["crop", "--data", f"flickr:{source}", "--out", str(tmp_path / "aug")]) == 0

    args = ["crop", "--data", f"flickr:{tmp_path / 'aug'}", "--out", str(tmp_path / "aug8"), "--seed", "1"]
    assert main([*args, "--prefix", "crop2_"]) == 0

    train = [r.image_id for r in load_dataset(f"flickr:{tmp_path / 'aug8'}").split("train")]
    assert train == ["a.png", "b.png", "crop_a.png", "crop_b.png",
                     "crop2_a.png", "crop2_b.png", "crop2_crop_a.png", "crop2_crop_b.png"]
    again = np.asarray(Image.open(tmp_path / "aug8" / "images" / "crop2_a.png"))
    first = np.asarray(Image.open(tmp_path / "aug" / "images" / "crop_a.png"))
    assert again.shape == first.shape and not np.array_equal(again, first)


def test_cropping_again_with_a_seed_already_used_down_the_line_is_refused(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src", train=("a.png", "b.png"))
    assert main(["mirror", "--data", f"flickr:{source}", "--out", str(tmp_path / "mirror")]) == 0
    assert main(["crop", "--data", f"flickr:{tmp_path / 'mirror'}", "--out", str(tmp_path / "aug"), "--seed", "3"]) == 0
    assert main(["crop", "--data", f"flickr:{tmp_path / 'aug'}", "--out", str(tmp_path / "aug8"),
                 "--prefix", "crop2_", "--seed", "4"]) == 0

    for seed in ("3", "4"):  # seed 3 cropped aug's source, seed 4 aug8's
        with pytest.raises(ValueError, match=f"already cropped with seed {seed}"):
            main(["crop", "--data", f"flickr:{tmp_path / 'aug8'}", "--out", str(tmp_path / "aug16"),
                  "--prefix", "crop3_", "--seed", seed])
    assert not (tmp_path / "aug16").exists()
    assert main(["crop", "--data", f"flickr:{tmp_path / 'aug8'}", "--out", str(tmp_path / "aug16"),
                 "--prefix", "crop3_", "--seed", "5"]) == 0


@pytest.mark.parametrize("prefix", ["", "../x_", "sub/crop_", "crop ", "crop,_"])
def test_a_crop_prefix_is_a_plain_file_name_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="a crop prefix"):
        crop_variant(prefix=prefix)


def test_a_folder_written_with_other_crops_is_not_written_into(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src")
    out = tmp_path / "aug"
    write_with_variants(f"flickr:{source}", out, crop_variant(seed=5))
    before = {p.name: p.read_bytes() for p in (out / "images").glob("crop_*")}

    with pytest.raises(ValueError, match="write to a new folder"):
        write_with_variants(f"flickr:{source}", out, crop_variant(seed=6))
    with pytest.raises(ValueError, match="write to a new folder"):
        write_with_variants(f"flickr:{source}", out, crop_variant(seed=5, side=(0.5, 0.6)))

    assert {p.name: p.read_bytes() for p in (out / "images").glob("crop_*")} == before


def test_a_mirrored_set_gets_a_crop_of_every_photo_and_its_mirror(tmp_path: Path) -> None:
    source = _flickr_layout(tmp_path / "src", train=("a.png", "b.png"))
    assert main(["mirror", "--data", f"flickr:{source}", "--out", str(tmp_path / "mirror")]) == 0

    assert main(["crop", "--data", f"flickr:{tmp_path / 'mirror'}", "--out", str(tmp_path / "aug")]) == 0

    train = {r.image_id: r for r in load_dataset(f"flickr:{tmp_path / 'aug'}").split("train")}
    assert set(train) == {"a.png", "b.png", "mirror_a.png", "mirror_b.png",
                          "crop_a.png", "crop_b.png", "crop_mirror_a.png", "crop_mirror_b.png"}
    assert train["crop_mirror_a.png"].captions == ("A dog on the right of a man",)
