"""``python -m train finetune``: learn from people's corrections, promote only what is better.

1. Take the corrections (optionally up-voted captions) no model has trained on yet, from the
   database or from a folder written by ``python -m storage export``; hold out a part of them
   (by photo, deterministically) to judge the result.
2. Add the words the corrections use that the vocabulary lacks (new rows only: old words'
   predictions are unchanged until training moves them).
3. Fine-tune on the corrections mixed with a replay sample of the base model's own training
   data, so the model learns the new things without forgetting the old ones.
4. Score base and candidate on the held-out corrections and on the base's validation split.
   The candidate is promoted only if it is better on the corrections and its validation CIDEr
   drops by at most ``--margin`` (relative); otherwise it is registered as rejected, with why.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.checkpoint import CaptionModel
from captioner.inference import default_beam_config, resolve_device
from captioner.vocab import Vocabulary, tokenize
from common.atomic import atomic_write_text
from common.settings import ConfigError, Settings, load_settings
from storage.holdout import HOLDOUT_FRACTION, is_held_out

from .cli import DEVICE_HELP, VAL_LIMIT_HELP, add_dataclass_options, config_from_args
from .data import ImageRecord, load_dataset
from .features import FeatureSource, feature_source
from .gate import gate, paired_bootstrap_lower_bound
from .loop import Example, LoopConfig, bucketed_batches, build_examples, train_epoch
from .scoring import score_records

log = logging.getLogger(__name__)

EXIT_PROMOTED, EXIT_ERROR, EXIT_REJECTED = 0, 1, 3
# What the gate looks at (METEOR would start a Java process for a handful of photos).
GATE_METRICS = ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr")


class FinetuneError(RuntimeError):
    pass


@dataclass
class FinetuneConfig(LoopConfig):
    # Fields shared with `fit` come from LoopConfig; these defaults differ from fit's. A constant
    # learning rate (no warm-up, no decay): a fine-tune is short and starts from a trained model.
    out: str = "runs/finetune"
    batch_size: int = 32
    lr: float = 2e-4
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    progress: bool = False
    base: str | None = None
    db: str | None = None
    data_dir: str | None = None
    from_export: str | None = None
    include_upvoted: bool = False
    all_corrections: bool = False
    since: str | None = None
    replay_data: str | None = None
    replay_split: str = "train"
    val_data: str | None = None
    replay_ratio: float = 4.0
    holdout: float = HOLDOUT_FRACTION
    min_word_count: int = 1
    new_word_epochs: int = 10
    new_word_lr: float = 1e-2
    margin: float = 0.03
    # With fewer held-out photos than this, the significance test is skipped (too few to resample).
    min_photos_for_test: int = 5
    name: str | None = None
    register: bool = True
    save_dtype: str = "float16"


@dataclass
class CorrectionSet:
    train: list[ImageRecord]
    heldout: list[ImageRecord]
    correction_ids: list[int] = field(default_factory=list)  # those in ``train``, to mark as used


# ----------------------------------------------------------------------------- corrections


def database_url(cfg: FinetuneConfig) -> str:
    """The bot's database: --db (or $DATABASE_URL, see ``with_bot_storage``), else the SQLite file in
    the bot's data folder."""
    from storage.config import database_url as resolve_url

    return resolve_url(cfg.db, cfg.data_dir)


async def _open_store(cfg: FinetuneConfig) -> Any:
    from storage import Storage

    return await Storage.open(database_url(cfg), Path(cfg.data_dir) if cfg.data_dir else None)


async def _corrections_from_db(cfg: FinetuneConfig) -> list[tuple[str, Path, str, int | None]]:
    store = await _open_store(cfg)
    try:
        since = datetime.fromisoformat(cfg.since).replace(tzinfo=UTC) if cfg.since else None
        examples = await store.corrections_for_training(since=since, include_upvoted=cfg.include_upvoted,
                                                        untrained_only=not cfg.all_corrections)
    finally:
        await store.close()
    return [(e.sha256, e.path, e.text, e.source_id if e.kind == "correction" else None) for e in examples]


def split_corrections(rows: Sequence[tuple[str, Path, str, int | None]], holdout: float) -> CorrectionSet:
    """Group by photo; storage.holdout's rule (the one `storage export` uses) picks the held-out photos."""
    by_photo: dict[str, tuple[Path, list[str], list[int]]] = {}
    for sha, path, text, correction_id in rows:
        entry = by_photo.setdefault(sha, (path, [], []))
        entry[1].append(text)
        if correction_id is not None:
            entry[2].append(correction_id)
    train, heldout, ids = [], [], []
    for sha, (path, texts, correction_ids) in sorted(by_photo.items()):
        record = ImageRecord(f"photo:{sha}", path, tuple(texts))
        if is_held_out(sha, holdout):
            heldout.append(record)
        else:
            train.append(record)
            ids.extend(correction_ids)
    return CorrectionSet(train, heldout, ids)


def corrections_from_export(folder: str) -> CorrectionSet:
    dataset = load_dataset(f"flickr:{folder}", ("train", "val"))
    return CorrectionSet(dataset.split("train"), dataset.split("val"))


# ----------------------------------------------------------------------------- vocabulary growth


def grow_vocabulary(model: CaptionModel, texts: Sequence[str], min_count: int) -> list[str]:
    """Add the words ``texts`` use that the vocabulary lacks; new rows start from their context."""
    counts = Counter(w for t in texts for w in tokenize(t) if w not in model.vocab)
    new_words = [w for w, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= min_count]
    if not new_words:
        return []
    context = [_context_ids(model.vocab, texts, w) for w in new_words]
    model.vocab.extend(new_words)
    model.decoder.grow_vocabulary(len(model.vocab), init_from=context)
    return new_words


def _context_ids(vocab: Vocabulary, texts: Sequence[str], word: str) -> list[int]:
    """Known words next to ``word`` in the corrections: a better start than the average word."""
    ids: list[int] = []
    for text in texts:
        tokens = tokenize(text)
        for i, token in enumerate(tokens):
            if token == word:
                ids.extend(vocab.id_of(t) for t in tokens[max(0, i - 2):i + 3] if t in vocab)
    return ids


# ----------------------------------------------------------------------------- training


def train_candidate(cfg: FinetuneConfig, model: CaptionModel, source: FeatureSource,
                    corrections: list[Example], replay: list[Example], old_vocab_size: int | None = None,
                    ) -> list[float]:
    """Fine-tune the decoder in two phases; each epoch mixes all corrections with a fresh replay sample.

    Phase 1 trains only the new words' embedding and output rows (old words' logits cannot move),
    at a high learning rate: the decoder already sees the new thing, it lacks the word for it.
    Phase 2 fine-tunes the whole decoder gently.
    """
    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    decoder = model.decoder
    if old_vocab_size is not None and old_vocab_size < len(model.vocab) and cfg.new_word_epochs:
        rows = [decoder.embedding.weight, decoder.classifier.weight, decoder.classifier.bias]
        keep_old = torch.ones(len(model.vocab), device=source.device)
        keep_old[:old_vocab_size] = 0.0
        hooks = [p.register_hook(lambda g: g * keep_old.view(-1, *([1] * (g.dim() - 1)))) for p in rows]
        try:
            optimizer = torch.optim.Adam(rows, lr=cfg.new_word_lr)
            losses += _epochs(cfg, model, source, corrections, replay, optimizer, rng, cfg.new_word_epochs, "new words")
        finally:
            for hook in hooks:
                hook.remove()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr)
    losses += _epochs(cfg, model, source, corrections, replay, optimizer, rng, cfg.epochs, "decoder")
    decoder.eval()
    return losses


def _epochs(cfg: FinetuneConfig, model: CaptionModel, source: FeatureSource, corrections: list[Example],
            replay: list[Example], optimizer: torch.optim.Optimizer, rng: np.random.Generator, epochs: int,
            phase: str) -> list[float]:
    n_replay = min(len(replay), round(cfg.replay_ratio * len(corrections)))
    losses = []
    for epoch in range(epochs):
        picked = [replay[i] for i in rng.choice(len(replay), n_replay, replace=False)] if n_replay else []
        examples = corrections + picked
        batches = bucketed_batches(examples, cfg.batch_size, rng)
        loss, _ = train_epoch(cfg, model, optimizer, source, examples, batches, step=0, total_steps=0)
        losses.append(loss)
        log.info("fine-tune (%s) epoch %d: %d corrections + %d replay captions, loss %.4f", phase, epoch,
                 len(corrections), len(picked), loss)
    return losses


def _judge(model: CaptionModel, source: FeatureSource, heldout: list[ImageRecord], val_records: list[ImageRecord],
           beam: BeamConfig) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Scores on the held-out corrections and on validation data, and each held-out photo's CIDEr."""
    held = score_records(model, source, heldout, beam, GATE_METRICS).scores
    validation = score_records(model, source, val_records, beam, GATE_METRICS).scores.values if val_records else {}
    return {"corrections": held.values, "validation": validation}, held.per_image_cider


# ----------------------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    base = checkpoint.load(cfg.base, device)
    candidate = checkpoint.load(cfg.base, device)
    if cfg.from_export:
        corrections = corrections_from_export(cfg.from_export)
    else:
        corrections = split_corrections(asyncio.run(_corrections_from_db(cfg)), cfg.holdout)
    report = _run(cfg, device, base, candidate, corrections)
    if not cfg.from_export and cfg.register:
        asyncio.run(_register(cfg, base, report, corrections.correction_ids))
    return report


def _reference_data(cfg: FinetuneConfig, base: CaptionModel) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(replay records, validation records): by default the base model's own training data."""
    replay_spec = cfg.replay_data or base.meta.get("trained_on")
    val_spec = cfg.val_data or replay_spec
    replay_records = load_dataset(replay_spec, (cfg.replay_split,)).split(cfg.replay_split) if replay_spec else []
    val_records = load_dataset(val_spec, (cfg.val_split,)).split(cfg.val_split) if val_spec else []
    if cfg.val_limit:
        val_records = val_records[: cfg.val_limit]
    if not val_records:
        log.warning("no validation data: the gate checks the held-out corrections only")
    return replay_records, val_records


def _run(cfg: FinetuneConfig, device: torch.device, base: CaptionModel, candidate: CaptionModel,
         corrections: CorrectionSet) -> dict[str, Any]:
    if not corrections.train:
        raise FinetuneError("no new corrections to learn from")
    if not corrections.heldout:
        raise FinetuneError("all corrections fell in the training part; need more corrections (or --holdout)")
    started = time.time()
    new_words = grow_vocabulary(candidate, [c for r in corrections.train for c in r.captions], cfg.min_word_count)
    log.info("corrections: %d photos to train on, %d held out; new words: %s", len(corrections.train),
             len(corrections.heldout), ", ".join(new_words) or "none")
    replay_records, val_records = _reference_data(cfg, base)
    all_records = [*corrections.train, *corrections.heldout, *replay_records, *val_records]
    source = feature_source(candidate, {r.image_id: r.path for r in all_records}, device, cfg.cache)

    beam = default_beam_config(base)
    before, base_photos = _judge(base, source, corrections.heldout, val_records, beam)
    correction_examples = build_examples(corrections.train, candidate.vocab, cfg.max_caption_len)
    replay_examples = build_examples(replay_records, candidate.vocab, cfg.max_caption_len)
    losses = train_candidate(cfg, candidate, source, correction_examples, replay_examples, len(base.vocab))
    after, candidate_photos = _judge(candidate, source, corrections.heldout, val_records, beam)
    lower_bound = paired_bootstrap_lower_bound(base_photos, candidate_photos)
    testable = len(base_photos) >= cfg.min_photos_for_test
    decision = gate(before, after, cfg.margin, lower_bound if testable else None)

    name = cfg.name or f"{base.version.split('+')[0]}+ft{datetime.now(UTC):%Y%m%d%H%M%S}"
    out = Path(cfg.out) / name
    candidate.meta.update({
        "version": name, "parent": base.version, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "finetuned_on": {"corrections": sum(len(r.captions) for r in corrections.train),
                         "photos": len(corrections.train), "new_words": new_words},
    })
    checkpoint.save(candidate, out, dtype=getattr(torch, cfg.save_dtype))
    report = {
        "name": name, "parent": base.version, "checkpoint": str(out.resolve()), "promoted": decision.promote,
        "reason": decision.reason, "base": before, "candidate": after, "new_words": new_words,
        "heldout_gain_lower_bound": lower_bound, "train_losses": losses,
        "corrections_train_photos": len(corrections.train),
        "corrections_heldout_photos": len(corrections.heldout), "replay_ratio": cfg.replay_ratio,
        "seconds": round(time.time() - started, 1), "config": asdict(cfg),
    }
    atomic_write_text(out / "finetune_report.json", json.dumps(report, indent=1, default=str) + "\n")
    return report


async def _register(cfg: FinetuneConfig, base: CaptionModel, report: dict[str, Any],
                    correction_ids: list[int]) -> None:
    """Record the candidate (promoted or rejected, with why) and, if promoted, what it learned from."""
    store = await _open_store(cfg)
    try:
        if await store.get_model_version(base.version) is None:
            # Lineage: the base is what serves when nothing is registered yet.
            status = "active" if await store.active_model_version() is None else "candidate"
            await store.register_model_version(base.version, str(checkpoint.resolve(cfg.base).resolve()),
                                               base.meta.get("parent"), base.meta.get("metrics", {}), status=status)
        metrics_doc = {"base": report["base"], "candidate": report["candidate"], "new_words": report["new_words"]}
        await store.register_model_version(report["name"], report["checkpoint"], report["parent"], metrics_doc)
        if report["promoted"]:
            await store.promote_model_version(report["name"])
            await store.mark_corrections_trained(correction_ids, report["name"])
        else:
            await store.reject_model_version(report["name"], report["reason"])
    finally:
        await store.close()


# ----------------------------------------------------------------------------- command line

# The options in the order --help lists them; LoopConfig fields not here are not options of finetune.
FINETUNE_HELP = {
    "db": "DATABASE_URL of the bot's database (default: $DATABASE_URL)",
    "data_dir": "the bot's data folder (photos; default $CAPTIONBOT_DATA_DIR)",
    "from_export": "a folder written by `python -m storage export` instead",
    "base": "checkpoint to start from (default: the bundled model)",
    "out": "candidates are written to OUT/NAME/",
    "name": "version name of the candidate (default: BASE+ftTIMESTAMP)",
    "include_upvoted": "also learn from captions people voted up",
    "all_corrections": "use every correction, not only those no model has trained on yet",
    "since": "only corrections made on or after this date (YYYY-MM-DD)",
    "replay_data": "FORMAT:PATH of the replay data (default: the base model's training data)",
    "replay_split": "split of the replay data",
    "replay_ratio": "replay captions per correction caption in each epoch",
    "val_data": "FORMAT:PATH for the validation check (default: replay data)",
    "val_split": "validation split",
    "val_limit": VAL_LIMIT_HELP,
    "holdout": "share of corrected photos held out to judge the candidate",
    "min_word_count": "a new word joins the vocabulary when the corrections use it this often",
    "epochs": "fine-tuning epochs",
    "new_word_epochs": "first phase: epochs that train only the new words' rows (0 = skip)",
    "new_word_lr": "learning rate of that phase",
    "batch_size": "captions per batch",
    "lr": "learning rate (AdamW)",
    "margin": "largest relative drop of validation CIDEr that still allows promotion",
    "seed": "random seed",
    "device": DEVICE_HELP,
    "cache": "encoder feature cache folder",
    "register": "register the candidate in the database (--no-register: do not)",
}
NOT_OPTIONS = {"min_lr_ratio", "warmup_steps", "grad_clip", "alpha_c", "label_smoothing", "max_caption_len",
               "max_steps", "progress", "min_photos_for_test", "save_dtype"}


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser("finetune", help="fine-tune on people's corrections; promote only if better",
                            description=__doc__, formatter_class=formatter)
    add_dataclass_options(parser, FinetuneConfig, FINETUNE_HELP, NOT_OPTIONS)
    parser.set_defaults(func=run)


def with_bot_storage(cfg: FinetuneConfig, settings: Settings) -> FinetuneConfig:
    """--db and --data-dir, else the bot's own DATABASE_URL and CAPTIONBOT_DATA_DIR settings."""
    data_dir = cfg.data_dir or (str(settings.data_dir) if settings.data_dir is not None else None)
    return replace(cfg, db=cfg.db or settings.database_url, data_dir=data_dir)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = with_bot_storage(config_from_args(FinetuneConfig, vars(args)), load_settings())
        report = finetune(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except (FinetuneError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    verdict = "PROMOTED" if report["promoted"] else "REJECTED"
    print(f"{verdict} {report['name']}: {report['reason']}")
    print(f"  new words: {', '.join(report['new_words']) or 'none'}")
    for part in ("corrections", "validation"):
        b, c = report["base"][part], report["candidate"][part]
        if b:
            print(f"  {part:12s} CIDEr {b['CIDEr']:.3f} -> {c['CIDEr']:.3f}   BLEU-1 {b['Bleu_1']:.3f} -> "
                  f"{c['Bleu_1']:.3f}   BLEU-4 {b['Bleu_4']:.3f} -> {c['Bleu_4']:.3f}")
    print(f"  checkpoint: {report['checkpoint']}")
    return EXIT_PROMOTED if report["promoted"] else EXIT_REJECTED
