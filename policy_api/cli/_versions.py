"""``homepage versions list|diff|rollback``: configs, plans and models (ranker, bandit) as versions.

A rollback never rewrites history: it publishes the old version's content as a new version, audited
(a config is dry-run again first, and an infeasible one is never applied).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from .. import jobs, registry
from ..errors import Conflict, InvalidInput, NotFound
from ._common import db_engine

__all__ = ["add_commands"]

KINDS = ("config", "plan", "ranker", "bandit")


def _when(d: Any) -> str:
    return "" if d is None else d.strftime("%Y-%m-%d %H:%M:%S")


def _fmt(v: Any) -> str:
    if v is None:
        return "(none)"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def cmd_list(args: argparse.Namespace) -> int:
    db = db_engine()
    kinds = KINDS if args.kind == "all" else (args.kind,)
    in_force = registry.latest_versions(db)
    for kind in kinds:
        if kind == "config":
            rows = registry.config_history(db, limit=args.limit)
            print(f"configs (active: {in_force.config})")
            print(f"  {'version':>7}  {'status':<10} {'created':<19}  {'author':<12} note")
            for c in rows:
                print(f"  {c.version:>7}  {c.status:<10} {_when(c.created_at):<19}  {c.author[:12]:<12} {c.note}")
            if not rows:
                print("  (none yet: `homepage config apply FILE` or `homepage serve --config FILE`)")
        elif kind == "plan":
            plans = registry.plan_history(db, limit=args.limit)
            print(f"plans (active: {in_force.plan})")
            print(f"  {'version':>7}  {'config':>6}  {'status':<10} {'created':<19}  prices")
            for p in plans:
                prices = ", ".join(f"{k}={v:.4g}" for k, v in p.prices.items())
                print(f"  {p.version:>7}  {_fmt(p.config_version):>6}  {p.status:<10} {_when(p.created_at):<19}  "
                      f"{prices}")
        else:
            models = registry.model_history(db, kind, limit=args.limit)
            print(f"{kind} models (served: {in_force.models.get(kind)})")
            print(f"  {'version':>7}  {'status':<10} {'created':<19}  note")
            for m in models:
                note = m.metrics.get("rollback_of")
                print(f"  {m.version:>7}  {m.status:<10} {_when(m.created_at):<19}  "
                      f"{'' if note is None else f'rollback to version {note}'}")
    return 0


def _version(raw: str, name: str) -> int:
    try:
        v = int(raw)
        if v < 1:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"{name} must be a version number (an integer >= 1); got {raw!r}", field=name) from None
    return v


def _plan(db: Engine, version: int) -> registry.PlanRecord:
    for p in registry.plan_history(db, limit=100_000):
        if p.version == version:
            return p
    raise NotFound(f"plan version must exist in the registry; got {version!r}", field="version")


def _model(db: Engine, name: str, version: int) -> registry.ModelRecord:
    m = registry.model(db, name, version)
    if m is None:
        raise NotFound(f"{name} version must be a published {name} in the registry; got {version!r} "
                       f"(`homepage versions list {name}`)", field="version")
    return m


def cmd_diff(args: argparse.Namespace) -> int:
    db = db_engine()
    a = _version(args.a, "A")
    changes: list[registry.Change]
    if args.kind == "config":
        old = registry.config_version(db, a)
        if Path(args.b).is_file():
            body, b_name = Path(args.b).read_text(encoding="utf-8"), args.b
            new_cfg = registry.parse_body(body).to_dict()
        else:
            rec = registry.config_version(db, _version(args.b, "B"))
            body, b_name, new_cfg = rec.body, f"config version {rec.version}", rec.config.to_dict()
        changes = registry.mapping_diff(old.config.to_dict(), new_cfg)
        text = registry.text_diff(old.body, body, f"config version {a}", b_name)
        if text and args.text:
            print(text, end="")
        if Path(args.b).is_file():
            print(f"# dry-run the proposed config's plan with `homepage config check {args.b}`")
    elif args.kind == "plan":
        p_old, p_new = _plan(db, a), _plan(db, _version(args.b, "B"))
        changes = registry.mapping_diff({"config_version": p_old.config_version, "prices": p_old.prices},
                                        {"config_version": p_new.config_version, "prices": p_new.prices})
    else:
        m_old, m_new = _model(db, args.kind, a), _model(db, args.kind, _version(args.b, "B"))
        changes = registry.mapping_diff(m_old.metrics, m_new.metrics)
    if not changes:
        print("no difference")
        return 0
    width = max(len(k) for k, _, _ in changes)
    for key, old_v, new_v in changes:
        print(f"{key:<{width}}  {_fmt(old_v)} -> {_fmt(new_v)}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    db = db_engine()
    v = _version(args.version, "VERSION")
    if args.kind == "config":
        old = registry.config_version(db, v)
        res = jobs.apply_config(db, old.body, author=args.author, note=args.note or f"rollback to version {v}",
                                users=args.users)
        print(f"config version {v} active again as version {res.version} (was {res.previous_version}); "
              f"plan version {res.plan_version}")
    elif args.kind == "plan":
        p = _plan(db, v)
        active = registry.require_active_config(db)
        if p.config_version != active.version:
            raise Conflict(f"plan version {v} was made for config version {p.config_version}, but config version "
                           f"{active.version} is active; roll back the config instead "
                           f"(`homepage versions rollback config {p.config_version}`)", field="version")
        new = registry.publish_plan(db, active.version, p.prices, projected=p.projected,
                                    solver={**(p.solver or {}), "source": f"rollback to plan version {v}",
                                            "rollback_of": v})
        print(f"plan version {v} active again as version {new} (the loop's pacing moves prices from there)")
    else:
        m = _model(db, args.kind, v)
        new = registry.publish_model(db, args.kind, {**m.metrics, "rollback_of": v}, m.artifact)
        print(f"{args.kind} version {v} served again as version {new}")
    print("serving workers swap it in within HOMEPAGE_RELOAD_S seconds")
    return 0


def add_commands(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    v = sub.add_parser("versions", help="list, diff and roll back config, plan and model versions")
    vs = v.add_subparsers(dest="versions_command", metavar="SUBCOMMAND", required=True)
    p = vs.add_parser("list", formatter_class=fmt, help="the newest versions of each kind, newest first")
    p.add_argument("kind", nargs="?", choices=("all", *KINDS), default="all", help="what to list")
    p.add_argument("--limit", type=int, default=20, help="versions per kind")
    p.set_defaults(func=cmd_list)
    p = vs.add_parser("diff", formatter_class=fmt,
                      help="what changed between two versions (for a config, B may be a TOML file)")
    p.add_argument("kind", choices=KINDS, help="what to compare")
    p.add_argument("a", metavar="A", help="the older version")
    p.add_argument("b", metavar="B", help="the newer version (config: or a TOML file)")
    p.add_argument("--text", action="store_true", help="config: also print the unified diff of the TOML text")
    p.set_defaults(func=cmd_diff)
    p = vs.add_parser("rollback", formatter_class=fmt,
                      help="publish an earlier version again as the newest (a config is dry-run first)")
    p.add_argument("kind", choices=KINDS, help="what to roll back")
    p.add_argument("version", metavar="VERSION", help="the version to go back to")
    p.add_argument("--author", default="cli", help="recorded in the config's audit row")
    p.add_argument("--note", default="", help="change note (default: rollback to version VERSION)")
    p.add_argument("--users", type=int, default=500, help="config: recent users to dry-run the plan on")
    p.set_defaults(func=cmd_rollback)
