"""The fine-tune's side of trusted learning: corrections are weighed by people, not by count.

- ``split_corrections``: the held-out photos by ``storage.holdout``'s rule (a secret salt, no
  person more than a small share of them); the rest are trained on.
- ``cap_per_person``: one person's corrections are at most a small share of a run.
- ``grow_vocabulary``: a new word enters only when enough distinct people used it on enough
  distinct photos; at most a few new words per run; one pass over the corrections.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from captioner.checkpoint import CaptionModel
from captioner.vocab import Vocabulary, tokenize
from storage.holdout import choose_held_out

from .data import ImageRecord


class CorrectionRow(NamedTuple):
    """One caption to learn from: its photo, its text, the correction id and who wrote it."""

    sha256: str
    path: Path
    text: str
    correction_id: int | None  # None for an up-voted caption (nothing to mark)
    person_id: int | None  # None when unknown (an export folder): the photo stands for its author


class WordUse(NamedTuple):
    """A caption as the vocabulary rule sees it: text, author and photo."""

    text: str
    person: str
    photo: str


@dataclass
class CorrectionSet:
    train: list[ImageRecord]
    heldout: list[ImageRecord]
    correction_ids: list[int] = field(default_factory=list)  # those in ``train``, to mark with the outcome
    uses: list[WordUse] = field(default_factory=list)  # the ``train`` captions, for the vocabulary rule
    left_for_later: int = 0  # corrections over a person's share of this run, not looked at


def word_uses(rows: Sequence[CorrectionRow]) -> list[WordUse]:
    return [WordUse(r.text, f"person:{r.person_id}" if r.person_id is not None else f"photo:{r.sha256}",
                    r.sha256) for r in rows]


def cap_per_person(rows: Sequence[CorrectionRow], share: float, most: int) -> tuple[list[CorrectionRow], int]:
    """At most ``min(share * len(rows), most)`` captions per person (at least one), oldest first.

    Returns the kept rows and how many were left for a later run.
    """
    cap = max(1, min(math.floor(share * len(rows)), most))
    used: dict[int, int] = defaultdict(int)
    kept = []
    for row in rows:
        if row.person_id is not None:
            if used[row.person_id] >= cap:
                continue
            used[row.person_id] += 1
        kept.append(row)
    return kept, len(rows) - len(kept)


def split_corrections(rows: Sequence[CorrectionRow], salt: bytes, holdout: float, holdout_person_share: float,
                      run_person_share: float = 1.0, max_per_person: int = 10**9) -> CorrectionSet:
    """Hold out photos by storage.holdout's rule (the one `storage export` uses); cap the rest per person."""
    contributors: dict[str, set[int]] = defaultdict(set)
    for row in rows:
        people = contributors[row.sha256]
        if row.person_id is not None:
            people.add(row.person_id)
    held = choose_held_out(contributors, salt, holdout, holdout_person_share)
    kept, left = cap_per_person([r for r in rows if r.sha256 not in held], run_person_share, max_per_person)
    heldout = _records([r for r in rows if r.sha256 in held])
    return CorrectionSet(_records(kept), heldout, [r.correction_id for r in kept if r.correction_id is not None],
                         word_uses(kept), left)


def _records(rows: Sequence[CorrectionRow]) -> list[ImageRecord]:
    """One record per photo (sorted by hash), with every caption of it."""
    by_photo: dict[str, tuple[Path, list[str]]] = {}
    for row in rows:
        by_photo.setdefault(row.sha256, (row.path, []))[1].append(row.text)
    return [ImageRecord(f"photo:{sha}", path, tuple(texts)) for sha, (path, texts) in sorted(by_photo.items())]


# ----------------------------------------------------------------------------- vocabulary growth


def qualified_new_words(vocab: Vocabulary, uses: Sequence[WordUse], min_people: int, most: int) -> list[str]:
    """Unknown words used by at least ``min_people`` people on at least as many photos; the most
    widely used first, at most ``most``. One pass over the captions."""
    people: dict[str, set[str]] = defaultdict(set)
    photos: dict[str, set[str]] = defaultdict(set)
    for use in uses:
        for word in set(tokenize(use.text)):
            if word not in vocab:
                people[word].add(use.person)
                photos[word].add(use.photo)
    qualified = [w for w in people if len(people[w]) >= min_people and len(photos[w]) >= min_people]
    qualified.sort(key=lambda w: (-len(people[w]), -len(photos[w]), w))
    return qualified[:most]


def grow_vocabulary(model: CaptionModel, uses: Sequence[WordUse], min_people: int, most: int) -> list[str]:
    """Add the qualified new words; each new row starts from the known words around it."""
    new_words = qualified_new_words(model.vocab, uses, min_people, most)
    if not new_words:
        return []
    context = _context_ids(model.vocab, [use.text for use in uses], set(new_words))
    model.vocab.extend(new_words)
    model.decoder.grow_vocabulary(len(model.vocab), init_from=[context[w] for w in new_words])
    return new_words


def _context_ids(vocab: Vocabulary, texts: Sequence[str], words: set[str]) -> dict[str, list[int]]:
    """Known words next to each of ``words`` in the texts, in one pass (linear in the captions)."""
    context: dict[str, list[int]] = defaultdict(list)
    for text in texts:
        tokens = tokenize(text)
        for i, token in enumerate(tokens):
            if token in words:
                context[token].extend(vocab.id_of(t) for t in tokens[max(0, i - 2):i + 3] if t in vocab)
    return context
