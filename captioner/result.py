"""The one caption result: what the captioner computes and the caption service answers (no torch).

:class:`captioner.inference.Captioner` fills the caption itself; the caption service adds the
photo's size and the timings, and swaps the attention maps for the picture drawn from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class CaptionResult:
    text: str
    words: tuple[str, ...]
    score: float  # length-normalised log-probability of the caption (what beam search ranked by)
    log_prob: float  # summed log-probability, <end> included when emitted
    finished: bool  # False when the length limit cut the caption before <end>
    model_version: str
    beam_size: int
    # False when the caption should not be trusted (captioner.confidence): a low score, or the
    # encoder's ImageNet classifier is sure of something the caption does not mention.
    confident: bool = True
    seen: tuple[tuple[str, float], ...] = ()  # the classifier's top guesses (label, probability)
    width: int = 0  # of the decoded photo, after EXIF orientation; 0 when captioned from a tensor
    height: int = 0
    queue_seconds: float = 0.0  # service: from submission to the start of its batch
    compute_seconds: float = 0.0  # service: the batch's decode + encode + beam search time
    batch_size: int = 1  # how many photos shared the batch
    attention: np.ndarray | None = None  # (len(words), grid, grid) maps, each sums to 1, when asked for
    attention_png: bytes | None = None  # service: the attention picture, when asked for
