"""The captioner facade: image bytes or pictures in, captions with attention maps out."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import checkpoint
from .beam import BeamConfig, Hypothesis, SpecialIds, beam_search
from .checkpoint import CaptionModel
from .confidence import ConfidenceRule, classifier_guesses
from .images import ImageLimits, load_image_for
from .model import StepDecoder
from .result import CaptionResult

log = logging.getLogger(__name__)

# The frozen encoder may differ from the eager one by float rounding (batch norm folded into the
# convolutions), no more: features of a few photo-like images must agree this closely.
FREEZE_TOLERANCE = 1e-3

# The model's compute precision: float32, or autocast to a 16-bit type (CUDA only: on CPU autocast
# is slower than float32 for this model, and whether captions change is measured on a GPU with
# bench/precision.py).
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16,
                                                  "float16": torch.float16}


def check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: plain float32); raises ValueError
    for an unknown precision, for a 16-bit one off CUDA, and for bfloat16 on a GPU without it."""
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, not {precision!r}")
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return None
    if device.type != "cuda":
        raise ValueError(f"precision {precision} needs a CUDA device; on {device.type} only float32 is served")
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision bfloat16 is not supported by {torch.cuda.get_device_name(device)}")
    return dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but no CUDA device is available; use --device cpu")
    return resolved


def to_model_input(image: Image.Image, size: int, mean: tuple[float, float, float],
                   std: tuple[float, float, float]) -> Tensor:
    """(3, size, size) float tensor: resized (squashed, as Flickr8k's copies are) and normalised."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def preprocess(model: CaptionModel, image: Image.Image) -> Tensor:
    """The one preprocessing function shared by training, evaluation and serving."""
    return to_model_input(image, model.config.image_size, model.encoder.mean, model.encoder.std)


def photo_like_images(count: int, size: int = 160, seed: int = 0) -> list[Image.Image]:
    """Deterministic stand-ins for photos: smooth colour fields with edges and grain.

    An all-zeros input exercises little of a network (every activation takes one value), so the
    frozen encoder is checked on these instead.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.uniform(0, 255, (5, 5, 3)).astype(np.uint8), "RGB")
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.normal(0.0, 12.0, (size, size, 3))
        images.append(Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8), "RGB"))
    return images


class Captioner:
    """A loaded model on a device, ready to caption batches of images."""

    def __init__(self, model: CaptionModel, device: str | torch.device = "auto",
                 beam: BeamConfig | None = None, encoder_batch_size: int | None = None,
                 precision: str = "float32", decoder: StepDecoder | None = None) -> None:
        self.device = resolve_device(device)
        self.precision = precision
        self._autocast_dtype = check_precision(precision, self.device)  # before moving the weights
        self.model = model.to(self.device)
        self.model.encoder.eval()
        self.model.decoder.eval()
        # What writes the words: the model's own decoder, or an ensemble that includes it
        # (captioner.ensemble: evaluation and distillation only; its members must already be on
        # this device, as checkpoint.load(path, device) puts them).
        self.decoder: StepDecoder = decoder if decoder is not None else self.model.decoder
        self.beam = beam or default_beam_config(model)
        self.confidence = ConfidenceRule.from_meta(model.meta)
        vocab = model.vocab
        self.special = SpecialIds(vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id)
        # On CPU this encoder runs fastest at small batches (cache-bound); on GPU, big ones.
        self.encoder_batch_size = encoder_batch_size or (64 if self.device.type == "cuda" else 4)
        self._encoder: Callable[[Tensor], Tensor] = self.model.encoder

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "auto",
             beam: BeamConfig | None = None, precision: str = "float32") -> Captioner:
        target = resolve_device(device)
        check_precision(precision, target)  # refuse before paying for the load
        return cls(checkpoint.load(path, device=target), target, beam, precision=precision)

    @property
    def version(self) -> str:
        return self.model.version

    def prepare(self, data: bytes, limits: ImageLimits | None = None) -> Tensor:
        """Untrusted bytes -> model input; raises captioner.images.ImageError subclasses."""
        return preprocess(self.model, self.load_image(data, limits)[0])

    def load_image(self, data: bytes, limits: ImageLimits | None = None) -> tuple[Image.Image, tuple[int, int]]:
        """(the picture, its full upright size) for untrusted bytes: a big JPEG is decoded by
        libjpeg at the smallest 1/2, 1/4 or 1/8 scale that still covers the model's input (the
        model squashes every photo to that size anyway), as the caption worker does."""
        return load_image_for(data, limits or ImageLimits(), draft_to=self.model.config.image_size)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

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

    def freeze_encoder(self, check_images: Sequence[Image.Image] | None = None) -> bool:
        """On CPU, serve the encoder TorchScript-frozen with batch norm folded into the convolutions.

        Whether that is faster depends on the batch size: bench/results/decode.json has the
        measured images/s of both. The frozen encoder is used only if its features of
        ``check_images`` (default: :func:`photo_like_images`) match the eager encoder's; otherwise,
        or if tracing fails, a warning is logged and the eager encoder keeps serving.
        """
        # An encoder whose top blocks were fine-tuned is served frozen too: at serving nothing trains.
        if self.device.type != "cpu":
            return False
        pictures = photo_like_images(2) if check_images is None else check_images
        inputs = torch.stack([preprocess(self.model, picture) for picture in pictures])
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        try:
            with torch.inference_mode():
                traced = torch.jit.trace(self.model.encoder.eval(), inputs)
                frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
                eager, fast = self.model.encoder(inputs), frozen(inputs)
        except Exception as err:  # any tracing problem: keep serving with the eager encoder
            log.warning("encoder not frozen: tracing failed (%r); serving the eager encoder", err)
            return False
        if not torch.allclose(eager, fast, atol=FREEZE_TOLERANCE, rtol=FREEZE_TOLERANCE):
            log.warning("encoder not frozen: its features differ from the eager encoder's by up to %.3g "
                        "on photo-like images; serving the eager encoder", float((eager - fast).abs().max()))
            return False
        self._encoder = frozen
        return True

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        # From pinned memory the copy to a GPU is asynchronous, ordered before the encoder on the
        # same stream; from ordinary memory non_blocking is a plain copy.
        with self._autocast():
            chunks = [self._encoder(chunk.to(self.device, non_blocking=True))
                      for chunk in images.split(self.encoder_batch_size)]
            return torch.cat(chunks)

    @torch.inference_mode()
    def decode(self, features: Tensor, beam: BeamConfig | None = None,
               attention: bool = True) -> list[CaptionResult]:
        config = beam or self.beam
        features = features.to(self.device).float()
        with self._autocast():
            hyps = beam_search(self.decoder, features, config, self.special)
            seen = classifier_guesses(self.model.encoder.backbone.classifier, features)
        regions = features.size(1)
        return [self._to_result(h, regions, config.beam_size, len(hyps), attention, guesses)
                for h, guesses in zip(hyps, seen, strict=True)]

    def caption_tensors(self, images: Tensor, beam: BeamConfig | None = None,
                        attention: bool = True) -> list[CaptionResult]:
        return self.decode(self.encode(images), beam, attention)

    def caption_images(self, images: Sequence[Image.Image], beam: BeamConfig | None = None,
                       attention: bool = True) -> list[CaptionResult]:
        batch = torch.stack([preprocess(self.model, image) for image in images])
        results = self.caption_tensors(batch, beam, attention)
        return [replace(result, width=image.width, height=image.height)
                for result, image in zip(results, images, strict=True)]

    def caption_bytes(self, data: bytes, beam: BeamConfig | None = None,
                      attention: bool = True) -> CaptionResult:
        image, (width, height) = self.load_image(data)
        return replace(self.caption_images([image], beam, attention)[0], width=width, height=height)

    def _to_result(self, hyp: Hypothesis, regions: int, beam_size: int, batch_size: int,
                   attention: bool, seen: tuple[tuple[str, float], ...]) -> CaptionResult:
        words = tuple(self.model.vocab.words[i] for i in hyp.tokens)
        maps = None
        if attention:
            side = math.isqrt(regions)
            grid = (side, side) if side * side == regions else (1, regions)
            maps = hyp.attention.float().numpy().reshape(len(words), *grid)
        confident = self.confidence.trusted(words, hyp.score, seen)
        return CaptionResult(" ".join(words), words, hyp.score, hyp.log_prob, hyp.finished, self.version,
                             beam_size, confident, seen, batch_size=batch_size, attention=maps)


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
