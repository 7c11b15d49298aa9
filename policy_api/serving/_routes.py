"""The homepage service's routes: thin (parse -> engine -> log -> respond), no math here."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import ValidationError

from ..errors import InvalidInput, NotFound, NotReady
from ..log import existing_event_ids
from . import _metrics as metrics
from ._ops import OPS_PATHS
from ._runtime import Runtime
from ._schemas import FeedbackRequest, openapi_spec

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


def _validation_error(e: ValidationError) -> InvalidInput:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    got = first.get("input")
    got_s = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return InvalidInput(f"{loc or 'body'}: {first.get('msg', 'invalid')}; got {got_s}", field=loc or None)


@api_bp.get("/layout")
def layout() -> Response:
    t0 = time.perf_counter()
    user_id = request.args.get("user_id")
    if user_id is None or not user_id.strip():
        raise InvalidInput(f"user_id is required: a non-empty string; got {user_id!r}", field="user_id")
    if len(user_id) > 200:
        raise InvalidInput(f"user_id must be at most 200 characters; got {len(user_id)}", field="user_id")
    rt = runtime()
    if rt.engine is None:
        raise NotReady(f"engine not ready: {rt.load_error}")
    assert rt.ids is not None and rt.writer is not None and rt.db is not None
    rid = rt.ids.issue()
    decision = rt.engine.decide(user_id, rid, live=rt.live_signals(user_id))
    rt.writer.submit_decision(decision.row())
    metrics.observe_layout(decision, time.perf_counter() - t0)
    return jsonify(decision.response())


@api_bp.post("/feedback")
def feedback() -> tuple[Response, int]:
    body = request.get_json(silent=True)
    if body is None:
        raise InvalidInput("body must be a JSON object with request_id and events; got "
                           f"{(request.get_data(as_text=True) or '')[:80]!r}")
    try:
        fb = FeedbackRequest.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    rt = runtime()
    assert rt.ids is not None and rt.writer is not None and rt.db is not None
    if not rt.ids.issued(fb.request_id):
        raise UnknownRequest(f"request_id {fb.request_id!r} was not issued by this engine", field="request_id")
    # duplicates: repeated within the request, seen by this worker, or already in the log
    ids = [e.event_id for e in fb.events]
    dup: set[str] = set()
    first: dict[str, int] = {}
    for i, eid in enumerate(ids):
        first.setdefault(eid, i)
    in_request_dups = len(ids) - len(first)
    dup |= rt.remember_events(list(first))
    # while the log writer sees the database down, don't wait on it here: the worker's memory and
    # ON CONFLICT keep feedback idempotent
    if rt.writer.stats().get("healthy", True):
        try:
            dup |= existing_event_ids(rt.db, [e for e in first if e not in dup])
        except Exception:
            log.warning("could not check event ids against the log; relying on ON CONFLICT")
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
        rt.writer.submit_feedback(rows)
    n_dup = in_request_dups + len(dup)
    metrics.observe_feedback(len(rows), n_dup)
    return jsonify({"accepted": len(rows), "duplicates": n_dup}), 202


@api_bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@api_bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    rt = runtime()
    ok = rt.engine is not None
    body: dict[str, Any] = {"ready": ok, "versions": rt.engine.state.versions if rt.engine else None}
    if rt.writer is not None:
        body["log"] = rt.writer.stats()
    body["loop"] = rt.loop_status  # the background loop's role, holder and last run of each step
    if not ok:
        body["reason"] = rt.load_error
    return jsonify(body), 200 if ok else 503


@api_bp.get("/metrics")
def metrics_endpoint() -> Response:
    rt = runtime()
    data, content_type = metrics.render(rt.writer.stats() if rt.writer else None)
    return Response(data, content_type=content_type)


@api_bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_spec(OPS_PATHS))
