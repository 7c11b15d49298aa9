"""Run the app under gunicorn (gthread workers; one engine, log writer and poller per worker)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication

from ._app import create_app

__all__ = ["prepare_metrics_dir", "run_gunicorn"]


def _worker_exit(server: Any, worker: Any) -> None:
    # flush this worker's log queue; what cannot be written goes to the spill file
    app = getattr(worker, "wsgi", None)
    rt = getattr(app, "extensions", {}).get("homepage") if app is not None else None
    if rt is not None:
        rt.close()


def _child_exit(server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


class _App(BaseApplication):  # type: ignore[misc]
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for k, v in self.options.items():
            self.cfg.set(k, v)

    def load(self) -> Flask:
        return create_app()  # in the worker, after the fork: its engine and threads are its own


def prepare_metrics_dir() -> Path:
    """A fresh ``$HOMEPAGE_DATA_DIR/prometheus`` for this server's processes (workers and the loop),
    set as ``PROMETHEUS_MULTIPROC_DIR`` so that ``/metrics`` aggregates them all."""
    prom = Path(os.environ.get("HOMEPAGE_DATA_DIR", "homepage-data")) / "prometheus"
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") != str(prom):
        shutil.rmtree(prom, ignore_errors=True)
        prom.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    return prom


def run_gunicorn(host: str, port: int, workers: int, threads: int = 1) -> int:
    """Serve until stopped (see :func:`prepare_metrics_dir` for the metrics)."""
    prepare_metrics_dir()
    _App({
        "bind": f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 30,
        "graceful_timeout": 10,
        "accesslog": None,
        "worker_exit": _worker_exit,
        "child_exit": _child_exit,
        "loglevel": "warning",
    }).run()
    return 0
