"""The model people get: the shipped default model, loaded offline, says what a photo shows.

A broken model file, a changed preprocessing or a frozen encoder that drifts from the eager one
would ship silently without these tests.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_photos

from captioner import checkpoint
from captioner.inference import FREEZE_TOLERANCE, Captioner, preprocess
from tests.helpers import photo_bytes

DOG_PHOTOS = 6  # how many Flickr8k validation photos to caption


@pytest.fixture(scope="module")
def default_captioner() -> Iterator[Captioner]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU is shared with other jobs: one thread stalls least
    yield Captioner.load(None, "cpu")
    torch.set_num_threads(threads)


def _photos() -> list[Image.Image]:
    """Real photographs bundled with scikit-image (a cat, a coffee cup, an astronaut)."""
    return [Image.fromarray(picture()) for picture in (skimage_photos.chelsea, skimage_photos.coffee,
                                                       skimage_photos.astronaut)]


def test_default_model_loads_and_captions_a_generated_photo(default_captioner: Captioner) -> None:
    meta = checkpoint.read_document(None)["meta"]
    result = default_captioner.caption_bytes(photo_bytes(3, size=(320, 240)), attention=False)
    assert result.model_version == meta["version"] == default_captioner.version
    assert result.text == " ".join(result.words) and len(result.words) >= 2
    assert set(result.words) <= set(default_captioner.model.vocab.words[4:])  # no <unk>, no specials
    assert math.isfinite(result.score) and -5.0 < result.score < 0.0
    assert (result.width, result.height) == (320, 240)
    assert result.beam_size == meta["decoding"]["beam_size"]


def _validation_photos_all_references_call(flickr8k: Path, word: str) -> list[Path]:
    """Validation photos (never trained on) whose every reference caption uses ``word``."""
    references: dict[str, list[str]] = {}
    with (flickr8k / "captions.txt").open(encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            references.setdefault(row["image"], []).append(row["caption"].lower())
    pattern = re.compile(rf"\b{word}s?\b")
    names = [n.strip() for n in (flickr8k / "val.txt").read_text(encoding="utf-8").splitlines() if n.strip()]
    return [flickr8k / "images" / n for n in names
            if references.get(n) and all(pattern.search(text) for text in references[n])]


def test_default_model_says_dog_for_dog_photos(default_captioner: Captioner, flickr8k: Path) -> None:
    photos = _validation_photos_all_references_call(flickr8k, "dog")[:DOG_PHOTOS]
    assert len(photos) == DOG_PHOTOS
    results = default_captioner.caption_images([Image.open(p).convert("RGB") for p in photos], attention=False)
    missing = [(p.name, r.text) for p, r in zip(photos, results, strict=True)
               if not {"dog", "dogs"} & set(r.words)]
    assert not missing, f"captions without 'dog': {missing}"


def test_frozen_encoder_matches_the_eager_one_on_real_photos(default_captioner: Captioner) -> None:
    photos = _photos()
    assert default_captioner.freeze_encoder(photos[:2])
    inputs = torch.stack([preprocess(default_captioner.model, photo) for photo in photos])
    with torch.inference_mode():
        served = default_captioner.encode(inputs)  # what the worker serves: the frozen encoder
        eager = default_captioner.model.encoder(inputs)
    assert served.abs().max() > 1.0  # real features, not a degenerate all-zeros case
    np.testing.assert_allclose(served.numpy(), eager.numpy(), atol=FREEZE_TOLERANCE, rtol=FREEZE_TOLERANCE)
