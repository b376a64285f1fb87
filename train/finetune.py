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
import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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

from . import metrics
from .data import ImageRecord, load_dataset
from .features import fill_cache, open_cache
from .fit import Example, FeatureSource, TrainConfig, bucketed_batches, build_examples, caption_loss, generate, pad

log = logging.getLogger(__name__)

# Training captions are cut to this many words, as in `python -m train fit`.
MAX_CAPTION_WORDS = TrainConfig().max_caption_len

EXIT_PROMOTED, EXIT_ERROR, EXIT_REJECTED = 0, 1, 3


class FinetuneError(RuntimeError):
    pass


@dataclass
class FinetuneConfig:
    base: str | None = None
    out: str = "runs/finetune"
    db: str | None = None
    data_dir: str | None = None
    from_export: str | None = None
    include_upvoted: bool = False
    all_corrections: bool = False
    since: str | None = None
    replay_data: str | None = None
    replay_split: str = "train"
    val_data: str | None = None
    val_split: str = "val"
    val_limit: int = 0
    replay_ratio: float = 4.0
    holdout: float = 0.2
    min_word_count: int = 1
    epochs: int = 20
    new_word_epochs: int = 10
    new_word_lr: float = 1e-2
    batch_size: int = 32
    lr: float = 2e-4
    alpha_c: float = 1.0
    grad_clip: float = 5.0
    margin: float = 0.03
    # With fewer held-out photos than this, the significance test is skipped (too few to resample).
    min_photos_for_test: int = 5
    seed: int = 1234
    device: str = "auto"
    cache: str = "cache/features"
    name: str | None = None
    register: bool = True
    save_dtype: str = "float16"


@dataclass
class CorrectionSet:
    train: list[ImageRecord]
    heldout: list[ImageRecord]
    correction_ids: list[int] = field(default_factory=list)  # those in ``train``, to mark as used


# ----------------------------------------------------------------------------- corrections


def holdout_bucket(sha_or_name: str) -> float:
    """A photo's fixed place in [0, 1): the held-out part never changes between runs."""
    return int(hashlib.sha256(sha_or_name.encode()).hexdigest()[:8], 16) / 2**32


async def _open_store(cfg: FinetuneConfig) -> Any:
    from storage import Storage

    return await Storage.open(cfg.db, Path(cfg.data_dir) if cfg.data_dir else None)


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
    by_photo: dict[str, tuple[Path, list[str], list[int]]] = {}
    for sha, path, text, correction_id in rows:
        entry = by_photo.setdefault(sha, (path, [], []))
        entry[1].append(text)
        if correction_id is not None:
            entry[2].append(correction_id)
    train, heldout, ids = [], [], []
    for sha, (path, texts, correction_ids) in sorted(by_photo.items()):
        record = ImageRecord(f"photo:{sha}", path, tuple(texts))
        if holdout_bucket(sha) < holdout:
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
    params = [p for g in optimizer.param_groups for p in g["params"]]
    losses = []
    for epoch in range(epochs):
        model.decoder.train()
        picked = [replay[i] for i in rng.choice(len(replay), n_replay, replace=False)] if n_replay else []
        examples = corrections + picked
        epoch_losses = []
        for batch in bucketed_batches(examples, cfg.batch_size, rng):
            tokens = pad([examples[i].tokens for i in batch], model.vocab.pad_id).to(source.device)
            features = source([examples[i].image_id for i in batch])
            loss, ce = caption_loss(model.decoder, features, tokens, model.vocab.pad_id, cfg.alpha_c, 0.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            epoch_losses.append(ce.item())
        losses.append(float(np.mean(epoch_losses)))
        log.info("fine-tune (%s) epoch %d: %d corrections + %d replay captions, loss %.4f", phase, epoch,
                 len(corrections), len(picked), losses[-1])
    return losses


# ----------------------------------------------------------------------------- evaluation and gate


def score_model(model: CaptionModel, source: FeatureSource, records: Sequence[ImageRecord],
                beam: BeamConfig, per_image: dict[str, float] | None = None) -> dict[str, float]:
    """Corpus scores; with ``per_image``, also fills it with each image's CIDEr."""
    if not records:
        return {}
    hyps = generate(model, source, [r.image_id for r in records], beam)
    refs = {r.image_id: list(r.captions) for r in records}
    wanted = ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr")
    scores = metrics.score(refs, hyps, wanted)
    if per_image is not None:
        per_image.update(scores.per_image_cider)
    return scores.values


def paired_bootstrap_lower_bound(base: dict[str, float], candidate: dict[str, float], resamples: int = 5000,
                                 confidence: float = 0.95, seed: int = 0) -> float:
    """Lower confidence bound of the mean per-photo improvement (candidate - base).

    A few held-out photos make corpus scores noisy: noise in the corrections (spam, random
    text) can look like a gain. Promotion needs the gain to hold across photos, not on average by luck.
    """
    keys = sorted(set(base) & set(candidate))
    if not keys:
        return float("-inf")
    diffs = np.array([candidate[k] - base[k] for k in keys])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    return float(np.quantile(means, 1.0 - confidence))


@dataclass
class GateDecision:
    promote: bool
    reason: str


def corrections_metric(base: dict[str, float], candidate: dict[str, float]) -> str:
    """CIDEr, unless the held-out references are all alike (CIDEr's IDF is then 0 for both): BLEU-1."""
    if base.get("CIDEr", 0.0) == 0.0 and candidate.get("CIDEr", 0.0) == 0.0:
        return "Bleu_1"
    return "CIDEr"


def gate(base: dict[str, dict[str, float]], candidate: dict[str, dict[str, float]],
         margin: float, improvement_lower_bound: float | None = None) -> GateDecision:
    """Better on the held-out corrections, and validation CIDEr within ``margin`` of the base.

    "Better" means a higher corpus score and, when per-photo scores are given, a 95% paired
    bootstrap lower bound of the per-photo CIDEr gain that is not below zero.
    """
    if not base["corrections"] or not candidate["corrections"]:
        return GateDecision(False, "no held-out corrections to judge the candidate on")
    key = corrections_metric(base["corrections"], candidate["corrections"])
    b_corr, c_corr = base["corrections"][key], candidate["corrections"][key]
    b_val, c_val = base["validation"].get("CIDEr"), candidate["validation"].get("CIDEr")
    if not c_corr > b_corr:
        return GateDecision(False, f"not better on held-out corrections ({key} {c_corr:.3f} vs base {b_corr:.3f})")
    if improvement_lower_bound is not None and improvement_lower_bound < 0:
        return GateDecision(False, f"gain on held-out corrections not significant ({key} {b_corr:.3f} -> "
                                   f"{c_corr:.3f}, 95% lower bound of the per-photo CIDEr gain "
                                   f"{improvement_lower_bound:+.3f})")
    if b_val is not None and c_val is not None and c_val < b_val * (1 - margin):
        drop = 100 * (1 - c_val / b_val) if b_val else float("inf")
        return GateDecision(False, f"validation CIDEr dropped {drop:.1f}% ({c_val:.3f} vs {b_val:.3f}; "
                                   f"allowed {100 * margin:.1f}%)")
    val_text = "not checked" if b_val is None or c_val is None else f"{b_val:.3f} -> {c_val:.3f}"
    bound = "" if improvement_lower_bound is None else f" (per-photo gain >= {improvement_lower_bound:+.3f})"
    return GateDecision(True, f"held-out corrections {key} {b_corr:.3f} -> {c_corr:.3f}{bound}; "
                              f"validation CIDEr {val_text}")


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

    replay_spec = cfg.replay_data or base.meta.get("trained_on")
    val_spec = cfg.val_data or replay_spec
    replay_records = load_dataset(replay_spec, (cfg.replay_split,)).split(cfg.replay_split) if replay_spec else []
    val_records = load_dataset(val_spec, (cfg.val_split,)).split(cfg.val_split) if val_spec else []
    if cfg.val_limit:
        val_records = val_records[: cfg.val_limit]
    if not val_records:
        log.warning("no validation data: the gate checks the held-out corrections only")

    all_records = [*corrections.train, *corrections.heldout, *replay_records, *val_records]
    images = {r.image_id: r.path for r in all_records}
    cache = open_cache(candidate, Path(cfg.cache))
    fill_cache(cache, candidate, list(images.values()), device, progress=False)
    source = FeatureSource(candidate, images, cache, device)

    beam = default_beam_config(base)
    base_photos: dict[str, float] = {}
    candidate_photos: dict[str, float] = {}
    before = {"corrections": score_model(base, source, corrections.heldout, beam, base_photos),
              "validation": score_model(base, source, val_records, beam)}
    correction_examples = build_examples(corrections.train, candidate.vocab, MAX_CAPTION_WORDS)
    replay_examples = build_examples(replay_records, candidate.vocab, MAX_CAPTION_WORDS)
    losses = train_candidate(cfg, candidate, source, correction_examples, replay_examples, len(base.vocab))
    after = {"corrections": score_model(candidate, source, corrections.heldout, beam, candidate_photos),
             "validation": score_model(candidate, source, val_records, beam)}
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
    (out / "finetune_report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
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


def add_parser(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune on people's corrections; promote only if better",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = FinetuneConfig()
    p.add_argument("--db", default=None, help="DATABASE_URL of the bot's database (default: $DATABASE_URL)")
    p.add_argument("--data-dir", default=None, help="the bot's data folder (photos; default $CAPTIONBOT_DATA_DIR)")
    p.add_argument("--from-export", default=None, help="a folder written by `python -m storage export` instead")
    p.add_argument("--base", default=None, help="checkpoint to start from (default: the bundled model)")
    p.add_argument("--out", default=defaults.out, help="candidates are written to OUT/NAME/")
    p.add_argument("--name", default=None, help="version name of the candidate (default: BASE+ftTIMESTAMP)")
    p.add_argument("--include-upvoted", action="store_true", help="also learn from captions people voted up")
    p.add_argument("--all-corrections", action="store_true",
                   help="use every correction, not only those no model has trained on yet")
    p.add_argument("--since", default=None, help="only corrections made on or after this date (YYYY-MM-DD)")
    p.add_argument("--replay-data", default=None,
                   help="FORMAT:PATH of the replay data (default: the base model's training data)")
    p.add_argument("--replay-split", default=defaults.replay_split, help="split of the replay data")
    p.add_argument("--replay-ratio", type=float, default=defaults.replay_ratio,
                   help="replay captions per correction caption in each epoch")
    p.add_argument("--val-data", default=None, help="FORMAT:PATH for the validation check (default: replay data)")
    p.add_argument("--val-split", default=defaults.val_split, help="validation split")
    p.add_argument("--val-limit", type=int, default=0, help="validate on the first N images only (0 = all)")
    p.add_argument("--holdout", type=float, default=defaults.holdout,
                   help="share of corrected photos held out to judge the candidate")
    p.add_argument("--min-word-count", type=int, default=defaults.min_word_count,
                   help="a new word joins the vocabulary when the corrections use it this often")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="fine-tuning epochs")
    p.add_argument("--new-word-epochs", type=int, default=defaults.new_word_epochs,
                   help="first phase: epochs that train only the new words' rows (0 = skip)")
    p.add_argument("--new-word-lr", type=float, default=defaults.new_word_lr, help="learning rate of that phase")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="captions per batch")
    p.add_argument("--lr", type=float, default=defaults.lr, help="learning rate (AdamW)")
    p.add_argument("--margin", type=float, default=defaults.margin,
                   help="largest relative drop of validation CIDEr that still allows promotion")
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed")
    p.add_argument("--device", default=defaults.device, help="auto, cpu or cuda")
    p.add_argument("--cache", default=defaults.cache, help="encoder feature cache folder")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="do not register the candidate in the database")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    values = {k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__}
    cfg = FinetuneConfig(**values)
    if cfg.db is None and cfg.from_export is None:
        cfg.db = os.environ.get("DATABASE_URL")
        if cfg.db is None:
            from storage.config import database_url

            cfg.db = database_url()
    try:
        report = finetune(cfg)
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

