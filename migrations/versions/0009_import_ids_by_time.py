"""Imported rows' ids lead with their time.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

``homepage import`` names each decision and event it writes by its content, so that importing a file
twice adds nothing. The ids were a hash alone (``import:`` and 24 hex digits), and each went into its
index at a random place: a history larger than the page cache made every insert a read of a random
page, and a 3,000,000-rating import took six minutes. They are now ``import:``, the time (16 hex
digits) and a 64-bit hash of the content (16 hex digits), written in time order, so that the indexes
grow at their ends (:func:`policy_api.jobs.decision_ids`, :func:`policy_api.jobs.event_ids`).

This revision renames the rows an earlier import wrote, so that importing the same file again still
adds nothing. The names are computed from what the rows hold (the user, item, event type and time,
stored to the microsecond), which is what an import computes them from for any file whose times have
no more than six decimals. ``downgrade`` gives them their hash-only names back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import sqlalchemy as sa
from alembic import op

from policy_api.log._schema import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD_LENGTH = len("import:") + 24
_NEW_LENGTH = len("import:") + 32
_decisions = sa.table("decisions", sa.column("request_id", sa.String()), sa.column("user_id", sa.String()),
                      sa.column("policy", sa.String()), sa.column("ts", UTCDateTime()))
_feedback = sa.table("feedback", sa.column("id", sa.Integer()), sa.column("event_id", sa.String()),
                     sa.column("request_id", sa.String()), sa.column("item_id", sa.String()),
                     sa.column("type", sa.String()), sa.column("ts", UTCDateTime()))


def _old(*parts: object) -> str:
    return "import:" + hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def _rename(from_length: int, name_decisions: Callable[[list[str], np.ndarray], list[str]],
            name_events: Callable[[list[str], list[str], list[str], np.ndarray], list[str]]) -> None:
    conn = op.get_bind()
    ids = sa.func.length(_decisions.c.request_id)
    dec = conn.execute(sa.select(_decisions.c.request_id, _decisions.c.user_id, _decisions.c.ts).where(
        _decisions.c.policy == "import", ids == from_length)).all()
    if not dec:
        return
    rid = [r for r, _, _ in dec]
    users = [u for _, u, _ in dec]
    renamed = dict(zip(rid, name_decisions(users, np.array([t.timestamp() for _, _, t in dec])), strict=True))
    user_of = dict(zip(rid, users, strict=True))
    fb = conn.execute(sa.select(_feedback.c.id, _feedback.c.request_id, _feedback.c.item_id, _feedback.c.type,
                                _feedback.c.ts).where(
        _feedback.c.event_id.like("import:%"), sa.func.length(_feedback.c.event_id) == from_length,
        _feedback.c.request_id.in_(sa.select(_decisions.c.request_id).where(
            _decisions.c.policy == "import", ids == from_length)))).all()
    events = name_events([user_of[r] for _, r, _, _, _ in fb], [i for _, _, i, _, _ in fb],
                         [e for _, _, _, e, _ in fb], np.array([t.timestamp() for *_, t in fb]))
    for k in range(0, len(fb), 50_000):
        conn.execute(sa.update(_feedback).where(_feedback.c.id == sa.bindparam("k")).values(
            event_id=sa.bindparam("e"), request_id=sa.bindparam("r")),
            [{"k": f[0], "e": e, "r": renamed[f[1]]} for f, e in zip(fb[k:k + 50_000], events[k:k + 50_000],
                                                                      strict=True)])
    pairs = list(renamed.items())
    for k in range(0, len(pairs), 50_000):
        conn.execute(sa.update(_decisions).where(_decisions.c.request_id == sa.bindparam("old")).values(
            request_id=sa.bindparam("new")), [{"old": a, "new": b} for a, b in pairs[k:k + 50_000]])


def _new_decisions(users: list[str], ts: np.ndarray) -> list[str]:
    from policy_api.jobs import decision_ids, string_hashes

    out: list[str] = decision_ids(string_hashes(users), ts).tolist()
    return out


def _new_events(users: list[str], items: list[str], kinds: list[str], ts: np.ndarray) -> list[str]:
    from policy_api.jobs import event_ids, string_hashes

    out: list[str] = event_ids(string_hashes(users), string_hashes(items), string_hashes(kinds), ts).tolist()
    return out


def upgrade() -> None:
    _rename(_OLD_LENGTH, _new_decisions, _new_events)


def downgrade() -> None:
    _rename(_NEW_LENGTH,
            lambda users, ts: [_old(u, repr(t)) for u, t in zip(users, ts.tolist(), strict=True)],
            lambda users, items, kinds, ts: [_old(u, i, e, repr(t)) for u, i, e, t in
                                             zip(users, items, kinds, ts.tolist(), strict=True)])
