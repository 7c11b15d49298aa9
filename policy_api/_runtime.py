"""Settings and the serving runtime: database, log writer, engine state loading and hot swapping."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from allocator import HomepageConfig, load_config, parse_config_text

from . import _store as store
from ._catalog import Catalog
from ._db import make_engine
from ._engine import DecisionEngine, EngineState, ScorerHandle, build_state
from ._ids import RequestIds, load_secret
from ._logwriter import LogWriter

__all__ = ["Settings", "Runtime", "resolve_config_path", "load_state", "DEFAULT_DATABASE_URL"]

log = logging.getLogger("homepage.runtime")
DEFAULT_DATABASE_URL = "sqlite:///homepage-data/homepage.db"


def resolve_config_path(cli_value: str | None) -> Path:
    """``--config``, else ``HOMEPAGE_CONFIG``, else ``./homepage.toml``."""
    return Path(cli_value or os.environ.get("HOMEPAGE_CONFIG") or "homepage.toml")


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    data_dir: Path = Path("homepage-data")
    reload_s: float = 5.0
    operator_token: str | None = None
    spill_dir: Path | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        env = os.environ
        base: dict[str, Any] = {
            "database_url": env.get("DATABASE_URL", DEFAULT_DATABASE_URL),
            "data_dir": Path(env.get("HOMEPAGE_DATA_DIR", "homepage-data")),
            "reload_s": float(env.get("HOMEPAGE_RELOAD_S", "5")),
            "operator_token": env.get("HOMEPAGE_OPERATOR_TOKEN") or None,
        }
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def spill_path(self) -> Path:
        return self.spill_dir or (self.data_dir / "spill")


def load_state(db: Any, config: HomepageConfig | None = None, config_version: int | None = None) -> EngineState:
    """Build the engine state from what is published in the database: the active config (unless
    one is given), the catalog, the newest plan for that config, and the newest models."""
    if config is None:
        active = store.active_config(db)
        if active is None:
            raise LookupError("no active config in the database; start with `homepage serve --config FILE`")
        config_version, body = active
        config = parse_config_text(body, source=f"configs.version={config_version}")
    cols = store.load_items(db)
    if len(cols["item_ids"]) == 0:
        raise LookupError("the catalog is empty; load one with `homepage catalog load items.csv`")
    catalog = Catalog.from_arrays(cols)
    versions: dict[str, Any] = {"config": config_version, "plan": None, "ranker": None, "bandit": None}
    prices = np.zeros(len(config.constraints))
    plan = store.latest_plan(db)
    if plan is not None and plan.get("config_version") == config_version:
        named = plan.get("prices") or {}
        prices = np.array([float(named.get(n, 0.0)) for n in config.constraint_names])
        versions["plan"] = plan["version"]
    scorer = None
    ranker = store.latest_model(db, "ranker")
    if ranker is not None:
        try:
            scorer = _load_ranker(ranker, catalog, config)
            versions["ranker"] = ranker[0]
        except Exception:  # a broken artifact must not stop serving: popularity scoring stays
            log.exception("ranker version %s could not be loaded; serving popularity", ranker[0])
    bandit = None
    bm = store.latest_model(db, "bandit")
    if bm is not None:
        try:
            from bandits import VWLayoutBandit

            if bm[2] is None:
                raise ValueError(f"bandit version {bm[0]} has no artifact")
            bandit = VWLayoutBandit.load(bm[2])
            versions["bandit"] = bm[0]
        except Exception:
            log.exception("bandit version %s could not be loaded; serving epsilon-greedy", bm[0])
    return build_state(config, catalog, scorer=scorer, prices=prices, bandit=bandit, versions=versions)


def _load_ranker(model: tuple[int, Any, bytes | None], catalog: Catalog, config: HomepageConfig) -> ScorerHandle:
    from rankers import RankerScorer

    from ._jobs_train import unpack_ranker

    if model[2] is None:
        raise ValueError(f"ranker version {model[0]} has no artifact")
    scorer_bytes, meta = unpack_ranker(model[2])
    scorer = RankerScorer.load(scorer_bytes)
    lookup = {iid: i for i, iid in enumerate(meta.get("item_ids") or [])}
    remap = np.array([lookup.get(i, -1) for i in catalog.item_ids.tolist()], dtype=np.int64)
    users = {uid: i for i, uid in enumerate(meta.get("user_ids") or [])}
    return ScorerHandle(scorer, users, remap, name=f"ranker:{model[0]}")


@dataclass
class Runtime:
    """Everything a serving worker holds: database, log writer, engine, id signer, version poller."""

    settings: Settings
    db: Any = None
    writer: LogWriter | None = None
    engine: DecisionEngine | None = None
    ids: RequestIds | None = None
    load_error: str | None = None
    _versions: dict[str, Any] = field(default_factory=dict)
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
        try:
            versions = store.latest_versions(self.db)
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


def ensure_config(db: Any, path: Path, author: str = "serve") -> tuple[int, HomepageConfig]:
    """Validate the config file and make it the active config (a new version when it changed)."""
    cfg = load_config(path)
    body = path.read_text(encoding="utf-8")
    active = store.active_config(db)
    if active is not None and active[1] == body:
        return active[0], cfg
    version = store.insert_config(db, body=body, author=author, status="active",
                                  note=f"loaded from {path}", projection=None)
    return version, cfg
