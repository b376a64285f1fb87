"""``python -m train finetune``: learn from people's corrections, promote only what is better.

0. Start from ``--base``, by default the model the bot serves (the active model version, else the
   bundled model). A version that learned from the corrections of a person who has since used
   /forget (``forgotten_data``) is never a base: its newest unmarked ancestor is used instead, so
   what only that person taught is not in the next model.
1. Take the corrections (optionally up-voted captions) no run has looked at yet, from the
   database or from a folder written by ``python -m storage export``; hold out a part of them
   (by photo, under the data folder's secret salt, no person more than a small share) to judge
   the result; use at most a small share of the rest from any one person (``train/trust.py``).
2. Add the new words that enough distinct people used on enough distinct photos (new rows
   only: old words' predictions are unchanged until training moves them).
3. Fine-tune on the corrections mixed with a replay sample of the base model's own training
   data, so the model learns the new things without forgetting the old ones: the new words'
   rows first, then the whole decoder, with cross-entropy, or, for a base trained
   self-critically (``meta.scst``), self-critically on beam candidates rewarded against the
   corrections (cross-entropy there undid what self-critical training gave).
4. Score base and candidate on the held-out corrections and on the base's validation split.
   The held-out corrections are scored with CIDEr-D whose document frequencies come from the
   base model's training references (``HELDOUT_METRIC``), not from the held-out sentences alone:
   twenty corrections of one concept all share its word, which CIDEr over those twenty would give
   no weight, so the score would miss exactly what people taught. The candidate passes the gate
   only if it is better on the corrections (significantly: the bootstrap lower bound of the
   per-photo gain is above 0) and its validation CIDEr drops by at most ``--margin``
   (relative); otherwise it is registered as rejected, with why.
5. A candidate that passed is activated, or waits for an operator (``awaiting_review``):
   always when it adds words, and in ``review`` promotion mode (the default) always. Every
   correction the run trained on is marked with the outcome, so none is retried.

Exit codes: 0 activated, 3 rejected by the gate, 4 waiting for review, 1 error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.checkpoint import CaptionModel
from captioner.inference import default_beam_config, resolve_device
from captioner.vocab import tokenize
from common.atomic import atomic_write_text
from common.settings import ConfigError, Settings, load_settings
from storage.errors import ModelVersionError
from storage.holdout import HOLDOUT_FRACTION, MAX_PERSON_SHARE, load_or_create_salt
from storage.records import CorrectionOutcome, ModelStatus

from .cider import CiderD
from .cli import DEVICE_HELP, VAL_LIMIT_HELP, add_dataclass_options, config_from_args
from .data import ImageRecord, load_dataset
from .features import FeatureSource, drop_cached_under, feature_source
from .gate import HELDOUT_METRIC, corrections_metric, gate, paired_bootstrap_lower_bound
from .loop import Example, LoopConfig, bucketed_batches, build_examples, train_epoch
from .scoring import score_records
from .scst import SelfCritical, image_examples, reference_cider
from .trust import CorrectionRow, CorrectionSet, grow_vocabulary, split_corrections, word_uses

log = logging.getLogger(__name__)

EXIT_PROMOTED, EXIT_ERROR, EXIT_REJECTED, EXIT_AWAITING_REVIEW = 0, 1, 3, 4
PROMOTION_MODES = ("review", "auto")
# What the gate looks at (METEOR would start a Java process for a handful of photos).
GATE_METRICS = ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr")
# The self-critical phase of a fine-tune from a self-critically trained base: beams as wide and
# batches as large as the shipped model's own self-critical training (README); 10 epochs, chosen
# with bench/learning_loop.py (bench/results/learning_loop_variants/).
SCST_FINETUNE_EPOCHS = 10
SCST_FINETUNE_BEAMS = 5
SCST_FINETUNE_BATCH = 50


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
    holdout_person_share: float = MAX_PERSON_SHARE
    person_share: float = 0.1
    max_per_person: int = 20
    min_word_people: int = 3
    max_new_words: int = 20
    promotion: str | None = None
    new_word_epochs: int = 10
    new_word_lr: float = 1e-2
    margin: float = 0.03
    # The smallest per-photo CIDEr-D gain on the held-out corrections (95% lower bound) that
    # promotes. Measured with bench/learning_loop.py: real corrections +0.11, random captions
    # typed as corrections +0.007 (significant, but only a drift toward generic phrases).
    min_gain: float = 0.05
    # With fewer held-out photos than this, the significance test is skipped (too few to resample).
    min_photos_for_test: int = 5
    # A base trained with self-critical training (meta "scst") loses what that training gave when
    # its whole decoder is fine-tuned with cross-entropy (bench/results/learning_loop_variants/),
    # so for such a base the second phase is self-critical instead: this many epochs on the
    # corrections (rewarded against the corrections) and a replay sample, after
    # ``scst_xe_epochs`` of cross-entropy. None: SCST_FINETUNE_EPOCHS for such a base, else 0.
    scst_epochs: int | None = None
    scst_lr: float = 5e-5
    scst_replay_ratio: float = 2.0  # replay photos per corrected photo in each self-critical epoch
    scst_xe_epochs: int = 0  # cross-entropy epochs of the whole decoder before them
    name: str | None = None
    register: bool = True
    save_dtype: str = "float16"


# ----------------------------------------------------------------------------- corrections


def database_url(cfg: FinetuneConfig) -> str:
    """The bot's database: --db (or $DATABASE_URL, see ``with_bot_storage``), else the SQLite file in
    the bot's data folder."""
    from storage.config import database_url as resolve_url

    return resolve_url(cfg.db, cfg.data_dir)


async def _open_store(cfg: FinetuneConfig) -> Any:
    from storage import Storage

    return await Storage.open(database_url(cfg), Path(cfg.data_dir) if cfg.data_dir else None)


async def _corrections_from_db(cfg: FinetuneConfig) -> tuple[list[CorrectionRow], bytes, Path]:
    """The corrections no run has looked at, the data folder's holdout salt, and its photo folder."""
    store = await _open_store(cfg)
    try:
        since = datetime.fromisoformat(cfg.since).replace(tzinfo=UTC) if cfg.since else None
        examples = await store.corrections_for_training(since=since, include_upvoted=cfg.include_upvoted,
                                                        untrained_only=not cfg.all_corrections)
        salt = await asyncio.to_thread(load_or_create_salt, store.data_dir)
    finally:
        await store.close()
    rows = [CorrectionRow(e.sha256, e.path, e.text, e.source_id if e.kind == "correction" else None, e.person_id)
            for e in examples]
    return rows, salt, store.photos.root


@dataclass(frozen=True)
class BaseChoice:
    """Which checkpoint a run starts from, and why."""

    path: str | None  # None: the bundled model
    version: str
    skipped: tuple[str, ...] = ()  # versions passed over because they learned from forgotten people's corrections

    def describe(self) -> str:
        if not self.skipped:
            return f"base {self.version}"
        return (f"base {self.version}, the newest ancestor of {self.skipped[0]} free of the corrections of people "
                f"who used /forget (skipped: {', '.join(self.skipped)})")


async def choose_base(cfg: FinetuneConfig) -> BaseChoice:
    """``--base``, else the active model version, else the bundled model; then, if that version learned
    from a forgotten person's corrections, its newest registered ancestor that did not."""
    store = await _open_store(cfg)
    try:
        path: str | None = cfg.base
        if path is None:
            active = await store.active_model_version()
            path = active.checkpoint_path if active is not None else None
        version = checkpoint.version_of(path)
        clean = await store.clean_base(version)
        if clean is None or clean.name == version:
            return BaseChoice(path, version)
        skipped = [version]  # from the requested version up to (not including) the clean one
        record = await store.get_model_version(version)
        while record is not None and record.parent is not None and record.parent != clean.name:
            skipped.append(record.parent)
            record = await store.get_model_version(record.parent)
        return BaseChoice(clean.checkpoint_path, clean.name, tuple(skipped))
    except ModelVersionError as err:
        raise FinetuneError(str(err)) from err
    finally:
        await store.close()


def corrections_from_export(folder: str) -> CorrectionSet:
    """An export folder's split; it names no people, so each photo stands for its own author."""
    dataset = load_dataset(f"flickr:{folder}", ("train", "val"))
    train = dataset.split("train")
    rows = [CorrectionRow(r.image_id, r.path, text, None, None) for r in train for text in r.captions]
    return CorrectionSet(train, dataset.split("val"), uses=word_uses(rows))


# ----------------------------------------------------------------------------- training


def train_candidate(cfg: FinetuneConfig, model: CaptionModel, source: FeatureSource,
                    corrections: list[Example], replay: list[Example], old_vocab_size: int | None = None,
                    decoder_epochs: int | None = None) -> list[float]:
    """Fine-tune the decoder with cross-entropy; each epoch mixes all corrections with a fresh replay sample.

    Phase 1 trains only the new words' embedding and output rows (old words' logits cannot move),
    at a high learning rate: the decoder already sees the new thing, it lacks the word for it.
    Phase 2 fine-tunes the whole decoder gently, for ``decoder_epochs`` (default ``cfg.epochs``).
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
    epochs = cfg.epochs if decoder_epochs is None else decoder_epochs
    losses += _epochs(cfg, model, source, corrections, replay, optimizer, rng, epochs, "decoder")
    decoder.eval()
    return losses


def self_critical_phase(cfg: FinetuneConfig, model: CaptionModel, source: FeatureSource,
                         corrections: list[ImageRecord], replay: list[ImageRecord], epochs: int) -> list[float]:
    """Self-critical epochs on beam candidates after the cross-entropy phases, as the base was
    trained: each epoch takes every corrected photo and ``scst_replay_ratio`` times as many
    training photos; a corrected photo's candidates are rewarded against its corrections, a replay
    photo's against its references (CIDEr-D over both, document frequencies included)."""
    if not epochs or not corrections:
        return []
    rng = np.random.default_rng(cfg.seed + 1)
    references = {r.image_id: r for r in replay}
    references.update({r.image_id: r for r in corrections})  # a corrected training photo: what people said
    cider = reference_cider(list(references.values()))
    beam = default_beam_config(model)  # its length penalty and blocking; the objective sets the width
    objective = SelfCritical(cider, model.vocab, samples=SCST_FINETUNE_BEAMS, max_len=beam.max_len,
                             sampling="beam", beam=beam)
    optimizer = torch.optim.AdamW(model.decoder.parameters(), lr=cfg.scst_lr)
    correction_ids = [r.image_id for r in corrections]
    corrected = set(correction_ids)
    replay_ids = [i for i in references if i not in corrected]
    n_replay = min(len(replay_ids), round(cfg.scst_replay_ratio * len(corrections)))
    rewards = []
    for epoch in range(epochs):
        picked = [replay_ids[i] for i in rng.choice(len(replay_ids), n_replay, replace=False)] if n_replay else []
        examples = image_examples([references[i] for i in [*correction_ids, *picked]])
        # As fit batches self-critical epochs: shuffled photos (they have no tokens to bucket by).
        batches = bucketed_batches(examples, SCST_FINETUNE_BATCH, rng)
        reward, _ = train_epoch(cfg, model, optimizer, source, examples, batches, step=0, total_steps=0,
                                objective=objective)
        rewards.append(reward)
        log.info("fine-tune (self-critical) epoch %d: %d corrected + %d replay photos, reward %.4f", epoch,
                 len(correction_ids), len(picked), reward)
    model.decoder.eval()
    return rewards


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


# Held-out photos join the document-frequency corpus under their own ids (a correction's photo
# may also be one of the training images).
_HELD_OUT_ID = "held-out:"


def heldout_cider(replay_records: list[ImageRecord], heldout: list[ImageRecord]) -> CiderD | None:
    """CIDEr-D of the held-out corrections with document frequencies of the base's training corpus.

    None without training references (an export-only run with no ``trained_on``): the gate then
    falls back to the held-out set's own statistics.
    """
    if not replay_records:
        return None
    held = [replace(r, image_id=_HELD_OUT_ID + r.image_id) for r in heldout]
    return reference_cider([*replay_records, *held])


def _judge(model: CaptionModel, source: FeatureSource, heldout: list[ImageRecord], val_records: list[ImageRecord],
           beam: BeamConfig, corpus: CiderD | None) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Scores on the held-out corrections and on validation data, and each held-out photo's scores."""
    held = score_records(model, source, heldout, beam, GATE_METRICS)
    values, per_photo = dict(held.scores.values), dict(held.scores.per_image)
    if corpus is not None:
        ids = [r.image_id for r in heldout]
        scores = corpus.score([_HELD_OUT_ID + i for i in ids], [tokenize(held.captions[i]) for i in ids])
        values[HELDOUT_METRIC] = float(scores.mean())
        per_photo[HELDOUT_METRIC] = {i: float(s) for i, s in zip(ids, scores, strict=True)}
    validation = score_records(model, source, val_records, beam, GATE_METRICS).scores.values if val_records else {}
    return {"corrections": values, "validation": validation}, per_photo


# ----------------------------------------------------------------------------- the run


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    if cfg.from_export:
        # An export run names no database: it starts from --base (default: the bundled model).
        choice = BaseChoice(cfg.base, checkpoint.version_of(cfg.base))
        corrections = corrections_from_export(cfg.from_export)
    else:
        choice = asyncio.run(choose_base(cfg))
        rows, salt, photos_root = asyncio.run(_corrections_from_db(cfg))
        if cfg.cache:
            # Earlier versions cached people's photos too; those rows would outlive the photos.
            drop_cached_under(Path(cfg.cache), photos_root)
        corrections = split_corrections(rows, salt, cfg.holdout, cfg.holdout_person_share, cfg.person_share,
                                        cfg.max_per_person)
    log.info("starting from %s", choice.describe())
    cfg = replace(cfg, base=choice.path)
    base = checkpoint.load(cfg.base, device)
    candidate = checkpoint.load(cfg.base, device)
    # The learning loop trains the decoder only. An encoder fine-tuned before stays as it was
    # shipped (and stays in the checkpoint): frozen here, its features are cached like any other's.
    for model in (base, candidate):
        model.encoder.set_trainable_blocks(0)
    report = _run(cfg, device, base, candidate, corrections, choice)
    if not cfg.from_export and cfg.register:
        asyncio.run(_register(cfg, base, report, corrections.correction_ids))
    return report


def _reference_data(cfg: FinetuneConfig, base: CaptionModel) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(replay records, validation records): by default the data the base model was shipped to replay
    (``meta.replay_data``, see ``train ship``), else its own training data."""
    replay_spec = cfg.replay_data or base.meta.get("replay_data") or base.meta.get("trained_on")
    val_spec = cfg.val_data or replay_spec
    replay_records = load_dataset(replay_spec, (cfg.replay_split,)).split(cfg.replay_split) if replay_spec else []
    val_records = load_dataset(val_spec, (cfg.val_split,)).split(cfg.val_split) if val_spec else []
    if cfg.val_limit:
        val_records = val_records[: cfg.val_limit]
    if not val_records:
        log.warning("no validation data: the gate checks the held-out corrections only")
    return replay_records, val_records


def _run(cfg: FinetuneConfig, device: torch.device, base: CaptionModel, candidate: CaptionModel,
         corrections: CorrectionSet, choice: BaseChoice) -> dict[str, Any]:
    if not corrections.train:
        raise FinetuneError("no new corrections to learn from")
    if not corrections.heldout:
        raise FinetuneError("all corrections fell in the training part; need more corrections (or --holdout)")
    started = time.time()
    new_words = grow_vocabulary(candidate, corrections.uses, cfg.min_word_people, cfg.max_new_words)
    log.info("corrections: %d photos to train on, %d held out, %d over a person's share left for later; "
             "new words: %s", len(corrections.train), len(corrections.heldout), corrections.left_for_later,
             ", ".join(new_words) or "none")
    replay_records, val_records = _reference_data(cfg, base)
    # People's photos are encoded for this run only, in memory, never into the persistent feature
    # cache: a cache entry would outlive the photo's /forget (and retention). A run holds few of them:
    # the corrections no run has seen, at most 20 a day from each person (the entry cap), 125 kB each
    # with EfficientNet-Lite0 (49 x 1280 float16), so 8,000 photos (400 people at the cap) take 1 GB.
    # The public replay and validation images use the cache.
    people_photos = {r.image_id: r.path for r in [*corrections.train, *corrections.heldout]}
    public = {r.image_id: r.path for r in [*replay_records, *val_records] if r.image_id not in people_photos}
    source = feature_source(candidate, public, device, cfg.cache)
    source.add_in_memory(people_photos)

    beam = default_beam_config(base)
    corpus = heldout_cider(replay_records, corrections.heldout)
    before, base_photos = _judge(base, source, corrections.heldout, val_records, beam, corpus)
    correction_examples = build_examples(corrections.train, candidate.vocab, cfg.max_caption_len)
    replay_examples = build_examples(replay_records, candidate.vocab, cfg.max_caption_len)
    scst_epochs = scst_phase_epochs(cfg, base)
    decoder_epochs = cfg.scst_xe_epochs if scst_epochs else cfg.epochs
    losses = train_candidate(cfg, candidate, source, correction_examples, replay_examples, len(base.vocab),
                             decoder_epochs)
    rewards = self_critical_phase(cfg, candidate, source, corrections.train, replay_records, scst_epochs)
    after, candidate_photos = _judge(candidate, source, corrections.heldout, val_records, beam, corpus)
    # The per-photo gain is tested on the metric the gate decides by.
    key = corrections_metric(before["corrections"], after["corrections"])
    lower_bound = paired_bootstrap_lower_bound(base_photos.get(key, {}), candidate_photos.get(key, {}))
    decision = gate(before, after, cfg.margin, lower_bound, len(corrections.heldout), cfg.min_photos_for_test,
                    cfg.min_gain)
    status = promotion_status(decision.promote, bool(new_words), cfg.promotion or "review")

    name = cfg.name or f"{base.version.split('+')[0]}+ft{datetime.now(UTC):%Y%m%d%H%M%S}"
    out = Path(cfg.out) / name
    candidate.meta.update({
        "version": name, "parent": base.version, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "finetuned_on": {"corrections": sum(len(r.captions) for r in corrections.train),
                         "photos": len(corrections.train), "new_words": new_words},
    })
    checkpoint.save(candidate, out, dtype=getattr(torch, cfg.save_dtype))
    report = {
        "name": name, "parent": base.version, "base_choice": choice.describe(), "skipped_bases": list(choice.skipped),
        "checkpoint": str(out.resolve()), "passed_gate": decision.promote,
        "status": status.value, "reason": decision.reason, "base": before, "candidate": after,
        "new_words": new_words, "gate_metric": key,
        "heldout_gain_lower_bound": lower_bound, "train_losses": losses, "scst_rewards": rewards,
        "corrections_train_photos": len(corrections.train),
        "corrections_heldout_photos": len(corrections.heldout), "replay_ratio": cfg.replay_ratio,
        "corrections_left_for_later": corrections.left_for_later,
        "seconds": round(time.time() - started, 1), "config": asdict(cfg),
    }
    atomic_write_text(out / "finetune_report.json", json.dumps(report, indent=1, default=str) + "\n")
    return report


def scst_phase_epochs(cfg: FinetuneConfig, base: CaptionModel) -> int:
    """--scst-epochs, else SCST_FINETUNE_EPOCHS when the base was trained self-critically (its meta
    says so), else 0."""
    if cfg.scst_epochs is not None:
        return cfg.scst_epochs
    return SCST_FINETUNE_EPOCHS if base.meta.get("scst") else 0


def promotion_status(passed_gate: bool, adds_words: bool, promotion: str) -> ModelStatus:
    """Where a judged candidate goes: rejected, waiting for an operator, or activated.

    A candidate that adds words always waits for review: the gate cannot tell a new concept from a
    new insult. In ``review`` mode every passing candidate waits; in ``auto`` mode one without new
    words is activated by the gate alone.
    """
    if promotion not in PROMOTION_MODES:
        raise ConfigError(f"promotion must be one of {PROMOTION_MODES}, not {promotion!r}")
    if not passed_gate:
        return ModelStatus.REJECTED
    if adds_words or promotion == "review":
        return ModelStatus.AWAITING_REVIEW
    return ModelStatus.ACTIVE


async def _register(cfg: FinetuneConfig, base: CaptionModel, report: dict[str, Any],
                    correction_ids: list[int]) -> None:
    """Record the candidate (active, awaiting review or rejected, with why) and mark the corrections
    it trained on with the outcome: a correction a run looked at is never offered again."""
    store = await _open_store(cfg)
    try:
        if await store.get_model_version(base.version) is None:
            # Lineage: the base is what serves when nothing is registered yet.
            status = "active" if await store.active_model_version() is None else "candidate"
            await store.register_model_version(base.version, str(checkpoint.resolve(cfg.base).resolve()),
                                               base.meta.get("parent"), base.meta.get("metrics", {}), status=status)
        metrics_doc = {"base": report["base"], "candidate": report["candidate"], "new_words": report["new_words"],
                       "gate_metric": report["gate_metric"], "reason": report["reason"],
                       "heldout_gain_lower_bound": report["heldout_gain_lower_bound"],
                       "heldout_photos": report["corrections_heldout_photos"],
                       "train_photos": report["corrections_train_photos"]}
        status = ModelStatus(report["status"])
        rejected = status == ModelStatus.REJECTED
        await store.register_model_version(report["name"], report["checkpoint"], report["parent"], metrics_doc,
                                           status=status, reason=report["reason"] if rejected else None)
        outcome = CorrectionOutcome.REJECTED_RUN if rejected else CorrectionOutcome.TRAINED
        await store.mark_corrections_trained(correction_ids, report["name"], outcome)
    finally:
        await store.close()


# ----------------------------------------------------------------------------- command line

# The options in the order --help lists them; LoopConfig fields not here are not options of finetune.
FINETUNE_HELP = {
    "db": "DATABASE_URL of the bot's database (default: $DATABASE_URL)",
    "data_dir": "the bot's data folder (photos; default $CAPTIONBOT_DATA_DIR)",
    "from_export": "a folder written by `python -m storage export` instead (it names no people: the per-person "
                   "caps cannot apply and the new-word rule counts photos, not people; --db is the trusted path)",
    "base": "checkpoint to start from (default: the active model version, else the bundled model; a version that "
            "learned from corrections of people who used /forget is replaced by its newest ancestor that did not)",
    "out": "candidates are written to OUT/NAME/",
    "name": "version name of the candidate (default: BASE+ftTIMESTAMP)",
    "include_upvoted": "also learn from captions people voted up",
    "all_corrections": "use every correction, not only those no model has trained on yet",
    "since": "only corrections made on or after this date (YYYY-MM-DD)",
    "replay_data": "FORMAT:PATH of the replay data (default: the base model's meta.replay_data, else its "
                   "training data)",
    "replay_split": "split of the replay data",
    "replay_ratio": "replay captions per correction caption in each epoch",
    "val_data": "FORMAT:PATH for the validation check (default: replay data)",
    "val_split": "validation split",
    "val_limit": VAL_LIMIT_HELP,
    "holdout": "share of corrected photos held out to judge the candidate",
    "holdout_person_share": "most of the held-out photos one person may have corrected (a share)",
    "person_share": "most of a run's corrections one person may contribute (a share) ...",
    "max_per_person": "... and at most this many; the rest wait for a later run",
    "min_word_people": "a new word joins the vocabulary when this many people used it on as many photos",
    "max_new_words": "most new words one run adds",
    "promotion": "review (default: $CAPTIONBOT_PROMOTION) or auto: see the exit codes above",
    "epochs": "fine-tuning epochs",
    "new_word_epochs": "first phase: epochs that train only the new words' rows (0 = skip)",
    "new_word_lr": "learning rate of that phase",
    "batch_size": "captions per batch",
    "lr": "learning rate (AdamW)",
    "margin": "largest relative drop of validation CIDEr that still allows promotion",
    "min_gain": "smallest 95%%-bound per-photo CIDEr-D gain on the held-out corrections that promotes",
    "seed": "random seed",
    "device": DEVICE_HELP,
    "cache": "encoder feature cache folder",
    "register": "register the candidate in the database (--no-register: do not)",
    "scst_epochs": "self-critical epochs of the whole decoder, after the new words' phase and --scst-xe-epochs "
                   "(default: 10 if the base was trained self-critically, else 0; then they replace --epochs)",
    "scst_xe_epochs": "with self-critical epochs: cross-entropy epochs of the whole decoder before them",
    "scst_lr": "learning rate of the self-critical epochs",
    "scst_replay_ratio": "replay photos per corrected photo in each self-critical epoch",
}
NOT_OPTIONS = {"min_lr_ratio", "warmup_steps", "grad_clip", "alpha_c", "label_smoothing", "max_caption_len",
               "max_steps", "progress", "min_photos_for_test", "save_dtype"}


def add_parser(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    parser = sub.add_parser("finetune", help="fine-tune on people's corrections; promote only if better",
                            description=__doc__, formatter_class=formatter)
    add_dataclass_options(parser, FinetuneConfig, FINETUNE_HELP, NOT_OPTIONS)
    parser.set_defaults(func=run)


def with_bot_storage(cfg: FinetuneConfig, settings: Settings) -> FinetuneConfig:
    """--db, --data-dir and --promotion, else the bot's own DATABASE_URL, CAPTIONBOT_DATA_DIR and
    CAPTIONBOT_PROMOTION settings."""
    data_dir = cfg.data_dir or (str(settings.data_dir) if settings.data_dir is not None else None)
    return replace(cfg, db=cfg.db or settings.database_url, data_dir=data_dir,
                   promotion=cfg.promotion or settings.promotion)


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
    verdict, code = VERDICTS[ModelStatus(report["status"])]
    print(f"{verdict} {report['name']}: {report['reason']}")
    print(f"  new words: {', '.join(report['new_words']) or 'none'}")
    key = report["gate_metric"]
    b, c = report["base"]["corrections"], report["candidate"]["corrections"]
    print(f"  corrections  {key} {b[key]:.3f} -> {c[key]:.3f} (the gate's metric)")
    for part in ("corrections", "validation"):
        b, c = report["base"][part], report["candidate"][part]
        if b:
            print(f"  {part:12s} CIDEr {b['CIDEr']:.3f} -> {c['CIDEr']:.3f}   BLEU-1 {b['Bleu_1']:.3f} -> "
                  f"{c['Bleu_1']:.3f}   BLEU-4 {b['Bleu_4']:.3f} -> {c['Bleu_4']:.3f}")
    print(f"  checkpoint: {report['checkpoint']}")
    if code == EXIT_AWAITING_REVIEW:
        print(f"  review: python -m train review; python -m train approve {report['name']}")
    return code


VERDICTS = {
    ModelStatus.ACTIVE: ("PROMOTED", EXIT_PROMOTED),
    ModelStatus.REJECTED: ("REJECTED", EXIT_REJECTED),
    ModelStatus.AWAITING_REVIEW: ("AWAITING REVIEW", EXIT_AWAITING_REVIEW),
}
