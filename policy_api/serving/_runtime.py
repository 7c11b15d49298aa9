"""What a serving worker holds: database, log writer (journaled: what the API acknowledges is on disk
first), engine, id signer, and the version poller that hot-swaps the engine state when a new config,
plan or model is published.

No request waits on the database longer than ``Settings.db_deadline_s``: the one database read a
request makes (the feedback duplicate check) runs on a checker thread of the runtime's own, and a
request that finds it still busy with an earlier, stuck read does not wait at all (``ON CONFLICT``
keeps feedback idempotent without the check)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.engine import Engine

from .. import registry
from ..engine import (
    DecisionEngine,
    EngineState,
    LiveSignals,
    RequestIds,
    catalog_newest,
    catalog_signature,
    load_bandit,
    load_secret,
    load_state,
    with_plan_calibration,
)
from ..live import UserStateStore, before_vectors, category_vector, live_sequences, make_state_store
from ..log import LogWriter, existing_event_ids, make_engine
from ..loop import lease_info
from ..registry import Versions
from ..settings import Settings
from ._gcpause import no_collections

__all__ = ["Runtime", "live_signals_of"]

log = logging.getLogger("homepage.runtime")

#: event ids a worker remembers for its duplicate check (about 180 bytes each): a client's retries come
#: within seconds; an older duplicate is found by the database check, or else kept once by the log's
#: ``ON CONFLICT DO NOTHING``. A fixed count keeps the worker's memory flat under steady traffic.
RECENT_EVENTS = 20_000


@dataclass
class Runtime:
    """Everything a serving worker holds. ``start()`` connects and loads; ``close()`` flushes the log."""

    settings: Settings
    db: Engine | None = None
    writer: LogWriter | None = None
    engine: DecisionEngine | None = None
    ids: RequestIds | None = None
    load_error: str | None = None
    store: UserStateStore | None = None
    loop_status: dict[str, Any] | None = None
    _store_spec: str | None = None
    _versions: Versions | None = None
    _catalog: tuple[int, str | None] | None = None  # catalog_signature of the catalog the state holds
    _stop: threading.Event = field(default_factory=threading.Event)
    _recent_events: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _checker: _DeadlineCall = field(default_factory=lambda: _DeadlineCall("homepage-dupcheck"))

    def start(self) -> Runtime:
        s = self.settings
        self.db = make_engine(s.database_url)
        self.ids = RequestIds(load_secret(s.data_dir))
        # with the journal the queue is only a cache of what is on disk: a few seconds of rows (~35 MB
        # of decisions) at most; beyond it rows are replayed from the journal's files
        self.writer = LogWriter(self.db, s.spill_path, durable=s.journal, journal_deadline_s=s.journal_deadline_s,
                                journal_sync=s.journal_sync, stall_s=s.writer_stall_s,
                                max_queue=5_000 if s.journal else 20_000)
        self.reload(force=True)
        if s.reload_s > 0:
            threading.Thread(target=self._poll, name="homepage-reload", daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self.writer is not None:
            # what cannot be flushed in time stays in the journal, replayed by the next process
            self.writer.close(timeout=self.settings.shutdown_flush_s)
        if self.store is not None:
            self.store.close()

    def live_signals(self, user_id: str) -> LiveSignals | None:
        """The user's live state as the engine takes it, read within the config's deadline (a state
        that cannot be read in time is cold, and the decision says ``timeout``)."""
        if self.engine is None or self.store is None:
            return None
        return live_signals_of(self.store, self.engine.state, user_id)

    def reload(self, force: bool = False) -> bool:
        """Swap in a new state if anything published changed. Returns True when it swapped."""
        assert self.db is not None, "start() the runtime first"
        try:
            versions = registry.latest_versions(self.db)
            newest = catalog_newest(self.db)  # a catalog loaded while serving, with nothing else published
        except Exception as e:
            self.load_error = f"database unreachable: {e}"
            return False
        held = None if self._catalog is None else self._catalog[1]
        if not force and versions == self._versions and newest == held and self.engine is not None:
            return False
        try:
            old = self._versions
            st = self.engine.state if self.engine is not None else None
            changed = set() if old is None else {k for k in set(versions.models) | set(old.models)
                                                 if versions.models.get(k) != old.models.get(k)}
            full = force or old is None or versions.config != old.config
            # the catalog's signature, read when the state may be loaded anew (a new config or model)
            catalog = catalog_signature(self.db) if full or st is None or changed or newest != held else self._catalog
            if full or st is None:
                with no_collections(freeze=True):  # a state lives until the next load
                    state = load_state(self.db)
            elif changed - {"bandit"} or catalog != self._catalog:
                # a new ranker (or catalog): the scorer and what hangs on it; the catalog kept if current
                with no_collections(freeze=True):  # a state lives until the next load
                    state = load_state(self.db, catalog=st.catalog if catalog == self._catalog else None)
            else:
                # only the prices moved (the loop paces every second) or a new bandit (every few seconds
                # of learning): swapped into the state as it is, no catalog or ranker reload; a full
                # reload holds the worker's interpreter for tens of milliseconds, and its requests wait
                state = st
                if changed:
                    bandit, version = load_bandit(self.db)
                    state = replace(state, bandit=bandit, versions={**state.versions, "bandit": version})
                prices, plan = registry.prices(self.db, registry.require_active_config(self.db))
                state = with_plan_calibration(replace(state, prices=prices, versions={
                    **state.versions, "plan": None if plan is None else plan.version}), plan)
            self._catalog = catalog
        except Exception as e:
            self.load_error = str(e)
            log.warning("engine state not (re)loaded: %s", e)
            return False
        self._versions = versions
        self.load_error = None
        spec = state.config.loop.state_store
        if self.store is None or spec != self._store_spec:
            old_store, self.store = self.store, make_state_store(
                spec, self.db, half_life_s=state.config.loop.state_half_life_s,
                max_events=state.config.loop.state_max_events)
            self._store_spec = spec
            if old_store is not None:
                old_store.close()
            self.store.read(["<warm-up>"], deadline_s=5.0)  # connect now, not on a request's deadline
        if self.engine is None:
            self.engine = DecisionEngine(state)
        else:
            self.engine.swap(state)
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.reload_s):
            self.reload()
            try:
                info = lease_info(self.db) if self.db is not None else None
                self.loop_status = None if info is None else {
                    "holder": info.holder, "live": info.live(), "expires_at": info.expires_at.isoformat(),
                    **info.status}
            except Exception as e:  # the database may be down; /readyz says so
                self.loop_status = {"error": f"{type(e).__name__}: {e}"}

    def existing_event_ids(self, ids: list[str]) -> set[str]:
        """Those of ``ids`` already in the log, if the database answers within ``db_deadline_s``;
        else (or while the writer sees the database failing) the empty set: the writer's
        ``ON CONFLICT`` then settles duplicates."""
        if not ids or self.db is None or self.writer is None or not self.writer.stats()["healthy"]:
            return set()
        db = self.db
        found = self._checker.call(lambda: existing_event_ids(db, ids), self.settings.db_deadline_s)
        return found if found is not None else set()

    def not_ready_reason(self) -> str | None:
        """Why this worker should not get traffic, or None: no engine, or nothing can be made durable."""
        if self.engine is None:
            return f"engine not loaded: {self.load_error}"
        if self.writer is not None and not self.writer.stats()["durable"]:
            return "the log journal cannot write: feedback is refused until it can"
        return None

    def forget_events(self, ids: list[str]) -> None:
        """Undo :meth:`remember_events` for events that were not accepted after all."""
        with self._lock:
            for e in ids:
                self._recent_events.pop(e, None)

    def remember_events(self, ids: list[str]) -> set[str]:
        """Record event ids seen by this worker; return those it had already seen."""
        seen = set()
        with self._lock:
            for e in ids:
                if e in self._recent_events:
                    seen.add(e)
                    self._recent_events.move_to_end(e)
                else:
                    self._recent_events[e] = None
            while len(self._recent_events) > RECENT_EVENTS:
                self._recent_events.popitem(last=False)
        return seen


class _DeadlineCall:
    """Runs one call at a time on a daemon thread; the caller waits at most a deadline. While a call
    is still running (stuck in a frozen database), later calls return None at once instead of
    queueing behind it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._busy = False
        self._jobs: list[Callable[[], None]] = []
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def call(self, fn: Callable[[], set[str]], deadline_s: float) -> set[str] | None:
        done = threading.Event()
        box: list[set[str]] = []

        def job() -> None:
            try:
                box.append(fn())
            except Exception as e:  # the database failing: answer as if it did not answer
                log.warning("database read failed: %s", e)
            finally:
                done.set()

        with self._lock:
            if self._busy:
                return None
            self._busy = True
            self._jobs.append(job)
            if self._thread is None or not self._thread.is_alive():  # also after a fork
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
            self._wake.notify()
        done.wait(deadline_s)
        return box[0] if box else None

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._jobs:
                    self._wake.wait()
                job = self._jobs.pop()
            try:
                job()
            finally:
                with self._lock:
                    self._busy = False


def live_signals_of(store: UserStateStore, st: EngineState, user_id: str, now: float | None = None) -> LiveSignals:
    """What ``store`` holds on ``user_id``, as ``st``'s engine takes it at ``now`` (default: the clock),
    read within the config's deadline (a state that cannot be read in time is cold, and the decision
    says ``timeout``)."""
    loop = st.config.loop
    names = st.config.category_names
    t0 = time.perf_counter()
    got = store.read([user_id], deadline_s=loop.state_deadline_ms / 1000.0)[0]
    if got is None:
        late = time.perf_counter() - t0 >= loop.state_deadline_ms / 1000.0
        return LiveSignals.cold(len(names), "timeout" if late else "cold")
    # the recent sequences feed the ranker's user side (catalog rows, newest first)
    pos, pos_types, skipped = live_sequences(got, st.catalog.index_of())
    now = time.time() if now is None else now
    shown = (category_vector(got, names, now, loop.state_half_life_s, impressions=True, forget=st.forget)
             if got.category_impressions else None)
    before = before_vectors(got, names, now, loop.state_half_life_s, st.forget) if st.shift_map is not None else None
    return LiveSignals("hit", category_vector(got, names, now, loop.state_half_life_s, forget=st.forget),
                       skipped, len(got.items), positives=pos, positive_types=pos_types,
                       n_positive=got.n_positive, n_negative=got.n_negative, impressions=shown, before=before)
