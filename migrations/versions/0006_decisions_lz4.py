"""decisions.layout as ``json`` on PostgreSQL, and the log's bulky columns compressed with lz4.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

A decision row is ~6 KB of JSON, mostly ``candidates`` (~3.8 KB) and ``layout`` (~1.9 KB): over
PostgreSQL's 2 KB TOAST threshold, so the server compresses them on every insert, by default with
pglz, which capped log writes (one COPY of 1,000 rows spent most of its time there). lz4 compresses
to about the same size several times faster. The bulky columns of ``decisions`` get
``COMPRESSION lz4`` where the server has it (PostgreSQL 14 or later, built with lz4; elsewhere they
keep the server's default), and ``layout`` becomes ``json`` like ``candidates`` and ``pmf`` (stored
as sent, not parsed into ``jsonb`` on every insert; nothing queries inside it). Rows stored before
keep their compression until rewritten and read as before. SQLite stores JSON as text, uncompressed:
nothing changes there.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: the columns of ``decisions`` that reach the TOAST threshold
COMPRESSED = ("candidates", "pmf", "layout", "context")


def has_lz4(bind: sa.Connection) -> bool:
    """Whether the PostgreSQL server can compress columns with lz4."""
    allowed = bind.execute(sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'"))
    values = allowed.scalar_one_or_none()
    return values is not None and "lz4" in values


def _compress(method: str) -> None:
    bind = op.get_bind()
    if method == "lz4" and not has_lz4(bind):
        return
    for name in COMPRESSED:
        op.execute(f'ALTER TABLE decisions ALTER COLUMN "{name}" SET COMPRESSION {method}')


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.alter_column("decisions", "layout", type_=postgresql.JSON(none_as_null=True),
                    existing_type=postgresql.JSONB(none_as_null=True), existing_nullable=True,
                    postgresql_using="layout::json")
    _compress("lz4")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    if has_lz4(op.get_bind()):  # a server without lz4 never set it
        _compress("default")
    op.alter_column("decisions", "layout", type_=postgresql.JSONB(none_as_null=True),
                    existing_type=postgresql.JSON(none_as_null=True), existing_nullable=True,
                    postgresql_using="layout::jsonb")
