"""The attention picture: the photo under a heat map for each generated word (the paper's Figure 3)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

TILE = 224
COLUMNS = 5
TITLE_HEIGHT = 22


def attention_grid_size(n_words: int, columns: int = COLUMNS) -> tuple[int, int]:
    """(width, height) in pixels of the picture for a caption of ``n_words`` (+1 for the photo)."""
    tiles = n_words + 1
    cols = min(columns, tiles)
    rows = math.ceil(tiles / cols)
    return cols * TILE, rows * (TILE + TITLE_HEIGHT)


def render_attention(image: Image.Image, words: Sequence[str], attention: np.ndarray,
                     columns: int = COLUMNS) -> bytes:
    """PNG bytes: the photo, then one tile per word with its attention map upsampled over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(words) != len(attention):
        raise ValueError(f"{len(words)} words but {len(attention)} attention maps")
    width, height = attention_grid_size(len(words), columns)
    cols = width // TILE
    rows = height // (TILE + TITLE_HEIGHT)
    base = np.asarray(image.convert("RGB").resize((TILE, TILE), Image.Resampling.BILINEAR))
    dpi = 100
    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    tile_h = (TILE + TITLE_HEIGHT) / height
    for i in range(len(words) + 1):
        r, c = divmod(i, cols)
        ax = fig.add_axes((c * TILE / width, 1 - (r + 1) * tile_h, TILE / width, TILE / height))
        ax.imshow(base)
        if i == 0:
            title = "photo"
        else:
            title = words[i - 1]
            heat = _upsample(attention[i - 1])
            ax.imshow(heat, cmap="jet", alpha=0.5, extent=(0, TILE, TILE, 0), interpolation="bilinear")
        ax.set_axis_off()
        fig.text((c + 0.5) * TILE / width, 1 - r * tile_h - 0.5 * TITLE_HEIGHT / height, title,
                 ha="center", va="center", fontsize=12)
    del rows
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def _upsample(alpha: np.ndarray) -> np.ndarray:
    """Attention map scaled to [0, 1] and resized smoothly to the tile size."""
    a = np.asarray(alpha, dtype=np.float32)
    if a.ndim == 1:
        side = math.isqrt(a.size)
        a = a.reshape(side, side) if side * side == a.size else a.reshape(1, -1)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
    heat = Image.fromarray((a * 255).astype(np.uint8)).resize((TILE, TILE), Image.Resampling.BICUBIC)
    return np.asarray(heat, dtype=np.float32) / 255.0
