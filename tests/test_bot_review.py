"""Admins review a candidate that adds words in Telegram: a message with the new words, the
corrections and photos that taught them, the gate's figures, and Approve / Reject that only admins
can press and that only work under the message sent for that candidate."""

from __future__ import annotations

from typing import Any

import pytest

from bot import texts
from storage import ModelStatus
from tests.bot_support import ADMIN_ID
from tests.helpers import photo_bytes
from tests.test_bot_e2e import Env, env  # noqa: F401 - the module's running bot

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]


async def _waiting_candidate(env: Env, name: str) -> int:  # noqa: F811
    storage = env.storage
    ids = []
    for person in (501, 502, 503):
        photo = await storage.record_photo(photo_bytes(person), width=8, height=8, telegram_file_unique_id=None,
                                           sender_telegram_id=person)
        caption = await storage.record_caption(photo.id, model_version="m", text="a dog runs", score=0.0,
                                               beam_size=1, latency_ms=1.0, requester_telegram_id=person)
        ids.append((await storage.record_correction(caption.id, person, f"a unicycle ridden by rider {person}")).id)
    await storage.mark_corrections_trained(ids, name)
    metrics = {"new_words": ["unicycle"], "reason": "held-out corrections CIDEr 0.1 -> 0.5",
               "base": {"corrections": {"CIDEr": 0.1}, "validation": {"CIDEr": 0.5}},
               "candidate": {"corrections": {"CIDEr": 0.5}, "validation": {"CIDEr": 0.49}}}
    version = await storage.register_model_version(name, str(env.settings.model), None, metrics,
                                                   status=ModelStatus.AWAITING_REVIEW)
    return int(version.id)


async def test_admins_review_a_candidate_and_only_admins_decide(env: Env) -> None:  # noqa: F811
    fake = env.fake
    version_id = await _waiting_candidate(env, "cand-review")

    def review_message() -> dict[str, Any] | None:
        return next((m for m in fake.bot_messages(ADMIN_ID) if "cand-review" in str(m.get("text"))
                     and m.get("reply_markup")), None)

    message = await fake.wait_for(review_message, what="the review request")
    assert "unicycle" in message["text"] and "a unicycle ridden by rider 501" in message["text"]
    assert "CIDEr 0.100 → 0.500" in message["text"]
    photos = [c for c in fake.calls_of("sendPhoto") if str(c.params.get("chat_id")) == str(ADMIN_ID)]
    assert len(photos) == 2  # a few photos per new word

    stranger = fake.person(777, "Mallory")
    query = await stranger.press(message, texts.BUTTON_APPROVE)
    assert (await fake.wait_answer(query))["text"] == texts.REVIEW_ADMINS_ONLY
    forged = await env.admin.press_data(message, f"r:a:{version_id + 1}")  # another candidate's id
    assert (await fake.wait_answer(forged))["text"] == texts.REVIEW_EXPIRED
    assert (await env.storage.get_model_version("cand-review")).status == ModelStatus.AWAITING_REVIEW

    query = await env.admin.press(message, texts.BUTTON_APPROVE)
    await fake.wait_answer(query)
    assert (await env.storage.get_model_version("cand-review")).status == ModelStatus.ACTIVE
    again = await env.admin.press_data(message, f"r:r:{version_id}")
    assert (await fake.wait_answer(again))["text"] == texts.REVIEW_ALREADY_DECIDED
    await fake.wait_for(lambda: [m for m in fake.bot_messages(ADMIN_ID) if m.get("text") ==
                                 texts.review_approved("cand-review")], what="the approval note")
