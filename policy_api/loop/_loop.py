"""The engine's background loop: it plans, paces, learns, retrains and keeps the live state, by itself.

One loop runs per database (a :class:`~policy_api.loop.Lease`); ``homepage serve`` supervises one
beside its request workers and ``homepage worker`` runs one on its own. Each tick:

* **live state** — feedback that arrived since the last tick is joined to its decision (for the user
  id) and written to the live state store (recent positive/negative sequences, decayed category
  engagement, item trends); serving workers read it at decision time;
* **plan** — before the first request and whenever the active config changes (or every
  ``replan_every_s`` once there is traffic), :func:`policy_api.jobs.plan` publishes prices;
* **pace** — every ``pace_every_s``, the decisions served since the last step go to
  :class:`allocator.ResolvePacer`, which re-solves the prices on the candidate sets actually served
  (the last ``pace_window``) for aims inside each bound, corrected by an integral of the realised
  shares' misses (so the shares hold their bounds without overshooting);
* **shift** — every second, the pages served since are judged against what the engine predicted
  for them (:class:`ShiftDetector`): when what users take from a category (or from the whole page)
  falls at once below the predictions, every user's live category sums are set aside as what the
  user took before the shift (``shift_keep`` of them stay current; :class:`~policy_api.live.Forget`,
  carried by the plans), the calibration restarts from the shift, and until its window holds only
  newer feedback the loop recalibrates every ``_SHIFT_REFIT_S`` seconds, each plan carrying a
  :class:`~policy_api.live.ShiftMap` fitted on the users served since (their tastes before the shift
  against now), which serving turns into each user's prior; meanwhile the pacer keeps its window
  across those recalibrations and owns the prices after ``PACER_OWNS_AFTER_SHIFT`` decisions;
* **learn** — every ``learn_every_s``, decisions older than ``settle_s`` are joined to the feedback
  that arrived for them and the bandit learns from them (:func:`policy_api.jobs.learn`);
* **train** — when ``train_min_events`` new behaviour events have arrived (and ``train_every_s``
  has passed), the rankers are retrained in a thread and published only if the gate passes.

Every step's last run, duration and outcome go into the lease row's status (``/readyz``, ``/ops``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from allocator import LayoutSpace, PaceTables, ResolvePacer, ResolvePacerConfig, exploit_pmf, exploitable

from .. import jobs, registry
from ..engine import LIVE_PRIOR_IMPRESSIONS, calibration_rates, calibration_shift, catalog_long_tail
from ..engine._state import plan_forget, plan_shift_map
from ..errors import HomepageError
from ..live import IMPRESSION, Forget, LiveEvent, ShiftMap, UserStateStore, fit_shift_map, make_state_store
from ..log import Catalog, decisions, feedback, load_items, read_decision_log
from ..registry import ConfigRecord
from ._lease import Lease
from ._shift import ShiftDetector, slot_outcomes

__all__ = ["BackgroundLoop", "StepRecord"]

log = logging.getLogger("homepage.loop")

_SETTLE_LAG_S = 0.5  # decisions younger than this may still sit in a worker's log queue
_PENDING_S = 30.0  # how long feedback waits for its decision row before it is dropped from the live state
#: the loop plans again when a calibrated engagement rate moved by more than this (relative) since the plan
CALIBRATION_SHIFT = 0.2
#: ... and when the feedback since the plan's calibration has grown by this share of the item rates'
#: window (``[loop] item_events``; at least ``_MIN_NEW_EVENTS``): each item's own rate needs its evidence
ITEM_EVIDENCE_GROWTH = 0.25
_MIN_NEW_EVENTS = 2000
#: the shift step judges decisions this many seconds old (their page's impressions and first plays in)
_SHIFT_SETTLE_S = 1.0
#: after a recalibration, pages served within this many seconds may still come from a worker that has
#: not reloaded the plan (workers poll for versions every second)
_SHIFT_RELOAD_S = 2.0
#: after a shift, the loop recalibrates and refits the shift map this often (seconds) until the
#: calibration's window holds only feedback from after it
_SHIFT_REFIT_S = 2.0
#: how often (seconds) the loop looks whether to calibrate again: ``YOUNG_CALIBRATE_S`` while the plan in
#: force carries no item's own rate yet (the engine shows each category's most popular items, and its
#: first measured rates are worth more than anything it will learn later), ``CALIBRATE_S`` after, and
#: after the config's first ``[loop] item_events`` feedback events (a window that filled without item
#: rates will not bring them by being looked at more often)
YOUNG_CALIBRATE_S = 2.0
CALIBRATE_S = 10.0
#: with nothing measured to calibrate on (too few impressions), the looks stay young only this long after
#: the loop took up the config: a client that reports no impressions would have the loop read the
#: catalog and the feedback every 2 s for ever (0.35 s a look on a 40,000-item catalog)
YOUNG_UNMEASURED_S = 120.0
#: until the plan in force carries a calibration at all, and for no longer than ``FIRST_CALIBRATE_FOR_S``
#: after the loop took up the config, it looks every ``FIRST_CALIBRATE_S``: a fresh engine's first
#: calibration starts the planner's solves that bring its first item rates, and a busy server serves ~200
#: requests a second (at most ~20 looks per config, whatever the catalog's size or the client's events)
FIRST_CALIBRATE_S = 0.5
FIRST_CALIBRATE_FOR_S = 10.0
#: the most users (those seen last since the shift) whose states the shift map is fitted on
_SHIFT_MAP_USERS = 5000


@cache
def _metrics() -> tuple[Any, Any]:
    # prometheus_client picks its value store at first import: import it in the loop process, after
    # ``homepage serve`` has set PROMETHEUS_MULTIPROC_DIR, so the workers' /metrics includes these
    from prometheus_client import Counter, Histogram

    return (Histogram("homepage_loop_step_seconds", "Duration of a loop step", ["step"],
                      buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)),
            Counter("homepage_loop_steps", "Loop step runs by outcome", ["step", "outcome"]))


#: the nice value the loop's own thread runs at (the threads it starts inherit it): every step of the
#: loop is background work beside the request workers on the same cores, and a request must not wait
#: for a core while the loop calibrates or paces (the workers' weight is ~9x the loop's at 10)
LOOP_NICENESS = 10


def _lower_priority(niceness: int) -> None:
    """Lower the calling thread's CPU priority to ``niceness`` (Linux: the nice value is per thread,
    and threads started afterwards inherit it); never raise it back."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at the normal priority
        pass


def _background_priority() -> None:
    """Lower the calling thread's CPU priority to the lowest.

    Training takes seconds to minutes of CPU beside the request workers on the same cores: at the
    lowest priority it uses what serving leaves idle instead of taking a core from the requests."""
    _lower_priority(19)


@dataclass
class StepRecord:
    """What one step of the loop last did."""

    runs: int = 0
    errors: int = 0
    last_run: str | None = None
    duration_s: float | None = None
    outcome: str | None = None
    detail: str | None = None


def _pace_tables(db: Engine, request_ids: np.ndarray, fresh: np.ndarray, since: datetime | None,
                 until: datetime) -> PaceTables | None:
    """The block tables the batch's fresh decisions logged (``context["pace"]``, see ``[loop]
    pace_sample``), at their positions in the batch (``request_ids``, the decision log's order); None
    where none did. A table whose shape or lead width differs from the first is left out."""
    # only the decisions that logged a table (a share of them, pace_sample): the database filters
    q = sa.select(decisions.c.request_id, decisions.c.context).where(
        decisions.c.ts < until, decisions.c.context["pace"].as_string().is_not(None))
    if since is not None:
        q = q.where(decisions.c.ts >= since)
    with db.connect() as conn:
        got = conn.execute(q).all()
    ids = np.asarray(request_ids).astype(str)
    if not got or not ids.size:
        return None
    by_id = np.argsort(ids, kind="stable")
    want = np.array([str(r) for r, _ in got])
    k = np.minimum(np.searchsorted(ids[by_id], want), ids.size - 1)
    at_batch = by_id[k]
    found = ids[at_batch] == want
    rows: list[tuple[int, dict[str, Any]]] = []
    for (_, ctx), i in zip(got, np.where(found, at_batch, -1).tolist(), strict=True):
        if i < 0 or not fresh[i]:
            continue
        ctx = json.loads(ctx) if isinstance(ctx, str) else ctx
        table = ctx.get("pace") if isinstance(ctx, dict) else None
        if isinstance(table, dict):
            rows.append((i, table))
    if not rows:
        return None
    shape = rows[0][1].get("shape")
    keep = [(i, t) for i, t in rows if t.get("shape") == shape]
    try:
        B, C, R = (int(x) for x in shape or ())
        # a decision without category preferences led with its table's own best (-1 here): as many as
        # build_candidates takes, at most one per category
        lead_n = max((len(t.get("lead") or []) for _, t in keep), default=0) or min(C, 4)
        mean = np.array([t["mean"] for _, t in keep], dtype=np.float64).reshape(-1, B, C, R)
        tail = np.array([t["tail"] for _, t in keep], dtype=np.int64).reshape(-1, B, C, R)
        shown = np.array([t["shown"] for _, t in keep], dtype=np.int64).reshape(-1, B, C, R)
        lead = np.array([(list(t.get("lead") or []) + [-1] * lead_n)[:lead_n] for _, t in keep], dtype=np.int64)
        explore = np.array([int(t.get("explore", -1)) for _, t in keep], dtype=np.int64)
    except (TypeError, ValueError, KeyError):
        log.warning("pace tables of %d decisions could not be read; the pacer re-solves on the served sets", len(keep))
        return None
    at = np.array([i for i, _ in keep], dtype=np.int64)
    order = np.argsort(at, kind="stable")
    return PaceTables(mean, tail, shown, lead, explore, at).take(order)


def _by_name(names: tuple[str, ...], values: Any) -> dict[str, float]:
    """One float per constraint, keyed by its name (as plans store prices and pacer figures)."""
    return dict(zip(names, map(float, values), strict=True))


@dataclass
class _Pacing:
    config_version: int
    pacer: ResolvePacer
    since: datetime
    plan_version: int
    #: the plan the pacer last started from: it re-solves on the candidate sets served since (a new plan
    #: that kept the pacer's prices and brought only a calibration does not move it)
    valued_from: int = 0
    fresh: int = 0  # decisions served since plan_version was taken up that the pacer has re-solved on
    solved: int = 0  # decisions served under this config that the pacer has re-solved on, over all plans
    ranker: int = 0  # the newest ranker version served: candidate sets scored by an older one are not re-solved on


#: while the loop settles after a population shift, the pacer owns the prices once it has re-solved on
#: this many decisions under the config (at most ``pace_window``, the count that gives it them otherwise)
PACER_OWNS_AFTER_SHIFT = 200


@dataclass
class _Training:
    thread: threading.Thread | None = None
    last_feedback_id: int = 0
    last_started: float = 0.0
    resumed: bool = False  # the marks above read from the newest ranker record (a restarted loop)


@dataclass
class BackgroundLoop:
    """The loop for one database. ``run(stop)`` blocks until ``stop`` is set.

    Parameters
    ----------
    db
        The log's database.
    holder
        The lease holder's name (default: host, pid, random suffix).
    tick_s
        Seconds between ticks (the live state's latency is about this plus the log writer's flush).
    """

    db: Engine
    holder: str | None = None
    tick_s: float = 0.05
    steps: dict[str, StepRecord] = field(default_factory=lambda: {
        k: StepRecord() for k in ("state", "shift", "calibrate", "plan", "pace", "learn", "train")})
    _config: ConfigRecord | None = None
    _store: UserStateStore | None = None
    _store_spec: tuple[Any, ...] | None = None
    _item_category: dict[str, str] = field(default_factory=dict)
    _item_head: dict[str, bool] = field(default_factory=dict)  # item id -> in its category's head
    _last_feedback_id: int | None = None
    _pending: dict[int, tuple[float, Any]] = field(default_factory=dict)
    _pacing: _Pacing | None = None
    _next: dict[str, float] = field(default_factory=dict)
    _training: _Training = field(default_factory=_Training)
    _planner: threading.Thread | None = None  # the planner's solve, off the loop's thread
    # the pacer's state is updated by the loop's thread and read by the planner's when it publishes
    _pacer_lock: threading.Lock = field(default_factory=threading.Lock)
    _lease: Lease | None = None
    _shift: ShiftDetector | None = None
    _shift_read: datetime | None = None  # the newest decision the shift step has judged
    _shift_basis: str | None = None  # the plan's calibration (and its scorer) the judged pages were predicted with
    _shift_pages: int = 0  # pages judged since the loop started or since the last shift
    _forget: Forget | None = None  # the last population shift detected (carried by every plan after it)
    _shift_map: ShiftMap | None = None  # what users' tastes before it say now (refitted with each plan)
    _shift_feedback: int = 0  # the newest feedback id when it was detected
    _map_fit: dict[str, Any] | None = None  # what the last fit of the shift map found (shown in status())
    _calibrated: bool = False  # the plan in force carries a calibration (see FIRST_CALIBRATE_S)
    _young: bool = True  # the plan in force carries no item's own rate yet (see YOUNG_CALIBRATE_S)
    _config_since: float = 0.0  # time.monotonic() when the loop took up the config
    _feedback_at_config: int = 0  # the newest feedback id then

    # ---- the driver ------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Hold the lease (or wait as a standby) and tick until ``stop`` is set, at the priority of
        :data:`LOOP_NICENESS`. A heartbeat thread takes and renews the lease (:meth:`Lease.keep`), so a
        long step never lets it lapse; a tick runs only while the lease is fresh."""
        _lower_priority(LOOP_NICENESS)
        beat: threading.Thread | None = None
        while not stop.is_set():
            try:
                cfg = registry.active_config(self.db)
                if self._lease is None:
                    ttl = cfg.config.loop.lease_ttl_s if cfg is not None else 10.0
                    self._lease = Lease(self.db, ttl_s=ttl, holder=self.holder)
                    beat = self._lease.keep(stop, self.status)
                if self._lease.fresh and cfg is not None and cfg.config.loop.enabled:
                    self.tick(cfg)
            except Exception:  # the database may be down: keep trying, never die
                log.exception("loop tick failed")
                stop.wait(1.0)
            stop.wait(self.tick_s)
        if beat is not None:
            beat.join()
        if self._lease is not None:
            self._lease.release()
        if self._store is not None:
            self._store.close()

    @property
    def role(self) -> str:
        """``active`` while this loop holds a fresh lease, ``standby`` while another does (or the
        database cannot be reached), ``starting`` before the first try."""
        if self._lease is not None and self._lease.fresh:
            return "active"
        return "standby" if self._lease is not None and self._lease.tried else "starting"

    @property
    def training(self) -> bool:
        """True while a ranker is being trained in the background."""
        return self._training.thread is not None and self._training.thread.is_alive()

    @property
    def planning(self) -> bool:
        """True while the planner solves in the background (see :meth:`_plan_step`)."""
        return self._planner is not None and self._planner.is_alive()

    def status(self) -> dict[str, Any]:
        """What ``/readyz`` and ``/ops`` show: role, config version, each step's last run."""
        return {"role": self.role, "holder": None if self._lease is None else self._lease.holder,
                "config_version": None if self._config is None else self._config.version,
                "updated": datetime.now(tz=UTC).isoformat(),
                "pacer": None if self._pacing is None else self._pacer_status(),
                "shift": self._shift_status(),
                "steps": {k: asdict(v) for k, v in self.steps.items()}}

    def _shift_status(self) -> dict[str, Any] | None:
        """The last population shift the loop acts on (None: none), and its map's last fit: when, on how
        many users' states, and per category the users its row was fitted on (a row needs
        ``MIN_USERS`` of ``policy_api.live._transfer``; below that the category's new fans get the
        population's rate)."""
        f = self._forget
        if f is None:
            return None
        return {"since": datetime.fromtimestamp(f.epoch, tz=UTC).isoformat(), "keep": f.keep, "map": self._map_fit}

    def _pacer_status(self) -> dict[str, Any]:
        assert self._pacing is not None and self._config is not None
        pc = self._pacing.pacer
        names = self._config.config.constraint_names
        # to first order, the value given up per decision by holding a share past its aim is |price| x excess
        return {n: {"share": float(s), "price": float(p), "overshoot": float(o), "value_given_up": float(abs(p) * o)}
                for n, s, p, o in zip(names, pc.shares_, pc.prices_, pc.overshoot_, strict=True)}

    def tick(self, cfg: ConfigRecord) -> None:
        """One pass over every step that is due."""
        now = time.time()
        if self._config is None or cfg.version != self._config.version:
            self._on_config(cfg)
        self._step("state", self._live_state)
        loop = cfg.config.loop
        if now >= self._next.get("shift", 0.0):
            self._step("shift", self._detect_shift)
            self._next["shift"] = now + 1.0
        if not self.planning and (registry.latest_plan(self.db, cfg.version) is None
                                  or now >= self._next.get("plan", np.inf)):
            self._step("plan", self._plan_step)
            self._next["plan"] = now + loop.replan_every_s
        if now >= self._next.get("calibrate", 0.0):
            self._step("calibrate", self._calibrate)
            self._next["calibrate"] = now + self._next_calibrate_s()
        if now >= self._next.get("pace", 0.0):
            self._step("pace", self._pace)
            self._next["pace"] = now + loop.pace_every_s
        if now >= self._next.get("learn", 0.0):
            self._step("learn", self._learn)
            self._next["learn"] = now + loop.learn_every_s
        if now >= self._next.get("train", 0.0):
            self._step("train", self._train)
            self._next["train"] = now + min(loop.train_every_s, 30.0)

    def _step(self, name: str, fn: Any) -> None:
        rec = self.steps[name]
        t0 = time.perf_counter()
        try:
            outcome, detail = fn()
        except HomepageError as e:
            outcome, detail = "error", e.message
            rec.errors += 1
        except Exception as e:
            log.exception("loop step %s failed", name)
            outcome, detail = "error", f"{type(e).__name__}: {e}"
            rec.errors += 1
        if outcome == "idle":  # nothing to do: not a run worth recording
            return
        rec.runs += 1
        rec.last_run = datetime.now(tz=UTC).isoformat()
        rec.duration_s = time.perf_counter() - t0
        rec.outcome, rec.detail = outcome, detail
        seconds, runs = _metrics()
        seconds.labels(step=name).observe(rec.duration_s)
        runs.labels(step=name, outcome=outcome).inc()

    def _on_config(self, cfg: ConfigRecord) -> None:
        self._config = cfg
        self._config_since = time.monotonic()
        self._feedback_at_config = jobs.feedback_seen(self.db)
        self._young = True
        self._pacing = None
        catalog = Catalog.from_arrays(load_items(self.db))
        ids = [str(i) for i in catalog.item_ids.tolist()]
        self._item_category = dict(zip(ids, map(str, catalog.category.tolist()), strict=True))
        # the category sums of the live state count the head items only (see LiveEvent.head)
        is_tail, _ = catalog_long_tail(catalog, cfg.config)
        self._item_head = dict(zip(ids, (~is_tail).tolist(), strict=True))
        loop = cfg.config.loop
        spec = (loop.state_store, loop.state_half_life_s, loop.state_max_events, loop.state_half_life_impressions)
        if self._store is None or self._store_spec != spec:  # a new store, or new update rules
            if self._store is not None:
                self._store.close()
            self._store = make_state_store(loop.state_store, self.db, half_life_s=loop.state_half_life_s,
                                           impression_half_life=loop.state_half_life_impressions,
                                           max_events=loop.state_max_events)
            self._store_spec = spec
        if self._forget is None:  # a loop taking over: the shift the plans carry
            plan = registry.latest_plan(self.db, cfg.version)
            self._forget = None if plan is None else plan_forget(plan.solver or {})
            self._shift_map = None if plan is None else plan_shift_map(plan.solver or {}, len(cfg.config.categories))
        self._store.forget = self._forget
        self._shift = ShiftDetector(recent=loop.shift_window, slots=cfg.config.slots)
        self._shift_read = None
        # a new config's pages are judged as a young engine's: its plans' calibrations move the predictions
        # at once (a false shift came 14 s after a rollback)
        self._shift_basis, self._shift_pages = None, 0
        self._next.pop("plan", None)

    # ---- live state ------------------------------------------------------------------------------
    def _live_state(self) -> tuple[str, str]:
        assert self._config is not None and self._store is not None
        config = self._config.config
        with self.db.connect() as conn:
            if self._last_feedback_id is None:  # start from now: the past is the rankers' training data
                self._last_feedback_id = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(feedback.c.id), 0)))
                                             .scalar_one())
                return "idle", ""
            rows = conn.execute(
                sa.select(feedback.c.id, feedback.c.request_id, decisions.c.user_id, feedback.c.item_id,
                          feedback.c.type, feedback.c.ts, feedback.c.slot)
                .select_from(feedback.outerjoin(decisions, decisions.c.request_id == feedback.c.request_id))
                .where(feedback.c.id > self._last_feedback_id)
                .order_by(feedback.c.id).limit(20_000)).all()
            retry = [r for _, r in self._pending.values()]
            if retry:
                found = dict(conn.execute(sa.select(decisions.c.request_id, decisions.c.user_id)
                                          .where(decisions.c.request_id.in_([r.request_id for r in retry]))).all())
            else:
                found = {}
        if rows:
            self._last_feedback_id = int(rows[-1].id)
        now = time.time()
        events: list[LiveEvent] = []
        # impressions count per (user, category) as examined impressions (as the plan's calibration
        # counts them: HomepageConfig.impression_weights)
        w = config.impression_weights()
        shown: dict[tuple[str, str], list[float]] = {}

        def add(user: str, r: Any) -> None:
            cat = self._item_category.get(str(r.item_id))
            if cat is None:
                return
            head = self._item_head.get(str(r.item_id), True)
            if r.type == IMPRESSION:
                if head:
                    weight = float(w[r.slot]) if r.slot is not None and 0 <= r.slot < w.size else 1.0
                    acc = shown.setdefault((user, cat), [0.0, 0.0])
                    acc[0] += weight
                    acc[1] = max(acc[1], r.ts.timestamp())
                return
            if r.type not in config.events:
                return
            events.append(LiveEvent(user_id=user, item_id=str(r.item_id), category=cat, type=str(r.type),
                                    units=float(config.events[r.type]), ts=r.ts.timestamp(), head=head))

        for fid, (t_first, r) in list(self._pending.items()):
            if r.request_id in found:
                add(str(found[r.request_id]), r)
                del self._pending[fid]
            elif now - t_first > _PENDING_S:
                del self._pending[fid]
        for r in rows:
            if r.user_id is None:  # its decision is still in a worker's queue: try again next tick
                self._pending[int(r.id)] = (now, r)
            else:
                add(str(r.user_id), r)
        n_behaviour = len(events)
        events.extend(LiveEvent(user_id=u, item_id="", category=c, type=IMPRESSION, units=weight, ts=ts)
                      for (u, c), (weight, ts) in shown.items())
        if not events:
            return "idle", ""
        self._store.write_batch(events)
        return "ok", (f"{n_behaviour} events and impressions of {len(shown)} (user, category) pairs, "
                      f"{len(self._pending)} waiting for their decision")

    def _calibrate(self) -> tuple[str, str]:
        """Plan again as soon as there is feedback enough to calibrate the categories, each time the
        examined impressions behind the calibration have doubled, and whenever a category's recent
        engagement rate (head or tail) has moved by more than ``CALIBRATION_SHIFT`` from the plan's (what
        users engage with changed). A plan made before any traffic carries no calibration; later plans
        carry the one measured by the plan job on the recent window."""
        assert self._config is not None
        plan = registry.latest_plan(self.db, self._config.version)
        if plan is None:
            return "idle", ""
        self._calibrated = bool((plan.solver or {}).get("calibration"))
        if self._settling():
            self._next["plan"] = 0.0
            return "ok", "after a population shift: recalibrating and refitting the shift map"
        rates = jobs.calibration(self.db, self._config.config, repeat=False, since=self._calibration_since())
        if rates is None:
            self._young = time.monotonic() - self._config_since < YOUNG_UNMEASURED_S
            return "idle", ""
        names = self._config.config.category_names
        have = (plan.solver or {}).get("calibration") or {}
        seen = float(calibration_rates(have, names)[:, :, 1].sum())
        now = float(calibration_rates(rates, names)[:, :, 1].sum())
        shift = calibration_shift(calibration_rates(have, names), calibration_rates(rates, names))
        items = self._config.config.loop.item_events
        was = (plan.solver or {}).get("feedback_seen")
        total = jobs.feedback_seen(self.db)
        self._young = (0 < items and total - self._feedback_at_config < items
                       and not any(isinstance(v, dict) and v.get("items") for v in have.values()))
        grown = (items > 0 and isinstance(was, int)
                 and total - was >= max(ITEM_EVIDENCE_GROWTH * min(max(was, 1), items), _MIN_NEW_EVENTS))
        if have and now < 2.0 * seen and shift < CALIBRATION_SHIFT and not grown:
            return "idle", ""
        self._next["plan"] = 0.0
        why = (f"{now:.0f} examined impressions (the plan's calibration had {seen:.0f})" if now >= 2.0 * seen or not have
               else f"an engagement rate moved by {shift:.0%} since the plan's calibration" if shift >= CALIBRATION_SHIFT
               else f"{total - (was or 0)} feedback events since the plan's item rates")
        return "ok", f"{why}: planning again"

    def _next_calibrate_s(self) -> float:
        """Seconds until the calibrate step looks again (see :data:`YOUNG_CALIBRATE_S`)."""
        if (self._young and not self._calibrated
                and time.monotonic() - self._config_since < FIRST_CALIBRATE_FOR_S):
            return FIRST_CALIBRATE_S
        return _SHIFT_REFIT_S if self._settling() else YOUNG_CALIBRATE_S if self._young else CALIBRATE_S

    # ---- population shift ------------------------------------------------------------------------
    def _calibration_since(self) -> datetime | None:
        """Where the calibration starts: the last population shift (None: its own window)."""
        return None if self._forget is None else datetime.fromtimestamp(self._forget.epoch, tz=UTC)

    def _forget_field(self, refit: bool = True) -> dict[str, Any]:
        """What a plan carries of the last shift (``{"forget": ...}``; empty without one): its epoch and
        keep, and the shift map, refitted unless ``refit`` is False (the pacer's plans carry the last
        one, so that a plan published by hand in between does not make the workers forget it)."""
        f = self._forget
        if f is None:
            return {}
        out: dict[str, Any] = {"epoch": f.epoch, "keep": f.keep}
        if refit:
            self._shift_map = self._fit_shift_map()
        if self._shift_map is not None:
            out["map"] = self._shift_map.to_dict()
        return {"forget": out}

    def _settling(self) -> bool:
        """Whether the calibration's window still reaches back before the last shift."""
        if self._forget is None or self._config is None or not self._shift_feedback:
            return False
        return jobs.feedback_seen(self.db) - self._shift_feedback < self._config.config.loop.calibration_events

    def _fit_shift_map(self) -> ShiftMap | None:
        """The shift map fitted on the live states of the users served since the shift (the newest
        ``_SHIFT_MAP_USERS``): their sums from before it against their new ones."""
        assert self._config is not None and self._store is not None and self._forget is not None
        f = self._forget
        since = datetime.fromtimestamp(f.epoch, tz=UTC)
        with self.db.connect() as conn:
            users = [str(u) for u in conn.execute(
                sa.select(decisions.c.user_id).where(decisions.c.ts >= since).group_by(decisions.c.user_id)
                .order_by(sa.func.max(decisions.c.ts).desc()).limit(_SHIFT_MAP_USERS)).scalars()]
        names = self._config.config.category_names
        rows = []
        states = self._store.read(users, deadline_s=5.0)  # the loop's read: not under a request's deadline
        for st in states:
            if st is None or st.epoch < f.epoch or not st.before_impressions:
                continue
            rows.append([[d.get(c, 0.0) for c in names] for d in (st.before_engagement, st.before_impressions,
                                                                 st.category_engagement, st.category_impressions)])
        self._map_fit = {"at": datetime.now(tz=UTC).isoformat(), "users_served": len(users),
                         "states_read": sum(st is not None for st in states), "users_both_sides": len(rows),
                         "users_per_category": None}
        if not rows:
            return None
        a = np.asarray(rows, dtype=np.float64)  # (n, 4, C)
        eng = a[:, 2] - f.keep * a[:, 0]  # what is new: the sums less what the state kept from before
        imp = np.maximum(a[:, 3] - f.keep * a[:, 1], 0.0)
        # the population's rates before the shift, over these users' sums (the old rates' shrinkage target)
        u, i = a[:, 0].sum(axis=0), a[:, 1].sum(axis=0)
        g = float(u.sum() / i.sum()) if i.sum() > 0 else 0.0
        before_rate = (u + LIVE_PRIOR_IMPRESSIONS * g) / (i + LIVE_PRIOR_IMPRESSIONS)
        m = fit_shift_map(a[:, 0], a[:, 1], eng, imp, before_rate, k=LIVE_PRIOR_IMPRESSIONS)
        self._map_fit["users_per_category"] = dict(zip(names, np.asarray(m.users).tolist(), strict=True))
        return m if np.isfinite(m.intercept).any() else None

    def _detect_shift(self, now: datetime | None = None) -> tuple[str, str]:
        """Judge the pages served since the last run (by ``now``, default the clock's) against what the
        engine predicted for them; on a shift, forget most of every user's category evidence and plan
        again from the shift on."""
        assert self._config is not None and self._store is not None and self._shift is not None
        cfg = self._config
        keep = cfg.config.loop.shift_keep
        if keep >= 1.0:
            return "idle", ""
        now = datetime.now(tz=UTC) if now is None else now
        until = now - timedelta(seconds=_SHIFT_SETTLE_S)
        plan = registry.latest_plan(self.db, cfg.version)
        solver = {} if plan is None else (plan.solver or {})
        basis = json.dumps([solver.get("calibration"), solver.get("calibration_scorer")], sort_keys=True, default=str)
        young = self._shift_pages < self._shift.recent + self._shift.reference
        if young and self._shift_basis is not None and basis != self._shift_basis:
            # a young engine's calibrations (the first ones, on little evidence, and those after a
            # shift) move every prediction at once: judged across one, the pages served before it
            # look like a population that changed (a new engine raised false alarms at its first
            # calibrations), so the windows start again from the pages predicted with it. Once the
            # windows have been full, recalibrations keep them: a real shift moves the calibration
            # too, seconds after it, and must still be found
            self._shift.reset()
            self._shift_read = now + timedelta(seconds=_SHIFT_RELOAD_S)
        self._shift_basis = basis
        if self._shift_read is None:  # from now on: the pages this loop sees served
            self._shift_read = until
            return "idle", ""
        got = slot_outcomes(self.db, cfg.config, self._shift_read, until, cfg.version)
        got = got.part(int(np.searchsorted(got.ts, self._shift_read.timestamp(), side="right")), len(got))
        if not len(got):
            return "idle", ""
        self._shift_read = datetime.fromtimestamp(float(got.ts[-1]), tz=UTC)  # the newest page judged
        self._shift.add(got)
        self._shift_pages += len(got)
        names = cfg.config.category_names
        shift = self._shift.check(len(names))
        if shift is None:
            return "ok", f"{len(got)} pages judged, {len(self._shift.outcomes)} in the windows: no shift"
        self._forget = Forget(shift.at, keep)
        self._shift_map = None
        self._map_fit = None
        self._shift_feedback = jobs.feedback_seen(self.db)
        self._store.forget = self._forget
        self._shift.reset()
        self._shift_pages = 0
        self._next["plan"] = 0.0
        moved = ", ".join([f"{names[c]} x{shift.ratio[c]:.2f} (z {shift.z[c]:+.1f})" for c in shift.categories]
                          + [f"the whole page x{shift.page_ratio:.2f} (z {shift.page_z:+.1f})"])
        at = datetime.fromtimestamp(shift.at, tz=UTC).isoformat(timespec="seconds")
        log.warning("population shift since %s: %s", at, moved)
        return "ok", (f"population shift since {at}: observed over predicted units {moved}; live states keep "
                      f"{keep:.0%} of their category sums, the calibration restarts there")

    # ---- plan and pace ---------------------------------------------------------------------------
    def _pacer_owns(self) -> bool:
        """Whether the pacer has re-solved on enough served decisions under this config to own the
        prices (a full ``pace_window``; ``PACER_OWNS_AFTER_SHIFT`` while the loop settles after a shift)."""
        assert self._config is not None
        loop = self._config.config.loop
        p = self._pacing
        owns = min(PACER_OWNS_AFTER_SHIFT, loop.pace_window) if self._settling() else loop.pace_window
        return p is not None and p.config_version == self._config.version and p.solved >= owns

    def _plan_step(self) -> tuple[str, str]:
        """The plan step: :meth:`_plan` on the loop's thread for the first plan (before the first request)
        and for a recalibration beside the pacer's prices (a second or two); the planner's solve (which
        scores a few thousand sampled users and solves an LP: 15-20 s on a wide world of 20,000 items)
        on a thread of its own, at the lowest CPU priority. On the loop's thread it held the pacer for as
        long: a videos cap stood 2-3 pp over for 23 s while the planner ran."""
        assert self._config is not None
        if registry.latest_plan(self.db, self._config.version) is None or self._pacer_owns():
            return self._plan()

        def work() -> None:
            _background_priority()
            self._step("plan", self._plan)  # recorded as the step's run, as on the loop's thread

        self._planner = threading.Thread(target=work, name="homepage-plan", daemon=True)
        self._planner.start()
        return "ok", "planning in the background (the pacer goes on)"

    def _plan(self) -> tuple[str, str]:
        assert self._config is not None
        loop = self._config.config.loop
        # a new plan brings a new calibration: the pacer starts again from its prices (see _pace), as the
        # served candidates it kept were valued under the old one. Once the pacer has re-solved on a full
        # window of decisions under this config (over any plans), a new plan keeps the pacer's prices: the
        # planner's come from sampled users scored without their live state, and jumping to them every
        # time the calibration moved set the shares swinging (with re-plans every few hundred decisions,
        # a pacer that had to see a full window under each plan never got to keep its prices). While the
        # loop settles after a population shift it plans every few seconds, and each planner solve moved
        # the prices by several times: there the pacer owns them after PACER_OWNS_AFTER_SHIFT decisions
        cfg = self._config
        p = self._pacing
        if p is not None and self._pacer_owns():
            # the pacer owns the prices: a re-plan only brings the new calibration (solving the plan
            # scores thousands of sampled users, which with a history scorer holds the loop, and so
            # the pacing, for tens of seconds)
            last = registry.latest_plan(self.db, cfg.version)
            seen = jobs.feedback_seen(self.db)
            items = None
            if self._settling() and last is not None:  # the items' rates stand: only the groups are measured
                have = (last.solver or {}).get("calibration") or {}
                items = {c: v["items"] for c, v in have.items() if isinstance(v, dict) and "items" in v}
            rates, scorer = jobs.plan_calibration(self.db, cfg, since=self._calibration_since(), items=items)
            names = cfg.config.constraint_names
            with self._pacer_lock:
                prices = _by_name(names, p.pacer.prices_)
                solver: dict[str, Any] = {"method": "recalibrate", "prices_from": "pacer",
                                          "projected_from": None if last is None else last.version,
                                          "price_slope": _by_name(names, p.pacer.slope()), "feedback_seen": seen,
                                          **self._forget_field()}
                if rates is not None:
                    solver.update(calibration=rates, calibration_scorer=scorer)
                v = registry.publish_plan(self.db, cfg.version, prices,
                                          projected=last.projected if last is not None else {}, solver=solver)
            return "ok", f"plan version {v}: a new calibration beside the pacer's prices {prices}"
        res = jobs.plan(self.db, users=loop.plan_users, since=datetime.now(tz=UTC) - timedelta(hours=24),
                        publish=False, calibration_since=self._calibration_since())
        prices = res.prices
        with self._pacer_lock:  # the pacer as it stands now, the planner having solved in the background
            p = self._pacing
            names = cfg.config.constraint_names
            if p is not None and self._pacer_owns():
                # the pacer came to own the prices while the planner solved: the plan brings its
                # calibration beside the pacer's prices. Published with the planner's, it started the
                # pacer again on the few sets served since, and the next steps swung its prices from 0 to
                # their trust region's edge
                prices = _by_name(names, p.pacer.prices_)
                v = registry.publish_plan(self.db, cfg.version, prices, projected=res.projected,
                                          solver={**res.solver, "prices_from": "pacer", "planner_prices": res.prices,
                                                  "price_slope": _by_name(names, p.pacer.slope()),
                                                  **self._forget_field()})
                return "ok", f"plan version {v} over {res.users} users: its calibration beside the pacer's prices {prices}"
            box = p.pacer.trust_region() if p is not None and p.config_version == cfg.version else None
            if box is not None:
                # the pacer has re-solved on served candidates, too few to own the prices: the planner's
                # move from its prices is bounded by its trust region. The planner prices a few hundred
                # users sampled early and scored without their live state; its first calibrated plan took
                # the live floor's price from 0.81 to 1.73 while the pacer went on to settle at 0.7, and
                # the pages of those seconds gave 22 % to live streams against a floor of 10 %
                prices = _by_name(names, np.clip([res.prices[n] for n in names], *box))
            v = registry.publish_plan(self.db, cfg.version, prices, projected=res.projected,
                                      solver={**res.solver, "prices_from": "planner", "planner_prices": res.prices,
                                              **self._forget_field()})
        return "ok", f"plan version {v} over {res.users} users; prices {prices} (from the planner)"

    def _pace(self) -> tuple[str, str]:
        with self._pacer_lock:
            return self._pace_locked()

    def _pace_locked(self) -> tuple[str, str]:
        assert self._config is not None
        cfg = self._config
        config = cfg.config
        if not config.constraints:
            return "idle", ""
        start, plan = registry.prices(self.db, cfg)
        if plan is None:
            return "idle", ""
        loop = config.loop
        now = datetime.now(tz=UTC)
        base = (plan.solver or {}).get("pacer", {}).get("base_plan", plan.version)
        if self._pacing is None or self._pacing.config_version != cfg.version:
            lo, hi = config.bounds()
            ex = config.exploration
            pacer = ResolvePacer(ResolvePacerConfig(
                lower=tuple(lo), upper=tuple(hi), temperature=ex.temperature if ex.temperature > 0 else 0.02,
                window=loop.pace_window, max_step=loop.pace_max_step,
                half_life=loop.pace_half_life, gain=loop.pace_gain,
                margin=loop.pace_margin, max_price=loop.max_price, names=config.constraint_names),
                prices=np.clip(start, -loop.max_price, loop.max_price), space=LayoutSpace.from_config(config))
            self._pacing = _Pacing(cfg.version, pacer, now - timedelta(seconds=1), base, valued_from=base)
            return "ok", "pacer started from the plan's prices"
        p = self._pacing
        if base != p.plan_version:  # planned again (a new calibration, `homepage plan`): start from its prices
            p.plan_version = base
            p.fresh = 0
            # ... except a new calibration beside the pacer's own prices: the pacer keeps its window of
            # served sets until enough were valued under the new calibration (ResolvePacer.retire)
            if (plan.solver or {}).get("prices_from") != "pacer":
                p.pacer.rebase(np.clip(start, -loop.max_price, loop.max_price))
                p.valued_from = base
            else:
                p.pacer.retire()
        until = now - timedelta(seconds=_SETTLE_LAG_S)
        dlog = read_decision_log(self.db, config, p.since, until, cfg.version)
        if len(dlog) == 0:
            return "idle", ""
        batch_start, p.since = p.since, until
        n = len(dlog)
        # candidate sets served before the workers took up the plan the pacer started from were valued
        # under other prices and an older calibration: they count as realised exposure, not as the
        # model the prices are re-solved on
        plan_of = np.array([int((v or {}).get("plan") or 0) for v in dlog.versions], dtype=np.int64)
        # ... and so were those a ranker scored before a new one was published: its scores (the
        # candidates' values and their long-tail blocks) can differ from the old one's by a lot
        ranker_of = np.array([int((v or {}).get("ranker") or 0) for v in dlog.versions], dtype=np.int64)
        newest = int(ranker_of.max(initial=0))
        if newest > p.ranker:
            p.pacer.rebase(p.pacer.prices_)
            p.ranker, p.fresh = newest, 0
        fresh = (plan_of >= p.valued_from) & (ranker_of == p.ranker)
        ok = exploitable(dlog.tilt[fresh], dlog.mask[fresh], any(c.kind == "long_tail_share" for c in config.constraints))
        # what serving adds beyond the exploit softmax (the exploration budget): the served pmf's expected
        # exposure minus the softmax's on the same logged scores, exactly, per decision
        value, exposure = dlog.value[fresh], dlog.exposure[fresh]
        rows = ok.any(axis=1)
        q = exploit_pmf(dlog.score[fresh][rows], value[rows], config.exploration.temperature, ok[rows])
        served = np.where(dlog.mask[fresh][rows], dlog.pmf[fresh][rows], 0.0)
        bias = np.einsum("nj,njk->nk", served - q, exposure[rows])
        # block tables valued under the newest calibration only (a recalibration's plan, taken up by the
        # workers within a second, is the base: the decisions served before it were scored with the old)
        tables = (_pace_tables(self.db, dlog.request_id, fresh & (plan_of >= p.plan_version), batch_start, until)
                  if loop.pace_sample > 0 else None)
        new = p.pacer.update(value, exposure, ok, dlog.chosen_exposure, bias=bias, tables=tables)
        p.fresh += int(fresh.sum())
        p.solved += int(fresh.sum())
        names = config.constraint_names
        solver = {"method": "resolve-pacer", "n_decisions": n, "base_plan": base,
                  "exploration_bias": _by_name(names, p.pacer.bias_),
                  "realised": _by_name(names, p.pacer.shares_),
                  "overshoot": _by_name(names, p.pacer.overshoot_),
                  "correction": _by_name(names, p.pacer.correction_),
                  "solved_on": p.pacer.solved_on_, "tables": p.pacer.tables_kept}
        if np.allclose(new, start, rtol=0, atol=1e-9):
            return "ok", f"{n} decisions; prices unchanged"
        # each worker steers its own recent shares with the shares' sensitivity to their prices (see
        # allocator.window_correction)
        slope = _by_name(names, p.pacer.slope())
        v = registry.publish_plan(self.db, cfg.version, _by_name(names, new),
                                  projected=plan.projected,
                                  solver={**(plan.solver or {}), "pacer": solver, "price_slope": slope,
                                          **self._forget_field(refit=False)})
        return "ok", f"{n} decisions; plan version {v}"

    # ---- learn and train -------------------------------------------------------------------------
    def _learn(self) -> tuple[str, str]:
        assert self._config is not None
        config = self._config.config
        # decisions older than settle_s count the events that arrived by now (inside the reward window)
        until = datetime.now(tz=UTC) - timedelta(seconds=config.loop.settle_s) \
            + timedelta(seconds=config.learning.reward_window_s)
        res = jobs.learn(self.db, until=until, min_decisions=config.loop.learn_min_decisions)
        if res is None:
            return "idle", ""
        return "ok", f"bandit version {res.bandit_version} from {res.decisions} decisions"

    def _train(self) -> tuple[str, str]:
        assert self._config is not None
        t = self._training
        if t.thread is not None and t.thread.is_alive():
            return "idle", ""
        loop = self._config.config.loop
        if not t.resumed:  # a restarted loop counts new events from the newest ranker, not from the log's start
            t.resumed = True
            newest_ranker = registry.model_history(self.db, "ranker", limit=1)
            if newest_ranker and newest_ranker[0].created_at is not None:
                t.last_started = newest_ranker[0].created_at.timestamp()
                t.last_feedback_id = int(newest_ranker[0].metrics.get("feedback_through", 0))
        if time.time() - t.last_started < loop.train_every_s and t.last_started > 0:
            return "idle", ""
        with self.db.connect() as conn:
            newest = int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(feedback.c.id), 0))).scalar_one())
            fresh = int(conn.execute(sa.select(sa.func.count()).select_from(feedback)
                                     .where(feedback.c.id > t.last_feedback_id,
                                            feedback.c.type != "impression")).scalar_one())
        if fresh < loop.train_min_events:
            return "idle", ""
        cfg = self._config
        rec = self.steps["train"]

        def work() -> None:
            _background_priority()
            t0 = time.perf_counter()
            try:
                res = jobs.train_ranker(self.db, cfg, max_epochs=loop.train_max_epochs, require_test=True)
                rec.outcome = "ok"
                rec.detail = (f"published ranker version {res.published}" if res.published is not None
                              else f"trained on {fresh} new events; refused by the gate (version {res.rejected})")
            except Exception as e:  # noqa: BLE001 - reported in the status, the loop goes on
                log.exception("ranker training failed")
                rec.outcome, rec.detail = "error", f"{type(e).__name__}: {e}"
                rec.errors += 1
            rec.duration_s = time.perf_counter() - t0

        t.last_started = time.time()
        t.last_feedback_id = newest
        t.thread = threading.Thread(target=work, name="homepage-train", daemon=True)
        t.thread.start()
        return "ok", f"training started on {fresh} new behaviour events"
