"""``homepage serve`` and ``homepage demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import registry
from ..demo import DemoSettings, run_demo
from ..serving import run_gunicorn
from ._common import config_arg, db_engine, load_cfg

__all__ = ["add_commands"]


def cmd_serve(args: argparse.Namespace) -> int:
    path, _cfg = load_cfg(args)  # refuses to start on an invalid config
    db = db_engine()
    body = path.read_text(encoding="utf-8")
    active = registry.active_config(db)
    if active is not None and active.body == body:
        version = active.version
    else:
        version = registry.activate_config(db, body, author="serve", note=f"loaded from {path}")
    print(f"config {path} active as version {version}; serving on http://{args.host}:{args.port} "
          f"with {args.workers} workers", flush=True)
    return run_gunicorn(args.host, args.port, args.workers, threads=args.threads)


def cmd_demo(args: argparse.Namespace) -> int:
    s = DemoSettings(n_users=args.users, n_items=args.items, requests=args.requests, out_dir=Path(args.out),
                     seed=args.seed, workers=args.workers, concurrency=args.concurrency)
    summary = run_demo(s)
    print(f"report: {s.out_dir / 'report' / 'index.html'}")
    return 0 if summary.get("ok", True) else 1


def add_commands(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sv = sub.add_parser("serve", formatter_class=fmt,
                        help="serve the policy API with gunicorn (migrates the database and makes --config "
                             "the active config first)")
    config_arg(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind")
    sv.add_argument("--port", type=int, default=8000, help="port to bind")
    sv.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    sv.add_argument("--threads", type=int, default=1,
                    help="request threads per worker (gthread); 1 is fastest for this CPU-bound work: scale with "
                         "--workers")
    sv.set_defaults(func=cmd_serve)

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
