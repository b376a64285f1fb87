"""Errors carry codes; bot/texts.py words each one, with the sentences people have always read."""

from __future__ import annotations

from html import escape

import pytest

from bot import texts
from captioner.images import ImageError, ImageLimits, ImageProblem, image_error, load_image
from storage.errors import CorrectionRejected, Rejection
from storage.validation import MAX_CHARS, validate_correction
from tests.helpers import photo_bytes

# Today's sentences, word for word (before the codes, the captioner and storage wrote them);
# the bot shows them HTML-escaped, as it always did.
IMAGE_SENTENCES = {
    ImageProblem.TOO_MANY_BYTES: "The file is 21.0 MB; the limit is 21 MB.",
    ImageProblem.TOO_MANY_PIXELS: "The image has too many pixels (the limit is 50 megapixels).",
    ImageProblem.EMPTY: "The file is empty.",
    ImageProblem.NOT_AN_IMAGE: "This file is not an image I can read (try a JPEG or PNG photo).",
    ImageProblem.NO_PIXELS: "The image has no pixels.",
    ImageProblem.DAMAGED: "This image is damaged and cannot be decoded.",
    ImageProblem.TRUNCATED: "The image file is incomplete (it was cut short); please resend it.",
    ImageProblem.UNSUPPORTED_FORMAT: "PCX images are not supported; please send a JPEG, PNG, WebP or GIF.",
}
IMAGE_DETAILS: dict[ImageProblem, dict[str, int | str]] = {
    ImageProblem.TOO_MANY_BYTES: {"size": 21_000_000, "limit": 20 * 1024 * 1024},
    ImageProblem.TOO_MANY_PIXELS: {"limit": 50_000_000},
    ImageProblem.UNSUPPORTED_FORMAT: {"format": "PCX"},
}
REJECTION_SENTENCES = {
    Rejection.NO_CAPTION: "I can't find that caption any more, so I can't take the correction.",
    Rejection.TOO_SHORT: "Your correction is empty. Please send a short description of the photo.",
    Rejection.TOO_LONG: f"Your correction is too long (350 characters). Please keep it under {MAX_CHARS}.",
    Rejection.TOO_FEW_WORDS: 'Please use at least two words, for example "a dog running on the beach".',
    Rejection.UNCHANGED: "That is the same as my caption. Please send a different description.",
    Rejection.DAILY_LIMIT: "Thank you! You've sent 20 corrections today, which is as many as I take from one "
    "person in a day. Please come back tomorrow.",
}


def test_every_code_has_a_text() -> None:
    assert set(texts.IMAGE_PROBLEMS) == set(ImageProblem) == set(IMAGE_SENTENCES)
    assert set(texts.CORRECTION_REJECTIONS) == set(Rejection) == set(REJECTION_SENTENCES)


@pytest.mark.parametrize("code", list(ImageProblem))
def test_image_problems_read_as_before(code: ImageProblem) -> None:
    err = image_error(code, **IMAGE_DETAILS.get(code, {}))
    assert texts.bad_image(err) == f"😕 I can't caption this one. {escape(IMAGE_SENTENCES[code])}"


def test_a_real_image_error_reads_as_before() -> None:
    with pytest.raises(ImageError) as info:
        load_image(photo_bytes(1), ImageLimits(max_bytes=1000))
    size = len(photo_bytes(1))
    assert texts.bad_image(info.value) == (
        f"😕 I can't caption this one. The file is {size / 1e6:.1f} MB; the limit is 0 MB.")


@pytest.mark.parametrize(("text", "code"), [
    ("", Rejection.TOO_SHORT),
    ("word " * 70, Rejection.TOO_LONG),
    ("doggo", Rejection.TOO_FEW_WORDS),
    ("a dog runs", Rejection.UNCHANGED),
])
def test_correction_rejections_read_as_before(text: str, code: Rejection) -> None:
    with pytest.raises(CorrectionRejected) as info:
        validate_correction(text, "A dog runs.")
    assert info.value.code is code
    expected = escape(REJECTION_SENTENCES[code].replace("350", str(len(text.strip()))))
    assert texts.correction_rejected(info.value) == f"🤔 {expected}\nReply again with a new caption, or /cancel."


def test_a_missing_caption_reads_as_before() -> None:
    reply = texts.correction_rejected(CorrectionRejected(Rejection.NO_CAPTION))
    assert reply.startswith(f"🤔 {escape(REJECTION_SENTENCES[Rejection.NO_CAPTION])}\n")


def test_the_daily_limit_does_not_invite_another_try() -> None:
    reply = texts.correction_rejected(CorrectionRejected(Rejection.DAILY_LIMIT, limit=20))
    assert reply == f"🙏 {escape(REJECTION_SENTENCES[Rejection.DAILY_LIMIT])}"
