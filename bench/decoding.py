"""How decoding settings change caption quality: one model, one split, several beam settings.

Each setting decodes the whole split with the same weights through ``train.scoring`` (the path
``python -m train evaluate`` takes) and is scored with pycocoevalcap; each metric is also given as
a ratio to the model's own shipped setting, measured in the same run.

Run: python bench/decoding.py [--model CHECKPOINT] [--data flickr:../shared/data/flickr8k] [--limit N]
Writes bench/results/decoding.json.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, add_split_options, metric_ratios, relative, relative_spec, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.beam import BeamConfig  # noqa: E402
from captioner.inference import beam_config_from_meta  # noqa: E402
from train.evaluate import evaluate  # noqa: E402

# (beam size, length penalty, blocked n-gram size); the shipped setting is added from the checkpoint.
# (5, 0.0, 3): a model trained self-critically ranks its beams by CIDEr already and may not need
# the length normalisation a cross-entropy model does. (3, 1.0, 3): the cheapest beam with
# length normalisation and blocking, for models whose small beams already find their best captions.
# Length penalties 0.8-1.2 at beam 5: whether the shipped 1.0 sits at the top of BLEU-4 and CIDEr
# or a little longer or shorter captions would score better.
SETTINGS = ((1, 0.0, 0), (3, 0.0, 0), (3, 1.0, 3), (5, 0.0, 3), (5, 1.0, 0), (5, 0.8, 3), (5, 0.9, 3),
            (5, 1.0, 3), (5, 1.1, 3), (5, 1.2, 3), (10, 1.0, 3), (10, 1.5, 3))


def settings_to_try(shipped: BeamConfig) -> list[BeamConfig]:
    tried = [BeamConfig(beam_size=b, max_len=shipped.max_len, length_penalty=lp, block_ngram=n)
             for b, lp, n in SETTINGS]
    return tried if shipped in tried else [*tried, shipped]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    add_split_options(parser)
    parser.add_argument("--json", type=Path, default=RESULTS / "decoding.json")
    args = parser.parse_args()

    run = start_run()
    shipped = beam_config_from_meta(checkpoint.read_document(args.model).get("meta", {}))
    rows: list[dict[str, Any]] = []
    for beam in settings_to_try(shipped):
        result, info = evaluate(args.model, args.data, args.split, beam, args.limit, args.device, args.cache)
        rows.append({"decoding": asdict(beam), "shipped": beam == shipped, "n_images": len(result.captions),
                     "metrics": result.scores.values, "decode_seconds": round(info["decode_seconds"], 2)})
        print(f"beam {beam.beam_size:2d} lp {beam.length_penalty:.1f} block {beam.block_ngram}: "
              + "  ".join(f"{k} {v:.4f}" for k, v in result.scores.values.items()), flush=True)
    reference = next(row for row in rows if row["shipped"])["metrics"]
    for row in rows:
        row["ratio_to_shipped"] = metric_ratios(row["metrics"], reference)
    model_name = checkpoint.read_document(args.model).get("meta", {}).get("version")
    write_result(args.json, {
        "benchmark": "decoding settings on one model",
        "model": relative(checkpoint.resolve(args.model)), "model_version": model_name,
        "data": relative_spec(args.data), "split": args.split, "shipped_decoding": asdict(shipped),
        "results": rows, "context": run.context(args.device),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
