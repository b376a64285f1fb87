"""Initial schema: people, photos, captions, votes, corrections, model versions.

Revision ID: 0001
Revises:
Create Date: 2026-11-26

Written out in full rather than importing storage.models, so this revision keeps
describing the schema of its time when the models change later.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _fk(table: str, column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"), ondelete="CASCADE"
    )


def _index(table: str, *columns: str, name: str | None = None) -> None:
    op.create_index(name or op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns), unique=False)


def upgrade() -> None:
    op.create_table(
        "people",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("telegram_id", sa.BigInteger(), nullable=False),
        sa.Column("language_code", sa.String(length=16), nullable=True),
        _ts("first_seen_at"),
        _ts("last_seen_at"),
        sa.Column("is_forgotten", sa.Boolean(), nullable=False),
        _ts("forgotten_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_people")),
        sa.UniqueConstraint("telegram_id", name=op.f("uq_people_telegram_id")),
    )
    op.create_table(
        "photos",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("telegram_file_unique_id", sa.String(length=128), nullable=True),
        sa.Column("rel_path", sa.String(length=255), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_photos")),
        sa.UniqueConstraint("sha256", name=op.f("uq_photos_sha256")),
    )
    _index("photos", "telegram_file_unique_id")

    op.create_table(
        "photo_senders",
        sa.Column("photo_id", sa.Integer(), nullable=False),
        sa.Column("person_id", sa.Integer(), nullable=False),
        _ts("first_sent_at"),
        _fk("photo_senders", "person_id", "people"),
        _fk("photo_senders", "photo_id", "photos"),
        sa.PrimaryKeyConstraint("photo_id", "person_id", name=op.f("pk_photo_senders")),
    )
    _index("photo_senders", "person_id")

    op.create_table(
        "captions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("photo_id", sa.Integer(), nullable=False),
        sa.Column("requester_id", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("beam_size", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("chat_id", sa.BigInteger(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        _ts("created_at"),
        _fk("captions", "photo_id", "photos"),
        _fk("captions", "requester_id", "people"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_captions")),
    )
    _index("captions", "chat_id", "message_id", name="ix_captions_chat_message")
    _index("captions", "created_at")
    _index("captions", "photo_id")
    _index("captions", "requester_id")

    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("caption_id", sa.Integer(), nullable=False),
        sa.Column("person_id", sa.Integer(), nullable=False),
        sa.Column("up", sa.Boolean(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _fk("votes", "caption_id", "captions"),
        _fk("votes", "person_id", "people"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_votes")),
        sa.UniqueConstraint("caption_id", "person_id", name=op.f("uq_votes_caption_id_person_id")),
    )
    _index("votes", "person_id")

    op.create_table(
        "corrections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("caption_id", sa.Integer(), nullable=False),
        sa.Column("person_id", sa.Integer(), nullable=False),
        sa.Column("text_raw", sa.Text(), nullable=False),
        sa.Column("text", sa.String(length=300), nullable=False),
        _ts("created_at"),
        sa.Column("trained_model_version", sa.String(length=128), nullable=True),
        _ts("trained_at", nullable=True),
        _fk("corrections", "caption_id", "captions"),
        _fk("corrections", "person_id", "people"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_corrections")),
    )
    _index("corrections", "caption_id")
    _index("corrections", "created_at")
    _index("corrections", "person_id")

    op.create_table(
        "pending_corrections",
        sa.Column("person_id", sa.Integer(), nullable=False),
        sa.Column("caption_id", sa.Integer(), nullable=False),
        sa.Column("prompt_chat_id", sa.BigInteger(), nullable=True),
        sa.Column("prompt_message_id", sa.BigInteger(), nullable=True),
        _ts("started_at"),
        _fk("pending_corrections", "caption_id", "captions"),
        _fk("pending_corrections", "person_id", "people"),
        sa.PrimaryKeyConstraint("person_id", name=op.f("pk_pending_corrections")),
    )
    _index("pending_corrections", "caption_id")

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("checkpoint_path", sa.String(length=1024), nullable=False),
        sa.Column("parent", sa.String(length=128), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("promoted_at", nullable=True),
        sa.CheckConstraint(
            "status IN ('candidate', 'active', 'rejected', 'retired')",
            name=op.f("ck_model_versions_status_valid"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("name", name=op.f("uq_model_versions_name")),
    )
    op.create_index(
        "uq_model_versions_one_active",
        "model_versions",
        ["status"],
        unique=True,
        sqlite_where=sa.text("status = 'active'"),
        postgresql_where=sa.text("status = 'active'"),
    )


def downgrade() -> None:
    for table in (
        "model_versions",
        "pending_corrections",
        "corrections",
        "votes",
        "captions",
        "photo_senders",
        "photos",
        "people",
    ):
        op.drop_table(table)
