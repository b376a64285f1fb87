"""Batched beam search: N images x k beams advance together as one (N*k)-row tensor program.

Finished beams stay in their slot and carry their score forward unchanged, competing with live
beams on the length-normalised score, so the search is exact when k covers every sequence and
every image gets a caption even when no beam emits <end> before ``max_len``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import StepDecoder


@dataclass(frozen=True)
class BeamConfig:
    beam_size: int = 3
    max_len: int = 20
    # Score = log P / length ** length_penalty (0 = raw log-probability, which favours short captions).
    length_penalty: float = 0.0
    # Forbid repeating any n-gram of this size within a caption (0 = off).
    block_ngram: int = 0
    forbid_unk: bool = True

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError("beam_size must be >= 1")
        if self.max_len < 1:
            raise ValueError("max_len must be >= 1")
        if self.block_ngram < 0 or self.block_ngram == 1:
            raise ValueError("block_ngram must be 0 (off) or >= 2")


@dataclass
class Hypothesis:
    tokens: list[int]  # word ids, without <start> and <end>
    log_prob: float  # sum of the log-probabilities, <end> included when emitted
    score: float  # log_prob after length normalisation: what the search ranks by
    attention: Tensor  # (len(tokens), L): where the model looked for each word
    finished: bool  # False when max_len cut the caption before <end>


@dataclass(frozen=True)
class SpecialIds:
    pad: int = 0
    start: int = 1
    end: int = 2
    unk: int = 3


def _normalise(log_prob: Tensor, length: Tensor, penalty: float) -> Tensor:
    if penalty == 0.0:
        return log_prob
    return log_prob / length.clamp(min=1).to(log_prob.dtype) ** penalty


def _banned_ngram_mask(history: Tensor, n: int, vocab_size: int) -> Tensor:
    """(B, V) True where the next word would repeat an n-gram already in that row's history."""
    rows, steps = history.shape
    mask = torch.zeros(rows, vocab_size, dtype=torch.bool, device=history.device)
    if steps < n - 1 or steps < n:
        return mask
    windows = history.unfold(1, n, 1)  # (B, W, n)
    prefix = history[:, steps - (n - 1):].unsqueeze(1)  # (B, 1, n-1)
    matches = (windows[:, :, : n - 1] == prefix).all(dim=2)  # (B, W)
    row_idx, win_idx = matches.nonzero(as_tuple=True)
    mask[row_idx, windows[row_idx, win_idx, n - 1]] = True
    return mask


@torch.no_grad()
def beam_search(decoder: StepDecoder, features: Tensor, config: BeamConfig = BeamConfig(),
                special: SpecialIds = SpecialIds()) -> list[Hypothesis]:
    """Best hypothesis for each of the N images in ``features`` (N, L, C)."""
    return _best_per_image(*_search(decoder, features, config, special), config)


@torch.no_grad()
def n_best(decoder: StepDecoder, features: Tensor, config: BeamConfig = BeamConfig(),
           special: SpecialIds = SpecialIds()) -> list[list[Hypothesis]]:
    """All ``config.beam_size`` final beams of each image, best first (self-critical training
    with beam candidates reranks them by CIDEr). A beam that never took a second path is
    still returned, with a score of -inf."""
    log_prob, lengths, finished, history, attention = _search(decoder, features, config, special)
    scores = _normalise(log_prob, lengths, config.length_penalty)
    order = scores.argsort(dim=1, descending=True)
    k = config.beam_size
    return [[_hypothesis(log_prob, scores, lengths, finished, history, attention, i, int(b), k)
             for b in order[i]] for i in range(log_prob.size(0))]


def _search(decoder: StepDecoder, features: Tensor, config: BeamConfig,
            special: SpecialIds) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Run the search: (log_prob, lengths, finished) per (image, beam), history and attention per row."""
    n_images, k, vocab = features.size(0), config.beam_size, decoder.vocab_size
    device = features.device
    rows = n_images * k

    feats = features.repeat_interleave(k, dim=0)
    projected = decoder.project(features).repeat_interleave(k, dim=0)
    state = decoder.init_state(features).select(torch.arange(n_images, device=device).repeat_interleave(k))
    tokens = torch.full((rows,), special.start, dtype=torch.long, device=device)

    log_prob = torch.zeros(n_images, k, device=device)
    log_prob[:, 1:] = float("-inf")  # all beams start identical: keep one alive so they don't duplicate
    finished = torch.zeros(n_images, k, dtype=torch.bool, device=device)
    lengths = torch.zeros(n_images, k, dtype=torch.long, device=device)
    history = torch.empty(rows, 0, dtype=torch.long, device=device)
    attention = torch.empty(rows, 0, features.size(1), device=device)
    base = (torch.arange(n_images, device=device) * k).unsqueeze(1)

    for step in range(config.max_len):
        out = decoder.step(tokens, feats, projected, state)
        step_lp = _mask_step(out.log_probs, history, step, finished.view(-1), config, special)
        cand_raw = log_prob.view(-1, 1) + step_lp  # (rows, V)
        cand_len = (lengths + (~finished).long()).view(-1, 1)
        cand_score = _normalise(cand_raw, cand_len, config.length_penalty)

        top_idx = cand_score.view(n_images, k * vocab).topk(k, dim=1).indices
        beam_idx, words = top_idx // vocab, top_idx % vocab
        source = (base + beam_idx).view(-1)

        log_prob = cand_raw.view(n_images, k * vocab).gather(1, top_idx)
        was_finished = finished.gather(1, beam_idx)
        finished = was_finished | (words == special.end)
        lengths = lengths.gather(1, beam_idx) + (~was_finished).long()
        history = torch.cat([history.index_select(0, source), words.view(-1, 1)], dim=1)
        attention = torch.cat([attention.index_select(0, source),
                               out.alpha.index_select(0, source).unsqueeze(1)], dim=1)
        state = out.state.select(source)
        tokens = words.view(-1)
        if bool(finished.all()):
            break

    return log_prob, lengths, finished, history, attention


def _mask_step(log_probs: Tensor, history: Tensor, step: int, finished: Tensor, config: BeamConfig,
               special: SpecialIds) -> Tensor:
    lp = log_probs.clone()
    lp[:, special.pad] = float("-inf")
    lp[:, special.start] = float("-inf")
    if config.forbid_unk:
        lp[:, special.unk] = float("-inf")
    if step == 0:
        lp[:, special.end] = float("-inf")  # an empty caption is never an answer
    if config.block_ngram:
        lp = lp.masked_fill(_banned_ngram_mask(history, config.block_ngram, lp.size(1)), float("-inf"))
    # A finished beam has exactly one continuation, "stay", at no cost (the pad column carries it).
    lp[finished] = float("-inf")
    lp[finished, special.pad] = 0.0
    return lp


def _best_per_image(log_prob: Tensor, lengths: Tensor, finished: Tensor, history: Tensor,
                    attention: Tensor, config: BeamConfig) -> list[Hypothesis]:
    scores = _normalise(log_prob, lengths, config.length_penalty)
    best = scores.argmax(dim=1)
    k = log_prob.size(1)
    return [_hypothesis(log_prob, scores, lengths, finished, history, attention, i, int(best[i]), k)
            for i in range(log_prob.size(0))]


def _hypothesis(log_prob: Tensor, scores: Tensor, lengths: Tensor, finished: Tensor, history: Tensor,
                attention: Tensor, image: int, beam: int, k: int) -> Hypothesis:
    row = image * k + beam
    done = bool(finished[image, beam])
    n_words = int(lengths[image, beam]) - (1 if done else 0)
    return Hypothesis(
        tokens=history[row, :n_words].tolist(),
        log_prob=float(log_prob[image, beam]),
        score=float(scores[image, beam]),
        attention=attention[row, :n_words].cpu(),
        finished=done,
    )
