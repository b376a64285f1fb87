"""Test helpers: tiny checkpoints and generated photos (no downloads, no shared data needed)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner import checkpoint
from captioner.checkpoint import CaptionModel
from captioner.model import ModelConfig
from captioner.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
SHARED_FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
TINY_WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "man", "in", "red", "shirt", "water", "two", "is"]


def tiny_config(**overrides: object) -> ModelConfig:
    base = dict(encoder="tiny", image_size=64, embed_dim=16, attention_dim=16, hidden_dim=32, dropout=0.0)
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def make_checkpoint(directory: Path, config: ModelConfig | None = None, words: list[str] | None = None,
                    version: str = "test-v1", seed: int = 0) -> Path:
    """A randomly initialised model saved as a real checkpoint (tiny encoder by default)."""
    torch.manual_seed(seed)
    vocab = Vocabulary.build([" ".join(words or TINY_WORDS)], min_freq=1)
    model = CaptionModel.create(config or tiny_config(), vocab, {"version": version})
    return checkpoint.save(model, directory)


def photo_bytes(seed: int = 0, size: tuple[int, int] = (96, 80), fmt: str = "JPEG") -> bytes:
    """A generated photo-like image: smooth colour gradients plus noise, different per seed."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-200, 200, (2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 12, (h, w, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
