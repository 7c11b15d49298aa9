"""``HomepageClient``: typed ``layout`` and ``feedback`` calls with timeouts, retries with backoff
(connection errors, 502/503/504, honouring ``Retry-After``), a pooled session, idempotent feedback
(every event carries an id, so a retried post is never counted twice) and a fallback layout when the
engine cannot be reached.

Operator calls (with the operator token) change the config through the engine's config jobs:
``apply_config``, ``dry_run_config`` and ``rollback_config`` submit a job (answered 202 at once) and
poll ``GET /config/jobs/<id>`` until it has finished, within ``wait_s``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter

__all__ = ["ConfigJob", "ConfigJobError", "Event", "FeedbackResult", "HomepageClient", "HomepageClientError", "Item",
           "Layout", "Module"]

EventType = Literal["impression", "play", "full_play", "favorite", "share", "skip"]
JobStatus = Literal["queued", "running", "done", "failed", "lost"]
_FINAL = frozenset({"done", "failed", "lost"})
_RETRY_STATUS = frozenset({502, 503, 504})


class HomepageClientError(Exception):
    """The engine answered with an error the client must not retry (4xx), or every retry failed.

    ``status`` is the HTTP status (None when the engine was unreachable); ``code``, ``field`` and
    ``message`` come from the engine's error body when it sent one.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.code, self.field = message, status, code, field


@dataclass(frozen=True, slots=True)
class ConfigJob:
    """A config job as the engine reports it. ``result`` (status ``done``): for an apply or rollback the
    new ``version``, ``plan_version``, ``previous_version``, ``projection``, ``prices``, ``warnings``
    (and ``rolled_back_to``); for a dry run ``feasible``, ``projection``, ``prices``, ``warnings``,
    ``diff`` and ``current``. ``error`` (``failed`` or ``lost``): the engine's error body."""

    job_id: str
    kind: str
    status: JobStatus
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: str | None = None
    finished_at: str | None = None
    owner: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ConfigJob:
        status = str(body["status"])
        if status not in ("queued", "running", "done", "failed", "lost"):
            raise ValueError(f"status must be queued, running, done, failed or lost; got {status!r}")
        return cls(str(body["job_id"]), str(body["kind"]), cast(JobStatus, status),
                   body.get("result"), body.get("error"), body.get("created_at"), body.get("finished_at"),
                   body.get("owner"))

    @property
    def finished(self) -> bool:
        return self.status in _FINAL


class ConfigJobError(HomepageClientError):
    """A config job that failed (``code`` from its error, e.g. ``infeasible``), was lost (its worker
    died: ``code`` ``lost``), or had not finished within the wait (``code`` ``timeout``); ``job`` is
    its last state."""

    def __init__(self, message: str, job: ConfigJob, *, code: str | None, field: str | None = None) -> None:
        super().__init__(message, code=code, field=field)
        self.job = job


@dataclass(frozen=True, slots=True)
class Item:
    item_id: str
    long_tail: bool


@dataclass(frozen=True, slots=True)
class Module:
    slot: int
    module_id: str
    category: str
    tilt: float
    items: tuple[Item, ...]


@dataclass(frozen=True, slots=True)
class Layout:
    """One homepage. ``source`` is ``"engine"``, or ``"client_fallback"`` when the engine could not be
    reached and the client's fallback was returned (no ``request_id``: there is nothing to report
    feedback against)."""

    request_id: str | None
    user_id: str
    fallback: bool
    propensity: float
    modules: tuple[Module, ...]
    versions: dict[str, Any] = field(default_factory=dict)
    live_state: str = "none"
    source: Literal["engine", "client_fallback"] = "engine"

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Layout:
        mods = tuple(Module(int(m["slot"]), str(m["module_id"]), str(m["category"]), float(m["tilt"]),
                            tuple(Item(str(i["item_id"]), bool(i["long_tail"])) for i in m["items"]))
                     for m in body["modules"])
        return cls(str(body["request_id"]), str(body["user_id"]), bool(body["fallback"]),
                   float(body["propensity"]), mods, dict(body.get("versions") or {}),
                   str(body.get("live_state", "none")))


@dataclass(frozen=True, slots=True)
class Event:
    """What the user did with an item. ``event_id`` defaults to a fresh UUID; keep it when you resend
    the same event yourself, so the engine recognises the duplicate."""

    slot: int
    item_id: str
    type: EventType
    value: float | None = None
    ts: float | None = None
    event_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event_id": self.event_id, "slot": self.slot, "item_id": self.item_id,
                               "type": self.type}
        if self.value is not None:
            out["value"] = self.value
        if self.ts is not None:
            out["ts"] = self.ts
        return out


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    accepted: int
    duplicates: int
    attempts: int


class HomepageClient:
    """A client of one engine (or its load balancer).

    Parameters
    ----------
    base_url
        e.g. ``http://homepage:8000``.
    timeout
        Seconds per attempt (connect and read).
    retries
        Extra attempts after the first on connection errors, timeouts and 502/503/504.
    backoff_s
        First wait between attempts; doubled each time (a ``Retry-After`` header wins when longer).
    fallback
        ``user_id -> modules`` returned as a ``client_fallback`` layout when every attempt of
        :meth:`layout` failed; None raises :class:`HomepageClientError` instead.
    pool_size
        Connections kept open to the engine.
    operator_token
        The engine's ``HOMEPAGE_OPERATOR_TOKEN``, for the config calls (``apply_config`` and the others).
    operator_timeout
        Seconds per attempt of a config call (submitting is quick; the job itself is polled).
    """

    def __init__(self, base_url: str, timeout: float = 0.5, retries: int = 2, *, backoff_s: float = 0.05,
                 fallback: Callable[[str], Sequence[Module]] | None = lambda user_id: (),
                 pool_size: int = 10, session: requests.Session | None = None, operator_token: str | None = None,
                 operator_timeout: float = 10.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://; got {base_url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds; got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0; got {retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0; got {backoff_s!r}")
        if not operator_timeout > 0:
            raise ValueError(f"operator_timeout must be > 0 seconds; got {operator_timeout!r}")
        self.operator_token, self.operator_timeout = operator_token, operator_timeout
        self.base_url = base_url.rstrip("/")
        self.timeout, self.retries, self.backoff_s, self.fallback = timeout, retries, backoff_s, fallback
        self.session = session or requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> HomepageClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------- calls
    def layout(self, user_id: str, **context: str | int | float) -> Layout:
        """The homepage for ``user_id``; ``context`` goes as query parameters (``device``, ``locale``,
        ``surface``, ``hour`` and the engine's free-form features)."""
        if not isinstance(user_id, str) or not user_id.strip():
            raise ValueError(f"user_id must be a non-empty string; got {user_id!r}")
        params: dict[str, Any] = {"user_id": user_id, **context}
        try:
            body, _ = self._call("GET", "/layout", params=params)
        except HomepageClientError as e:
            if e.status is not None and e.status not in _RETRY_STATUS or self.fallback is None:
                raise
            return Layout(None, user_id, True, 1.0, tuple(self.fallback(user_id)), source="client_fallback")
        return Layout.from_json(body)

    def feedback(self, request_id: str, events: Sequence[Event]) -> FeedbackResult:
        """Report events of the layout ``request_id``; retried safely (the event ids make it idempotent).
        A layout served by the client's fallback has no request id: nothing is sent."""
        if not events:
            raise ValueError("events must hold at least one Event; got none")
        body, attempts = self._call("POST", "/feedback",
                                    json={"request_id": request_id, "events": [e.to_json() for e in events]})
        return FeedbackResult(int(body["accepted"]), int(body["duplicates"]), attempts)

    # ------------------------------------------------------------------------------- config (operator)
    def apply_config(self, toml: str, wait_s: float = 60.0, *, author: str | None = None,
                     note: str | None = None) -> ConfigJob:
        """Validate, dry-run and apply ``toml`` (``PUT /config``); returns the finished job (its
        ``result["version"]`` is the new config version). Raises :class:`HomepageClientError` (400
        naming the key) for an invalid config, :class:`ConfigJobError` (code ``infeasible``: nothing
        applied) when the job fails, or when it has not finished within ``wait_s`` seconds."""
        return self._config_job_call("PUT", "/config", wait_s, data=toml.encode("utf-8"),
                                     headers=self._operator_headers(author, note, "application/toml"))

    def dry_run_config(self, toml: str, wait_s: float = 60.0) -> ConfigJob:
        """Dry-run ``toml`` against the active config (``POST /config/dry-run``); never activates.
        The finished job's ``result`` holds ``feasible``, ``projection``, ``prices``, ``diff``."""
        return self._config_job_call("POST", "/config/dry-run", wait_s, data=toml.encode("utf-8"),
                                     headers=self._operator_headers(None, None, "application/toml"))

    def rollback_config(self, version: int, wait_s: float = 60.0, *, author: str | None = None,
                        note: str | None = None) -> ConfigJob:
        """Make config ``version`` active again (``POST /config/rollback``), dry-run first."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"version must be an integer >= 1; got {version!r}")
        return self._config_job_call("POST", "/config/rollback", wait_s, json={"version": version},
                                     headers=self._operator_headers(author, note, None))

    def config_job(self, job_id: str) -> ConfigJob:
        """The job ``job_id`` as the engine reports it now (any worker answers)."""
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"job_id must be a non-empty string; got {job_id!r}")
        body, _ = self._call("GET", f"/config/jobs/{quote(job_id, safe='')}",
                             headers=self._operator_headers(None, None, None), timeout=self.operator_timeout)
        return ConfigJob.from_json(body)

    def wait_config_job(self, job_id: str, wait_s: float = 60.0, *, poll_s: float = 0.25) -> ConfigJob:
        """Poll the job until it has finished; the done job, else :class:`ConfigJobError`."""
        if not wait_s >= 0:
            raise ValueError(f"wait_s must be >= 0 seconds; got {wait_s!r}")
        deadline = time.monotonic() + wait_s
        while True:
            job = self.config_job(job_id)
            if job.status == "done":
                return job
            if job.finished:
                err = (job.error or {}).get("error") or {}
                raise ConfigJobError(f"config job {job_id} ({job.kind}) {job.status}: "
                                     f"{err.get('message', 'no error given')}", job,
                                     code=err.get("code", job.status), field=err.get("field"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConfigJobError(f"config job {job_id} ({job.kind}) still {job.status} after {wait_s:g} s; "
                                     "follow it with config_job()", job, code="timeout")
            time.sleep(min(poll_s, left))

    def _operator_headers(self, author: str | None, note: str | None, content_type: str | None) -> dict[str, str]:
        if not self.operator_token:
            raise ValueError("operator_token must be given to HomepageClient for config calls; got none")
        headers = {"Authorization": f"Bearer {self.operator_token}"}
        if author is not None:
            headers["X-Operator"] = author
        if note is not None:
            headers["X-Change-Note"] = note
        if content_type is not None:
            headers["Content-Type"] = content_type
        return headers

    def _config_job_call(self, method: str, path: str, wait_s: float, **kw: Any) -> ConfigJob:
        t0 = time.monotonic()
        # submitted once: a retry after a lost answer could queue a second job
        body, _ = self._call(method, path, retries=0, timeout=self.operator_timeout, **kw)
        return self.wait_config_job(str(body["job_id"]), max(0.0, wait_s - (time.monotonic() - t0)))

    # ------------------------------------------------------------------------------------ transport
    def _call(self, method: str, path: str, *, retries: int | None = None, timeout: float | None = None,
              **kw: Any) -> tuple[dict[str, Any], int]:
        wait = self.backoff_s
        last: HomepageClientError | None = None
        retries = self.retries if retries is None else retries
        for attempt in range(1, retries + 2):
            try:
                r = self.session.request(method, self.base_url + path, timeout=timeout or self.timeout, **kw)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = HomepageClientError(f"{method} {path}: engine unreachable ({type(e).__name__})")
                retry_after = 0.0
            else:
                if r.status_code < 400:
                    return r.json(), attempt
                err = _error_body(r)
                last = HomepageClientError(f"{method} {path}: {r.status_code} {err.get('message', r.reason)}",
                                           status=r.status_code, code=err.get("code"), field=err.get("field"))
                if r.status_code not in _RETRY_STATUS:
                    raise last
                retry_after = _retry_after(r.headers.get("Retry-After"))
            if attempt <= retries:
                time.sleep(max(wait, min(retry_after, 5.0)))
                wait *= 2
        assert last is not None
        raise last


def _error_body(r: requests.Response) -> dict[str, Any]:
    try:
        err = r.json().get("error")
    except (ValueError, AttributeError):
        return {}
    return err if isinstance(err, dict) else {}


def _retry_after(raw: str | None) -> float:
    try:
        return max(float(raw), 0.0) if raw is not None else 0.0
    except ValueError:
        return 0.0
