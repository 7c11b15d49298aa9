"""The homepage service's routes: thin (parse -> engine -> log -> respond), no math here.

Feedback is checked against what was served. Always: the slot is within the page's slot count, and
``value`` and ``ts`` are within the active config's ``[learning]`` limits (``max_event_value``,
``max_event_age_s``, ``max_clock_skew_s``). The item: the server's workers share the (slot, item)
pairs of the pages they served recently (:class:`~policy_api.serving._pages.ServedPages`, a table in
the data folder), so feedback naming an item that was not in that slot is refused with 400 whichever
worker served the page, and before its decision row is written. Feedback for a page the table does
not know (served by another replica, or evicted: about the last 65k pages are kept) is accepted
after the checks above; the join keys on the request id, and the item's own value decides what the
event is worth.
"""

from __future__ import annotations

import base64
import hmac
import logging
import math
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import ValidationError

from ..errors import InvalidInput, NotFound, NotReady
from ..log import JournalUnavailable
from . import _metrics as metrics
from ._ops import OPS_PATHS
from ._pages import ServedPages
from ._runtime import Runtime
from ._schemas import CONTEXT_PARAMS, DEVICES, ID_RE, USER_ID_RE, FeedbackRequest, openapi_spec

__all__ = ["api_bp", "runtime"]

log = logging.getLogger("homepage.api")
api_bp = Blueprint("homepage", __name__)


class UnknownRequest(NotFound):
    """A feedback request id the engine never issued."""

    code = "unknown_request"


def runtime() -> Runtime:
    """The worker's :class:`Runtime` (inside a request)."""
    rt: Runtime = current_app.extensions["homepage"]
    return rt


_CONTROL = "must not contain control characters (U+0000-U+001F, U+007F-U+009F; NUL included)"


def _shown(v: Any) -> str:
    return repr(v)[:80] if not isinstance(v, dict | list) else type(v).__name__


def _validation_error(e: ValidationError) -> InvalidInput:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    msg = _CONTROL if first.get("type") == "string_pattern_mismatch" else first.get("msg", "invalid")
    return InvalidInput(f"{loc or 'body'}: {msg}; got {_shown(first.get('input'))}", field=loc or None)


def _served_pages() -> ServedPages:
    ext = current_app.extensions
    pages = ext.get("homepage_pages")
    if pages is None:  # per worker, after the fork; the table's file is shared by the server's workers
        pages = ext.setdefault("homepage_pages", ServedPages(runtime().settings.data_dir / "served-pages.bin"))
    assert isinstance(pages, ServedPages)
    return pages


def _one_arg(name: str) -> str | None:
    values = request.args.getlist(name)
    if len(values) > 1:
        raise InvalidInput(f"{name} must be given at most once; got {len(values)} values", field=name)
    return values[0] if values else None


_FEATURE_NAME = re.compile(r"f_[a-z0-9_]{1,32}")
MAX_FEATURES = 16


def _features(names: list[str]) -> dict[str, float | str]:
    """Free-form context features ``f_<name>=<value>``: a finite number, else a category (at most 64
    characters, no control character); at most ``MAX_FEATURES``."""
    if len(names) > MAX_FEATURES:
        raise InvalidInput(f"at most {MAX_FEATURES} f_* context features; got {len(names)}", field="f_*")
    out: dict[str, float | str] = {}
    for name in names:
        raw = _one_arg(name)
        assert raw is not None
        try:
            num = float(raw)
        except ValueError:
            num = math.nan
        if math.isfinite(num):
            out[name[2:]] = num
        elif len(raw) <= 64 and ID_RE.fullmatch(raw):
            out[name[2:]] = raw
        else:
            raise InvalidInput(f"{name} must be a finite number or a category of 1-64 characters without control "
                               f"characters; got {raw[:80]!r}", field=name)
    return out


def _layout_context() -> dict[str, Any]:
    """The optional request context: ``device``, ``locale``, ``surface``, ``hour`` and free-form
    ``f_<name>`` features, validated."""
    features = sorted(k for k in request.args if _FEATURE_NAME.fullmatch(k))
    unknown = sorted(set(request.args) - {"user_id", *CONTEXT_PARAMS, *features})
    if unknown:
        raise InvalidInput(f"unknown query parameter {unknown[0][:80]!r}; allowed: user_id, "
                           f"{', '.join(CONTEXT_PARAMS)} and f_<name> features (name: a-z, 0-9, _)",
                           field=unknown[0][:100])
    ctx: dict[str, Any] = {}
    device = _one_arg("device")
    if device is not None:
        if device not in DEVICES:
            raise InvalidInput(f"device must be one of {', '.join(DEVICES)}; got {device[:80]!r}", field="device")
        ctx["device"] = device
    for name in ("locale", "surface"):
        v = _one_arg(name)
        if v is not None:
            schema = CONTEXT_PARAMS[name]
            if len(v) > int(schema.get("maxLength", 64)) or not _fullmatch(schema["pattern"], v):
                raise InvalidInput(f"{name} must match {schema['pattern']} ({schema['description']}); got "
                                   f"{v[:80]!r}", field=name)
            ctx[name] = v
    hour = _one_arg("hour")
    if hour is not None:
        if not (hour.isascii() and hour.isdigit() and 0 <= int(hour) <= 23):
            raise InvalidInput(f"hour must be an integer in [0, 23]; got {hour[:80]!r}", field="hour")
        ctx["hour"] = int(hour)
    if features:
        ctx["features"] = _features(features)
    return ctx


def _fullmatch(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


@api_bp.get("/layout")
def layout() -> Response:
    t0 = time.perf_counter()
    user_id = _one_arg("user_id")
    if user_id is None or not user_id:
        raise InvalidInput(f"user_id is required: a non-empty string; got {user_id!r}", field="user_id")
    if len(user_id) > 200:
        raise InvalidInput(f"user_id must be at most 200 characters; got {len(user_id)}", field="user_id")
    if USER_ID_RE.fullmatch(user_id) is None:
        raise InvalidInput(f"user_id {_CONTROL}, and needs a character that is not white space; got "
                           f"{user_id[:80]!r}", field="user_id")
    context = _layout_context()
    rt = runtime()
    if rt.engine is None:
        raise NotReady(f"engine not ready: {rt.load_error}")
    assert rt.ids is not None and rt.writer is not None and rt.db is not None
    rid = rt.ids.issue()
    decision = rt.engine.decide(user_id, rid, context=context, live=rt.live_signals(user_id))
    rt.writer.submit_decision(decision.row())
    _served_pages().add(rid, decision.modules)
    metrics.observe_layout(decision, time.perf_counter() - t0)
    return Response(decision.response_json(), mimetype="application/json")  # orjson: a fraction of jsonify


def _json_body() -> Any:
    """The request's JSON body: UTF-8, at most 1024 levels deep, no NaN or Infinity (the size limit is
    the app's ``MAX_CONTENT_LENGTH``: 413 above it)."""
    if not request.is_json:
        raise InvalidInput(f"Content-Type must be application/json; got {request.content_type!r}",
                           field="Content-Type")
    raw = request.get_data(cache=True)
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"body must be JSON (UTF-8, nested at most 1024 deep, no NaN or Infinity); {e}; "
                           f"got {raw[:60]!r}", field="body") from None


def _check_events(rt: Runtime, fb: FeedbackRequest) -> None:
    """Refuse (400) events that do not fit the page served or the config's limits (module docstring)."""
    if rt.engine is None:
        return
    cfg = rt.engine.state.config
    lim = cfg.learning
    ev = fb.events
    slots = np.array([e.slot for e in ev], dtype=np.int64)
    n_slots, shown = _served_pages().check(fb.request_id, slots.tolist(), [e.item_id for e in ev])
    n_slots = cfg.slots if n_slots is None else n_slots
    bad = np.flatnonzero(slots >= n_slots)
    if bad.size:
        i = int(bad[0])
        raise InvalidInput(f"events[{i}].slot must be below the page's slot count {n_slots}; got {int(slots[i])}",
                           field=f"events.{i}.slot")
    values = np.array([np.nan if e.value is None else e.value for e in ev], dtype=np.float64)
    bad = np.flatnonzero(np.abs(values) > lim.max_event_value)
    if bad.size:
        i = int(bad[0])
        raise InvalidInput(f"events[{i}].value must be within +-{lim.max_event_value:g} (learning.max_event_value); "
                           f"got {float(values[i])!r}", field=f"events.{i}.value")
    ts = np.array([np.nan if e.ts is None else e.ts for e in ev], dtype=np.float64)
    now = time.time()
    lo, hi = now - lim.max_event_age_s, now + lim.max_clock_skew_s
    bad = np.flatnonzero((ts < lo) | (ts > hi))
    if bad.size:
        i = int(bad[0])
        raise InvalidInput(f"events[{i}].ts must be within the last {lim.max_event_age_s:g} s and at most "
                           f"{lim.max_clock_skew_s:g} s ahead of the server's clock (epoch seconds in "
                           f"[{lo:.0f}, {hi:.0f}]); got {float(ts[i])!r}", field=f"events.{i}.ts")
    if shown is not None and not shown.all():
        i = int(np.flatnonzero(~shown)[0])
        raise InvalidInput(f"events[{i}].item_id must be an item shown in slot {ev[i].slot} of request "
                           f"{fb.request_id}; got {ev[i].item_id[:80]!r}", field=f"events.{i}.item_id")


@api_bp.post("/feedback")
def feedback() -> tuple[Response, int]:
    body = _json_body()
    if not isinstance(body, dict):
        raise InvalidInput(f"body must be a JSON object with request_id and events; got {_shown(body)}",
                           field="body")
    try:
        fb = FeedbackRequest.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    rt = runtime()
    assert rt.ids is not None and rt.writer is not None and rt.db is not None
    if not rt.ids.issued(fb.request_id):
        raise UnknownRequest(f"request_id {fb.request_id!r} was not issued by this engine", field="request_id")
    _check_events(rt, fb)
    # duplicates: repeated within the request, seen by this worker, or already in the log
    ids = [e.event_id for e in fb.events]
    dup: set[str] = set()
    first: dict[str, int] = {}
    for i, eid in enumerate(ids):
        first.setdefault(eid, i)
    in_request_dups = len(ids) - len(first)
    dup |= rt.remember_events(list(first))
    # never waits on the database beyond its deadline: the worker's memory and ON CONFLICT keep
    # feedback idempotent without the answer
    dup |= rt.existing_event_ids([e for e in first if e not in dup])
    now = datetime.now(tz=UTC)
    rows: list[dict[str, Any]] = []
    for eid, i in first.items():
        if eid in dup:
            continue
        ev = fb.events[i]
        rows.append({
            "event_id": eid, "request_id": fb.request_id, "slot": ev.slot, "item_id": ev.item_id,
            "type": ev.type, "value": ev.value,
            "ts": datetime.fromtimestamp(ev.ts, tz=UTC) if ev.ts is not None else now, "received_at": now,
        })
    if rows:
        try:  # durable (journaled) before the 202, or refused with 503 for the client to retry
            rt.writer.submit_feedback(rows)
        except JournalUnavailable as e:
            rt.forget_events([r["event_id"] for r in rows])
            resp = jsonify(e.body())
            resp.headers["Retry-After"] = str(max(1, round(e.retry_after_s)))
            return resp, e.http_status
    n_dup = in_request_dups + len(dup)
    metrics.observe_feedback(len(rows), n_dup)
    return jsonify({"accepted": len(rows), "duplicates": n_dup}), 202


@api_bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@api_bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    rt = runtime()
    reason = rt.not_ready_reason()  # an engine, and a journal that can make feedback durable
    ok = reason is None
    body: dict[str, Any] = {"ready": ok, "versions": rt.engine.state.versions if rt.engine else None}
    if rt.writer is not None:
        body["log"] = rt.writer.stats()
    body["loop"] = rt.loop_status  # the background loop's role, holder and last run of each step
    if not ok:
        body["reason"] = reason
    if not _is_operator(rt):  # error texts may quote SQL, hosts or paths: the operator token sees them
        body = _redacted(body)
    return jsonify(body), 200 if ok else 503


_SECRET_KEYS = frozenset({"reason", "last_error", "error", "detail"})


def _redacted(obj: Any, key: str = "") -> Any:
    """``obj`` with every error text cut to its first word (the exception type or the kind of failure)."""
    if isinstance(obj, dict):
        return {k: _redacted(v, k) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redacted(v, key) for v in obj]
    if key in _SECRET_KEYS and isinstance(obj, str) and obj:
        return f"{obj.split(':', 1)[0][:60]} (details: send the operator token)"
    return obj


def _is_operator(rt: Runtime) -> bool:
    """Whether the request carries the operator token or the operator read token (``HOMEPAGE_OPS_TOKEN``;
    as a bearer token or a Basic password). A wrong one counts toward the app's token throttle."""
    auth = request.headers.get("Authorization", "").strip()
    if not auth:
        return False
    scheme, _, given = auth.partition(" ")
    given = given.strip()
    if scheme.lower() == "basic":
        try:
            given = base64.b64decode(given, validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            given = ""
    elif scheme.lower() != "bearer":
        given = ""
    tokens = [t for t in (rt.settings.operator_token, os.environ.get("HOMEPAGE_OPS_TOKEN")) if t]
    ok = bool(given) and any(hmac.compare_digest(given.encode(), str(t).encode()) for t in tokens)
    throttle = current_app.extensions.get("homepage_throttle")
    if not ok and throttle is not None:
        throttle.failed(request.remote_addr or "")
    return ok


@api_bp.get("/metrics")
def metrics_endpoint() -> Response:
    rt = runtime()
    data, content_type = metrics.render(rt.writer.stats() if rt.writer else None)
    return Response(data, content_type=content_type)


@api_bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_spec(OPS_PATHS))
