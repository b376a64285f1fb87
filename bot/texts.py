"""Everything the bot says to people, in one place (Telegram HTML: escape what people typed)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import Any

from telegram import BotCommand

from captioner.images import ImageError, ImageProblem
from storage.errors import CorrectionRejected, Rejection

COMMANDS: tuple[tuple[str, str], ...] = (
    ("start", "What this bot does"),
    ("help", "How to use the buttons"),
    ("privacy", "What is stored and why"),
    ("forget", "Delete what is stored about you"),
    ("cancel", "Stop correcting a caption"),
)
ADMIN_COMMANDS: tuple[tuple[str, str], ...] = (
    ("stats", "Counts, model and queue (operators)"),
    ("reload", "Load the newest promoted model (operators)"),
)


def bot_commands() -> list[BotCommand]:
    return [BotCommand(name, description) for name, description in COMMANDS]


# ---------------------------------------------------------------- buttons

BUTTON_UP = "👍 Right"
BUTTON_DOWN = "👎 Wrong"
BUTTON_CORRECT = "✏️ Fix"
BUTTON_ATTENTION = "🔍 Why?"
VOTED_MARK = " ✓"
BUTTON_FORGET_YES = "🗑 Yes, delete my data"
BUTTON_FORGET_NO = "Keep it"

# ---------------------------------------------------------------- /start, /help, /privacy


def start(first_name: str | None) -> str:
    hello = f"Hi {escape(first_name)}! 👋" if first_name else "Hi! 👋"
    return (
        f"{hello} I describe photos in one sentence.\n\n"
        "<b>Send me a photo</b> (an image file or an album works too) and I'll reply with a caption.\n\n"
        + _BUTTONS_HELP
        + "\n\nI learn from your votes and corrections. I keep the photos you send, my captions, "
        "your votes and corrections, linked to your Telegram user id. /privacy explains why; "
        "/forget deletes them."
    )


_BUTTONS_HELP = (
    "Under each caption:\n"
    "👍 / 👎 tell me whether it's right\n"
    "✏️ lets you type a better caption (or just reply to my caption with yours)\n"
    "🔍 shows where I looked for each word"
)

HELP = (
    "Send me a <b>photo</b>, an <b>image file</b> (JPEG, PNG, WebP, GIF) or an <b>album</b>, "
    "and I'll describe each picture in one sentence.\n\n"
    + _BUTTONS_HELP
    + "\n\nIn a group I caption a photo only when asked: reply to it with /caption, or mention me in "
    "its caption. Corrections are taken in private chats only."
    "\n\n/cancel stops a correction you started\n"
    "/privacy what I store and why\n"
    "/forget delete what I stored about you"
)

def privacy(retention_days: float, trained_retention_days: float) -> str:
    """What is kept, for how long, who sees it, what /forget deletes, what stays and why, and what
    happens to models already trained: each sentence is what the code does (tests/test_storage_forget.py)."""
    return (
        "<b>What I store</b>\n"
        "• the photos you send me, re-encoded small (at most 1024 px) without location or camera data, "
        "and the captions I wrote for them\n"
        "• your 👍/👎 votes and the corrections you type\n"
        "• your Telegram user id (to link the above to you), and your app language if you used /start\n"
        "• a photo request until it is answered, and one day after (so a restart answers it once)\n"
        "• in groups: only photos someone asked me to caption, linked to the person who asked\n\n"
        "<b>For how long</b>\n"
        f"• photos nobody corrected: {_days(retention_days)}, then they are deleted with their captions "
        "and votes\n"
        "• photos with corrections: until a model has trained on them, then "
        f"{_days(trained_retention_days)}\n\n"
        "<b>Who can see it</b>\n"
        "The people who run this bot: its operator (everything above, including the corrections the spam "
        "and abuse filter flags for review, and exports for training) and its admins (before a new model "
        "goes live, the corrections and photos that taught it new words). Corrections and well-rated captions "
        "train the next version of the captioning model; nothing is shared or used for advertising.\n\n"
        "<b>Deleting</b>\n"
        "/forget deletes at once your user id and language, your votes, corrections, captions, any "
        "correction you started, the photos only you sent, any photo still waiting for an answer, and "
        "your data in the training exports the bot knows of.\n"
        "What stays: if the filter flagged some of your corrections, a keyed hash of your user id "
        "(it cannot be turned back into the id) and how many were flagged, so that coming back does "
        "not wipe that record. The bot's logs keep user ids and times (no photos, no texts) for as long "
        "as the operator keeps logs; messages already sent to admins stay in their chats.\n\n"
        "<b>Models already trained</b>\n"
        "A model that learned from your corrections keeps what it learned while it is in use. It is "
        "marked, and the next model is trained from an earlier one that never saw your corrections, so "
        "words only you taught me disappear when that model replaces it."
    )


def _days(days: float) -> str:
    return f"{days:g} day" + ("" if days == 1 else "s")


# ---------------------------------------------------------------- captions


def caption(text: str, confident: bool = True, seen: Sequence[tuple[str, float]] = ()) -> str:
    """The caption as sent; an untrusted one comes with a hedge and the classifier's top guess."""
    sentence = text.strip()
    if sentence:
        sentence = sentence[0].upper() + sentence[1:]
        if sentence[-1] not in ".!?":
            sentence += "."
    if not sentence:
        return "📷 (I couldn't find words for this one.)"
    if confident:
        return f"📷 {escape(sentence)}"
    lead = f"It may be {_with_article(seen[0][0])}; my" if seen else "My"
    return f"🤔 I'm not sure. {lead} best sentence is: {escape(sentence)}"


def _with_article(label: str) -> str:
    return escape(f"{'an' if label[:1].lower() in 'aeiou' else 'a'} {label}")


def queue_position(position: int, wait_seconds: float) -> str:
    return (
        f"⏳ You're number {position} in the queue (about {_duration(wait_seconds)}). "
        "I'll post the caption here."
    )


def _duration(seconds: float) -> str:
    seconds = max(1, math.ceil(seconds))
    if seconds < 90:
        return f"{seconds} s"
    return f"{math.ceil(seconds / 60)} min"


# ---------------------------------------------------------------- votes

VOTE_UP_THANKS = "Thanks! Marked as right 👍"
VOTE_DOWN_THANKS = "Thanks! Marked as wrong 👎 — tap ✏️ to tell me what it shows."
VOTE_UNCHANGED = "You already voted that way."

# ---------------------------------------------------------------- corrections


def correction_prompt(caption_text: str) -> str:
    return (
        f"✏️ What does the photo show? Reply with a better caption for “{escape(caption_text)}”.\n"
        "One sentence is perfect. /cancel to stop."
    )


CORRECTION_PROMPT_PLACEHOLDER = "e.g. a brown dog runs on the beach"
CORRECTION_CALLBACK = "Type your caption ✏️"


def correction_saved(text: str) -> str:
    return f"✅ Thanks, your caption is saved: “{escape(text)}”. It helps train the next model."


def correction_replaced(text: str) -> str:
    return f"✅ Thanks, your caption is updated: “{escape(text)}”. It replaces the one you sent before."


# Screening flagged the correction, or holds it for review: a neutral answer that neither
# accuses an honest person nor tells a troll which rule caught them.
CORRECTION_RECEIVED = "Thanks, I've received your caption."


# What each rejection code means to the person (``details`` hold the numbers).
CORRECTION_REJECTIONS: dict[Rejection, Callable[[Mapping[str, int]], str]] = {
    Rejection.NO_CAPTION: lambda _: "I can't find that caption any more, so I can't take the correction.",
    Rejection.TOO_SHORT: lambda _: "Your correction is empty. Please send a short description of the photo.",
    Rejection.TOO_LONG: lambda d: (f"Your correction is too long ({d['length']} characters). "
                                   f"Please keep it under {d['limit']}."),
    Rejection.TOO_FEW_WORDS: lambda _: 'Please use at least two words, for example "a dog running on the beach".',
    Rejection.UNCHANGED: lambda _: "That is the same as my caption. Please send a different description.",
    Rejection.DAILY_LIMIT: lambda d: (f"Thank you! You've sent {d['limit']} corrections today, which is as many "
                                      "as I take from one person in a day. Please come back tomorrow."),
}


def correction_rejected(err: CorrectionRejected) -> str:
    reason = CORRECTION_REJECTIONS[err.code](err.details)
    if err.code == Rejection.DAILY_LIMIT:
        return f"🙏 {escape(reason)}"  # trying again today would not help
    return f"🤔 {escape(reason)}\nReply again with a new caption, or /cancel."


CORRECT_IN_PRIVATE = "Corrections are taken in a private chat with me: send me the photo there and tap ✏️."
CAPTION_HOW = (
    "To get a caption, reply to a photo with /caption (in a group you can also mention me in the photo's caption)."
)
REPLY_NOT_CAPTION = "To correct a caption, reply to the caption message itself, or tap ✏️ under it."
CANCELLED = "OK, correction cancelled."
NOTHING_TO_CANCEL = "There's nothing to cancel. Send me a photo whenever you like."

# ---------------------------------------------------------------- attention

ATTENTION_CALLBACK = "Drawing where I looked… 🔍"


def attention_caption(caption_text: str, current_text: str) -> str:
    head = "🔍 Where I looked for each word."
    if current_text.strip().lower() != caption_text.strip().lower():
        head += f" (My current model now says: “{escape(current_text)}”.)"
    return head


# ---------------------------------------------------------------- stale buttons

CAPTION_GONE = (
    "That caption is no longer stored (it may have been deleted with /forget). Send the photo again."
)
PHOTO_GONE = "I no longer have that photo. Send it again and I'll take another look."
BUTTON_NOT_HERE = "This button doesn't belong to this message, so I ignored it."
BUTTON_UNKNOWN = "This button is from an older version of me. Send the photo again to get fresh buttons."

# ---------------------------------------------------------------- limits and bad input


def file_too_big_for_telegram(size: int | None) -> str:
    """``size`` None: Telegram refused the file as too big without saying how big it is."""
    this = f"This file is {_mb(size)}" if size is not None else "This file is too big"
    return (
        f"😕 {this}; Telegram lets bots download files up to 20 MB. "
        "Please send it as a photo (Telegram compresses it) or a smaller file."
    )


def file_too_big(size: int, limit: int) -> str:
    return f"😕 This file is {_mb(size)}; I accept files up to {_mb(limit)}. Please send a smaller image."


def _mb(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"


# What each image problem means to the person (``details`` hold the numbers, in bytes and pixels).
IMAGE_PROBLEMS: dict[ImageProblem, Callable[[Mapping[str, int | str]], str]] = {
    ImageProblem.TOO_MANY_BYTES: lambda d: (f"The file is {int(d['size']) / 1e6:.1f} MB; "
                                            f"the limit is {int(d['limit']) / 1e6:.0f} MB."),
    ImageProblem.TOO_MANY_PIXELS: lambda d: (
        f"The image has too many pixels (the limit is {int(d['limit']) / 1e6:.0f} megapixels)."),
    ImageProblem.EMPTY: lambda _: "The file is empty.",
    ImageProblem.NOT_AN_IMAGE: lambda _: "This file is not an image I can read (try a JPEG or PNG photo).",
    ImageProblem.NO_PIXELS: lambda _: "The image has no pixels.",
    ImageProblem.DAMAGED: lambda _: "This image is damaged and cannot be decoded.",
    ImageProblem.TRUNCATED: lambda _: "The image file is incomplete (it was cut short); please resend it.",
    ImageProblem.UNSUPPORTED_FORMAT: lambda d: (
        f"{d['format']} images are not supported; please send a JPEG, PNG, WebP or GIF."),
}


def bad_image(err: ImageError) -> str:
    return f"😕 I can't caption this one. {escape(IMAGE_PROBLEMS[err.code](err.details))}"


def rate_limited(limit: int, retry_after: float) -> str:
    return (
        f"🐢 Slow down a little: I caption up to {limit} photos a minute per person. "
        f"Please send this one again in {_duration(retry_after)}."
    )


def actions_limited(limit: int, retry_after: float) -> str:
    return (
        f"🐢 Slow down a little: I take up to {limit} taps, commands and messages a minute per person. "
        f"Try again in {_duration(retry_after)}."
    )


BUSY = "😮‍💨 I'm very busy right now. Please send the photo again in a minute."
TIMEOUT = "⌛ That took too long, sorry. Please send the photo again in a minute."
WORKER_FAILED = (
    "😵 Something went wrong while I looked at this photo. Please try again, or try another photo."
)
RESTARTING = "🔄 I'm restarting. Please send the photo again in a minute."
DOWNLOAD_FAILED = "😕 I couldn't download this file from Telegram. Please send it again."
ERROR = "😵 Sorry, something went wrong on my side. Please try again in a moment."

NOT_A_PHOTO = (
    "I describe photos 📷 — send me a photo, an image file or an album, and I'll caption it. "
    "/help shows more."
)
UNKNOWN_COMMAND = "I don't know that command. /help lists what I can do."
STICKER = "Nice sticker! 🙂 I only describe photos, though. Send me a photo and I'll caption it."
VIDEO = "I can't watch videos yet 🎬. Send me a photo (a screenshot works) and I'll caption it."
AUDIO = "I can't listen 🎧, only look. Send me a photo and I'll caption it."


def not_an_image_file(file_name: str | None, mime_type: str | None) -> str:
    what = escape(file_name) if file_name else "This file"
    kind = f" ({escape(mime_type)})" if mime_type else ""
    return f"{what}{kind} isn't an image I can read. Send me a photo, or a JPEG, PNG, WebP or GIF file."


# ---------------------------------------------------------------- /forget

FORGET_CONFIRM = (
    "This deletes what I stored about you: your user id, votes, corrections, captions, and the photos "
    "only you sent (/privacy says exactly what and what stays). It can't be undone. Delete it all?"
)
FORGET_KEPT = "OK, nothing was deleted."
FORGET_ANSWER = "Done."
FORGET_NOT_YOURS = "This button is for the person who sent /forget. Send /forget yourself to delete your data."
FORGET_NOTHING = "I have nothing stored about you. 👍"


def forget_done(votes: int, corrections: int, captions: int, photos: int) -> str:
    return (
        "🗑 Done. I deleted "
        f"{_count(photos, 'photo')}, {_count(captions, 'caption')}, {_count(votes, 'vote')} and "
        f"{_count(corrections, 'correction')}. "
        "If you send me a photo again, I'll store it as described in /privacy."
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


# ---------------------------------------------------------------- operators


def disk_low(free: int, floor: int) -> str:
    return (
        f"⚠️ The data folder has {_mb(free)} free, below the floor of {_mb(floor)}. I keep captioning "
        "but store no photos or captions (they come without buttons) until there is room again."
    )


def admin_only(command: str) -> str:
    return f"Sorry, /{escape(command)} is only for the people who run this bot."


def stats(
    *,
    captions: int,
    photos: int,
    people: int,
    votes_up: int,
    votes_down: int,
    corrections: int,
    corrections_untrained: int,
    captions_today: int,
    active_model: str | None,
    serving_model: str,
    waiting: int,
    in_flight: int,
    capacity: int,
    wait_seconds: float,
    uptime_seconds: float,
    captioned_since_start: int,
    median_latency_ms: float | None,
) -> str:
    latency = f"{median_latency_ms:.0f} ms" if median_latency_ms is not None else "n/a"
    promoted = escape(active_model) if active_model else "none yet"
    return (
        "<b>Stats</b>\n"
        f"captions {captions} (today {captions_today}), photos {photos}, people {people}\n"
        f"votes 👍 {votes_up} 👎 {votes_down}\n"
        f"corrections {corrections} (not yet trained on: {corrections_untrained})\n\n"
        f"<b>Model</b>\nserving <code>{escape(serving_model)}</code>\npromoted <code>{promoted}</code>\n\n"
        f"<b>Queue</b>\nwaiting {waiting}, in progress {in_flight}, capacity {capacity}, "
        f"wait about {wait_seconds:.1f} s\n\n"
        f"<b>This run</b>\nup {_uptime(uptime_seconds)}, captioned {captioned_since_start}, "
        f"median latency {latency}"
    )


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


RELOAD_NO_PROMOTED = "No model has been promoted yet; still serving <code>{serving}</code>."
RELOAD_SAME = "Already serving the promoted model <code>{serving}</code>."
RELOAD_DONE = "✅ Now serving <code>{name}</code> (was <code>{old}</code>)."
RELOAD_FAILED = "❌ Could not load <code>{name}</code>: {reason}\nStill serving <code>{serving}</code>."


def reload_message(template: str, **values: str) -> str:
    return template.format(**{key: escape(value) for key, value in values.items()})


# ---------------------------------------------------------------- operator review (admins only)

BUTTON_APPROVE = "✅ Approve"
BUTTON_REJECT = "🚫 Reject"
REVIEW_ADMINS_ONLY = "Only the bot's admins can decide about new models."
REVIEW_EXPIRED = "This review message is no longer current; see the latest one or python -m train review."
REVIEW_ALREADY_DECIDED = "This model was already decided (or no longer exists)."


def review_photo(word: str, correction: str) -> str:
    return f"“{escape(word)}”: {escape(correction)}"


def _figures(metrics: Mapping[str, Any]) -> list[str]:
    lines = []
    for part in ("corrections", "validation"):
        base = (metrics.get("base") or {}).get(part) or {}
        cand = (metrics.get("candidate") or {}).get(part) or {}
        # Held-out corrections: the metric the gate judged by (older runs recorded none: CIDEr).
        key = str(metrics.get("gate_metric", "CIDEr")) if part == "corrections" else "CIDEr"
        if key in base and key in cand:
            lines.append(f"{part}: {key} {base[key]:.3f} → {cand[key]:.3f}")
    return lines


def review_request(name: str, parent: str | None, metrics: Mapping[str, Any],
                   examples: Mapping[str, Sequence[str]]) -> str:
    """An admin's review request: the new words with corrections that use them, the gate's figures."""
    lines = [f"🧪 A new model is waiting for your review: <b>{escape(name)}</b> (from {escape(parent or '?')})."]
    words = list(metrics.get("new_words") or [])
    lines.append(f"New words: {escape(', '.join(words)) if words else 'none'}")
    for word, texts_ in examples.items():
        shown = "; ".join(f"“{escape(t)}”" for t in texts_) or "(no correction found)"
        lines.append(f"• <b>{escape(word)}</b>: {shown}")
    lines += [escape(line) for line in _figures(metrics)]
    if metrics.get("reason"):
        lines.append(f"Gate: {escape(str(metrics['reason']))}")
    lines.append("Approve to serve it to everyone; Reject to discard it (its corrections are not retried).")
    return "\n".join(lines)


def review_approved(name: str) -> str:
    return f"✅ Approved {escape(name)}: the bot switches to it within a minute."


def review_rejected(name: str) -> str:
    return f"🚫 Rejected {escape(name)}."
