"""The training step fit and finetune share: learning-rate schedule, gradient clipping, attention penalty."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from captioner.checkpoint import CaptionModel
from captioner.model import attention_regularization
from captioner.vocab import Vocabulary
from tests.helpers import TINY_WORDS, tiny_config
from train.data import ImageRecord
from train.loop import Example, LoopConfig, build_examples, caption_loss, lr_factor, pad, train_epoch


def test_warm_up_is_linear_then_cosine_falls_to_the_floor() -> None:
    cfg = LoopConfig(warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert [lr_factor(s, total, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, total, cfg) == pytest.approx(1.0)  # the peak right after warm-up
    assert lr_factor(60, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_factor(35, total, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, total, cfg) == pytest.approx(0.1)
    assert lr_factor(500, total, cfg) == pytest.approx(0.1)  # never below the floor
    decay = [lr_factor(s, total, cfg) for s in range(10, 111)]
    assert all(b <= a for a, b in itertools.pairwise(decay))


def test_no_warm_up_and_ratio_one_is_a_constant_rate() -> None:
    cfg = LoopConfig(warmup_steps=0, min_lr_ratio=1.0)
    assert {lr_factor(s, 7, cfg) for s in range(20)} == {1.0}


def test_attention_penalty_on_a_known_alpha() -> None:
    # Two words over two regions: coverage (0.9+0.2, 0.1+0.8) = (1.1, 0.9) -> 0.1**2 + 0.1**2.
    alphas = torch.tensor([[[0.9, 0.1], [0.2, 0.8]]])
    assert attention_regularization(alphas, torch.ones(1, 2)).item() == pytest.approx(0.02)
    # The padded second word does not count: coverage (0.9, 0.1) -> 0.1**2 + 0.9**2.
    assert attention_regularization(alphas, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.82)
    # Averaged over the images of a batch.
    both = torch.cat([alphas, alphas])
    assert attention_regularization(both, torch.tensor([[1.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(0.42)


class FixedDecoder(nn.Module):
    """Returns given logits and attention maps whatever the input: a loss with known parts."""

    def __init__(self, logits: Tensor, alphas: Tensor) -> None:
        super().__init__()
        self.logits, self.alphas = logits, alphas

    def forward(self, features: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.logits, self.alphas


def test_caption_loss_adds_the_penalty_over_real_words_only() -> None:
    tokens = torch.tensor([[1, 5, 2], [1, 2, 0]])  # the second caption is padded (pad id 0)
    logits = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(0))
    alphas = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.3, 0.7], [0.5, 0.5]]])
    decoder = FixedDecoder(logits, alphas)
    total, ce = caption_loss(decoder, torch.zeros(2, 2, 4), tokens, pad_id=0, alpha_c=2.0, label_smoothing=0.0)
    expected_ce = nn.functional.cross_entropy(logits[tokens[:, 1:] != 0], tokens[:, 1:][tokens[:, 1:] != 0])
    assert ce.item() == pytest.approx(expected_ce.item())
    # Image 1: coverage (1.1, 0.9) -> 0.02; image 2, first word only: (0.3, 0.7) -> 0.49 + 0.09.
    assert (total - ce).item() == pytest.approx(2.0 * (0.02 + 0.58) / 2)
    off, _ = caption_loss(decoder, torch.zeros(2, 2, 4), tokens, pad_id=0, alpha_c=0.0, label_smoothing=0.0)
    assert off.item() == pytest.approx(ce.item())


class StaticFeatures:
    """Fixed random features per image id (what FeatureSource gives from the cache)."""

    device = torch.device("cpu")

    def __init__(self, ids: Sequence[str]) -> None:
        generator = torch.Generator().manual_seed(1)
        self.table = {i: torch.randn(4, 64, generator=generator) for i in ids}

    def __call__(self, image_ids: Sequence[str], grad: bool = False) -> Tensor:
        return torch.stack([self.table[i] for i in image_ids])


def _one_sgd_step(grad_clip: float) -> float:
    """Size of the whole parameter update of one plain SGD step (lr 1) through train_epoch."""
    torch.manual_seed(0)
    model = CaptionModel.create(tiny_config(), Vocabulary.build([" ".join(TINY_WORDS)], min_freq=1))
    examples = [Example("a", model.vocab.encode("a dog runs")), Example("b", model.vocab.encode("two cats"))]
    params = list(model.decoder.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=1.0)
    cfg = LoopConfig(lr=1.0, warmup_steps=0, min_lr_ratio=1.0, grad_clip=grad_clip, progress=False)
    loss, step = train_epoch(cfg, model, optimizer, StaticFeatures(["a", "b"]), examples, [[0, 1]], 0, 1)
    assert step == 1 and np.isfinite(loss)
    change = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(params, before, strict=True)])
    return float(change.norm())


def test_gradients_are_clipped_to_the_global_norm() -> None:
    unclipped = _one_sgd_step(grad_clip=1e6)
    assert unclipped > 0.05
    assert _one_sgd_step(grad_clip=0.01) == pytest.approx(0.01, rel=1e-3)


def test_examples_keep_end_when_cut_and_batches_pad() -> None:
    vocab = Vocabulary.build([" ".join(TINY_WORDS)], min_freq=1)
    (example,) = build_examples([ImageRecord("x", Path("x.jpg"), ("a dog runs on the grass",))], vocab, max_len=3)
    assert example.tokens == [vocab.start_id, *vocab.encode("a dog runs", add_special=False), vocab.end_id]
    assert pad([[1, 2], [1, 5, 6, 2]], 0).tolist() == [[1, 2, 0, 0], [1, 5, 6, 2]]
