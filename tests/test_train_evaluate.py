"""`python -m train evaluate`: pycocoevalcap's keys in --json, captions written, METEOR without Java."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from captioner import checkpoint
from tests.helpers import make_checkpoint
from tests.test_train_support import make_flickr
from train import metrics
from train.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
JSON_KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "n_images"]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, str]:
    return make_checkpoint(tmp_path / "model"), f"flickr:{make_flickr(tmp_path / 'data', n_train=2, n_val=3)}"


@pytest.mark.slow
def test_json_output_has_exactly_pycocoevalcaps_keys(tmp_path: Path, setup: tuple[Path, str]) -> None:
    model, data = setup
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "train", "evaluate", "--model", str(model), "--data", data, "--split", "val",
               "--beam", "2", "--json", "--captions-out", str(tmp_path / "captions.json"),
               "--cache", str(tmp_path / "cache")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout  # nothing but the JSON object on stdout
    result = json.loads(lines[0])
    assert list(result) == JSON_KEYS
    assert result["n_images"] == 3
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L"):
        assert isinstance(result[key], float) and 0.0 <= result[key] <= 1.0
    assert isinstance(result["CIDEr"], float) and result["CIDEr"] >= 0.0
    if shutil.which("java"):
        assert isinstance(result["METEOR"], float) and 0.0 <= result["METEOR"] <= 1.0
    else:
        assert result["METEOR"] is None and "METEOR skipped" in done.stderr
    captions = json.loads((tmp_path / "captions.json").read_text())
    assert sorted(captions) == ["val_0.jpg", "val_1.jpg", "val_2.jpg"]
    assert all(isinstance(c, str) and c for c in captions.values())
    assert any((tmp_path / "cache").iterdir())  # features went through the cache


def test_without_java_meteor_is_null_in_json_and_said_to_be_skipped(
        tmp_path: Path, setup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    model, data = setup
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(metrics, "_logged", set())
    monkeypatch.chdir(tmp_path)
    base = ["evaluate", "--model", str(model), "--data", data, "--split", "val", "--no-cache", "--limit", "2"]
    assert main([*base, "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert list(result) == JSON_KEYS and result["METEOR"] is None and result["n_images"] == 2
    assert all(isinstance(result[k], float) for k in JSON_KEYS if k not in ("METEOR", "n_images"))
    assert "warning: Java not found: METEOR skipped" in err
    assert sorted(json.loads((tmp_path / "captions_val.json").read_text())) == ["val_0.jpg", "val_1.jpg"]

    assert main(base) == 0
    text = capsys.readouterr().out
    assert "METEOR: skipped (Java not found)" in text and "CIDEr:" in text and "2 images of val" in text


def test_write_metrics_stores_the_printed_scores_in_the_checkpoint(
        tmp_path: Path, setup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    model, data = setup
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    weights = (model / "model.safetensors").read_bytes()
    before = json.loads((model / "model.json").read_text())
    assert main(["evaluate", "--model", str(model), "--data", data, "--split", "val", "--no-cache", "--limit", "2",
                 "--beam", "2", "--block-ngram", "3", "--json", "--write-metrics"]) == 0
    printed = json.loads(capsys.readouterr().out)  # stdout is still the one JSON object
    after = json.loads((model / "model.json").read_text())
    stored = after["meta"]["metrics"]
    assert {k: stored[k] for k in JSON_KEYS} == printed
    assert stored["split"] == "val" and stored["data"] == data and stored["n_images"] == 2
    assert stored["decoding"] == {"beam_size": 2, "max_len": 20, "length_penalty": 0.0, "block_ngram": 3,
                                  "forbid_unk": True}
    assert datetime.fromisoformat(stored["date"]).tzinfo is not None
    assert stored["command"].startswith("python -m train evaluate --model ") and "--beam 2" in stored["command"]
    # Only meta.metrics changed: the same weights, config, vocabulary and the rest of meta.
    assert (model / "model.safetensors").read_bytes() == weights
    assert {k: v for k, v in after.items() if k != "meta"} == {k: v for k, v in before.items() if k != "meta"}
    assert {k: v for k, v in after["meta"].items() if k != "metrics"} == before["meta"]
    assert checkpoint.read_document(model)["meta"]["metrics"] == stored


def test_without_write_metrics_the_checkpoint_is_not_touched(
        tmp_path: Path, setup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = setup
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    document = (model / "model.json").read_bytes()
    assert main(["evaluate", "--model", str(model), "--data", data, "--no-cache", "--limit", "1", "--json"]) == 0
    assert (model / "model.json").read_bytes() == document


def test_write_metrics_keeps_float16_weights_bit_for_bit(tmp_path: Path) -> None:
    """The shipped default model is stored in float16; rewriting its metadata must not touch its weights."""
    import torch

    from train.evaluate import write_metrics

    folder = checkpoint.save(checkpoint.load(make_checkpoint(tmp_path / "f32")), tmp_path / "f16", dtype=torch.float16)
    weights = (folder / "model.safetensors").read_bytes()
    write_metrics(str(folder), {"CIDEr": 0.5})
    assert (folder / "model.safetensors").read_bytes() == weights
    document = checkpoint.read_document(folder)
    assert document["dtype"] == "float16" and document["meta"]["metrics"] == {"CIDEr": 0.5}


def test_ensemble_decodes_with_every_model_and_never_writes_its_scores_into_one(
        tmp_path: Path, setup: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = setup
    other = make_checkpoint(tmp_path / "other", seed=5, version="other-v1")
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    monkeypatch.chdir(tmp_path)

    def captions(*extra: str) -> dict[str, str]:
        out = tmp_path / f"captions{len(extra)}.json"
        args = ["evaluate", "--model", str(model), "--data", data, "--no-cache", "--beam", "2",
                "--captions-out", str(out), *extra]
        assert main(args) == 0
        return dict(json.loads(out.read_text()))

    alone = captions()
    # A model in an ensemble with itself is that model; with another one, the words change.
    assert captions("--ensemble", str(model)) == alone
    assert captions("--ensemble", str(other), "--ensemble", str(other)) != alone
    document = (model / "model.json").read_bytes()
    assert main(["evaluate", "--model", str(model), "--ensemble", str(other), "--data", data, "--no-cache",
                 "--write-metrics"]) == 2
    assert (model / "model.json").read_bytes() == document
