"""Operator endpoints: the active config (read; replace, dry-run or roll back with the operator token),
realised exposure against the targets, and the ops console.

Changing the config is a job (:mod:`._jobs`): ``PUT /config``, ``POST /config/dry-run`` and
``POST /config/rollback`` validate on the request thread, then answer 202 with
``Location: /config/jobs/<id>`` while the worker's job thread plans; ``Prefer: wait=N`` waits for it
(at most ``MAX_WAIT_S``). Any worker answers ``GET /config/jobs/<id>`` from the database.

``/ops`` and ``/exposure`` are served from :class:`OpsAggregate` (incremental per-minute sums kept by
a background thread): no request reads the decision log, whatever its size. Their window is bounded
by ``HOMEPAGE_OPS_MAX_WINDOW_S`` (default 6 h). With ``HOMEPAGE_OPS_TOKEN`` set they need that token
(or the operator token), as a bearer token or as the password of HTTP basic authentication.
"""

from __future__ import annotations

import hmac
import html
import os
import re
import threading
import time
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, request

from .. import registry
from ..engine import EngineState
from ..errors import Forbidden, InvalidInput, NotFound, NotReady, Unauthorized
from ..reports import html_page, table_html
from . import _metrics as metrics
from ._charts import line_chart
from ._console import OpsAggregate
from ._jobs import ConfigJobs, lost_after_from_env
from ._runtime import Runtime

__all__ = ["ops_bp", "OPS_PATHS", "config_jobs", "ops_aggregate"]

ops_bp = Blueprint("ops", __name__)

_err = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def _spec_max_window() -> float:
    try:
        return float(os.environ.get("HOMEPAGE_OPS_MAX_WINDOW_S", "21600"))
    except ValueError:
        return 21600.0


_MAXW = _spec_max_window()
#: the longest ``Prefer: wait=N`` honoured, seconds
MAX_WAIT_S = 30.0
#: the most jobs ``GET /config/jobs`` lists
MAX_JOBS_LISTED = 100


def _json_ref(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


_TOML_BODY = {"application/toml": {"schema": {"type": "string", "minLength": 1, "pattern": "\\S"}},
              "text/plain": {"schema": {"type": "string", "minLength": 1, "pattern": "\\S"}}}
_ASYNC = ("The request is validated at once (400 names the bad key); the planning runs in a background job of "
          "the worker: 202 with Location: /config/jobs/<id>. Send Prefer: wait=N (seconds, at most 30) to wait "
          "for the job and get its final answer (200, or the job's error with its status) when it finishes "
          "within N seconds. One apply or rollback runs at a time per database: 409 names the one in progress.")
_JOB_RESPONSES: dict[str, Any] = {
    "202": {"description": "accepted: the job runs in the background; follow Location",
            "headers": {"Location": {"schema": {"type": "string"}, "description": "/config/jobs/<id>"}},
            "content": _json_ref("ConfigJobAccepted")},
    "409": {"description": "another apply or rollback is in progress (its job_id inside); or, with Prefer: "
                           "wait=N, the config is infeasible: not applied, diagnosis inside", "content": _err},
    "503": {"description": "this worker has too many config jobs queued; or the job failed on the database",
            "content": _err},
}
OPS_PATHS: dict[str, Any] = {
    "/config": {
        "get": {"summary": "The active operator config and its version",
                "responses": {"200": {"description": "config"}}},
        "put": {"summary": "Validate a new config, then dry-run and apply it in a background job (bearer token)",
                "description": _ASYNC,
                "security": [{"operatorToken": []}],
                "requestBody": {"required": True, "content": _TOML_BODY},
                "responses": {**_JOB_RESPONSES,
                              "200": {"description": "with Prefer: wait=N, the job finished in time: applied "
                                                     "(version, plan_version, previous_version, projection, "
                                                     "prices, warnings)"},
                              "400": {"description": "invalid config, naming the key", "content": _err}}},
    },
    "/config/dry-run": {"post": {
        "summary": "Validate a config, then dry-run it against the active one in a background job; never "
                   "activates (bearer token)",
        "description": _ASYNC + " The job's result: feasible, projection, prices, warnings, diff (changed keys "
                                "against the active config), text_diff, and current (the active config's "
                                "projection on the same users).",
        "security": [{"operatorToken": []}],
        "requestBody": {"required": True, "content": _TOML_BODY},
        "responses": {**_JOB_RESPONSES,
                      "200": {"description": "with Prefer: wait=N, the job finished in time: its result"},
                      "400": {"description": "invalid config, naming the key", "content": _err}}}},
    "/config/jobs": {"get": {
        "summary": "Recent config jobs of this database, newest first (operator token or HOMEPAGE_OPS_TOKEN)",
        "security": [{"operatorToken": []}],
        "parameters": [{"name": "limit", "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_JOBS_LISTED, "default": 20}}],
        "responses": {"200": {"description": "jobs", "content": _json_ref("ConfigJobList")},
                      "400": {"description": "bad limit, or another query parameter", "content": _err}}}},
    "/config/jobs/{job_id}": {"get": {
        "summary": "One config job, as its row in the database says (any worker answers; operator token or "
                   "HOMEPAGE_OPS_TOKEN); a queued or running job whose worker stopped sending heartbeats is lost",
        "security": [{"operatorToken": []}],
        "parameters": [{"name": "job_id", "in": "path", "required": True,
                        "schema": {"type": "string", "minLength": 1}}],
        "responses": {"200": {"description": "the job", "content": _json_ref("ConfigJob")},
                      "400": {"description": "a query parameter (none is taken)", "content": _err},
                      "404": {"description": "no such job", "content": _err}}}},
    "/exposure": {"get": {
        "summary": "Realised exposure shares against the targets over a window",
        "parameters": [{"name": "window_s", "in": "query",
                        "schema": {"type": "number", "default": 3600, "exclusiveMinimum": 0, "maximum": _MAXW}}],
        "responses": {"200": {"description": "shares"}, "400": {"description": "bad window", "content": _err},
                      "401": {"description": "HOMEPAGE_OPS_TOKEN is set and no valid token was given",
                              "content": _err}}}},
    "/ops": {"get": {"summary": "Operator console (HTML)",
                     "parameters": [{"name": "window_s", "in": "query",
                                     "schema": {"type": "number", "default": 3600, "exclusiveMinimum": 0,
                                                "maximum": _MAXW}}],
                                  "responses": {"200": {"description": "page"},
                                   "401": {"description": "HOMEPAGE_OPS_TOKEN is set and no valid token "
                                                          "was given", "content": _err}}}},
    "/versions": {"get": {"summary": "Config, plan and model versions, newest first",
                                            "responses": {"200": {"description": "histories"}}}},
    "/config/rollback": {"post": {
        "summary": "Make an earlier config version active again in a background job, dry-run first (bearer token)",
        "description": _ASYNC,
        "security": [{"operatorToken": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["version"],
            "properties": {"version": {"type": "integer", "minimum": 1}}}}}},
        "responses": {**_JOB_RESPONSES,
                      "200": {"description": "with Prefer: wait=N, the job finished in time: rolled back (the "
                                             "new config and plan versions, rolled_back_to)"},
                      "400": {"description": "bad version", "content": _err},
                      "404": {"description": "no such version", "content": _err}}}},
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


def _config_body() -> str:
    if request.is_json:
        body = (request.get_json(silent=True) or {}).get("toml")
        if not isinstance(body, str):
            raise InvalidInput('JSON body must be {"toml": "<config text>"}', field="toml")
    else:
        body = request.get_data(as_text=True)
    if not body.strip():
        raise InvalidInput("body must be the config's TOML text; got an empty body", field="body")
    registry.parse_body(body)  # a bad key is a 400 now, naming it; the planning runs in the job
    return body


_JOBS_LOCK = threading.Lock()


def config_jobs(rt: Runtime) -> ConfigJobs:
    """The worker's :class:`ConfigJobs`, made on first use (after the fork, in the worker)."""
    ext = current_app.extensions
    jobs: ConfigJobs | None = ext.get("homepage_jobs")
    if jobs is None:
        with _JOBS_LOCK:
            jobs = ext.get("homepage_jobs")
            if jobs is None:
                assert rt.db is not None
                jobs = ext["homepage_jobs"] = ConfigJobs(rt.db, lambda: rt.reload(force=True),
                                                         lost_after_s=lost_after_from_env())
    return jobs


_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,9})\"?\s*(?:$|[,;])", re.IGNORECASE)


def _prefer_wait() -> float:
    """Seconds the client prefers to wait (``Prefer: wait=N``, RFC 7240), at most ``MAX_WAIT_S``; 0 when
    absent (a preference the server does not understand is ignored, as the RFC asks)."""
    m = _PREFER_WAIT.search(", ".join(request.headers.getlist("Prefer")))
    return min(float(m.group(1)), MAX_WAIT_S) if m else 0.0


def _submitted(rt: Runtime, kind: str, body: str, *, note: str, target_version: int | None = None
               ) -> tuple[Response, int]:
    jobs = config_jobs(rt)
    job = jobs.submit(kind, body, author=request.headers.get("X-Operator", "api")[:100],
                      note=request.headers.get("X-Change-Note", note)[:1000], target_version=target_version)
    wait = _prefer_wait()
    final = jobs.wait(job["job_id"], wait) if wait > 0 else None
    if final is not None:
        out = final.result if final.status == "done" else final.error
        resp = jsonify({**(out or {}), "job_id": job["job_id"], "status_url": job["status_url"]})
        resp.headers["Preference-Applied"] = f"wait={wait:g}"
        resp.headers["Content-Location"] = job["status_url"]
        return resp, final.http_status
    resp = jsonify({"job_id": job["job_id"], "kind": kind, "status": job["status"], "status_url": job["status_url"]})
    resp.headers["Location"] = job["status_url"]
    resp.headers["Retry-After"] = "1"
    return resp, 202


@ops_bp.put("/config")
def put_config() -> tuple[Response, int]:
    rt = _rt()
    _check_token(rt)
    body = _config_body()
    return _submitted(rt, "apply", body, note="PUT /config")


@ops_bp.post("/config/dry-run")
def dry_run_config() -> tuple[Response, int]:
    rt = _rt()
    _check_token(rt)
    body = _config_body()
    return _submitted(rt, "dry_run", body, note="POST /config/dry-run")


@ops_bp.post("/config/rollback")
def rollback_config() -> tuple[Response, int]:
    rt = _rt()
    _check_token(rt)
    body = request.get_json(silent=True)
    version = body.get("version") if isinstance(body, dict) else None
    if isinstance(version, float) and version.is_integer():  # JSON Schema's integer admits 3.0
        version = int(version)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidInput(f'body must be {{"version": <config version, an integer >= 1>}}; got {version!r}',
                           field="version")
    if version >= 2**63:  # beyond any stored version (and the database's integers)
        raise NotFound(f"config version must exist in the registry; got {version!r}", field="version")
    assert rt.db is not None
    old = registry.config_version(rt.db, version)
    return _submitted(rt, "rollback", old.body, note=f"rollback to version {version}", target_version=version)


def _check_job_read(rt: Runtime) -> None:
    """Jobs are read with the operator token, or with ``HOMEPAGE_OPS_TOKEN`` (the operator pages' read token)."""
    accepted = [t for t in (rt.settings.operator_token, os.environ.get("HOMEPAGE_OPS_TOKEN")) if t]
    if not accepted:
        raise Forbidden("config jobs are disabled: set HOMEPAGE_OPERATOR_TOKEN on the server")
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.strip().partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if not given or not any(hmac.compare_digest(given.encode(), t.encode()) for t in accepted):
        raise Unauthorized("a bearer token (Authorization: Bearer <token>: the operator token or "
                           "HOMEPAGE_OPS_TOKEN) is required; " + ("got none" if not given else "got a wrong one"),
                           field="Authorization")


def _only_params(*allowed: str) -> None:
    extra = sorted(set(request.args) - set(allowed))
    if extra:
        raise InvalidInput(f"query parameters must be among ({', '.join(allowed)}); got {extra[0]!r}",
                           field=extra[0])


@ops_bp.get("/config/jobs/<job_id>")
def config_job(job_id: str) -> tuple[Response, int]:
    rt = _rt()
    _check_job_read(rt)
    _only_params()
    assert rt.db is not None
    job = config_jobs(rt).get(job_id) if len(job_id) <= 100 else None
    if job is None:
        raise NotFound(f"job_id must name a config job of this database; got {job_id[:100]!r}", field="job_id")
    return jsonify(job), 200


@ops_bp.get("/config/jobs")
def list_config_jobs() -> tuple[Response, int]:
    rt = _rt()
    _check_job_read(rt)
    _only_params("limit")
    raw = request.args.get("limit", "20")
    try:
        limit = int(raw)
        if not 1 <= limit <= MAX_JOBS_LISTED:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"limit must be an integer in [1, {MAX_JOBS_LISTED}]; got {raw!r}", field="limit") from None
    return jsonify({"jobs": config_jobs(rt).recent(limit)}), 200


# ------------------------------------------------------------------------------ read access, window
_AGG_LOCK = threading.Lock()


#: how long an operator read waits for its worker's aggregate to read the log's window (the figures of a
#: partly read window would look final: 0 decisions, then 2,000 of 5,000); the wait holds one of the
#: worker's request threads, so it is short, happens only until the first pass is done, and the
#: Prometheus scrape never waits (its share gauges are left out until then)
FIRST_READ_WAIT_S = 5.0


def ops_aggregate(rt: Runtime, wait_s: float = FIRST_READ_WAIT_S) -> OpsAggregate:
    """The worker's :class:`OpsAggregate`, started on first use (after the fork, in the worker; a worker
    that serves no operator page never reads the log for it). Waits up to ``wait_s`` for its first pass
    over the window; the answers say whether it is complete (``caught_up``)."""
    ext = current_app.extensions
    agg: OpsAggregate | None = ext.get("homepage_ops")
    if agg is None:
        with _AGG_LOCK:
            agg = ext.get("homepage_ops")
            if agg is None:
                assert rt.db is not None
                agg = ext["homepage_ops"] = OpsAggregate(rt.db, max_window_s=max_window_s()).start()
    if wait_s > 0:
        agg.caught_up.wait(wait_s)
    return agg


def max_window_s() -> float:
    raw = os.environ.get("HOMEPAGE_OPS_MAX_WINDOW_S", "21600")
    try:
        value = float(raw)
        if not 60 <= value <= 7 * 86400:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"HOMEPAGE_OPS_MAX_WINDOW_S must be seconds in [60, 604800]; got {raw!r}",
                           field="HOMEPAGE_OPS_MAX_WINDOW_S") from None
    return value


def _check_read(rt: Runtime) -> None:
    """With ``HOMEPAGE_OPS_TOKEN`` set, operator reads need it (or the operator token)."""
    token = os.environ.get("HOMEPAGE_OPS_TOKEN")
    if not token:
        return
    auth = request.headers.get("Authorization", "")
    scheme, _, given = auth.strip().partition(" ")
    if scheme.lower() == "basic" and request.authorization is not None:
        given = request.authorization.password or ""
    elif scheme.lower() != "bearer":
        given = ""
    given = given.strip()
    accepted = [t for t in (token, rt.settings.operator_token) if t]
    if not given or not any(hmac.compare_digest(given.encode(), t.encode()) for t in accepted):
        raise Unauthorized("operator pages need HOMEPAGE_OPS_TOKEN (Authorization: Bearer <token>, or basic "
                           "authentication with the token as password); "
                           + ("got none" if not given else "got a wrong one"), field="Authorization")


@ops_bp.after_request
def _basic_challenge(resp: Response) -> Response:
    # a browser prompts for basic credentials; API clients keep using the bearer scheme
    if resp.status_code == 401 and request.path in ("/ops", "/exposure", "/versions"):
        resp.headers["WWW-Authenticate"] = 'Bearer realm="homepage-ops", Basic realm="homepage-ops"'
    return resp


def _window() -> float:
    raw = request.args.get("window_s", "3600")
    top = max_window_s()
    try:
        window = float(raw)
        if not 0 < window <= top:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"window_s must be a number of seconds in (0, {top:g}]; got {raw!r} (for longer "
                           "windows export the log: homepage log export)", field="window_s") from None
    return window


def _constraint_rows(st: EngineState, shares: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    for k, c in enumerate(st.config.constraints):
        s = float(shares[k]) if k < shares.size else float("nan")
        ok = None if np.isnan(s) else bool((c.min is None or s >= c.min) and (c.max is None or s <= c.max))
        rows.append({"name": c.name, "kind": c.kind, "min": c.min, "max": c.max,
                     "realised": None if np.isnan(s) else s, "holds": ok})
    return rows


def _exposure_body(rt: Runtime, st: EngineState, window: float) -> dict[str, Any]:
    agg = ops_aggregate(rt)
    version = st.versions.get("config")
    ser = agg.series(version, window, n_constraints=len(st.config.constraints))
    return {"window_s": window, "decisions": int(ser.served.sum()), "config_version": version,
            "constraints": _constraint_rows(st, ser.shares()),
            "aggregate": {"worker": os.getpid(), "as_of": agg.caught_up_at, "rows_read": agg.rows_read,
                          "ticks": agg.ticks, "caught_up": agg.caught_up.is_set(),
                          "bucket_s": agg.bucket_s, "max_window_s": agg.max_window_s, "error": agg.error}}


@ops_bp.get("/exposure")
def exposure() -> tuple[Response, int]:
    rt = _rt()
    _check_read(rt)
    window = _window()
    st = _ready(rt)
    return jsonify(_exposure_body(rt, st, window)), 200


@ops_bp.get("/versions")
def versions() -> tuple[Response, int]:
    rt = _rt()
    _check_read(rt)
    st = _ready(rt)
    agg = ops_aggregate(rt)
    if not agg.caught_up.is_set():  # still reading the log's window: the history is three small reads
        agg.refresh_history()
    return jsonify({"in_force": st.versions, **agg.history}), 200


# ------------------------------------------------------------------------------------- the console
_WINDOWS = (("15 min", 900), ("1 h", 3600), ("6 h", 21600), ("24 h", 86400), ("7 d", 604800))


def _loop_html(status: dict[str, Any] | None) -> str:
    if not status:
        return ("<p class=hint>No loop has run on this database: start <code>homepage serve</code> without "
                "<code>--no-loop</code>, or <code>homepage worker</code>.</p>")
    steps = [{"step": k, **v} for k, v in (status.get("steps") or {}).items()]
    live = status.get("live")
    head = (f"<p>holder {html.escape(str(status.get('holder')))}, role {html.escape(str(status.get('role')))}, "
            f"lease live: <span class={'good' if live else 'bad'}>{html.escape(str(live))}</span></p>")
    return head + (table_html(steps) if steps else "<p class=hint>The loop has not run a step yet.</p>")


def _constraint_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("constraint", "kind", "min", "max", "realised", "holds"))
    body = []
    for r in rows:
        cells = [html.escape(str(r["name"])), html.escape(str(r["kind"]))]
        cells += ["" if r[k] is None else f"{r[k]:.4g}" for k in ("min", "max")]
        if r["realised"] is None:
            cells += ["<span class=hint>no traffic yet: send <code>GET /layout</code> requests</span>", ""]
        else:
            cells.append(f"{r['realised']:.4g}")
            cells.append("<span class=good>holds</span>" if r["holds"]
                         else "<span class=bad>holds: False</span>")
        cls = " class=alert" if r["holds"] is False else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _hint(text: str) -> str:
    return f"<p class=hint>{text}</p>"


@ops_bp.get("/ops")
def ops_page() -> Response:
    rt = _rt()
    _check_read(rt)
    window = _window()
    if rt.engine is None or rt.db is None:
        return Response(html_page("homepage engine — ops", [("Not ready", html.escape(str(rt.load_error)))]),
                        status=503, mimetype="text/html")
    st = rt.engine.state
    agg = ops_aggregate(rt)
    if not agg.caught_up.is_set():  # still reading the log's window: the history is three small reads
        agg.refresh_history()
    top = agg.max_window_s
    now = time.time()
    exp = _exposure_body(rt, st, window)
    ser = agg.series(st.versions.get("config"), window, now=now, n_constraints=len(st.config.constraints))
    names = list(st.config.constraint_names)
    minutes = (ser.start + agg.bucket_s / 2 - now) / 60.0
    served = np.maximum(ser.served, 1.0)
    charts = []
    for k, c in enumerate(st.config.constraints):
        charts.append(line_chart(f"{c.name}: realised share", minutes, {"realised": ser.exposure[:, k] / served},
                                 y_label="share", band=(c.min, c.max)))
    pt, pv = agg.prices(names, window, now=now)
    price_chart = line_chart("prices (λ)", (pt + agg.bucket_s / 2 - now) / 60.0,
                             {n: pv[:, k] for k, n in enumerate(names)}, y_label="price per unit share")
    traffic = line_chart("traffic", minutes, {"decisions / min": ser.decisions * 60.0 / agg.bucket_s},
                         y_label="decisions per minute")
    fallback = line_chart("fallback rate", minutes,
                          {"fallback": ser.fallbacks / np.maximum(ser.decisions, 1.0)}, y_label="share of decisions")
    value = line_chart("expected value per served request", minutes, {"value": ser.value / served},
                       y_label="value per request")
    links = " · ".join(f"<a href='?window_s={w}'>{'<b>' + n + '</b>' if w == window else n}</a>"
                       for n, w in _WINDOWS if w <= top)
    as_of = ("not yet" if agg.caught_up_at is None
             else f"{now - agg.caught_up_at:.0f} s ago") + (f" — <span class=bad>{html.escape(agg.error)}</span>"
                                                              if agg.error else "")
    no_traffic = _hint(f"Reading the log's window ({agg.rows_read} decisions so far): the figures below are "
                       "partial; reload in a few seconds.") if not agg.caught_up.is_set() else "" if ser.decisions.sum() else _hint(
        "No decisions in this window under the active config: send <code>GET /layout?user_id=…</code> "
        "requests (or run <code>make demo</code>).")
    prices_hint = "" if pt.size else _hint("No plan was published in this window: run <code>homepage plan</code> "
                                           "(the loop also plans and paces when it runs).")
    hist = agg.history
    versions_html = (table_html([dict(st.versions)]) + "<h3>Configs</h3>"
                     + (table_html(hist["configs"]) if hist["configs"] else _hint("loading…"))
                     + "<h3>Plans</h3>" + (table_html(hist["plans"]) if hist["plans"] else _hint(
                         "No plan yet: run <code>homepage plan</code>."))
                     + "<h3>Models</h3>" + (table_html(hist["models"]) if hist["models"] else _hint(
                         "No model yet: run <code>homepage learn</code> (bandit) or <code>homepage train</code> "
                         "(ranker), or let the loop do it.")))
    base = request.host_url.rstrip("/")
    change = (
        "<p>In this browser: the <a href='/ops/config'>config page</a> shows the active config and its history, "
        "dry-runs a proposed config (diff and projection), applies it and rolls back.</p>"
        "<p>Check a change (diff and dry-run projection): <code>homepage versions diff config "
        f"{st.versions.get('config')} new.toml</code> and <code>homepage config check new.toml</code>.</p>"
        "<p>Apply it: <code>homepage config apply new.toml</code> or</p>"
        "<pre>curl -X PUT -H \"Authorization: Bearer $HOMEPAGE_OPERATOR_TOKEN\" -H \"Prefer: wait=30\" "
        f"--data-binary @new.toml {html.escape(base)}/config</pre>"
        "<p>Roll back to an earlier version: <code>homepage versions rollback config N</code> or</p>"
        "<pre>curl -X POST -H \"Authorization: Bearer $HOMEPAGE_OPERATOR_TOKEN\" "
        f"-H \"Content-Type: application/json\" -d '{{\"version\": N}}' {html.escape(base)}/config/rollback</pre>")
    sections = [
        ("Window", f"<p>{links} — figures as of {as_of}; {exp['decisions']} served decisions under config "
                   f"{st.versions.get('config')}</p>"),
        ("Exposure against the targets", _constraint_table(exp["constraints"]) + no_traffic
         + "<div class=charts>" + "".join(charts) + "</div>"),
        ("Prices", table_html([{"constraint": n, "price in force": float(p)} for n, p in zip(
            names, st.prices, strict=True)]) + prices_hint + price_chart),
        ("Traffic", "<div class=charts>" + traffic + fallback + value + "</div>"),
        ("Versions in force and their history", versions_html),
        ("The loop", _loop_html(rt.loop_status)),
        ("Change or roll back the config", change),
    ]
    page = html_page("homepage engine — ops", sections).replace("</style>", _CSS + "</style>", 1)
    return Response(page, mimetype="text/html")


_CSS = (".hint{color:#666;font-style:italic}tr.alert td{background:#fde8e8}"
        ".charts{display:flex;flex-wrap:wrap;gap:8px}pre{background:#f6f6f6;padding:6px;overflow-x:auto}")


# ---------------------------------------------------------------------------------- business gauges
def _gauges(rt: Runtime) -> list[tuple[str, str, dict[str, str], float]]:
    if rt.engine is None or rt.db is None:
        return []
    st = rt.engine.state
    agg = ops_aggregate(rt, wait_s=0.0)  # a scrape never holds a request thread
    window = min(900.0, agg.max_window_s)
    ser = agg.series(st.versions.get("config"), window, n_constraints=len(st.config.constraints))
    # before the first pass over the window the shares would be those of a part of it: left out
    shares = ser.shares() if agg.caught_up.is_set() else np.full(len(st.config.constraints), np.nan)
    out: list[tuple[str, str, dict[str, str], float]] = []
    for k, c in enumerate(st.config.constraints):
        lab = {"constraint": c.name}
        if not np.isnan(shares[k]):
            out.append(("homepage_exposure_share", "Realised share of the constraint over the last 15 min",
                        lab, float(shares[k])))
        if c.min is not None:
            out.append(("homepage_exposure_target_min", "Lower bound of the constraint", lab, float(c.min)))
        if c.max is not None:
            out.append(("homepage_exposure_target_max", "Upper bound of the constraint", lab, float(c.max)))
        out.append(("homepage_price", "Price (dual) of the constraint in force", lab, float(st.prices[k])))
    for kind, v in st.versions.items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out.append(("homepage_version", "Version in force", {"kind": str(kind)}, float(v)))
        elif isinstance(v, dict):
            for name, mv in v.items():
                if isinstance(mv, int | float):
                    out.append(("homepage_version", "Version in force", {"kind": f"{kind}.{name}"}, float(mv)))
    loop = rt.loop_status or {}
    if "live" in loop:
        out.append(("homepage_loop_lease_live", "1 while a loop holds a live lease on this database", {},
                    1.0 if loop.get("live") else 0.0))
    n = float(ser.decisions.sum())
    out.append(("homepage_decisions_window", "Decisions logged under the active config over the last 15 min",
                {}, n))
    if n:
        out.append(("homepage_fallback_rate", "Share of fallback decisions over the last 15 min", {},
                    float(ser.fallbacks.sum() / n)))
    if ser.served.sum():
        out.append(("homepage_expected_value_per_request", "Expected value of the served layouts over the last "
                    "15 min", {}, float(ser.value.sum() / ser.served.sum())))
    return out


@ops_bp.record_once
def _register_gauges(state: Any) -> None:
    app = state.app

    def provide() -> list[tuple[str, str, dict[str, str], float]]:
        rt = app.extensions.get("homepage")
        return [] if rt is None else _gauges(rt)

    metrics.register_gauges(provide)
