"""``python -m train evaluate``: decode a split in batches and score it with pycocoevalcap."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.inference import beam_config_from_meta, default_beam_config, resolve_device

from . import metrics
from .data import load_dataset
from .features import fill_cache, open_cache
from .fit import FeatureSource, generate

log = logging.getLogger(__name__)


def add_parser(sub: Any,
               formatter: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter) -> None:
    parser = sub.add_parser(
        "evaluate", help="score a model on a dataset split (BLEU, METEOR, ROUGE-L, CIDEr)",
        description="Decode a dataset split with beam search in batches and score it with pycocoevalcap\n"
                    "(METEOR needs Java; without it METEOR is skipped with a warning).",
        epilog="example:\n  python -m train evaluate --model runs/flickr8k/best "
               "--data flickr:../shared/data/flickr8k --split val --json",
        formatter_class=formatter)
    parser.add_argument("--model", default=None, metavar="CHECKPOINT",
                        help="checkpoint folder (default: the bundled default model)")
    parser.add_argument("--data", required=True, metavar="FORMAT:PATH",
                        help="dataset: flickr:DIR, karpathy:FILE[@IMAGE_ROOT] or "
                             "coco:ANNOTATIONS_DIR[@IMAGE_ROOT]")
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--beam", type=int, default=None, metavar="K",
                        help="beam size (default: the one recorded in the checkpoint, else 3)")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="maximum caption length in words (default: the checkpoint's, else 20)")
    parser.add_argument("--length-penalty", type=float, default=None, metavar="X",
                        help="length normalisation exponent (default: the checkpoint's, else 0)")
    parser.add_argument("--block-ngram", type=int, default=None, metavar="N",
                        help="forbid repeating an n-gram of this size (default: the checkpoint's, else off)")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=100, metavar="N", help="images decoded together")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cache", default="cache/features", metavar="DIR",
                        help="encoder feature cache folder (shared with `fit`)")
    parser.add_argument("--no-cache", action="store_true",
                        help="encode the images directly, without the cache")
    parser.add_argument("--captions-out", default=None, metavar="FILE",
                        help="where to write the per-image captions as JSON (default: ./captions_SPLIT.json)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: Bleu_1..4, METEOR (null without Java), ROUGE_L, "
                             "CIDEr, n_images")
    parser.set_defaults(func=run)


def beam_from_args(args: argparse.Namespace, base: BeamConfig) -> BeamConfig:
    return BeamConfig(
        beam_size=args.beam or base.beam_size,
        max_len=args.max_len or base.max_len,
        length_penalty=base.length_penalty if args.length_penalty is None else args.length_penalty,
        block_ngram=base.block_ngram if args.block_ngram is None else args.block_ngram,
    )


def evaluate(model_path: str | None, data: str, split: str, beam: BeamConfig | None = None, limit: int = 0,
             device: str = "auto", cache: str | None = "cache/features", batch_size: int = 100,
             ) -> tuple[metrics.Scores, dict[str, str], dict[str, Any]]:
    target = resolve_device(device)
    model = checkpoint.load(model_path, target)
    beam = beam or default_beam_config(model)
    records = load_dataset(data, (split,)).split(split)
    if limit:
        records = records[:limit]
    images = {r.image_id: r.path for r in records}
    feature_cache = None
    if cache:
        feature_cache = open_cache(model, Path(cache))
        fill_cache(feature_cache, model, list(images.values()), target, progress=False)
    source = FeatureSource(model, images, feature_cache, target)
    start = time.perf_counter()
    hyps = generate(model, source, [r.image_id for r in records], beam, batch_size)
    seconds = time.perf_counter() - start
    refs = {r.image_id: list(r.captions) for r in records}
    info = {"model": model.version, "beam": beam.__dict__, "decode_seconds": seconds}
    return metrics.score(refs, hyps), hyps, info


def run(args: argparse.Namespace) -> int:
    meta = checkpoint.read_document(args.model).get("meta", {})
    beam = beam_from_args(args, beam_config_from_meta(meta))
    scores, hyps, info = evaluate(args.model, args.data, args.split, beam, args.limit, args.device,
                                  None if args.no_cache else args.cache, args.batch_size)
    captions_out = Path(args.captions_out or f"captions_{args.split}.json")
    captions_out.write_text(json.dumps(hyps, indent=0, ensure_ascii=False) + "\n")
    for warning in scores.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.json:
        # Always pycocoevalcap's keys: a metric that could not run (METEOR without Java) is null.
        values: dict[str, float | None] = {key: scores.values.get(key) for key in metrics.METRIC_KEYS}
        print(json.dumps({**values, "n_images": len(hyps)}))
    else:
        print(f"model {info['model']}, {len(hyps)} images of {args.split}, beam {beam.beam_size}, "
              f"length penalty {beam.length_penalty}")
        for key, value in scores.values.items():
            print(f"{key:>8}: {value:.4f}")
        if "METEOR" not in scores.values:
            print("  METEOR: skipped (Java not found)")
        print(f"captions written to {captions_out}")
    return 0
