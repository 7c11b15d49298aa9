"""The Flask app factory: thin routes (parse -> engine -> log -> respond) and one error shape."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from . import _metrics as metrics
from . import _store as store
from ._runtime import Runtime, Settings
from ._schemas import FeedbackRequest, openapi_spec

__all__ = ["create_app", "ApiError"]

log = logging.getLogger("homepage.api")
bp = Blueprint("homepage", __name__)


class ApiError(Exception):
    """An error answered as ``{"error": {"code", "message", "field"}}`` with a 4xx/5xx status."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def _runtime() -> Runtime:
    rt: Runtime = current_app.extensions["homepage"]
    return rt


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> Flask:
    """Build the app. The engine, database and log writer are created here, never at import."""
    app = Flask("homepage")
    rt = runtime or Runtime(settings or Settings.from_env()).start()
    app.extensions["homepage"] = rt
    app.register_blueprint(bp)
    from ._ops import ops_bp

    app.register_blueprint(ops_bp)

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError) -> tuple[Response, int]:
        return jsonify({"error": {"code": e.code, "message": e.message, "field": e.field}}), e.status

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> tuple[Response, int]:
        code = (e.name or "error").lower().replace(" ", "_")
        resp = jsonify({"error": {"code": code, "message": e.description or e.name, "field": None}})
        for name, value in e.get_headers():  # e.g. Allow on 405, as RFC 9110 asks
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp, e.code or 500

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> tuple[Response, int]:
        log.exception("unhandled error")
        return jsonify({"error": {"code": "internal", "message": f"internal error: {type(e).__name__}",
                                  "field": None}}), 500

    return app


def _validation_error(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    got = first.get("input")
    got_s = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return ApiError(400, "invalid", f"{loc or 'body'}: {first.get('msg', 'invalid')}; got {got_s}", loc or None)


@bp.get("/layout")
def layout() -> Response:
    t0 = time.perf_counter()
    user_id = request.args.get("user_id")
    if user_id is None or not user_id.strip():
        raise ApiError(400, "invalid", "user_id is required: a non-empty string; got "
                       f"{user_id!r}", "user_id")
    if len(user_id) > 200:
        raise ApiError(400, "invalid", f"user_id must be at most 200 characters; got {len(user_id)}", "user_id")
    rt = _runtime()
    if rt.engine is None:
        raise ApiError(503, "not_ready", f"engine not ready: {rt.load_error}", None)
    assert rt.ids is not None and rt.writer is not None
    rid = rt.ids.issue()
    decision = rt.engine.decide(user_id, rid)
    rt.writer.submit_decision(decision.row())
    metrics.observe_layout(decision, time.perf_counter() - t0)
    return jsonify(decision.response())


@bp.post("/feedback")
def feedback() -> tuple[Response, int]:
    body = request.get_json(silent=True)
    if body is None:
        raise ApiError(400, "invalid", "body must be a JSON object with request_id and events; got "
                       f"{(request.get_data(as_text=True) or '')[:80]!r}", None)
    try:
        fb = FeedbackRequest.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e) from None
    rt = _runtime()
    assert rt.ids is not None and rt.writer is not None
    if not rt.ids.issued(fb.request_id):
        raise ApiError(404, "unknown_request", f"request_id {fb.request_id!r} was not issued by this engine",
                       "request_id")
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
            dup |= store.existing_event_ids(rt.db, [e for e in first if e not in dup])
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


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    rt = _runtime()
    ok = rt.engine is not None
    body: dict[str, Any] = {"ready": ok, "versions": rt.engine.state.versions if rt.engine else None}
    if rt.writer is not None:
        body["log"] = rt.writer.stats()
    if not ok:
        body["reason"] = rt.load_error
    return jsonify(body), 200 if ok else 503


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    rt = _runtime()
    data, content_type = metrics.render(rt.writer.stats() if rt.writer else None)
    return Response(data, content_type=content_type)


@bp.get("/openapi.json")
def openapi() -> Response:
    from ._ops import OPS_PATHS

    return jsonify(openapi_spec(OPS_PATHS))
