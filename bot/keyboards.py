"""Inline keyboards and their callback data (Telegram allows 1-64 bytes of callback data).

Formats: ``v:<caption_id>:u`` / ``v:<caption_id>:d`` (vote), ``c:<caption_id>`` (correct),
``a:<caption_id>`` (attention), ``f:y:<user_id>`` / ``f:n:<user_id>`` (confirm /forget: only
the person who sent /forget may press it).
"""

from __future__ import annotations

from dataclasses import dataclass

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bot import texts

MAX_CALLBACK_BYTES = 64


@dataclass(frozen=True)
class Action:
    kind: str  # "vote", "correct", "attention", "forget"
    caption_id: int | None = None
    up: bool | None = None  # vote direction
    confirm: bool | None = None  # forget
    user_id: int | None = None  # forget: who asked


def _data(text: str) -> str:
    if not 0 < len(text.encode()) <= MAX_CALLBACK_BYTES:
        raise ValueError(f"callback data of {len(text.encode())} bytes")
    return text


def caption_keyboard(caption_id: int, my_vote: bool | None = None,
                     counts: tuple[int, int] | None = None) -> InlineKeyboardMarkup:
    """Four buttons under a caption; ``my_vote`` marks the presser's vote, ``counts`` (up, down)
    adds totals (used in group chats, where several people vote)."""
    up, down = texts.BUTTON_UP, texts.BUTTON_DOWN
    if counts is not None:
        up, down = f"{up} {counts[0]}", f"{down} {counts[1]}"
    if my_vote is True:
        up += texts.VOTED_MARK
    elif my_vote is False:
        down += texts.VOTED_MARK
    return InlineKeyboardMarkup([
        [
            InlineKeyboardButton(up, callback_data=_data(f"v:{caption_id}:u")),
            InlineKeyboardButton(down, callback_data=_data(f"v:{caption_id}:d")),
        ],
        [
            InlineKeyboardButton(texts.BUTTON_CORRECT, callback_data=_data(f"c:{caption_id}")),
            InlineKeyboardButton(texts.BUTTON_ATTENTION, callback_data=_data(f"a:{caption_id}")),
        ],
    ])


def forget_keyboard(user_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(texts.BUTTON_FORGET_YES, callback_data=_data(f"f:y:{user_id}")),
        InlineKeyboardButton(texts.BUTTON_FORGET_NO, callback_data=_data(f"f:n:{user_id}")),
    ]])


def parse(data: str | None) -> Action | None:
    """The action behind a button, or None for data this version does not understand."""
    if not data:
        return None
    parts = data.split(":")
    try:
        match parts:
            case ["v", caption_id, ("u" | "d") as direction]:
                return Action("vote", _id(caption_id), up=direction == "u")
            case ["c", caption_id]:
                return Action("correct", _id(caption_id))
            case ["a", caption_id]:
                return Action("attention", _id(caption_id))
            case ["f", ("y" | "n") as answer, user_id]:
                return Action("forget", confirm=answer == "y", user_id=_id(user_id))
    except ValueError:
        return None
    return None


def _id(text: str) -> int:
    if not text.isdigit() or len(text) > 18:
        raise ValueError(text)
    return int(text)
