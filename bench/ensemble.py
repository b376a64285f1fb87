"""What an ensemble of decoders gains over its members, and how much of it a distilled student keeps.

Every model and the ensemble decode the same split through ``train.evaluate`` (the path ``python
-m train evaluate [--ensemble ...]`` takes) and are scored with pycocoevalcap. Each row is also
given as a ratio to the first model's, measured in the same run, with its decoding time and the
size its decoders would take in float16 (what a shipped checkpoint stores).

Run: python bench/ensemble.py --member runs/b/best [--member ...] [--student runs/s/best ...]
         [--model CHECKPOINT] [--ensemble-beams 3,5,10] [--data flickr:../shared/data/flickr8k]
Writes bench/results/ensemble.json.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, add_split_options, metric_ratios, relative_spec, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.beam import BeamConfig  # noqa: E402
from captioner.inference import beam_config_from_meta  # noqa: E402
from train.evaluate import evaluate  # noqa: E402

FLOAT16_BYTES = 2


@functools.cache  # each member is counted in its own row and in every ensemble row: load it once
def decoder_parameters(path: str | None) -> int:
    """The decoder's parameter count: what one more ensemble member costs."""
    return sum(p.numel() for p in checkpoint.load(path).decoder.parameters())


def row(kind: str, models: list[str | None], beam: BeamConfig, args: argparse.Namespace) -> dict[str, Any]:
    result, info = evaluate(models[0], args.data, args.split, beam, args.limit, args.device, args.cache,
                            ensemble=[m for m in models[1:] if m is not None])
    entry = {"kind": kind, "models": [checkpoint.version_of(m) for m in models], "decoding": asdict(beam),
             "n_images": len(result.captions), "metrics": result.scores.values,
             "decode_seconds": round(info["decode_seconds"], 2),
             "decoder_parameters": sum(decoder_parameters(m) for m in models)}
    entry["decoder_megabytes_float16"] = round(entry["decoder_parameters"] * FLOAT16_BYTES / 1e6, 1)
    print(f"{kind:8s} {' + '.join(entry['models'])} beam {beam.beam_size}: "
          + "  ".join(f"{k} {v:.4f}" for k, v in result.scores.values.items()), flush=True)
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="the first member (default: the bundled model)")
    parser.add_argument("--member", action="append", required=True, help="another ensemble member (repeat)")
    parser.add_argument("--student", action="append", default=[], help="a distilled single model to compare")
    parser.add_argument("--ensemble-beams", default="3,5,10", help="beam sizes the ensemble is scored at")
    add_split_options(parser)
    parser.add_argument("--json", type=Path, default=RESULTS / "ensemble.json")
    args = parser.parse_args()

    run = start_run()
    shipped = beam_config_from_meta(checkpoint.read_document(args.model).get("meta", {}))
    members: list[str | None] = [args.model, *args.member]
    rows = [row("member", [m], shipped, args) for m in members]
    rows += [row("student", [s], shipped, args) for s in args.student]
    for size in (int(b) for b in args.ensemble_beams.split(",") if b.strip()):
        rows.append(row("ensemble", members, replace(shipped, beam_size=size), args))
    reference = rows[0]["metrics"]
    for entry in rows:
        entry["ratio_to_first_member"] = metric_ratios(entry["metrics"], reference)
    write_result(args.json, {
        "benchmark": "an ensemble of decoders against its members and distilled students",
        "data": relative_spec(args.data), "split": args.split, "member_decoding": asdict(shipped),
        "results": rows, "context": run.context(args.device),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
