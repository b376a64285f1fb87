"""Forgetting a person, and exporting corrections in the Flickr8k layout."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import itertools
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from storage import CaptionRecord, PhotoRecord, Storage, TrainingExample
from storage.__main__ import parse_since
from storage.export import export_training_data, write_export
from storage.holdout import SALT_FILENAME, is_held_out
from storage.models import Correction

REPO = Path(__file__).resolve().parents[1]
ALICE, BOB, CAROL, DAVE = 1, 2, 3, 4


@pytest.fixture(autouse=True)
def _no_env_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("CAPTIONBOT_DATA_DIR", raising=False)


TEST_SALT = bytes.fromhex("c3" * 32)  # the data folder's holdout salt in these tests


async def salted_storage(data_dir: Path) -> Storage:
    storage = await Storage.open(data_dir=data_dir)
    (data_dir / SALT_FILENAME).write_text(TEST_SALT.hex())
    return storage


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Storage]:
    async with await salted_storage(tmp_path / "data") as storage:
        yield storage


def photo_bytes(tag: str, validation: bool | None = None) -> bytes:
    """Distinct photo bytes; optionally ones whose hash is held out (the validation split) or not."""
    for n in itertools.count():
        data = f"{tag}-{n}".encode() * 40
        if validation is None:
            return data
        if is_held_out(hashlib.sha256(data).hexdigest(), TEST_SALT) == validation:
            return data
    raise AssertionError("unreachable")


async def photo(store: Storage, data: bytes, sender: int) -> PhotoRecord:
    return await store.record_photo(
        data, width=4, height=3, telegram_file_unique_id=None, sender_telegram_id=sender
    )


async def caption(store: Storage, photo_: PhotoRecord, requester: int, text: str) -> CaptionRecord:
    return await store.record_caption(
        photo_.id,
        model_version="base",
        text=text,
        score=-1.0,
        beam_size=3,
        latency_ms=10.0,
        requester_telegram_id=requester,
    )


# ---------------------------------------------------------------- forget


async def test_forget_person_deletes_their_data_only(store: Storage) -> None:
    shared = await photo(store, b"shared photo bytes", ALICE)
    await photo(store, b"shared photo bytes", BOB)
    private = await photo(store, b"alice's private photo", ALICE)
    bobs = await photo(store, b"bob's photo", BOB)
    alice_on_shared = await caption(store, shared, ALICE, "two people on a bench")
    alice_private = await caption(store, private, ALICE, "a birthday cake")
    bob_on_shared = await caption(store, shared, BOB, "a park bench")
    bob_own = await caption(store, bobs, BOB, "a red car")
    await store.record_vote(alice_private.id, BOB, True)  # Bob's vote on Alice's caption: goes with it
    await store.record_vote(bob_own.id, ALICE, True)  # Alice's vote on Bob's caption: goes
    await store.record_vote(bob_own.id, CAROL, False)  # stays
    await store.record_correction(bob_on_shared.id, ALICE, "an empty park bench")  # goes
    await store.record_correction(alice_on_shared.id, CAROL, "two friends on a bench")  # goes with caption
    await store.record_correction(bob_on_shared.id, CAROL, "a bench under a tree")  # stays
    await store.start_correction(ALICE, bob_own.id)
    await store.start_correction(CAROL, alice_private.id)
    private_file = store.resolve_photo_path(private)
    shared_file = store.resolve_photo_path(shared)

    report = await store.forget_person(ALICE)

    assert report.found and report.telegram_id == ALICE
    assert (report.captions, report.photos, report.files_deleted) == (2, 1, 1)
    assert (report.votes, report.corrections, report.pending) == (2, 2, 2)
    assert not private_file.exists() and shared_file.exists()
    assert await store.get_photo(private.id) is None and await store.get_photo(shared.id) is not None
    assert await store.get_caption(alice_on_shared.id) is None
    assert await store.get_caption(alice_private.id) is None
    kept = await store.get_caption(bob_own.id)
    assert kept is not None and (kept.votes_up, kept.votes_down) == (0, 1)
    assert await store.get_pending_correction(ALICE) is None
    assert await store.get_pending_correction(CAROL) is None
    texts = [e.text for e in await store.corrections_for_training(include_upvoted=True)]
    assert texts == ["a bench under a tree"]
    assert await store.get_person(ALICE) is None  # the person row went too
    assert (await store.stats()).people == 2

    again = await store.forget_person(ALICE)
    assert not again.found and (again.captions, again.photos, again.votes) == (0, 0, 0)


async def test_forgotten_person_comes_back_for_new_data_only(store: Storage) -> None:
    old = await photo(store, b"old photo", ALICE)
    await store.upsert_person(ALICE, "de")
    await store.forget_person(ALICE)
    back = await store.upsert_person(ALICE, "fr")
    assert back.created and back.language_code == "fr" and back.prior_flags == 0
    assert await store.get_photo(old.id) is None
    again = await photo(store, b"old photo", ALICE)
    assert again.created and store.resolve_photo_path(again).read_bytes() == b"old photo"


async def test_forget_keeps_photo_sent_again_concurrently(store: Storage) -> None:
    """A photo re-sent while its last sender is forgotten keeps its file."""
    data = b"contested photo"
    await photo(store, data, ALICE)
    _, resent = await asyncio.gather(store.forget_person(ALICE), photo(store, data, BOB))
    assert store.resolve_photo_path(resent).read_bytes() == data
    assert await store.get_photo(resent.id) is not None


# ---------------------------------------------------------------- export


async def _populate(store: Storage) -> dict[str, PhotoRecord]:
    photos = {
        "train": await photo(store, photo_bytes("train", validation=False), ALICE),
        "val": await photo(store, photo_bytes("val", validation=True), BOB),
        "liked": await photo(store, photo_bytes("liked", validation=False), BOB),
        "forgotten": await photo(store, photo_bytes("forgotten"), DAVE),
    }
    train_caption = await caption(store, photos["train"], ALICE, "a dog")
    val_caption = await caption(store, photos["val"], BOB, "a cat")
    liked_caption = await caption(store, photos["liked"], BOB, "children playing football in a park")
    dave_caption = await caption(store, photos["forgotten"], DAVE, "a secret")
    await store.record_correction(train_caption.id, ALICE, 'a brown dog, wet, "shaking" itself')
    await store.record_correction(train_caption.id, CAROL, "a dog shakes off water")
    await store.record_correction(val_caption.id, ALICE, "a cat sleeping on a sofa")
    await store.record_correction(dave_caption.id, DAVE, "dave's private words")
    await store.record_correction(val_caption.id, DAVE, "dave on the cat")
    await store.record_vote(liked_caption.id, CAROL, True)
    await store.forget_person(DAVE)
    return photos


def _read_export(out: Path) -> tuple[list[list[str]], list[str], list[str]]:
    with (out / "captions.txt").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    train = (out / "train.txt").read_text().split()
    val = (out / "val.txt").read_text().split()
    return rows, train, val


async def test_export_writes_flickr_layout(store: Storage, tmp_path: Path) -> None:
    photos = await _populate(store)
    out = tmp_path / "export"
    report = await export_training_data(store, out)
    rows, train, val = _read_export(out)

    name = {key: f"{p.sha256}.jpg" for key, p in photos.items()}
    assert rows[0] == ["image", "caption"]
    assert sorted(rows[1:]) == sorted(
        [
            [name["train"], 'a brown dog, wet, "shaking" itself'],
            [name["train"], "a dog shakes off water"],
            [name["val"], "a cat sleeping on a sofa"],
        ]
    )
    assert (out / "captions.txt").read_text().startswith("image,caption\n")
    assert train == [name["train"]] and val == [name["val"]]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([name["train"], name["val"]])
    for key in ("train", "val"):
        assert (out / "images" / name[key]).read_bytes() == store.resolve_photo_path(photos[key]).read_bytes()
    assert (report.images, report.captions, report.train, report.val, report.missing_files) == (2, 3, 1, 1, 0)

    everything = (out / "captions.txt").read_text() + "".join(p.name for p in (out / "images").iterdir())
    assert "dave" not in everything and "secret" not in everything and name["forgotten"] not in everything


async def test_export_with_upvoted_since_and_rerun(store: Storage, tmp_path: Path) -> None:
    photos = await _populate(store)
    out = tmp_path / "export"
    await export_training_data(store, out, include_upvoted=True)
    rows, train, _ = _read_export(out)
    liked = f"{photos['liked'].sha256}.jpg"
    assert [liked, "children playing football in a park"] in rows
    assert liked in train
    first_pass = {p: (out / p).read_bytes() for p in ("captions.txt", "train.txt", "val.txt")}
    await export_training_data(store, out, include_upvoted=True)
    assert {p: (out / p).read_bytes() for p in first_pass} == first_pass, "exports are deterministic"

    async with store.engine.begin() as conn:
        await conn.execute(update(Correction).values(created_at=datetime.now(UTC) - timedelta(days=10)))
    report = await export_training_data(store, out, since=datetime.now(UTC) - timedelta(days=1))
    rows, train, val = _read_export(out)
    assert rows == [["image", "caption"]] and train == [] and val == []
    assert report.images == 0 and list((out / "images").iterdir()) == [], "stale images are removed"


async def test_export_skips_missing_photo_files(store: Storage, tmp_path: Path) -> None:
    photos = await _populate(store)
    store.resolve_photo_path(photos["val"]).unlink()
    report = await export_training_data(store, tmp_path / "out")
    rows, _, val = _read_export(tmp_path / "out")
    assert report.missing_files == 1 and val == [] and len(rows) == 3


def test_export_validation_split_is_the_held_out_fifth(tmp_path: Path) -> None:
    """val.txt lists exactly the photos ``storage.holdout.is_held_out`` picks under the salt, the rule
    fine-tuning uses (each photo from a different person: no per-person share applies)."""
    examples = []
    for n in range(40):
        data = f"split photo {n}".encode() * 30
        sha = hashlib.sha256(data).hexdigest()
        source = tmp_path / "photos" / f"{sha}.jpg"
        source.parent.mkdir(exist_ok=True)
        source.write_bytes(data)
        created = datetime(2024, 1, 1, tzinfo=UTC)
        examples.append(
            TrainingExample("correction", n, n, n, sha, source.name, source, f"photo {n}", created, None, n)
        )
    held_out = {f"{ex.sha256}.jpg" for ex in examples if is_held_out(ex.sha256, TEST_SALT)}
    assert 0 < len(held_out) < len(examples), "the sample must have photos on both sides"

    report = write_export(examples, tmp_path / "out", TEST_SALT)
    _, train, val = _read_export(tmp_path / "out")

    assert set(val) == held_out and len(val) == len(held_out)
    assert set(train) == {f"{ex.sha256}.jpg" for ex in examples} - held_out
    assert (report.train, report.val) == (len(examples) - len(held_out), len(held_out))
    for name in ("captions.txt", "train.txt", "val.txt", f"images/{val[0]}"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
    assert not list((tmp_path / "out").rglob(".tmp-*")), "no temp files left behind"


def test_parse_since() -> None:
    assert parse_since("2024-05-01") == datetime(2024, 5, 1, tzinfo=UTC)
    assert parse_since("2024-05-01T10:00:00+02:00").utcoffset() == timedelta(hours=2)


def _cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "storage", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


async def test_cli_export_and_stats(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with await salted_storage(data_dir) as store:
        photos = await _populate(store)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CAPTIONBOT_DATA_DIR")}
    env["PYTHONPATH"] = str(REPO)
    out = tmp_path / "exported"
    url = f"sqlite+aiosqlite:///{data_dir / 'captionbot.db'}"
    common = ["--database-url", url, "--data-dir", str(data_dir)]
    args = ["export", "--out", str(out), "--include-upvoted", "--since", "2000-01-01", *common]
    exported = _cli(args, tmp_path, env)
    assert exported.returncode == 0, exported.stderr
    assert "exported 4 captions of 3 images" in exported.stdout
    rows, train, val = _read_export(out)
    assert len(rows) == 5 and len(train) + len(val) == 3
    assert f"{photos['liked'].sha256}.jpg" in train

    stats = _cli(["stats", "--days", "2", *common], tmp_path, env)
    assert stats.returncode == 0, stats.stderr
    assert "corrections 3 (untrained 3)" in stats.stdout
