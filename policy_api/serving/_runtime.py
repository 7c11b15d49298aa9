"""What a serving worker holds: database, log writer, engine, id signer, and the version poller that
hot-swaps the engine state when a new config, plan or model is published."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from .. import registry
from ..engine import DecisionEngine, RequestIds, load_secret, load_state
from ..log import LogWriter, make_engine
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
            state = load_state(self.db)
        except Exception as e:
            self.load_error = str(e)
            log.warning("engine state not (re)loaded: %s", e)
            return False
        self._versions = versions
        self.load_error = None
        if self.engine is None:
            self.engine = DecisionEngine(state)
        else:
            self.engine.swap(state)
        return True

    def _poll(self) -> None:
        while not self._stop.wait(self.settings.reload_s):
            self.reload()

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
