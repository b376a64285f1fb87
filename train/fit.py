"""Training the Show-Attend-Tell captioner: teacher forcing, beam-search model selection, resume.

Plain and linear on purpose (in the spirit of nanoGPT's train.py): prepare data, then loop over
epochs of length-bucketed batches, validate with real beam search, checkpoint, repeat.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from captioner import checkpoint
from captioner.beam import BeamConfig
from captioner.checkpoint import CaptionModel
from captioner.inference import resolve_device
from captioner.model import ModelConfig
from captioner.vocab import Vocabulary
from common.atomic import atomic_write_text

from . import metrics
from .cli import comma_list
from .data import CaptionDataset, ImageRecord, load_dataset
from .distill import TeacherGroup, WordDistillation, distillation_fact, load_teachers
from .features import FeatureSource, feature_source
from .loop import Example, LoopConfig, Objective, bucketed_batches, build_examples, train_epoch
from .scoring import SplitResult, score_records
from .scst import BASELINES, SAMPLING, SelfCritical, image_examples, reference_cider, self_critical_fact
from .state import load_trainer_state, save_trainer_state

log = logging.getLogger(__name__)

# Validation runs every epoch: METEOR (a Java process) would cost more than the rest together.
VALIDATION_METRICS = tuple(k for k in metrics.METRIC_KEYS if k != "METEOR")


INHERITED_FACTS = ("created", "training", "metrics", "confidence", "histories", "scst", "distillation")


@dataclass
class TrainConfig(LoopConfig):
    """``python -m train fit``: the shared loop settings plus data, vocabulary, model selection, stages."""

    # the data and the vocabulary
    data: str = "flickr:../shared/data/flickr8k"
    train_split: str = "train"
    min_freq: int = 5
    # optimisation beyond the shared loop
    weight_decay: float = 0.0
    encoder_lr: float = 1e-5
    # model selection: beam search on the validation split, early stopping
    val_beam: int = 3
    val_max_len: int = 20
    val_length_penalty: float = 0.0
    val_block_ngram: int = 0
    patience: int = 4
    # the machine and the feature cache
    threads: int = 0
    feature_batch_size: int = 4
    raw_images: bool = False
    # where the weights come from
    init_from: str = ""
    resume: bool = False
    # Also save OUT/last inside an epoch, this often (minutes; 0: at epoch ends only), so that an
    # epoch longer than a working session (self-critical training on a busy CPU) is not lost.
    checkpoint_minutes: float = 10.0
    # self-critical training (train.scst) instead of teacher forcing; --batch-size counts images then
    scst: bool = False
    scst_samples: int = 5
    scst_max_len: int = 20
    scst_baseline: str = "mean"
    scst_sampling: str = "multinomial"
    # word-level distillation (train.distill): checkpoints whose mean word distribution is mixed
    # into each reference word's target, comma-separated; empty: plain cross-entropy
    distill_from: str = ""
    distill_weight: float = 0.5
    model: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_json({**ModelConfig().to_json(), **self.model})

    def val_beam_config(self) -> BeamConfig:
        return BeamConfig(self.val_beam, self.val_max_len, self.val_length_penalty, self.val_block_ngram)


def validate(model: CaptionModel, source: FeatureSource, records: list[ImageRecord],
             cfg: TrainConfig) -> SplitResult:
    """Beam-search captions of the validation images (from cached features) and their scores."""
    return score_records(model, source, records, cfg.val_beam_config(), VALIDATION_METRICS)


# ----------------------------------------------------------------------------- the run


# Ranks wait in collectives while rank 0 fills the feature cache or validates: allow for that.
DIST_TIMEOUT = timedelta(hours=3)


def _setup_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); under torchrun joins the process group (NCCL on CUDA, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = resolve_device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=DIST_TIMEOUT)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def prepare_model(cfg: TrainConfig, dataset: CaptionDataset) -> CaptionModel:
    """A new model with a vocabulary from the training split, or the ``--init-from`` checkpoint.

    With ``--init-from`` the architecture and vocabulary are the checkpoint's; ``--fine-tune-blocks
    N`` (N > 0) unfreezes its top N encoder blocks (the second, fine-tuning stage).
    """
    if not cfg.init_from:
        texts = (c for r in dataset.split(cfg.train_split) for c in r.captions)
        vocab = Vocabulary.build(texts, min_freq=cfg.min_freq)
        return CaptionModel.create(cfg.model_config(), vocab)
    model = checkpoint.load(cfg.init_from)
    defaults, own = ModelConfig().to_json(), model.config.to_json()
    ignored = [k for k, v in cfg.model.items()
               if k != "fine_tune_blocks" and v != defaults.get(k) and v != own.get(k)]
    if ignored:
        log.warning("--init-from %s: the architecture is the checkpoint's; ignoring %s",
                    cfg.init_from, ", ".join(f"--{k.replace('_', '-')}" for k in ignored))
    blocks = int(cfg.model.get("fine_tune_blocks", 0))
    # 0 keeps the checkpoint's setting: an encoder fine-tuned before stays part of the checkpoint.
    if blocks > 0 and blocks != model.config.fine_tune_blocks:
        model.encoder.set_trainable_blocks(blocks)
        model.config = replace(model.config, fine_tune_blocks=blocks)
    return model


@dataclass
class Progress:
    """Where a run stands; saved with the trainer state so that --resume continues exactly."""

    history: dict[str, Any]
    epoch: int = 0  # the next epoch to run
    step: int = 0
    best_cider: float = -1.0
    stale: int = 0  # epochs since the best validation CIDEr
    # Inside ``epoch``: batches already trained on and the sum of their reported values.
    batches_done: int = 0
    value_sum: float = 0.0


def _device(cfg: TrainConfig, world: int) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train and return the history; the best model is written to OUT/best."""
    rank, world = _setup_distributed(cfg.device)
    device = _device(cfg, world)
    if rank != 0:
        cfg.progress = False
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    dataset = load_dataset(cfg.data, (cfg.train_split, cfg.val_split))
    train_records, val_records = dataset.split(cfg.train_split), dataset.split(cfg.val_split)
    if cfg.val_limit:
        val_records = val_records[: cfg.val_limit]
    model = prepare_model(cfg, dataset)
    parent = model.meta.get("version") if cfg.init_from else None  # lineage by version, as finetune records it
    # With --init-from the parent's own facts (when it was made, how, its scores and its confidence
    # rule, both measured on its weights) do not describe this run's weights.
    for inherited in INHERITED_FACTS:
        model.meta.pop(inherited, None)
    model.meta.update({"trained_on": dataset.name, "train_split": cfg.train_split,
                       "parent": parent, "created": datetime.now(UTC).isoformat(timespec="seconds")})
    scst = self_critical_fact(vars(cfg))
    if scst:
        model.meta["scst"] = scst
    model.to(device)
    if cfg.distill_from:
        model.meta["distillation"] = distillation_fact(cfg.distill_from, cfg.distill_weight)
    images = {r.image_id: r.path for r in [*train_records, *val_records]}
    # With fine-tuned top blocks the cache holds the frozen part's maps (train.features).
    source = feature_source(model, images, device, None if cfg.raw_images else cfg.cache,
                            cfg.feature_batch_size, cfg.progress, fill=rank == 0)

    examples, objective = _objective(cfg, model, train_records, world)
    log.info("train: %d images, %d examples; val: %d images; vocabulary %d words",
             len(train_records), len(examples), len(val_records), len(model.vocab))

    decoder: nn.Module = model.decoder
    if world > 1:
        # DDP averages the decoder's gradients; unfrozen encoder blocks are averaged in train_epoch.
        decoder = nn.parallel.DistributedDataParallel(
            model.decoder, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size) // world  # = len(bucketed_batches) // world
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    run = _resume(cfg, out, model, optimizer)
    for epoch in range(run.epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        batches = bucketed_batches(examples, cfg.batch_size, rng)
        if world > 1:
            # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
            batches = batches[: len(batches) - len(batches) % world][rank::world]
            # Different dropout masks per rank, reproducible per epoch (so --resume stays exact).
            torch.manual_seed(cfg.seed + 1000 * epoch + rank)
        t0 = time.time()
        train_value = _train_epoch_in_chunks(cfg, out, model, optimizer, source, examples, batches, total_steps,
                                             decoder, epoch, objective, run, save=rank == 0 and world == 1)
        train_seconds = time.time() - t0
        record: dict[str, Any] = {"epoch": epoch, "step": run.step,
                                  _train_key(objective): _mean_over_ranks(train_value, device, world),
                                  "train_seconds": train_seconds}
        if rank == 0:
            _validate_and_save(cfg, out, model, optimizer, source, val_records, run, record)
        stop = torch.tensor([run.stale >= cfg.patience or bool(cfg.max_steps and run.step >= cfg.max_steps)],
                            dtype=torch.int, device=device)  # NCCL only moves CUDA tensors
        if world > 1:
            dist.broadcast(stop, 0)
        if bool(stop.item()):
            log.info("stopping after epoch %d", epoch)
            break
    if world > 1:
        _finish_distributed(model, device, rank, world, run.step)
    return run.history


# Batches trained between two looks at the clock for a mid-epoch checkpoint.
CHUNK_BATCHES = 25


def _train_epoch_in_chunks(cfg: TrainConfig, out: Path, model: CaptionModel, optimizer: torch.optim.Optimizer,
                           source: FeatureSource, examples: list[Example], batches: list[list[int]],
                           total_steps: int, decoder: nn.Module, epoch: int, objective: Objective | None,
                           run: Progress, save: bool) -> float:
    """One epoch, resumed at ``run.batches_done``; OUT/last saved every ``checkpoint_minutes``.

    The epoch's batches depend only on (seed, epoch), and the saved state holds the torch RNG,
    so a run resumed from a mid-epoch checkpoint takes exactly the steps it would have taken.
    Returns the mean of the objective's reported value over the epoch's batches.
    """
    last_save = time.monotonic()
    while run.batches_done < len(batches):
        chunk = batches[run.batches_done:run.batches_done + CHUNK_BATCHES]
        before, started = run.step, time.monotonic()
        # The chunk is logged here, where its place in the epoch is known (train_epoch sees the chunk).
        value, run.step = train_epoch(cfg, model, optimizer, source, examples, chunk, run.step, total_steps,
                                      decoder, objective=objective, log_every=0)
        taken = run.step - before
        if taken:
            run.value_sum += value * taken
            run.batches_done += taken
            if cfg.progress:
                _log_chunk(epoch, run.batches_done, len(batches), _train_key(objective), value,
                           optimizer.param_groups[0]["lr"], taken / max(1e-9, time.monotonic() - started))
        if taken < len(chunk):  # --max-steps reached
            break
        if save and cfg.checkpoint_minutes and time.monotonic() - last_save >= 60 * cfg.checkpoint_minutes \
                and run.batches_done < len(batches):
            _save_mid_epoch(out, model, optimizer, epoch, run)
            log.info("epoch %d: %d/%d batches, %s %.4f so far; saved %s", epoch, run.batches_done, len(batches),
                     _train_key(objective).removeprefix("train_"), run.value_sum / run.batches_done, out / "last")
            last_save = time.monotonic()
    value = run.value_sum / run.batches_done if run.batches_done else float("nan")
    run.batches_done, run.value_sum = 0, 0.0
    return value


def _log_chunk(epoch: int, done: int, of: int, key: str, value: float, lr: float, rate: float) -> None:
    log.info("epoch %d: batch %d/%d, %s %.3f, lr %.2e (%.2f batches/s)", epoch, done, of,
             key.removeprefix("train_"), value, lr, rate)


def _save_mid_epoch(out: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, epoch: int,
                    run: Progress) -> None:
    save_trainer_state(out / "last", model, optimizer, {
        "epoch": epoch - 1, "step": run.step, "best_cider": run.best_cider, "stale": run.stale,
        "history": run.history, "within_epoch": {"batches_done": run.batches_done, "value_sum": run.value_sum},
    })


def _objective(cfg: TrainConfig, model: CaptionModel, train_records: list[ImageRecord],
               world: int) -> tuple[list[Example], Objective | None]:
    """The training examples and objective: reference captions with cross-entropy (None: the loop's
    default) or with a teacher's words mixed in (--distill-from), or with --scst one example per
    image and the self-critical objective."""
    if cfg.scst and cfg.distill_from:
        raise ValueError("--scst and --distill-from are different stages: run them one after the other")
    if cfg.distill_from:
        if world > 1:
            raise ValueError("--distill-from runs in one process")
        if cfg.label_smoothing:
            raise ValueError("--label-smoothing with --distill-from: the teachers' distribution already spreads "
                             "each word's target")
        device = next(model.decoder.parameters()).device
        groups = [(group.decoders, _teacher_features(cfg, group, train_records, device))
                  for group in load_teachers(comma_list(cfg.distill_from), model, device)]
        return (build_examples(train_records, model.vocab, cfg.max_caption_len),
                WordDistillation(groups, cfg.distill_weight, model.vocab.pad_id, cfg.alpha_c))
    if not cfg.scst:
        return build_examples(train_records, model.vocab, cfg.max_caption_len), None
    if cfg.scst_baseline not in BASELINES:
        raise ValueError(f"--scst-baseline must be one of {', '.join(BASELINES)}")
    if cfg.scst_sampling not in SAMPLING:
        raise ValueError(f"--scst-sampling must be one of {', '.join(SAMPLING)}")
    if cfg.scst_samples < 2 and cfg.scst_baseline == "mean":
        raise ValueError("--scst-samples must be at least 2 (each sample's baseline is the others' mean)")
    if world > 1:
        raise ValueError("--scst runs in one process (sampling bypasses DistributedDataParallel)")
    if not cfg.init_from:
        raise ValueError("--scst refines a trained model: give --init-from CHECKPOINT")
    if model.config.fine_tune_blocks > 0:
        raise ValueError("--scst trains the decoder on cached features: use a checkpoint with a frozen encoder")
    cider = reference_cider(train_records)
    # Beam candidates are found with the validation decoding settings: those the model is selected
    # by, and shipped with.
    objective = SelfCritical(cider, model.vocab, cfg.scst_samples, cfg.scst_max_len, cfg.scst_baseline,
                             cfg.scst_sampling, cfg.val_beam_config())
    return image_examples(train_records), objective


def _teacher_features(cfg: TrainConfig, group: TeacherGroup, train_records: list[ImageRecord],
                      device: torch.device) -> FeatureSource | None:
    """The features a group of teachers was trained on, when the student reads others (None: the same)."""
    if group.features_model is None:
        return None
    images = {r.image_id: r.path for r in train_records}
    return feature_source(group.features_model, images, device, None if cfg.raw_images else cfg.cache,
                          cfg.feature_batch_size, cfg.progress)


def _train_key(objective: Objective | None) -> str:
    """The history's name for an epoch's training value: train_loss (cross-entropy) or train_reward."""
    return f"train_{objective.name if objective else 'loss'}"


def _resume(cfg: TrainConfig, out: Path, model: CaptionModel, optimizer: torch.optim.Optimizer) -> Progress:
    """A new run, or with --resume the state OUT/last was saved in (weights and optimizer restored)."""
    if not cfg.resume or not (out / "last").exists():
        if cfg.resume:
            log.info("nothing to resume in %s: starting a new run", out)
        # The architecture trained, which with --init-from is the checkpoint's, not the command line's.
        return Progress({"epochs": [], "config": {**asdict(cfg), "model": model.config.to_json()}})
    state = load_trainer_state(out / "last", model, optimizer)
    run = Progress(state["history"], state["epoch"] + 1, state["step"], state["best_cider"], state["stale"])
    within = state.get("within_epoch")
    if within:
        run.batches_done, run.value_sum = int(within["batches_done"]), float(within["value_sum"])
    log.info("resumed from %s at epoch %d (batch %d), step %d", out / "last", run.epoch, run.batches_done, run.step)
    if run.stale >= cfg.patience:
        log.info("that run had already stopped early (no better validation CIDEr for %d epochs)", run.stale)
        run.epoch = cfg.epochs
    return run


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / world


def _validate_and_save(cfg: TrainConfig, out: Path, model: CaptionModel, optimizer: torch.optim.Optimizer,
                       source: FeatureSource, val_records: list[ImageRecord], run: Progress,
                       record: dict[str, Any]) -> None:
    t1 = time.time()
    result = validate(model, source, val_records, cfg)
    scores = result.scores.values
    record.update({"val": scores, "val_seconds": time.time() - t1})
    improved = scores["CIDEr"] > run.best_cider
    if improved:
        run.best_cider, run.stale = scores["CIDEr"], 0
    else:
        run.stale += 1
    run.history["epochs"].append(record)
    train_key = next(k for k in record if k.startswith("train_") and k != "train_seconds")
    log.info("epoch %d: %s %.4f (%.0fs), val CIDEr %.4f BLEU-4 %.4f%s", record["epoch"],
             train_key.removeprefix("train_"), record[train_key], record["train_seconds"], scores["CIDEr"],
             scores["Bleu_4"], " (best)" if improved else "")
    _save_epoch(out, model, optimizer, cfg, record["epoch"], run, improved, result)


def _finish_distributed(model: CaptionModel, device: torch.device, rank: int, world: int, step: int) -> None:
    _check_replicas(model, device, world)
    log.info("rank %d of %d finished at step %d", rank, world, step)
    # Without an orderly teardown, gloo's threads can abort the process at interpreter exit
    # ("terminate called without an active exception") after all the work is done.
    dist.barrier()
    dist.destroy_process_group()


def _check_replicas(model: CaptionModel, device: torch.device, world: int) -> None:
    """Every rank must end with the same weights (DDP and the encoder all-reduce keep them equal)."""
    params = [*model.decoder.parameters(), *model.encoder.parameters()]
    sums = torch.stack([p.detach().double().sum() for p in params]).to(device)
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        log.info("weights identical on all %d ranks", world)
    else:
        log.error("weights differ between ranks: the checkpoint holds rank 0's")


def _optimizer(cfg: TrainConfig, model: CaptionModel) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [
        {"params": list(model.decoder.parameters()), "lr": cfg.lr, "base_lr": cfg.lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr, "base_lr": cfg.encoder_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_epoch(out: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                epoch: int, run: Progress, improved: bool, result: SplitResult) -> None:
    beam = cfg.val_beam_config()
    model.meta.update({
        "epoch": epoch,
        "metrics": {f"val_{k}": v for k, v in result.scores.values.items()},
        "decoding": {"beam_size": beam.beam_size, "max_len": beam.max_len,
                     "length_penalty": beam.length_penalty, "block_ngram": beam.block_ngram},
    })
    save_trainer_state(out / "last", model, optimizer, {
        "epoch": epoch, "step": run.step, "best_cider": run.best_cider, "stale": run.stale, "history": run.history,
    })
    if improved:
        best = out / "best"
        model.meta["version"] = f"{Path(cfg.out).name}-e{epoch}-{datetime.now(UTC):%Y%m%d%H%M}"
        checkpoint.save(model, best)
        atomic_write_text(out / "best_val_captions.json", json.dumps(result.captions, indent=0))
    atomic_write_text(out / "history.json", json.dumps(run.history, indent=1))
    plot_history(run.history, out / "curves.png")


def plot_history(history: dict[str, Any], path: Path) -> None:
    """Training loss and validation CIDEr/BLEU-4 per epoch, written next to the checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] + 1 for e in history["epochs"]]
    if not epochs:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    reward = "train_reward" in history["epochs"][0]
    left.plot(epochs, [e["train_reward" if reward else "train_loss"] for e in history["epochs"]], marker="o")
    left.set(title="training reward (CIDEr-D of samples)" if reward else "training cross-entropy", xlabel="epoch")
    for key in ("CIDEr", "Bleu_4"):
        right.plot(epochs, [e["val"][key] for e in history["epochs"]], marker="o", label=key)
    right.set(title="validation (beam search)", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
