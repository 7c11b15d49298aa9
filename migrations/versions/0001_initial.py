"""Initial decision-log schema: decisions, feedback, items, configs, plans, models.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Hand-written and reviewed against ``policy_api.log.metadata``: every constraint and index carries the
name the metadata's naming convention gives it, so ``alembic check`` finds no difference.
``feedback.request_id`` deliberately has no foreign key: feedback may be flushed before its decision.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "decisions",
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("context", _json(), nullable=True),
        sa.Column("versions", _json(), nullable=True),
        sa.Column("policy", sa.String(), nullable=False),
        sa.Column("candidates", _json(), nullable=False),
        sa.Column("pmf", _json(), nullable=False),
        sa.Column("chosen", sa.Integer(), nullable=False),
        sa.Column("propensity", sa.Double(), nullable=False),
        sa.Column("layout", _json(), nullable=True),
        sa.Column("fallback_reason", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name="pk_decisions"),
    )
    op.create_index("ix_decisions_ts", "decisions", ["ts"])
    op.create_index("ix_decisions_user_id", "decisions", ["user_id"])

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(), nullable=False),
        sa.Column("request_id", sa.String(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=True),
        sa.Column("item_id", sa.String(), nullable=True),
        sa.Column("type", sa.String(), nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.Column("ts", _ts(), nullable=False),
        sa.Column("received_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.UniqueConstraint("event_id", name="uq_feedback_event_id"),
    )
    op.create_index("ix_feedback_request_id", "feedback", ["request_id"])
    op.create_index("ix_feedback_ts", "feedback", ["ts"])

    op.create_table(
        "items",
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("category", sa.String(), nullable=False),
        sa.Column("popularity", sa.Double(), nullable=False),
        sa.Column("features", _json(), nullable=True),
        sa.Column("updated_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("item_id", name="pk_items"),
    )

    op.create_table(
        "configs",
        sa.Column("version", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("author", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("projection", _json(), nullable=True),
        sa.PrimaryKeyConstraint("version", name="pk_configs"),
        sa.CheckConstraint(
            "status IN ('active', 'superseded', 'rejected')", name="ck_configs_status"
        ),
    )

    op.create_table(
        "plans",
        sa.Column("version", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("config_version", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("prices", _json(), nullable=False),
        sa.Column("projected", _json(), nullable=True),
        sa.Column("solver", _json(), nullable=True),
        sa.PrimaryKeyConstraint("version", name="pk_plans"),
        sa.CheckConstraint("status IN ('active', 'superseded', 'rejected')", name="ck_plans_status"),
    )

    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("metrics", _json(), nullable=True),
        sa.Column("artifact", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_models"),
        sa.UniqueConstraint("name", "version", name="uq_models_name_version"),
        sa.CheckConstraint("status IN ('published', 'rejected')", name="ck_models_status"),
    )


def downgrade() -> None:
    op.drop_table("models")
    op.drop_table("plans")
    op.drop_table("configs")
    op.drop_table("items")
    op.drop_index("ix_feedback_ts", table_name="feedback")
    op.drop_index("ix_feedback_request_id", table_name="feedback")
    op.drop_table("feedback")
    op.drop_index("ix_decisions_user_id", table_name="decisions")
    op.drop_index("ix_decisions_ts", table_name="decisions")
    op.drop_table("decisions")
