"""CIDEr-D as a training reward: document frequencies and reference vectors computed once.

pycocoevalcap's ``Cider`` (coco-caption's CIDEr-D: tf-idf n-gram vectors, n = 1..4, clipped
hypothesis weights, a Gaussian length penalty, times 10) recounts the references of the whole
corpus at every call. Self-critical training scores hundreds of sampled captions per step, so
here the corpus statistics and each image's reference vectors are built once, and a batch of
captions is scored with one numpy pass over its matched n-grams. The arithmetic follows
``pycocoevalcap/cider/cider_scorer.py`` term by term, quirks included (a caption's "length" is
its number of bigrams), so that the two agree to float rounding on the same corpus.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

NGRAM_ORDER = 4
SIGMA = 6.0  # the length penalty's standard deviation, in words

Ngram = tuple[str, ...]


def ngram_counts(words: Sequence[str], order: int = NGRAM_ORDER) -> Counter[Ngram]:
    """How often each 1..order-gram occurs in ``words`` (pycocoevalcap's ``precook``)."""
    counts: Counter[Ngram] = Counter()
    for n in range(1, order + 1):
        for i in range(len(words) - n + 1):
            counts[tuple(words[i:i + n])] += 1
    return counts


def _length(words: Sequence[str]) -> int:
    # pycocoevalcap counts the bigrams (its `if n == 1`, n being the 0-based order), not the words.
    return max(0, len(words) - 1)


@dataclass(frozen=True)
class _References:
    """One image's references as tf-idf vectors, ready to be matched against captions."""

    weights: dict[Ngram, np.ndarray]  # n-gram -> its weight in each reference, shape (R,)
    norms: np.ndarray  # (order, R): each reference's vector norm per n-gram order
    lengths: np.ndarray  # (R,)

    @property
    def count(self) -> int:
        return len(self.lengths)


class CiderD:
    """CIDEr-D of captions against the references of one corpus (the training split, say).

    ``references`` maps an image id to its reference captions, each a list of words. Every
    image is one document for the document frequencies, as in pycocoevalcap.
    """

    def __init__(self, references: Mapping[str, Sequence[Sequence[str]]], order: int = NGRAM_ORDER,
                 sigma: float = SIGMA) -> None:
        if not references:
            raise ValueError("CIDEr-D needs at least one image's references")
        self.order, self.sigma = order, sigma
        counted = {image: [ngram_counts(ref, order) for ref in refs] for image, refs in references.items()}
        frequency: Counter[Ngram] = Counter()
        for refs in counted.values():
            frequency.update({gram for ref in refs for gram in ref})
        self._log_documents = math.log(float(len(references)))
        self._idf = {gram: self._log_documents - math.log(df) for gram, df in frequency.items()}
        self._references = {image: self._vectorise(refs, references[image]) for image, refs in counted.items()}

    def idf(self, gram: Ngram) -> float:
        """log(documents) - log(max(1, document frequency)): unseen n-grams get the largest weight."""
        return self._idf.get(gram, self._log_documents)

    def _vectorise(self, counted: list[Counter[Ngram]], words: Sequence[Sequence[str]]) -> _References:
        weights: dict[Ngram, np.ndarray] = {}
        norms = np.zeros((self.order, len(counted)))
        for r, ref in enumerate(counted):
            for gram, tf in ref.items():
                weight = tf * self.idf(gram)
                weights.setdefault(gram, np.zeros(len(counted)))[r] = weight
                norms[len(gram) - 1, r] += weight * weight
        lengths = np.array([_length(w) for w in words], dtype=np.float64)
        return _References(weights, np.sqrt(norms), lengths)

    def score(self, image_ids: Sequence[str], captions: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of ``captions[i]`` (a list of words) against ``image_ids[i]``'s references."""
        if len(image_ids) != len(captions):
            raise ValueError("one image id per caption")
        refs = [self._references[image] for image in image_ids]
        width = max((r.count for r in refs), default=1)
        similarity = np.zeros((len(captions), self.order, width))
        caption_norms = np.zeros((len(captions), self.order))
        rows, orders, own, matched = [], [], [], []
        for i, (words, ref) in enumerate(zip(captions, refs, strict=True)):
            for gram, tf in ngram_counts(words, self.order).items():
                weight = tf * self.idf(gram)
                caption_norms[i, len(gram) - 1] += weight * weight
                ref_weights = ref.weights.get(gram)
                if ref_weights is not None:
                    rows.append(i)
                    orders.append(len(gram) - 1)
                    own.append(weight)
                    matched.append(np.pad(ref_weights, (0, width - ref.count)))
        if rows:
            ref_w = np.stack(matched)
            # Clipping: a caption earns at most the reference's own weight for each n-gram.
            np.add.at(similarity, (np.array(rows), np.array(orders)),
                      np.minimum(np.array(own)[:, None], ref_w) * ref_w)
        ref_norms = np.stack([np.pad(r.norms, ((0, 0), (0, width - r.count))) for r in refs])
        denominator = np.sqrt(caption_norms)[:, :, None] * ref_norms
        # pycocoevalcap divides only where both norms are non-zero (the similarity is 0 otherwise).
        similarity = np.divide(similarity, denominator, out=similarity, where=denominator != 0)
        ref_lengths = np.stack([np.pad(r.lengths, (0, width - r.count)) for r in refs])
        delta = np.array([_length(w) for w in captions], dtype=np.float64)[:, None] - ref_lengths
        penalty = np.exp(-(delta ** 2) / (2 * self.sigma ** 2))
        per_reference = similarity.mean(axis=1) * penalty  # padded references contribute 0
        counts = np.array([r.count for r in refs], dtype=np.float64)
        return np.asarray(10.0 * per_reference.sum(axis=1) / counts)
