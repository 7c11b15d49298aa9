"""items.added_at: when an item first entered the catalog; an index on items.updated_at.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

Serving explores the items added to the catalog after it began (a new item's score rests on its
category's curve at its popularity, so a value-greedy module would never show it, and it would never
be measured). ``updated_at`` cannot tell them apart: every load or refresh of the catalog stamps the
rows it writes. ``added_at`` is set when a row is inserted and kept by later updates. Items already in
the catalog keep it NULL (not new: nothing tells when they came).

Serving workers poll the newest ``updated_at`` to see a catalog loaded while they serve (before, a
new catalog reached them only with the next model or config they loaded): the index makes that one
lookup, whatever the catalog's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("added_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_items_updated_at", "items", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_items_updated_at", table_name="items")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("added_at")
