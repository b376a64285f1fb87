"""Training the Show-Attend-Tell captioner: teacher forcing, beam-search model selection, resume.

Plain and linear on purpose (in the spirit of nanoGPT's train.py): prepare data, then loop over
epochs of length-bucketed batches, validate with real beam search, checkpoint, repeat.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from captioner import checkpoint
from captioner.beam import BeamConfig, SpecialIds, beam_search
from captioner.checkpoint import CaptionModel
from captioner.inference import preprocess, resolve_device
from captioner.model import ModelConfig, attention_regularization
from captioner.vocab import Vocabulary

from . import metrics
from .data import CaptionDataset, ImageRecord, load_dataset
from .features import FeatureCache, _read, check_images_exist, fill_cache, open_cache
from .state import load_trainer_state, save_trainer_state

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    data: str = "flickr:../shared/data/flickr8k"
    out: str = "runs/default"
    train_split: str = "train"
    val_split: str = "val"
    cache: str = "cache/features"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 4e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    alpha_c: float = 1.0
    label_smoothing: float = 0.0
    min_freq: int = 5
    max_caption_len: int = 40
    patience: int = 4
    val_beam: int = 3
    val_max_len: int = 20
    val_length_penalty: float = 0.0
    val_limit: int = 0
    seed: int = 1234
    device: str = "auto"
    threads: int = 0
    max_steps: int = 0
    feature_batch_size: int = 4
    raw_images: bool = False
    encoder_lr: float = 1e-5
    init_from: str = ""
    resume: bool = False
    progress: bool = True
    model: dict[str, Any] = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_json({**ModelConfig().to_json(), **self.model})


@dataclass
class Example:
    image_id: str
    tokens: list[int]


# ----------------------------------------------------------------------------- data preparation


def build_examples(records: Sequence[ImageRecord], vocab: Vocabulary, max_len: int) -> list[Example]:
    out = []
    for record in records:
        for caption in record.captions:
            ids = vocab.encode(caption)
            if len(ids) <= 2:  # no words at all
                continue
            if len(ids) > max_len + 2:  # <start> + max_len words + <end>
                ids = [*ids[: max_len + 1], vocab.end_id]
            out.append(Example(record.image_id, ids))
    return out


def bucketed_batches(examples: Sequence[Example], batch_size: int,
                     rng: np.random.Generator) -> list[list[int]]:
    """Shuffled batches of similar-length captions: little padding, so few wasted LSTM steps."""
    order = rng.permutation(len(examples))
    pool = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool].tolist(), key=lambda i: len(examples[i].tokens))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def pad(sequences: Sequence[list[int]], pad_id: int) -> Tensor:
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.tensor(s)
    return out


class FeatureSource:
    """Encoder features for a list of images: from the cache or from raw pixels.

    Cached features are held in RAM when they fit (each image read once per run, shared by its
    captions); otherwise each batch reads its images' rows from the memory-mapped cache, whose
    pages the OS shares between processes (``in_memory=None`` chooses).
    """

    def __init__(self, model: CaptionModel, records: dict[str, Path], cache: FeatureCache | None,
                 device: torch.device, in_memory: bool | None = None) -> None:
        self.model, self.records, self.device = model, records, device
        self.cache = cache
        self.row_of: dict[str, int] = {}
        self.table: Tensor | None = None
        if cache is not None:
            if in_memory is None:
                in_memory = _fits_in_memory(len(records) * cache.regions * cache.dim * 2)
            if in_memory:
                ids = sorted(records)
                self.table = torch.from_numpy(cache.get([records[i] for i in ids]))
                self.row_of = {image_id: i for i, image_id in enumerate(ids)}
            else:
                cache.get(list(records.values())[:1])  # fails now, not mid-epoch, if the cache is incomplete
                log.info("features read per batch from %s (too large to hold in memory)", cache.directory)

    def __call__(self, image_ids: Sequence[str], grad: bool = False) -> Tensor:
        if self.table is not None:
            idx = torch.tensor([self.row_of[i] for i in image_ids])
            return self.table.index_select(0, idx).to(self.device).float()
        unique = list(dict.fromkeys(image_ids))
        if self.cache is not None:
            rows = self.cache.get([self.records[i] for i in unique])
            feats = torch.from_numpy(rows).to(self.device).float()
        else:
            pixels = torch.stack([preprocess(self.model, _read(self.records[i])) for i in unique])
            pixels = pixels.to(self.device)
            with torch.set_grad_enabled(grad):
                feats = self.model.encoder(pixels)
        if len(unique) == len(image_ids):
            return feats
        position = {image_id: n for n, image_id in enumerate(unique)}
        return feats.index_select(0, torch.tensor([position[i] for i in image_ids], device=self.device))


def _fits_in_memory(nbytes: int) -> bool:
    """Whether every process of the run can hold ``nbytes`` of features with room to spare."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return True
    world = dist.get_world_size() if dist.is_initialized() else 1
    return nbytes * world <= ram // 3


# ----------------------------------------------------------------------------- loss and schedule


def caption_loss(decoder: nn.Module, features: Tensor, tokens: Tensor, pad_id: int, alpha_c: float,
                 label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(total loss, cross-entropy) for a padded batch of token sequences."""
    logits, alphas = decoder(features, tokens)
    targets = tokens[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=pad_id,
                         label_smoothing=label_smoothing)
    mask = (targets != pad_id).float()
    reg = attention_regularization(alphas, mask) if alpha_c else torch.zeros((), device=features.device)
    return ce + alpha_c * reg, ce


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def generate(model: CaptionModel, source: FeatureSource, image_ids: Sequence[str], beam: BeamConfig,
             batch_size: int = 100) -> dict[str, str]:
    model.decoder.eval()
    model.encoder.eval()
    vocab = model.vocab
    special = SpecialIds(vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id)
    out: dict[str, str] = {}
    for start in range(0, len(image_ids), batch_size):
        chunk = list(image_ids[start:start + batch_size])
        hyps = beam_search(model.decoder, source(chunk), beam, special)
        out.update({i: " ".join(vocab.words[t] for t in h.tokens) for i, h in zip(chunk, hyps, strict=True)})
    return out


def validate(model: CaptionModel, source: FeatureSource, records: Sequence[ImageRecord], beam: BeamConfig,
             with_meteor: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    hyps = generate(model, source, [r.image_id for r in records], beam)
    refs = {r.image_id: list(r.captions) for r in records}
    wanted = [k for k in metrics.METRIC_KEYS if with_meteor or k != "METEOR"]
    return metrics.score(refs, hyps, wanted).values, hyps


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


def fit(cfg: TrainConfig) -> dict[str, Any]:
    """Train and return the history; the best model is written to OUT/best."""
    rank, world = _setup_distributed(cfg.device)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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
    model.meta.update({"trained_on": dataset.name, "train_split": cfg.train_split,
                       "parent": cfg.init_from or None})
    model.to(device)
    if model.config.fine_tune_blocks > 0:
        cfg.raw_images = True
    images = {r.image_id: r.path for r in [*train_records, *val_records]}
    source = _feature_source(cfg, model, images, device, rank)

    examples = build_examples(train_records, model.vocab, cfg.max_caption_len)
    log.info("train: %d images, %d captions; val: %d images; vocabulary %d words",
             len(train_records), len(examples), len(val_records), len(model.vocab))

    decoder: nn.Module = model.decoder
    if world > 1:
        # DDP averages the decoder's gradients; unfrozen encoder blocks are averaged in _train_epoch.
        decoder = nn.parallel.DistributedDataParallel(
            model.decoder, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size) // world  # = len(bucketed_batches) // world
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    history: dict[str, Any] = {"epochs": [], "config": asdict(cfg)}
    start_epoch, step, best_cider, stale = 0, 0, -1.0, 0
    if cfg.resume and (out / "last").exists():
        state = load_trainer_state(out / "last", model, optimizer)
        start_epoch, step = state["epoch"] + 1, state["step"]
        best_cider, stale, history = state["best_cider"], state["stale"], state["history"]
        log.info("resumed from %s at epoch %d, step %d", out / "last", start_epoch, step)
        if stale >= cfg.patience:
            log.info("that run had already stopped early (no better validation CIDEr for %d epochs)", stale)
            start_epoch = cfg.epochs
    elif cfg.resume:
        log.info("nothing to resume in %s: starting a new run", out)

    scaler_ctx = _autocast(device)
    beam = BeamConfig(cfg.val_beam, cfg.val_max_len, cfg.val_length_penalty)
    for epoch in range(start_epoch, cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch])
        batches = bucketed_batches(examples, cfg.batch_size, rng)
        if world > 1:
            # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
            batches = batches[: len(batches) - len(batches) % world][rank::world]
            # Different dropout masks per rank, reproducible per epoch (so --resume stays exact).
            torch.manual_seed(cfg.seed + 1000 * epoch + rank)
        t0 = time.time()
        train_loss, step = _train_epoch(cfg, model, decoder, optimizer, source, examples, batches, step,
                                        total_steps, scaler_ctx, epoch)
        train_time = time.time() - t0
        if world > 1:
            mean_loss = torch.tensor([train_loss], dtype=torch.float64, device=device)
            dist.all_reduce(mean_loss)
            train_loss = float(mean_loss.item()) / world
        record: dict[str, Any] = {"epoch": epoch, "step": step, "train_loss": train_loss,
                                  "train_seconds": train_time}
        if rank == 0:
            t1 = time.time()
            scores, hyps = validate(model, source, val_records, beam)
            record.update({"val": scores, "val_seconds": time.time() - t1})
            improved = scores["CIDEr"] > best_cider
            if improved:
                best_cider, stale = scores["CIDEr"], 0
            else:
                stale += 1
            history["epochs"].append(record)
            log.info("epoch %d: loss %.4f (%.0fs), val CIDEr %.4f BLEU-4 %.4f%s", epoch, train_loss,
                     train_time, scores["CIDEr"], scores["Bleu_4"], " (best)" if improved else "")
            _save_epoch(out, model, optimizer, cfg, epoch, step, best_cider, stale, history, improved, scores,
                        beam, hyps)
        stop = torch.tensor([stale >= cfg.patience or bool(cfg.max_steps and step >= cfg.max_steps)],
                            dtype=torch.int, device=device)  # NCCL only moves CUDA tensors
        if world > 1:
            dist.broadcast(stop, 0)
        if bool(stop.item()):
            log.info("stopping after epoch %d", epoch)
            break
    if world > 1:
        _check_replicas(model, device, world)
        log.info("rank %d of %d finished at step %d", rank, world, step)
        # Without an orderly teardown, gloo's threads can abort the process at interpreter exit
        # ("terminate called without an active exception") after all the work is done.
        dist.barrier()
        dist.destroy_process_group()
    return history


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


def _feature_source(cfg: TrainConfig, model: CaptionModel, images: dict[str, Path], device: torch.device,
                    rank: int) -> FeatureSource:
    if cfg.raw_images:
        check_images_exist(list(images.values()))
        return FeatureSource(model, images, None, device)
    cache = open_cache(model, Path(cfg.cache))
    if rank == 0:
        fill_cache(cache, model, list(images.values()), device, cfg.feature_batch_size, cfg.progress)
    if dist.is_initialized():
        dist.barrier()
        cache = open_cache(model, Path(cfg.cache))
    return FeatureSource(model, images, cache, device)


def _optimizer(cfg: TrainConfig, model: CaptionModel) -> torch.optim.Optimizer:
    groups: list[dict[str, Any]] = [
        {"params": list(model.decoder.parameters()), "lr": cfg.lr, "base_lr": cfg.lr}]
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": cfg.encoder_lr, "base_lr": cfg.encoder_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def _train_epoch(cfg: TrainConfig, model: CaptionModel, decoder: nn.Module, optimizer: torch.optim.Optimizer,
                 source: FeatureSource, examples: Sequence[Example], batches: list[list[int]], step: int,
                 total_steps: int, autocast: Any, epoch: int) -> tuple[float, int]:
    model.decoder.train()
    # The encoder stays in eval mode even when its top blocks are fine-tuned: batch-norm keeps its
    # ImageNet statistics (small, caption-ordered batches would only make them noisy).
    model.encoder.eval()
    pad_id = model.vocab.pad_id
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    world = dist.get_world_size() if dist.is_initialized() else 1
    losses: list[float] = []
    t0 = time.time()
    for n, batch in enumerate(batches):
        if cfg.max_steps and step >= cfg.max_steps:
            break
        factor = lr_at(step, total_steps, cfg) / cfg.lr
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        ids = [examples[i].image_id for i in batch]
        tokens = pad([examples[i].tokens for i in batch], pad_id).to(source.device)
        with autocast():
            features = source(ids, grad=model.encoder.trainable_blocks > 0)
            loss, ce = caption_loss(decoder, features, tokens, pad_id, cfg.alpha_c, cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1 and encoder_params:
            _average_gradients(encoder_params, world)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        losses.append(ce.detach().item())
        if cfg.progress and n % 50 == 0:
            rate = (n + 1) / max(1e-9, time.time() - t0)
            log.info("epoch %d step %d/%d ce %.3f lr %.2e (%.1f batches/s)", epoch, n, len(batches),
                     float(np.mean(losses[-50:])), optimizer.param_groups[0]["lr"], rate)
    return float(np.mean(losses)) if losses else float("nan"), step


def _average_gradients(params: Sequence[nn.Parameter], world: int) -> None:
    """Average gradients across ranks (for parameters outside the DDP-wrapped decoder)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def _save_epoch(out: Path, model: CaptionModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                epoch: int, step: int, best_cider: float, stale: int, history: dict[str, Any], improved: bool,
                scores: dict[str, float], beam: BeamConfig, hyps: dict[str, str]) -> None:
    model.meta.update({
        "epoch": epoch,
        "metrics": {f"val_{k}": v for k, v in scores.items()},
        "decoding": {"beam_size": beam.beam_size, "max_len": beam.max_len,
                     "length_penalty": beam.length_penalty},
    })
    save_trainer_state(out / "last", model, optimizer, {
        "epoch": epoch, "step": step, "best_cider": best_cider, "stale": stale, "history": history,
    })
    if improved:
        best = out / "best"
        model.meta["version"] = f"{Path(cfg.out).name}-e{epoch}-{datetime.now(UTC):%Y%m%d%H%M}"
        checkpoint.save(model, best)
        (out / "best_val_captions.json").write_text(json.dumps(hyps, indent=0))
    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot_history(history, out / "curves.png")


def plot_history(history: dict[str, Any], path: Path) -> None:
    """Training loss and validation CIDEr/BLEU-4 per epoch, written next to the checkpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [e["epoch"] + 1 for e in history["epochs"]]
    if not epochs:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [e["train_loss"] for e in history["epochs"]], marker="o")
    left.set(title="training cross-entropy", xlabel="epoch")
    for key in ("CIDEr", "Bleu_4"):
        right.plot(epochs, [e["val"][key] for e in history["epochs"]], marker="o", label=key)
    right.set(title="validation (beam search)", xlabel="epoch")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def config_from_args(values: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def copy_best(out: Path, target: Path) -> None:
    shutil.copytree(out / "best", target, dirs_exist_ok=True)
