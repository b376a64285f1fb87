"""When not to trust a caption: a low beam score, or the encoder's own ImageNet classifier is sure of
something the caption does not mention.

The decoder learned only Flickr8k's world (people, dogs, outdoor scenes), so on a cat, a cup or a
page of text it still writes a fluent sentence about a dog or a man. The encoder's ImageNet head
(which ships with its weights) knows a thousand everyday things; when it is confident of one that
the caption never names, the caption is not trusted, and what the classifier saw goes with it.
The thresholds are calibrated on the validation split by ``bench/confidence.py`` and stored in the
checkpoint's metadata (``"confidence"``); :data:`DEFAULT_RULE` applies without them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

SEEN_TOP = 3  # classifier guesses reported with each caption

# Several hundred ImageNet classes are breeds or kinds of a thing a caption names plainly: a caption
# saying "dog" mentions a "Chihuahua". Index ranges in the standard ImageNet-1k order.
_KINDS: tuple[tuple[range, tuple[str, ...]], ...] = (
    (range(151, 269), ("dog", "dogs", "puppy", "puppies")),
    (range(269, 281), ("dog", "dogs", "wolf", "fox", "animal")),
    (range(281, 286), ("cat", "cats", "kitten")),
    (range(7, 25), ("bird", "birds")),
    (range(80, 101), ("bird", "birds")),
    (range(127, 147), ("bird", "birds")),
)


@dataclass(frozen=True)
class ConfidenceRule:
    """A caption is trusted unless its beam score is below ``min_score`` (None: no score threshold) or
    the classifier gives an unmentioned class at least ``seen_threshold`` probability (above 1: never).

    ``familiar`` classes never veto: the classifier often sees them in the training photos (skis,
    swimming trunks, mountain bikes), so the decoder has learned its own words for them.
    """

    min_score: float | None = None
    seen_threshold: float = 1.01
    familiar: frozenset[str] = frozenset()

    def trusted(self, words: Sequence[str], score: float, seen: Sequence[tuple[str, float]]) -> bool:
        if self.min_score is not None and score < self.min_score:
            return False
        return not any(p >= self.seen_threshold and label not in self.familiar and not mentions(words, label)
                       for label, p in seen)

    def to_meta(self) -> dict[str, Any]:
        return {"min_score": self.min_score, "seen_threshold": self.seen_threshold,
                "familiar": sorted(self.familiar)}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ConfidenceRule:
        stored = meta.get("confidence")
        if not isinstance(stored, dict):
            return DEFAULT_RULE
        min_score = stored.get("min_score")
        return cls(None if min_score is None else float(min_score), float(stored.get("seen_threshold", 1.01)),
                   frozenset(str(label) for label in stored.get("familiar", ())))


# For a checkpoint without a calibrated rule in its metadata (``bench/confidence.py --write-meta``
# stores one): only a classifier that is very sure of an unmentioned thing vetoes.
DEFAULT_RULE = ConfidenceRule(min_score=None, seen_threshold=0.8)


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet class names, from torchvision's metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


@functools.cache
def _label_words() -> dict[str, frozenset[str]]:
    """Each label's own words plus the plain word for its kind ("Chihuahua" -> chihuahua, dog...)."""
    labels = imagenet_labels()
    words = {label: set(re.findall(r"[a-z]+", label.lower())) for label in labels}
    for indices, plain in _KINDS:
        for i in indices:
            words[labels[i]].update(plain)
    return {label: frozenset(w) for label, w in words.items()}


def mentions(words: Sequence[str], label: str) -> bool:
    """Whether a caption's words name the class (any word of its name, or its kind's plain word)."""
    known = _label_words().get(label, frozenset(re.findall(r"[a-z]+", label.lower())))
    return bool(known & {w.lower() for w in words})


def classifier_guesses(classifier: nn.Module | None, features: Tensor,
                       top: int = SEEN_TOP) -> list[tuple[tuple[str, float], ...]]:
    """The classifier's ``top`` labels and probabilities for each image's region grid (B, L, C).

    The backbone's ``classify`` pools the last feature map the same way, so the guesses come from
    the features the captioner already computed. No classifier (the tiny test encoder): none.
    """
    if classifier is None:
        return [() for _ in range(features.size(0))]
    with torch.inference_mode():
        logits = classifier(features.float().mean(dim=1))
        probs, indices = torch.softmax(logits, dim=-1).topk(top, dim=-1)
    labels = imagenet_labels()
    return [tuple((labels[int(i)], round(float(p), 4)) for p, i in zip(row_p, row_i, strict=True))
            for row_p, row_i in zip(probs, indices, strict=True)]
