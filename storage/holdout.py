"""The one rule for which corrected photos are held out to judge a fine-tuned candidate.

``storage export`` writes the held-out photos as its validation split and ``train finetune --db``
holds out the same ones, so both judge a candidate on the same photos. A photo's place never
changes between runs, so the held-out set only grows as corrections arrive.
"""

from __future__ import annotations

import hashlib

HOLDOUT_FRACTION = 0.2  # a fixed fifth of the corrected photos


def holdout_bucket(photo_key: str) -> float:
    """A photo's fixed place in [0, 1), from its key (the SHA-256 of its bytes)."""
    return int(hashlib.sha256(photo_key.encode()).hexdigest()[:8], 16) / 2**32


def is_held_out(photo_key: str, fraction: float = HOLDOUT_FRACTION) -> bool:
    return holdout_bucket(photo_key) < fraction
