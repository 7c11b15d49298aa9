"""The live state in the log's own database: tables ``user_state`` and ``item_stats`` (SQLite, PostgreSQL)."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ..log import item_stats, user_state, utcnow
from ._state import (
    ItemStats,
    LiveEvent,
    UserState,
    apply_events,
    decode_state,
    encode_state,
    item_increments,
    item_stats_at,
    merge_item,
)
from ._store import DeadlineStore

__all__ = ["SqlStateStore"]

_CHUNK = 300  # rows per statement: 3 bound parameters each, far below SQLite's and psycopg's limits
_NO_STATE = "null"  # a row's placeholder inside a write transaction; never committed as such
_SQLITE_BUSY_S = 1.0  # a read thread's busy timeout: a stuck read frees its thread after this


def _chunks(keys: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(keys), _CHUNK):
        yield keys[i:i + _CHUNK]


class SqlStateStore(DeadlineStore):
    """:class:`~policy_api.live.UserStateStore` on an SQLAlchemy Engine (the log's database by default).

    Parameters
    ----------
    engine
        SQLite or PostgreSQL, migrated to a revision with ``user_state`` and ``item_stats``. Shared: the
        store never disposes it. Build it with :func:`policy_api.log.make_engine` so that connects and
        statements have timeouts of their own.
    half_life_s, max_events, impression_half_life
        See :func:`~policy_api.live.apply_events`.
    read_threads
        Reads in flight at once (see :class:`~policy_api.live._store.DeadlinePool`); below the Engine's
        pool size, so stuck reads never take every connection.

    Notes
    -----
    Reads run on the store's read threads (see :class:`~policy_api.live._store.DeadlineStore`). On an
    SQLite file each read thread queries through a connection of its own, without SQLAlchemy (a user's
    state is one primary-key lookup: the Engine's checkout and statement machinery cost ten times the
    query). They stay off the caller's thread even there: a reader of a WAL database can wait far past
    any busy timeout (about 10 s, in SQLite's own retry loop) while another process holds the WAL
    index's read locks, and a read of the caller's own would hold its request that long.

    ``write_batch`` is one transaction: it inserts a placeholder for every user and item it lacks
    (``ON CONFLICT DO NOTHING``), reads the rows back (``FOR UPDATE`` on PostgreSQL; on SQLite the insert
    already holds the database's write lock), applies the events and upserts. Rows are touched in key
    order, so two concurrent writers wait for each other instead of losing events or deadlocking.
    """

    def __init__(self, engine: Engine, *, half_life_s: float = 3600.0, max_events: int = 50,
                 read_threads: int = 4, impression_half_life: float | None = None) -> None:
        name = engine.dialect.name
        if name not in ("sqlite", "postgresql"):
            raise ValueError(f"engine dialect must be 'sqlite' or 'postgresql'; got {name!r}")
        super().__init__(half_life_s=half_life_s, max_events=max_events, read_threads=read_threads,
                         name="live-sql-read", impression_half_life=impression_half_life)
        self.engine = engine
        self._dialect = name
        # built once: a statement object caches its compiled form, so a read does not rebuild the query
        self._select_users = (sa.select(user_state.c.user_id, user_state.c.state)
                              .where(user_state.c.user_id.in_(sa.bindparam("keys", expanding=True))))
        url = engine.url
        db = url.database or ""
        local = name == "sqlite" and bool(db) and db != ":memory:" and not db.startswith("file:") and not url.query
        self._sqlite_path: str | None = db if local else None
        # per read thread: (pid, connection); closed when its thread ends (close() ends them), never from
        # another thread, which could close it under a read still running
        self._own = threading.local()

    def _insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table) if self._dialect == "postgresql" else sqlite.insert(table)

    # ---- writes
    def _write(self, events: Sequence[LiveEvent]) -> None:
        by_user: dict[str, list[LiveEvent]] = {}
        for e in events:
            by_user.setdefault(e.user_id, []).append(e)
        increments = item_increments(events, self.half_life_s)
        with self.engine.begin() as conn:
            self._write_users(conn, by_user)
            self._write_items(conn, increments)

    def _write_users(self, conn: Connection, by_user: dict[str, list[LiveEvent]]) -> None:
        now = utcnow()
        for keys in _chunks(sorted(by_user)):
            conn.execute(self._insert(user_state).on_conflict_do_nothing(index_elements=["user_id"]),
                         [{"user_id": u, "state": _NO_STATE, "updated_at": now} for u in keys])
            rows = conn.execute(
                sa.select(user_state.c.user_id, user_state.c.state)
                .where(user_state.c.user_id.in_(keys)).order_by(user_state.c.user_id).with_for_update()
            ).all()
            old = {str(r.user_id): decode_state(r.state) for r in rows}
            new = [
                {"user_id": u, "updated_at": now, "state": encode_state(apply_events(
                    old.get(u), by_user[u], half_life_s=self.half_life_s, max_events=self.max_events,
                    impression_half_life=self.impression_half_life, forget=self.forget)).decode()}
                for u in keys
            ]
            stmt = self._insert(user_state)
            stmt = stmt.on_conflict_do_update(
                index_elements=["user_id"],
                set_={"state": stmt.excluded.state, "updated_at": stmt.excluded.updated_at},
            )
            conn.execute(stmt, new)

    def _write_items(self, conn: Connection, increments: dict[str, tuple[float, float]]) -> None:
        for keys in _chunks(sorted(increments)):
            # a new item's placeholder is (0, its own newest event): merging with it changes nothing
            conn.execute(self._insert(item_stats).on_conflict_do_nothing(index_elements=["item_id"]),
                         [{"item_id": i, "engagement": 0.0, "updated": increments[i][1]} for i in keys])
            rows = conn.execute(
                sa.select(item_stats.c.item_id, item_stats.c.engagement, item_stats.c.updated)
                .where(item_stats.c.item_id.in_(keys)).order_by(item_stats.c.item_id).with_for_update()
            ).all()
            old = {str(r.item_id): (float(r.engagement), float(r.updated)) for r in rows}
            new = []
            for i in keys:
                engagement, updated = merge_item(old.get(i), increments[i], self.half_life_s)
                new.append({"item_id": i, "engagement": engagement, "updated": updated})
            stmt = self._insert(item_stats)
            stmt = stmt.on_conflict_do_update(
                index_elements=["item_id"],
                set_={"engagement": stmt.excluded.engagement, "updated": stmt.excluded.updated},
            )
            conn.execute(stmt, new)

    # ---- reads (on the deadline pool)
    def _read_users(self, user_ids: Sequence[str]) -> list[UserState | None]:
        keys = sorted(set(user_ids))
        found: dict[str, UserState | None] = {}
        if self._sqlite_path is not None:
            own = self._connection()
            for chunk in _chunks(keys):
                marks = ",".join("?" * len(chunk))
                for uid, raw in own.execute(f'SELECT user_id, state FROM "{user_state.name}" WHERE user_id IN '
                                             f'({marks})', list(chunk)).fetchall():
                    found[str(uid)] = decode_state(raw)
        else:
            with self.engine.connect() as conn:
                for chunk in _chunks(keys):
                    for r in conn.execute(self._select_users, {"keys": list(chunk)}):
                        found[str(r.user_id)] = decode_state(r.state)
        return [found.get(u) for u in user_ids]

    def _connection(self) -> sqlite3.Connection:
        """The calling read thread's own SQLite connection (a thread started after a fork opens its own)."""
        own: tuple[int, sqlite3.Connection] | None = getattr(self._own, "conn", None)
        if own is None or own[0] != os.getpid():
            assert self._sqlite_path is not None
            # autocommit: no read transaction outlives its read (it would hold the WAL's checkpoints back)
            own = (os.getpid(), sqlite3.connect(self._sqlite_path, timeout=_SQLITE_BUSY_S, isolation_level=None,
                                                check_same_thread=False))
            self._own.conn = own
        return own[1]

    def _read_item_rows(self) -> ItemStats | None:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(item_stats.c.item_id, item_stats.c.engagement, item_stats.c.updated)).all()
        return item_stats_at({str(r.item_id): (float(r.engagement), float(r.updated)) for r in rows},
                             self.half_life_s)

    def _close(self) -> None:
        pass  # the Engine belongs to the caller; each read thread's connection goes with its thread
