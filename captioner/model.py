"""Show, Attend and Tell (Xu et al. 2015): soft additive attention and an LSTM decoder.

The decoder works on a grid of region vectors (B, L, C) from any encoder, so training can run
from cached features and serving from images through the same module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the network (the vocabulary size comes from the vocabulary)."""

    encoder: str = "efficientnet_lite0"
    # Local file with the backbone's ImageNet weights (torchvision backbones); None = the default source.
    encoder_weights: str | None = None
    image_size: int = 224
    embed_dim: int = 512
    attention_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    # The paper's deep output layer: logits = L_o(tanh(E y_{t-1} + L_h h_t + L_z z_t)).
    deep_output: bool = True
    # Encoder blocks (from the top) left trainable; 0 keeps the encoder frozen.
    fine_tune_blocks: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


class SoftAttention(nn.Module):
    """Additive (Bahdanau) attention over regions: e_ti = w^T tanh(W_a a_i + W_h h_{t-1})."""

    def __init__(self, encoder_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_proj = nn.Linear(encoder_dim, attention_dim)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project(self, features: Tensor) -> Tensor:
        """W_a a_i, computed once per image rather than once per word."""
        return self.encoder_proj(features)

    def forward(self, features: Tensor, projected: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        energy = self.score(torch.tanh(projected + self.hidden_proj(hidden).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(energy, dim=1)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)
        return context, alpha


@dataclass
class DecoderState:
    hidden: Tensor
    cell: Tensor

    def select(self, index: Tensor) -> DecoderState:
        return DecoderState(self.hidden.index_select(0, index), self.cell.index_select(0, index))


@dataclass
class StepOutput:
    log_probs: Tensor  # (B, V)
    alpha: Tensor  # (B, L)
    state: DecoderState


class StepDecoder(Protocol):
    """What beam search needs of a decoder: one :class:`Decoder`, or several decoding as one
    (:class:`captioner.ensemble.DecoderEnsemble`)."""

    vocab_size: int

    def project(self, features: Tensor) -> Tensor: ...

    def init_state(self, features: Tensor) -> DecoderState: ...

    def step(self, tokens: Tensor, features: Tensor, projected: Tensor, state: DecoderState) -> StepOutput: ...


class Decoder(nn.Module):
    """LSTM decoder with soft attention and the paper's gating scalar beta_t on the context."""

    def __init__(self, config: ModelConfig, encoder_dim: int, vocab_size: int) -> None:
        super().__init__()
        self.config = config
        self.encoder_dim = encoder_dim
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, config.embed_dim)
        self.attention = SoftAttention(encoder_dim, config.hidden_dim, config.attention_dim)
        self.init_h = nn.Linear(encoder_dim, config.hidden_dim)
        self.init_c = nn.Linear(encoder_dim, config.hidden_dim)
        self.gate = nn.Linear(config.hidden_dim, 1)
        self.lstm = nn.LSTMCell(config.embed_dim + encoder_dim, config.hidden_dim)
        self.dropout = nn.Dropout(config.dropout)
        if config.deep_output:
            self.out_hidden = nn.Linear(config.hidden_dim, config.embed_dim)
            self.out_context = nn.Linear(encoder_dim, config.embed_dim)
            self.classifier = nn.Linear(config.embed_dim, vocab_size)
        else:
            self.classifier = nn.Linear(config.hidden_dim, vocab_size)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.classifier.bias)
        nn.init.uniform_(self.classifier.weight, -0.1, 0.1)

    def project(self, features: Tensor) -> Tensor:
        """The attention's per-region projection, computed once per image (see :meth:`step`)."""
        return self.attention.project(features)

    def init_state(self, features: Tensor) -> DecoderState:
        mean = features.mean(dim=1)
        return DecoderState(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))

    def _lstm_step(self, embedded: Tensor, features: Tensor, projected: Tensor,
                   state: DecoderState) -> tuple[DecoderState, Tensor, Tensor]:
        context, alpha = self.attention(features, projected, state.hidden)
        gated = torch.sigmoid(self.gate(state.hidden)) * context
        hidden, cell = self.lstm(torch.cat([embedded, gated], dim=1), (state.hidden, state.cell))
        return DecoderState(hidden, cell), gated, alpha

    def _logits(self, embedded: Tensor, hidden: Tensor, context: Tensor) -> Tensor:
        if self.config.deep_output:
            deep = torch.tanh(embedded + self.out_hidden(hidden) + self.out_context(context))
            return self.classifier(self.dropout(deep))
        return self.classifier(self.dropout(hidden))

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing. ``tokens`` (B, T) starts with <start>; returns logits (B, T-1, V)
        predicting tokens[:, 1:], and attention (B, T-1, L)."""
        steps = tokens.size(1) - 1
        embedded = self.embedding(tokens[:, :-1])
        projected = self.attention.project(features)
        state = self.init_state(features)
        hiddens, contexts, alphas = [], [], []
        for t in range(steps):
            state, context, alpha = self._lstm_step(embedded[:, t], features, projected, state)
            hiddens.append(state.hidden)
            contexts.append(context)
            alphas.append(alpha)
        # The output layer runs once over all steps: one large matmul instead of T small ones.
        logits = self._logits(embedded, torch.stack(hiddens, 1), torch.stack(contexts, 1))
        return logits, torch.stack(alphas, 1)

    def step(self, tokens: Tensor, features: Tensor, projected: Tensor, state: DecoderState) -> StepOutput:
        """One decoding step from the previous tokens (B,), for beam search."""
        embedded = self.embedding(tokens)
        state, context, alpha = self._lstm_step(embedded, features, projected, state)
        logits = self._logits(embedded, state.hidden, context)
        return StepOutput(F.log_softmax(logits.float(), dim=-1), alpha, state)

    @torch.no_grad()
    def grow_vocabulary(self, new_size: int, init_from: list[list[int]] | None = None) -> None:
        """Add rows for new words at the end; existing words' rows are untouched.

        ``init_from[i]`` lists existing token ids whose mean initialises new word i (for example
        the words of a correction around it); without it, new rows get the mean of all rows.
        """
        old_size = self.vocab_size
        if new_size <= old_size:
            return
        self.embedding = _grow_embedding(self.embedding, new_size, init_from)
        self.classifier = _grow_linear(self.classifier, new_size, init_from)
        self.vocab_size = new_size


def _mean_rows(weight: Tensor, extra: int, init_from: list[list[int]] | None) -> Tensor:
    base = weight.mean(dim=0, keepdim=True).expand(extra, -1).clone()
    if init_from:
        for i, ids in enumerate(init_from[:extra]):
            if ids:
                base[i] = weight[ids].mean(dim=0)
    return base


def _grow_embedding(old: nn.Embedding, new_size: int, init_from: list[list[int]] | None) -> nn.Embedding:
    extra = new_size - old.num_embeddings
    grown = nn.Embedding(new_size, old.embedding_dim).to(old.weight.device, old.weight.dtype)
    grown.weight.copy_(torch.cat([old.weight, _mean_rows(old.weight, extra, init_from)]))
    return grown


def _grow_linear(old: nn.Linear, new_size: int, init_from: list[list[int]] | None) -> nn.Linear:
    extra = new_size - old.out_features
    grown = nn.Linear(old.in_features, new_size).to(old.weight.device, old.weight.dtype)
    grown.weight.copy_(torch.cat([old.weight, _mean_rows(old.weight, extra, init_from)]))
    # Weights and bias both averaged: a new word's logit is the mean of its context words' logits,
    # so it never outranks the best old word (old predictions keep their order) yet starts close
    # enough to be learned in a short fine-tune.
    grown.bias.copy_(torch.cat([old.bias, _mean_rows(old.bias.unsqueeze(1), extra, init_from).squeeze(1)]))
    return grown


def attention_regularization(alphas: Tensor, mask: Tensor) -> Tensor:
    """The paper's doubly stochastic penalty: sum_i (1 - sum_t alpha_ti)^2, averaged over images."""
    coverage = (alphas * mask.unsqueeze(2)).sum(dim=1)
    return ((1.0 - coverage) ** 2).sum(dim=1).mean()
