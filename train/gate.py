"""The promotion gate of ``train finetune``: is a candidate better than its base, and safely so?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def paired_bootstrap_lower_bound(base: dict[str, float], candidate: dict[str, float], resamples: int = 5000,
                                 confidence: float = 0.95, seed: int = 0) -> float:
    """Lower confidence bound of the mean per-photo improvement (candidate - base).

    A few held-out photos make corpus scores noisy: noise in the corrections (spam, random
    text) can look like a gain. Promotion needs the gain to hold across photos, not on average by luck.
    """
    keys = sorted(set(base) & set(candidate))
    if not keys:
        return float("-inf")
    diffs = np.array([candidate[k] - base[k] for k in keys])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


@dataclass
class GateDecision:
    promote: bool
    reason: str


# CIDEr-D with the base's training corpus for document frequencies (train.finetune.heldout_cider).
HELDOUT_METRIC = "CIDEr-D"


def corrections_metric(base: dict[str, float], candidate: dict[str, float]) -> str:
    """The metric the gate judges held-out corrections by.

    CIDEr-D with corpus document frequencies when it was computed; otherwise CIDEr over the
    held-out set alone, unless its references are all alike (its IDF is then 0 for both): BLEU-1.
    """
    if HELDOUT_METRIC in base and HELDOUT_METRIC in candidate:
        return HELDOUT_METRIC
    if base.get("CIDEr", 0.0) == 0.0 and candidate.get("CIDEr", 0.0) == 0.0:
        return "Bleu_1"
    return "CIDEr"


def gate(base: dict[str, dict[str, float]], candidate: dict[str, dict[str, float]],
         margin: float, improvement_lower_bound: float | None = None, heldout_photos: int | None = None,
         min_photos: int = 0, min_gain: float = 0.0) -> GateDecision:
    """Better on the held-out corrections, and validation CIDEr within ``margin`` of the base.

    "Better" means a higher corpus score and, when per-photo scores are given, a 95% paired
    bootstrap lower bound of the per-photo gain (same metric) strictly above ``min_gain`` (for
    CIDEr-D; above 0 for the fallback metrics): a
    gain that is certain but tiny is what fine-tuning on noise buys (drifting toward generic
    phrases), not what people taught. With fewer than ``min_photos`` held-out photos there is
    nothing to resample: the candidate is rejected.
    """
    if not base["corrections"] or not candidate["corrections"]:
        return GateDecision(False, "no held-out corrections to judge the candidate on")
    if heldout_photos is not None and heldout_photos < min_photos:
        return GateDecision(False, f"too few held-out photos to judge the candidate ({heldout_photos}; "
                                   f"need {min_photos} from different people)")
    key = corrections_metric(base["corrections"], candidate["corrections"])
    b_corr, c_corr = base["corrections"][key], candidate["corrections"][key]
    b_val, c_val = base["validation"].get("CIDEr"), candidate["validation"].get("CIDEr")
    if not c_corr > b_corr:
        return GateDecision(False, f"not better on held-out corrections ({key} {c_corr:.3f} vs base {b_corr:.3f})")
    # The effect-size floor is on CIDEr-D's scale; the fallback metrics only need a gain above 0.
    min_gain = min_gain if key == HELDOUT_METRIC else 0.0
    if improvement_lower_bound is not None and not improvement_lower_bound > min_gain:
        need = f"; need > {min_gain:+.3f}" if min_gain else ""
        return GateDecision(False, f"gain on held-out corrections too small or not significant ({key} "
                                   f"{b_corr:.3f} -> {c_corr:.3f}, 95% lower bound of the per-photo {key} gain "
                                   f"{improvement_lower_bound:+.3f}{need})")
    if b_val is not None and c_val is not None and c_val < b_val * (1 - margin):
        drop = 100 * (1 - c_val / b_val) if b_val else float("inf")
        return GateDecision(False, f"validation CIDEr dropped {drop:.1f}% ({c_val:.3f} vs {b_val:.3f}; "
                                   f"allowed {100 * margin:.1f}%)")
    val_text = "not checked" if b_val is None or c_val is None else f"{b_val:.3f} -> {c_val:.3f}"
    bound = "" if improvement_lower_bound is None else f" (per-photo gain > {improvement_lower_bound:+.3f})"
    return GateDecision(True, f"held-out corrections {key} {b_corr:.3f} -> {c_corr:.3f}{bound}; "
                              f"validation CIDEr {val_text}")
