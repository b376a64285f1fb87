"""Turning untrusted image bytes into an RGB picture and a model input tensor.

Every photo the project sees, in training and in serving, goes through :func:`load_image` and
:func:`to_model_input`, so inference preprocessing is exactly training preprocessing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})


class ImageError(ValueError):
    """An image that cannot be captioned; ``str(err)`` is fit to show to a person."""


class NotAnImageError(ImageError):
    pass


class TruncatedImageError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    """Too many bytes, or too many pixels (a decompression bomb)."""


class UnsupportedImageError(ImageError):
    pass


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def load_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image, or raise an :class:`ImageError`."""
    limits = limits or ImageLimits()
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"The file is {len(data) / 1e6:.1f} MB; the limit is {limits.max_bytes / 1e6:.0f} MB."
        )
    if not data:
        raise NotAnImageError("The file is empty.")
    image = _open(data, limits)
    _check_pixels(image.size, limits)
    image = _decode_first_frame(image)
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise NotAnImageError("This file is not an image I can read (try a JPEG or PNG photo).") from err
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(_too_many_pixels_message(limits)) from err
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow raises plain OSError for files cut inside their header ("Truncated File Read").
        raise TruncatedImageError("The image file is incomplete (it was cut short); please resend it.") from err
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageError(
            f"{image.format} images are not supported; please send a JPEG, PNG, WebP or GIF."
        )
    return image


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise NotAnImageError("The image has no pixels.")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(_too_many_pixels_message(limits))


def _too_many_pixels_message(limits: ImageLimits) -> str:
    return f"The image has too many pixels (the limit is {limits.max_pixels / 1e6:.0f} megapixels)."


def _decode_first_frame(image: Image.Image) -> Image.Image:
    """Force the decode of the first frame, turning decoder failures into ImageErrors."""
    try:
        image.seek(0)
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) for some bombs: make that an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombWarning as err:
        raise ImageTooLargeError(str(err)) from err
    except (OSError, SyntaxError, ValueError) as err:
        if "truncated" in str(err).lower() or "broken data stream" in str(err).lower():
            raise TruncatedImageError("The image file is incomplete (it was cut short); please resend it.") from err
        raise NotAnImageError("This image is damaged and cannot be decoded.") from err
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with alpha composited on white; 16-bit, CMYK, palette and grey converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def to_model_input(image: Image.Image, size: int, mean: tuple[float, float, float],
                   std: tuple[float, float, float]) -> torch.Tensor:
    """(3, size, size) float tensor: resized (squashed, as Flickr8k's copies are) and normalised."""
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    array = np.asarray(resized, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t
