"""Self-critical training: the CIDEr-D reward against pycocoevalcap, sampling, the gradient's sign, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocoevalcap.cider.cider import Cider
from safetensors.torch import load_file

from captioner import checkpoint
from captioner.beam import BeamConfig, beam_search, n_best
from captioner.model import Decoder
from tests.helpers import TINY_WORDS, make_checkpoint, tiny_config
from tests.test_train_support import make_flickr, tiny_fit_args
from train import fit as fit_module
from train import metrics
from train.__main__ import main
from train.cider import CiderD
from train.loop import Example
from train.scst import (
    SelfCritical,
    beam_candidates,
    caption_words,
    sample_captions,
    self_critical_loss,
    special_ids,
)


@pytest.fixture(autouse=True)
def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "java_available", lambda: False)


def random_corpus(seed: int, images: int = 40) -> tuple[dict[str, list[list[str]]], dict[str, list[str]]]:
    """References (1-5 per image, some repeating n-grams) and one caption per image, some empty or unseen."""
    rng = random.Random(seed)
    words = [*TINY_WORDS, "black", "white", "jumps"]
    refs = {f"img{i}": [[rng.choice(words) for _ in range(rng.randint(1, 14))] for _ in range(rng.randint(1, 5))]
            for i in range(images)}
    caps = {key: [rng.choice([*words, "zebra"]) for _ in range(rng.randint(0, 14))] for key in refs}
    caps["img0"] = list(refs["img0"][0])  # a caption equal to one of its references
    caps["img1"] = ["dog"] * 6  # clipping: repeating a matched word earns no more than the reference has
    return refs, caps


def pycocoevalcap_cider(refs: dict[str, list[list[str]]], caps: dict[str, list[str]]) -> np.ndarray:
    _, scores = Cider().compute_score({k: [" ".join(r) for r in v] for k, v in refs.items()},
                                      {k: [" ".join(caps[k])] for k in refs})
    return np.asarray(scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cider_d_equals_pycocoevalcap(seed: int) -> None:
    refs, caps = random_corpus(seed)
    theirs = pycocoevalcap_cider(refs, caps)
    assert theirs.max() > 1.0 and (theirs == 0).any()  # the sample spans matches and misses
    ours = CiderD(refs).score(list(refs), [caps[k] for k in refs])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_cider_d_scores_a_subset_with_the_whole_corpus_frequencies() -> None:
    """Document frequencies come from every image's references, whichever images a batch scores."""
    refs, caps = random_corpus(3)
    theirs = pycocoevalcap_cider(refs, caps)
    keys = list(refs)
    chosen = [5, 2, 2, 17, 30]  # repeats too: several samples of one image
    ours = CiderD(refs).score([keys[i] for i in chosen], [caps[keys[i]] for i in chosen])
    np.testing.assert_allclose(ours, theirs[chosen], rtol=0, atol=1e-6)


def tiny_decoder(seed: int = 0) -> tuple[Decoder, Any]:
    torch.manual_seed(seed)
    config = tiny_config()
    vocab_words = ["<pad>", "<start>", "<end>", "<unk>", *TINY_WORDS]
    decoder = Decoder(config, encoder_dim=8, vocab_size=len(vocab_words))
    return decoder, vocab_words


def test_sampling_never_emits_what_beam_search_forbids(tiny_checkpoint: Path) -> None:
    model = checkpoint.load(tiny_checkpoint)
    special = special_ids(model.vocab)
    torch.manual_seed(0)
    features = torch.randn(3, 4, model.decoder.encoder_dim)
    drawn = sample_captions(model.decoder, features, samples=50, max_len=8, special=special)
    tokens, mask = drawn.tokens, drawn.mask
    assert tokens.shape[0] == 150 and tokens.shape == drawn.log_probs.shape == mask.shape
    assert not torch.isin(tokens[mask.bool()], torch.tensor([special.pad, special.start, special.unk])).any()
    assert (tokens[:, 0] != special.end).all()
    ended = (tokens == special.end).cumsum(1) > 0
    after_end = torch.cat([torch.zeros(150, 1, dtype=torch.bool), ended[:, :-1]], 1)
    assert torch.equal(mask.bool(), ~after_end)  # counted up to and including <end>
    assert (tokens[after_end] == special.pad).all() and (drawn.log_probs[after_end] == 0).all()
    assert (drawn.log_probs[mask.bool()] < 0).all()
    assert len({tuple(row) for row in tokens.tolist()}) > 100  # sampled, not decoded greedily
    words = caption_words(tokens, model.vocab)
    assert all(len(w) == int(m.sum()) - int(special.end in row) for w, m, row in zip(words, mask, tokens.tolist(),
                                                                                     strict=True))


def sequence_log_probs(decoder: Decoder, features: torch.Tensor, tokens: torch.Tensor, special: Any) -> torch.Tensor:
    with torch.no_grad():
        scored = sample_captions(decoder, features, 1, tokens.size(1), special, given=tokens)
    return (scored.log_probs * scored.mask).sum(1)


@pytest.mark.parametrize("best", [0, 2])
def test_the_loss_moves_probability_toward_the_better_sample(tiny_checkpoint: Path, best: int) -> None:
    model = checkpoint.load(tiny_checkpoint)
    decoder, special = model.decoder, special_ids(model.vocab)
    torch.manual_seed(1)
    features = torch.randn(1, 4, decoder.encoder_dim)
    drawn = sample_captions(decoder, features, samples=4, max_len=6, special=special)
    assert len({tuple(r) for r in drawn.tokens.tolist()}) == 4
    rewards = torch.zeros(1, 4)
    rewards[0, best] = 1.0  # one sample beats its siblings
    before = sequence_log_probs(decoder, features.repeat(4, 1, 1), drawn.tokens, special)
    self_critical_loss(drawn.log_probs, drawn.mask, rewards).backward()
    with torch.no_grad():
        for p in decoder.parameters():
            p -= 0.05 * p.grad
    change = sequence_log_probs(decoder, features.repeat(4, 1, 1), drawn.tokens, special) - before
    others = [i for i in range(4) if i != best]
    # The better sample gains; its siblings lose on average (one may share enough with it to gain a little).
    assert change[best] > 0 and change[best] > change[others].max() and change[others].mean() < 0

    # Equal rewards: every sample is its own baseline, nothing to learn.
    decoder.zero_grad()
    again = sample_captions(decoder, features, samples=4, max_len=6, special=special)
    self_critical_loss(again.log_probs, again.mask, torch.full((1, 4), 0.7)).backward()
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for p in decoder.parameters())


def test_beam_candidates_are_the_final_beams_best_first_scored_with_gradients(tiny_checkpoint: Path) -> None:
    model = checkpoint.load(tiny_checkpoint)
    decoder, special = model.decoder, special_ids(model.vocab)
    torch.manual_seed(2)
    features = torch.randn(3, 4, decoder.encoder_dim)
    beam = BeamConfig(beam_size=4, max_len=7, length_penalty=1.0, block_ngram=3)
    with torch.no_grad():
        found = n_best(decoder, features, beam, special)
        best = beam_search(decoder, features, beam, special)
    assert [beams[0].tokens for beams in found] == [h.tokens for h in best]  # the served caption leads
    assert all(len(beams) == 4 and len({tuple(h.tokens) for h in beams}) == 4 for beams in found)
    assert all([h.score for h in beams] == sorted((h.score for h in beams), reverse=True) for beams in found)

    candidates = beam_candidates(decoder, features, beam, special)
    assert candidates.log_probs.requires_grad
    words = caption_words(candidates.tokens, model.vocab)
    assert words == [[model.vocab.words[t] for t in h.tokens] for beams in found for h in beams]
    # Scored again, each candidate's log-probability is at least the one the search summed: scoring
    # renormalises over the words that may be said, the search only masks the others out.
    rescored = (candidates.log_probs * candidates.mask).sum(1).detach()
    searched = torch.tensor([h.log_prob for beams in found for h in beams])
    assert (rescored >= searched - 1e-4).all() and (rescored < 0).all()


def test_self_critical_steps_on_beam_candidates_raise_the_served_captions_reward(tiny_checkpoint: Path) -> None:
    """Rewarding the beams (not samples) ranks them by CIDEr-D: the best beam's reward rises."""
    model = checkpoint.load(tiny_checkpoint)
    captions = ["a dog runs on the grass", "a man in a red shirt", "two cat in the water", "the man is on the grass"]
    cider = CiderD({f"i{k}": [c.split()] * 5 for k, c in enumerate(captions)})
    beam = BeamConfig(beam_size=4, max_len=8, length_penalty=1.0)
    objective = SelfCritical(cider, model.vocab, samples=4, max_len=8, sampling="beam", beam=beam)
    torch.manual_seed(0)
    features = torch.randn(4, 4, model.decoder.encoder_dim)
    ids = [f"i{k}" for k in range(4)]

    def served_reward() -> float:
        with torch.no_grad():
            hyps = beam_search(model.decoder, features, beam, special_ids(model.vocab))
        return float(cider.score(ids, [[model.vocab.words[t] for t in h.tokens] for h in hyps]).mean())

    before = served_reward()
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    for _ in range(150):
        loss, _ = objective(model.decoder, features, [Example(i, []) for i in ids])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = served_reward()
    assert after > before + 1.0, (before, after)


def test_the_loss_needs_two_samples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        self_critical_loss(torch.zeros(3, 2), torch.ones(3, 2), torch.zeros(3, 1))


def scst_options(init: Path, **extra: Any) -> dict[str, Any]:
    options = dict(init_from=init, scst=True, scst_samples=3, scst_max_len=6, batch_size=2, epochs=3, lr=1e-2,
                   warmup_steps=0, progress=False)
    return {**options, **extra}


@pytest.mark.parametrize("sampling", ["multinomial", "beam"])
def test_scst_resume_continues_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampling: str) -> None:
    flickr = f"flickr:{make_flickr(tmp_path / 'data', n_train=4, n_val=2)}"
    init = make_checkpoint(tmp_path / "init", config=tiny_config(dropout=0.3))
    options = scst_options(init, scst_sampling=sampling)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(tiny_fit_args(flickr, straight, tmp_path / "cache", **options))

    save_epoch = fit_module._save_epoch

    def killed_after_second_epoch(*args: Any) -> None:
        save_epoch(*args)
        if args[4] == 1:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(fit_module, "_save_epoch", killed_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_fit_args(flickr, resumed, tmp_path / "cache", **options))
    monkeypatch.undo()
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    main(tiny_fit_args(flickr, resumed, tmp_path / "cache", resume=True, **options))

    for name in ("model.safetensors", "trainer.safetensors"):
        a, b = load_file(str(straight / "last" / name)), load_file(str(resumed / "last" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a_hist = json.loads((straight / "history.json").read_text())["epochs"]
    b_hist = json.loads((resumed / "history.json").read_text())["epochs"]
    assert [e["train_reward"] for e in a_hist] == [e["train_reward"] for e in b_hist]
    assert [e["val"] for e in a_hist] == [e["val"] for e in b_hist]
    assert json.loads((resumed / "last" / "trainer.json").read_text())["info"]["step"] == 6
    # The model says how it was trained, so that its fine-tunes are self-critical too.
    assert checkpoint.read_document(straight / "last")["meta"]["scst"] == {
        "sampling": sampling, "samples": 3, "baseline": "mean"}
    # The weights moved away from the initial checkpoint.
    start, end = load_file(str(init / "model.safetensors")), load_file(str(straight / "last" / "model.safetensors"))
    assert any(not torch.equal(start[k].float(), end[k].float()) for k in start if k in end)


def test_self_critical_steps_raise_the_reward(tiny_checkpoint: Path) -> None:
    """A few hundred policy-gradient steps on four images: the sampled captions' CIDEr-D rises."""
    model = checkpoint.load(tiny_checkpoint)
    captions = ["a dog runs on the grass", "a man in a red shirt", "two cat in the water", "the man is on the grass"]
    objective = SelfCritical(CiderD({f"i{k}": [c.split()] * 5 for k, c in enumerate(captions)}), model.vocab,
                             samples=5, max_len=8)
    torch.manual_seed(0)
    features = torch.randn(4, 4, model.decoder.encoder_dim)
    batch = [Example(f"i{k}", []) for k in range(4)]
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    rewards = []
    for _ in range(200):
        loss, reward = objective(model.decoder, features, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rewards.append(float(reward))
    assert np.mean(rewards[-20:]) > 2 * np.mean(rewards[:5])


def test_scst_refuses_to_start_from_scratch_or_with_one_sample(tmp_path: Path) -> None:
    flickr = f"flickr:{make_flickr(tmp_path / 'data', n_train=4, n_val=2)}"
    with pytest.raises(ValueError, match="--init-from"):
        main(tiny_fit_args(flickr, tmp_path / "run", tmp_path / "cache", scst=True, progress=False))
    init = make_checkpoint(tmp_path / "init")
    with pytest.raises(ValueError, match="at least 2"):
        main(tiny_fit_args(flickr, tmp_path / "run", tmp_path / "cache", **scst_options(init, scst_samples=1)))
