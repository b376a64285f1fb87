"""Corrections weighed by people at entry: one per person and caption, a daily cap, screening,
people whose corrections keep being flagged, outcomes of the runs that looked at them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from storage import (
    CaptionRecord,
    CorrectionOutcome,
    CorrectionRejected,
    CorrectionStatus,
    FlagReason,
    ModelStatus,
    Storage,
)
from storage import migrate as migrations
from storage.engine import create_engine
from storage.errors import Rejection
from storage.screening import BlocklistFile, EntryPolicy, Screen, parse_blocklist

ALICE, BOB = 101, 202


@pytest.fixture(autouse=True)
def _no_env_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CAPTIONBOT_DATA_DIR", raising=False)


async def _open(tmp_path: Path, **policy: int) -> Storage:
    return await Storage.open(data_dir=tmp_path / "data", policy=EntryPolicy(**policy))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = await _open(tmp_path, daily_cap=3, flags_before_hold=2)
    try:
        yield storage
    finally:
        await storage.close()


async def caption(store: Storage, n: int) -> CaptionRecord:
    photo = await store.record_photo(
        f"photo {n}".encode(), width=8, height=8, telegram_file_unique_id=None, sender_telegram_id=ALICE
    )
    return await store.record_caption(
        photo.id, model_version="base", text="a dog runs on the grass", score=-1.0, beam_size=3,
        latency_ms=1.0, requester_telegram_id=ALICE,
    )


async def training_ids(store: Storage) -> set[int]:
    return {ex.source_id for ex in await store.corrections_for_training(untrained_only=True)}


# ---------------------------------------------------------------- one per person and caption


async def test_a_later_correction_replaces_the_earlier_in_place(store: Storage) -> None:
    first_caption = await caption(store, 1)
    first = await store.record_correction(first_caption.id, ALICE, "a brown dog on a lawn")
    again = await store.record_correction(first_caption.id, ALICE, "a brown dog on a lawn")
    later = await store.record_correction(first_caption.id, ALICE, "a puppy sleeping on the grass")
    other = await store.record_correction(first_caption.id, BOB, "a brown dog on a lawn")
    assert (first.replaced, again.replaced, later.replaced) == (False, False, True)
    assert again.id == later.id == first.id  # the id stays stable
    assert later.text == "a puppy sleeping on the grass"
    assert other.id != first.id
    examples = await store.corrections_for_training()
    assert sorted(ex.text for ex in examples) == ["a brown dog on a lawn", "a puppy sleeping on the grass"]
    assert (await store.stats()).corrections == 2


async def test_replacing_a_looked_at_correction_offers_the_new_text_again(store: Storage) -> None:
    c = await caption(store, 1)
    first = await store.record_correction(c.id, ALICE, "a brown dog on a lawn")
    await store.mark_corrections_trained([first.id], "m1")
    assert await training_ids(store) == set()
    await store.record_correction(c.id, ALICE, "a brown dog running on a lawn")
    assert await training_ids(store) == {first.id}


async def test_daily_cap_counts_new_corrections_not_replacements(store: Storage) -> None:
    captions = [await caption(store, n) for n in range(4)]
    for c in captions[:3]:
        await store.record_correction(c.id, ALICE, "a brown dog on a lawn")
    with pytest.raises(CorrectionRejected) as caught:
        await store.record_correction(captions[3].id, ALICE, "a brown dog on a lawn")
    assert caught.value.code == Rejection.DAILY_LIMIT and caught.value.details == {"limit": 3}
    replaced = await store.record_correction(captions[0].id, ALICE, "a puppy on a lawn")
    assert replaced.replaced
    assert (await store.record_correction(captions[3].id, BOB, "a brown dog on a lawn")).status == "accepted"


async def test_a_zero_cap_means_no_cap(tmp_path: Path) -> None:
    store = await _open(tmp_path, daily_cap=0)
    try:
        for n in range(25):
            await store.record_correction((await caption(store, n)).id, ALICE, "a brown dog on a lawn")
        assert (await store.stats()).corrections == 25
    finally:
        await store.close()


# ---------------------------------------------------------------- screening


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        ("a dog visit spamcoin.com now", FlagReason.URL),
        ("a dog https://x.example/p", FlagReason.URL),
        ("a dog, follow www.example.org", FlagReason.URL),
        ("a dog, message @spammer", FlagReason.MENTION),
        ("a dog, write to me at troll@example.com", FlagReason.EMAIL),
        ("a dog call +1 (555) 123-4567", FlagReason.PHONE),
        ("a dog call 0123456789", FlagReason.PHONE),
        ("a fucking dog on the grass", FlagReason.PROFANITY),
        ("a sh1t dog on the grass", FlagReason.PROFANITY),
    ],
)
def test_screen_flags_contact_details_and_abuse(typed: str, reason: FlagReason) -> None:
    assert Screen().flag_reason(typed) == reason


@pytest.mark.parametrize(
    "clean",
    [
        "a man wearing number 23 shoots a basketball",
        "two dogs run across a field in 2012",
        "a woman in a red jacket walks past a shop window",
        "a boy e.g. jumps into the pool",
        "three people stand at 10 am on a street",
    ],
)
def test_screen_passes_ordinary_captions(clean: str) -> None:
    assert Screen().flag_reason(clean) is None


def test_blocklist_matches_whole_words_and_phrases() -> None:
    entries = parse_blocklist(["# spam words", "spamcoin", "Buy Now  # phrase", "", "   "])
    assert entries == {"spamcoin", "buy now"}
    screen = Screen(entries)
    assert screen.flag_reason("a man holds SpamCoin") == FlagReason.BLOCKLIST
    assert screen.flag_reason("a sign says buy now on a wall") == FlagReason.BLOCKLIST
    assert screen.flag_reason("a spamcoins sign") is None  # a word, not a substring
    assert screen.flag_reason("people buy fruit now and then") is None


def test_blocklist_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "blocklist.txt"
    blocklist = BlocklistFile(path)
    assert blocklist.entries() == frozenset()  # no file yet: nothing blocked
    path.write_text("slurword\n")
    assert blocklist.entries() == {"slurword"}
    path.write_text("slurword\nspamcoin\n")
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    assert blocklist.entries() == {"slurword", "spamcoin"}


async def test_flagged_corrections_are_stored_never_trained_and_then_people_are_held(tmp_path: Path) -> None:
    (tmp_path / "blocklist.txt").write_text("slurword\n")
    policy = EntryPolicy(daily_cap=0, flags_before_hold=2, blocklist=BlocklistFile(tmp_path / "blocklist.txt"))
    store = await Storage.open(data_dir=tmp_path / "data", policy=policy)
    try:
        captions = [await caption(store, n) for n in range(4)]
        first = await store.record_correction(captions[0].id, ALICE, "a slurword on the grass")
        clean = await store.record_correction(captions[1].id, ALICE, "a dog lying on the grass")
        second = await store.record_correction(captions[2].id, ALICE, "a dog at spamcoin.com")
        held = await store.record_correction(captions[3].id, ALICE, "a dog sitting on the grass")
        bob = await store.record_correction(captions[3].id, BOB, "a dog sitting on the grass")
        assert (first.status, first.flag_reason) == (CorrectionStatus.FLAGGED, FlagReason.BLOCKLIST)
        assert (second.status, second.flag_reason) == (CorrectionStatus.FLAGGED, FlagReason.URL)
        assert clean.status == bob.status == CorrectionStatus.ACCEPTED
        assert held.status == CorrectionStatus.HELD_FOR_REVIEW  # clean, but Alice was flagged twice
        assert await training_ids(store) == {clean.id, bob.id}
        assert (await store.stats()).corrections == 5  # all stored, for review
    finally:
        await store.close()


async def test_an_operator_releases_or_deletes_what_screening_kept_back(tmp_path: Path) -> None:
    (tmp_path / "blocklist.txt").write_text("slurword\n")
    policy = EntryPolicy(daily_cap=0, flags_before_hold=1, blocklist=BlocklistFile(tmp_path / "blocklist.txt"))
    store = await Storage.open(data_dir=tmp_path / "data", policy=policy)
    try:
        captions = [await caption(store, n) for n in range(3)]
        junk = await store.record_correction(captions[0].id, ALICE, "a slurword on the grass \x1b[2J")
        held = await store.record_correction(captions[1].id, ALICE, "a dog sitting on the grass")
        fine = await store.record_correction(captions[2].id, BOB, "a dog lying on the grass")
        assert [r.id for r in await store.corrections_under_review()] == [junk.id, held.id]
        # Only corrections under review change: an accepted one is neither released nor deleted.
        assert await store.release_corrections([held.id, fine.id]) == 1
        assert await store.delete_corrections_under_review([junk.id, fine.id]) == 1
        assert await training_ids(store) == {held.id, fine.id}
        assert await store.corrections_under_review() == []
    finally:
        await store.close()


def test_review_command_lists_and_deletes_flagged_corrections(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from storage.__main__ import main

    async def flag_one() -> None:
        store = await Storage.open(data_dir=tmp_path / "data")
        try:
            await store.record_correction((await caption(store, 0)).id, ALICE, "a dog at spamcoin.com again")
        finally:
            await store.close()

    asyncio.run(flag_one())
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["review", *data]) == 0
    listed = capsys.readouterr().out
    assert "flagged" in listed and " url " in listed and "'a dog at spamcoin.com again'" in listed
    flagged_id = int(listed.split()[0])
    assert main(["review", *data, "--delete", str(flagged_id)]) == 0
    assert "deleted 1 corrections" in capsys.readouterr().out
    assert main(["review", *data]) == 0
    assert capsys.readouterr().out == "no flagged or held corrections\n"


# ---------------------------------------------------------------- outcomes


async def test_every_outcome_keeps_a_correction_from_being_retried(store: Storage) -> None:
    ids = [(await store.record_correction((await caption(store, n)).id, BOB, "a cat on a sofa")).id for n in range(3)]
    assert await store.mark_corrections_trained(ids[:1], "m1") == 1
    assert await store.mark_corrections_trained(ids[1:2], "m2", CorrectionOutcome.REJECTED_RUN) == 1
    assert await training_ids(store) == {ids[2]}
    examples = {ex.source_id: ex for ex in await store.corrections_for_training()}
    assert examples[ids[1]].trained_model_version == "m2"
    async with store.engine.connect() as conn:
        rows = dict((await conn.execute(text("SELECT id, outcome FROM corrections"))).all())
    assert rows == {ids[0]: "trained", ids[1]: "rejected_run", ids[2]: None}


async def test_training_examples_name_their_author(store: Storage) -> None:
    c = await caption(store, 1)
    await store.record_correction(c.id, ALICE, "a brown dog on a lawn")
    await store.record_correction(c.id, BOB, "a small dog on a lawn")
    examples = await store.corrections_for_training()
    assert len({ex.person_id for ex in examples}) == 2 and None not in {ex.person_id for ex in examples}


# ---------------------------------------------------------------- migration 0002


async def test_migration_keeps_duplicates_as_superseded_and_marks_trained_ones(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'old.db'}")

    def to(revision: str) -> object:
        def run(connection: Connection) -> None:
            cfg = migrations.alembic_config()
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, revision)

        return run

    try:
        async with engine.begin() as conn:
            await conn.run_sync(to("0001"))
            for statement in (
                "INSERT INTO people (id, telegram_id, first_seen_at, last_seen_at, is_forgotten)"
                " VALUES (1, 11, '2026-01-01', '2026-01-01', 0), (2, 12, '2026-01-01', '2026-01-01', 1)",
                "INSERT INTO photos (id, sha256, size_bytes, width, height, rel_path, created_at)"
                " VALUES (1, 'ab', 1, 1, 1, 'ab.jpg', '2026-01-01')",
                "INSERT INTO captions (id, photo_id, requester_id, model_version, text, score, beam_size,"
                " latency_ms, created_at) VALUES (1, 1, 1, 'm', 'a dog', 0, 1, 1, '2026-01-01')",
                "INSERT INTO corrections (id, caption_id, person_id, text_raw, text, created_at,"
                " trained_model_version) VALUES (1, 1, 1, 'old one', 'old one', '2026-01-01', 'm0'),"
                " (2, 1, 1, 'new one', 'new one', '2026-01-02', NULL)",
            ):
                await conn.execute(text(statement))
        async with engine.begin() as conn:
            await conn.run_sync(to("head"))
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, text, status, outcome FROM corrections ORDER BY id"))).all()
        assert [tuple(row) for row in rows] == [
            (1, "old one", "superseded", "trained"),
            (2, "new one", "accepted", None),
        ]
        async with engine.connect() as conn:
            people = (await conn.execute(text("SELECT id, telegram_id, prior_flags FROM people"))).all()
        assert [tuple(row) for row in people] == [(1, 11, 0)]  # 0004: the person the old /forget marked is gone
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO model_versions (name, checkpoint_path, metrics, status, created_at)"
                     f" VALUES ('w', 'p', '{{}}', '{ModelStatus.AWAITING_REVIEW.value}', '2026-01-03')")
            )
        for bad in (
            "UPDATE model_versions SET status = 'bogus'",
            "UPDATE corrections SET status = 'bogus' WHERE id = 2",
            "UPDATE corrections SET outcome = 'bogus' WHERE id = 2",
            "UPDATE corrections SET status = 'accepted' WHERE id = 1",  # two live rows for one person and caption
            "INSERT INTO model_versions (name, checkpoint_path, metrics, status, created_at)"  # two active models
            " VALUES ('a1', 'p', '{}', 'active', '2026-01-03'), ('a2', 'p', '{}', 'active', '2026-01-03')",
        ):
            with pytest.raises(IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(text(bad))
    finally:
        await engine.dispose()


# ---------------------------------------------------------------- what the person is told


def test_flagged_and_held_corrections_get_a_neutral_receipt() -> None:
    from datetime import UTC, datetime

    from bot import texts
    from bot.handlers.corrections import correction_answer
    from storage import CorrectionRecord

    def record(status: CorrectionStatus, replaced: bool = False) -> CorrectionRecord:
        return CorrectionRecord(1, 1, ALICE, "a dog", "a dog", datetime.now(UTC), None, status, None, None, replaced)

    assert correction_answer(record(CorrectionStatus.FLAGGED)) == texts.CORRECTION_RECEIVED
    assert correction_answer(record(CorrectionStatus.HELD_FOR_REVIEW, replaced=True)) == texts.CORRECTION_RECEIVED
    assert correction_answer(record(CorrectionStatus.ACCEPTED)) == texts.correction_saved("a dog")
    assert correction_answer(record(CorrectionStatus.ACCEPTED, replaced=True)) == texts.correction_replaced("a dog")
    assert "flag" not in texts.CORRECTION_RECEIVED.lower() and "review" not in texts.CORRECTION_RECEIVED.lower()
