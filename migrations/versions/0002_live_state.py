"""The live state: ``user_state`` (one row per user) and ``item_stats`` (decayed item engagement).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30

Written by ``policy_api.live.SqlStateStore``. Reviewed against ``policy_api.log.metadata``: the primary
keys carry the naming convention's names, so ``alembic check`` finds no difference.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_state",
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_user_state"),
    )
    op.create_table(
        "item_stats",
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("engagement", sa.Double(), nullable=False),
        sa.Column("updated", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name="pk_item_stats"),
    )


def downgrade() -> None:
    op.drop_table("item_stats")
    op.drop_table("user_state")
