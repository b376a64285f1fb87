"""bench/combine.py: its ways of combining models do what they say, and the script runs end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.combine import ViewEnsemble, averaged_weights, consensus_choices
from captioner import checkpoint
from captioner.beam import BeamConfig, SpecialIds, beam_search
from tests.helpers import make_checkpoint
from tests.test_bench_smoke import assert_reports_its_run, run_bench
from tests.test_train_support import make_flickr

BEAM = BeamConfig(beam_size=3, max_len=6, length_penalty=1.0)


def test_averaged_weights_are_the_mean_of_each_tensor(tmp_path: Path) -> None:
    paths = [str(make_checkpoint(tmp_path / f"m{seed}", seed=seed, version=f"m{seed}")) for seed in (0, 1, 2)]
    averaged = averaged_weights(paths)
    states = [checkpoint.load(p).decoder.state_dict() for p in paths]
    for name, tensor in averaged.decoder.state_dict().items():
        torch.testing.assert_close(tensor, (states[0][name] + states[1][name] + states[2][name]) / 3)
    assert averaged.version == "mean of m0 + m1 + m2"


def test_models_with_other_words_are_not_averaged(tmp_path: Path) -> None:
    first = make_checkpoint(tmp_path / "a", words=["a", "dog", "runs"])
    other = make_checkpoint(tmp_path / "b", words=["a", "cat", "sits"])
    with pytest.raises(SystemExit, match="differ in architecture or words"):
        averaged_weights([str(first), str(other)])


def test_a_view_ensemble_of_one_view_twice_is_the_decoder_itself(tmp_path: Path) -> None:
    decoder = checkpoint.load(make_checkpoint(tmp_path / "m")).decoder
    torch.manual_seed(7)
    photo, mirror = torch.randn(2, 4, 9, decoder.encoder_dim)
    views = ViewEnsemble([decoder, decoder])
    alone = beam_search(decoder, photo, BEAM, SpecialIds())
    twice = beam_search(views, torch.cat([photo, photo], dim=-1), BEAM, SpecialIds())
    assert [h.tokens for h in twice] == [h.tokens for h in alone]
    assert [h.log_prob for h in twice] == pytest.approx([h.log_prob for h in alone], abs=1e-5)
    # Each member reads its own half: another second view changes the scores.
    both = beam_search(views, torch.cat([photo, mirror], dim=-1), BEAM, SpecialIds())
    assert [h.log_prob for h in both] != pytest.approx([h.log_prob for h in alone], abs=1e-5)


def test_consensus_picks_the_caption_the_others_agree_with() -> None:
    candidates = {
        "1": [s.split() for s in ("a red bird flies", "a dog runs on the grass", "a brown dog runs on the grass",
                                  "a dog runs on grass")],
        "2": [s.split() for s in ("a man rides a bike", "a man rides a bike")],  # a tie: the beam's first
        "3": [["people"]],
    }
    chosen = {image: " ".join(words) for image, words in consensus_choices(candidates).items()}
    assert chosen == {"1": "a dog runs on the grass", "2": "a man rides a bike", "3": "people"}


@pytest.mark.slow
def test_the_bench_scores_every_way_of_combining(tmp_path: Path) -> None:
    data = f"flickr:{make_flickr(tmp_path / 'data', n_train=2, n_val=3)}"
    first, second = (make_checkpoint(tmp_path / f"m{seed}", seed=seed, version=f"m{seed}") for seed in (0, 1))
    out, cache = tmp_path / "combine.json", tmp_path / "cache"
    document = run_bench("combine.py", out, "--model", str(first), "--member", str(second), "--data", data,
                         "--cache", str(cache), "--json", str(out))
    assert_reports_its_run(document, "combine.py", tmp_path)
    rows = document["results"]
    assert [(r["kind"], r["models"]) for r in rows] == [
        ("member", ["m0"]), ("member", ["m1"]), ("weights averaged", ["m0", "m1"]), ("ensemble", ["m0", "m1"]),
        ("both views", ["m0"]), ("consensus", ["m0"])]
    assert rows[0]["ratio_to_model"]["Bleu_1"] == 1.0
    assert all(r["n_images"] == 3 and r["decode_seconds"] >= 0 for r in rows)
    assert sorted(p.name for p in (cache / "mirrored-photos" / "val").iterdir()) == [
        "val_0.jpg.png", "val_1.jpg.png", "val_2.jpg.png"]
