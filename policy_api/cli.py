"""``homepage``: one entry point for serving, data, learning, planning and replay.

Every command reads the database from ``DATABASE_URL`` (default ``sqlite:///homepage-data/homepage.db``)
and the config from ``--config``, else ``HOMEPAGE_CONFIG``, else ``./homepage.toml``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ._cli_common import CliError, config_arg, db_engine, db_url, load_cfg, redact

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


# ---- commands ------------------------------------------------------------------------------------
def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from ._db import upgrade

    upgrade(db_url())
    print(f"database at {redact(db_url())} is at the newest revision")
    return 0


def cmd_catalog_load(args: argparse.Namespace) -> int:
    from . import _store as store
    from ._catalog import CatalogError, read_catalog_csv

    _, cfg = load_cfg(args)
    try:
        cat = read_catalog_csv(args.file, cfg.category_names)
    except CatalogError as e:
        raise CliError(str(e)) from None
    db = db_engine()
    store.upsert_items(db, cat.rows())
    counts = {c: int((cat.category == c).sum()) for c in cfg.category_names}
    print(f"loaded {cat.n_items} items ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"features: {', '.join(cat.feature_names) or 'none'}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from ._runtime import ensure_config
    from ._serve import run_gunicorn

    path, _cfg = load_cfg(args)  # refuses to start on an invalid config
    db = db_engine()
    version, _ = ensure_config(db, path)
    print(f"config {path} active as version {version}; serving on http://{args.host}:{args.port} "
          f"with {args.workers} workers", flush=True)
    return run_gunicorn(args.host, args.port, args.workers, threads=args.threads)


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import DemoSettings, run_demo

    s = DemoSettings(n_users=args.users, n_items=args.items, requests=args.requests,
                     out_dir=Path(args.out), seed=args.seed, workers=args.workers,
                     concurrency=args.concurrency)
    summary = run_demo(s)
    print(f"report: {s.out_dir / 'report' / 'index.html'}")
    return 0 if summary.get("ok", True) else 1


# ---- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="homepage", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    db = sub.add_parser("db", help="database schema")
    dbs = db.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    up = dbs.add_parser("upgrade", help="apply the Alembic migrations to DATABASE_URL")
    up.set_defaults(func=cmd_db_upgrade)

    cat = sub.add_parser("catalog", help="the item catalog")
    cats = cat.add_subparsers(dest="catalog_command", metavar="SUBCOMMAND", required=True)
    ld = cats.add_parser("load", help="load items.csv (item_id,category,popularity[,numeric features...])")
    ld.add_argument("file", metavar="FILE")
    config_arg(ld)
    ld.set_defaults(func=cmd_catalog_load)
    from . import _jobs_plan

    _jobs_plan.add_catalog_commands(cats)

    sv = sub.add_parser("serve", help="serve the policy API with gunicorn (migrates the database first)")
    config_arg(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--workers", type=int, default=2)
    sv.add_argument("--threads", type=int, default=1,
                    help="request threads per worker (gthread); 1 is fastest for this CPU-bound work: scale with --workers")
    sv.set_defaults(func=cmd_serve)

    dm = sub.add_parser("demo", help="closed loop over real HTTP on a simulated world; writes a report")
    dm.add_argument("--users", type=int, default=2000)
    dm.add_argument("--items", type=int, default=3000)
    dm.add_argument("--requests", type=int, default=4000, help="layout requests per phase")
    dm.add_argument("--workers", type=int, default=2)
    dm.add_argument("--concurrency", type=int, default=8)
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--out", default="homepage-data", help="data folder (database, report)")
    dm.set_defaults(func=cmd_demo)

    _jobs_plan.add_commands(sub)
    from . import _jobs_bandit

    _jobs_bandit.add_commands(sub)
    from . import _jobs_train

    _jobs_train.add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"homepage: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
