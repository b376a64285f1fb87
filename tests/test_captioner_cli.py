import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from captioner.attention_viz import attention_grid_size, render_attention
from captioner.inference import Captioner
from tests.helpers import ROOT, photo_bytes


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)


def test_caption_cli_reports_bad_files_and_still_captions_the_rest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    good.write_bytes(photo_bytes(1))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not really a jpeg")
    result = _run("caption", str(good), str(bad), str(tmp_path / "missing.jpg"), "--model", str(tiny_checkpoint),
                  "--json", "--device", "cpu")
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(good), str(bad), str(tmp_path / "missing.jpg")]
    assert lines[0]["caption"] and isinstance(lines[0]["score"], float)
    assert lines[0]["confident"] is True and lines[0]["seen"] == []  # the tiny encoder has no classifier
    assert "not_an_image" in lines[1]["error"]
    assert "No such file" in lines[2]["error"]


def test_caption_cli_on_a_real_photo_writes_the_attention_picture(tiny_checkpoint: Path, tmp_path: Path,
                                                                  flickr8k: Path) -> None:
    photo = sorted((flickr8k / "images").iterdir())[0]
    out = tmp_path / "attention.png"
    result = _run("caption", str(photo), "--model", str(tiny_checkpoint), "--attention", str(out))
    assert result.returncode == 0, result.stderr
    words = result.stdout.split(": ", 1)[1].split()
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == attention_grid_size(len(words))


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    photo = tmp_path / "p.jpg"
    photo.write_bytes(photo_bytes(0))
    result = _run("caption", str(photo), "--model", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert "checkpoint not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("n_words", [1, 4, 9])
def test_attention_picture_is_a_png_of_the_expected_size(n_words: int) -> None:
    import io

    import numpy as np

    image = Image.new("RGB", (300, 200), (20, 120, 60))
    maps = np.random.default_rng(0).dirichlet(np.ones(49), size=n_words).reshape(n_words, 7, 7)
    png = render_attention(image, [f"w{i}" for i in range(n_words)], maps)
    with Image.open(io.BytesIO(png)) as picture:
        assert picture.format == "PNG" and picture.size == attention_grid_size(n_words)
    with pytest.raises(ValueError, match="attention maps"):
        render_attention(image, ["one"], maps[:0])


def test_captioner_facade_gives_words_scores_and_attention(tiny_checkpoint: Path) -> None:
    captioner = Captioner.load(tiny_checkpoint, "cpu")
    caption = captioner.caption_bytes(photo_bytes(5))
    assert caption.text == " ".join(caption.words) and caption.words
    assert (caption.width, caption.height, caption.model_version) == (96, 80, "test-v1")
    assert caption.attention is not None and caption.attention.shape[0] == len(caption.words)
    assert caption.attention.sum(axis=(1, 2)) == pytest.approx(1.0, abs=1e-4)
