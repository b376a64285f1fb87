"""Captioning metrics through pycocoevalcap (the standard coco-caption code).

METEOR and the PTB tokenizer run on Java. Without Java, captions are tokenised with the
project's own tokenizer (lower-case words, punctuation dropped: close to PTB for these texts)
and METEOR is skipped with a warning that is also returned to the caller.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from captioner.vocab import tokenize

log = logging.getLogger(__name__)

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
NO_JAVA_WARNING = "Java not found: METEOR skipped and captions tokenised without the PTB tokenizer"
_logged: set[str] = set()


@dataclass
class Scores:
    values: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    # Each image's CIDEr (pycocoevalcap's per-image scores), for paired comparisons of two models.
    per_image_cider: dict[str, float] = field(default_factory=dict)
    # Each image's score under every metric computed (metric -> image -> value), same use.
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)


def java_available() -> bool:
    return shutil.which("java") is not None


def _tokenize_all(captions: Mapping[str, Sequence[str]], use_java: bool) -> dict[str, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        data = {k: [{"caption": c} for c in v] for k, v in captions.items()}
        return dict(PTBTokenizer().tokenize(data))
    return {k: [" ".join(tokenize(c)) for c in v] for k, v in captions.items()}


def score(references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str],
          metrics: Sequence[str] = METRIC_KEYS, use_java: bool | None = None) -> Scores:
    """Corpus-level scores (fractions) of ``hypotheses`` against ``references`` (same keys)."""
    if set(references) != set(hypotheses):
        raise ValueError("references and hypotheses must cover the same images")
    if not hypotheses:
        raise ValueError("nothing to score")
    warnings: list[str] = []
    java = java_available() if use_java is None else use_java
    if not java:
        warnings.append(NO_JAVA_WARNING if "METEOR" in metrics else NO_JAVA_WARNING.split(":")[0]
                        + ": captions tokenised without the PTB tokenizer")
        if warnings[-1] not in _logged:  # once per process, not at every validation
            _logged.add(warnings[-1])
            log.warning(warnings[-1])
    gts = _tokenize_all(references, java)
    res = _tokenize_all({k: [v] for k, v in hypotheses.items()}, java)
    values: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {}
    for scorer, names in _scorers(metrics, java):
        # pycocoevalcap prints diagnostics to stdout; keep stdout clean for --json output.
        with contextlib.redirect_stdout(sys.stderr):
            result, image_scores = scorer.compute_score(gts, res)  # type: ignore[attr-defined]
        if isinstance(result, list):  # BLEU: one corpus value and one list of image scores per n
            values.update({n: float(r) for n, r in zip(names, result, strict=True)})
            per_image.update({n: _by_image(gts, s) for n, s in zip(names, image_scores, strict=True)})
        else:
            values[names[0]] = float(result)
            per_image[names[0]] = _by_image(gts, image_scores)
    kept = {k: per_image[k] for k in METRIC_KEYS if k in per_image}
    return Scores({k: values[k] for k in METRIC_KEYS if k in values}, warnings, kept.get("CIDEr", {}), kept)


def _by_image(gts: Mapping[str, object], image_scores: Sequence[float]) -> dict[str, float]:
    return {key: float(v) for key, v in zip(gts, image_scores, strict=True)}


def _scorers(metrics: Sequence[str], java: bool) -> list[tuple[object, list[str]]]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    wanted = set(metrics)
    scorers: list[tuple[object, list[str]]] = []
    if wanted & {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"}:
        scorers.append((Bleu(4), ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]))
    if "METEOR" in wanted and java:
        from pycocoevalcap.meteor.meteor import Meteor

        scorers.append((Meteor(), ["METEOR"]))
    if "ROUGE_L" in wanted:
        scorers.append((Rouge(), ["ROUGE_L"]))
    if "CIDEr" in wanted:
        scorers.append((Cider(), ["CIDEr"]))
    return scorers

