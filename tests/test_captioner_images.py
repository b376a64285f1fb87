import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from captioner.images import (
    ERROR_CLASSES,
    ImageError,
    ImageLimits,
    ImageProblem,
    ImageTooLargeError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedImageError,
    image_error,
    load_image,
    load_image_for,
    storable_jpeg,
)
from captioner.inference import to_model_input
from tests.helpers import photo_bytes


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_jpeg_loads_as_rgb() -> None:
    image = load_image(photo_bytes(1, (40, 30)))
    assert image.mode == "RGB" and image.size == (40, 30)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    loaded = load_image(_encode(image, "JPEG", exif=exif))
    assert loaded.size == (20, 40)


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "1", "LA"])
def test_colour_modes_become_rgb(mode: str) -> None:
    image = Image.new("RGB", (16, 16), (30, 120, 200)).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    assert load_image(_encode(image, fmt)).mode == "RGB"


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    array = np.full((8, 8), 32768, dtype=np.uint16)
    image = Image.fromarray(array)
    loaded = load_image(_encode(image, "PNG"))
    assert loaded.mode == "RGB"
    assert 120 <= np.asarray(loaded)[0, 0, 0] <= 135


def test_transparent_pixels_are_composited_on_white() -> None:
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    pixels = np.asarray(load_image(_encode(image, "PNG")))
    assert tuple(pixels[4, 4]) == (255, 255, 255)
    assert tuple(pixels[0, 0]) == (0, 0, 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animation_uses_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in [(250, 0, 0), (0, 250, 0), (0, 0, 250)]]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, green, blue = np.asarray(load_image(data))[8, 8].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_not_an_image() -> None:
    with pytest.raises(NotAnImageError) as info:
        load_image(b"%PDF-1.4 definitely not a photo")
    assert info.value.code is ImageProblem.NOT_AN_IMAGE
    with pytest.raises(NotAnImageError) as info:
        load_image(b"")
    assert info.value.code is ImageProblem.EMPTY


def test_truncated_image() -> None:
    data = photo_bytes(2, (200, 200))
    with pytest.raises(TruncatedImageError) as info:
        load_image(data[: len(data) // 2])
    assert info.value.code is ImageProblem.TRUNCATED


def test_image_cut_inside_its_header() -> None:
    with pytest.raises(TruncatedImageError):
        load_image(photo_bytes(2, (200, 200))[:600])


def test_file_size_limit() -> None:
    data = photo_bytes(3)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(data, ImageLimits(max_bytes=100))
    assert info.value.code is ImageProblem.TOO_MANY_BYTES
    assert info.value.details == {"size": len(data), "limit": 100}


def test_decompression_bomb() -> None:
    bomb = _encode(Image.new("L", (4000, 4000)), "PNG")  # tiny file, 16 megapixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLargeError) as info:
        load_image(bomb, ImageLimits(max_pixels=1_000_000))
    assert info.value.code is ImageProblem.TOO_MANY_PIXELS and info.value.details == {"limit": 1_000_000}


def test_unsupported_format() -> None:
    data = _encode(Image.new("RGB", (8, 8)), "PCX")
    with pytest.raises(UnsupportedImageError) as info:
        load_image(data)
    assert info.value.code is ImageProblem.UNSUPPORTED_FORMAT and info.value.details == {"format": "PCX"}


@pytest.mark.parametrize("code", list(ImageProblem))
def test_each_code_is_raised_as_its_class(code: ImageProblem) -> None:
    err = image_error(code, limit=5)
    assert type(err) is ERROR_CLASSES[code] and err.code is code and err.details == {"limit": 5}
    assert code.value in str(err) and "limit=5" in str(err)


def test_each_error_class_has_a_code() -> None:
    """The other way round: no ImageError subclass is left without a code that raises it."""
    assert set(ImageError.__subclasses__()) == set(ERROR_CLASSES.values())


def test_model_input_shape_and_normalisation() -> None:
    image = Image.new("RGB", (50, 30), (255, 0, 0))
    tensor = to_model_input(image, 32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert tuple(tensor.shape) == (3, 32, 32)
    assert tensor[0].allclose(tensor.new_ones(())) and tensor[1].allclose(-tensor.new_ones(()))


def test_images_above_16_megapixels_are_refused_by_default() -> None:
    over = _encode(Image.new("L", (4001, 4000)), "PNG")  # 16.004 MP
    with pytest.raises(ImageTooLargeError) as info:
        load_image(over)
    assert info.value.details == {"limit": 16_000_000}
    assert load_image(_encode(Image.new("L", (4000, 4000)), "PNG")).size == (4000, 4000)


def test_a_large_jpeg_is_decoded_in_draft_mode_and_reports_its_full_upright_size() -> None:
    picture = Image.effect_noise((4000, 3000), 40).convert("RGB")
    data = _encode(picture, "JPEG")
    image, size = load_image_for(data, draft_to=256)
    assert size == (4000, 3000)
    assert image.size == (500, 375)  # 1/8 scale: the smallest that still covers 256 x 256
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", exif=exif)
    image, size = load_image_for(buffer.getvalue(), draft_to=256)
    assert size == (3000, 4000) and image.size == (375, 500)
    assert load_image_for(data)[0].size == (4000, 3000)  # without a draft size: the full decode


def _with_gps_and_profile(size: tuple[int, int], fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {2: (51.0, 30.0, 0.0), 1: "N"}  # GPSInfo: latitude
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    buffer = io.BytesIO()
    Image.effect_noise(size, 30).convert("RGB").save(buffer, fmt, exif=exif, icc_profile=profile)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_stored_photo_is_a_small_jpeg_without_metadata(fmt: str) -> None:
    data = _with_gps_and_profile((3000, 2000), fmt)
    with Image.open(io.BytesIO(data)) as original:
        assert original.getexif() and original.info.get("icc_profile")
    stored = storable_jpeg(data)
    with Image.open(io.BytesIO(stored)) as image:
        assert image.format == "JPEG" and image.size == (1024, 683)
        assert not image.getexif() and "icc_profile" not in image.info and "exif" not in image.info
    assert b"CameraMaker" not in stored
    small = storable_jpeg(photo_bytes(1))  # already small: size kept, still re-encoded
    with Image.open(io.BytesIO(small)) as image:
        assert max(image.size) <= 1024 and image.format == "JPEG"
