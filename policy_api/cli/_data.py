"""``homepage db``, ``catalog``, ``import`` and ``log export``: getting data in and out."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .. import jobs
from ..log import read_catalog_csv, upgrade, upsert_items
from ..settings import database_url
from ._common import config_arg, db_engine, load_cfg, parse_time, redact

__all__ = ["add_commands"]


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    upgrade(database_url())
    print(f"database at {redact(database_url())} is at the newest revision")
    return 0


def cmd_catalog_load(args: argparse.Namespace) -> int:
    _, cfg = load_cfg(args)
    cat = read_catalog_csv(args.file, cfg.category_names)
    upsert_items(db_engine(), cat.rows())
    counts = {c: int((cat.category == c).sum()) for c in cfg.category_names}
    print(f"loaded {cat.n_items} items ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
          f"features: {', '.join(cat.feature_names) or 'none'}")
    return 0


def cmd_refresh_head(args: argparse.Namespace) -> int:
    res = jobs.refresh_head(db_engine(), days=args.days, blend=args.blend, min_impressions=args.min_impressions)
    print(f"popularity of {res.items} items recomputed from {res.impressions} impressions since "
          f"{res.since:%Y-%m-%d} (blend with catalog popularity {res.blend})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    bar = tqdm(desc="import", unit="row") if sys.stderr.isatty() else None

    def progress(rows: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(rows)

    try:
        res = jobs.import_file(db_engine(), args.file, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(f"imported {res.events} interactions of {res.users} users as {res.decisions} log entries "
          f"({', '.join(f'{k} {v}' for k, v in res.by_event.items())})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    db = db_engine()
    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    out = Path(args.out)
    if args.format == "parquet":
        n, version = jobs.export_parquet_with_rewards(db, out, since, until)
        print(f"wrote {n} decisions to {out}" + ("" if version is None else
              f" (reward and named exposure under config version {version}, for its decisions)"))
    else:
        n = jobs.export_dsjson(db, out, since, until)
        print(f"wrote {n} DSJSON decisions to {out}")
    return 0


def add_commands(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    db = sub.add_parser("db", help="database schema")
    dbs = db.add_subparsers(dest="db_command", metavar="SUBCOMMAND", required=True)
    up = dbs.add_parser("upgrade", formatter_class=fmt, help="apply the Alembic migrations to DATABASE_URL")
    up.set_defaults(func=cmd_db_upgrade)

    cat = sub.add_parser("catalog", help="the item catalog")
    cats = cat.add_subparsers(dest="catalog_command", metavar="SUBCOMMAND", required=True)
    ld = cats.add_parser("load", formatter_class=fmt, help="load items.csv (item_id,category,popularity[,numeric features...]); "
                                      "categories are checked against --config")
    ld.add_argument("file", metavar="FILE", help="the catalog CSV")
    config_arg(ld)
    ld.set_defaults(func=cmd_catalog_load)
    p = cats.add_parser("refresh-head", formatter_class=fmt, help="recompute item popularity (and so the long-tail head) from "
                                             "logged impressions")
    p.add_argument("--days", type=float, default=7.0, help="impressions over this many days")
    p.add_argument("--blend", type=float, default=0.0, help="weight kept on the catalog's popularity, in [0, 1]")
    p.add_argument("--min-impressions", type=int, default=1000, help="refuse with fewer impressions")
    p.set_defaults(func=cmd_refresh_head)

    p = sub.add_parser("import", formatter_class=fmt, help="warm-start from history: interactions.csv "
                                      "(user_id,item_id,event,timestamp[,value])")
    p.add_argument("file", metavar="FILE", help="the interactions CSV")
    p.set_defaults(func=cmd_import)

    lg = sub.add_parser("log", help="the decision log")
    ls = lg.add_subparsers(dest="log_command", metavar="SUBCOMMAND", required=True)
    p = ls.add_parser("export", formatter_class=fmt, help="export decisions (and their feedback) to Parquet or Vowpal Wabbit DSJSON")
    p.add_argument("--format", choices=("parquet", "dsjson"), default="parquet",
                   help="parquet: one row per decision with its reward; dsjson: Vowpal Wabbit's decision-service lines")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (required)%(default).0s")
    p.add_argument("--since", help="ISO time (inclusive); none: from the first decision")
    p.add_argument("--until", help="ISO time (exclusive); none: up to now")
    p.set_defaults(func=cmd_export)
