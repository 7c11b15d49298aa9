"""``homepage serve`` and ``homepage demo``."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import registry
from ._common import config_arg, db_engine, load_cfg

__all__ = ["add_commands"]


class _Supervisor:
    """Runs ``homepage worker`` (the loop) beside the request workers and restarts it if it dies."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="homepage-loop-supervisor", daemon=True)

    def start(self) -> _Supervisor:
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, HOMEPAGE_LOOP_PARENT=str(os.getpid()))  # the loop ends with its server
        return subprocess.Popen([sys.executable, "-m", "policy_api.cli", "worker"], env=env)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            self.proc = self._spawn()
            started = time.monotonic()
            while self.proc.poll() is None and not self._stop.wait(0.5):
                pass
            if self._stop.is_set():
                break
            print(f"homepage: the loop exited with status {self.proc.returncode}; restarting", file=sys.stderr,
                  flush=True)
            backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, 30.0)
            self._stop.wait(backoff)

    def stop(self) -> None:
        self._stop.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def cmd_worker(args: argparse.Namespace) -> int:
    from ..loop import BackgroundLoop  # each command imports what it runs: the others start faster

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.environ.get("HOMEPAGE_LOOP_PARENT")
    if parent:  # started by `homepage serve`: stop when it is gone (even after a kill -9 of the server)
        def watch() -> None:
            while not stop.wait(1.0):
                if str(os.getppid()) != parent:
                    stop.set()

        threading.Thread(target=watch, name="homepage-parent-watch", daemon=True).start()
    loop = BackgroundLoop(db_engine())
    gc.freeze()  # the imports' objects: out of every full collection (see serving._gunicorn's workers)
    print("homepage worker: running the loop (standby while another process holds its lease)", flush=True)
    loop.run(stop)
    if loop.training:  # a ranker still training when told to stop: its work is dropped, not published
        os._exit(0)
    return 0


def _apply_in_child(path: Path, note: str) -> int:
    """``homepage config apply`` in a child process: validated, dry-run (an infeasible config is never
    applied) and audited; the solver's native threads never exist in the process gunicorn forks."""
    done = subprocess.run([sys.executable, "-m", "policy_api.cli", "config", "apply", str(path), "--author",
                           "serve", "--note", note], env=dict(os.environ))
    return done.returncode


def cmd_serve(args: argparse.Namespace) -> int:
    from ..serving import prepare_metrics_dir, run_gunicorn

    db = db_engine()
    active = registry.active_config(db)
    given = args.config or os.environ.get("HOMEPAGE_CONFIG")
    if active is not None and not given and not Path("homepage.toml").is_file():
        path, cfg, version = None, active.config, active.version  # serve what is active
    else:
        path, cfg = load_cfg(args)  # refuses to start on an invalid config
        body = path.read_text(encoding="utf-8")
        if active is None or (args.activate and active.body != body):
            # activation is explicit (first start, or --activate), audited, and dry-run first
            note = f"homepage serve {'--activate ' if active is not None else ''}--config {path}"
            rc = _apply_in_child(path, note)
            if rc != 0:
                print(f"homepage serve: {path} was not activated (exit {rc}); not serving", file=sys.stderr,
                      flush=True)
                return rc
            active = registry.require_active_config(db)
        elif active.body != body:
            # a restart keeps what is active (perhaps applied by PUT /config): never revert it silently
            print(f"homepage serve: {path} differs from the active config version {active.version} "
                  f"(by {active.author}: {active.note!r}); serving version {active.version}. To make "
                  f"{path} active, run `homepage config apply {path}` or `homepage serve --activate`.",
                  file=sys.stderr, flush=True)
        cfg, version = active.config, active.version
    prepare_metrics_dir()
    loop = None
    if not args.no_loop:
        # constraints hold from the first request: plan before serving when the config has no plan yet
        # (in a child process: the solver's native thread pool must not exist in the process gunicorn forks)
        if registry.latest_plan(db, version) is None:
            done = subprocess.run([sys.executable, "-m", "policy_api.cli", "plan", "--users", str(cfg.loop.plan_users)],
                                  env=dict(os.environ))
            if done.returncode != 0:
                return done.returncode
        loop = _Supervisor().start()
    print(f"config version {version} active; serving on http://{args.host}:{args.port} "
          f"with {args.workers} workers{'' if loop else ' (no loop)'}", flush=True)
    try:
        return run_gunicorn(args.host, args.port, args.workers, threads=args.threads)
    finally:
        if loop is not None:
            loop.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import DemoSettings, run_demo, summary_lines

    s = DemoSettings(n_users=args.users, n_items=args.items, requests=args.requests, out_dir=Path(args.out),
                     seed=args.seed, workers=args.workers, concurrency=args.concurrency)
    summary = run_demo(s)
    print("\n".join(summary_lines(summary, s.out_dir / "report" / "index.html")))
    return 0 if summary.get("ok", True) else 1


def add_commands(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sv = sub.add_parser("serve", formatter_class=fmt,
                        help="serve the policy API with gunicorn (migrates the database; activates --config "
                             "on a database with no active config, and otherwise keeps the active one)")
    config_arg(sv)
    sv.add_argument("--activate", action="store_true",
                    help="make --config the active config even when another one is active (validated, "
                         "dry-run and audited like `homepage config apply`; an infeasible config never "
                         "starts serving)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind")
    sv.add_argument("--port", type=int, default=8000, help="port to bind")
    sv.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    sv.add_argument("--threads", type=int, default=1,
                    help="request threads per worker (gthread); 1 is fastest for this CPU-bound work: scale with "
                         "--workers")
    sv.add_argument("--no-loop", action="store_true",
                    help="do not run the background loop (plan, pace, learn, retrain, live state) beside the "
                         "workers; run `homepage worker` elsewhere, or the jobs by hand")
    sv.set_defaults(func=cmd_serve)

    wk = sub.add_parser("worker", formatter_class=fmt,
                        help="run the background loop on its own (one is active per database; others wait as "
                             "standby): plan, pace, learn the bandit, retrain rankers, keep the live user state")
    wk.set_defaults(func=cmd_worker)

    dm = sub.add_parser("demo", formatter_class=fmt,
                        help="closed loop over real HTTP on a simulated world; writes a report")
    dm.add_argument("--users", type=int, default=2000, help="simulated users")
    dm.add_argument("--items", type=int, default=3000, help="simulated catalog size")
    dm.add_argument("--requests", type=int, default=4000, help="layout requests per phase")
    dm.add_argument("--workers", type=int, default=2, help="gunicorn workers of the demo's server")
    dm.add_argument("--concurrency", type=int, default=8, help="client threads")
    dm.add_argument("--seed", type=int, default=0, help="seed of the simulated world and its users")
    dm.add_argument("--out", default="homepage-data", help="data folder (database, report)")
    dm.set_defaults(func=cmd_demo)
