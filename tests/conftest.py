"""Shared fixtures: tiny checkpoints built once per session, the shared Flickr8k data when present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.helpers import SHARED_FLICKR8K, make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def flickr8k() -> Path:
    if not (SHARED_FLICKR8K / "captions.txt").is_file():
        pytest.skip(f"shared Flickr8k data not found at {SHARED_FLICKR8K} (only on the project's machines)")
    return SHARED_FLICKR8K
