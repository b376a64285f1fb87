"""When a caption is not trusted: the rule, the classifier's labels, the result fields, the CLI and the bot's words."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner import checkpoint
from captioner.confidence import DEFAULT_RULE, ConfidenceRule, classifier_guesses, imagenet_labels, mentions
from captioner.encoder import Encoder
from captioner.inference import Captioner, to_model_input
from tests.helpers import photo_bytes


def test_imagenet_labels_are_the_thousand_classes_in_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[285] == "Egyptian cat" and labels[967] == "espresso"


def test_a_caption_mentions_a_class_by_its_own_words_or_its_kind() -> None:
    assert mentions(["a", "chihuahua", "sits"], "Chihuahua")
    assert mentions(["a", "dog", "runs"], "Chihuahua")  # a dog breed: "dog" names it
    assert mentions(["a", "cat", "sleeps"], "tabby")
    assert mentions(["a", "red", "mug"], "coffee mug")
    assert not mentions(["a", "brown", "dog", "runs"], "espresso")
    assert not mentions(["a", "dog"], "tabby")


def test_the_rule_vetoes_a_low_score_or_a_sure_unmentioned_unfamiliar_class() -> None:
    rule = ConfidenceRule(min_score=-1.2, seen_threshold=0.6, familiar=frozenset({"ski"}))
    words = ["a", "brown", "dog", "is", "running"]
    assert rule.trusted(words, -1.0, [("golden retriever", 0.9)])  # mentioned by its kind
    assert not rule.trusted(words, -1.0, [("espresso", 0.9)])
    assert rule.trusted(words, -1.0, [("espresso", 0.5)])  # not sure enough
    assert rule.trusted(words, -1.0, [("ski", 0.95)])  # familiar from the training photos
    assert not rule.trusted(words, -1.3, [("golden retriever", 0.9)])  # the score alone
    assert rule.trusted(words, -1.3, []) is False and ConfidenceRule().trusted(words, -99.0, [("espresso", 1.0)])


def test_the_rule_round_trips_through_checkpoint_metadata() -> None:
    rule = ConfidenceRule(-1.25, 0.55, frozenset({"ski", "swing"}))
    meta = json.loads(json.dumps({"confidence": rule.to_meta()}))
    assert ConfidenceRule.from_meta(meta) == rule
    assert ConfidenceRule.from_meta({}) == DEFAULT_RULE
    assert ConfidenceRule.from_meta({"confidence": {"min_score": None, "seen_threshold": 0.7}}).min_score is None


@torch.no_grad()
def test_classifier_guesses_from_the_region_grid_see_the_chelsea_cat() -> None:
    """The guesses come from the captioner's own features (pooled as classify pools them)."""
    data = pytest.importorskip("skimage.data")
    encoder = Encoder("efficientnet_lite0").eval()
    x = to_model_input(Image.fromarray(data.chelsea()), 224, encoder.mean, encoder.std).unsqueeze(0)
    guesses = classifier_guesses(encoder.backbone.classifier, encoder(x))[0]
    assert len(guesses) == 3 and guesses[0][0] == "Egyptian cat" and guesses[0][1] > 0.5
    assert [p for _, p in guesses] == sorted((p for _, p in guesses), reverse=True)
    direct = encoder.backbone.classify(x).softmax(-1)[0, 285]
    assert guesses[0][1] == pytest.approx(float(direct), abs=1e-3)


def test_results_carry_confidence_and_what_was_seen(tiny_checkpoint: Path) -> None:
    captioner = Captioner(checkpoint.load(tiny_checkpoint), "cpu")
    result = captioner.caption_bytes(photo_bytes(1), attention=False)
    assert result.seen == () and result.confident  # the tiny encoder has no classifier
    captioner.confidence = replace(DEFAULT_RULE, min_score=result.score + 1.0)
    assert not captioner.caption_bytes(photo_bytes(1), attention=False).confident


def test_checkpoint_metadata_sets_the_rule(tmp_path: Path, tiny_checkpoint: Path) -> None:
    model = checkpoint.load(tiny_checkpoint)
    model.meta["confidence"] = ConfidenceRule(min_score=0.0).to_meta()  # every log-probability is below 0
    saved = checkpoint.save(model, tmp_path / "strict")
    assert not Captioner.load(saved, "cpu").caption_bytes(photo_bytes(2), attention=False).confident
