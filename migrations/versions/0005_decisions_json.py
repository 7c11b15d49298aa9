"""decisions.candidates and decisions.pmf as ``json`` on PostgreSQL (were ``jsonb``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30

The two bulkiest columns of the log are written once and read whole (the learner, replay and the
exports parse them in bulk): ``jsonb`` made the server parse and re-encode every decision's
candidates on insert, which capped log writes; ``json`` stores the text as sent. Nothing queries
inside them. Existing rows are converted in place (``jsonb::json``, their jsonb text form) and read
as before. SQLite stores JSON as text either way: nothing changes there.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = (("candidates", False), ("pmf", False))


def _retype(to: type[postgresql.JSON] | type[postgresql.JSONB], was: type[postgresql.JSON] | type[postgresql.JSONB],
            cast: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name, nullable in _COLUMNS:
        op.alter_column("decisions", name, type_=to(none_as_null=True), existing_type=was(none_as_null=True),
                        existing_nullable=nullable, postgresql_using=f"{name}::{cast}")


def upgrade() -> None:
    _retype(postgresql.JSON, postgresql.JSONB, "json")


def downgrade() -> None:
    _retype(postgresql.JSONB, postgresql.JSON, "jsonb")
