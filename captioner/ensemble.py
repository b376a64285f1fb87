"""Several decoders captioning as one: at each step the next word's probability is the mean of theirs.

Decoders trained separately on the same encoder's features make different mistakes, so the mean
of their word distributions is a better guide for beam search than any one of them (the usual
captioning ensemble, e.g. Vinyals et al. 2015 and Xu et al. 2015). An ensemble costs each member's
time and size, so it is not what ships: it is the teacher that ``python -m train distill`` writes
captions with, for a single decoder to learn from (sequence-level knowledge distillation, Kim &
Rush 2016), and ``python -m train evaluate --ensemble`` scores it.

Beam search reorders its rows with one ``index_select`` per tensor, so the members' attention
projections and LSTM states travel concatenated along their last dimension and are split again
at each step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .checkpoint import CaptionModel
from .model import Decoder, DecoderState, StepOutput
from .vocab import Vocabulary


class EnsembleError(ValueError):
    """The models cannot decode together (other encoder, other words)."""


class DecoderEnsemble:
    """Decoders over the same vocabulary and encoder features, decoding as one :class:`StepDecoder`."""

    def __init__(self, members: Sequence[Decoder]) -> None:
        if not members:
            raise EnsembleError("an ensemble needs at least one decoder")
        first = members[0]
        for member in members[1:]:
            if member.vocab_size != first.vocab_size or member.encoder_dim != first.encoder_dim:
                raise EnsembleError("ensemble members must share the vocabulary and the encoder features")
        self.members = list(members)
        self.vocab_size = first.vocab_size
        self._projection_sizes = [m.config.attention_dim for m in self.members]
        self._state_sizes = [m.config.hidden_dim for m in self.members]

    def member_features(self, features: Tensor) -> list[Tensor]:
        """What each member reads: the same features (a subclass may give each its own view)."""
        return [features] * len(self.members)

    def project(self, features: Tensor) -> Tensor:
        return torch.cat([m.project(f) for m, f in zip(self.members, self.member_features(features), strict=True)],
                         dim=-1)

    def init_state(self, features: Tensor) -> DecoderState:
        return _joined([m.init_state(f) for m, f in zip(self.members, self.member_features(features), strict=True)])

    def step(self, tokens: Tensor, features: Tensor, projected: Tensor, state: DecoderState) -> StepOutput:
        outputs = [member.step(tokens, member_features, member_projected, member_state)
                   for member, member_features, member_projected, member_state
                   in zip(self.members, self.member_features(features),
                          projected.split(self._projection_sizes, dim=-1), self._split(state), strict=True)]
        # log(mean_i p_i), computed in log space: a word one member finds impossible is still
        # possible for the ensemble when another member gives it probability.
        log_probs = torch.logsumexp(torch.stack([o.log_probs for o in outputs]), dim=0) - math.log(len(outputs))
        alpha = torch.stack([o.alpha for o in outputs]).mean(dim=0)
        return StepOutput(log_probs, alpha, _joined([o.state for o in outputs]))

    def _split(self, state: DecoderState) -> list[DecoderState]:
        return [DecoderState(h, c) for h, c in zip(state.hidden.split(self._state_sizes, dim=-1),
                                                   state.cell.split(self._state_sizes, dim=-1), strict=True)]


def _joined(states: Sequence[DecoderState]) -> DecoderState:
    return DecoderState(torch.cat([s.hidden for s in states], dim=-1), torch.cat([s.cell for s in states], dim=-1))


def ensemble_of(models: Sequence[CaptionModel]) -> DecoderEnsemble:
    """The decoders of ``models`` as one, in the first model's word order.

    Every model must read the same encoder features (same frozen, public encoder at the same input
    size) and know the same words; a vocabulary built from other counts lists them in another order,
    which is fixed by reordering copies of the other decoders' word rows.
    """
    if not models:
        raise EnsembleError("an ensemble needs at least one model")
    first = models[0]
    for model in models[1:]:
        check_same_features(first, model)
    return DecoderEnsemble([first.decoder, *(aligned_decoder(m, first.vocab) for m in models[1:])])


def same_features(first: CaptionModel, other: CaptionModel) -> bool:
    """Whether both models read the same features: one frozen public encoder at one image size."""
    def features_of(model: CaptionModel) -> tuple[object, ...]:
        c = model.config
        return c.encoder, c.encoder_weights, c.image_size, c.fine_tune_blocks

    return features_of(first) == features_of(other) and not first.config.fine_tune_blocks


def check_same_features(first: CaptionModel, other: CaptionModel) -> None:
    """Raise :class:`EnsembleError` unless both models decode from the same encoder features."""
    if not same_features(first, other):
        raise EnsembleError(
            f"{other.version} and {first.version} do not read the same encoder features "
            "(an ensemble needs the same frozen encoder at the same image size)")


def aligned_decoder(model: CaptionModel, vocab: Vocabulary) -> Decoder:
    """``model``'s decoder with its word rows in ``vocab``'s order (a copy when they must move)."""
    words = model.vocab.words
    if words == vocab.words:
        return model.decoder
    if sorted(words) != sorted(vocab.words):
        missing = sorted(set(vocab.words) ^ set(words))[:5]
        raise EnsembleError(f"{model.version} knows other words than the ensemble's first model "
                            f"(for example: {', '.join(missing)})")
    decoder = copy.deepcopy(model.decoder)
    order = torch.tensor([model.vocab.id_of(word) for word in vocab.words], device=decoder.embedding.weight.device)
    with torch.no_grad():
        decoder.embedding.weight.copy_(decoder.embedding.weight[order])
        decoder.classifier.weight.copy_(decoder.classifier.weight[order])
        decoder.classifier.bias.copy_(decoder.classifier.bias[order])
    return decoder
