"""Proof that the learning loop works on real photos (Flickr8k), end to end.

1. Hold back every training photo whose captions mention bicycles (bike, bicycle, cyclist, ...)
   and train a base model on the rest: its vocabulary has none of those words.
2. Play ~100 people correcting: for held-back photos, store the photo, the base model's caption
   and a correction (one of the photo's human captions) through the storage API, as the bot does.
3. Run the fine-tune (`train.finetune`, the same code as `python -m train finetune`) against that
   database, and measure on the validation photos of the concept: the share of captions using a
   concept word, before and after; and overall validation CIDEr before and after.
4. Show the gate rejecting a bad fine-tune: the same photos "corrected" with random captions.

Run: python bench/learning_loop.py [--base-epochs 3] [--base-scst-epochs 1 | --base-fine-tune-blocks 2]
[--photos 100] [--base-encoder NAME]
(--base-scst-epochs: refine the base with self-critical training first, as v3 was;
--base-fine-tune-blocks: train the base's top encoder blocks with it first, as the shipped model's were.)
Writes bench/results/learning_loop.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, Run, relative, start_run, write_result  # noqa: E402
from captioner import checkpoint  # noqa: E402
from captioner.inference import Captioner, resolve_device  # noqa: E402
from captioner.vocab import tokenize  # noqa: E402
from storage import CorrectionRejected, Storage  # noqa: E402
from train.data import ImageRecord, load_dataset, write_flickr  # noqa: E402
from train.features import FeatureSource, fill_cache, open_cache  # noqa: E402
from train.finetune import FinetuneConfig, finetune  # noqa: E402
from train.fit import TrainConfig, fit  # noqa: E402
from train.scoring import decode_captions  # noqa: E402

FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"
CONCEPT = frozenset({"bike", "bikes", "bicycle", "bicycles", "biker", "bikers", "cyclist", "cyclists",
                     "bicyclist", "bicyclists", "biking", "bicycling", "cycling", "bmx"})
log = logging.getLogger("learning_loop")


def mentions(text: str) -> bool:
    return any(w in CONCEPT for w in tokenize(text))


def write_layout(folder: Path, train: list[ImageRecord], val: list[ImageRecord]) -> str:
    """A Flickr-layout dataset without the concept's training photos (images are symlinks)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    if not images.exists():
        images.symlink_to((FLICKR8K / "images").resolve())
    return write_flickr(folder, {"train": train, "val": val})


async def simulate_corrections(url: str, data_dir: Path, captioner: Captioner, photos: list[ImageRecord],
                               texts: list[str], people: Sequence[int] | None = None) -> Counter[str]:
    """Each photo: a person (``people[n]``, else a new one per photo) sends it, gets the base caption,
    taps ✏️ and types ``text``, under the bot's default entry rules. Counts each correction's status
    (accepted, flagged, held_for_review) or the code that refused it (e.g. daily_limit)."""
    outcomes: Counter[str] = Counter()
    store = await Storage.open(url, data_dir)
    try:
        for n, (record, text) in enumerate(zip(photos, texts, strict=True)):
            person = people[n] if people is not None else 1000 + n
            await store.upsert_person(person, "en")
            data = record.path.read_bytes()
            image_caption = captioner.caption_bytes(data, attention=False)
            width, height = 224, 224
            photo = await store.record_photo(data, width=width, height=height, telegram_file_unique_id=f"f{n}",
                                             sender_telegram_id=person)
            caption = await store.record_caption(photo.id, model_version=captioner.version,
                                                 text=image_caption.text, score=image_caption.score, beam_size=3,
                                                 latency_ms=0.0, requester_telegram_id=person, chat_id=person,
                                                 message_id=n + 1)
            await store.start_correction(person, caption.id, person, n + 10_000)
            try:
                outcomes[(await store.record_correction(caption.id, person, text)).status.value] += 1
            except CorrectionRejected as err:
                outcomes[err.code.value] += 1
        return outcomes
    finally:
        await store.close()


def concept_recall(model_path: str, records: list[ImageRecord], cache_root: Path) -> tuple[float, dict[str, str]]:
    model = checkpoint.load(model_path)
    images = {r.image_id: r.path for r in records}
    cache = open_cache(model, cache_root)
    fill_cache(cache, model, list(images.values()), torch.device("cpu"), progress=False)
    from captioner.inference import default_beam_config

    hyps = decode_captions(model, FeatureSource(model, images, cache, torch.device("cpu")), list(images),
                           default_beam_config(model))
    hits = sum(mentions(text) for text in hyps.values())
    return hits / max(1, len(hyps)), hyps


def refined(spec: str, base_path: str, out: Path, args: argparse.Namespace, **stage: Any) -> str:
    """The base after one more training stage (``stage``: its ``TrainConfig`` fields), validated as the
    shipped model is (beam 5, length penalty 1.0, trigram blocking; 500 photos). Run once: a later run
    of the benchmark finds ``out/best``, an interrupted one resumes."""
    if not (out / "best" / "model.json").exists():
        fit(TrainConfig(data=spec, out=str(out), cache=str(args.cache), init_from=base_path, val_beam=5,
                        val_length_penalty=1.0, val_block_ngram=3, val_limit=500, progress=True,
                        threads=args.threads, checkpoint_minutes=10.0, resume=True, **stage))
    return str(out / "best")


def refine_with_scst(spec: str, base_path: str, out: Path, args: argparse.Namespace) -> str:
    """The base after ``--base-scst-epochs`` of self-critical training, with the shipped model's
    recipe (beam candidates, 50 photos a step, lr 5e-5): fine-tuning must work from such a model."""
    return refined(spec, base_path, out, args, epochs=args.base_scst_epochs, scst=True, scst_sampling="beam",
                   scst_samples=5, batch_size=50, lr=5e-5, warmup_steps=20, patience=args.base_scst_epochs)


def refine_encoder(spec: str, base_path: str, out: Path, args: argparse.Namespace) -> str:
    """The base after one epoch training its encoder's top ``--base-fine-tune-blocks`` blocks with the
    decoder, at the shipped model's learning rates (5e-5 both, 64 photos a step): the fine-tune then
    starts from a checkpoint that stores its own encoder, as it does from the shipped model."""
    return refined(spec, base_path, out, args, epochs=1, model={"fine_tune_blocks": args.base_fine_tune_blocks},
                   batch_size=64, lr=5e-5, encoder_lr=5e-5, patience=1)


def parse_and_start(parser: argparse.ArgumentParser, out: Path) -> tuple[argparse.Namespace, Run]:
    """Add --threads and --out, parse, start the run's report, set up logging and torch threads."""
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=out)
    args = parser.parse_args()
    run = start_run()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "learning_loop")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache" / "features")
    parser.add_argument("--photos", type=int, default=100, help="corrected photos")
    parser.add_argument("--base-epochs", type=int, default=3)
    parser.add_argument("--base-dim", type=int, default=256, help="decoder size of the base model")
    parser.add_argument("--base-encoder", default=None, help="encoder of the base model (default: the bundled model's)")
    parser.add_argument("--base-scst-epochs", type=int, default=0,
                        help="then refine the base with self-critical training on beam candidates, as the "
                             "v3 was, and run the loop from that")
    parser.add_argument("--base-fine-tune-blocks", type=int, default=0,
                        help="then train the base's top N encoder blocks with its decoder for an epoch, as the "
                             "shipped model's were, and run the loop from that")
    parser.add_argument("--ft-epochs", type=int, default=20)
    parser.add_argument("--ft-lr", type=float, default=2e-4)
    parser.add_argument("--replay-ratio", type=float, default=4.0)
    parser.add_argument("--ft-scst-epochs", type=int, default=None,
                        help="self-critical epochs ending each fine-tune (default: the fine-tune's own rule)")
    parser.add_argument("--ft-scst-replay-ratio", type=float, default=None,
                        help="replay photos per corrected photo in those epochs (default: the fine-tune's)")
    args, run = parse_and_start(parser, RESULTS / "learning_loop.json")
    if args.base_scst_epochs and args.base_fine_tune_blocks:
        parser.error("--base-scst-epochs and --base-fine-tune-blocks are two different lineages: choose one")
    if not (FLICKR8K / "captions.txt").is_file():
        sys.exit(f"needs the Flickr8k data at {FLICKR8K}")
    full = load_dataset(f"flickr:{FLICKR8K}", ("train", "val"))
    train, val = full.split("train"), full.split("val")
    concept_train = [r for r in train if any(mentions(c) for c in r.captions)]
    rest_train = [r for r in train if r not in concept_train]
    concept_val = [r for r in val if any(mentions(c) for c in r.captions)]
    log.info("concept photos: %d train (held back), %d val; base trains on %d photos",
             len(concept_train), len(concept_val), len(rest_train))
    spec = write_layout(args.work / "data", rest_train, val)

    base_dir = args.work / "base"
    encoder = args.base_encoder or checkpoint.read_document(None)["config"]["encoder"]
    if (base_dir / "best" / "model.json").exists():
        trained = checkpoint.read_document(base_dir / "best")["config"]["encoder"]
        if trained != encoder:
            sys.exit(f"{base_dir} holds a base on {trained}, not {encoder}: use another --work folder")
    else:
        dims = {"embed_dim": args.base_dim, "attention_dim": args.base_dim, "hidden_dim": args.base_dim,
                "encoder": encoder}
        fit(TrainConfig(data=spec, out=str(base_dir), cache=str(args.cache), epochs=args.base_epochs,
                        model=dims, progress=True, threads=args.threads, patience=args.base_epochs,
                        val_limit=500))
    base_path = str(base_dir / "best")
    if args.base_scst_epochs:
        base_path = refine_with_scst(spec, base_path, args.work / "base-scst", args)
    if args.base_fine_tune_blocks:
        base_path = refine_encoder(spec, base_path, args.work / f"base-ft{args.base_fine_tune_blocks}", args)
    base = checkpoint.load(base_path)
    leaked = sorted(w for w in CONCEPT if w in base.vocab)
    assert not leaked, f"base vocabulary must lack the concept, has {leaked}"

    rng = random.Random(0)
    photos = rng.sample(concept_train, min(args.photos, len(concept_train)))
    good_texts = [next(c for c in r.captions if mentions(c)) for r in photos]
    others = [c for r in rest_train for c in r.captions]
    bad_texts = [rng.choice(others) for _ in photos]

    recall_before, _ = concept_recall(base_path, concept_val, args.cache)
    scst_options = {} if args.ft_scst_replay_ratio is None else {"scst_replay_ratio": args.ft_scst_replay_ratio}
    captioner = Captioner.load(base_path, "cpu")
    results: dict[str, dict[str, object]] = {}
    for label, texts in (("good", good_texts), ("bad", bad_texts)):
        db = args.work / f"{label}.db"
        db.unlink(missing_ok=True)
        url = f"sqlite+aiosqlite:///{db}"
        asyncio.run(simulate_corrections(url, args.work / f"{label}-data", captioner, photos, texts))
        report = finetune(FinetuneConfig(base=base_path, db=url, data_dir=str(args.work / f"{label}-data"),
                                         out=str(args.work / "candidates"), cache=str(args.cache), device="cpu",
                                         epochs=args.ft_epochs, lr=args.ft_lr, replay_ratio=args.replay_ratio,
                                         scst_epochs=args.ft_scst_epochs, **scst_options,
                                         name=f"loop-{label}"))
        recall_after, samples = concept_recall(report["checkpoint"], concept_val, args.cache)
        results[label] = {
            "passed_gate": report["passed_gate"], "status": report["status"], "reason": report["reason"],
            "heldout_gain_lower_bound": report["heldout_gain_lower_bound"],
            "heldout_photos": report["corrections_heldout_photos"],
            "train_photos": report["corrections_train_photos"],
            "new_words": report["new_words"],
            "concept_recall_before": round(recall_before, 3), "concept_recall_after": round(recall_after, 3),
            "val_cider_before": round(report["base"]["validation"]["CIDEr"], 4),
            "val_cider_after": round(report["candidate"]["validation"]["CIDEr"], 4),
            "heldout_corrections_before": report["base"]["corrections"],
            "heldout_corrections_after": report["candidate"]["corrections"],
            "scst_rewards": report["scst_rewards"],
            "examples": dict(list(samples.items())[:5]), "seconds": report["seconds"],
        }
        vb, va = report["base"]["validation"]["CIDEr"], report["candidate"]["validation"]["CIDEr"]
        print(f"[{label}] {report['status'].upper()}: {report['reason']}")
        print(f"[{label}] concept recall on {len(concept_val)} val photos: {recall_before:.0%} -> {recall_after:.0%};"
              f" val CIDEr {vb:.4f} -> {va:.4f} ({100 * (va / vb - 1):+.1f}%)")

    document = {
        "context": run.context(str(resolve_device("auto"))),
        "concept_words": sorted(CONCEPT), "held_back_train_photos": len(concept_train),
        "concept_val_photos": len(concept_val), "corrected_photos": len(photos),
        "base": {"checkpoint": relative(base_path), "encoder": base.config.encoder, "epochs": args.base_epochs,
                 "dim": args.base_dim,
                 "scst_epochs": args.base_scst_epochs, "fine_tune_blocks": base.config.fine_tune_blocks,
                 "vocabulary": len(base.vocab)},
        "results": results,
    }
    write_result(args.out, document)


if __name__ == "__main__":
    main()
