"""/forget tells the truth: no person row stays, exports and tainted models are tracked (issue 12).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

* ``forgotten_people``: a keyed hash of a forgotten person's Telegram id and how many of their
  corrections had been flagged (only for people with flags), so /forget cannot wash a record of
  abuse; ``people.prior_flags`` carries that count when they come back.
* People marked ``is_forgotten`` by the old /forget are deleted: their votes, corrections, captions
  and photos went already, so nothing else refers to them and they had no flags left to carry.
  ``is_forgotten`` and ``forgotten_at`` are dropped with native ``ALTER TABLE ... DROP COLUMN``
  (SQLite 3.35 or later), not a batch rebuild: rebuilding ``people`` drops the old table, and with
  foreign keys on (every connection; the migration runs inside a transaction, where the pragma
  cannot change) that would cascade-delete every caption, vote and correction.
* ``model_versions.forgotten_data``: trained on a forgotten person's corrections (or descends from
  such a model): never a fine-tune's base again.
* ``exports``: the folders ``python -m storage export`` wrote and their options, rewritten by /forget.

Written out in full rather than importing storage.models, so this revision keeps describing the
schema of its time.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQLITE_DROP_COLUMN = (3, 35, 0)


def _check_sqlite_can_drop_columns() -> None:
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < SQLITE_DROP_COLUMN:
        raise RuntimeError(f"SQLite {sqlite3.sqlite_version} cannot drop columns; migration 0004 needs 3.35 or later")


def upgrade() -> None:
    _check_sqlite_can_drop_columns()
    op.create_table(
        "forgotten_people",
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("flags", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("hash", name=op.f("pk_forgotten_people")),
    )
    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("include_upvoted", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
        sa.UniqueConstraint("path", name=op.f("uq_exports_path")),
    )
    op.add_column("people", sa.Column("prior_flags", sa.Integer(), server_default="0", nullable=False))
    op.add_column("model_versions",
                  sa.Column("forgotten_data", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute(sa.text("DELETE FROM people WHERE is_forgotten = :yes").bindparams(yes=True))
    op.drop_column("people", "forgotten_at")
    op.drop_column("people", "is_forgotten")


def downgrade() -> None:
    _check_sqlite_can_drop_columns()
    op.add_column("people", sa.Column("is_forgotten", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.add_column("people", sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_column("model_versions", "forgotten_data")
    op.drop_column("people", "prior_flags")
    op.drop_table("exports")
    op.drop_table("forgotten_people")
