"""Incremental aggregates behind the operator pages, so that ``/ops``, ``/exposure`` and the business
gauges of ``/metrics`` never read the decision log on a request thread.

A daemon thread per worker tails the ``decisions`` table: once over the bounded window when it starts,
then only the rows that arrived since its last tick (plus an overlap, for rows another worker flushed
late). Each decision is added to a per-minute bucket of its config version: decisions, fallbacks,
served decisions, the served layout's expected value and its exposure vector. A request sums at most
``max_window_s / bucket_s`` buckets: its cost does not depend on the size of the log.

Rows flushed more than ``overlap_s`` after their time (a spill file replayed after an outage) are not
counted here; ``homepage log export`` and ``homepage replay`` read the whole log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .. import registry
from ..log import decisions, decode_candidates, iter_decisions, json_loads, plans, reading, to_epoch
from ._gcpause import no_collections

__all__ = ["ExposureSeries", "OpsAggregate"]

log = logging.getLogger("homepage.ops")

_COLUMNS = ["request_id", "ts", "versions", "candidates", "chosen"]
# bucket row: decisions, fallbacks, served, expected value of the served layouts, exposure sums...
_N, _FALLBACK, _SERVED, _VALUE, _EXP = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class ExposureSeries:
    """Sums over a window for one config version (shape (n_buckets,) per series; ``exposure``
    (n_buckets, K))."""

    start: np.ndarray
    decisions: np.ndarray
    fallbacks: np.ndarray
    served: np.ndarray
    value: np.ndarray
    exposure: np.ndarray

    def shares(self) -> np.ndarray:
        """Shape (K,): realised share of every constraint over the whole window (NaN with no traffic)."""
        n = self.served.sum()
        return self.exposure.sum(0) / n if n > 0 else np.full(self.exposure.shape[1], np.nan)


class OpsAggregate:
    """Per-bucket sums of what was served, fed from the decision log by a background thread.

    Parameters
    ----------
    db
        The log's database.
    bucket_s
        Width of a time bucket (the resolution of the console's charts).
    max_window_s
        The longest window a request may ask for; older buckets are dropped.
    overlap_s
        How far back each tick looks again for rows flushed after newer ones.
    """

    def __init__(self, db: Engine, *, bucket_s: float = 60.0, max_window_s: float = 21600.0,
                 overlap_s: float = 30.0, history_every_s: float = 5.0) -> None:
        if not 0 < bucket_s <= max_window_s:
            raise ValueError(f"bucket_s must be in (0, max_window_s={max_window_s}]; got {bucket_s!r}")
        self.db = db
        self.bucket_s = float(bucket_s)
        self.max_window_s = float(max_window_s)
        self.overlap_s = float(overlap_s)
        self.history_every_s = float(history_every_s)
        self.rows_read = 0  # decision rows fetched so far (what the cost tests count)
        self.ticks = 0
        self.caught_up_at: float | None = None  # wall time the last tick finished
        self.error: str | None = None
        self.history: dict[str, list[dict[str, Any]]] = {"configs": [], "plans": [], "models": []}
        self._buckets: dict[int | None, dict[int, np.ndarray]] = {}
        self._prices: dict[int, dict[str, float]] = {}  # bucket -> constraint -> last price in it
        self._plan_cursor = 0
        self._hi: float | None = None  # newest decision time seen
        self._seen: dict[str, float] = {}  # request ids inside the overlap, with their time
        self._history_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: set once the first tick has read the whole window: before it, the buckets hold part of it
        self.caught_up = threading.Event()

    # ------------------------------------------------------------------ the tail (background thread)
    def start(self, every_s: float = 1.0) -> OpsAggregate:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(every_s,), name="homepage-ops", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                self.error = None
            except Exception as e:  # the database may be down; the page says how old its figures are
                self.error = f"{type(e).__name__}: {e}"
                log.warning("ops aggregate not updated: %s", e)
            self._stop.wait(every_s)

    def tick(self, now: float | None = None) -> int:
        """Read what arrived since the last tick into the buckets; returns the rows read."""
        now = time.time() if now is None else now
        with reading(self.db) as conn:
            if self._hi is None:  # the whole window, once: its rows' objects must not set off collections
                since = datetime.fromtimestamp(now - self.max_window_s, tz=UTC)
                n = 0
                with no_collections():
                    for chunk in iter_decisions(conn, since, None, _COLUMNS, chunk_size=2000):
                        n += self._add(chunk, now)
                self._hi = max(self._seen.values(), default=now - self.max_window_s)
            else:
                lo = datetime.fromtimestamp(self._hi - self.overlap_s, tz=UTC)
                ids = conn.execute(sa.select(decisions.c.request_id).where(decisions.c.ts >= lo)).scalars().all()
                new = [i for i in ids if i not in self._seen]
                n = 0
                for k in range(0, len(new), 500):
                    part = new[k:k + 500]
                    rows = conn.execute(sa.select(*[decisions.c[c] for c in _COLUMNS])
                                        .where(decisions.c.request_id.in_(part))).all()
                    n += self._add({c: [r._mapping[c] for r in rows] for c in _COLUMNS}, now, parsed=False)
            self._tail_plans(conn)
        self.rows_read += n
        self._forget(now)
        if now - self._history_at >= self.history_every_s:
            self.refresh_history()
            self._history_at = now
        self.ticks += 1
        self.caught_up_at = now
        self.caught_up.set()
        return n

    def _add(self, cols: dict[str, Any], now: float, parsed: bool = True) -> int:
        n = len(cols["request_id"])
        if n == 0:
            return 0
        cands: list[Any] = list(cols["candidates"])
        vers: list[Any] = list(cols["versions"])
        if not parsed:  # rows straight from SQL: JSON columns may come back as text, candidates columnar
            cands = [decode_candidates(json_loads(c) if isinstance(c, str) else c) for c in cands]
            vers = [json_loads(v) if isinstance(v, str) else v for v in vers]
        ts = to_epoch(np.asarray(cols["ts"], dtype="datetime64[us]")) if parsed else np.array(
            [t.timestamp() for t in cols["ts"]], dtype=np.float64)
        chosen = np.asarray(cols["chosen"], dtype=np.int64)
        self._seen.update(zip(map(str, cols["request_id"]), ts.tolist(), strict=True))
        self._hi = max(self._hi or 0.0, float(ts.max()))
        config_v = np.array([(v or {}).get("config") if isinstance(v, dict) else None for v in vers], dtype=object)
        served = np.array([bool(c) for c in cands], dtype=bool)
        # the served candidate of each decision (fallbacks have none)
        pick = [c[k] if s else None for c, k, s in zip(cands, chosen.tolist(), served.tolist(), strict=True)]
        value = np.array([float(p.get("value", 0.0)) if p else 0.0 for p in pick], dtype=np.float64)
        bucket = np.floor(ts / self.bucket_s).astype(np.int64)
        with self._lock:
            for version in set(config_v.tolist()):
                sel = config_v == version
                exp_rows = [(pick[i] or {}).get("exposure") or [] for i in np.flatnonzero(sel & served).tolist()]
                K = max((len(e) for e in exp_rows), default=0)
                ex = np.zeros((int(sel.sum()), K))
                if K:
                    ex[served[sel]] = np.array([list(e) + [0.0] * (K - len(e)) for e in exp_rows], dtype=np.float64)
                ub, inv = np.unique(bucket[sel], return_inverse=True)
                sums = np.zeros((ub.size, _EXP + K))
                np.add.at(sums[:, _N], inv, 1.0)
                np.add.at(sums[:, _FALLBACK], inv, (~served[sel]).astype(np.float64))
                np.add.at(sums[:, _SERVED], inv, served[sel].astype(np.float64))
                np.add.at(sums[:, _VALUE], inv, value[sel])
                if K:
                    np.add.at(sums[:, _EXP:], inv, ex)
                table = self._buckets.setdefault(None if version is None else int(version), {})
                for b, row in zip(ub.tolist(), sums, strict=True):
                    old = table.get(b)
                    if old is None:
                        table[b] = row
                    elif old.size >= row.size:
                        old[:row.size] += row
                    else:
                        row[:old.size] += old
                        table[b] = row
        return n

    def _tail_plans(self, conn: Any) -> None:
        oldest = time.time() - self.max_window_s
        q = (sa.select(plans.c.version, plans.c.prices, plans.c.created_at)
             .where(plans.c.version > self._plan_cursor, plans.c.created_at >= datetime.fromtimestamp(oldest, tz=UTC))
             .order_by(plans.c.version).limit(5000))
        for version, prices, created in conn.execute(q).all():
            self._plan_cursor = max(self._plan_cursor, int(version))
            if created is None:
                continue
            t = created.replace(tzinfo=created.tzinfo or UTC).timestamp()
            if t < oldest:
                continue
            p = json_loads(prices) if isinstance(prices, str) else (prices or {})
            with self._lock:
                self._prices[int(t // self.bucket_s)] = {str(k): float(v) for k, v in p.items()}

    def _forget(self, now: float) -> None:
        keep_from = int((now - self.max_window_s) // self.bucket_s)
        with self._lock:
            for table in self._buckets.values():
                for b in [b for b in table if b < keep_from]:
                    del table[b]
            for b in [b for b in self._prices if b < keep_from]:
                del self._prices[b]
        horizon = (self._hi or now) - self.overlap_s
        self._seen = {k: t for k, t in self._seen.items() if t >= horizon}

    def refresh_history(self) -> None:
        """Read the newest configs, plans and models into :attr:`history` (each tick does, every
        ``history_every_s``)."""
        cfgs = registry.config_history(self.db, limit=20)
        pls = registry.plan_history(self.db, limit=10)
        mods = registry.model_history(self.db, limit=20)

        def when(d: datetime | None) -> str:
            return "" if d is None else d.strftime("%Y-%m-%d %H:%M:%S")

        self.history = {
            "configs": [{"version": c.version, "status": c.status, "author": c.author, "note": c.note,
                         "created_at": when(c.created_at)} for c in cfgs],
            "plans": [{"version": p.version, "config_version": p.config_version, "status": p.status,
                       "created_at": when(p.created_at),
                       "prices": ", ".join(f"{k}={v:.4g}" for k, v in p.prices.items())} for p in pls],
            "models": [{"name": m.name, "version": m.version, "status": m.status,
                        "created_at": when(m.created_at)} for m in mods],
        }

    # -------------------------------------------------------------------- the reads (request threads)
    def series(self, config_version: int | None, window_s: float, now: float | None = None,
               n_constraints: int | None = None) -> ExposureSeries:
        """The buckets of ``config_version`` that start within the last ``window_s`` seconds."""
        if not 0 < window_s <= self.max_window_s:
            raise ValueError(f"window_s must be in (0, {self.max_window_s:g}]; got {window_s!r}")
        now = time.time() if now is None else now
        first = int((now - window_s) // self.bucket_s) + 1
        with self._lock:
            table = self._buckets.get(config_version, {})
            items = sorted((b, r.copy()) for b, r in table.items() if b >= first)
        K = n_constraints if n_constraints is not None else max((r.size - _EXP for _, r in items), default=0)
        m = np.zeros((len(items), _EXP + K))
        for i, (_, r) in enumerate(items):
            m[i, :min(r.size, m.shape[1])] = r[:m.shape[1]]
        return ExposureSeries(start=np.array([b * self.bucket_s for b, _ in items], dtype=np.float64),
                              decisions=m[:, _N], fallbacks=m[:, _FALLBACK], served=m[:, _SERVED],
                              value=m[:, _VALUE], exposure=m[:, _EXP:])

    def prices(self, names: Sequence[str], window_s: float, now: float | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(bucket start times, prices of shape (n, len(names))) of the plans published in the window."""
        now = time.time() if now is None else now
        first = int((now - window_s) // self.bucket_s) + 1
        with self._lock:
            items = sorted((b, p) for b, p in self._prices.items() if b >= first)
        t = np.array([b * self.bucket_s for b, _ in items], dtype=np.float64)
        v = np.array([[p.get(n, np.nan) for n in names] for _, p in items], dtype=np.float64).reshape(len(items),
                                                                                                      len(names))
        return t, v
