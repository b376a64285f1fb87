"""``python -m train ship``: float16 weights, the shipping metadata, stale scores dropped, a whole swap."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.inference import beam_config_from_meta
from tests.helpers import make_checkpoint
from train.__main__ import main


def ship_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["ship", "--model", str(model), "--out", str(out), "--version", "tiny-v2", "--training",
            "python -m train fit ... --scst", "--beam", "5", "--length-penalty", "1.0", "--block-ngram", "3", *extra]


def test_ship_writes_a_half_precision_model_with_its_provenance_and_no_stale_scores(tmp_path: Path) -> None:
    run = make_checkpoint(tmp_path / "run" / "best", version="run-best")
    checkpoint.update_meta(run, "metrics", {"CIDEr": 0.9})  # measured on the float32 weights: not carried
    checkpoint.update_meta(run, "trained_on", "flickr:data")
    history = tmp_path / "run" / "history.json"
    recorded = {"epochs": [{"epoch": 0}], "config": {"scst": True, "scst_sampling": "beam", "scst_samples": 5,
                                                       "scst_baseline": "mean"}}
    history.write_text(json.dumps(recorded))
    out = tmp_path / "models" / "default"
    old = make_checkpoint(out, version="old-v1", seed=1)
    assert old == out

    assert main(ship_args(run, out, "--history", str(history))) == 0

    document = checkpoint.read_document(out)
    meta = document["meta"]
    assert document["dtype"] == "float16"
    assert meta["version"] == "tiny-v2" and meta["trained_on"] == "flickr:data"
    assert meta["training"].endswith("--scst") and meta["histories"] == ["history.json"]
    assert "metrics" not in meta and "confidence" not in meta
    assert beam_config_from_meta(meta) == beam_config_from_meta(
        {"decoding": {"beam_size": 5, "max_len": 20, "length_penalty": 1.0, "block_ngram": 3}})
    assert json.loads((out / "history.json").read_text()) == recorded
    # Trained self-critically (its history says so): its fine-tunes end with self-critical epochs.
    assert meta["scst"] == {"sampling": "beam", "samples": 5, "baseline": "mean"}
    # The weights are the run's, rounded to float16; nothing of the old model or the staging is left.
    shipped, original = checkpoint.load(out), checkpoint.load(run)
    for (name, a), (_, b) in zip(shipped.decoder.state_dict().items(), original.decoder.state_dict().items(),
                                 strict=True):
        assert torch.allclose(a, b.half().float()), name
    assert sorted(p.name for p in out.parent.iterdir()) == ["default"]


def test_ship_refuses_to_replace_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    run = make_checkpoint(tmp_path / "best")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not a checkpoint"):
        main(ship_args(run, precious))
    assert (precious / "notes.txt").read_text() == "keep me"


def test_ship_records_where_it_trained_and_what_its_fine_tunes_replay(tmp_path: Path) -> None:
    from tests.test_train_support import make_flickr
    from train.finetune import FinetuneConfig, _reference_data

    run = make_checkpoint(tmp_path / "run" / "best", version="run-best")
    checkpoint.update_meta(run, "trained_on", "flickr:/machine/of/the/run/mirror")
    original = make_flickr(tmp_path / "original", n_train=3, n_val=2)
    out = tmp_path / "shipped"
    assert main(ship_args(run, out, "--trained-on", "flickr:data/mirror", "--replay-data", f"flickr:{original}")) == 0
    meta = checkpoint.read_document(out)["meta"]
    assert meta["trained_on"] == "flickr:data/mirror" and meta["replay_data"] == f"flickr:{original}"
    # The learning loop replays the photos it was shipped to replay, not the (absent) mirrored set.
    replay, val = _reference_data(FinetuneConfig(), checkpoint.load(out))
    assert [r.image_id for r in replay] == [f"train_{i}.jpg" for i in range(3)]
    assert len(val) == 2
