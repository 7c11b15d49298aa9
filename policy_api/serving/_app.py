"""The Flask app factory, its one error shape and the HTTP limits.

Every error a client gets is ``{"error": {"code", "message", "field"}}``: a
:class:`~policy_api.errors.HomepageError` with its status, Werkzeug's HTTP errors (404, 405, 413, ...)
with theirs, and anything unexpected as a 500 that names only the exception type. What the front
server refuses before the app sees a request is rendered in the same shape by
:class:`~policy_api.serving.BufferingWorker`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, TooManyRequests

from ..errors import HomepageError, Unauthorized
from ..settings import Settings
from ._config_page import console_bp
from ._ops import ops_bp
from ._routes import api_bp
from ._runtime import Runtime

__all__ = ["HttpLimits", "TokenThrottle", "create_app"]

log = logging.getLogger("homepage.api")


def _env_number(name: str, default: float, low: float, high: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        v = float(raw)
    except ValueError:
        v = math.nan
    if not low <= v <= high:
        raise ValueError(f"{name} must be a number in [{low:.10g}, {high:.10g}]; got {raw!r}")
    return v


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """What one request may cost the server.

    ``max_body_bytes`` (``HOMEPAGE_MAX_BODY_BYTES``, default 1 MiB): larger bodies get 413, before any
    ``100 Continue``. ``header_timeout_s`` (``HOMEPAGE_HEADER_TIMEOUT_S``, 10) and ``body_timeout_s``
    (``HOMEPAGE_BODY_TIMEOUT_S``, 30): a request whose headers or body arrive slower gets 408.
    ``token_failures`` wrong operator tokens (``HOMEPAGE_TOKEN_FAILURES``, 10) from one address within
    ``token_window_s`` (``HOMEPAGE_TOKEN_WINDOW_S``, 60) make its next token attempts a 429 until the
    window has passed (counted per worker process).
    """

    max_body_bytes: int = 1 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    token_failures: int = 10
    token_window_s: float = 60.0

    @classmethod
    def from_env(cls) -> HttpLimits:
        d = cls()
        return cls(
            max_body_bytes=int(_env_number("HOMEPAGE_MAX_BODY_BYTES", d.max_body_bytes, 1024, 1 << 30)),
            header_timeout_s=_env_number("HOMEPAGE_HEADER_TIMEOUT_S", d.header_timeout_s, 0.1, 3600),
            body_timeout_s=_env_number("HOMEPAGE_BODY_TIMEOUT_S", d.body_timeout_s, 0.1, 3600),
            token_failures=int(_env_number("HOMEPAGE_TOKEN_FAILURES", d.token_failures, 1, 1e9)),
            token_window_s=_env_number("HOMEPAGE_TOKEN_WINDOW_S", d.token_window_s, 0.001, 86400),
        )


class TokenThrottle:
    """Wrong operator tokens per client address in a sliding window (memory: one deque per address
    that failed recently, pruned as it is read)."""

    def __init__(self, failures: int, window_s: float) -> None:
        self.failures, self.window_s = failures, window_s
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, addr: str, now: float | None = None) -> float:
        """Seconds until ``addr`` may try a token again (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._seen.get(addr)
            while q and q[0] <= now - self.window_s:
                q.popleft()
            if not q:
                self._seen.pop(addr, None)
                return 0.0
            return q[0] + self.window_s - now if len(q) >= self.failures else 0.0

    def failed(self, addr: str, now: float | None = None) -> None:
        with self._lock:
            if len(self._seen) > 100_000:  # an address flood: forget the oldest
                self._seen.pop(next(iter(self._seen)))
            self._seen.setdefault(addr, deque()).append(time.monotonic() if now is None else now)


class _JSONProvider(DefaultJSONProvider):
    """Flask's JSON with orjson's reader: UTF-8 only, at most 1024 levels deep (a deeper document is a
    ``ValueError``, never a ``RecursionError``), no NaN or Infinity."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None,
               limits: HttpLimits | None = None) -> Flask:
    """Build the app. The engine, database and log writer are created here, never at import.

    Parameters
    ----------
    settings
        Where the database, data folder and token are (default: :meth:`Settings.from_env`).
    runtime
        An already started :class:`Runtime` (tests, embedding); ``settings`` is then ignored.
    limits
        Body size and token throttling (default: :meth:`HttpLimits.from_env`).
    """
    lim = limits or HttpLimits.from_env()
    app = Flask("homepage", static_folder=None)  # no /static route: the API serves no files
    app.json = _JSONProvider(app)
    app.config["MAX_CONTENT_LENGTH"] = lim.max_body_bytes
    rt = runtime or Runtime(settings or Settings.from_env()).start()
    app.extensions["homepage"] = rt
    app.extensions["homepage_limits"] = lim
    app.register_blueprint(api_bp)
    app.register_blueprint(ops_bp)
    app.register_blueprint(console_bp)
    throttle = TokenThrottle(lim.token_failures, lim.token_window_s)
    app.extensions["homepage_throttle"] = throttle

    @app.before_request
    def _throttle_tokens() -> None:
        if "Authorization" in request.headers:
            wait = throttle.retry_after(request.remote_addr or "")
            if wait > 0:
                raise TooManyRequests(f"too many wrong operator tokens from this address: at most "
                                      f"{lim.token_failures} in {lim.token_window_s:g} s; retry in "
                                      f"{math.ceil(wait)} s", retry_after=math.ceil(wait))

    @app.after_request
    def _count_wrong_tokens(resp: Response) -> Response:
        if resp.status_code == 401 and request.headers.get("Authorization", "").strip():
            throttle.failed(request.remote_addr or "")
        return resp

    @app.errorhandler(HomepageError)
    def _homepage_error(e: HomepageError) -> tuple[Response, int]:
        resp = jsonify(e.body())
        if isinstance(e, Unauthorized):
            resp.headers["WWW-Authenticate"] = 'Bearer realm="homepage-operator"'
        return resp, e.http_status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> tuple[Response, int]:
        code = (e.name or "error").lower().replace(" ", "_")
        message = e.description or e.name
        field = None
        if e.code == 413:
            message, field = f"body must be at most {lim.max_body_bytes} bytes", "body"
        resp = jsonify({"error": {"code": code, "message": message, "field": field}})
        for name, value in e.get_headers():  # e.g. Allow on 405, Retry-After on 429, as RFC 9110 asks
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp, e.code or 500

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return jsonify({"error": {"code": "internal", "message": f"internal error: {type(e).__name__}",
                                  "field": None}}), 500

    return app
