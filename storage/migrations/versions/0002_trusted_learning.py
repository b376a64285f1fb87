"""Trusted learning: screened corrections, one per person and caption, and models awaiting review.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

``corrections`` gains ``status`` (what screening at entry decided), ``flag_reason``, ``outcome``
(what the fine-tune that looked at it did) and ``updated_at``, and a partial unique index: one
live correction per person and caption. Existing rows are kept: where a person corrected the
same caption more than once, the newest stays live and the older ones are marked
``superseded`` (the app never trains on them), so no stored text is lost. A correction some
model already trained on gets the outcome ``trained``. ``model_versions.status`` also allows
``awaiting_review``.

Written out in full rather than importing storage.models, so this revision keeps describing
the schema of its time.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_MODEL_STATUSES = "'candidate', 'active', 'rejected', 'retired'"
NEW_MODEL_STATUSES = "'candidate', 'active', 'rejected', 'retired', 'awaiting_review'"
CORRECTION_STATUSES = "'accepted', 'flagged', 'held_for_review', 'superseded'"
CORRECTION_OUTCOMES = "'trained', 'rejected_run', 'flagged'"
NOT_SUPERSEDED = "status <> 'superseded'"


def _set_model_statuses(new: str) -> None:
    # SQLite cannot alter a CHECK: batch mode rebuilds the table from its reflection (the partial
    # one-active index included) with the new constraint.
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_constraint(op.f("ck_model_versions_status_valid"), type_="check")
        batch.create_check_constraint(op.f("ck_model_versions_status_valid"), sa.text(f"status IN ({new})"))


def upgrade() -> None:
    with op.batch_alter_table("corrections") as batch:
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("status", sa.String(length=16), server_default="accepted", nullable=False))
        batch.add_column(sa.Column("flag_reason", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("outcome", sa.String(length=16), nullable=True))
        batch.create_check_constraint(
            op.f("ck_corrections_status_valid"), sa.text(f"status IN ({CORRECTION_STATUSES})")
        )
        batch.create_check_constraint(
            op.f("ck_corrections_outcome_valid"), sa.text(f"outcome IS NULL OR outcome IN ({CORRECTION_OUTCOMES})")
        )
    # Older duplicates (same person, same caption) stay, marked superseded: the newest is the live one.
    op.execute(
        "UPDATE corrections SET status = 'superseded' WHERE EXISTS ("
        " SELECT 1 FROM corrections AS newer"
        " WHERE newer.caption_id = corrections.caption_id AND newer.person_id = corrections.person_id"
        " AND (newer.created_at > corrections.created_at"
        "  OR (newer.created_at = corrections.created_at AND newer.id > corrections.id)))"
    )
    op.execute("UPDATE corrections SET outcome = 'trained' WHERE trained_model_version IS NOT NULL")
    op.create_index(
        "uq_corrections_one_per_person",
        "corrections",
        ["caption_id", "person_id"],
        unique=True,
        sqlite_where=sa.text(NOT_SUPERSEDED),
        postgresql_where=sa.text(NOT_SUPERSEDED),
    )
    _set_model_statuses(NEW_MODEL_STATUSES)


def downgrade() -> None:
    # A model awaiting review was never served: back to a plain candidate. Corrections screening kept
    # out get a run name, so the older code (which trains on every unmarked correction) skips them too.
    op.execute(
        "UPDATE corrections SET trained_model_version = 'screened-out'"
        " WHERE status <> 'accepted' AND trained_model_version IS NULL"
    )
    op.execute("UPDATE model_versions SET status = 'candidate' WHERE status = 'awaiting_review'")
    _set_model_statuses(OLD_MODEL_STATUSES)
    op.drop_index("uq_corrections_one_per_person", table_name="corrections")
    with op.batch_alter_table("corrections") as batch:
        batch.drop_constraint(op.f("ck_corrections_outcome_valid"), type_="check")
        batch.drop_constraint(op.f("ck_corrections_status_valid"), type_="check")
        batch.drop_column("outcome")
        batch.drop_column("flag_reason")
        batch.drop_column("status")
        batch.drop_column("updated_at")
