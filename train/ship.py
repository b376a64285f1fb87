"""``python -m train ship``: turn a training run's checkpoint into a model people are served.

The shipped model is the checkpoint's weights in float16 (half the size; captions are decoded in
float32 after loading), with what a user needs to trust it in its metadata: a version, how it was
trained (the commands, and each stage's ``history.json`` beside it), and the decoding settings it
was selected with. Scores are not copied: they belong to the weights and settings they were
measured with, so after shipping run

    python -m train evaluate --model OUT --data ... --split val --write-metrics
    python bench/confidence.py --model OUT --write-meta

which write ``meta.metrics`` and ``meta.confidence`` from this model itself. The folder is replaced
whole: a reader (the bot's hot reload, a running CLI) sees the old model or the new one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from captioner import checkpoint
from captioner.beam import BeamConfig

from .scst import self_critical_fact

# Measured on other weights (or decoding settings): never carried into a shipped model.
MEASURED_KEYS = ("metrics", "confidence")


def shipped_meta(meta: dict[str, Any], version: str, training: str, decoding: BeamConfig,
                 histories: list[str]) -> dict[str, Any]:
    """The checkpoint's own meta (data, parent, epoch) with the shipping facts set and scores dropped."""
    kept = {k: v for k, v in meta.items() if k not in MEASURED_KEYS}
    return {**kept, "version": version, "training": training, "decoding": asdict(decoding),
            "histories": histories, "created": datetime.now(UTC).isoformat(timespec="seconds")}


def ship(model_path: str, out: Path, version: str, training: str, decoding: BeamConfig,
         histories: list[Path], parent: str | None = None, trained_on: str | None = None,
         replay_data: str | None = None) -> Path:
    """Write the float16 model into ``out`` (replaced whole) with its histories; returns ``out``.

    ``trained_on`` replaces the run's own dataset spec (which may name a folder of the machine that
    trained it); ``replay_data`` is the dataset the learning loop replays by default, when it is not
    the one trained on (``train.finetune``)."""
    if out.exists() and not (out / checkpoint.META_FILE).is_file():
        raise SystemExit(f"{out} exists and is not a checkpoint folder: refusing to replace it")
    model = checkpoint.load(model_path, "cpu")
    names = [f"history_{i}.json" if len(histories) > 1 else "history.json" for i in range(len(histories))]
    stages = [json.loads(path.read_text()) for path in histories]  # not JSON: fails here, before the swap
    model.meta = shipped_meta(model.meta, version, training, decoding, names)
    if parent:
        model.meta["parent"] = parent
    if trained_on:
        model.meta["trained_on"] = trained_on
    if replay_data:
        model.meta["replay_data"] = replay_data
    recorded = [fact for stage in stages if (fact := self_critical_fact(stage.get("config", {})))]
    scst = model.meta.get("scst") or (recorded[0] if recorded else None)
    if scst:
        model.meta["scst"] = scst
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    checkpoint.save(model, staging, dtype=torch.float16)
    for source, name in zip(histories, names, strict=True):
        shutil.copyfile(source, staging / name)
    staging.chmod(0o755)
    retired = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(retired, ignore_errors=True)
        out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
    return out


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser("ship", help="write a run's checkpoint as a served model (float16, metadata)",
                            description=__doc__, formatter_class=formatter)
    parser.add_argument("--model", required=True, help="the checkpoint to ship (a run's best/)")
    parser.add_argument("--out", required=True, type=Path, help="the model folder to write (replaced whole)")
    parser.add_argument("--version", required=True, help="the version people and the database see")
    parser.add_argument("--training", required=True, help="the commands that trained it, in order")
    parser.add_argument("--history", action="append", type=Path, default=[],
                        help="a training stage's history.json, copied beside the model (repeat per stage)")
    parser.add_argument("--parent", default=None,
                        help="the version it was trained from, when the run recorded a path (runs before fit "
                             "recorded versions)")
    parser.add_argument("--trained-on", default=None, metavar="FORMAT:PATH",
                        help="the dataset of the last stage as a spec from the repository root (default: the "
                             "run's own, which may be a path of the machine that trained it)")
    parser.add_argument("--replay-data", default=None, metavar="FORMAT:PATH",
                        help="the dataset `train finetune` replays by default, when not the one trained on "
                             "(for example the original photos of a mirrored training set)")
    parser.add_argument("--beam", type=int, required=True, help="shipped beam size")
    parser.add_argument("--max-len", type=int, default=20, help="shipped maximum caption length")
    parser.add_argument("--length-penalty", type=float, required=True, help="shipped length penalty")
    parser.add_argument("--block-ngram", type=int, required=True, help="shipped n-gram blocking (0 = off)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    decoding = BeamConfig(args.beam, args.max_len, args.length_penalty, args.block_ngram)
    out = ship(args.model, args.out, args.version, args.training, decoding, args.history, args.parent,
               args.trained_on, args.replay_data)
    size = (out / checkpoint.WEIGHTS_FILE).stat().st_size / 1e6
    print(f"shipped {args.version} to {out} ({size:.1f} MB, float16); now measure it: "
          f"python -m train evaluate --model {out} --data DATA --split val --write-metrics, then "
          f"python bench/confidence.py --model {out} --write-meta")
    return 0
