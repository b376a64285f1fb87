"""``python -m train evaluate``: decode a split in batches and score it with pycocoevalcap.

With ``--write-metrics`` the scores are stored in the evaluated checkpoint's ``meta.metrics``, so
the numbers a model is published with come from this command, not from a hand-edited file.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.ensemble import ensemble_of
from captioner.inference import beam_config_from_meta, default_beam_config, resolve_device

from . import metrics
from .data import load_dataset
from .features import feature_source
from .scoring import SplitResult, score_records

log = logging.getLogger(__name__)


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser(
        "evaluate", help="score a model on a dataset split (BLEU, METEOR, ROUGE-L, CIDEr)",
        description="Decode a dataset split with beam search in batches and score it with pycocoevalcap\n"
                    "(METEOR needs Java; without it METEOR is skipped with a warning).",
        epilog="example:\n  python -m train evaluate --model runs/flickr8k/best "
               "--data flickr:../shared/data/flickr8k --split val --json",
        formatter_class=formatter)
    parser.add_argument("--model", default=None, metavar="CHECKPOINT",
                        help="checkpoint folder (default: the bundled default model)")
    parser.add_argument("--ensemble", action="append", default=[], metavar="CHECKPOINT",
                        help="decode with --model and this checkpoint together, their word probabilities "
                             "averaged (repeat for more; same encoder and words): how a distillation "
                             "teacher scores")
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
    parser.add_argument("--write-metrics", action="store_true",
                        help="store the scores, split, decoding settings and date in the checkpoint's "
                             "meta.metrics (rewrites the checkpoint in place, atomically)")
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
             ensemble: Sequence[str] = ()) -> tuple[SplitResult, dict[str, Any]]:
    """Captions and scores of ``split`` (its first ``limit`` images), and what was evaluated how;
    with ``ensemble``, decoded by the model and those checkpoints together."""
    target = resolve_device(device)
    model = checkpoint.load(model_path, target)
    others = [checkpoint.load(path, target) for path in ensemble]
    decoder = ensemble_of([model, *others]) if others else None
    beam = beam or default_beam_config(model)
    records = load_dataset(data, (split,)).split(split)
    if limit:
        records = records[:limit]
    source = feature_source(model, {r.image_id: r.path for r in records}, target, cache)
    result = score_records(model, source, records, beam, metrics.METRIC_KEYS, batch_size, decoder)
    name = " + ".join(m.version for m in [model, *others])
    return result, {"model": name, "beam": asdict(beam), "decode_seconds": result.decode_seconds}


def metrics_entry(result: SplitResult, data: str, split: str, beam: BeamConfig) -> dict[str, Any]:
    """What ``--json`` prints (pycocoevalcap's keys, null for a metric that could not run) and its context."""
    values: dict[str, Any] = {key: result.scores.values.get(key) for key in metrics.METRIC_KEYS}
    return {**values, "n_images": len(result.captions), "data": data, "split": split, "decoding": asdict(beam),
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def command_line(args: argparse.Namespace, beam: BeamConfig) -> str:
    """The command that reproduces these numbers, with the decoding settings spelled out."""
    words = ["python", "-m", "train", "evaluate", *(["--model", args.model] if args.model else []),
             *(word for path in args.ensemble for word in ("--ensemble", path)),
             "--data", args.data, "--split", args.split, "--beam", str(beam.beam_size),
             "--max-len", str(beam.max_len), "--length-penalty", str(beam.length_penalty),
             "--block-ngram", str(beam.block_ngram), *(["--limit", str(args.limit)] if args.limit else [])]
    return shlex.join(words)


def write_metrics(model_path: str | None, entry: dict[str, Any]) -> Path:
    """Store ``entry`` as the checkpoint's ``meta.metrics``: weights, config and the rest of meta unchanged."""
    return write_meta(model_path, "metrics", entry)


def write_meta(model_path: str | None, key: str, entry: dict[str, Any]) -> Path:
    """Store ``entry`` as the checkpoint's ``meta[key]``: weights, config and the rest of meta unchanged."""
    return checkpoint.update_meta(model_path, key, entry)


def run(args: argparse.Namespace) -> int:
    if args.write_metrics and args.ensemble:
        print("error: --write-metrics stores one checkpoint's own scores; an ensemble's are not its",
              file=sys.stderr)
        return 2
    meta = checkpoint.read_document(args.model).get("meta", {})
    beam = beam_from_args(args, beam_config_from_meta(meta))
    result, info = evaluate(args.model, args.data, args.split, beam, args.limit, args.device,
                            None if args.no_cache else args.cache, args.batch_size, args.ensemble)
    scores, hyps = result.scores, result.captions
    captions_out = Path(args.captions_out or f"captions_{args.split}.json")
    captions_out.write_text(json.dumps(hyps, indent=0, ensure_ascii=False) + "\n")
    for warning in scores.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    entry = metrics_entry(result, args.data, args.split, beam)
    if args.write_metrics:
        written = write_metrics(args.model, {**entry, "command": command_line(args, beam)})
        print(f"metrics written to {written / checkpoint.META_FILE}", file=sys.stderr)
    if args.json:
        print(json.dumps({key: entry[key] for key in [*metrics.METRIC_KEYS, "n_images"]}))
    else:
        print(f"model {info['model']}, {len(hyps)} images of {args.split}, beam {beam.beam_size}, "
              f"length penalty {beam.length_penalty}")
        for key, value in scores.values.items():
            print(f"{key:>8}: {value:.4f}")
        if "METEOR" not in scores.values:
            print("  METEOR: skipped (Java not found)")
        print(f"captions written to {captions_out}")
    return 0
