"""The learning loop on tiny synthetic data: corrections in a real database -> candidate -> gate."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from captioner import checkpoint
from captioner.checkpoint import CaptionModel
from captioner.vocab import Vocabulary
from storage import Storage
from storage.holdout import holdout_bucket, is_held_out
from tests.helpers import ROOT, TINY_WORDS, photo_bytes, tiny_config
from tests.test_train_support import make_flickr, tiny_fit_args
from train import metrics
from train.__main__ import main
from train.finetune import (
    EXIT_AWAITING_REVIEW,
    EXIT_PROMOTED,
    EXIT_REJECTED,
    SCST_FINETUNE_EPOCHS,
    FinetuneConfig,
    finetune,
)
from train.gate import corrections_metric, gate, paired_bootstrap_lower_bound
from train.trust import WordUse, grow_vocabulary

CORRECTIONS = ["a bicycle leans on a wall", "a helmet sits on a bicycle"]


def _base(tmp: Path, data: Path) -> Path:
    torch.manual_seed(0)
    model = CaptionModel.create(tiny_config(), Vocabulary.build([" ".join(TINY_WORDS)], min_freq=1),
                                {"version": "base-v1", "trained_on": f"flickr:{data}"})
    return checkpoint.save(model, tmp / "base")


TEST_SALT = "5a" * 32  # a fixed holdout salt: the same photos are held out on every test run


async def _fill_database(url: str, data_dir: Path, n_photos: int = 16) -> None:
    store = await Storage.open(url, data_dir)
    (data_dir / "holdout_salt").write_text(TEST_SALT)
    try:
        for i in range(n_photos):
            person = 100 + i  # an honest crowd: one photo each (one person's share of a run is capped)
            await store.upsert_person(person, "en")
            photo = await store.record_photo(photo_bytes(300 + i), width=96, height=80,
                                             telegram_file_unique_id=f"u{i}", sender_telegram_id=person)
            caption = await store.record_caption(photo.id, model_version="base-v1", text="a dog runs", score=-3.0,
                                                 beam_size=3, latency_ms=10.0, requester_telegram_id=person)
            await store.record_correction(caption.id, person, CORRECTIONS[i % 2])
    finally:
        await store.close()


async def _approve(url: str, data_dir: Path, name: str) -> None:
    store = await Storage.open(url, data_dir)
    try:
        await store.approve_model_version(name)
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
                                     holdout=0.5, replay_ratio=1.0)
    values.update(overrides)
    return FinetuneConfig(**values)  # type: ignore[arg-type]


@pytest.mark.slow
def test_finetune_learns_new_words_and_is_promoted(loop_setup: tuple[Path, str, Path], tmp_path: Path) -> None:
    base, url, data_dir = loop_setup
    # A random tiny base has no meaningful validation CIDEr (about 0.01): that check is for real models.
    report = finetune(_config(tmp_path, base, url, data_dir, name="cand-good", margin=1.0))
    assert set(report["new_words"]) >= {"bicycle", "helmet", "leans"}
    assert report["passed_gate"], report["reason"]
    assert report["status"] == "awaiting_review"  # it adds words: an operator decides
    asyncio.run(_approve(url, data_dir, "cand-good"))
    assert report["train_losses"][-1] < report["train_losses"][0]
    candidate = checkpoint.load(report["checkpoint"])
    assert "bicycle" in candidate.vocab and candidate.meta["parent"] == "base-v1"
    versions, untrained = asyncio.run(_versions(url, data_dir))
    assert ("cand-good", "active", None) in versions
    assert any(name == "base-v1" for name, _, _ in versions)
    # Only the held-out corrections are still waiting for a model to learn from them.
    assert untrained == report["corrections_heldout_photos"] * 1


def test_a_self_critically_trained_base_is_fine_tuned_with_self_critical_epochs_at_the_end(
        loop_setup: tuple[Path, str, Path], tmp_path: Path) -> None:
    base, url, data_dir = loop_setup
    checkpoint.update_meta(base, "scst", {"sampling": "beam", "samples": 5, "baseline": "mean"})
    before = checkpoint.load(base)
    report = finetune(_config(tmp_path, base, url, data_dir, name="cand-scst", epochs=2, margin=1.0,
                              scst_lr=1e-3))
    assert len(report["scst_rewards"]) == SCST_FINETUNE_EPOCHS  # the default for such a base ...
    assert len(report["train_losses"]) == report["config"]["new_word_epochs"]  # ... replacing the decoder's
    candidate = checkpoint.load(report["checkpoint"])
    assert candidate.meta["scst"] == before.meta["scst"]  # its own fine-tunes end the same way
    # Told not to, it does not; a base without the mark gets none unless asked.
    report = finetune(_config(tmp_path, base, url, data_dir, name="cand-no-scst", epochs=2, margin=1.0,
                              scst_epochs=0, all_corrections=True, register=False))
    assert report["scst_rewards"] == [] and len(report["train_losses"]) == report["config"]["new_word_epochs"] + 2


def test_a_base_with_a_fine_tuned_encoder_keeps_it_as_shipped(loop_setup: tuple[Path, str, Path],
                                                              tmp_path: Path) -> None:
    """The learning loop trains the decoder only; an encoder fine-tuned in training stays in the checkpoint."""
    _, url, data_dir = loop_setup
    torch.manual_seed(1)
    model = CaptionModel.create(tiny_config(fine_tune_blocks=1), Vocabulary.build([" ".join(TINY_WORDS)], min_freq=1),
                                {"version": "tuned-v1", "trained_on": f"flickr:{tmp_path / 'flickr'}"})
    with torch.no_grad():
        for param in model.encoder.backbone.stages[3].parameters():
            param.mul_(1.5)  # not the seeded weights a fresh tiny encoder has
    base = checkpoint.save(model, tmp_path / "tuned-base")
    report = finetune(_config(tmp_path, base, url, data_dir, name="cand-tuned", epochs=2, margin=1.0,
                              register=False))
    candidate, before = checkpoint.load(report["checkpoint"]), checkpoint.load(base)
    assert candidate.config.fine_tune_blocks == 1 and checkpoint.read_document(report["checkpoint"])["stores_encoder"]
    for key, value in before.encoder.backbone.state_dict().items():  # as shipped, to float16 rounding
        torch.testing.assert_close(candidate.encoder.backbone.state_dict()[key], value, rtol=1e-3, atol=1e-4)
    # Frozen in the loop: the cache holds its features, not a fine-tuning run's maps of its frozen part.
    assert [f for f in (tmp_path / "cache").iterdir() if "-stages" in f.name] == []
    assert report["train_losses"][-1] < report["train_losses"][0]  # the decoder did learn


@pytest.mark.slow
def test_a_candidate_that_learned_nothing_is_rejected(loop_setup: tuple[Path, str, Path], tmp_path: Path) -> None:
    base, url, data_dir = loop_setup
    report = finetune(_config(tmp_path, base, url, data_dir, name="cand-frozen", lr=0.0, epochs=1,
                                      new_word_epochs=0))
    assert not report["passed_gate"] and report["status"] == "rejected"
    assert "not better on held-out corrections" in report["reason"]
    versions, untrained = asyncio.run(_versions(url, data_dir))
    assert ("cand-frozen", "rejected", report["reason"]) in versions
    # The corrections it trained on are marked (rejected run): junk is not retried forever.
    assert untrained == report["corrections_heldout_photos"]


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
        uses = [WordUse("a unicycle on the grass", "p1", "x1"), WordUse("two unicycles and a unicycle", "p2", "x2")]
        added = grow_vocabulary(model, uses, min_people=1, most=10)
        after, _ = model.decoder(features, tokens)
    assert added == ["unicycle", "and", "unicycles"]  # most people first, then most photos, then by name
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


def test_holdout_is_deterministic_under_a_salt() -> None:
    assert holdout_bucket("abc", b"s" * 32) == holdout_bucket("abc", b"s" * 32)
    buckets = [holdout_bucket(f"photo{i}", b"s" * 32) for i in range(2000)]
    assert 0.15 < sum(b < 0.2 for b in buckets) / len(buckets) < 0.25
    other = [holdout_bucket(f"photo{i}", b"t" * 32) for i in range(2000)]
    assert {i for i, b in enumerate(buckets) if b < 0.2} != {i for i, b in enumerate(other) if b < 0.2}


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


# ----------------------------------------------------------------------------- through the command line
# A base that really captions its training photos (validation CIDEr 10 on them), so the validation
# guard has something to protect: with replay the candidate keeps it and is promoted within the
# default 3% margin; without replay it forgets and is rejected for the drop alone.


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("trained")
    data = make_flickr(root / "flickr", n_train=4, n_val=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "java_available", lambda: False)
        assert main(tiny_fit_args(f"flickr:{data}", root / "run", root / "cache", epochs=20, batch_size=2,
                                  lr=3e-2, min_lr_ratio=0.3, patience=100, progress=False, embed_dim=32,
                                  attention_dim=32, hidden_dim=64)) == 0
    return root / "run" / "last", data


@pytest.fixture
def bot_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    monkeypatch.setattr(metrics, "java_available", lambda: False)  # a JVM start per scoring is slow
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    asyncio.run(_fill_database(url, tmp_path / "botdata"))
    return url, tmp_path / "botdata"


def _cli(tmp: Path, base: Path, *options: str) -> list[str]:
    return ["finetune", "--base", str(base), "--out", str(tmp / "candidates"), "--cache", str(tmp / "cache"),
            "--device", "cpu", "--val-split", "train", "--epochs", "20", "--lr", "1e-2", "--batch-size", "16",
            "--holdout", "0.5",
            # The tiny model on the tests' two dozen photos learns certain but small gains; the
            # default effect-size floor is for real data (bench/learning_loop.py).
            "--min-gain", "0.001",
            *options]


def _report(tmp: Path, name: str) -> dict[str, Any]:
    return dict(json.loads((tmp / "candidates" / name / "finetune_report.json").read_text()))


@pytest.mark.slow
def test_cli_passes_a_candidate_within_the_validation_margin_and_an_operator_approves_it(
        trained_base: tuple[Path, Path], bot_database: tuple[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (base, _), (url, data_dir) = trained_base, bot_database
    code = main(_cli(tmp_path, base, "--db", url, "--data-dir", str(data_dir), "--replay-ratio", "2",
                     "--name", "cand-kept", "--promotion", "auto"))
    report = _report(tmp_path, "cand-kept")
    # Even in auto mode, a candidate that adds words waits for an operator.
    assert "bicycle" in report["new_words"] and report["passed_gate"]
    assert code == EXIT_AWAITING_REVIEW
    assert capsys.readouterr().out.startswith("AWAITING REVIEW cand-kept:")
    assert ("cand-kept", "awaiting_review", None) in asyncio.run(_versions(url, data_dir))[0]
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("CAPTIONBOT_DATA_DIR", str(data_dir))
    assert main(["review"]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("cand-kept (from ") and "bicycle" in listed
    assert "python -m train approve cand-kept" in listed
    assert main(["reject", report["parent"], "--reason", "x"]) == 1  # only a waiting candidate can be decided
    assert "not awaiting review" in capsys.readouterr().err
    assert main(["approve", "cand-kept"]) == EXIT_PROMOTED
    assert capsys.readouterr().out.startswith("APPROVED cand-kept: it is now the active model")
    assert report["config"]["margin"] == 0.03  # the default guard, not switched off
    base_val, cand_val = report["base"]["validation"]["CIDEr"], report["candidate"]["validation"]["CIDEr"]
    assert base_val > 1.0 and cand_val >= base_val * (1 - 0.03)
    key = corrections_metric(report["base"]["corrections"], report["candidate"]["corrections"])
    assert report["candidate"]["corrections"][key] > report["base"]["corrections"][key]
    assert report["heldout_gain_lower_bound"] > 0
    versions, untrained = asyncio.run(_versions(url, data_dir))
    assert ("cand-kept", "active", None) in versions
    assert untrained == report["corrections_heldout_photos"]
    main(["review"])
    assert capsys.readouterr().out == "no candidates waiting for review\n"


@pytest.mark.slow
def test_cli_rejects_a_candidate_that_forgets_its_validation_data(
        trained_base: tuple[Path, Path], bot_database: tuple[str, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    (base, _), (url, data_dir) = trained_base, bot_database
    code = main(_cli(tmp_path, base, "--db", url, "--data-dir", str(data_dir), "--replay-ratio", "0",
                     "--name", "cand-forgot"))
    assert code == EXIT_REJECTED
    out = capsys.readouterr().out
    assert out.startswith("REJECTED cand-forgot: validation CIDEr dropped")
    report = _report(tmp_path, "cand-forgot")
    # Better on the corrections, significantly so: only the validation guard stopped it.
    assert report["candidate"]["corrections"]["CIDEr"] > report["base"]["corrections"]["CIDEr"]
    assert report["heldout_gain_lower_bound"] > 0
    assert report["candidate"]["validation"]["CIDEr"] < 0.97 * report["base"]["validation"]["CIDEr"]
    versions, untrained = asyncio.run(_versions(url, data_dir))
    assert ("cand-forgot", "rejected", report["reason"]) in versions
    assert untrained == report["corrections_heldout_photos"]  # the trained part is marked rejected_run


@pytest.mark.slow
def test_cli_learns_from_an_export_folder(trained_base: tuple[Path, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    base, _ = trained_base
    # the export holds out the storage rule's fifth: enough photos that the gate has five to judge on
    url, data_dir = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", tmp_path / "botdata"
    asyncio.run(_fill_database(url, data_dir, n_photos=23))  # 6 held out under TEST_SALT
    export = tmp_path / "export"
    asyncio.run(_export(url, data_dir, export))
    held_out = (export / "val.txt").read_text().split()
    assert held_out
    code = main(_cli(tmp_path, base, "--from-export", str(export), "--replay-ratio", "2", "--name", "cand-export"))
    assert code == EXIT_AWAITING_REVIEW, capsys.readouterr()  # it adds words
    report = _report(tmp_path, "cand-export")
    assert report["corrections_heldout_photos"] == len(held_out)
    assert report["corrections_train_photos"] == 23 - len(held_out)
    versions, untrained = asyncio.run(_versions(url, data_dir))
    assert versions == [] and untrained == 23  # an export run registers nothing


async def _export(url: str, data_dir: Path, out: Path) -> None:
    from storage.export import export_training_data

    store = await Storage.open(url, data_dir)
    try:
        await export_training_data(store, out)
    finally:
        await store.close()


def test_held_out_photos_follow_the_storage_rule_and_the_holdout_fraction(tmp_path: Path) -> None:
    from train.finetune import split_corrections
    from train.trust import CorrectionRow

    salt = b"k" * 32
    rows = [CorrectionRow(f"{i:064x}", tmp_path / f"{i}.jpg", f"caption {i}", i, i) for i in range(200)]
    split = split_corrections(rows, salt, 0.2, 0.1)
    assert {r.image_id for r in split.heldout} == {f"photo:{r.sha256}" for r in rows if is_held_out(r.sha256, salt)}
    assert sorted(split.correction_ids) == sorted(r.person_id for r in rows if not is_held_out(r.sha256, salt))
    assert not split_corrections(rows, salt, 0.0, 0.1).heldout and not split_corrections(rows, salt, 1.0, 1.0).train


def test_the_database_is_the_one_in_the_bots_data_folder_unless_told(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from common.settings import Settings
    from train.finetune import database_url, with_bot_storage

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CAPTIONBOT_DATA_DIR", raising=False)
    assert database_url(FinetuneConfig(data_dir=str(tmp_path))) == f"sqlite+aiosqlite:///{tmp_path}/captionbot.db"
    # The command line fills in the bot's own settings (DATABASE_URL, CAPTIONBOT_DATA_DIR) ...
    monkeypatch.setenv("DATABASE_URL", "sqlite+aiosqlite:///from-env.db")
    monkeypatch.setenv("CAPTIONBOT_DATA_DIR", str(tmp_path / "bot-data"))
    from_settings = with_bot_storage(FinetuneConfig(), Settings())
    assert database_url(from_settings) == "sqlite+aiosqlite:///from-env.db"
    assert from_settings.data_dir == str(tmp_path / "bot-data")
    # ... and --db / --data-dir win over them.
    given = with_bot_storage(FinetuneConfig(db="sqlite+aiosqlite:///given.db", data_dir=str(tmp_path)), Settings())
    assert database_url(given) == "sqlite+aiosqlite:///given.db" and given.data_dir == str(tmp_path)
