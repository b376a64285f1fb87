"""What every caption server does with a photo, whoever schedules it: the worker process
(``worker.py``) and the Ray Serve replicas (``ray_app.py``) both decode, caption and draw with
these functions, so their captions and error codes are the same by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..images import ImageError, ImageLimits, ImageProblem, image_error, load_image_for
from ..inference import Captioner, preprocess
from ..result import CaptionResult

log = logging.getLogger("captioner.serving")

ATTENTION_TILE = 224  # render_attention draws the photo at this size


@dataclass
class DecodedPhoto:
    tensor: Tensor  # the model input
    key: tuple[Any, ...]  # the preprocessing it went through (a reloaded model may need another)
    width: int  # of the photo after EXIF orientation
    height: int
    thumbnail: Image.Image | None  # for the attention picture, when asked for


def preprocessing_key(captioner: Captioner) -> tuple[Any, ...]:
    model = captioner.model
    return (model.config.image_size, model.encoder.mean, model.encoder.std)


def decode_photo(captioner: Captioner, data: bytes, limits: ImageLimits, attention: bool) -> DecodedPhoto:
    """Untrusted bytes -> model input; raises ImageError (a decoder bug on hostile bytes included)."""
    try:
        image, (width, height) = load_image_for(data, limits,
                                                draft_to=max(captioner.model.config.image_size, ATTENTION_TILE))
        tensor = preprocess(captioner.model, image)
    except ImageError:
        raise
    except Exception as err:  # any other failure on hostile bytes is still a bad photo, not a crash
        log.warning("unexpected error decoding a photo: %r", err)
        raise image_error(ImageProblem.DAMAGED) from err
    thumbnail = None
    if attention:
        thumbnail = image.resize((ATTENTION_TILE, ATTENTION_TILE), Image.Resampling.BILINEAR)
    return DecodedPhoto(tensor, preprocessing_key(captioner), width, height, thumbnail)


def model_inputs(captioner: Captioner, photos: Sequence[DecodedPhoto], images: Sequence[bytes],
                 limits: ImageLimits) -> Tensor:
    """The batch's input tensor; a photo decoded for another model's preprocessing is redone."""
    key = preprocessing_key(captioner)
    return torch.stack([photo.tensor if photo.key == key else captioner.prepare(image, limits)
                        for photo, image in zip(photos, images, strict=True)])


def caption_batch(captioner: Captioner, inputs: Tensor, beam_sizes: Sequence[int | None],
                  attention: Sequence[bool]) -> list[CaptionResult]:
    """One batched encoder pass, then one batched beam search per beam size (None: the model's)."""
    features = captioner.encode(inputs)
    base = captioner.beam
    groups: dict[int, list[int]] = {}
    for index, beam_size in enumerate(beam_sizes):
        groups.setdefault(beam_size or base.beam_size, []).append(index)
    captions: list[CaptionResult | None] = [None] * len(beam_sizes)
    for beam_size, indices in groups.items():
        rows = torch.tensor(indices, device=features.device)
        selected = features if len(groups) == 1 else features.index_select(0, rows)
        wanted = any(attention[i] for i in indices)
        decoded = captioner.decode(selected, replace(base, beam_size=beam_size), attention=wanted)
        for i, caption in zip(indices, decoded, strict=True):
            captions[i] = caption
    return [c for c in captions if c is not None]


def attention_picture(thumbnail: Image.Image | None, result: CaptionResult) -> bytes | None:
    """The attention picture (PNG), or None if it cannot be drawn (the caption is still good)."""
    if thumbnail is None or result.attention is None:
        return None
    try:
        from ..attention_viz import render_attention

        return render_attention(thumbnail, result.words, result.attention)
    except Exception:
        log.exception("drawing the attention picture failed")
        return None
