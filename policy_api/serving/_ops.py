"""Operator endpoints: the active config (read; replace with the operator token, after a dry run),
realised exposure against the targets, and a small ops page."""

from __future__ import annotations

import hmac
import html
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from ..engine import EngineState
from ..errors import Forbidden, InvalidInput, NotReady, Unauthorized
from ..jobs import apply_config, exposure_report
from ..reports import html_page, table_html
from ._runtime import Runtime

__all__ = ["ops_bp", "OPS_PATHS"]

ops_bp = Blueprint("ops", __name__)

_err = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
OPS_PATHS: dict[str, Any] = {
    "/config": {
        "get": {"summary": "The active operator config and its version",
                "responses": {"200": {"description": "config"}}},
        "put": {"summary": "Validate, dry-run and apply a new config (bearer token)",
                "security": [{"operatorToken": []}],
                "requestBody": {"required": True, "content": {
                    "application/toml": {"schema": {"type": "string", "minLength": 1, "pattern": "\\S"}},
                    "text/plain": {"schema": {"type": "string", "minLength": 1, "pattern": "\\S"}}}},
                "responses": {"200": {"description": "applied: new config and plan versions"},
                              "400": {"description": "invalid config", "content": _err},
                              "401": {"description": "missing or wrong token", "content": _err},
                              "409": {"description": "infeasible: not applied; diagnosis inside", "content": _err}}},
    },
    "/exposure": {"get": {
        "summary": "Realised exposure shares against the targets over a window",
        "parameters": [{"name": "window_s", "in": "query",
                        "schema": {"type": "number", "default": 3600, "exclusiveMinimum": 0, "maximum": 7776000}}],
        "responses": {"200": {"description": "shares"}, "400": {"description": "bad window", "content": _err}}}},
    "/ops": {"get": {"summary": "Operator page (HTML)", "responses": {"200": {"description": "page"}}}},
}


def _rt() -> Runtime:
    rt: Runtime = current_app.extensions["homepage"]
    return rt


def _ready(rt: Runtime) -> EngineState:
    if rt.engine is None:
        raise NotReady(f"engine not ready: {rt.load_error}")
    return rt.engine.state


def _check_token(rt: Runtime) -> None:
    token = rt.settings.operator_token
    if not token:
        raise Forbidden("PUT /config is disabled: set HOMEPAGE_OPERATOR_TOKEN on the server")
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.strip().partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""  # the scheme is case-insensitive (RFC 9110)
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("a bearer token (Authorization: Bearer <token>) is required; "
                           + ("got none" if not given else "got a wrong one"), field="Authorization")


@ops_bp.get("/config")
def get_config() -> tuple[Response, int]:
    st = _ready(_rt())
    return jsonify({"version": st.versions.get("config"), "config": st.config.to_dict()}), 200


@ops_bp.put("/config")
def put_config() -> tuple[Response, int]:
    rt = _rt()
    _check_token(rt)
    if request.is_json:
        body = (request.get_json(silent=True) or {}).get("toml")
        if not isinstance(body, str):
            raise InvalidInput('JSON body must be {"toml": "<config text>"}', field="toml")
    else:
        body = request.get_data(as_text=True)
    if not body.strip():
        raise InvalidInput("body must be the config's TOML text; got an empty body", field="body")
    assert rt.db is not None
    res = apply_config(rt.db, body, author=request.headers.get("X-Operator", "api")[:100],
                       note=request.headers.get("X-Change-Note", "PUT /config")[:1000])
    rt.reload(force=True)
    return jsonify({"version": res.version, "plan_version": res.plan_version,
                    "previous_version": res.previous_version, "projection": res.plan.projected,
                    "prices": res.plan.prices, "warnings": list(res.warnings)}), 200


def _window() -> float:
    raw = request.args.get("window_s", "3600")
    try:
        window = float(raw)
        if not 0 < window <= 90 * 86400:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"window_s must be a number of seconds in (0, 7776000]; got {raw!r}",
                           field="window_s") from None
    return window


@ops_bp.get("/exposure")
def exposure() -> tuple[Response, int]:
    rt = _rt()
    window = _window()
    st = _ready(rt)
    assert rt.db is not None
    return jsonify(exposure_report(rt.db, st.config, st.versions.get("config"), window)), 200


def _loop_html(status: dict[str, Any] | None) -> str:
    if not status:
        return ("<p>No loop has run on this database: start <code>homepage serve</code> without "
                "<code>--no-loop</code>, or <code>homepage worker</code>.</p>")
    steps = [{"step": k, **v} for k, v in (status.get("steps") or {}).items()]
    head = (f"<p>holder {html.escape(str(status.get('holder')))}, role {html.escape(str(status.get('role')))}, "
            f"lease live: {status.get('live')}</p>")
    return head + table_html(steps)


@ops_bp.get("/ops")
def ops_page() -> Response:
    rt = _rt()
    if rt.engine is None or rt.db is None:
        return Response(html_page("homepage engine — ops", [("Not ready", html.escape(str(rt.load_error)))]),
                        status=503, mimetype="text/html")
    st = rt.engine.state
    exp = exposure_report(rt.db, st.config, st.versions.get("config"), 3600.0)
    prices = [{"constraint": n, "price": float(p)} for n, p in zip(st.config.constraint_names, st.prices, strict=True)]
    sections = [
        ("Versions in force", table_html([{k: v for k, v in st.versions.items()}])),
        (f"Exposure over the last hour ({exp['decisions']} decisions)", table_html(exp["constraints"])),
        ("Prices", table_html(prices)),
        ("The loop", _loop_html(rt.loop_status)),
        ("Change the config", "<p><code>homepage config check new.toml</code> dry-runs a change; "
         "<code>homepage config apply new.toml</code> or "
         "<code>curl -X PUT -H \"Authorization: Bearer $HOMEPAGE_OPERATOR_TOKEN\" --data-binary @new.toml "
         "/config</code> applies it.</p>"),
    ]
    return Response(html_page("homepage engine — ops", sections), mimetype="text/html")
