"""An index on decisions (policy, ts): when serving began, read past imported history.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

Serving explores the items added to the catalog after it began, and "began" is its first logged
decision. An imported history (``homepage import``) is logged as decisions too, with the
interactions' own timestamps, usually years before the catalog was loaded: every item of the catalog
then counted as added after serving began, and each module showed a random one of them in place of
its last item about half the time. Serving now begins at its first decision that is not an import;
the index finds it with two seeks whatever the size of the imported history.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_decisions_policy_ts", "decisions", ["policy", "ts"])


def downgrade() -> None:
    op.drop_index("ix_decisions_policy_ts", table_name="decisions")
