"""Screening a correction at entry: abuse, spam and contact details never become training captions.

A caption describes a photo; it never holds a link, an @mention, an e-mail address or a phone
number, so any of those flags it. Abuse is found by ``better-profanity`` (chosen over
``alt-profanity-check`` by measured precision and recall on a labelled list:
``bench/profanity_filters.py``, ``bench/results/profanity_filters.json``) and by the operator's
blocklist file (one word or phrase a line, ``#`` comments), which is where spam words and new
slurs go. A flagged correction is stored as flagged (for review) and never trained on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from storage import config
from storage.records import FlagReason

# Scheme or www., or a word ending in a common top-level domain ("spam.com", "t.me/x").
_URL = re.compile(
    r"(?:\b[a-z][a-z0-9+.-]*://|\bwww\.|\b[\w-]{1,63}\.(?:com|net|org|info|biz|io|co|me|ly|gg|ru|cn|xyz|top|"
    r"site|online|link|app|shop|club|live|tk|ml|ga|cf|uk|de|fr|us|tv|cc|to|su)\b)",
    re.IGNORECASE,
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_MENTION = re.compile(r"(?<![\w@])@\w{2,}")
# Seven or more digits with at most one separator between them: "+1 (555) 123-4567", "0123456789".
_PHONE = re.compile(r"\+?\d(?:[\s().-]{0,2}\d){6,}")
_WORDS = re.compile(r"[a-z0-9']+")


def _contact_reason(text: str) -> FlagReason | None:
    if _EMAIL.search(text):
        return FlagReason.EMAIL
    if _URL.search(text):
        return FlagReason.URL
    if _MENTION.search(text):
        return FlagReason.MENTION
    if _PHONE.search(text):
        return FlagReason.PHONE
    return None


@cache
def _profanity_filter() -> object:
    """better-profanity's filter, loaded once (it reads its word list on first use)."""
    from better_profanity import Profanity

    return Profanity()


def is_profane(text: str) -> bool:
    """True when ``better-profanity`` finds a swear word or slur (its leetspeak variants included)."""
    return bool(_profanity_filter().contains_profanity(text))  # type: ignore[attr-defined]


def words_of(text: str) -> str:
    """Lower-case words joined by single spaces, padded with spaces: phrases match on word boundaries."""
    return " " + " ".join(_WORDS.findall(text.casefold())) + " "


def parse_blocklist(lines: Iterable[str]) -> frozenset[str]:
    """Blocklist entries (one word or phrase a line; blank lines and ``#`` comments skipped), normalised."""
    entries = (words_of(line.split("#", 1)[0]).strip() for line in lines)
    return frozenset(entry for entry in entries if entry)


def load_blocklist(path: Path | None) -> frozenset[str]:
    """The operator's blocklist file; a missing file (or None) is an empty list."""
    if path is None or not path.is_file():
        return frozenset()
    return parse_blocklist(path.read_text(encoding="utf-8").splitlines())


@dataclass(frozen=True, slots=True)
class Screen:
    """The entry screen: contact details, the profanity library, the operator's blocklist."""

    blocklist: frozenset[str] = field(default_factory=frozenset)

    def flag_reason(self, text: str) -> FlagReason | None:
        """Why ``text`` must not be trained on, or None when it is clean."""
        contact = _contact_reason(text)
        if contact is not None:
            return contact
        padded = words_of(text)
        if any(f" {entry} " in padded for entry in self.blocklist):
            return FlagReason.BLOCKLIST
        if is_profane(text):
            return FlagReason.PROFANITY
        return None


class BlocklistFile:
    """The operator's blocklist file, re-read when it changes: edits apply without a restart."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._entries: frozenset[str] = frozenset()

    def entries(self) -> frozenset[str]:
        if self.path is None:
            return frozenset()
        try:
            stat = self.path.stat()
        except OSError:
            self._stamp, self._entries = None, frozenset()
            return self._entries
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            self._entries = load_blocklist(self.path)
            self._stamp = stamp
        return self._entries


@dataclass(frozen=True, slots=True)
class EntryPolicy:
    """The rules a correction meets on the way in (the bot builds it from its settings)."""

    daily_cap: int = 20  # corrections one person may add in any 24 hours; 0 = no cap
    flags_before_hold: int = 3  # after this many flagged corrections, a person's next ones wait for review
    blocklist: BlocklistFile = field(default_factory=lambda: BlocklistFile(None))

    def screen(self) -> Screen:
        return Screen(self.blocklist.entries())

    @classmethod
    def from_values(
        cls, daily_cap: int, flags_before_hold: int, blocklist_file: Path | None, data_dir: Path | None
    ) -> EntryPolicy:
        """The policy a process builds from its settings (the blocklist defaults to the data folder's)."""
        return cls(daily_cap, flags_before_hold, BlocklistFile(config.blocklist_file(blocklist_file, data_dir)))
