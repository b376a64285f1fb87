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


def add_parser(sub: Any) -> None:
    parser = sub.add_parser("evaluate", help="score a model on a dataset split (BLEU, METEOR, ROUGE-L, CIDEr)",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--data", required=True, help="dataset as FORMAT:PATH (see `fit --help`)")
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the model's own)")
    parser.add_argument("--max-len", type=int, default=None, help="maximum caption length")
    parser.add_argument("--length-penalty", type=float, default=None, help="length normalisation exponent")
    parser.add_argument("--block-ngram", type=int, default=None, help="forbid repeated n-grams of this size")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    parser.add_argument("--batch-size", type=int, default=100, help="images decoded together")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--cache", default="cache/features", help="encoder feature cache folder")
    parser.add_argument("--no-cache", action="store_true", help="encode images directly, without the cache")
    parser.add_argument("--captions-out", default=None,
                        help="where to write per-image captions as JSON (default: captions_SPLIT.json here)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with pycocoevalcap's keys")
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
        print(json.dumps({**scores.values, "n_images": len(hyps)}))
    else:
        print(f"model {info['model']}, {len(hyps)} images of {args.split}, beam {beam.beam_size}, "
              f"length penalty {beam.length_penalty}")
        for key, value in scores.values.items():
            print(f"{key:>8}: {value:.4f}")
        if "METEOR" not in scores.values:
            print("  METEOR: skipped (Java not found)")
        print(f"captions written to {captions_out}")
    return 0
