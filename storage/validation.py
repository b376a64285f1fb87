"""Cleaning and checking a correction typed by a person.

Corrections become training captions, so junk must stay out: control
characters, runs of whitespace, one-word answers, essays, and "corrections"
that merely repeat the caption.
"""

from __future__ import annotations

import re
import unicodedata

from storage.errors import CorrectionRejected, Rejection

MIN_CHARS = 2
MAX_CHARS = 300
MIN_WORDS = 2

_WORD = re.compile(r"\w", re.UNICODE)


def normalize_text(raw: str) -> str:
    """Trim, turn any whitespace into a space, drop control/format characters, collapse spaces."""
    chars = []
    for ch in raw:
        if ch.isspace():
            chars.append(" ")
        elif unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co"):
            chars.append(ch)
    return " ".join("".join(chars).split())


def _word_count(text: str) -> int:
    """Words that contain a letter or digit: '- -' or '!! ??' is not two words."""
    return sum(1 for token in text.split(" ") if _WORD.search(token))


def comparison_key(text: str) -> str:
    """Text reduced to lower-case words, to spot a correction equal to the caption."""
    words = (re.sub(r"[^\w]", "", token) for token in normalize_text(text).casefold().split(" "))
    return " ".join(word for word in words if word)


def validate_correction(raw: str, caption_text: str) -> str:
    """The normalised correction, or ``CorrectionRejected`` with the rule it broke."""
    text = normalize_text(raw)
    if len(text) < MIN_CHARS:
        raise CorrectionRejected(Rejection.TOO_SHORT, limit=MIN_CHARS)
    if len(text) > MAX_CHARS:
        raise CorrectionRejected(Rejection.TOO_LONG, length=len(text), limit=MAX_CHARS)
    if _word_count(text) < MIN_WORDS:
        raise CorrectionRejected(Rejection.TOO_FEW_WORDS, limit=MIN_WORDS)
    if comparison_key(text) == comparison_key(caption_text):
        raise CorrectionRejected(Rejection.UNCHANGED)
    return text
