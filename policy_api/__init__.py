"""The composition root: the decision engine wiring rankers, allocator and bandits; the Flask app;
the SQL log; the model/plan registry; the ``homepage`` CLI. The only package that does I/O.

``create_app``, ``ApiError`` and ``main`` are imported on first use: the app module creates the
Prometheus metrics, and ``homepage serve`` must set up multiprocess metrics before that happens.
"""

from typing import Any

from ._engine import Decision, DecisionEngine, EngineState, build_state
from ._runtime import Runtime, Settings, load_state

__all__ = [
    "ApiError",
    "Decision",
    "DecisionEngine",
    "EngineState",
    "Runtime",
    "Settings",
    "build_state",
    "create_app",
    "load_state",
    "main",
]


def __getattr__(name: str) -> Any:
    if name in ("create_app", "ApiError"):
        from . import app

        return getattr(app, name)
    if name == "main":
        from .cli import main

        return main
    raise AttributeError(f"module 'policy_api' has no attribute {name!r}")
