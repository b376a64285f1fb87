"""The one rule for which corrected photos are held out to judge a fine-tuned candidate.

``storage export`` writes the held-out photos as its validation split and ``train finetune --db``
holds out the same ones, so both judge a candidate on the same photos. A photo's place comes from
a keyed hash (HMAC-SHA256) of its content hash under a secret salt kept in the data folder: the
photo's sender controls its bytes, but without the salt cannot tell (or choose) which of their
photos will judge the candidate. A photo's place never changes between runs, so the held-out set
only grows as corrections arrive.

People, not photos, are the unit of trust: a photo whose correctors already contributed their
share of the held-out photos (``MAX_PERSON_SHARE``) is trained on instead, so one account with many
photos cannot make up the jury.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path

from storage.keys import load_or_create_key

HOLDOUT_FRACTION = 0.2  # a fixed fifth of the corrected photos
MAX_PERSON_SHARE = 0.1  # one person corrected at most a tenth of the held-out photos
SALT_FILENAME = "holdout_salt"


def load_or_create_salt(data_dir: Path) -> bytes:
    """The data folder's secret salt, created (random, owner-only file) on first use."""
    return load_or_create_key(data_dir / SALT_FILENAME)


def holdout_bucket(photo_key: str, salt: bytes) -> float:
    """A photo's fixed place in [0, 1), from its key (the SHA-256 of its bytes) and the salt."""
    digest = hmac.new(salt, photo_key.encode(), hashlib.sha256).hexdigest()
    return int(digest[:8], 16) / 2**32


def is_held_out(photo_key: str, salt: bytes, fraction: float = HOLDOUT_FRACTION) -> bool:
    """Whether the photo falls in the held-out fraction (before the per-person share is applied)."""
    return holdout_bucket(photo_key, salt) < fraction


def choose_held_out(
    contributors: Mapping[str, Collection[int]],
    salt: bytes,
    fraction: float = HOLDOUT_FRACTION,
    max_person_share: float = MAX_PERSON_SHARE,
) -> set[str]:
    """The held-out photos among ``contributors`` (photo key -> ids of the people who corrected it).

    Photos in the held-out fraction are taken in their salted order; one is skipped (trained on
    instead) when one of its correctors already has ``max_person_share`` of the held-out places
    (at least one each). A photo nobody is named for (an export without people) is never skipped.
    """
    buckets = {key: holdout_bucket(key, salt) for key in contributors}
    candidates = sorted((key for key, bucket in buckets.items() if bucket < fraction), key=buckets.__getitem__)
    per_person = max(1, math.floor(max_person_share * len(candidates)))
    taken: Counter[int] = Counter()
    held: set[str] = set()
    for key in candidates:
        people = set(contributors[key])
        if any(taken[person] >= per_person for person in people):
            continue
        taken.update(people)
        held.add(key)
    return held
