"""Operator endpoints: the active config (read and, with the operator token, replace)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify

__all__ = ["ops_bp", "OPS_PATHS"]

ops_bp = Blueprint("ops", __name__)

OPS_PATHS: dict[str, Any] = {
    "/config": {"get": {"summary": "The active operator config and its version",
                        "responses": {"200": {"description": "config"}}}},
}


@ops_bp.get("/config")
def get_config() -> tuple[Response, int]:
    rt = current_app.extensions["homepage"]
    if rt.engine is None:
        return jsonify({"error": {"code": "not_ready", "message": f"engine not ready: {rt.load_error}",
                                  "field": None}}), 503
    st = rt.engine.state
    return jsonify({"version": st.versions.get("config"), "config": st.config.to_dict()}), 200
