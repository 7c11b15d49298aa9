"""Config jobs: the dry run, apply and rollback of the operator config, run off the request threads.

``PUT /config``, ``POST /config/rollback`` and ``POST /config/dry-run`` validate the request on the
request thread (a bad key is an immediate 400) and hand the planning work (a dry-run LP, about a
second) to :class:`ConfigJobs`: one executor thread per worker process, started on first use (in the
worker, after the fork). The job's row in ``config_jobs`` is the record every worker answers
``GET /config/jobs/<id>`` from:

=========== ===========================================================================================
status      meaning
=========== ===========================================================================================
queued      accepted; waiting for its worker's executor thread
running     being computed
done        finished; ``result`` holds what the synchronous route used to answer
failed      finished without effect; ``error`` is the API's error body (e.g. code ``infeasible``)
lost        its worker stopped renewing ``heartbeat_at`` (killed, or stopped) before it finished
=========== ===========================================================================================

The worker renews the heartbeat of its queued and running jobs every ``lost_after_s / 5`` seconds
(at most every second); a queued or running job whose heartbeat is older than ``lost_after_s``
(``HOMEPAGE_CONFIG_JOB_LOST_S``, default 10) is reported lost. At most one apply or rollback is queued
or running per database: the row holds ``apply_slot = 'config'`` under a unique constraint until it
finishes, and a holder reported lost gives the slot up to the next one.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, RowMapping

from .. import registry
from ..errors import Conflict, HomepageError, Infeasible, InvalidInput, Unavailable
from ..jobs import PlanResult, apply_config, dry_run, sample_users
from ..log import CONFIG_JOB_KINDS, config_jobs, utcnow

__all__ = ["ConfigJobs", "FinalState", "JOB_USERS", "lost_after_from_env"]

log = logging.getLogger("homepage.jobs")

#: users a dry run samples from recent traffic (what ``apply_config`` plans on, so both agree)
JOB_USERS = 500
#: the statuses of a job that has not finished
_ACTIVE = ("queued", "running")
_APPLY_SLOT = "config"
LOST_ENV = "HOMEPAGE_CONFIG_JOB_LOST_S"


def lost_after_from_env() -> float:
    """``HOMEPAGE_CONFIG_JOB_LOST_S``: seconds without a heartbeat after which a job is lost (default 10)."""
    raw = os.environ.get(LOST_ENV)
    if raw is None or not raw.strip():
        return 10.0
    try:
        value = float(raw)
        if not 1.0 <= value <= 3600.0:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"{LOST_ENV} must be seconds in [1, 3600]; got {raw!r}", field=LOST_ENV) from None
    return value


@dataclass(frozen=True, slots=True)
class FinalState:
    """How a job ended, as its worker knows it (no database read needed to answer a waiting request)."""

    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    http_status: int


@dataclass(frozen=True, slots=True)
class _Job:
    id: str
    kind: str
    body: str
    target_version: int | None
    author: str
    note: str


def _plan_json(res: PlanResult) -> dict[str, Any]:
    return {"projection": res.projected, "prices": dict(res.prices), "users": res.users}


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()


class ConfigJobs:
    """One worker's config jobs: submitted here, run one at a time on a thread of their own.

    Parameters
    ----------
    db
        The log's database (holds ``config_jobs`` and the registry).
    on_applied
        Called on the executor thread after an apply or rollback made a config active (the worker
        reloads its engine; the others pick it up through their version poller).
    lost_after_s
        A queued or running job whose heartbeat is older is reported lost.
    max_pending
        Queued and running jobs this worker accepts; beyond it a submit is refused (503).
    users
        Users sampled from recent traffic for a dry run.
    """

    def __init__(self, db: Engine, on_applied: Callable[[], Any] = lambda: None, *, lost_after_s: float = 10.0,
                 max_pending: int = 8, users: int = JOB_USERS) -> None:
        if not lost_after_s > 0:
            raise InvalidInput(f"lost_after_s must be > 0; got {lost_after_s!r}", field="lost_after_s")
        self.db, self.on_applied, self.lost_after_s = db, on_applied, float(lost_after_s)
        self.max_pending, self.users = max_pending, users
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, threading.Event] = {}
        self._final: OrderedDict[str, FinalState] = OrderedDict()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------ submitting
    def submit(self, kind: str, body: str, *, author: str, note: str, target_version: int | None = None
               ) -> dict[str, Any]:
        """Record a queued job and hand it to this worker's executor; the job's JSON.

        Raises :class:`~policy_api.errors.Conflict` (naming the job) while another apply or rollback
        is queued or running on the database, :class:`~policy_api.errors.Unavailable` when this
        worker already has ``max_pending`` jobs.
        """
        if kind not in CONFIG_JOB_KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(CONFIG_JOB_KINDS)}; got {kind!r}", field="kind")
        job = _Job(uuid.uuid4().hex, kind, body, target_version, author, note)
        with self._lock:
            if len(self._pending) >= self.max_pending:
                raise Unavailable(f"this worker already has {len(self._pending)} config jobs queued or running "
                                  f"(at most {self.max_pending}); retry when one has finished", field="config")
            self._pending[job.id] = threading.Event()
        try:
            self._insert(job)
        except BaseException:
            with self._lock:
                self._pending.pop(job.id, None)
            raise
        self._ensure_threads()
        self._queue.put(job)
        row = self.get(job.id)
        assert row is not None
        return row

    def _insert(self, job: _Job) -> None:
        now = utcnow()
        values = {"id": job.id, "kind": job.kind, "status": "queued", "body": job.body,
                  "target_version": job.target_version, "author": job.author, "note": job.note,
                  "created_at": now, "owner": self.owner, "heartbeat_at": now,
                  "apply_slot": None if job.kind == "dry_run" else _APPLY_SLOT}
        for _ in range(3):
            try:
                with self.db.begin() as conn:
                    conn.execute(config_jobs.insert().values(**values))
                return
            except sa.exc.IntegrityError:
                holder = self._slot_holder()
                if holder is not None and not self._is_lost(holder):
                    raise Conflict(
                        f"config: only one apply or rollback runs at a time; job {holder['id']} "
                        f"({holder['kind']}, {holder['status']}) is in progress: follow it at "
                        f"/config/jobs/{holder['id']} and submit again when it has finished",
                        field="config", job_id=str(holder["id"]),
                        status_url=f"/config/jobs/{holder['id']}") from None
                if holder is not None:  # its worker died: the slot goes to the next apply
                    self._mark_lost(str(holder["id"]))
                values["created_at"] = values["heartbeat_at"] = utcnow()
        raise Conflict("config: another apply or rollback took the slot first; submit again", field="config")

    def _slot_holder(self) -> RowMapping | None:
        with self.db.connect() as conn:
            row = conn.execute(sa.select(config_jobs).where(config_jobs.c.apply_slot == _APPLY_SLOT)).first()
        return None if row is None else row._mapping

    def _mark_lost(self, job_id: str) -> None:
        cutoff = utcnow() - timedelta(seconds=self.lost_after_s)
        with self.db.begin() as conn:
            conn.execute(config_jobs.update().where(
                config_jobs.c.id == job_id, config_jobs.c.status.in_(_ACTIVE),
                config_jobs.c.heartbeat_at < cutoff).values(
                status="lost", apply_slot=None, finished_at=utcnow(),
                error={"error": {"code": "lost", "message": f"job {job_id}: its worker stopped before it "
                                                           "finished (no heartbeat)", "field": None}}))

    # -------------------------------------------------------------------------------------- reading
    def _is_lost(self, m: RowMapping) -> bool:
        if m["status"] not in _ACTIVE:
            return False
        heartbeat: datetime = m["heartbeat_at"]
        return heartbeat < utcnow() - timedelta(seconds=self.lost_after_s)

    def _json(self, m: RowMapping, *, with_body: bool) -> dict[str, Any]:
        status = "lost" if self._is_lost(m) else str(m["status"])
        out: dict[str, Any] = {
            "job_id": str(m["id"]), "kind": str(m["kind"]), "status": status,
            "status_url": f"/config/jobs/{m['id']}", "target_version": m["target_version"],
            "author": str(m["author"]), "note": str(m["note"]), "created_at": _iso(m["created_at"]),
            "started_at": _iso(m["started_at"]), "finished_at": _iso(m["finished_at"]), "owner": str(m["owner"]),
            "heartbeat_at": _iso(m["heartbeat_at"]), "result": m["result"], "error": m["error"]}
        if status == "lost" and out["error"] is None:
            out["error"] = {"error": {"code": "lost", "message": f"job {m['id']}: its worker ({m['owner']}) sent "
                                                                 f"no heartbeat for over {self.lost_after_s:g} s "
                                                                 "before it finished", "field": None}}
        if with_body:
            out["toml"] = m["body"]
        return out

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's JSON (``toml`` included), or None for an unknown id."""
        with self.db.connect() as conn:
            row = conn.execute(sa.select(config_jobs).where(config_jobs.c.id == job_id)).first()
        return None if row is None else self._json(row._mapping, with_body=True)

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` jobs of the database (any worker's), newest first, without their TOML."""
        with self.db.connect() as conn:
            rows = conn.execute(sa.select(config_jobs).order_by(config_jobs.c.created_at.desc(),
                                                                config_jobs.c.id).limit(limit)).all()
        return [self._json(r._mapping, with_body=False) for r in rows]

    def wait(self, job_id: str, timeout_s: float) -> FinalState | None:
        """Wait up to ``timeout_s`` for a job this worker runs; how it ended, or None (still going)."""
        with self._lock:
            done = self._pending.get(job_id)
            final = self._final.get(job_id)
        if final is None and done is not None and done.wait(timeout_s):
            with self._lock:
                final = self._final.get(job_id)
        return final

    # ------------------------------------------------------------------------------------- executor
    def _ensure_threads(self) -> None:
        with self._lock:
            if self._threads and all(t.is_alive() for t in self._threads):
                return
            self._threads = [threading.Thread(target=self._work, name="homepage-config-jobs", daemon=True),
                             threading.Thread(target=self._beat, name="homepage-config-heartbeat", daemon=True)]
            for t in self._threads:
                t.start()

    def close(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        interval = min(1.0, self.lost_after_s / 5)
        while not self._stop.wait(interval):
            with self._lock:
                ids = list(self._pending)
            if not ids:
                continue
            try:
                with self.db.begin() as conn:
                    conn.execute(config_jobs.update().where(
                        config_jobs.c.id.in_(ids), config_jobs.c.status.in_(_ACTIVE)).values(heartbeat_at=utcnow()))
            except Exception as e:  # the database may be down: the jobs will show as lost if it stays so
                log.warning("config job heartbeat not written: %s", e)

    def _work(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get()
            try:
                self._run(job)
            except Exception:  # never lose the executor thread
                log.exception("config job %s: bookkeeping failed", job.id)
            finally:
                with self._lock:
                    done = self._pending.pop(job.id, None)
                if done is not None:
                    done.set()

    def _update(self, job_id: str, **values: Any) -> None:
        for attempt in range(5):
            try:
                with self.db.begin() as conn:
                    conn.execute(config_jobs.update().where(config_jobs.c.id == job_id).values(**values))
                return
            except sa.exc.OperationalError as e:  # a busy or briefly unreachable database: try again
                if attempt == 4:
                    raise
                log.warning("config job %s: row not updated (%s); retrying", job_id, e)
                self._stop.wait(0.5 * (attempt + 1))

    def _run(self, job: _Job) -> None:
        now = utcnow()
        self._update(job.id, status="running", started_at=now, heartbeat_at=now)
        final: FinalState
        try:
            result = self._compute(job)
            final = FinalState("done", result, None, 200)
        except HomepageError as e:
            final = FinalState("failed", None, e.body(), e.http_status)
        except Exception as e:
            log.exception("config job %s failed", job.id)
            err = Unavailable(f"config job {job.id} ({job.kind}) failed: {type(e).__name__}: {e}", field="config")
            final = FinalState("failed", None, err.body(), err.http_status)
        with self._lock:
            self._final[job.id] = final
            while len(self._final) > 256:
                self._final.popitem(last=False)
        end = utcnow()
        self._update(job.id, status=final.status, result=final.result, error=final.error, finished_at=end,
                     heartbeat_at=end, apply_slot=None)

    def _compute(self, job: _Job) -> dict[str, Any]:
        if job.kind == "dry_run":
            return self._dry_run(job.body)
        res = apply_config(self.db, job.body, author=job.author, note=job.note)
        try:
            self.on_applied()
        except Exception as e:  # applied all the same; the version poller retries the reload
            log.warning("config job %s: applied, but this worker did not reload yet: %s", job.id, e)
        out: dict[str, Any] = {"version": res.version, "plan_version": res.plan_version,
                               "previous_version": res.previous_version, "projection": res.plan.projected,
                               "prices": dict(res.plan.prices), "warnings": list(res.warnings)}
        if job.kind == "rollback":
            out["rolled_back_to"] = job.target_version
        return out

    def _dry_run(self, body: str) -> dict[str, Any]:
        config = registry.parse_body(body)
        active = registry.active_config(self.db)
        diff: list[dict[str, Any]] = []
        text = ""
        if active is not None:
            diff = [{"key": k, "old": a, "new": b}
                    for k, a, b in registry.mapping_diff(active.config.to_dict(), config.to_dict())]
            text = registry.text_diff(active.body, body, f"config version {active.version}", "proposed")
        out: dict[str, Any] = {"feasible": True, "projection": None, "prices": None,
                               "warnings": list(config.warnings), "diff": diff, "text_diff": text,
                               "current": None if active is None else {"version": active.version}}
        users, weight = sample_users(self.db, n=self.users, seed=0)  # as apply_config samples them
        try:
            proposed = dry_run(self.db, config, users, weight)
        except Infeasible as e:
            out.update(feasible=False, infeasible=e.body())
            return out
        out.update(_plan_json(proposed))
        if active is not None:
            try:
                current = dry_run(self.db, active.config, users, weight, what=f"config version {active.version}")
                out["current"] = {"version": active.version, **_plan_json(current)}
            except Infeasible as e:  # the traffic moved since it was applied
                out["current"] = {"version": active.version, "infeasible": e.body()}
        return out
