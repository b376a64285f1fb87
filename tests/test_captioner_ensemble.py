"""Decoders captioning as one: the mean of their word probabilities, whatever order their words are in."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from captioner import checkpoint
from captioner.beam import BeamConfig, SpecialIds, beam_search
from captioner.checkpoint import CaptionModel
from captioner.ensemble import DecoderEnsemble, EnsembleError, aligned_decoder, ensemble_of
from captioner.vocab import SPECIAL_TOKENS, Vocabulary
from tests.helpers import make_checkpoint, tiny_config

BEAM = BeamConfig(beam_size=3, max_len=6, length_penalty=1.0)


def _model(tmp_path: Path, name: str, seed: int) -> CaptionModel:
    model = checkpoint.load(make_checkpoint(tmp_path / name, seed=seed, version=name))
    with torch.no_grad():  # sharper distributions: different seeds give visibly different captions
        model.decoder.classifier.weight.mul_(20)
    return model


def _features(model: CaptionModel, n: int = 4) -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(n, 9, model.decoder.encoder_dim)


def _reordered(model: CaptionModel, seed: int = 3) -> CaptionModel:
    """The same network with its (non-special) words listed in another order: same captions in words."""
    specials = len(SPECIAL_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    moved = (torch.randperm(len(model.vocab) - specials, generator=generator) + specials).tolist()
    order = list(range(specials)) + moved  # new id i holds old word order[i]
    vocab = Vocabulary([model.vocab.words[i] for i in order])
    other = CaptionModel.create(model.config, vocab, {"version": "reordered"}, pretrained_encoder=False)
    other.decoder.load_state_dict(model.decoder.state_dict())
    index = torch.tensor(order)
    with torch.no_grad():
        other.decoder.embedding.weight.copy_(model.decoder.embedding.weight[index])
        other.decoder.classifier.weight.copy_(model.decoder.classifier.weight[index])
        other.decoder.classifier.bias.copy_(model.decoder.classifier.bias[index])
    return other.to("cpu")


def _words(model: CaptionModel, tokens: list[int]) -> list[str]:
    return [model.vocab.words[t] for t in tokens]


def test_an_ensemble_of_one_decoder_decodes_exactly_as_that_decoder(tmp_path: Path) -> None:
    model = _model(tmp_path, "a", seed=0)
    features = _features(model)
    alone = beam_search(model.decoder, features, BEAM, SpecialIds())
    together = beam_search(DecoderEnsemble([model.decoder]), features, BEAM, SpecialIds())
    assert [h.tokens for h in together] == [h.tokens for h in alone]
    assert [h.score for h in together] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_each_step_is_the_log_of_the_members_mean_probability(tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a", seed=0), _model(tmp_path, "b", seed=1)
    ensemble = ensemble_of([a, b])
    features = _features(a, 2)
    tokens = torch.tensor([SpecialIds().start] * 2)
    step = ensemble.step(tokens, features, ensemble.project(features), ensemble.init_state(features))
    by_member = [d.step(tokens, features, d.project(features), d.init_state(features)) for d in (a.decoder, b.decoder)]
    expected = torch.log((by_member[0].log_probs.exp() + by_member[1].log_probs.exp()) / 2)
    assert torch.allclose(step.log_probs, expected, atol=1e-5)
    assert torch.allclose(step.alpha, (by_member[0].alpha + by_member[1].alpha) / 2)
    # The two members really disagree, so the test above compares a mean, not two equal things.
    assert not torch.allclose(by_member[0].log_probs, by_member[1].log_probs, atol=1e-2)
    # The state carries both members' states, each one's own (beam search reorders them together).
    assert torch.equal(step.state.hidden[:, : a.config.hidden_dim], by_member[0].state.hidden)
    assert torch.equal(step.state.hidden[:, a.config.hidden_dim:], by_member[1].state.hidden)


def test_two_different_decoders_caption_differently_from_either_alone(tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a", seed=0), _model(tmp_path, "b", seed=1)
    features = _features(a, 8)
    captions = {name: [h.tokens for h in beam_search(decoder, features, BEAM, SpecialIds())]
                for name, decoder in (("a", a.decoder), ("b", b.decoder), ("ab", ensemble_of([a, b])))}
    assert captions["ab"] != captions["a"] and captions["ab"] != captions["b"]


def test_a_member_with_its_words_in_another_order_is_aligned_to_the_first(tmp_path: Path) -> None:
    model = _model(tmp_path, "a", seed=0)
    other = _reordered(model)
    assert other.vocab.words != model.vocab.words
    features = _features(model)
    # The reordered network captions the same words, under other ids.
    assert [_words(other, h.tokens) for h in beam_search(other.decoder, features, BEAM, SpecialIds())] == \
           [_words(model, h.tokens) for h in beam_search(model.decoder, features, BEAM, SpecialIds())]
    aligned = aligned_decoder(other, model.vocab)
    assert torch.equal(aligned.classifier.weight, model.decoder.classifier.weight)
    assert torch.equal(aligned.embedding.weight, model.decoder.embedding.weight)
    assert other.decoder.classifier.weight.data_ptr() != aligned.classifier.weight.data_ptr()  # a copy
    # Together, two copies of one network are that network: same captions, same scores.
    alone = beam_search(model.decoder, features, BEAM, SpecialIds())
    together = beam_search(ensemble_of([model, other]), features, BEAM, SpecialIds())
    assert [h.tokens for h in together] == [h.tokens for h in alone]
    assert [h.score for h in together] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_models_that_know_other_words_or_read_other_features_are_refused(tmp_path: Path) -> None:
    model = _model(tmp_path, "a", seed=0)
    other_words = checkpoint.load(make_checkpoint(tmp_path / "w", words=["a", "cat", "sits", "on", "the", "mat",
                                                                          "in", "red", "box", "two", "is", "by",
                                                                          "water", "man"]))
    assert len(other_words.vocab) == len(model.vocab)
    with pytest.raises(EnsembleError, match="other words"):
        ensemble_of([model, other_words])
    other_size = checkpoint.load(make_checkpoint(tmp_path / "s", config=tiny_config(image_size=96)))
    with pytest.raises(EnsembleError, match="same encoder features"):
        ensemble_of([model, other_size])
    fine_tuned = dataclasses.replace(model, config=tiny_config(fine_tune_blocks=1))
    with pytest.raises(EnsembleError, match="same encoder features"):
        ensemble_of([fine_tuned, model])
    with pytest.raises(EnsembleError):
        ensemble_of([])


def test_the_probabilities_stay_a_distribution(tmp_path: Path) -> None:
    a, b = _model(tmp_path, "a", seed=0), _model(tmp_path, "b", seed=1)
    ensemble = ensemble_of([a, b])
    features = _features(a, 3)
    tokens = torch.tensor([SpecialIds().start] * 3)
    with torch.no_grad():
        step = ensemble.step(tokens, features, ensemble.project(features), ensemble.init_state(features))
    assert step.log_probs.exp().sum(dim=1) == pytest.approx([1.0] * 3, abs=1e-5)
    assert step.alpha.sum(dim=1) == pytest.approx([1.0] * 3, abs=1e-5)
    assert not math.isnan(float(step.log_probs.min()))


def test_members_of_different_sizes_keep_their_own_states_through_beam_reordering(tmp_path: Path) -> None:
    small = checkpoint.load(make_checkpoint(tmp_path / "small", config=tiny_config(hidden_dim=24, attention_dim=12),
                                            seed=4, version="small"))
    large = _model(tmp_path, "large", seed=5)
    assert small.config.hidden_dim != large.config.hidden_dim
    ensemble = ensemble_of([small, large])
    features = _features(small, 3)
    reorder = torch.tensor([2, 0, 0])  # what beam search does between steps: rows move and duplicate
    tokens = torch.tensor([SpecialIds().start] * 3)
    with torch.no_grad():
        step = ensemble.step(tokens, features, ensemble.project(features), ensemble.init_state(features))
        moved = features.index_select(0, reorder)
        second = ensemble.step(torch.tensor([5, 6, 7]), moved, ensemble.project(features).index_select(0, reorder),
                               step.state.select(reorder))
        expected = []
        for member in (small.decoder, large.decoder):
            first = member.step(tokens, features, member.project(features), member.init_state(features))
            projected = member.project(features).index_select(0, reorder)
            after = member.step(torch.tensor([5, 6, 7]), moved, projected, first.state.select(reorder))
            expected.append(after.log_probs)
    assert torch.allclose(second.log_probs, torch.logsumexp(torch.stack(expected), 0) - math.log(2), atol=1e-5)
