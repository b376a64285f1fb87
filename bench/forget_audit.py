"""What ``/forget`` leaves behind, checked table by table and file by file.

    python bench/forget_audit.py [--out bench/results/forget_audit.json]

One person (X) uses the bot the way people do, through the same ``Storage`` calls the bot makes:
sends two photos (one of them also sent by another person, Y), gets captions posted as messages,
votes on their own and on Y's caption, corrects a caption (a fine-tune trains on it, alongside a
correction of Y's), sends a correction screening flags, starts a correction and leaves it pending,
has a photo request in the durable inbox; an operator exports the corrections for training. Then
X uses /forget.

The audit looks for X's traces before and after: in every table of the schema
(``Base.metadata.sorted_tables``, every row, every column) their Telegram id, their person id (in
the ``people`` key and every column that refers to it), the SHA-256 of the photo only they sent,
and the text of each of their corrections; in every file under the data folder and the export
folder (the SQLite database and its WAL included) a file named by that hash, the photo's bytes,
and the correction texts (UTF-8). The scan before /forget is the baseline of the same run: it
shows that the audit finds each trace where the bot keeps it. What stays afterwards is listed:
rows per table, files, the forgotten-people row (a keyed hash and a flag count), the model
versions marked as having learned from X's corrections, and the state of Y's data.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.report import RESULTS, start_run, write_result  # noqa: E402
from storage import CorrectionStatus, InboxItem, Storage  # noqa: E402
from storage.export import export_training_data  # noqa: E402
from storage.models import Base  # noqa: E402

X, Y = 731_904_226_517, 604_118_392_771  # Telegram ids long enough that no other number contains them
X_CORRECTIONS = ("a golden retriever naps beside a red kayak", "visit www.example.com for cheap kayaks")
Y_CORRECTION = "two people sit on a wooden bench"


def photo(seed: int) -> bytes:
    """A small photo-like JPEG, different per seed."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


@dataclass
class Traces:
    """What identifies X's data, gathered while the scenario runs."""

    telegram_id: int
    person_id: int = 0
    photo_sha256: str = ""
    photo_bytes: bytes = b""
    corrections: tuple[str, ...] = X_CORRECTIONS
    shared_sha256: str = ""


@dataclass
class Scenario:
    storage: Storage
    data_dir: Path
    export_dir: Path
    traces: Traces
    y_correction_id: int = 0
    notes: dict[str, Any] = field(default_factory=dict)


async def play(storage: Storage, data_dir: Path, export_dir: Path) -> Scenario:
    """X and Y use the bot; a fine-tune trains on one correction of each; an operator exports."""
    traces = Traces(X)
    scenario = Scenario(storage, data_dir, export_dir, traces)
    await storage.upsert_person(X, "en")
    own = await storage.record_photo(photo(1), width=64, height=48, telegram_file_unique_id="x-own",
                                     sender_telegram_id=X)
    shared_bytes = photo(2)
    shared = await storage.record_photo(shared_bytes, width=64, height=48, telegram_file_unique_id="y-shared",
                                        sender_telegram_id=Y)
    await storage.record_photo(shared_bytes, width=64, height=48, telegram_file_unique_id="x-shared",
                               sender_telegram_id=X)
    traces.photo_sha256, traces.shared_sha256 = own.sha256, shared.sha256
    traces.photo_bytes = storage.resolve_photo_path(own).read_bytes()
    person = await storage.get_person(X)
    assert person is not None
    traces.person_id = person.id

    x_own = await _caption(storage, own.id, X, "a dog lies on the grass", message_id=11)
    x_shared = await _caption(storage, shared.id, X, "two men on a bench", message_id=12)
    y_shared = await _caption(storage, shared.id, Y, "a man sits on a bench", message_id=21)
    await storage.record_vote(x_own.id, X, False)
    await storage.record_vote(y_shared.id, X, True)
    await storage.record_vote(x_shared.id, Y, True)  # Y's vote on X's caption: goes with the caption
    accepted = await storage.record_correction(x_own.id, X, X_CORRECTIONS[0])
    flagged = await storage.record_correction(x_shared.id, X, X_CORRECTIONS[1])
    y_correction = await storage.record_correction(y_shared.id, Y, Y_CORRECTION)
    scenario.y_correction_id = y_correction.id
    scenario.notes["x_flagged_status"] = flagged.status.value
    await storage.start_correction(X, y_shared.id, prompt_chat_id=X, prompt_message_id=13)
    await storage.inbox_receive(InboxItem(chat_id=X, chat_type="private", message_id=14, sender_id=X, kind="photo",
                                          file_id="x-file-id", file_unique_id="x-unique", file_size=1234))

    # A fine-tune trained on X's and Y's corrections and was activated; a later one descends from it.
    await storage.register_model_version("base", "models/base", None, {}, status="active")
    await storage.register_model_version("ft-1", "runs/ft-1", "base", {"new_words": ["kayak"]}, status="active")
    await storage.mark_corrections_trained([accepted.id, y_correction.id], "ft-1")
    await storage.register_model_version("ft-2", "runs/ft-2", "ft-1", {}, status="awaiting_review")
    await export_training_data(storage, export_dir)
    return scenario


async def _caption(storage: Storage, photo_id: int, requester: int, text: str, message_id: int) -> Any:
    caption = await storage.record_caption(photo_id, model_version="base", text=text, score=-1.0, beam_size=3,
                                           latency_ms=10.0, requester_telegram_id=requester)
    return await storage.set_caption_message(caption.id, chat_id=requester, message_id=message_id)


# ---------------------------------------------------------------------- the audit


def _people_columns() -> set[tuple[str, str]]:
    """(table, column) of the people key and of every column that refers to it."""
    columns = {("people", "id")}
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            if any(fk.column.table.name == "people" for fk in column.foreign_keys):
                columns.add((table.name, column.name))
    return columns


def _row_traces(table: str, row: dict[str, Any], traces: Traces, people_columns: set[tuple[str, str]]) -> set[str]:
    found = set()
    for column, value in row.items():
        text = str(value)
        if str(traces.telegram_id) in text:
            found.add("telegram_id")
        if (table, column) in people_columns and value == traces.person_id:
            found.add("person_id")
        if traces.photo_sha256 in text:
            found.add("photo_sha256")
        if any(correction in text for correction in traces.corrections):
            found.add("correction_text")
    return found


async def scan_tables(storage: Storage, traces: Traces) -> dict[str, dict[str, Any]]:
    """Every table: how many rows, and which of X's traces its rows hold (with how many rows)."""
    people_columns = _people_columns()
    result: dict[str, dict[str, Any]] = {}
    async with storage.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = [dict(row._mapping) for row in (await conn.execute(select(table))).all()]
            found: Counter[str] = Counter()
            for row in rows:
                found.update(_row_traces(table.name, row, traces, people_columns))
            result[table.name] = {"rows": len(rows), "rows_with_traces": dict(sorted(found.items()))}
    return result


def scan_files(folder: Path, traces: Traces) -> dict[str, dict[str, Any]]:
    """Every file under ``folder``: its size and which of X's traces its name or bytes hold."""
    needles = {
        "photo_sha256": traces.photo_sha256.encode(),
        "photo_bytes": traces.photo_bytes,
        "telegram_id": str(traces.telegram_id).encode(),
        **{f"correction_text_{n}": text.encode() for n, text in enumerate(traces.corrections)},
    }
    result = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found = sorted(name for name, needle in needles.items() if needle in data)
        if traces.photo_sha256 in path.name:
            found.insert(0, "named_by_photo_sha256")
        result[path.relative_to(folder).as_posix()] = {"bytes": len(data), "traces": found}
    return result


async def audit(scenario: Scenario) -> dict[str, Any]:
    tables = await scan_tables(scenario.storage, scenario.traces)
    data = scan_files(scenario.data_dir, scenario.traces)
    export = scan_files(scenario.export_dir, scenario.traces)
    return {
        "tables": tables,
        "data_folder_files": data,
        "export_folder_files": export,
        "tables_with_traces": sorted(name for name, t in tables.items() if t["rows_with_traces"]),
        "files_with_traces": sorted([f"data/{n}" for n, f in data.items() if f["traces"]]
                                    + [f"export/{n}" for n, f in export.items() if f["traces"]]),
    }


async def what_stays(scenario: Scenario) -> dict[str, Any]:
    """The rows /forget keeps on purpose, and what happened to Y's data and the models."""
    storage = scenario.storage
    async with storage.engine.connect() as conn:
        forgotten = [dict(row._mapping) for row in (await conn.execute(
            select(Base.metadata.tables["forgotten_people"]))).all()]
    versions = {v.name: {"status": v.status.value, "forgotten_data": v.forgotten_data, "reason": v.reason}
                for v in await storage.list_model_versions()}
    y_examples = [e for e in await storage.corrections_for_training() if e.source_id == scenario.y_correction_id]
    stats = await storage.stats()
    return {
        "forgotten_people": [{"hash_hex_digits": len(r["hash"]), "flags": r["flags"]} for r in forgotten],
        "model_versions": versions,
        "y_correction": None if not y_examples else {
            "kept": True, "trained_model_version": y_examples[0].trained_model_version},
        "shared_photo_file_kept": storage.photos.path(_rel(scenario.traces.shared_sha256)).is_file(),
        "counts": {"people": stats.people, "photos": stats.photos, "captions": stats.captions,
                   "corrections": stats.corrections, "corrections_untrained": stats.corrections_untrained},
    }


def _rel(sha256: str) -> str:
    return f"{sha256[:2]}/{sha256}.jpg"


async def run_audit(work: Path) -> dict[str, Any]:
    data_dir, export_dir = work / "data", work / "export"
    storage = await Storage.open(data_dir=data_dir)
    try:
        scenario = await play(storage, data_dir, export_dir)
        before = await audit(scenario)
        report = await storage.forget_person(X)
        after = await audit(scenario)
        stays = await what_stays(scenario)
    finally:
        await storage.close()
    after_close = scan_files(data_dir, scenario.traces)  # the database files once every connection is closed
    return {
        "scenario": {"x_flagged_correction_status": scenario.notes["x_flagged_status"],
                     "flagged_is_flagged": scenario.notes["x_flagged_status"] == CorrectionStatus.FLAGGED.value},
        "forget_report": _report_fields(report),
        "before": before,
        "after": after,
        "data_folder_files_after_close": after_close,
        "what_stays": stays,
    }


def _report_fields(report: Any) -> dict[str, Any]:
    fields = ("found", "votes", "corrections", "captions", "photos", "files_deleted", "pending", "models_marked",
              "exports_rewritten", "exports_failed")
    return {name: list(value) if isinstance(value := getattr(report, name), tuple) else value for name in fields}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS / "forget_audit.json")
    args = parser.parse_args(argv)
    run = start_run(None if argv is None else ["bench/forget_audit.py", *argv])
    with tempfile.TemporaryDirectory(prefix="forget-audit-") as scratch:
        result = asyncio.run(run_audit(Path(scratch)))
    before, after = result["before"], result["after"]
    result["summary"] = {
        "tables_with_traces_before": len(before["tables_with_traces"]),
        "tables_with_traces_after": len(after["tables_with_traces"]),
        "files_with_traces_before": len(before["files_with_traces"]),
        "files_with_traces_after": len(after["files_with_traces"]),
        "tables_scanned": len(after["tables"]),
        "files_scanned_after": len(after["data_folder_files"]) + len(after["export_folder_files"]),
    }
    result["context"] = run.context("cpu")
    write_result(args.out, result)
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    print("left with traces:", after["tables_with_traces"] + after["files_with_traces"] or "nothing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
