"""Helpers for the bot's end-to-end tests: fast tiny models, hostile files, settings."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from bot.app import CaptionBot
from bot.service import ServiceFactory
from captioner import checkpoint
from captioner.checkpoint import CaptionModel
from captioner.vocab import Vocabulary
from common.settings import Settings
from tests.fake_telegram import FakeTelegram
from tests.helpers import TINY_WORDS, photo_bytes, tiny_config

ADMIN_ID = 900
TOKEN = "7000001:AAF-fake-token-For_Tests_0123456789"


def fast_checkpoint(directory: Path, version: str = "tiny-bot-v1", seed: int = 0) -> Path:
    """A tiny random model that decodes short captions quickly (beam 2, at most 8 words)."""
    torch.manual_seed(seed)
    vocab = Vocabulary.build([" ".join(TINY_WORDS)], min_freq=1)
    meta = {"version": version, "decoding": {"beam_size": 2, "max_len": 8}}
    model = CaptionModel.create(tiny_config(), vocab, meta)
    return checkpoint.save(model, directory)


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A small PNG whose header claims 900 megapixels (a decompression bomb)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (width + 1) * 4)  # a few rows; the rest would be "inflated"
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b"")


def truncated_jpeg(seed: int = 3) -> bytes:
    data = photo_bytes(seed, size=(200, 160))
    return data[: len(data) // 2]


def png_bytes(seed: int = 5) -> bytes:
    return photo_bytes(seed, fmt="PNG")


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def big_jpeg(megapixels: float = 1.0, seed: int = 9) -> bytes:
    side = int((megapixels * 1_000_000) ** 0.5)
    from PIL import Image

    image = Image.effect_noise((side, side), 64).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@asynccontextmanager
async def bot_over_fake_api(tmp: Path, *, service_factory: ServiceFactory | None = None,
                            **overrides: Any) -> AsyncIterator[tuple[FakeTelegram, CaptionBot]]:
    """The real bot and worker (a tiny fast model, CPU, one thread) against a fresh fake Bot API;
    ``overrides`` are Settings fields on top of the defaults a person running the bot gets;
    ``service_factory`` replaces the worker (a test double)."""
    fake = FakeTelegram(TOKEN)
    await fake.start()
    values: dict[str, Any] = {
        "token": TOKEN, "base_url": fake.base_url, "base_file_url": fake.base_file_url,
        "data_dir": tmp / "data", "model": str(fast_checkpoint(tmp / "model")), "device": "cpu",
        "worker_threads": 1, "model_poll_seconds": 0,
    }
    bot = CaptionBot(Settings(**(values | overrides)), service_factory)
    try:
        await bot.start()
        yield fake, bot
    finally:
        await bot.stop()
        await fake.close()
