"""The training loop fit and finetune share: caption batches, the loss, the schedule, one epoch.

``fit`` trains a captioner from a dataset, ``finetune`` adapts one to people's corrections; both
run the same optimisation step (autocast on CUDA, doubly stochastic attention penalty, warm-up
and cosine schedule, gradient clipping) through :func:`train_epoch`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.checkpoint import CaptionModel
from captioner.model import attention_regularization
from captioner.vocab import Vocabulary

from .data import ImageRecord

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """Settings ``fit`` and ``finetune`` share; each command's config adds its own and may change defaults."""

    out: str = "runs/default"
    cache: str = "cache/features"
    # the schedule: warm-up, then cosine decay to min_lr_ratio * lr
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    max_steps: int = 0
    # the loss and the step
    grad_clip: float = 5.0
    alpha_c: float = 1.0
    label_smoothing: float = 0.0
    max_caption_len: int = 40
    # validation
    val_split: str = "val"
    val_limit: int = 0
    # the run
    seed: int = 1234
    device: str = "auto"
    progress: bool = True


@dataclass
class Example:
    image_id: str
    tokens: list[int]


class Objective(Protocol):
    """What an optimisation step minimises on a batch: (loss to back-propagate, value to report)."""

    name: str  # what the reported value is: "loss" (cross-entropy) or "reward" (self-critical)

    def __call__(self, decoder: nn.Module, features: Tensor,
                 batch: Sequence[Example]) -> tuple[Tensor, Tensor]: ...


class Features(Protocol):
    """Encoder features of a batch of images by id (train.features.FeatureSource)."""

    device: torch.device

    def __call__(self, image_ids: Sequence[str], grad: bool = False) -> Tensor: ...


# ----------------------------------------------------------------------------- batches


def build_examples(records: Sequence[ImageRecord], vocab: Vocabulary, max_len: int) -> list[Example]:
    out = []
    for record in records:
        for caption in record.captions:
            ids = vocab.encode(caption)
            if len(ids) <= 2:  # no words at all
                continue
            if len(ids) > max_len + 2:  # <start> + max_len words + <end>
                ids = [*ids[: max_len + 1], vocab.end_id]
            out.append(Example(record.image_id, ids))
    return out


def bucketed_batches(examples: Sequence[Example], batch_size: int,
                     rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length captions: little padding, so few wasted LSTM steps."""
    order = rng.permutation(len(examples))
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool].tolist(), key=lambda i: len(examples[i].tokens))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad(sequences: Sequence[list[int]], pad_id: int) -> Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s)
    return out


# ----------------------------------------------------------------------------- loss and schedule


def reference_terms(logits: Tensor, alphas: Tensor, tokens: Tensor, pad_id: int, alpha_c: float,
                    label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(cross-entropy on the references, weighted attention penalty) of a teacher-forced pass over the
    padded ``tokens``: the terms every teacher-forced objective shares."""
    targets = tokens[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=pad_id,
                         label_smoothing=label_smoothing)
    mask = (targets != pad_id).float()
    reg = attention_regularization(alphas, mask) if alpha_c else torch.zeros((), device=logits.device)
    return ce, alpha_c * reg


def caption_loss(decoder: nn.Module, features: Tensor, tokens: Tensor, pad_id: int, alpha_c: float,
                 label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(total loss, cross-entropy) for a padded batch of token sequences."""
    logits, alphas = decoder(features, tokens)
    ce, penalty = reference_terms(logits, alphas, tokens, pad_id, alpha_c, label_smoothing)
    return ce + penalty, ce


@dataclass
class CrossEntropy:
    """Teacher forcing on the batch's reference captions (:func:`caption_loss`); reports the cross-entropy."""

    pad_id: int
    alpha_c: float
    label_smoothing: float
    name: str = "loss"

    def __call__(self, decoder: nn.Module, features: Tensor, batch: Sequence[Example]) -> tuple[Tensor, Tensor]:
        tokens = pad([e.tokens for e in batch], self.pad_id).to(features.device)
        return caption_loss(decoder, features, tokens, self.pad_id, self.alpha_c, self.label_smoothing)


def lr_factor(step: int, total: int, cfg: LoopConfig) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up over ``warmup_steps``,
    then cosine decay to ``min_lr_ratio`` at ``total`` steps (constant 1 with no warm-up and ratio 1)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast_for(device: torch.device) -> Callable[[], AbstractContextManager[None]]:
    """bfloat16 autocast on CUDA; on CPU the step stays in float32."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------- one epoch


def train_epoch(cfg: LoopConfig, model: CaptionModel, optimizer: torch.optim.Optimizer, source: Features,
                examples: Sequence[Example], batches: list[list[int]], step: int, total_steps: int,
                decoder: nn.Module | None = None, objective: Objective | None = None,
                log_every: int = 50) -> tuple[float, int]:
    """One pass over ``batches``: (mean of the objective's reported value, global step after it).

    The objective is teacher-forced cross-entropy unless given (self-critical training passes its
    own). Each optimizer group's learning rate is its ``base_lr`` (its ``lr`` when first seen)
    times the schedule's factor. ``decoder`` is the module to run (the DDP wrapper under torchrun).
    """
    decoder = decoder or model.decoder
    model.decoder.train()
    # The encoder stays in eval mode even when its top blocks are fine-tuned: batch-norm keeps its
    # ImageNet statistics (small, caption-ordered batches would only make them noisy).
    model.encoder.eval()
    step_loss: Objective = objective or CrossEntropy(model.vocab.pad_id, cfg.alpha_c, cfg.label_smoothing)
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    world = dist.get_world_size() if dist.is_initialized() else 1
    autocast = autocast_for(source.device)
    values: list[float] = []
    t0 = time.time()
    for n, batch in enumerate(batches):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        factor = lr_factor(step, total_steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        chosen = [examples[i] for i in batch]
        with autocast():
            features = source([e.image_id for e in chosen], grad=model.encoder.trainable_blocks > 0)
            loss, value = step_loss(decoder, features, chosen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1 and encoder_params:
            _average_gradients(encoder_params, world)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        values.append(value.detach().item())
        if cfg.progress and log_every and n % log_every == 0:
            rate = (n + 1) / max(1e-9, time.time() - t0)
            log.info("step %d/%d %s %.3f lr %.2e (%.1f batches/s)", n, len(batches), step_loss.name,
                     float(np.mean(values[-log_every:])), optimizer.param_groups[0]["lr"], rate)
    return float(np.mean(values)) if values else float("nan"), step


def _average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Average gradients across ranks (for parameters outside the DDP-wrapped decoder)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()
