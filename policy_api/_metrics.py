"""Prometheus metrics. Under gunicorn, ``homepage serve`` sets PROMETHEUS_MULTIPROC_DIR so every
worker's counters are aggregated in one exposition."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

__all__ = ["observe_layout", "observe_feedback", "render"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LAYOUTS = Counter("homepage_layout_requests", "Layout decisions served", ["policy", "fallback"])
LATENCY = Histogram("homepage_layout_seconds", "GET /layout handling time", buckets=_LATENCY_BUCKETS)
DECIDE = Histogram("homepage_decision_seconds", "Engine decision time", buckets=_LATENCY_BUCKETS)
FEEDBACK = Counter("homepage_feedback_events", "Feedback events received", ["status"])


def observe_layout(decision: Any, seconds: float) -> None:
    LAYOUTS.labels(policy=decision.policy, fallback=str(decision.fallback).lower()).inc()
    LATENCY.observe(seconds)
    DECIDE.observe(decision.elapsed_s)


def observe_feedback(accepted: int, duplicates: int) -> None:
    if accepted:
        FEEDBACK.labels(status="accepted").inc(accepted)
    if duplicates:
        FEEDBACK.labels(status="duplicate").inc(duplicates)


def render(writer_stats: dict[str, Any] | None) -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        data = generate_latest(registry)
    else:
        from prometheus_client import REGISTRY

        data = generate_latest(REGISTRY)
    if writer_stats:
        pid = os.getpid()
        lines = []
        for key in ("submitted", "written", "spilled", "replayed", "queue_depth"):
            if isinstance(writer_stats.get(key), int | float):
                lines.append(f"# TYPE homepage_log_{key} gauge")
                lines.append(f'homepage_log_{key}{{worker="{pid}"}} {writer_stats[key]}')
        healthy = writer_stats.get("healthy")
        if healthy is not None:
            lines.append("# TYPE homepage_log_healthy gauge")
            lines.append(f'homepage_log_healthy{{worker="{pid}"}} {1 if healthy else 0}')
        data += ("\n".join(lines) + "\n").encode()
    return data, CONTENT_TYPE_LATEST
