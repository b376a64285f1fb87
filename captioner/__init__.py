"""Show, Attend and Tell image captioning: model, decoding, checkpoints and image loading.

This package knows nothing of Telegram or SQL.
"""

from .beam import BeamConfig, Hypothesis, beam_search
from .checkpoint import CaptionModel, CheckpointError
from .images import (
    ImageError,
    ImageLimits,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
    load_image,
)
from .inference import Caption, Captioner, preprocess, resolve_device
from .model import ModelConfig
from .vocab import Vocabulary, tokenize

__all__ = [
    "BeamConfig",
    "Caption",
    "CaptionModel",
    "Captioner",
    "CheckpointError",
    "Hypothesis",
    "ImageError",
    "ImageLimits",
    "ImageTooLargeError",
    "ModelConfig",
    "NotAnImageError",
    "TruncatedImageError",
    "UnsupportedImageError",
    "Vocabulary",
    "beam_search",
    "load_image",
    "preprocess",
    "resolve_device",
    "tokenize",
]
