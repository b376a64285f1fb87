"""train.metrics gives pycocoevalcap's own numbers; without Java it skips METEOR and says so."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from captioner.vocab import tokenize
from train import metrics

REFS = {
    "1": ["A dog runs on the grass.", "a brown dog is running across a lawn", "The dog plays outside ."],
    "2": ["A man in a red shirt climbs a rock.", "a climber on a cliff", "Man rock climbing ."],
    "3": ["Two children play in the water.", "two kids splash in a pool", "Children swimming ."],
    "4": ["A black cat sits on a sofa.", "a cat on the couch", "A cat is resting indoors ."],
}
HYPS = {
    "1": "a dog is running on the grass",
    "2": "a man in a red shirt is climbing a rock",
    "3": "two children are playing in the water",
    "4": "a dog sits on a couch",
}
HAVE_JAVA = shutil.which("java") is not None


@pytest.fixture(scope="module")
def shared_meteor() -> Iterator[Any]:
    """One METEOR process for the module: its first score loads paraphrase tables (~15 s on a busy CPU)."""
    from pycocoevalcap.meteor.meteor import Meteor

    yield Meteor()  # its __del__ stops the Java process


def pycocoevalcap_scores(gts: dict[str, list[str]], res: dict[str, list[str]],
                         meteor: Any = None) -> dict[str, float]:
    """What coco-caption's COCOEvalCap.evaluate computes, scorer by scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    out.update({f"Bleu_{n + 1}": b for n, b in enumerate(bleu)})
    if meteor is not None:
        out["METEOR"], _ = meteor.compute_score(gts, res)
    out["ROUGE_L"], _ = Rouge().compute_score(gts, res)
    out["CIDEr"], _ = Cider().compute_score(gts, res)
    return out


@pytest.mark.skipif(not HAVE_JAVA, reason="no Java: pycocoevalcap's PTB tokenizer and METEOR need it")
def test_scores_equal_pycocoevalcap_with_java(monkeypatch: pytest.MonkeyPatch, shared_meteor: Any) -> None:
    from pycocoevalcap.meteor import meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFS.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in HYPS.items()})
    expected = pycocoevalcap_scores(gts, res, shared_meteor)
    monkeypatch.setattr(meteor, "Meteor", lambda: shared_meteor)  # the same scorer, started once
    result = metrics.score(REFS, HYPS)
    assert list(result.values) == list(metrics.METRIC_KEYS)
    assert result.values == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.warnings == []
    assert 0.2 < result.values["METEOR"] < 0.6 and 0.0 < result.values["Bleu_4"] < 1.0  # fractions


def test_scores_equal_pycocoevalcap_without_java(monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(metrics, "_logged", set())
    assert not metrics.java_available()
    gts = {k: [" ".join(tokenize(c)) for c in v] for k, v in REFS.items()}
    res = {k: [" ".join(tokenize(v))] for k, v in HYPS.items()}
    expected = pycocoevalcap_scores(gts, res)
    with caplog.at_level(logging.WARNING, logger="train.metrics"):
        result = metrics.score(REFS, HYPS)
        again = metrics.score(REFS, HYPS)
    assert list(result.values) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"]
    assert result.values == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert result.warnings and "METEOR skipped" in result.warnings[0]
    assert again.warnings == result.warnings
    logged = [r for r in caplog.records if "METEOR skipped" in r.getMessage()]
    assert len(logged) == 1  # warned once per process, reported with every result


@pytest.mark.skipif(not HAVE_JAVA, reason="Java not installed")
def test_use_java_false_forces_the_fallback() -> None:
    assert "METEOR" not in metrics.score(REFS, HYPS, use_java=False).values


def test_requested_subset_and_perfect_match() -> None:
    refs = {"a": ["a dog runs on the grass"], "b": ["two cats in the water"]}
    result = metrics.score(refs, {"a": "a dog runs on the grass", "b": "two cats in the water"},
                           ("Bleu_4", "CIDEr"), use_java=False)
    assert list(result.values) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"]
    assert result.values["Bleu_4"] == pytest.approx(1.0)


@pytest.mark.parametrize("refs, hyps", [({"1": ["a"]}, {"2": "a"}), ({}, {})])
def test_rejects_mismatched_inputs(refs: dict[str, Any], hyps: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        metrics.score(refs, hyps, use_java=False)
