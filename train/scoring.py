"""The one decode-and-score path: caption images with a model's Captioner and score them.

``fit`` validates with it (on cached features, every epoch), ``finetune`` judges base and
candidate with it, ``evaluate`` reports with it. Decoding goes through
:class:`captioner.inference.Captioner`, the same code that serves captions to people.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from captioner.beam import BeamConfig
from captioner.checkpoint import CaptionModel
from captioner.inference import Captioner
from captioner.model import StepDecoder
from captioner.result import CaptionResult

from . import metrics
from .data import ImageRecord
from .loop import Features

DECODE_BATCH = 100  # images decoded together


@dataclass
class SplitResult:
    scores: metrics.Scores  # corpus values, warnings and each image's CIDEr
    captions: dict[str, str]  # image id -> caption
    decode_seconds: float


def decode_results(model: CaptionModel, features: Features, image_ids: Sequence[str], beam: BeamConfig,
                   batch_size: int = DECODE_BATCH, decoder: StepDecoder | None = None) -> dict[str, CaptionResult]:
    """Image id -> the captioner's full result (score, confidence...), ``batch_size`` images at a time;
    the words from ``decoder`` (an ensemble with the model's) when given."""
    captioner = Captioner(model, features.device, beam, decoder=decoder)
    out: dict[str, CaptionResult] = {}
    for start in range(0, len(image_ids), batch_size):
        chunk = list(image_ids[start:start + batch_size])
        out.update(zip(chunk, captioner.decode(features(chunk), attention=False), strict=True))
    return out


def decode_captions(model: CaptionModel, features: Features, image_ids: Sequence[str], beam: BeamConfig,
                    batch_size: int = DECODE_BATCH, decoder: StepDecoder | None = None) -> dict[str, str]:
    """Image id -> caption, decoded ``batch_size`` images at a time with ``beam``."""
    results = decode_results(model, features, image_ids, beam, batch_size, decoder)
    return {image_id: r.text for image_id, r in results.items()}


def score_records(model: CaptionModel, features: Features, records: Sequence[ImageRecord], beam: BeamConfig,
                  keys: Sequence[str] = metrics.METRIC_KEYS, batch_size: int = DECODE_BATCH,
                  decoder: StepDecoder | None = None) -> SplitResult:
    """Decode ``records``' images and score the captions against their references."""
    start = time.perf_counter()
    captions = decode_captions(model, features, [r.image_id for r in records], beam, batch_size, decoder)
    seconds = time.perf_counter() - start
    references = {r.image_id: list(r.captions) for r in records}
    return SplitResult(metrics.score(references, captions, keys), captions, seconds)
