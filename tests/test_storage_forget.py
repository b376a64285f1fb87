"""/forget leaves nothing of the person behind: every table, every file, the exports, the models.

The scenario and the scan are ``bench/forget_audit.py``'s (the bench records the same listing in
``bench/results/forget_audit.json``); here each finding is asserted.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench.forget_audit import Y_CORRECTION, X, Y, audit, play, scan_files, what_stays
from storage import CorrectionStatus, ModelVersionError, Storage
from storage.export import export_training_data
from storage.keys import FORGET_KEY_FILENAME, person_hash
from storage.screening import EntryPolicy
from tests.helpers import photo_bytes


async def test_forget_leaves_no_trace_in_any_table_or_file(tmp_path: Path) -> None:
    data_dir, export_dir = tmp_path / "data", tmp_path / "export"
    storage = await Storage.open(data_dir=data_dir)
    try:
        scenario = await play(storage, data_dir, export_dir)
        before = await audit(scenario)
        # The scan finds each trace where the bot keeps it: it is not blind.
        assert set(before["tables_with_traces"]) >= {"people", "photos", "photo_senders", "captions", "votes",
                                                     "corrections", "pending_corrections", "inbox"}
        found_before = {t for table in before["tables"].values() for t in table["rows_with_traces"]}
        assert found_before == {"telegram_id", "person_id", "photo_sha256", "correction_text"}
        assert any(name.startswith("data/photos/") for name in before["files_with_traces"])
        assert "export/captions.txt" in before["files_with_traces"]
        assert {"export/train.txt", "export/val.txt"} & set(before["files_with_traces"])  # the salt decides which

        report = await storage.forget_person(X)
        after = await audit(scenario)
        stays = await what_stays(scenario)
    finally:
        await storage.close()

    assert report.found and (report.photos, report.files_deleted, report.exports_rewritten) == (1, 1, 1)
    assert report.models_marked == 2 and report.exports_failed == ()
    assert after["tables_with_traces"] == [], after["tables"]
    assert after["files_with_traces"] == [], (after["data_folder_files"], after["export_folder_files"])
    assert len(after["tables"]) == len(before["tables"]) >= 11  # every table of the schema was scanned
    # Once closed (SQLite checkpoints the write-ahead log into the file), still nothing.
    assert [name for name, info in scan_files(data_dir, scenario.traces).items() if info["traces"]] == []

    # What stays, on purpose: a keyed hash and the flag count (X had one flagged correction).
    assert stays["forgotten_people"] == [{"hash_hex_digits": 64, "flags": 1}]
    # Y's photo (also sent by X), caption and correction stay; the correction is offered to the next run
    # again, because the model that learned it also learned from X.
    assert stays["shared_photo_file_kept"] and stays["y_correction"] == {"kept": True, "trained_model_version": None}
    assert stays["counts"]["people"] == 1 and stays["counts"]["photos"] == 1
    versions = stays["model_versions"]
    assert versions["base"]["forgotten_data"] is False
    assert versions["ft-1"] == {"status": "active", "forgotten_data": True, "reason": None}  # serves until replaced
    assert versions["ft-2"]["status"] == "rejected" and versions["ft-2"]["forgotten_data"] is True
    assert Y_CORRECTION in (export_dir / "captions.txt").read_text()


async def test_the_hash_carries_flags_to_a_returning_person(tmp_path: Path) -> None:
    policy = EntryPolicy(flags_before_hold=2)
    storage = await Storage.open(data_dir=tmp_path, policy=policy)
    try:
        photo = await storage.record_photo(photo_bytes(1), width=96, height=80, telegram_file_unique_id=None,
                                           sender_telegram_id=X)
        caption = await storage.record_caption(photo.id, model_version="m", text="a dog runs", score=-1.0,
                                               beam_size=3, latency_ms=1.0, requester_telegram_id=X)
        other = await storage.record_caption(photo.id, model_version="m", text="a cat sits", score=-1.0,
                                             beam_size=3, latency_ms=1.0, requester_telegram_id=X)
        assert (await storage.record_correction(caption.id, X, "see www.spam.example now")).status == "flagged"
        assert (await storage.record_correction(other.id, X, "call me at +1 555 123 4567")).status == "flagged"
        await storage.forget_person(X)
        await storage.forget_person(Y)  # never seen: nothing kept for them
        key = (tmp_path / FORGET_KEY_FILENAME).read_text().strip()
        assert (tmp_path / FORGET_KEY_FILENAME).stat().st_mode & 0o077 == 0
        async with storage.engine.connect() as conn:
            rows = (await conn.exec_driver_sql("SELECT hash, flags FROM forgotten_people")).all()
        assert [tuple(r) for r in rows] == [(person_hash(bytes.fromhex(key), X), 2)]

        # X comes back: the earlier flags count, so a clean correction is held for review at once.
        back = await storage.upsert_person(X, "en")
        assert back.created and back.prior_flags == 2
        photo = await storage.record_photo(photo_bytes(2), width=96, height=80, telegram_file_unique_id=None,
                                           sender_telegram_id=X)
        caption = await storage.record_caption(photo.id, model_version="m", text="a dog runs", score=-1.0,
                                               beam_size=3, latency_ms=1.0, requester_telegram_id=X)
        held = await storage.record_correction(caption.id, X, "a brown dog runs on grass")
        assert held.status == CorrectionStatus.HELD_FOR_REVIEW
        async with storage.engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT count(*) FROM forgotten_people")).scalar() == 0
        # Forgotten again: the count goes on (2 before, none flagged since).
        await storage.forget_person(X)
        async with storage.engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT flags FROM forgotten_people")).scalar() == 2
    finally:
        await storage.close()


async def test_a_model_that_learned_from_a_forgotten_person_is_never_activated_or_a_base(tmp_path: Path) -> None:
    storage = await Storage.open(data_dir=tmp_path)
    try:
        photo = await storage.record_photo(photo_bytes(3), width=96, height=80, telegram_file_unique_id=None,
                                           sender_telegram_id=X)
        caption = await storage.record_caption(photo.id, model_version="m", text="a dog runs", score=-1.0,
                                               beam_size=3, latency_ms=1.0, requester_telegram_id=X)
        correction = await storage.record_correction(caption.id, X, "a brown dog runs on grass")
        await storage.register_model_version("base", "b", None, {}, status="active")
        await storage.register_model_version("ft-1", "f1", "base", {}, status="active")
        await storage.register_model_version("ft-2", "f2", "ft-1", {}, status="rejected")
        await storage.register_model_version("ft-3", "f3", "ft-2", {}, status="candidate")
        await storage.mark_corrections_trained([correction.id], "ft-2")  # a rejected run learned it too
        await storage.forget_person(X)
        marked = {v.name for v in await storage.list_model_versions() if v.forgotten_data}
        assert marked == {"ft-2", "ft-3"}  # ft-2 and what descends from it; not its ancestors
        with pytest.raises(ModelVersionError, match="/forget"):
            await storage.promote_model_version("ft-3")
        clean = await storage.clean_base("ft-3")
        assert clean is not None and clean.name == "ft-1"
        assert await storage.clean_base("unknown") is None
    finally:
        await storage.close()


async def test_an_export_folder_that_is_gone_is_skipped(tmp_path: Path) -> None:
    storage = await Storage.open(data_dir=tmp_path / "data")
    try:
        await play(storage, tmp_path / "data", tmp_path / "export")
        await export_training_data(storage, tmp_path / "second")
        assert [Path(e.path).name for e in await storage.known_exports()] == ["export", "second"]
        shutil.rmtree(tmp_path / "second")
        report = await storage.forget_person(X)
        assert report.exports_rewritten == 1 and not (tmp_path / "second").exists()
    finally:
        await storage.close()
