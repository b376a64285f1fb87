"""The captioner facade: image bytes or pictures in, captions with attention maps out."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import checkpoint
from .beam import BeamConfig, Hypothesis, SpecialIds, beam_search
from .checkpoint import CaptionModel
from .images import ImageLimits, load_image, to_model_input

log = logging.getLogger(__name__)


@dataclass
class Caption:
    text: str
    words: list[str]
    score: float  # length-normalised log-probability (what beam search ranked by)
    log_prob: float
    finished: bool
    attention: np.ndarray | None = None  # (len(words), grid, grid), each map sums to 1


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA device is available; use --device cpu")
    return resolved


def preprocess(model: CaptionModel, image: Image.Image) -> Tensor:
    """The one preprocessing function shared by training, evaluation and serving."""
    return to_model_input(image, model.config.image_size, model.encoder.mean, model.encoder.std)


class Captioner:
    """A loaded model on a device, ready to caption batches of images."""

    def __init__(self, model: CaptionModel, device: str | torch.device = "auto",
                 beam: BeamConfig | None = None, encoder_batch_size: int | None = None) -> None:
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.model.encoder.eval()
        self.model.decoder.eval()
        self.beam = beam or default_beam_config(model)
        vocab = model.vocab
        self.special = SpecialIds(vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id)
        # On CPU this encoder runs fastest at small batches (cache-bound); on GPU, big ones.
        self.encoder_batch_size = encoder_batch_size or (64 if self.device.type == "cuda" else 4)
        self._encoder: Callable[[Tensor], Tensor] = self.model.encoder

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "auto",
             beam: BeamConfig | None = None) -> Captioner:
        target = resolve_device(device)
        return cls(checkpoint.load(path, device=target), target, beam)

    @property
    def version(self) -> str:
        return self.model.version

    def prepare(self, data: bytes, limits: ImageLimits | None = None) -> Tensor:
        """Untrusted bytes -> model input; raises captioner.images.ImageError subclasses."""
        return preprocess(self.model, load_image(data, limits or ImageLimits()))

    def prepare_image(self, image: Image.Image) -> Tensor:
        return preprocess(self.model, image)

    @torch.inference_mode()
    def calibrate_encoder_batch_size(self, candidates: Sequence[int] = (1, 2, 4, 8), images: int = 8) -> int:
        """Time the encoder at each chunk size and keep the fastest per image.

        On CPU the best size depends on cache sizes and thread count (EfficientNet-Lite0's wide
        activations fall out of cache at large batches), so it is measured, not guessed.
        """
        if self.device.type != "cpu":
            return self.encoder_batch_size
        size = self.model.config.image_size
        dummy = torch.rand(images, 3, size, size)
        best, best_time = self.encoder_batch_size, float("inf")
        for chunk in candidates:
            self.encoder_batch_size = chunk
            self.encode(dummy[:chunk])  # warm-up: first calls pay oneDNN's kernel selection
            start = time.perf_counter()
            self.encode(dummy)
            elapsed = time.perf_counter() - start
            if elapsed < best_time:
                best, best_time = chunk, elapsed
        self.encoder_batch_size = best
        return best

    def freeze_encoder(self) -> bool:
        """On CPU, serve the encoder TorchScript-frozen with batch norm folded into the convolutions.

        bench/decode.py on the 2-core CPU: 79 vs 60 images/s at batch 4 over the eager
        channels-last encoder. Falls back to the eager encoder if tracing fails.
        """
        if self.device.type != "cpu" or self.model.encoder.trainable_blocks:
            return False
        size = self.model.config.image_size
        example = torch.zeros(2, 3, size, size).contiguous(memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                traced = torch.jit.trace(self.model.encoder.eval(), example)
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
                eager, fast = self.model.encoder(example), frozen(example)
            if not torch.allclose(eager, fast, atol=1e-3, rtol=1e-3):
                raise RuntimeError("frozen encoder disagrees with the eager one")
        except Exception as err:  # any tracing problem: keep serving with the eager encoder
            log.warning("encoder not frozen (%s); using the eager encoder", err)
            return False
        self._encoder = frozen
        return True

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        chunks = [self._encoder(chunk.to(self.device))
                  for chunk in images.split(self.encoder_batch_size)]
        return torch.cat(chunks)

    @torch.inference_mode()
    def decode(self, features: Tensor, beam: BeamConfig | None = None,
               attention: bool = True) -> list[Caption]:
        hyps = beam_search(self.model.decoder, features.to(self.device).float(), beam or self.beam, self.special)
        return [self._to_caption(h, features.size(1), attention) for h in hyps]

    def caption_tensors(self, images: Tensor, beam: BeamConfig | None = None,
                        attention: bool = True) -> list[Caption]:
        return self.decode(self.encode(images), beam, attention)

    def caption_images(self, images: Sequence[Image.Image], beam: BeamConfig | None = None,
                       attention: bool = True) -> list[Caption]:
        batch = torch.stack([self.prepare_image(im) for im in images])
        return self.caption_tensors(batch, beam, attention)

    def caption_bytes(self, data: bytes, beam: BeamConfig | None = None, attention: bool = True) -> Caption:
        return self.caption_tensors(self.prepare(data).unsqueeze(0), beam, attention)[0]

    def _to_caption(self, hyp: Hypothesis, regions: int, attention: bool) -> Caption:
        words = [self.model.vocab.words[i] for i in hyp.tokens]
        maps = None
        if attention:
            side = math.isqrt(regions)
            if side * side == regions:
                maps = hyp.attention.float().numpy().reshape(len(words), side, side)
            else:
                maps = hyp.attention.float().numpy().reshape(len(words), 1, regions)
        return Caption(" ".join(words), words, hyp.score, hyp.log_prob, hyp.finished, maps)


def default_beam_config(model: CaptionModel) -> BeamConfig:
    """Decoding settings chosen on validation data at training time, if the checkpoint records them."""
    return beam_config_from_meta(model.meta)


def beam_config_from_meta(meta: dict[str, Any]) -> BeamConfig:
    stored = meta.get("decoding")
    config = BeamConfig()
    if isinstance(stored, dict):
        allowed = {k: v for k, v in stored.items() if k in BeamConfig.__dataclass_fields__}
        config = replace(config, **allowed)
    return config
