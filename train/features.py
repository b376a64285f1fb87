"""A float16 memory-mapped cache of frozen-encoder features, one row per image.

The cache lives in a folder named by a key over everything that changes the features (encoder,
its weights, image size, normalisation, preprocessing version), so a change invalidates it by
construction. Rows are filled in chunks and a ``done`` mask is flushed after each chunk, so an
interrupted extraction resumes where it stopped.

:class:`FeatureSource` hands training and scoring the features of a batch of images by id, from
the cache or (``--raw-images``, ``--no-cache``) computed from the pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from captioner.checkpoint import CaptionModel
from captioner.images import load_image
from captioner.inference import preprocess
from common.atomic import atomic_write, atomic_write_text

log = logging.getLogger(__name__)

# Bump when captioner.images / preprocess change in a way that alters pixels.
PREPROCESS_VERSION = 1


def encoder_fingerprint(model: CaptionModel) -> str:
    """A hash of what the cache holds: the encoder's name, config, normalisation and actual weights.

    With fine-tuned top blocks the cache holds the frozen part's maps, so only the frozen weights
    and where the encoder is cut count: the maps stay valid while the top blocks train.
    """
    h = hashlib.sha256()
    info = {
        "encoder": model.config.encoder,
        "image_size": model.config.image_size,
        "mean": model.encoder.mean,
        "std": model.encoder.std,
        "preprocess": PREPROCESS_VERSION,
    }
    weights = model.encoder.backbone.state_dict()
    if model.encoder.trainable_blocks:
        info["frozen_stages"] = model.encoder.frozen_stages
        trained = tuple(f"stages.{n}." for n in range(model.encoder.frozen_stages, len(model.encoder.backbone.stages)))
        weights = {k: v for k, v in weights.items() if not k.startswith(trained)}
    h.update(json.dumps(info, sort_keys=True).encode())
    # Every byte of every weight, in a fixed layout: a float sum would depend on the thread count.
    for name, tensor in sorted(weights.items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """Append-only store of (L, C) float16 feature maps keyed by image file path.

    Features live in shards (``shard-N.npy``, memory-mapped); ``index.json`` maps each image
    path to (shard, row). Asking for new images adds a shard, so one cache per encoder serves
    every dataset and subset without recomputing what it already holds.
    """

    def __init__(self, directory: Path, regions: int, dim: int, grid: tuple[int, int] | None = None) -> None:
        self.directory = directory
        self.regions, self.dim = regions, dim
        # Height and width of the maps whose rows are stored, when known (``open_cache`` knows them).
        self.grid = grid
        directory.mkdir(parents=True, exist_ok=True)
        index_file = directory / "index.json"
        stored = json.loads(index_file.read_text()) if index_file.exists() else {}
        self.index: dict[str, tuple[int, int]] = {k: (v[0], v[1]) for k, v in stored.items()}
        self.shard_sizes = _shard_sizes(self.index)
        self._shards: dict[int, np.ndarray] = {}
        self._done: dict[int, np.ndarray] = {}

    @staticmethod
    def key(path: Path) -> str:
        return str(path.resolve())

    def _shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            file = self.directory / f"shard-{shard}.npy"
            if file.exists():
                self._shards[shard] = np.load(file, mmap_mode="r+")
            else:
                shape = (self.shard_sizes[shard], self.regions, self.dim)
                self._shards[shard] = np.lib.format.open_memmap(file, "w+", np.float16, shape)
            if self._shards[shard].shape[1:] != (self.regions, self.dim):
                raise RuntimeError(f"feature cache {self.directory} holds {self._shards[shard].shape[1:]} "
                                   f"features, expected {(self.regions, self.dim)}; delete it to rebuild")
        return self._shards[shard]

    def done_mask(self, shard: int) -> np.ndarray:
        if shard not in self._done:
            file = self.directory / f"done-{shard}.npy"
            size = self.shard_sizes[shard]
            self._done[shard] = np.load(file) if file.exists() else np.zeros(size, dtype=bool)
        return self._done[shard]

    def add(self, paths: Sequence[Path]) -> None:
        """Reserve rows for images the cache has not seen."""
        new = [k for k in dict.fromkeys(self.key(p) for p in paths) if k not in self.index]
        if not new:
            return
        shard = max(self.shard_sizes, default=-1) + 1
        self.shard_sizes[shard] = len(new)
        self.index.update({k: (shard, row) for row, k in enumerate(new)})
        self._shard(shard)
        self._flush(shard)
        atomic_write_text(self.directory / "index.json", json.dumps(self.index))

    def missing(self, paths: Sequence[Path]) -> list[Path]:
        out = []
        for p in paths:
            shard, row = self.index[self.key(p)]
            if not self.done_mask(shard)[row]:
                out.append(p)
        return out

    def put(self, paths: Sequence[Path], features: np.ndarray) -> None:
        for p, f in zip(paths, features, strict=True):
            shard, row = self.index[self.key(p)]
            self._shard(shard)[row] = f
            self.done_mask(shard)[row] = True

    def get(self, paths: Sequence[Path]) -> np.ndarray:
        """Stacked features (N, L, C) in float16; every path must be filled."""
        out = np.empty((len(paths), self.regions, self.dim), dtype=np.float16)
        for i, p in enumerate(paths):
            shard, row = self.index[self.key(p)]
            if not self.done_mask(shard)[row]:
                raise RuntimeError(f"no cached features for {p}")
            out[i] = self._shard(shard)[row]
        return out

    def flush(self) -> None:
        for shard in list(self._shards):
            self._flush(shard)

    def _flush(self, shard: int) -> None:
        # Features reach the disk before the mask that says they are there.
        features = self._shard(shard)
        if isinstance(features, np.memmap):
            features.flush()
        atomic_write(self.directory / f"done-{shard}.npy", lambda tmp: _save_array(tmp, self.done_mask(shard)))


def _save_array(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:  # a handle: np.save would append ".npy" to the temporary name
        np.save(handle, array)


def _shard_sizes(index: dict[str, tuple[int, int]]) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for shard, row in index.values():
        sizes[shard] = max(sizes.get(shard, 0), row + 1)
    return sizes


def drop_cached_under(cache_root: Path, folder: Path) -> int:
    """Remove from every cache under ``cache_root`` the features of images under ``folder``; returns how many.

    For features earlier versions cached of people's photos (the bot's photo folder): their rows are
    overwritten with zeros (a shard no other image uses is deleted) before the index forgets them, so
    a crash in between leaves rows marked not done, which the cache would compute again, never
    features that outlive the photo.
    """
    prefix = str(folder.resolve()) + os.sep
    dropped = 0
    for index_file in sorted(cache_root.glob("*/index.json")):
        index = {k: (v[0], v[1]) for k, v in json.loads(index_file.read_text()).items()}
        gone = {k: v for k, v in index.items() if k.startswith(prefix)}
        if not gone:
            continue
        kept = {k: v for k, v in index.items() if k not in gone}
        used = {shard for shard, _ in kept.values()}
        rows_of: dict[int, list[int]] = {}
        for shard, row in gone.values():
            rows_of.setdefault(shard, []).append(row)
        for shard, rows in rows_of.items():
            _erase_rows(index_file.parent, shard, rows, whole=shard not in used)
        atomic_write_text(index_file, json.dumps(kept))
        dropped += len(gone)
        log.info("dropped %d cached feature rows of images under %s from %s", len(gone), folder, index_file.parent)
    return dropped


def _erase_rows(directory: Path, shard: int, rows: list[int], whole: bool) -> None:
    features_file, done_file = directory / f"shard-{shard}.npy", directory / f"done-{shard}.npy"
    if whole:
        features_file.unlink(missing_ok=True)
        done_file.unlink(missing_ok=True)
        return
    if features_file.exists():
        features = np.load(features_file, mmap_mode="r+")
        features[rows] = 0
        features.flush()
        del features
    if done_file.exists():
        done = np.load(done_file)
        done[rows] = False
        atomic_write(done_file, lambda tmp: _save_array(tmp, done))


def open_cache(model: CaptionModel, cache_root: Path) -> FeatureCache:
    """The cache of what ``model``'s encoder computes once per image: its features, or with fine-tuned
    top blocks the frozen part's maps (a folder of their own, named after the cut)."""
    grid, regions, dim = _cached_shape(model)
    cut = f"-stages{model.encoder.frozen_stages}" if model.encoder.trainable_blocks else ""
    return FeatureCache(cache_root / f"{model.config.encoder}{cut}-{encoder_fingerprint(model)}", regions, dim, grid)


def _cached_shape(model: CaptionModel) -> tuple[tuple[int, int], int, int]:
    """(map height and width, regions, channels) of the cached rows, probed where the encoder is."""
    encoder = model.encoder
    device = next(encoder.parameters()).device
    was_training = encoder.training
    try:
        with torch.no_grad():
            size = model.config.image_size
            maps = encoder.eval().frozen_part(torch.zeros(1, 3, size, size, device=device))
            rows = cached_rows(model, maps)
    finally:
        encoder.train(was_training)
    return (int(maps.shape[2]), int(maps.shape[3])), int(rows.shape[1]), int(rows.shape[2])


def cached_rows(model: CaptionModel, maps: Tensor) -> Tensor:
    """What the cache stores of :meth:`Encoder.frozen_part`'s maps: the features themselves for a
    frozen encoder, else the maps as (B, H*W, C) rows."""
    if model.encoder.trainable_blocks:
        return maps.flatten(2).transpose(1, 2)
    return model.encoder.trainable_part(maps)


@torch.inference_mode()
def fill_cache(cache: FeatureCache, model: CaptionModel, paths: Sequence[Path], device: torch.device,
               batch_size: int = 4, progress: bool = True) -> None:
    """Compute features for every image not yet cached; resumable after an interruption."""
    cache.add(paths)
    todo = cache.missing(paths)
    if not todo:
        return
    check_images_exist(todo)
    log.info("extracting features for %d images into %s", len(todo), cache.directory)
    model.encoder.eval().to(device)
    bar = tqdm(total=len(todo), desc="features", unit="img", disable=not progress, mininterval=10)
    try:
        for n, start in enumerate(range(0, len(todo), batch_size)):
            chunk = todo[start:start + batch_size]
            batch = torch.stack([preprocess(model, _read(p)) for p in chunk]).to(device)
            rows = cached_rows(model, model.encoder.frozen_part(batch))
            cache.put(chunk, rows.to("cpu", torch.float16).numpy())
            if n % 100 == 0:
                cache.flush()
            bar.update(len(chunk))
    finally:
        # Also on Ctrl-C or an unreadable image: what was computed is kept (a kill -9 loses at most
        # the rows since the last flush, which the next run computes again).
        cache.flush()
        bar.close()


def check_images_exist(paths: Sequence[Path]) -> None:
    """Fail before a long run starts, not hours into it, when images are missing."""
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{len(absent)} of {len(paths)} images not found, for example {absent[0]} "
                                "(check the dataset's image folder: FORMAT:PATH@IMAGE_ROOT)")


def _read(path: Path) -> Image.Image:
    return load_image(path.read_bytes())


class FeatureSource:
    """Encoder features for a list of images: from the cache or from raw pixels.

    Cached features are held in RAM when they fit (each image read once per run, shared by its
    captions); otherwise each batch reads its images' rows from the memory-mapped cache, whose
    pages the OS shares between processes (``in_memory=None`` chooses). With fine-tuned top blocks
    the cache holds the frozen part's maps and the top blocks run at each call.
    """

    def __init__(self, model: CaptionModel, records: dict[str, Path], cache: FeatureCache | None,
                 device: torch.device, in_memory: bool | None = None) -> None:
        self.model, self.records, self.device = model, records, device
        self.cache = cache
        # Rows held or cached for a fine-tuned encoder are its frozen part's maps, of this height and width.
        self.grid = self._map_grid(model, cache) if model.encoder.trainable_blocks else None
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

    @staticmethod
    def _map_grid(model: CaptionModel, cache: FeatureCache | None) -> tuple[int, int]:
        """The frozen part's map size: the cache's when it knows it, which spares a second probe."""
        if cache is not None and cache.grid is not None:
            return cache.grid
        return _cached_shape(model)[0]

    @torch.inference_mode()
    def add_in_memory(self, images: dict[str, Path], batch_size: int = 16) -> None:
        """Encode ``images`` now and hold their features in memory for this source's life only.

        For images whose features must not outlive the run (people's photos): nothing is written
        to disk. Ids already served are not encoded again.
        """
        todo = [image_id for image_id in images if image_id not in self.row_of]
        if not todo:
            return
        check_images_exist([images[i] for i in todo])
        self.model.encoder.eval().to(self.device)
        parts = []
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            pixels = torch.stack([preprocess(self.model, _read(images[i])) for i in chunk]).to(self.device)
            maps = self.model.encoder.frozen_part(pixels)
            parts.append(cached_rows(self.model, maps).to("cpu", torch.float16))
        rows = torch.cat(parts)
        first = 0 if self.table is None else len(self.table)
        self.table = rows if self.table is None else torch.cat([self.table, rows])
        self.row_of.update({image_id: first + n for n, image_id in enumerate(todo)})

    def __call__(self, image_ids: Sequence[str], grad: bool = False) -> Tensor:
        held = [i in self.row_of for i in image_ids]
        if all(held):
            return self._held(image_ids, grad)
        if not any(held):
            return self._computed(image_ids, grad)
        # A batch mixing images held in memory and others: fetch each part, put rows back in order.
        mine = [n for n, h in enumerate(held) if h]
        others = [n for n, h in enumerate(held) if not h]
        held_part = self._held([image_ids[n] for n in mine], grad)
        other_part = self._computed([image_ids[n] for n in others], grad)
        out = other_part.new_empty((len(image_ids), *other_part.shape[1:]))
        out[torch.tensor(mine, device=out.device)] = held_part.to(out.dtype)
        out[torch.tensor(others, device=out.device)] = other_part
        return out

    def _held(self, image_ids: Sequence[str], grad: bool) -> Tensor:
        if self.table is None:
            raise RuntimeError("no features are held in memory")
        idx = torch.tensor([self.row_of[i] for i in image_ids])
        return self._features(self.table.index_select(0, idx).to(self.device).float(), grad)

    def _computed(self, image_ids: Sequence[str], grad: bool) -> Tensor:
        unique = list(dict.fromkeys(image_ids))
        if self.cache is not None:
            rows = self.cache.get([self.records[i] for i in unique])
            feats = self._features(torch.from_numpy(rows).to(self.device).float(), grad)
        else:
            pixels = torch.stack([preprocess(self.model, _read(self.records[i])) for i in unique])
            pixels = pixels.to(self.device)
            with torch.set_grad_enabled(grad):
                feats = self.model.encoder(pixels)
        if len(unique) == len(image_ids):
            return feats
        position = {image_id: n for n, image_id in enumerate(unique)}
        return feats.index_select(0, torch.tensor([position[i] for i in image_ids], device=self.device))


    def _features(self, rows: Tensor, grad: bool) -> Tensor:
        """Stored rows (B, L, C) as the decoder's features: run through the fine-tuned top blocks
        when the rows are the frozen part's maps."""
        if self.grid is None:
            return rows
        maps = rows.transpose(1, 2).reshape(rows.size(0), rows.size(2), *self.grid)
        with torch.set_grad_enabled(grad):
            return self.model.encoder.trainable_part(maps)


def _fits_in_memory(nbytes: int) -> bool:
    """Whether every process of the run can hold ``nbytes`` of features with room to spare."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return True
    world = dist.get_world_size() if dist.is_initialized() else 1
    return nbytes * world <= ram // 3


def feature_source(model: CaptionModel, images: dict[str, Path], device: torch.device, cache_root: str | None,
                   batch_size: int = 4, progress: bool = False, fill: bool = True) -> FeatureSource:
    """Features of ``images`` from the cache under ``cache_root`` (filled first), or from pixels without one.

    Under torchrun only rank 0 fills the cache (``fill``); the others open it after a barrier.
    """
    if not cache_root:
        check_images_exist(list(images.values()))
        return FeatureSource(model, images, None, device)
    cache = open_cache(model, Path(cache_root))
    if fill:
        fill_cache(cache, model, list(images.values()), device, batch_size, progress)
    if dist.is_initialized():
        dist.barrier()
        cache = open_cache(model, Path(cache_root))
    return FeatureSource(model, images, cache, device)
