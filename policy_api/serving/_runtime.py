"""What a serving worker holds: database, log writer, engine, id signer, and the version poller that
hot-swaps the engine state when a new config, plan or model is published."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from .. import registry
from ..engine import DecisionEngine, LiveSignals, RequestIds, load_secret, load_state, with_plan_calibration
from ..live import UserStateStore, category_vector, make_state_store
from ..log import LogWriter, make_engine
from ..loop import lease_info
from ..registry import Versions
from ..settings import Settings

__all__ = ["Runtime"]

log = logging.getLogger("homepage.runtime")


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
    _stop: threading.Event = field(default_factory=threading.Event)
    _recent_events: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Runtime:
        s = self.settings
        self.db = make_engine(s.database_url)
        self.ids = RequestIds(load_secret(s.data_dir))
        self.writer = LogWriter(self.db, s.spill_path)
        self.reload(force=True)
        if s.reload_s > 0:
            threading.Thread(target=self._poll, name="homepage-reload", daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self.writer is not None:
            self.writer.close()
        if self.store is not None:
            self.store.close()

    def live_signals(self, user_id: str) -> LiveSignals | None:
        """The user's live state as the engine takes it, read within the config's deadline (a state
        that cannot be read in time is cold, and the decision says ``timeout``)."""
        if self.engine is None or self.store is None:
            return None
        st = self.engine.state
        loop = st.config.loop
        names = st.config.category_names
        t0 = time.perf_counter()
        got = self.store.read([user_id], deadline_s=loop.state_deadline_ms / 1000.0)[0]
        if got is None:
            late = time.perf_counter() - t0 >= loop.state_deadline_ms / 1000.0
            return LiveSignals.cold(len(names), "timeout" if late else "cold")
        index = st.catalog.index_of()
        skipped = [index[i] for i in got.negatives() if i in index]
        return LiveSignals("hit", category_vector(got, names, time.time(), loop.state_half_life_s),
                           np.array(skipped, dtype=np.int64), len(got.items))

    def reload(self, force: bool = False) -> bool:
        """Swap in a new state if anything published changed. Returns True when it swapped."""
        assert self.db is not None, "start() the runtime first"
        try:
            versions = registry.latest_versions(self.db)
        except Exception as e:
            self.load_error = f"database unreachable: {e}"
            return False
        if not force and versions == self._versions and self.engine is not None:
            return False
        try:
            old = self._versions
            if (not force and self.engine is not None and old is not None and versions.config == old.config
                    and versions.models == old.models):
                # only the prices moved (the loop paces every few seconds): no model or catalog reload
                st = self.engine.state
                prices, plan = registry.prices(self.db, registry.require_active_config(self.db))
                state = with_plan_calibration(replace(st, prices=prices, versions={
                    **st.versions, "plan": None if plan is None else plan.version}), plan)
            else:
                state = load_state(self.db)
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
            while len(self._recent_events) > 200_000:
                self._recent_events.popitem(last=False)
        return seen
