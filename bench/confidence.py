"""When is a caption not to be trusted? The beam score and the encoder's ImageNet classifier, measured.

On the validation split (shipped decoding settings, through ``train.scoring``): each image's
CIDEr against its beam score (the lowest-scoring fifth against the rest), then a rule calibrated
there: a score threshold (only if low scores do predict low CIDEr) and the classifier probability
above which an object the caption does not mention makes it untrusted, the lowest that keeps the
hedge on at most ``--val-budget`` of validation captions. The rule is then tried, unchanged, on a
small out-of-domain set: photos that ship with scikit-image, scikit-learn and matplotlib (a cat, a
cup of coffee, a rocket, printed text, drawings, space, coins...) and a few drawings made here.

Run: python bench/confidence.py [--model CHECKPOINT] [--cache DIR] [--write-meta]
Writes bench/results/confidence.json; --write-meta stores the rule in the checkpoint's metadata.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, add_split_options, relative, relative_spec, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.checkpoint import CaptionModel  # noqa: E402
from captioner.confidence import ConfidenceRule, classifier_guesses, mentions  # noqa: E402
from captioner.inference import Captioner, default_beam_config  # noqa: E402
from captioner.result import CaptionResult  # noqa: E402
from train import metrics  # noqa: E402
from train.data import ImageRecord, load_dataset  # noqa: E402
from train.evaluate import write_meta  # noqa: E402
from train.features import feature_source  # noqa: E402
from train.scoring import decode_results  # noqa: E402

SEEN_THRESHOLDS = tuple(round(float(x), 2) for x in np.arange(0.2, 0.96, 0.05))
# A class is familiar when the classifier gives it FAMILIAR_PROB on FAMILIAR_IMAGES training photos.
FAMILIAR_PROB, FAMILIAR_IMAGES = 0.3, 8
SCORE_QUANTILE = 0.05  # with a predictive score, the lowest 5 % of validation captions are hedged
PREDICTIVE_RATIO = 0.75  # the low fifth's mean CIDEr must be below this fraction of the rest's


SKIMAGE_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "page.png", "text.png", "logo.png",
                  "hubble_deep_field.jpg", "moon.png", "coins.png", "clock_motion.png", "motorcycle_left.png",
                  "retina.jpg", "cell.png", "brick.png", "color.png", "horse.png", "ihc.png", "grass.png",
                  "camera.png", "astronaut.png")
MATPLOTLIB_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def package_photos() -> dict[str, Path]:
    """Out-of-domain photos that ship inside installed packages (nothing is downloaded).

    A package that is not installed (scikit-learn is only in the ``bench`` extra) adds no photos;
    the report lists the photos it used, so runs with fewer packages are told apart.
    """
    photos: dict[str, Path] = {}
    if importlib.util.find_spec("skimage"):
        skimage_data = Path(importlib.import_module("skimage").__file__ or "").parent / "data"
        photos.update({f"skimage/{name}": skimage_data / name for name in SKIMAGE_PHOTOS})
    if importlib.util.find_spec("sklearn"):
        sklearn_images = Path(importlib.import_module("sklearn").__file__ or "").parent / "datasets" / "images"
        photos.update({f"sklearn/{p.name}": p for p in sorted(sklearn_images.glob("*.jpg"))})
    if importlib.util.find_spec("matplotlib"):
        sample = Path(importlib.import_module("matplotlib").get_data_path()) / "sample_data"
        photos.update({f"matplotlib/{name}": sample / name for name in MATPLOTLIB_PHOTOS})
    return {name: path for name, path in photos.items() if path.is_file()}


def drawings() -> dict[str, Image.Image]:
    """Simple drawings: shapes, a house, a smiley, a bar chart (nothing like a Flickr photo)."""
    out = {}
    for name, draw_fn in (("shapes", _shapes), ("house", _house), ("smiley", _smiley), ("chart", _chart)):
        image = Image.new("RGB", (224, 224), "white")
        draw_fn(ImageDraw.Draw(image))
        out[f"drawn/{name}"] = image
    return out


def _shapes(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((20, 20, 100, 100), fill="red")
    d.ellipse((120, 40, 200, 120), fill="blue")
    d.polygon([(40, 200), (110, 120), (180, 200)], fill="green")


def _house(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((50, 100, 170, 200), outline="black", width=4)
    d.polygon([(40, 100), (110, 30), (180, 100)], outline="black", width=4)
    d.rectangle((95, 150, 125, 200), fill="brown")


def _smiley(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((30, 30, 194, 194), fill="yellow", outline="black", width=3)
    d.ellipse((75, 80, 95, 100), fill="black")
    d.ellipse((130, 80, 150, 100), fill="black")
    d.arc((70, 100, 155, 160), 20, 160, fill="black", width=4)


def _chart(d: ImageDraw.ImageDraw) -> None:
    for i, height in enumerate((60, 120, 90, 160, 40)):
        d.rectangle((20 + 40 * i, 200 - height, 50 + 40 * i, 200), fill=("navy", "orange")[i % 2])
    d.line((15, 200, 215, 200), fill="black", width=2)


def low_fifth(val: dict[str, CaptionResult], cider: dict[str, float]) -> dict[str, Any]:
    """Mean per-image CIDEr of the lowest-scoring fifth of captions against the rest."""
    order = sorted(val, key=lambda k: val[k].score)
    cut = len(order) // 5
    low, rest = [cider[k] for k in order[:cut]], [cider[k] for k in order[cut:]]
    scores = np.array([val[k].score for k in order])
    correlation = float(np.corrcoef(scores, [cider[k] for k in order])[0, 1])
    return {"low_fifth_mean_cider": float(np.mean(low)), "rest_mean_cider": float(np.mean(rest)),
            "score_at_fifth": float(scores[cut]), "spearman_like_pearson_score_cider": correlation,
            "n_low": len(low), "n_rest": len(rest)}


def familiar_classes(model: CaptionModel, records: list[ImageRecord], cache: str) -> frozenset[str]:
    """ImageNet classes the classifier gives at least FAMILIAR_PROB on FAMILIAR_IMAGES training photos."""
    source = feature_source(model, {r.image_id: r.path for r in records}, torch.device("cpu"), cache)
    counts: Counter[str] = Counter()
    for start in range(0, len(records), 500):
        chunk = [r.image_id for r in records[start:start + 500]]
        for guesses in classifier_guesses(model.encoder.backbone.classifier, source(chunk)):
            counts.update(label for label, p in guesses if p >= FAMILIAR_PROB)
    return frozenset(label for label, n in counts.items() if n >= FAMILIAR_IMAGES)


def calibrate(val: dict[str, CaptionResult], split: dict[str, Any], familiar: frozenset[str],
              budget: float) -> ConfidenceRule:
    """The rule: a score threshold if scores predict CIDEr, then the lowest classifier threshold in budget."""
    predictive = split["low_fifth_mean_cider"] < PREDICTIVE_RATIO * split["rest_mean_cider"]
    scores = np.array([r.score for r in val.values()])
    min_score = float(np.quantile(scores, SCORE_QUANTILE)) if predictive else None
    for threshold in SEEN_THRESHOLDS:
        rule = ConfidenceRule(min_score, threshold, familiar)
        if hedge_rate(rule, val.values()) <= budget:
            return rule
    return ConfidenceRule(min_score, familiar=familiar)


def hedge_rate(rule: ConfidenceRule, results: Any) -> float:
    flags = [not rule.trusted(r.words, r.score, r.seen) for r in results]
    return float(np.mean(flags)) if flags else 0.0


def judged(rule: ConfidenceRule, result: CaptionResult) -> dict[str, Any]:
    unmentioned = [[label, p] for label, p in result.seen if not mentions(result.words, label)]
    return {"caption": result.text, "score": round(result.score, 4), "confident": rule.trusted(
        result.words, result.score, result.seen), "seen": [list(s) for s in result.seen], "unmentioned": unmentioned}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_split_options(parser, device=False)
    parser.add_argument("--val-budget", type=float, default=0.10, help="largest share of hedged val captions")
    parser.add_argument("--write-meta", action="store_true", help="store the rule in the checkpoint's metadata")
    parser.add_argument("--json", type=Path, default=RESULTS / "confidence.json")
    args = parser.parse_args()

    run = start_run()
    model = checkpoint.load(args.model)
    beam = default_beam_config(model)
    dataset = load_dataset(args.data, ("train", args.split))
    records = dataset.split(args.split)[: args.limit or None]
    familiar = familiar_classes(model, dataset.split("train"), args.cache)
    source = feature_source(model, {r.image_id: r.path for r in records}, torch.device("cpu"), args.cache)
    val = decode_results(model, source, [r.image_id for r in records], beam)
    scored = metrics.score({r.image_id: list(r.captions) for r in records}, {k: v.text for k, v in val.items()},
                           ("CIDEr",))
    split = low_fifth(val, scored.per_image_cider)
    rule = calibrate(val, split, familiar, args.val_budget)
    hedged = [k for k, r in val.items() if not rule.trusted(r.words, r.score, r.seen)]
    trusted = [k for k in val if k not in set(hedged)]

    captioner = Captioner(model, "cpu", beam)
    captioner.confidence = rule
    pictures = {name: Image.open(path) for name, path in package_photos().items()} | drawings()
    outside = {name: judged(rule, captioner.caption_images([picture.convert("RGB")], attention=False)[0])
               for name, picture in pictures.items()}
    ood_rate = float(np.mean([not o["confident"] for o in outside.values()]))
    val_rate = len(hedged) / len(val)
    print(f"val: low fifth CIDEr {split['low_fifth_mean_cider']:.3f} vs rest {split['rest_mean_cider']:.3f}; "
          f"min score {rule.min_score}, seen {rule.seen_threshold}, {len(familiar)} familiar classes; "
          f"hedged {val_rate:.1%} of val, {ood_rate:.1%} of {len(outside)} out-of-domain", flush=True)
    for name, o in outside.items():
        print(f"  {name}: {'ok  ' if o['confident'] else 'HEDGE'} {o['caption']!r} seen {o['seen'][:1]}")
    if args.write_meta:
        calibrated_on = f"{relative_spec(args.data)} {args.split}"
        written = write_meta(args.model, "confidence", {**rule.to_meta(), "calibrated_on": calibrated_on})
        print(f"rule written to {relative(written)}")
    write_result(args.json, {
        "benchmark": "caption confidence: beam score and ImageNet classifier",
        "model_version": model.version, "data": relative_spec(args.data), "split": args.split,
        "decoding": asdict(beam),
        "n_val": len(val), "val_corpus_cider": scored.values["CIDEr"], "score_vs_cider": split,
        "rule": {**rule.to_meta(), "familiar_prob": FAMILIAR_PROB, "familiar_images": FAMILIAR_IMAGES,
                 "val_budget": args.val_budget, "score_quantile": SCORE_QUANTILE,
                 "predictive_ratio": PREDICTIVE_RATIO},
        "val_hedge_rate": val_rate,
        "val_mean_cider_hedged": float(np.mean([scored.per_image_cider[k] for k in hedged])) if hedged else None,
        "val_mean_cider_trusted": float(np.mean([scored.per_image_cider[k] for k in trusted])),
        "val_hedge_rate_by_seen_threshold": {str(t): hedge_rate(replace(rule, seen_threshold=t), val.values())
                                             for t in SEEN_THRESHOLDS},
        "out_of_domain_hedge_rate": ood_rate, "out_of_domain": outside, "context": run.context("cpu"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
