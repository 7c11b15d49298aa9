"""``HomepageClient``: typed ``layout`` and ``feedback`` calls with timeouts, retries with backoff
(connection errors, 502/503/504, honouring ``Retry-After``), a pooled session, idempotent feedback
(every event carries an id, so a retried post is never counted twice) and a fallback layout when the
engine cannot be reached."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import requests
from requests.adapters import HTTPAdapter

__all__ = ["Event", "FeedbackResult", "HomepageClient", "HomepageClientError", "Item", "Layout", "Module"]

EventType = Literal["impression", "play", "full_play", "favorite", "share", "skip"]
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
    """

    def __init__(self, base_url: str, timeout: float = 0.5, retries: int = 2, *, backoff_s: float = 0.05,
                 fallback: Callable[[str], Sequence[Module]] | None = lambda user_id: (),
                 pool_size: int = 10, session: requests.Session | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://; got {base_url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds; got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an integer >= 0; got {retries!r}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0; got {backoff_s!r}")
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

    # ------------------------------------------------------------------------------------ transport
    def _call(self, method: str, path: str, **kw: Any) -> tuple[dict[str, Any], int]:
        wait = self.backoff_s
        last: HomepageClientError | None = None
        for attempt in range(1, self.retries + 2):
            try:
                r = self.session.request(method, self.base_url + path, timeout=self.timeout, **kw)
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
            if attempt <= self.retries:
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
