"""Config jobs: dry runs, applies and rollbacks of the operator config, run off the request threads.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30

Written by ``policy_api.serving`` (the config job runner). Reviewed against ``policy_api.log.metadata``:
every constraint and index carries the naming convention's name, so ``alembic check`` finds no
difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine[object]:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def upgrade() -> None:
    op.create_table(
        "config_jobs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.Column("target_version", sa.BigInteger(), nullable=True),
        sa.Column("author", sa.String(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("apply_slot", sa.String(), nullable=True),
        sa.Column("result", _json(), nullable=True),
        sa.Column("error", _json(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_config_jobs"),
        sa.UniqueConstraint("apply_slot", name="uq_config_jobs_apply_slot"),
        sa.CheckConstraint("status IN ('queued', 'running', 'done', 'failed', 'lost')",
                           name=op.f("ck_config_jobs_status")),
        sa.CheckConstraint("kind IN ('dry_run', 'apply', 'rollback')", name=op.f("ck_config_jobs_kind")),
    )
    op.create_index("ix_config_jobs_created_at", "config_jobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_config_jobs_created_at", table_name="config_jobs")
    op.drop_table("config_jobs")
