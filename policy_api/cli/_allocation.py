"""``homepage plan``, ``pace``, ``config …`` and ``valuation refit``: the operator's allocation tools."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from allocator import LP_MAX_VARS, PLAN_METHODS, HomepageConfig

from .. import jobs, registry
from ..errors import Infeasible, InvalidConfig, NotFound
from ..jobs import PlanResult
from . import _versions
from ._common import active_config, config_arg, db_engine, load_cfg

__all__ = ["add_commands"]


def print_plan(res: PlanResult, config: HomepageConfig, title: str) -> None:
    print(title)
    print(f"  projected value per request: {res.value:.4f} (config value units per layout served)")
    print(f"  {'constraint':<20} {'min':>7} {'max':>7} {'projected':>10} {'price':>9}")
    for c in config.constraints:
        print(f"  {c.name:<20} {_b(c.min):>7} {_b(c.max):>7} {res.shares[c.name]:>10.4f} {res.prices[c.name]:>9.4f}")
    s = res.solver
    print(f"  solver {s['method']} ({s['status']}): {s['n_vars']} variables, build {s['build_s']:.2f} s, "
          f"solve {s['solve_s']:.2f} s, gap {s['gap']:.2e}, violation {s['violation']:.2e}")


def _b(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def cmd_plan(args: argparse.Namespace) -> int:
    db = db_engine()
    cfg = active_config(db, args)
    since = datetime.now(tz=UTC) - timedelta(hours=args.since_hours) if args.since_hours else None
    try:
        res = jobs.plan(db, users=args.users, since=since, method=args.method, seed=args.seed,
                        publish=not args.dry_run, engine=args.engine, workers=args.workers)
    except Infeasible as e:
        print(f"plan is infeasible for config version {cfg.version}; nothing published.\n{e.message}")
        return e.exit_status
    print_plan(res, cfg.config, f"plan for config version {cfg.version} over {res.users} users "
                                f"({res.candidates} candidate layouts)")
    if res.plan_version is not None:
        print(f"published plan version {res.plan_version}")
    return 0


def cmd_pace(args: argparse.Namespace) -> int:
    db = db_engine()
    while True:
        out = jobs.pace(db, window_s=args.window_s, step_size=args.step)
        if out is None:
            print(f"not enough traffic under the active config in the last {args.window_s:.0f} s; prices unchanged")
        else:
            print(json.dumps(asdict(out)))
        if not args.follow:
            return 0
        time.sleep(args.every_s)


def cmd_config_check(args: argparse.Namespace) -> int:
    try:
        _, new = load_cfg(argparse.Namespace(config=args.file))
    except (NotFound, InvalidConfig) as e:
        print(f"{args.file}: invalid\n{e.message}")
        return 2
    for w in new.warnings:
        print(f"warning: {w}")
    db = db_engine()
    try:
        check = jobs.check_config(db, new, users=args.users)
    except Infeasible as e:
        print(f"{args.file}: INFEASIBLE — it would not be applied\n{e.message}")
        return 1
    print(f"dry run over {check.users} recent users")
    active = registry.active_config(db)
    if check.current is not None and active is not None:
        print_plan(check.current, active.config, f"current config (version {active.version})")
    print_plan(check.proposed, new, f"{args.file}")
    return 0


def cmd_config_apply(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise NotFound(f"config file not found: {str(path)!r}", field="file")
    res = jobs.apply_config(db_engine(), path.read_text(encoding="utf-8"), author=args.author,
                            note=args.note or f"homepage config apply {path}", users=args.users)
    for w in res.warnings:
        print(f"warning: {w}")
    print(f"config {path} active as version {res.version} (was {res.previous_version}); "
          f"plan version {res.plan_version}, projected value per request {res.plan.value:.4f}")
    return 0


def cmd_valuation_refit(args: argparse.Namespace) -> int:
    db = db_engine()
    cfg = active_config(db, args).config
    rows = jobs.refit_valuation(db, cfg, prior_units=args.prior_units)
    print(f"{'category':<12} {'configured':>10} {'units':>10} {'revenue':>10} {'raw':>8} {'refit':>8} {'weight':>7}")
    for r in rows:
        raw = "-" if r.raw is None else f"{r.raw:.4f}"
        print(f"{r.category:<12} {r.configured:>10.4f} {r.units:>10.1f} {r.revenue:>10.2f} {raw:>8} "
              f"{r.shrunk:>8.4f} {r.weight:>7.3f}")
    if args.write:
        Path(args.write).write_text(jobs.with_values(cfg, rows), encoding="utf-8")
        print(f"wrote {args.write}; check it with `homepage config check {args.write}`")
    return 0


def add_commands(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("plan", formatter_class=fmt,
                       help="solve the exposure-constrained plan of the active config on recent users and "
                            "publish its prices")
    config_arg(p)
    p.add_argument("--users", type=int, default=2000, help="users sampled from recent traffic")
    p.add_argument("--since-hours", type=float, default=24.0, help="traffic window (0 = all)")
    p.add_argument("--method", choices=PLAN_METHODS, default="auto",
                   help=f"lp: PuLP+HiGHS (exact); dual: smoothed dual (large); auto: lp up to {LP_MAX_VARS} variables")
    p.add_argument("--seed", type=int, default=0, help="seed of the user sample and the candidate pool")
    p.add_argument("--dry-run", action="store_true", help="print the plan without publishing it")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: user shards in Ray actors (the 'ray' extra; the sharded dual)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (and shards); default: the cluster's CPUs")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pace", formatter_class=fmt,
                       help="online pacing: move the prices so realised exposure meets the targets")
    p.add_argument("--window-s", type=float, default=300.0, help="realised exposure over this window")
    p.add_argument("--step", type=float, default=2.0, help="price change per unit of share error")
    p.add_argument("--follow", action="store_true", help="keep pacing every --every-s seconds")
    p.add_argument("--every-s", type=float, default=30.0, help="seconds between steps with --follow")
    p.set_defaults(func=cmd_pace)

    c = sub.add_parser("config", formatter_class=fmt,
                       help="operator config: check, apply, and its versions (history, diff, rollback)")
    cs = c.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = cs.add_parser("check", formatter_class=fmt,
                      help="validate a config and dry-run its plan next to the current one "
                           "(exit 1 when infeasible, 2 when invalid); changes nothing")
    p.add_argument("file", metavar="FILE", help="the proposed config (TOML)")
    p.add_argument("--users", type=int, default=1000, help="recent users to dry-run on")
    p.set_defaults(func=cmd_config_check)
    p = cs.add_parser("apply", formatter_class=fmt,
                      help="validate, dry-run and make FILE the active config with its plan (audited; an "
                           "infeasible config is never applied, exit 3)")
    p.add_argument("file", metavar="FILE", help="the config to apply (TOML)")
    p.add_argument("--author", default="cli", help="recorded in the config's audit row")
    p.add_argument("--note", default="",  # "%(default)s" (empty) keeps the formatter from adding "(default: )"
                   help="change note recorded with the config%(default)s (default: 'homepage config apply FILE')")
    p.add_argument("--users", type=int, default=500, help="recent users to plan on")
    p.set_defaults(func=cmd_config_apply)
    _versions.add_config_commands(cs)

    v = sub.add_parser("valuation", formatter_class=fmt, help="category values")
    vs = v.add_subparsers(dest="valuation_command", metavar="SUBCOMMAND", required=True)
    p = vs.add_parser("refit", formatter_class=fmt,
                      help="re-estimate money per engagement from revenue in the feedback log")
    config_arg(p)
    p.add_argument("--prior-units", type=float, default=500.0,
                   help="engagement units of evidence worth as much as the configured value")
    p.add_argument("--write", metavar="PATH", help="write a config with the refit values")
    p.set_defaults(func=cmd_valuation_refit)
