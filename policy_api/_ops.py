"""Operator endpoints: the active config (read; replace with the operator token, after a dry run),
realised exposure against the targets, and a small ops page."""

from __future__ import annotations

import hmac
import html
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

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


def _rt() -> Any:
    return current_app.extensions["homepage"]


def _error(status: int, code: str, message: str, field: str | None = None, **extra: Any) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "field": field}}
    body.update(extra)
    return jsonify(body), status


@ops_bp.get("/config")
def get_config() -> tuple[Response, int]:
    rt = _rt()
    if rt.engine is None:
        return _error(503, "not_ready", f"engine not ready: {rt.load_error}")
    st = rt.engine.state
    return jsonify({"version": st.versions.get("config"), "config": st.config.to_dict()}), 200


@ops_bp.put("/config")
def put_config() -> tuple[Response, int]:
    from allocator import ConfigError, parse_config_text

    from . import _store as store
    from ._jobs_plan import dry_run, sample_users

    rt = _rt()
    token = rt.settings.operator_token
    if not token:
        return _error(403, "disabled", "PUT /config is disabled: set HOMEPAGE_OPERATOR_TOKEN on the server")
    auth = request.headers.get("Authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else ""
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        resp, status = _error(401, "unauthorized", "a bearer token (Authorization: Bearer <token>) is required; "
                              + ("got none" if not given else "got a wrong one"), "Authorization")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="homepage-operator"'
        return resp, status
    if request.is_json:
        body = (request.get_json(silent=True) or {}).get("toml")
        if not isinstance(body, str):
            return _error(400, "invalid", "JSON body must be {\"toml\": \"<config text>\"}", "toml")
    else:
        body = request.get_data(as_text=True)
    if not body.strip():
        return _error(400, "invalid", "body must be the config's TOML text; got an empty body", "body")
    try:
        cfg = parse_config_text(body, source="PUT /config")
    except ConfigError as e:
        return _error(400, "invalid_config", str(e), e.key, errors=[{"field": k, "message": m} for k, m in e.errors])
    db = rt.db
    users, weight = sample_users(db, n=500, seed=0)
    res = dry_run(db, cfg, None, users, weight)
    if not res["ok"]:
        return _error(409, "infeasible", "config not applied: its constraints cannot all hold.\n" + res["diagnosis"],
                      "constraints", conflicting=res["conflicting"], relaxations=res["relaxations"])
    summary = res["summary"]
    author = request.headers.get("X-Operator", "api")[:100]
    previous = store.active_config(db)
    with db.begin() as conn:  # config and its plan land together, or not at all
        version = store.insert_config(conn, body=body, author=author, status="active",
                                      note=request.headers.get("X-Change-Note", "PUT /config")[:1000],
                                      projection=summary["projected"])
        solver = dict(summary["solver"], source="PUT /config dry run")
        plan_version = store.insert_plan(conn, version, summary["prices"], projected=summary["projected"],
                                         solver=solver)
    rt.reload(force=True)
    return jsonify({"version": version, "plan_version": plan_version,
                    "previous_version": None if previous is None else previous[0],
                    "projection": summary["projected"], "prices": summary["prices"],
                    "warnings": list(cfg.warnings)}), 200


@ops_bp.get("/exposure")
def exposure() -> tuple[Response, int]:
    from ._jobs_plan import exposure_report

    rt = _rt()
    raw = request.args.get("window_s", "3600")
    try:
        window = float(raw)
        if not 0 < window <= 90 * 86400:
            raise ValueError
    except ValueError:
        return _error(400, "invalid", f"window_s must be a number of seconds in (0, 7776000]; got {raw!r}", "window_s")
    if rt.engine is None:
        return _error(503, "not_ready", f"engine not ready: {rt.load_error}")
    st = rt.engine.state
    return jsonify(exposure_report(rt.db, st.config, st.versions.get("config"), window)), 200


@ops_bp.get("/ops")
def ops_page() -> Response:
    from ._jobs_plan import exposure_report
    from ._report import html_page, table_html

    rt = _rt()
    if rt.engine is None:
        return Response(html_page("homepage engine — ops", [("Not ready", html.escape(str(rt.load_error)))]),
                        status=503, mimetype="text/html")
    st = rt.engine.state
    exp = exposure_report(rt.db, st.config, st.versions.get("config"), 3600.0)
    prices = [{"constraint": n, "price": float(p)} for n, p in zip(st.config.constraint_names, st.prices, strict=True)]
    sections = [
        ("Versions in force", table_html([{k: v for k, v in st.versions.items()}])),
        (f"Exposure over the last hour ({exp['decisions']} decisions)", table_html(exp["constraints"])),
        ("Prices", table_html(prices)),
        ("Change the config", "<p><code>homepage config check new.toml</code> dry-runs a change; "
         "<code>curl -X PUT -H 'Authorization: Bearer $HOMEPAGE_OPERATOR_TOKEN' --data-binary @new.toml "
         "/config</code> applies it.</p>"),
    ]
    return Response(html_page("homepage engine — ops", sections), mimetype="text/html")
