"""The composition root: the decision engine wiring rankers, allocator and bandits; the Flask app;
the SQL log; the model/plan registry; the ``homepage`` CLI. The only package that does I/O."""

from ._engine import Decision, DecisionEngine, EngineState, build_state
from ._runtime import Runtime, Settings, load_state
from .app import ApiError, create_app
from .cli import main

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
