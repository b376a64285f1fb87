"""Does 16-bit autocast change the captions? float32 against bfloat16 or float16, one split.

    python bench/precision.py --device cuda [--precision bfloat16] [--model CHECKPOINT]
                              [--data flickr:../shared/data/flickr8k] [--split val] [--limit N]
                              [--beam K] [--batch-size 128] [--out bench/results/precision.json]

Every photo of the split is prepared once (the worker's decoding: ``Captioner.prepare``), then
captioned in batches by the same model at float32 (the baseline, measured in the same run) and at
``--precision`` (``Captioner(precision=...)``, the worker's ``CAPTIONBOT_PRECISION``): the share
of identical captions, each side's corpus CIDEr-D (``train/cider.py``, equal to pycocoevalcap's
CIDEr-D on the same tokens, and needing no Java or pycocoevalcap on a GPU machine), the
difference, and images/s of each side (model time only, photos already prepared), with examples
of captions that changed. This is the figure that decides whether a 16-bit precision may
be switched on by default (``captioner/serving/config.py``).

16-bit autocast is a CUDA feature: on CPU the script refuses it (as the worker does), and
``--precision float32`` compares float32 with itself, a smoke test of the script (all identical).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dataclasses import asdict, replace  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.report import RESULTS, relative, relative_spec, start_run, write_result  # noqa: E402
from captioner.beam import BeamConfig  # noqa: E402
from captioner.inference import AUTOCAST_DTYPES, Captioner, resolve_device  # noqa: E402
from captioner.vocab import tokenize  # noqa: E402
from train.data import ImageRecord, load_dataset  # noqa: E402
from train.scst import reference_cider  # noqa: E402

SCORED = ("CIDEr",)
EXAMPLES = 8


def caption_all(captioner: Captioner, inputs: list[Tensor], beam: BeamConfig,
                batch_size: int) -> tuple[list[str], float]:
    """Each photo's caption, and the images/s of the model on them (after a warm-up batch)."""
    captioner.caption_tensors(torch.stack(inputs[:batch_size]), beam, attention=False)
    texts: list[str] = []
    started = time.perf_counter()
    for start in range(0, len(inputs), batch_size):
        batch = torch.stack(inputs[start:start + batch_size])
        texts.extend(r.text for r in captioner.caption_tensors(batch, beam, attention=False))
    return texts, len(inputs) / (time.perf_counter() - started)


def scores(records: list[ImageRecord], texts: list[str]) -> dict[str, float]:
    """Corpus CIDEr-D, document frequencies from the split's own references (as pycocoevalcap)."""
    cider = reference_cider(records)
    per_photo = cider.score([r.image_id for r in records], [tokenize(text) for text in texts])
    return {"CIDEr": float(per_photo.mean())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    parser.add_argument("--data", default="flickr:../shared/data/flickr8k")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=0, help="only the first N photos (0 = all)")
    parser.add_argument("--precision", default="bfloat16", choices=tuple(AUTOCAST_DTYPES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the model's own setting)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "precision.json")
    args = parser.parse_args(argv)
    run = start_run(None if argv is None else ["bench/precision.py", *argv])
    device = resolve_device(args.device)

    baseline = Captioner.load(args.model, device)
    low = Captioner.load(args.model, device, precision=args.precision)  # refuses 16 bits off CUDA
    beam = baseline.beam if args.beam is None else replace(baseline.beam, beam_size=args.beam)
    records = load_dataset(args.data, (args.split,)).split(args.split)
    records = records[: args.limit] if args.limit else records
    inputs = [baseline.prepare(record.path.read_bytes()) for record in records]
    print(f"{len(records)} photos of {args.split}, beam {beam.beam_size}, {device}; float32 vs {args.precision}",
          flush=True)

    reference, reference_rate = caption_all(baseline, inputs, beam, args.batch_size)
    texts, rate = caption_all(low, inputs, beam, args.batch_size)
    identical = sum(a == b for a, b in zip(reference, texts, strict=True))
    reference_scores, low_scores = scores(records, reference), scores(records, texts)
    changed = [{"image": r.image_id, "float32": a, args.precision: b}
               for r, a, b in zip(records, reference, texts, strict=True) if a != b]
    print(f"identical captions: {identical}/{len(records)} ({identical / len(records):.1%})")
    for key in SCORED:
        print(f"{key}: float32 {reference_scores[key]:.4f}, {args.precision} {low_scores[key]:.4f} "
              f"({low_scores[key] - reference_scores[key]:+.4f})")
    print(f"images/s: float32 {reference_rate:.1f}, {args.precision} {rate:.1f} ({rate / reference_rate:.2f}x)")
    write_result(args.out, {
        "context": run.context(str(device)),
        "model": relative(args.model) if args.model else "the bundled default model (captioner/default_model)",
        "data": relative_spec(args.data),
        "split": args.split, "photos": len(records), "beam": asdict(beam), "batch_size": args.batch_size,
        "precision": args.precision,
        "identical_captions": identical, "identical_share": round(identical / len(records), 4),
        "float32": {"images_per_second": round(reference_rate, 2), **reference_scores},
        args.precision if args.precision != "float32" else "compared": {
            "images_per_second": round(rate, 2), **low_scores},
        "difference": {key: low_scores[key] - reference_scores[key] for key in SCORED},
        "speed_ratio": round(rate / reference_rate, 3),
        "changed_examples": changed[:EXAMPLES],
    })


if __name__ == "__main__":
    main()
