"""A lease in the database, so that exactly one loop runs per database and another waits as standby.

The holder takes and renews the lease from a heartbeat thread of its own (:meth:`Lease.keep`), so that
a long step of the loop never lets it lapse; a lease not renewed for ``ttl_s`` expires and the next
process that tries takes it over (failover). Taking and renewing are one conditional UPDATE each, so two
processes racing for an expired lease cannot both win. The holder counts itself active only while its own clock says the
last successful renewal is younger than ``ttl_s`` (:attr:`Lease.fresh`): a holder cut off from the
database stops acting before a standby can take over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from ..errors import InvalidInput
from ..log import loop_lease, reading, utcnow

__all__ = ["Lease", "LeaseInfo", "lease_info"]

log = logging.getLogger(__name__)


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
        self.tried = False  # acquire() has been tried at least once
        self._valid_until = 0.0  # time.monotonic() past which this holder may no longer count on the lease

    @property
    def fresh(self) -> bool:
        """Held, and renewed less than ``ttl_s`` ago by this process's clock."""
        return self.held and time.monotonic() < self._valid_until

    def _insert(self, conn: sa.Connection, now: datetime) -> None:
        values = {"name": self.name, "holder": self.holder, "acquired_at": now,
                  "expires_at": now + timedelta(seconds=self.ttl_s), "status": {}}
        ins = (postgresql.insert(loop_lease) if conn.dialect.name == "postgresql" else sqlite.insert(loop_lease))
        conn.execute(ins.values(**values).on_conflict_do_nothing(index_elements=["name"]))

    def acquire(self) -> bool:
        """Take the lease if it is free, expired or already ours (renewing it); True when held."""
        started, now = time.monotonic(), utcnow()
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
        self.tried = True
        if self.held:
            self._valid_until = started + self.ttl_s
        return self.held

    def renew(self, status: Mapping[str, Any] | None = None) -> bool:
        """Extend our lease (and store ``status``); False when another process took it over."""
        started, now = time.monotonic(), utcnow()
        values: dict[str, Any] = {"expires_at": now + timedelta(seconds=self.ttl_s)}
        if status is not None:
            values["status"] = dict(status)
        with self.db.begin() as conn:
            res = conn.execute(loop_lease.update()
                               .where(loop_lease.c.name == self.name, loop_lease.c.holder == self.holder)
                               .values(**values))
            self.held = res.rowcount == 1
        if self.held:
            self._valid_until = started + self.ttl_s
        return self.held

    def keep(self, stop: threading.Event, status: Callable[[], Mapping[str, Any]] | None = None,
             every_s: float | None = None) -> threading.Thread:
        """Hold the lease from a daemon thread until ``stop`` is set: every ``every_s`` seconds
        (default ``ttl_s / 4``, at most 1 s) renew it while held, storing ``status()``, or try to take it
        while another process holds it (standby). A failed write (the database down) is retried at the
        next beat; meanwhile the lease goes stale by itself (:attr:`fresh`). This thread is the only one
        that writes the lease, so the caller's own work, however long, never lets it lapse."""
        period = min(self.ttl_s / 4, 1.0) if every_s is None else float(every_s)

        def snapshot() -> Mapping[str, Any] | None:
            try:
                return None if status is None else status()
            except Exception:  # noqa: BLE001 - a status read mid-update: renew without it this beat
                log.debug("lease status unavailable", exc_info=True)
                return None

        def beat() -> None:
            while True:
                try:
                    if self.held:
                        if not self.renew(snapshot()):
                            log.warning("loop lease lost by %s; standing by", self.holder)
                    elif self.acquire():
                        log.info("loop lease taken by %s", self.holder)
                        self.renew(snapshot())
                except Exception:  # noqa: BLE001 - the database may be down: the lease lapses by itself
                    log.warning("loop lease: the database did not answer", exc_info=True)
                if stop.wait(period):
                    return

        thread = threading.Thread(target=beat, name=f"lease-{self.name}", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """Give the lease up now, so a standby takes over at its next try."""
        if not self.held:
            return
        with self.db.begin() as conn:
            conn.execute(loop_lease.update()
                         .where(loop_lease.c.name == self.name, loop_lease.c.holder == self.holder)
                         .values(expires_at=utcnow() - timedelta(seconds=1)))
        self.held = False
        self._valid_until = 0.0
