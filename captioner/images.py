"""Turning untrusted image bytes into an upright RGB picture (Pillow only, no torch).

Every photo the project sees, in training and in serving, goes through :func:`load_image` (and
then :func:`captioner.inference.to_model_input`), so inference preprocessing is exactly training
preprocessing. The bot imports this module for the limits and errors, so it must stay torch-free.

Errors carry a code and the numbers behind it, never a sentence: what a person reads is the
bot's business (``bot/texts.py``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 16_000_000  # a 16 MP phone photo; above it decoding costs more than it brings
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO"})

Details = dict[str, int | str]


class ImageProblem(StrEnum):
    """Why a photo cannot be captioned; ``details`` of the error say what is in brackets."""

    TOO_MANY_BYTES = "too_many_bytes"  # (size, limit) in bytes
    TOO_MANY_PIXELS = "too_many_pixels"  # (limit) in pixels
    EMPTY = "empty"
    NOT_AN_IMAGE = "not_an_image"  # Pillow cannot identify the format
    NO_PIXELS = "no_pixels"
    DAMAGED = "damaged"  # identified, but the decoder fails
    TRUNCATED = "truncated"  # the file was cut short
    UNSUPPORTED_FORMAT = "unsupported_format"  # (format)


class ImageError(ValueError):
    """An image that cannot be captioned: ``code`` (an :class:`ImageProblem`) and ``details`` say why.

    Build one with :func:`image_error`, which picks the subclass that matches the code.
    ``str(err)`` is for logs (the code and details), not for people.
    """

    def __init__(self, code: ImageProblem, **details: int | str) -> None:
        self.code = ImageProblem(code)
        self.details: Details = dict(details)
        shown = ", ".join(f"{key}={value}" for key, value in sorted(self.details.items()))
        super().__init__(f"{self.code.value} ({shown})" if shown else self.code.value)


class NotAnImageError(ImageError):
    pass


class TruncatedImageError(ImageError):
    pass


class ImageTooLargeError(ImageError):
    """Too many bytes, or too many pixels (a decompression bomb)."""


class UnsupportedImageError(ImageError):
    pass


# Each problem is raised as exactly one exception class (callers may catch the subclasses).
ERROR_CLASSES: dict[ImageProblem, type[ImageError]] = {
    ImageProblem.TOO_MANY_BYTES: ImageTooLargeError,
    ImageProblem.TOO_MANY_PIXELS: ImageTooLargeError,
    ImageProblem.EMPTY: NotAnImageError,
    ImageProblem.NOT_AN_IMAGE: NotAnImageError,
    ImageProblem.NO_PIXELS: NotAnImageError,
    ImageProblem.DAMAGED: NotAnImageError,
    ImageProblem.TRUNCATED: TruncatedImageError,
    ImageProblem.UNSUPPORTED_FORMAT: UnsupportedImageError,
}


def image_error(code: ImageProblem, **details: int | str) -> ImageError:
    """The error for ``code``, of the class :data:`ERROR_CLASSES` names."""
    return ERROR_CLASSES[ImageProblem(code)](code, **details)



@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def load_image(data: bytes, limits: ImageLimits | None = None) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image, or raise an :class:`ImageError`."""
    return load_image_for(data, limits)[0]


def load_image_for(data: bytes, limits: ImageLimits | None = None,
                   draft_to: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """(the upright RGB image, its full upright size in pixels) for ``data``.

    With ``draft_to``, a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, the smallest that
    still covers ``draft_to`` x ``draft_to`` pixels: a 16 MP photo then costs a fraction of its
    full decode, and the model, which squashes every photo to its input size, sees the same
    picture. Other formats are decoded in full.
    """
    limits = limits or ImageLimits()
    if len(data) > limits.max_bytes:
        raise image_error(ImageProblem.TOO_MANY_BYTES, size=len(data), limit=limits.max_bytes)
    if not data:
        raise image_error(ImageProblem.EMPTY)
    image = _open(data, limits)
    full_size = image.size
    _check_pixels(full_size, limits)
    if draft_to is not None and image.format in ("JPEG", "MPO"):
        image.draft(None, (draft_to, draft_to))  # None keeps the mode
    image = _decode_first_frame(image, limits)
    decoded_size = image.size
    image = ImageOps.exif_transpose(image)
    turned = decoded_size[0] != decoded_size[1] and image.size == (decoded_size[1], decoded_size[0])
    upright = (full_size[1], full_size[0]) if turned else full_size
    return _to_rgb(image), upright


STORED_MAX_SIDE = 1024  # longest side of a stored photo, in pixels
STORED_JPEG_QUALITY = 85


def storable_jpeg(data: bytes, limits: ImageLimits | None = None, max_side: int = STORED_MAX_SIDE) -> bytes:
    """The photo as it may be kept: an upright sRGB JPEG, longest side at most ``max_side``, and
    no metadata at all (no EXIF, so no GPS position or camera serial; no ICC profile, as the
    colours are converted to sRGB first). Raises :class:`ImageError` like :func:`load_image`."""
    profile = _icc_profile(data)
    image, _ = load_image_for(data, limits, draft_to=max_side)
    if profile is not None:
        image = _to_srgb(image, profile)
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=STORED_JPEG_QUALITY)  # writes no EXIF or ICC unless given them
    return buffer.getvalue()


def _icc_profile(data: bytes) -> bytes | None:
    with contextlib.suppress(Exception), Image.open(io.BytesIO(data)) as image:
        profile = image.info.get("icc_profile")
        return bytes(profile) if profile else None
    return None


def _to_srgb(image: Image.Image, profile: bytes) -> Image.Image:
    """The image's colours converted from its embedded profile to sRGB (unchanged if unreadable)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    return converted if converted is not None else image


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as err:
        raise image_error(ImageProblem.NOT_AN_IMAGE) from err
    except Image.DecompressionBombError as err:
        raise image_error(ImageProblem.TOO_MANY_PIXELS, limit=limits.max_pixels) from err
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow raises plain OSError for files cut inside their header ("Truncated File Read").
        raise image_error(ImageProblem.TRUNCATED) from err
    if image.format not in SUPPORTED_FORMATS:
        raise image_error(ImageProblem.UNSUPPORTED_FORMAT, format=str(image.format))
    return image


def _check_pixels(size: tuple[int, int], limits: ImageLimits) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise image_error(ImageProblem.NO_PIXELS)
    if width * height > limits.max_pixels:
        raise image_error(ImageProblem.TOO_MANY_PIXELS, limit=limits.max_pixels)


def _decode_first_frame(image: Image.Image, limits: ImageLimits) -> Image.Image:
    """Force the decode of the first frame, turning decoder failures into ImageErrors."""
    try:
        image.seek(0)
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) for some bombs: make that an error.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombWarning as err:
        raise image_error(ImageProblem.TOO_MANY_PIXELS, limit=limits.max_pixels) from err
    except (OSError, SyntaxError, ValueError) as err:
        if "truncated" in str(err).lower() or "broken data stream" in str(err).lower():
            raise image_error(ImageProblem.TRUNCATED) from err
        raise image_error(ImageProblem.DAMAGED) from err
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
