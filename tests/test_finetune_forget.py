"""/forget on the training side: people's photos never enter the feature cache, and the fine-tune
after a /forget starts from a base that never learned from the forgotten person's corrections."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from captioner import checkpoint
from storage import Storage
from tests.helpers import photo_bytes
from tests.test_finetune import _approve, _base, _config, _fill_database
from tests.test_train_support import make_flickr
from train.finetune import finetune

X = 999_000_111
X_WORD = "zebra"  # a word only X uses


async def _x_corrects(url: str, data_dir: Path, photos: int = 3) -> None:
    store = await Storage.open(url, data_dir)
    try:
        for i in range(photos):
            photo = await store.record_photo(photo_bytes(700 + i), width=96, height=80,
                                             telegram_file_unique_id=f"x{i}", sender_telegram_id=X)
            caption = await store.record_caption(photo.id, model_version="base-v1", text="a dog runs", score=-3.0,
                                                 beam_size=3, latency_ms=10.0, requester_telegram_id=X)
            await store.record_correction(caption.id, X, f"a {X_WORD} leans on a wall")
    finally:
        await store.close()


async def _forget(url: str, data_dir: Path) -> tuple[int, dict[str, bool]]:
    store = await Storage.open(url, data_dir)
    try:
        report = await store.forget_person(X)
        return report.models_marked, {v.name: v.forgotten_data for v in await store.list_model_versions()}
    finally:
        await store.close()


def _cache_keys(cache_root: Path) -> list[str]:
    return [key for index in cache_root.rglob("index.json") for key in json.loads(index.read_text())]


@pytest.mark.slow
def test_the_fine_tune_after_forget_starts_from_a_clean_base_without_their_word(tmp_path: Path) -> None:
    data = make_flickr(tmp_path / "flickr", n_train=4, n_val=2)
    base = _base(tmp_path, data)
    url, data_dir = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tmp_path / "botdata"
    asyncio.run(_fill_database(url, data_dir))
    asyncio.run(_x_corrects(url, data_dir))

    # One person's word enters only because this run lets one person add a word (the default needs 3).
    first = finetune(_config(tmp_path, base, url, data_dir, name="cand-x", margin=1.0, min_word_people=1))
    assert X_WORD in first["new_words"] and first["passed_gate"], first["reason"]
    asyncio.run(_approve(url, data_dir, "cand-x"))
    # The cache holds the public replay and validation images, never a photo from the bot's data folder.
    keys = _cache_keys(tmp_path / "cache")
    assert keys and all(str(data) in key for key in keys)
    assert not any(str(data_dir.resolve()) in key for key in keys)

    marked, versions = asyncio.run(_forget(url, data_dir))
    assert marked == 1 and versions == {"base-v1": False, "cand-x": True}

    # No --base: the active model would be the base, but it learned from X; its parent is used.
    second = finetune(replace(_config(tmp_path, base, url, data_dir, name="cand-2", margin=1.0, min_word_people=1,
                                      epochs=1, new_word_epochs=1), base=None))
    assert second["parent"] == "base-v1" and second["skipped_bases"] == ["cand-x"]
    assert "cand-x" in second["base_choice"]
    assert X_WORD not in second["new_words"]
    assert X_WORD not in checkpoint.load(second["checkpoint"]).vocab
    # The other people's corrections cand-x learned are learned again.
    assert second["corrections_train_photos"] >= first["corrections_train_photos"] - 3
    written = json.loads((Path(second["checkpoint"]) / "finetune_report.json").read_text())
    assert written["skipped_bases"] == ["cand-x"]
    assert not any(str(data_dir.resolve()) in key for key in _cache_keys(tmp_path / "cache"))
