"""The ops console's config page (``/ops/config``): the active config and its history, a proposed
config's dry run (the diff against the active one and its projection), apply and roll back.

The page is rendered on the server from the registry; the buttons run ``static/config.js``, served
by the app itself (no CDN: the deployment may have no internet). The script calls the operator API
(``POST /config/dry-run``, ``PUT /config``, ``POST /config/rollback``) with the operator token the
operator typed into the page (kept in the tab's ``sessionStorage`` only), follows a ``202`` job to its
end (``Prefer: wait``, then polling its ``status_url``) and shows every API error as it was answered.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import sqlalchemy as sa
from flask import Blueprint, Response, current_app, request

from .. import registry
from ..errors import NotFound, Unavailable
from ..registry import ConfigRecord
from ..reports import html_page
from ._ops import _check_read
from ._runtime import Runtime

__all__ = ["console_bp", "STATIC_FILES"]

console_bp = Blueprint("console", __name__)

# the files /ops/static/ serves, and nothing else
STATIC_FILES = {"config.js": "text/javascript; charset=utf-8"}
_STATIC = Path(__file__).resolve().parent / "static"
_HISTORY = 50


def _rt() -> Runtime:
    rt: Runtime = current_app.extensions["homepage"]
    return rt


def _when(rec: ConfigRecord) -> str:
    return "" if rec.created_at is None else rec.created_at.strftime("%Y-%m-%d %H:%M:%S")


def _targets(rec: ConfigRecord | None) -> dict[str, dict[str, float | None]]:
    if rec is None:
        return {}
    return {c.name: {"min": c.min, "max": c.max} for c in rec.config.constraints}


def _active_html(active: ConfigRecord | None) -> str:
    if active is None:
        return ("<p class=hint>No active config: apply one below, or start the server with "
                "<code>homepage serve --config FILE</code>.</p>")
    meta = (f"<p>Version <b id=active-version>{active.version}</b>, applied {html.escape(_when(active))} "
            f"by {html.escape(active.author or '?')}"
            + (f" — {html.escape(active.note)}" if active.note else "") + "</p>")
    return meta + f"<pre id=active-body>{html.escape(active.body)}</pre>"


def _history_html(history: list[ConfigRecord], active: ConfigRecord | None) -> str:
    if not history:
        return "<p class=hint>No config has been applied yet.</p>"
    head = "".join(f"<th>{c}</th>" for c in ("version", "status", "applied", "author", "note", ""))
    rows = []
    for c in history:
        if active is not None and c.version == active.version:
            action = "<span class=good>active</span>"
        else:
            action = (f"<button type=button class=rollback data-version=\"{c.version}\">"
                      f"Roll back to version {c.version}</button>")
        cells = [str(c.version), html.escape(c.status), html.escape(_when(c)), html.escape(c.author),
                 html.escape(c.note), action]
        rows.append(f"<tr data-version=\"{c.version}\">" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
    return f"<table id=history-table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


_TOKEN_HTML = """<p><label for=token>Operator token</label>
<input id=token type=password autocomplete=off size=36 placeholder="HOMEPAGE_OPERATOR_TOKEN">
<button type=button id=forget-token>Forget</button>
<span class=hint>kept in this tab only (sessionStorage) and sent as <code>Authorization: Bearer</code></span></p>"""

_PROPOSE_HTML = """<p><label for=proposed>Proposed config (TOML); it starts as a copy of the active one</label></p>
<textarea id=proposed rows=22 cols=100 spellcheck=false>{body}</textarea>
<p><button type=button id=dry-run>Dry run</button> <button type=button id=apply>Apply</button>
<span class=hint>a dry run changes nothing; Apply validates and dry-runs again, then makes the config
active with its plan (an infeasible config is never applied)</span></p>"""

_CSS = (".hint{color:#666;font-style:italic}pre{background:#f6f6f6;padding:6px;overflow-x:auto;text-align:left}"
        "textarea{width:100%;font-family:monospace}#error{border:1px solid #b00;background:#fde8e8;padding:6px}"
        "#error:empty{display:none}#job-status{font-weight:bold}td.key,td.text{text-align:left}"
        "tr.miss td{background:#fde8e8}nav{margin-bottom:1em}#active-body{max-height:24em}"
        "#history-table td{text-align:left}#history-table td:first-child{text-align:right}")


@console_bp.get("/ops/config")
def config_page() -> Response:
    rt = _rt()
    _check_read(rt)
    if rt.db is None:
        raise Unavailable(f"the database is not connected: {rt.load_error}")
    try:
        active = registry.active_config(rt.db)
        history = registry.config_history(rt.db, limit=_HISTORY)
    except sa.exc.OperationalError as e:
        raise Unavailable(f"cannot read the config registry: {type(e.orig or e).__name__}") from None
    root = request.script_root
    disabled = "" if rt.settings.operator_token else (
        "<p class=bad>Changes are disabled on this server: set HOMEPAGE_OPERATOR_TOKEN to enable Apply and "
        "Roll back (a dry run needs it too).</p>")
    state = {"root": root, "active_version": None if active is None else active.version,
             "targets": _targets(active)}
    sections = [
        ("Operator token", _TOKEN_HTML + disabled),
        ("Active config", f"<div id=active>{_active_html(active)}</div>"),
        ("History", f"<p class=hint>newest first, last {_HISTORY}; a rollback publishes the earlier text again "
                    "as a new version, after a dry run</p><div id=history>"
                    f"{_history_html(history, active)}</div>"),
        ("Propose a change", _PROPOSE_HTML.format(body=html.escape(active.body if active else ""))),
        ("Result", "<p id=job-status role=status></p><div id=error role=alert></div><div id=result></div>"),
    ]
    page = html_page("homepage engine — config", sections)
    page = page.replace("</style>", _CSS + "</style>", 1)
    page = page.replace("<h1>", f"<nav><a href=\"{html.escape(root)}/ops\">← ops console</a></nav><h1>", 1)
    boot = html.escape(json.dumps(state), quote=True)
    page = page.replace("</body>", f"<div id=console-state hidden data-state=\"{boot}\"></div>"
                                   f"<script src=\"{html.escape(root)}/ops/static/config.js\" defer></script></body>", 1)
    resp = Response(page, mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@console_bp.get("/ops/static/<name>")
def static_file(name: str) -> Response:
    kind = STATIC_FILES.get(name)
    if kind is None:
        raise NotFound(f"name must be one of the console's files {sorted(STATIC_FILES)}; got {name!r}", field="name")
    body = (_STATIC / name).read_bytes()
    resp = Response(body, content_type=kind)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@console_bp.after_request
def _basic_challenge(resp: Response) -> Response:
    # a browser prompts for basic credentials (HOMEPAGE_OPS_TOKEN as password), as on /ops
    if resp.status_code == 401 and request.path == "/ops/config":
        resp.headers["WWW-Authenticate"] = 'Bearer realm="homepage-ops", Basic realm="homepage-ops"'
    return resp
