"""The Flask app factory and its one error shape.

Every error a client gets is ``{"error": {"code", "message", "field"}}``: a
:class:`~policy_api.errors.HomepageError` with its status, Werkzeug's HTTP errors (404, 405, ...)
with theirs, and anything unexpected as a 500 that names only the exception type.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import HomepageError, Unauthorized
from ..settings import Settings
from ._ops import ops_bp
from ._routes import api_bp
from ._runtime import Runtime

__all__ = ["create_app"]

log = logging.getLogger("homepage.api")


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> Flask:
    """Build the app. The engine, database and log writer are created here, never at import.

    Parameters
    ----------
    settings
        Where the database, data folder and token are (default: :meth:`Settings.from_env`).
    runtime
        An already started :class:`Runtime` (tests, embedding); ``settings`` is then ignored.
    """
    app = Flask("homepage", static_folder=None)  # no /static route: the API serves no files
    rt = runtime or Runtime(settings or Settings.from_env()).start()
    app.extensions["homepage"] = rt
    app.register_blueprint(api_bp)
    app.register_blueprint(ops_bp)

    @app.errorhandler(HomepageError)
    def _homepage_error(e: HomepageError) -> tuple[Response, int]:
        resp = jsonify(e.body())
        if isinstance(e, Unauthorized):
            resp.headers["WWW-Authenticate"] = 'Bearer realm="homepage-operator"'
        return resp, e.http_status

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
