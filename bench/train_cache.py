"""Training epoch time from the feature cache vs from raw images (the reason the cache exists).

Both runs go through ``train.fit.fit`` with the same decoder (the default 512-d Show-Attend-Tell
decoder, EfficientNet-Lite0 encoder, batch 64) on the same captions: a subset of the Flickr8k
training split (default 200 images x 5 captions) or, without the shared data, generated photos.

- cache: features are computed once into a float16 memory-mapped cache (timed separately: a
  one-off cost shared by every later epoch and run), then an epoch reads them from RAM;
- raw:   ``--raw-images``: every batch decodes its JPEGs and runs the encoder again.

Then the same pair for the second stage, fine-tuning the encoder's top blocks (``--fine-tune-blocks
N``, from the cached run's model): from the cache, which then holds the maps of the encoder's frozen
part (filled once, timed separately) and runs the top N blocks at each step, against raw images.

Reported: seconds per epoch of each (``train_seconds`` from fit's history, validation excluded),
their ratio, and the part of each epoch spent getting features (the decoder's share is the same).

Run: python bench/train_cache.py [--images 200] [--threads 2] [--json bench/results/train_cache.json]
Smoke: python bench/train_cache.py --tiny --images 4 --cached-epochs 1 --json <a scratch file>
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.checkpoint import CaptionModel  # noqa: E402
from captioner.vocab import Vocabulary  # noqa: E402
from train import fit as fit_module  # noqa: E402
from train import metrics  # noqa: E402
from train.data import load_dataset  # noqa: E402
from train.features import fill_cache, open_cache  # noqa: E402
from train.fit import TrainConfig  # noqa: E402

SHARED_FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def make_subset(folder: Path, n_images: int, n_val: int) -> tuple[str, str]:
    """A Flickr-layout folder with the first N training images (shared data) or generated ones."""
    folder.mkdir(parents=True, exist_ok=True)
    if (SHARED_FLICKR8K / "captions.txt").is_file():
        dataset = load_dataset(f"flickr:{SHARED_FLICKR8K}", ("train",))
        records = [(r.image_id, r.captions) for r in dataset.split("train")[: n_images + n_val]]
        images, source = SHARED_FLICKR8K / "images", f"Flickr8k train split, first {n_images} images"
    else:
        from tests.helpers import photo_bytes
        from tests.test_train_support import CAPTIONS, variants

        images, source = folder / "images", f"{n_images} generated 224x224 photos (no shared Flickr8k)"
        images.mkdir(exist_ok=True)
        records = []
        for i in range(n_images + n_val):
            (images / f"{i}.jpg").write_bytes(photo_bytes(i, size=(224, 224)))
            records.append((f"{i}.jpg", tuple(variants(CAPTIONS[i % len(CAPTIONS)]))))
    with (folder / "captions.txt").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for image_id, captions in records:
            writer.writerows([image_id, caption] for caption in captions)
    (folder / "train.txt").write_text("\n".join(image_id for image_id, _ in records[:n_images]) + "\n")
    (folder / "val.txt").write_text("\n".join(image_id for image_id, _ in records[n_images:]) + "\n")
    return f"flickr:{folder}@{images}", source


class FeatureTimer:
    """Accumulates the time FeatureSource spends handing features to the training loop."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.original = fit_module.FeatureSource.__call__

    def __enter__(self) -> FeatureTimer:
        timer = self

        def timed(source: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            try:
                return timer.original(source, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start

        fit_module.FeatureSource.__call__ = timed  # type: ignore[method-assign,assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        fit_module.FeatureSource.__call__ = self.original  # type: ignore[method-assign]


def train_epochs(cfg: TrainConfig) -> tuple[list[float], float]:
    with FeatureTimer() as timer:
        history = fit_module.fit(cfg)
    return [e["train_seconds"] for e in history["epochs"]], timer.seconds


def model_overrides(tiny: bool) -> tuple[dict[str, Any], str]:
    """TrainConfig.model overrides and a description: the default model, or the tests' tiny one."""
    if not tiny:
        return {}, "default ModelConfig: EfficientNet-Lite0 (frozen, 224 px, 7x7x1280) + 512-d attention LSTM decoder"
    from tests.helpers import tiny_config

    return tiny_config().to_json(), "the tests' tiny model (tests/helpers.tiny_config: tiny encoder, 64 px)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="training images (5 captions each)")
    parser.add_argument("--cached-epochs", type=int, default=2, help="epochs from the cache (the fastest counts)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--fine-tune-blocks", type=int, default=2, help="encoder blocks unfrozen in the second stage")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model (a smoke test of the script)")
    parser.add_argument("--json", type=Path, default=RESULTS / "train_cache.json")
    args = parser.parse_args(argv)
    run = start_run(None if argv is None else ["bench/train_cache.py", *argv])
    torch.set_num_threads(args.threads)
    metrics.java_available = lambda: False  # validation (not timed) without a JVM start

    with tempfile.TemporaryDirectory(prefix="train-cache-bench-") as tmp:
        work = Path(tmp)
        data, source = make_subset(work / "data", args.images, n_val=4)
        overrides, model_note = model_overrides(args.tiny)
        common: dict[str, Any] = dict(data=data, cache=str(work / "cache"), batch_size=64, min_freq=1, val_beam=1,
                                      val_max_len=12, threads=args.threads, device="cpu", progress=False,
                                      patience=100, model=overrides)

        # The one-off cost: features of every image, once, into the cache.
        dataset = load_dataset(data)
        records = [*dataset.split("train"), *dataset.split("val")]
        model = CaptionModel.create(TrainConfig(**common).model_config(), Vocabulary())
        cache = open_cache(model, work / "cache")
        start = time.perf_counter()
        fill_cache(cache, model, [r.path for r in records], torch.device("cpu"), progress=False)
        fill_seconds = time.perf_counter() - start

        cached_epochs, cached_feature_s = train_epochs(
            TrainConfig(out=str(work / "cached"), epochs=args.cached_epochs, **common))
        raw_epochs, raw_feature_s = train_epochs(
            TrainConfig(out=str(work / "raw"), epochs=1, raw_images=True, **common))
        tuned = fine_tuning_epochs(work, common, args.fine_tune_blocks, args.cached_epochs,
                                   [r.path for r in records])
        n_captions = sum(len(r.captions) for r in dataset.split("train"))
        vocab_size = len(Vocabulary.build((c for r in dataset.split("train") for c in r.captions), min_freq=1))

    cached, raw = min(cached_epochs), raw_epochs[0]
    cached_feature_s /= args.cached_epochs
    result = {
        "context": run.context("cpu"),
        "data": source,
        "train": {"images": args.images, "captions": n_captions, "batch_size": 64, "vocabulary": vocab_size},
        "model": model_note,
        "cache_fill_seconds": round(fill_seconds, 2),
        "epoch_seconds": {"cache": round(cached, 2), "raw": round(raw, 2), "cache_all_epochs": cached_epochs},
        "feature_seconds_per_epoch": {"cache": round(cached_feature_s, 3), "raw": round(raw_feature_s, 2)},
        "ratio_raw_over_cache": round(raw / cached, 2),
        "feature_ratio_raw_over_cache": round(raw_feature_s / max(cached_feature_s, 1e-9), 1),
        "target_ratio": 10.0,
        # Epochs after which filling the cache has paid for itself (None: the cache was not faster).
        "break_even_epochs": round(fill_seconds / (raw - cached), 2) if raw > cached else None,
        "fine_tuning": tuned,
    }
    print(f"{n_captions} captions of {args.images} images, batch 64, {args.threads} threads ({source})")
    print(f"cache fill (once): {fill_seconds:.1f} s")
    print(f"epoch from the cache: {cached:.1f} s (features {cached_feature_s:.2f} s of it)")
    print(f"epoch from raw images: {raw:.1f} s (features {raw_feature_s:.1f} s of it)")
    print(f"ratio raw/cache: {raw / cached:.1f}x per epoch (target >= 10x); "
          f"feature access alone: {result['feature_ratio_raw_over_cache']}x")
    print(f"fine-tuning the top {args.fine_tune_blocks} blocks: maps of the frozen part filled once in "
          f"{tuned['cache_fill_seconds']:.1f} s; epoch from the cached maps {tuned['epoch_seconds']['cache']:.1f} s, "
          f"from raw images {tuned['epoch_seconds']['raw']:.1f} s: {tuned['ratio_raw_over_cache']:.1f}x")
    write_result(args.json, result)
    return 0


def fine_tuning_epochs(work: Path, common: dict[str, Any], blocks: int, cached_epochs: int,
                       paths: list[Path]) -> dict[str, Any]:
    """The second stage from the cached run's model: top ``blocks`` encoder blocks unfrozen, one run
    from the cache (the frozen part's maps, filled first and timed) and one from raw images."""
    start_from = work / "cached" / "best"
    model = checkpoint.load(start_from)
    model.encoder.set_trainable_blocks(blocks)
    cache = open_cache(model, work / "cache")
    start = time.perf_counter()
    fill_cache(cache, model, paths, torch.device("cpu"), progress=False)
    fill_seconds = time.perf_counter() - start
    tuned = dict(common, init_from=str(start_from), model={**common["model"], "fine_tune_blocks": blocks})
    cached, _ = train_epochs(TrainConfig(out=str(work / "tuned-cached"), epochs=cached_epochs, **tuned))
    raw, _ = train_epochs(TrainConfig(out=str(work / "tuned-raw"), epochs=1, raw_images=True, **tuned))
    return {"blocks": blocks, "cache_fill_seconds": round(fill_seconds, 2),
            "epoch_seconds": {"cache": round(min(cached), 2), "raw": round(raw[0], 2), "cache_all_epochs": cached},
            "ratio_raw_over_cache": round(raw[0] / min(cached), 2)}


if __name__ == "__main__":
    sys.exit(main())
