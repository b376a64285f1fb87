"""End-to-end training on tiny generated data: overfitting, exact resume, raw images, fine-tuning stage."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.inference import Captioner
from captioner.vocab import tokenize
from tests.test_train_support import CAPTIONS, make_flickr, tiny_fit_args
from train import fit as fit_module
from train import metrics
from train.__main__ import main


@pytest.fixture(autouse=True)
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation without the Java PTB tokenizer: one JVM start per epoch would dominate these tests."""
    monkeypatch.setattr(metrics, "java_available", lambda: False)


@pytest.fixture
def flickr(tmp_path: Path) -> str:
    return f"flickr:{make_flickr(tmp_path / 'data', n_train=4, n_val=2)}"


def history(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "history.json").read_text()))


def without_timings(doc: dict[str, Any]) -> dict[str, Any]:
    epochs = [{k: v for k, v in e.items() if not k.endswith("_seconds")} for e in doc["epochs"]]
    config = {k: v for k, v in doc["config"].items() if k != "out"}
    return {**doc, "epochs": epochs, "config": config}


def assert_same_run(straight: Path, resumed: Path) -> None:
    """Weights, optimizer state and history of a resumed run equal those of an uninterrupted one."""
    for folder, name in [("last", "model.safetensors"), ("last", "trainer.safetensors"), ("best", "model.safetensors")]:
        a, b = load_file(str(straight / folder / name)), load_file(str(resumed / folder / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{folder}/{name}: {key} differs"
    assert without_timings(history(straight)) == without_timings(history(resumed))


@pytest.mark.slow
def test_tiny_fit_overfits_a_few_images(tmp_path: Path, flickr: str) -> None:
    out = tmp_path / "run"
    # 4 images x 5 captions, batches of 2: 10 steps an epoch, 200 steps in all.
    assert main(tiny_fit_args(flickr, out, tmp_path / "cache", epochs=20, batch_size=2, lr=3e-2,
                              min_lr_ratio=0.3, patience=100, progress=False, embed_dim=32,
                              attention_dim=32, hidden_dim=64)) == 0
    losses = [e["train_loss"] for e in history(out)["epochs"]]
    assert len(losses) == 20
    assert losses[-1] < 0.1 * losses[0] and losses[-1] < 0.2
    assert all(later < earlier for earlier, later in itertools.pairwise(losses[:6]))
    captioner = Captioner(checkpoint.load(out / "last"), "cpu", BeamConfig(beam_size=3, max_len=12))
    data = Path(flickr.split(":", 1)[1])
    for i in range(4):
        caption = captioner.caption_bytes((data / "images" / f"train_{i}.jpg").read_bytes(), attention=False)
        assert list(caption.words) == tokenize(CAPTIONS[i])
    assert (out / "best" / "model.json").is_file() and (out / "best_val_captions.json").is_file()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = checkpoint.read_document(out / "best")["meta"]
    assert meta["trained_on"] == flickr and "val_CIDEr" in meta["metrics"]
    assert meta["decoding"]["beam_size"] == 2


def test_a_run_killed_inside_an_epoch_resumes_exactly(tmp_path: Path, flickr: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # One batch per chunk and a checkpoint at every chunk: OUT/last is saved inside each epoch.
    monkeypatch.setattr(fit_module, "CHUNK_BATCHES", 1)
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    options: dict[str, Any] = dict(epochs=2, dropout=0.3, progress=False, checkpoint_minutes=1e-9)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(tiny_fit_args(flickr, straight, tmp_path / "cache", **options))

    save_mid_epoch = fit_module._save_mid_epoch
    saves: list[int] = []

    def killed_inside_the_second_epoch(*args: Any) -> None:
        save_mid_epoch(*args)
        saves.append(args[3])  # the epoch index
        if saves.count(1) == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(fit_module, "_save_mid_epoch", killed_inside_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_fit_args(flickr, resumed, tmp_path / "cache", **options))
    state = json.loads((resumed / "last" / "trainer.json").read_text())["info"]
    assert state["epoch"] == 0 and state["within_epoch"]["batches_done"] == 2
    monkeypatch.setattr(fit_module, "_save_mid_epoch", save_mid_epoch)
    main(tiny_fit_args(flickr, resumed, tmp_path / "cache", resume=True, **options))

    assert_same_run(straight, resumed)


def test_progress_says_where_in_the_epoch_each_chunk_ends(tmp_path: Path, flickr: str,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # 4 images x 5 captions in batches of 4: 5 batches an epoch, trained 2 at a time.
    monkeypatch.setattr(fit_module, "CHUNK_BATCHES", 2)
    with caplog.at_level("INFO", logger="train"):
        main(tiny_fit_args(flickr, tmp_path / "run", tmp_path / "cache", epochs=1, progress=True))
    lines = [r.getMessage() for r in caplog.records if "batches/s" in r.getMessage()]
    assert [line.split(",")[0] for line in lines] == ["epoch 0: batch 2/5", "epoch 0: batch 4/5",
                                                     "epoch 0: batch 5/5"]
    assert all(" loss " in line for line in lines)


def test_resume_continues_exactly(tmp_path: Path, flickr: str, monkeypatch: pytest.MonkeyPatch) -> None:
    options: dict[str, Any] = dict(epochs=3, dropout=0.3, label_smoothing=0.1, weight_decay=0.01,
                                   progress=False)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(tiny_fit_args(flickr, straight, tmp_path / "cache", **options))

    save_epoch = fit_module._save_epoch

    def killed_after_second_epoch(*args: Any) -> None:
        save_epoch(*args)
        if args[4] == 1:  # epoch index
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(fit_module, "_save_epoch", killed_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_fit_args(flickr, resumed, tmp_path / "cache", **options))
    monkeypatch.undo()
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    assert len(history(resumed)["epochs"]) == 2
    main(tiny_fit_args(flickr, resumed, tmp_path / "cache", resume=True, **options))

    assert_same_run(straight, resumed)
    a_state = json.loads((straight / "last" / "trainer.json").read_text())
    b_state = json.loads((resumed / "last" / "trainer.json").read_text())
    assert a_state["param_groups"] == b_state["param_groups"] and a_state["scalars"] == b_state["scalars"]
    assert a_state["info"]["step"] == b_state["info"]["step"] == 15

    # Resuming a finished run trains no further.
    main(tiny_fit_args(flickr, resumed, tmp_path / "cache", resume=True, **options))
    assert len(history(resumed)["epochs"]) == 3


def test_raw_images_then_fine_tuning_the_top_encoder_block(tmp_path: Path, flickr: str) -> None:
    cached, raw = tmp_path / "cached", tmp_path / "raw"
    main(tiny_fit_args(flickr, cached, tmp_path / "cache", epochs=1, progress=False))
    cache_folders = sorted((tmp_path / "cache").iterdir())
    main(tiny_fit_args(flickr, raw, tmp_path / "cache", epochs=1, progress=False, raw_images=True))
    # Same data order and initialisation: the losses differ only by the cache's float16 rounding.
    raw_loss = history(raw)["epochs"][0]["train_loss"]
    assert raw_loss == pytest.approx(history(cached)["epochs"][0]["train_loss"], abs=1e-3)

    # Stage 2: start from the cached run's model and unfreeze the top block. The cache gets a folder
    # for the frozen part's maps; the top block runs at each step.
    tuned = tmp_path / "tuned"
    # The parent's own facts, measured on its weights, must not pass to the child.
    checkpoint.update_meta(cached / "best", "confidence", {"min_score": -1.0})
    checkpoint.update_meta(cached / "best", "training", "the parent's command")
    main(tiny_fit_args(flickr, tuned, tmp_path / "cache", epochs=2, progress=False, init_from=cached / "best",
                       fine_tune_blocks=1, lr=1e-3, encoder_lr=1e-2, embed_dim=99))
    (maps_folder,) = set((tmp_path / "cache").iterdir()) - set(cache_folders)
    assert "-stages3-" in maps_folder.name
    before, after = checkpoint.load(cached / "best"), checkpoint.load(tuned / "last")
    assert after.config.fine_tune_blocks == 1 and after.config.embed_dim == before.config.embed_dim
    assert checkpoint.read_document(tuned / "last")["stores_encoder"]
    child_meta = checkpoint.read_document(tuned / "last")["meta"]
    assert child_meta["parent"] == checkpoint.read_document(cached / "best")["meta"]["version"]
    assert "confidence" not in child_meta and "training" not in child_meta
    assert after.vocab.words == before.vocab.words
    old, new = before.encoder.backbone.state_dict(), after.encoder.backbone.state_dict()
    top = "stages.3."
    for key in old:
        changed = not torch.equal(old[key], new[key])
        assert changed == key.startswith(top), key
    epochs = history(tuned)["epochs"]
    assert history(tuned)["config"]["raw_images"] is False and len(epochs) == 2
    # The history records the architecture trained (the checkpoint's), not the ignored --embed-dim 99.
    assert history(tuned)["config"]["model"] == after.config.to_json()
    assert history(tuned)["config"]["model"]["embed_dim"] == before.config.embed_dim != 99
    # It starts from the trained decoder, not from scratch.
    assert epochs[0]["train_loss"] < history(cached)["epochs"][0]["train_loss"]
    # The same stage from raw images: the losses differ only by the cached maps' float16 rounding.
    tuned_raw = tmp_path / "tuned-raw"
    main(tiny_fit_args(flickr, tuned_raw, tmp_path / "cache", epochs=2, progress=False, init_from=cached / "best",
                       fine_tune_blocks=1, lr=1e-3, encoder_lr=1e-2, raw_images=True))
    raw_epochs = history(tuned_raw)["epochs"]
    for cached_epoch, raw_epoch in zip(epochs, raw_epochs, strict=True):
        assert cached_epoch["train_loss"] == pytest.approx(raw_epoch["train_loss"], abs=2e-3)


def test_unknown_images_stop_the_run_before_training(tmp_path: Path, flickr: str) -> None:
    data = Path(flickr.split(":", 1)[1])
    (data / "images" / "train_3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_3\.jpg"):
        main(tiny_fit_args(flickr, tmp_path / "run", tmp_path / "cache", raw_images=True, progress=False))
    with pytest.raises(FileNotFoundError, match=r"train_3\.jpg"):
        main(tiny_fit_args(flickr, tmp_path / "run", tmp_path / "cache", progress=False))
