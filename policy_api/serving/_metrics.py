"""Prometheus metrics. Under gunicorn, ``homepage serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` so every
worker's counters are aggregated in one exposition.

``prometheus_client`` picks its value store (in-process or multiprocess files) when it is first
imported, so it is imported, and the metrics created, on first use — never at import of this module.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from ..engine import Decision

__all__ = ["observe_feedback", "observe_layout", "register_gauges", "render"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class _Metrics:
    layouts: Any
    latency: Any
    decide: Any
    feedback: Any


_CREATE = threading.Lock()


def _metrics() -> _Metrics:
    # created once per process; with several request threads the first requests race here, and a
    # second registration of the same names raises (DuplicateTimeseries)
    got = _created
    if got:
        return got[0]
    with _CREATE:
        if not _created:
            _created.append(_new_metrics())
    return _created[0]


_created: list[_Metrics] = []


def _new_metrics() -> _Metrics:
    from prometheus_client import Counter, Histogram

    return _Metrics(
        layouts=Counter("homepage_layout_requests", "Layout decisions served", ["policy", "fallback"]),
        latency=Histogram("homepage_layout_seconds", "GET /layout handling time", buckets=_LATENCY_BUCKETS),
        decide=Histogram("homepage_decision_seconds", "Engine decision time", buckets=_LATENCY_BUCKETS),
        feedback=Counter("homepage_feedback_events", "Feedback events received", ["status"]),
    )


@cache  # racing threads may both compute it: labels() returns the same child
def _layout_counter(policy: str, fallback: bool) -> Any:
    # the labelled child once per (policy, fallback): ``labels()`` costs more than the increment
    return _metrics().layouts.labels(policy=policy, fallback=str(fallback).lower())


def observe_layout(decision: Decision, seconds: float) -> None:
    """A few microseconds per request (``bench/serving.py`` measures it, multiprocess files included)."""
    m = _metrics()
    _layout_counter(decision.policy, decision.fallback).inc()
    m.latency.observe(seconds)
    m.decide.observe(decision.elapsed_s)


def observe_feedback(accepted: int, duplicates: int) -> None:
    m = _metrics()
    if accepted:
        m.feedback.labels(status="accepted").inc(accepted)
    if duplicates:
        m.feedback.labels(status="duplicate").inc(duplicates)


# (name, help, labels, value) rows computed at scrape time from state the worker already holds
GaugeRows = list[tuple[str, str, dict[str, str], float]]
_gauge_providers: list[Callable[[], GaugeRows]] = []


def register_gauges(provider: Callable[[], GaugeRows]) -> None:
    """Add business gauges (exposure shares, prices, versions) to every exposition; the provider
    replaces any earlier one (one app per worker)."""
    _gauge_providers[:] = [provider]


def _gauge_text() -> bytes:
    rows: GaugeRows = []
    for provide in _gauge_providers:
        try:
            rows += provide()
        except Exception:  # a scrape never fails because a business gauge could not be computed
            continue
    lines: list[str] = []
    typed: set[str] = set()
    for name, help_text, labels, value in rows:
        if name not in typed:
            typed.add(name)
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        lines.append(f"{name}{{{lab}}} {value!r}" if lab else f"{name} {value!r}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(writer_stats: dict[str, Any] | None) -> tuple[bytes, str]:
    """The exposition text (all workers' metrics under gunicorn) plus this worker's log-writer gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

    _metrics()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        data = generate_latest(registry)
    else:
        data = generate_latest(REGISTRY)
    if writer_stats:
        pid = os.getpid()
        lines = []
        for key in ("submitted", "written", "spilled", "replayed", "queue_depth", "journaled", "unjournaled",
                    "refused", "dropped", "dropped_propensity"):
            if isinstance(writer_stats.get(key), int | float):
                lines.append(f"# TYPE homepage_log_{key} gauge")
                lines.append(f'homepage_log_{key}{{worker="{pid}"}} {writer_stats[key]}')
        healthy = writer_stats.get("healthy")
        if healthy is not None:
            lines.append("# TYPE homepage_log_healthy gauge")
            lines.append(f'homepage_log_healthy{{worker="{pid}"}} {1 if healthy else 0}')
        data += ("\n".join(lines) + "\n").encode()
    data += _gauge_text()
    return data, CONTENT_TYPE_LATEST
