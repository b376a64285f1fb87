"""Which encoder: decoders trained on EfficientNet-Lite0, -Lite1 and -Lite2 features, compared
(or on one encoder's 7x7 and 14x14 grids: ``efficientnet_lite1`` and ``efficientnet_lite1_os16``,
written to ``--out bench/results/encoders_grid.json``).

    python bench/encoders.py RUN_DIR [RUN_DIR ...] [--data flickr:../shared/data/flickr8k]
                             [--photos 24] [--baseline captioner/default_model]

Each RUN_DIR is a ``python -m train fit --encoder NAME`` run, all with one recipe
(the command each was trained with is in its ``history.json``). For each:

* quality: its ``best`` checkpoint decodes the whole validation split with the baseline model's
  shipped decoding settings (beam size, length penalty, n-gram blocking), scored with
  pycocoevalcap, as ``python -m train evaluate`` does; plus the per-epoch validation CIDEr and
  wall-clock seconds from its ``history.json``;
* cost: single-photo CPU latency, one photo at a time from its JPEG bytes (decode, preprocess,
  encoder as the worker serves it, beam search), the models interleaved photo by photo so that a
  noisy machine slows them alike; the ratio is to the baseline model measured in the same loop.

The issue's rule, applied in ``decision``: keep the encoder with the best validation CIDEr if its
latency is at most 1.5x the baseline's. Writes bench/results/encoders.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.report import RESULTS, relative, relative_spec, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.inference import Captioner, beam_config_from_meta  # noqa: E402
from train.evaluate import evaluate  # noqa: E402

MAX_LATENCY_RATIO = 1.5  # the bound on a stronger encoder's single-photo cost
FLICKR_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def training_summary(run_dir: Path) -> dict[str, Any]:
    """What the run's history says: its recipe, validation CIDEr per epoch, wall-clock seconds."""
    history = json.loads((run_dir / "history.json").read_text())
    epochs = history["epochs"]
    config = history["config"]
    return {
        "encoder": config["model"]["encoder"],
        "hidden_dim": config["model"]["hidden_dim"],  # the decoder's LSTM width
        "recipe": {key: config[key] for key in ("epochs", "patience", "batch_size", "lr") if key in config},
        "val_cider_by_epoch": [round(e["val"]["CIDEr"], 4) for e in epochs],
        "train_seconds": round(sum(e.get("train_seconds", 0.0) for e in epochs), 1),
        "val_seconds": round(sum(e.get("val_seconds", 0.0) for e in epochs), 1),
    }


def single_photo_latency(models: dict[str, Captioner], photos: list[bytes], rounds: int) -> dict[str, list[float]]:
    """Seconds per photo for each model, one photo at a time, interleaved photo by photo."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for captioner in models.values():  # first calls are slow (allocations): not timed
        captioner.caption_bytes(photos[0], attention=False)
    for _ in range(rounds):
        for data in photos:
            for name, captioner in models.items():
                started = time.perf_counter()
                captioner.caption_bytes(data, attention=False)
                seconds[name].append(time.perf_counter() - started)
    return seconds


def decision(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best validation CIDEr among the encoders whose latency is within the bound."""
    allowed = [row for row in rows if row["latency_ratio_to_baseline"] <= MAX_LATENCY_RATIO]
    best = max(rows, key=lambda row: row["val"]["CIDEr"])
    kept = max(allowed, key=lambda row: row["val"]["CIDEr"]) if allowed else None
    return {
        "rule": f"best validation CIDEr among encoders at most {MAX_LATENCY_RATIO}x the baseline's latency",
        "best_cider": best["run"], "kept": kept["run"] if kept else None,
        "kept_encoder": kept["training"]["encoder"] if kept else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="fit output folders (each with best/ and history.json)")
    parser.add_argument("--baseline", default=None, help="the model latency is compared with (default: bundled)")
    parser.add_argument("--data", default="flickr:../shared/data/flickr8k")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all; a smoke run)")
    parser.add_argument("--cache", default=str(ROOT / "cache" / "features"))
    parser.add_argument("--photos", type=int, default=24, help="photos timed one at a time, per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "encoders.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = sorted(FLICKR_IMAGES.glob("*.jpg"))[: args.photos]
    if not paths:
        raise SystemExit(f"no photos in {relative(FLICKR_IMAGES)}: the latency comparison needs real JPEGs")

    run = start_run()
    shipped = beam_config_from_meta(checkpoint.read_document(args.baseline).get("meta", {}))
    rows: list[dict[str, Any]] = []
    for run_dir in args.runs:
        result, info = evaluate(str(run_dir / "best"), args.data, args.split, shipped, args.limit, "cpu", args.cache)
        rows.append({"run": run_dir.name, "training": training_summary(run_dir),
                     "val": result.scores.values, "decode_seconds": round(info["decode_seconds"], 1),
                     "weights_mb": round((run_dir / "best" / "model.safetensors").stat().st_size / 1e6, 1)})
        print(f"{run_dir.name}: " + "  ".join(f"{k} {v:.4f}" for k, v in result.scores.values.items()), flush=True)

    models = {"baseline": Captioner.load(args.baseline, "cpu", beam=shipped)}
    for row, run_dir in zip(rows, args.runs, strict=True):
        models[row["run"]] = Captioner.load(str(run_dir / "best"), "cpu", beam=shipped)
    for captioner in models.values():
        captioner.freeze_encoder()  # as the worker serves it
    seconds = single_photo_latency(models, [p.read_bytes() for p in paths], args.rounds)
    base = statistics.median(seconds["baseline"])
    latency = {name: {"p50_ms": round(1000 * statistics.median(s), 1), "mean_ms": round(1000 * statistics.mean(s), 1)}
               for name, s in seconds.items()}
    for row in rows:
        row["latency_ms_p50"] = latency[row["run"]]["p50_ms"]
        row["latency_ratio_to_baseline"] = round(statistics.median(seconds[row["run"]]) / base, 3)
        print(f"{row['run']}: {row['latency_ms_p50']} ms a photo, {row['latency_ratio_to_baseline']}x the baseline")
    write_result(args.out, {
        "benchmark": "encoders: validation quality and single-photo CPU latency",
        "data": relative_spec(args.data), "split": args.split, "limit": args.limit, "decoding": asdict(shipped),
        "baseline": relative(checkpoint.resolve(args.baseline)), "baseline_latency": latency["baseline"],
        "latency_photos": len(paths), "latency_rounds": args.rounds, "torch_threads": torch.get_num_threads(),
        "results": rows, "decision": decision(rows), "context": run.context("cpu"),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
