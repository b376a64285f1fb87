"""Word vocabulary: tokenisation, frequency cut-off, JSON round-trip and growth.

The tokeniser is the single definition of "a word" for the whole project: training data,
people's corrections and evaluation references all go through :func:`tokenize`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PAD = "<pad>"
START = "<start>"
END = "<end>"
UNK = "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, START, END, UNK)

# Words are runs of letters or digits; an apostrophe inside a word is dropped so that
# "dog's" and "dogs" stay close ("dogs"), matching how the Flickr/COCO references are written.
_APOSTROPHE = re.compile(r"(?<=\w)['’](?=\w)")
_WORD = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Lower-case words and digits of ``text``; punctuation is dropped."""
    lowered = _APOSTROPHE.sub("", text.lower())
    return _WORD.findall(lowered)


@dataclass
class Vocabulary:
    """A bijection between words and ids; ids 0-3 are the special tokens."""

    words: list[str] = field(default_factory=lambda: list(SPECIAL_TOKENS))

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with the special tokens {SPECIAL_TOKENS}")
        if len(set(self.words)) != len(self.words):
            raise ValueError("vocabulary has duplicate words")
        self._index = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 5, max_size: int | None = None) -> Vocabulary:
        """Vocabulary of the words seen at least ``min_freq`` times, most frequent first."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text))
        kept = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_freq]
        kept = [w for w in kept if w not in SPECIAL_TOKENS]
        if max_size is not None:
            kept = kept[: max(0, max_size - len(SPECIAL_TOKENS))]
        return cls([*SPECIAL_TOKENS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: object) -> bool:
        return word in self._index

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def start_id(self) -> int:
        return 1

    @property
    def end_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def id_of(self, word: str) -> int:
        return self._index.get(word, self.unk_id)

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special`` wrapped in <start> ... <end>."""
        ids = [self.id_of(w) for w in tokenize(text)]
        return [self.start_id, *ids, self.end_id] if add_special else ids

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Words of ``ids``, stopping at <end> and skipping <start>/<pad>."""
        out: list[str] = []
        for i in ids:
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            out.append(self.words[i])
        return out

    def extend(self, new_words: Iterable[str]) -> list[int]:
        """Append words (existing ids never move); returns the ids of the words added."""
        added: list[int] = []
        for w in new_words:
            if w in self._index or not _WORD.fullmatch(w):
                continue
            self._index[w] = len(self.words)
            self.words.append(w)
            added.append(self._index[w])
        return added

    def to_json(self) -> dict[str, Any]:
        return {"words": list(self.words)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Vocabulary:
        words = data.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary JSON must have a 'words' list of strings")
        return cls(list(words))
