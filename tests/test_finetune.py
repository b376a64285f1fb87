"""The learning loop on tiny synthetic data: corrections in a real database -> candidate -> gate."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import checkpoint
from captioner.checkpoint import CaptionModel
from captioner.vocab import Vocabulary
from storage import Storage
from storage.holdout import holdout_bucket
from tests.helpers import ROOT, TINY_WORDS, photo_bytes, tiny_config
from tests.test_train_support import make_flickr
from train.finetune import FinetuneConfig, finetune, grow_vocabulary
from train.gate import gate, paired_bootstrap_lower_bound

CORRECTIONS = ["a bicycle leans on a wall", "a helmet sits on a bicycle"]


def _base(tmp: Path, data: Path) -> Path:
    torch.manual_seed(0)
    model = CaptionModel.create(tiny_config(), Vocabulary.build([" ".join(TINY_WORDS)], min_freq=1),
                                {"version": "base-v1", "trained_on": f"flickr:{data}"})
    return checkpoint.save(model, tmp / "base")


async def _fill_database(url: str, data_dir: Path, n_photos: int = 16) -> None:
    store = await Storage.open(url, data_dir)
    try:
        for i in range(n_photos):
            person = 100 + i % 3
            await store.upsert_person(person, "en")
            photo = await store.record_photo(photo_bytes(300 + i), width=96, height=80,
                                             telegram_file_unique_id=f"u{i}", sender_telegram_id=person)
            caption = await store.record_caption(photo.id, model_version="base-v1", text="a dog runs", score=-3.0,
                                                 beam_size=3, latency_ms=10.0, requester_telegram_id=person)
            await store.record_correction(caption.id, person, CORRECTIONS[i % 2])
    finally:
        await store.close()


async def _versions(url: str, data_dir: Path) -> tuple[list[tuple[str, str, str | None]], int]:
    store = await Storage.open(url, data_dir)
    try:
        versions = [(v.name, v.status, v.reason) for v in await store.list_model_versions()]
        untrained = len(await store.corrections_for_training(untrained_only=True))
        return versions, untrained
    finally:
        await store.close()


@pytest.fixture
def loop_setup(tmp_path: Path) -> tuple[Path, str, Path]:
    data = make_flickr(tmp_path / "flickr", n_train=4, n_val=2)
    base = _base(tmp_path, data)
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    asyncio.run(_fill_database(url, tmp_path / "botdata"))
    return base, url, tmp_path / "botdata"


def _config(tmp: Path, base: Path, url: str, data_dir: Path, **overrides: object) -> FinetuneConfig:
    values: dict[str, object] = dict(base=str(base), db=url, data_dir=str(data_dir), out=str(tmp / "candidates"),
                                     cache=str(tmp / "cache"), device="cpu", epochs=40, lr=1e-2, batch_size=16,
                                     holdout=0.35, replay_ratio=1.0)
    values.update(overrides)
    return FinetuneConfig(**values)  # type: ignore[arg-type]


@pytest.mark.slow
def test_finetune_learns_new_words_and_is_promoted(loop_setup: tuple[Path, str, Path], tmp_path: Path) -> None:
    base, url, data_dir = loop_setup
    # A random tiny base has no meaningful validation CIDEr (about 0.01): that check is for real models.
    report = finetune(_config(tmp_path, base, url, data_dir, name="cand-good", margin=1.0))
    assert set(report["new_words"]) >= {"bicycle", "helmet", "leans"}
    assert report["promoted"], report["reason"]
    assert report["train_losses"][-1] < report["train_losses"][0]
    candidate = checkpoint.load(report["checkpoint"])
    assert "bicycle" in candidate.vocab and candidate.meta["parent"] == "base-v1"
    versions, untrained = asyncio.run(_versions(url, data_dir))
    assert ("cand-good", "active", None) in versions
    assert any(name == "base-v1" for name, _, _ in versions)
    # Only the held-out corrections are still waiting for a model to learn from them.
    assert untrained == report["corrections_heldout_photos"] * 1


@pytest.mark.slow
def test_a_candidate_that_learned_nothing_is_rejected(loop_setup: tuple[Path, str, Path], tmp_path: Path) -> None:
    base, url, data_dir = loop_setup
    report = finetune(_config(tmp_path, base, url, data_dir, name="cand-frozen", lr=0.0, epochs=1,
                                      new_word_epochs=0))
    assert not report["promoted"]
    assert "not better on held-out corrections" in report["reason"]
    versions, untrained = asyncio.run(_versions(url, data_dir))
    assert ("cand-frozen", "rejected", report["reason"]) in versions
    assert untrained == 16  # a rejected candidate consumes no corrections


def test_gate_promotes_better_and_rejects_worse() -> None:
    base = {"corrections": {"CIDEr": 0.20, "Bleu_1": 0.5}, "validation": {"CIDEr": 0.50}}
    better = {"corrections": {"CIDEr": 0.60, "Bleu_1": 0.7}, "validation": {"CIDEr": 0.49}}
    assert gate(base, better, 0.03).promote
    forgetful = {"corrections": {"CIDEr": 0.60, "Bleu_1": 0.7}, "validation": {"CIDEr": 0.40}}
    decision = gate(base, forgetful, 0.03)
    assert not decision.promote and "validation CIDEr dropped 20.0%" in decision.reason
    worse = {"corrections": {"CIDEr": 0.10, "Bleu_1": 0.4}, "validation": {"CIDEr": 0.55}}
    assert not gate(base, worse, 0.03).promote
    lucky = gate(base, better, 0.03, improvement_lower_bound=-0.01)
    assert not lucky.promote and "not significant" in lucky.reason
    assert gate(base, better, 0.03, improvement_lower_bound=0.05).promote
    assert not gate({"corrections": {}, "validation": {}}, {"corrections": {}, "validation": {}}, 0.03).promote


def test_vocabulary_growth_leaves_old_words_alone() -> None:
    torch.manual_seed(0)
    model = CaptionModel.create(tiny_config(), Vocabulary.build([" ".join(TINY_WORDS)], min_freq=1))
    old_words = list(model.vocab.words)
    features, tokens = torch.randn(2, 4, 64), torch.tensor([[1, 4, 5, 6], [1, 7, 8, 2]])
    model.decoder.eval()
    with torch.no_grad():
        before, _ = model.decoder(features, tokens)
        added = grow_vocabulary(model, ["a unicycle on the grass", "two unicycles and a unicycle"], min_count=1)
        after, _ = model.decoder(features, tokens)
    assert added == ["unicycle", "and", "unicycles"]
    assert model.vocab.words[: len(old_words)] == old_words
    assert torch.allclose(before, after[..., : len(old_words)], atol=1e-6)
    assert torch.equal(before.argmax(-1), after.argmax(-1))


def test_paired_bootstrap_separates_real_gains_from_noise() -> None:
    rng = np.random.default_rng(1)
    base = {f"p{i}": float(v) for i, v in enumerate(rng.uniform(0, 1, 25))}
    real = {k: v + 0.3 + rng.normal(0, 0.1) for k, v in base.items()}
    noise = {k: v + rng.normal(0.02, 0.4) for k, v in base.items()}
    assert paired_bootstrap_lower_bound(base, real) > 0.2
    assert paired_bootstrap_lower_bound(base, noise) < 0


def test_holdout_is_deterministic() -> None:
    assert holdout_bucket("abc") == holdout_bucket("abc")
    buckets = [holdout_bucket(f"photo{i}") for i in range(2000)]
    assert 0.15 < sum(b < 0.2 for b in buckets) / len(buckets) < 0.25


def test_finetune_cli_reports_missing_corrections(tmp_path: Path) -> None:
    data = make_flickr(tmp_path / "flickr", n_train=2, n_val=1)
    base = _base(tmp_path, data)
    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    result = subprocess.run([sys.executable, "-m", "train", "finetune", "--db", url, "--data-dir",
                             str(tmp_path / "d"), "--base", str(base), "--out", str(tmp_path / "o"),
                             "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert result.returncode == 1
    assert "no new corrections" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()  # no candidate written
