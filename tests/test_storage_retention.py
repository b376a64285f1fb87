"""Retention and the per-person quota (issue 12): which photos go, and that all of them goes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from storage import Storage
from storage import __main__ as storage_cli
from storage.models import Caption, Correction, Photo, PhotoSender, Vote
from tests.test_storage_api import ALICE, BOB, add_caption, add_photo
from tests.test_storage_api import store as store  # the temporary-storage fixture

NOW = datetime(2026, 6, 1, tzinfo=UTC)


async def age(store: Storage, photo_id: int, days: float) -> None:
    async with store.engine.begin() as connection:
        await connection.execute(update(Photo).where(Photo.id == photo_id).values(
            created_at=NOW - timedelta(days=days)))


async def rows(store: Storage, table: type) -> int:
    async with store.engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(table))).scalar_one())


async def test_retention_keeps_what_is_young_or_waiting_for_training(store: Storage) -> None:
    old_plain = await add_photo(store, b"old plain")
    young = await add_photo(store, b"young")
    old_corrected = await add_photo(store, b"old corrected")
    trained_long_ago = await add_photo(store, b"trained long ago")
    for photo, days in ((old_plain, 31), (young, 29), (old_corrected, 400), (trained_long_ago, 400)):
        await age(store, photo.id, days)
    plain_caption = await add_caption(store, old_plain)
    await store.record_vote(plain_caption.id, BOB, True)
    await store.record_correction((await add_caption(store, old_corrected)).id, ALICE, "a cat on a mat")
    trained = await store.record_correction((await add_caption(store, trained_long_ago)).id, ALICE,
                                            "a bird in a tree")
    await store.mark_corrections_trained([trained.id], "v2")
    async with store.engine.begin() as connection:
        await connection.execute(update(Correction).where(Correction.id == trained.id).values(
            trained_at=NOW - timedelta(days=100)))
    paths = {p.id: store.resolve_photo_path(p) for p in (old_plain, young, old_corrected, trained_long_ago)}

    assert await store.apply_retention(30, 365, now=NOW) == 1  # only the old untouched photo
    assert not paths[old_plain.id].exists() and await store.get_photo(old_plain.id) is None
    assert await store.get_caption(plain_caption.id) is None and await rows(store, Vote) == 0
    assert all(paths[p.id].exists() for p in (young, old_corrected, trained_long_ago))

    # Trained on 100 days ago: kept for a year of training retention, gone with 90 days.
    assert await store.apply_retention(30, 90, now=NOW) == 1
    assert not paths[trained_long_ago.id].exists()
    assert await store.get_photo(old_corrected.id) is not None  # its correction is not trained yet


async def test_quota_removes_a_persons_oldest_photos_only(store: Storage) -> None:
    photos = [await add_photo(store, bytes([i]) * 1000, sender=ALICE) for i in range(5)]
    for i, photo in enumerate(photos):
        await age(store, photo.id, 10 - i)  # photos[0] is the oldest
    shared = await add_photo(store, b"s" * 1000, sender=ALICE)
    await add_photo(store, b"s" * 1000, sender=BOB)  # Bob sent it too: not only Alice's to lose
    bobs = await add_photo(store, b"b" * 5000, sender=BOB)
    assert await store.enforce_quota(ALICE, 3000) == 2
    assert [await store.get_photo(p.id) is None for p in photos] == [True, True, False, False, False]
    assert await store.get_photo(shared.id) is not None and await store.get_photo(bobs.id) is not None
    assert await rows(store, PhotoSender) == 6  # 3 of Alice's, the shared photo twice, Bob's own
    assert await store.enforce_quota(ALICE, 3000) == 0
    assert await rows(store, Caption) == 0


def test_storage_sweep_command_applies_retention(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"

    async def prepare() -> tuple[int, int]:
        async with await Storage.open(data_dir=data, database_url=None) as store:
            old, new = await add_photo(store, b"old"), await add_photo(store, b"new")
            await age(store, old.id, 31)
            return old.id, new.id

    old, new = asyncio.run(prepare())
    assert storage_cli.main(["sweep", "--data-dir", str(data)]) == 0
    assert "deleted 1 photos past their retention" in capsys.readouterr().out

    async def remaining() -> list[int]:
        async with await Storage.open(data_dir=data, database_url=None) as store:
            return [p for p in (old, new) if await store.get_photo(p) is not None]

    assert asyncio.run(remaining()) == [new]


async def test_forget_leaves_nothing_of_the_person_in_the_inbox(store: Storage) -> None:
    from storage import InboxItem
    from storage.models import InboxEntry

    for message_id, sender in ((1, ALICE), (2, ALICE), (3, BOB)):
        item = InboxItem(sender, "private", message_id, sender, "photo", f"f{message_id}", f"u{message_id}", 10)
        assert await store.inbox_receive(item)
    await add_caption(store, await add_photo(store, b"alice's"))  # so that Alice has a person row
    await store.forget_person(ALICE)
    async with store.engine.connect() as connection:
        senders = (await connection.execute(select(InboxEntry.sender_id))).scalars().all()
    assert list(senders) == [BOB]
