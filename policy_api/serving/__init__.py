"""Serving: the Flask app factory, the homepage service's routes, the operator routes, request and
response schemas (OpenAPI), Prometheus metrics, what a worker holds, and the gunicorn wrapper."""

from ._app import create_app
from ._gunicorn import prepare_metrics_dir, run_gunicorn
from ._runtime import Runtime
from ._schemas import openapi_spec

__all__ = ["Runtime", "create_app", "openapi_spec", "prepare_metrics_dir", "run_gunicorn"]
