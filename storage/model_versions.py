"""Model versions: trained checkpoints, their lineage, and which one the bot serves."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.errors import ModelVersionError
from storage.models import MODEL_STATUSES, Correction, ModelVersion, utcnow
from storage.records import CorrectionOutcome, ModelStatus, ModelVersionRecord, record_from
from storage.transactions import found


def model_record(row: ModelVersion) -> ModelVersionRecord:
    return record_from(ModelVersionRecord, row, metrics=dict(row.metrics or {}), status=ModelStatus(row.status))


def clean_json(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf become null (PostgreSQL rejects them), unknown objects become str."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): clean_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [clean_json(item) for item in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.loads(json.dumps(value, default=str))


def _checked(status: str) -> ModelStatus:
    """``status`` as a ``ModelStatus``, or ``ModelVersionError`` if it is none of them."""
    if status not in MODEL_STATUSES:
        raise ModelVersionError(f"unknown status {status!r}; expected one of {MODEL_STATUSES}")
    return ModelStatus(status)


async def _by_name(session: AsyncSession, name: str) -> ModelVersion | None:
    return await session.scalar(select(ModelVersion).where(ModelVersion.name == name))


async def _existing(session: AsyncSession, name: str) -> ModelVersion:
    return found(await _by_name(session, name), f"model version {name!r}")


async def _promote(session: AsyncSession, row: ModelVersion) -> None:
    # Retire the old active model first: the partial unique index allows one active row.
    await session.execute(
        update(ModelVersion)
        .where(ModelVersion.status == ModelStatus.ACTIVE, ModelVersion.id != row.id)
        .values(status=ModelStatus.RETIRED)
    )
    row.status = ModelStatus.ACTIVE
    row.promoted_at = utcnow()
    await session.flush()


async def register_model_version(
    session: AsyncSession,
    name: str,
    checkpoint_path: str | Path,
    parent: str | None,
    metrics: dict[str, Any],
    status: str = ModelStatus.CANDIDATE,
    reason: str | None = None,
) -> ModelVersionRecord:
    """Record a trained checkpoint; ``status='active'`` registers and promotes it at once."""
    status = _checked(status)
    if await session.scalar(select(exists().where(ModelVersion.name == name))):
        raise ModelVersionError(f"model version {name!r} already exists")
    row = ModelVersion(
        name=name,
        checkpoint_path=str(checkpoint_path),
        parent=parent,
        metrics=clean_json(dict(metrics)),
        status=ModelStatus.CANDIDATE if status == ModelStatus.ACTIVE else status,
        reason=reason,
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    if status == ModelStatus.ACTIVE:
        await _promote(session, row)
    return model_record(row)


def _refuse_forgotten_data(row: ModelVersion) -> None:
    if row.forgotten_data:
        raise ModelVersionError(f"model version {row.name!r} learned from corrections of a person who used /forget; "
                                "it is never activated again")


async def promote_model_version(session: AsyncSession, name: str) -> ModelVersionRecord:
    """Make this version the one the bot serves; the previous active one becomes retired.

    A version marked ``forgotten_data`` is refused (unless it is the active one already: it serves
    until a fine-tune replaces it)."""
    row = await _existing(session, name)
    if row.status == ModelStatus.REJECTED:
        raise ModelVersionError(f"model version {name!r} was rejected: {row.reason or 'no reason'}")
    if row.status != ModelStatus.ACTIVE:
        _refuse_forgotten_data(row)
    if row.status != ModelStatus.ACTIVE:
        await _promote(session, row)
    return model_record(row)


async def reject_model_version(session: AsyncSession, name: str, reason: str) -> ModelVersionRecord:
    """Mark a candidate as not good enough, with the reason (e.g. the failed metric)."""
    row = await _existing(session, name)
    if row.status == ModelStatus.ACTIVE:
        raise ModelVersionError(f"model version {name!r} is active; promote another one first")
    row.status = ModelStatus.REJECTED
    row.reason = reason
    await session.flush()
    return model_record(row)


async def _awaiting_review(session: AsyncSession, name: str) -> ModelVersion:
    row = await _existing(session, name)
    if row.status != ModelStatus.AWAITING_REVIEW:
        raise ModelVersionError(f"model version {name!r} is {row.status}, not awaiting review")
    return row


async def approve_model_version(session: AsyncSession, name: str) -> ModelVersionRecord:
    """An operator approves a candidate awaiting review: it becomes the one the bot serves."""
    row = await _awaiting_review(session, name)
    _refuse_forgotten_data(row)
    await _promote(session, row)
    return model_record(row)


async def reject_after_review(session: AsyncSession, name: str, reason: str) -> ModelVersionRecord:
    """An operator rejects a candidate awaiting review; the corrections it trained on are marked
    ``rejected_run`` in the same transaction (never offered to a run again)."""
    row = await _awaiting_review(session, name)
    row.status = ModelStatus.REJECTED
    row.reason = f"rejected by an operator: {reason}"
    await session.execute(
        update(Correction)
        .where(Correction.trained_model_version == name)
        .values(outcome=CorrectionOutcome.REJECTED_RUN.value)
    )
    await session.flush()
    return model_record(row)


async def active_model_version(session: AsyncSession) -> ModelVersionRecord | None:
    row = await session.scalar(select(ModelVersion).where(ModelVersion.status == ModelStatus.ACTIVE))
    return None if row is None else model_record(row)


async def active_model_name(session: AsyncSession) -> str | None:
    return await session.scalar(select(ModelVersion.name).where(ModelVersion.status == ModelStatus.ACTIVE))


async def get_model_version(session: AsyncSession, name: str) -> ModelVersionRecord | None:
    row = await _by_name(session, name)
    return None if row is None else model_record(row)


async def clean_base(session: AsyncSession, name: str) -> ModelVersionRecord | None:
    """The newest version in ``name``'s lineage (itself first, then its parent, ...) not marked
    ``forgotten_data``: what a fine-tune may start from. None when ``name`` is not registered.

    Raises ``ModelVersionError`` when the lineage has no clean version (or breaks off or loops
    before one): no base is better than one holding a forgotten person's corrections.
    """
    row = await _by_name(session, name)
    if row is None:
        return None
    seen: set[str] = set()
    while row.forgotten_data:
        seen.add(row.name)
        parent = None if row.parent is None or row.parent in seen else await _by_name(session, row.parent)
        if parent is None:
            raise ModelVersionError(f"model version {name!r} learned from a forgotten person's corrections and no "
                                    f"registered ancestor is free of them (lineage ends at {row.name!r})")
        row = parent
    return model_record(row)


async def list_model_versions(session: AsyncSession) -> list[ModelVersionRecord]:
    rows = await session.scalars(select(ModelVersion).order_by(ModelVersion.created_at, ModelVersion.id))
    return [model_record(row) for row in rows]
