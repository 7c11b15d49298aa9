"""A lease in the database, so that exactly one loop runs per database and another waits as standby.

The holder renews the lease every tick; a lease not renewed for ``ttl_s`` expires and the next process
that tries takes it over (failover). Taking and renewing are one conditional UPDATE each, so two
processes racing for an expired lease cannot both win.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from ..errors import InvalidInput
from ..log import loop_lease, reading, utcnow

__all__ = ["Lease", "LeaseInfo", "lease_info"]


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds the loop's lease, until when, and the status it last wrote."""

    name: str
    holder: str
    acquired_at: datetime
    expires_at: datetime
    status: dict[str, Any]

    def live(self, now: datetime | None = None) -> bool:
        return self.expires_at > (now or utcnow())


def lease_info(db: Engine, name: str = "loop") -> LeaseInfo | None:
    """The lease row, or None when no loop ever ran on this database."""
    with reading(db) as conn:
        row = conn.execute(sa.select(loop_lease).where(loop_lease.c.name == name)).first()
    if row is None:
        return None
    m = row._mapping
    return LeaseInfo(str(m["name"]), str(m["holder"]), m["acquired_at"], m["expires_at"], dict(m["status"] or {}))


class Lease:
    """One process's claim on the loop of a database.

    Parameters
    ----------
    db
        The log's database.
    ttl_s
        How long a claim holds without renewal.
    name
        The lease's name (one loop per name and database).
    holder
        This process's identity (default: host, pid and a random suffix).
    """

    def __init__(self, db: Engine, *, ttl_s: float = 10.0, name: str = "loop", holder: str | None = None) -> None:
        if not ttl_s > 0:
            raise InvalidInput(f"ttl_s must be > 0; got {ttl_s!r}", field="lease_ttl_s")
        self.db, self.ttl_s, self.name = db, float(ttl_s), name
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.held = False

    def _insert(self, conn: sa.Connection, now: datetime) -> None:
        values = {"name": self.name, "holder": self.holder, "acquired_at": now,
                  "expires_at": now + timedelta(seconds=self.ttl_s), "status": {}}
        ins = (postgresql.insert(loop_lease) if conn.dialect.name == "postgresql" else sqlite.insert(loop_lease))
        conn.execute(ins.values(**values).on_conflict_do_nothing(index_elements=["name"]))

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours (renewing it); True when held."""
        now = utcnow()
        with self.db.begin() as conn:
            self._insert(conn, now)
            res = conn.execute(
                loop_lease.update()
                .where(loop_lease.c.name == self.name,
                       sa.or_(loop_lease.c.holder == self.holder, loop_lease.c.expires_at < now))
                .values(holder=self.holder, expires_at=now + timedelta(seconds=self.ttl_s),
                        acquired_at=sa.case((loop_lease.c.holder == self.holder, loop_lease.c.acquired_at),
                                            else_=now)))
            self.held = res.rowcount == 1
        return self.held

    def renew(self, status: Mapping[str, Any] | None = None) -> bool:
        """Extend our lease (and store ``status``); False when another process took it over."""
        now = utcnow()
        values: dict[str, Any] = {"expires_at": now + timedelta(seconds=self.ttl_s)}
        if status is not None:
            values["status"] = dict(status)
        with self.db.begin() as conn:
            res = conn.execute(loop_lease.update()
                               .where(loop_lease.c.name == self.name, loop_lease.c.holder == self.holder)
                               .values(**values))
            self.held = res.rowcount == 1
        return self.held

    def release(self) -> None:
        """Give the lease up now, so a standby takes over at its next try."""
        if not self.held:
            return
        with self.db.begin() as conn:
            conn.execute(loop_lease.update()
                         .where(loop_lease.c.name == self.name, loop_lease.c.holder == self.holder)
                         .values(expires_at=utcnow() - timedelta(seconds=1)))
        self.held = False
