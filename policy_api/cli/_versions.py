"""Configs, plans and models (ranker, bandit) as versions: ``homepage versions list|diff|rollback``
over every kind, and the same by kind: ``homepage config history|diff|rollback`` (``config apply`` is
beside ``config check``), ``homepage models list|show|rollback``, ``homepage plans list``.

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

__all__ = ["add_commands", "add_config_commands"]

MODEL_KINDS = ("ranker", "bandit")
KINDS = ("config", "plan", *MODEL_KINDS)


def _when(d: Any) -> str:
    return "" if d is None else d.strftime("%Y-%m-%d %H:%M:%S")


def _fmt(v: Any) -> str:
    if v is None:
        return "(none)"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def cmd_list(args: argparse.Namespace) -> int:
    """``versions list``; also ``config history``, ``plans list`` and ``models list`` (``args.kind``)."""
    db = db_engine()
    kinds = getattr(args, "all_kinds", KINDS) if args.kind == "all" else (args.kind,)
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


def cmd_show(args: argparse.Namespace) -> int:
    """``models show KIND VERSION``: one model version's record and metrics (published or rejected)."""
    db = db_engine()
    v = _version(args.version, "VERSION")
    found = [m for m in registry.model_history(db, args.kind, limit=100_000) if m.version == v]
    if not found:
        raise NotFound(f"VERSION must be a {args.kind} version in the registry; got {v!r} "
                       f"(`homepage models list {args.kind}`)", field="VERSION")
    m = found[0]
    served = registry.latest_versions(db).models.get(args.kind)
    published = registry.model(db, args.kind, v) if m.status == "published" else None
    size = None if published is None or published.artifact is None else len(published.artifact)
    print(f"{args.kind} version {m.version}")
    print(f"  status    {m.status}{' (served)' if served == m.version else ''}")
    print(f"  created   {_when(m.created_at)}")
    print(f"  artifact  {'(none)' if size is None else f'{size} bytes'}")
    flat = registry.flatten(m.metrics)
    print("  metrics" + ("" if flat else "   (none)"))
    width = max((len(k) for k in flat), default=0)
    for key in sorted(flat):
        print(f"    {key:<{width}}  {_fmt(flat[key])}")
    return 0


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


_FMT = argparse.ArgumentDefaultsHelpFormatter
_LIMIT_HELP = "versions per kind, newest first"


def _rollback_options(p: argparse.ArgumentParser, *, config: str | None) -> None:
    """VERSION, and with ``config`` (a help prefix) the options of a config rollback."""
    p.add_argument("version", metavar="VERSION", help="the version to go back to")
    if config is not None:
        p.add_argument("--author", default="cli", help=f"{config}recorded in the config's audit row")
        p.add_argument("--note", default="",  # "%(default)s" (empty) keeps the formatter from appending "(default: )"
                       help=f"{config}change note%(default)s (default: 'rollback to version VERSION')")
        p.add_argument("--users", type=int, default=500, help=f"{config}recent users to dry-run the plan on")


def add_config_commands(cs: Any) -> None:
    """``config history|diff|rollback`` on the ``config`` command's subparsers."""
    p = cs.add_parser("history", formatter_class=_FMT, help="the config versions, newest first, with their audit")
    p.add_argument("--limit", type=int, default=20, help=_LIMIT_HELP)
    p.set_defaults(func=cmd_list, kind="config")
    p = cs.add_parser("diff", formatter_class=_FMT,
                      help="the keys that differ between two config versions, or a version and a TOML file")
    p.add_argument("a", metavar="A", help="the older version")
    p.add_argument("b", metavar="B", help="the newer version, or a TOML file")
    p.add_argument("--text", action="store_true", help="also print the unified diff of the TOML text")
    p.set_defaults(func=cmd_diff, kind="config")
    p = cs.add_parser("rollback", formatter_class=_FMT,
                      help="make an earlier config version active again, as a new version (dry-run first; "
                           "an infeasible one is never applied)")
    _rollback_options(p, config="")
    p.set_defaults(func=cmd_rollback, kind="config")


def add_commands(sub: Any) -> None:
    v = sub.add_parser("versions", formatter_class=_FMT,
                       help="list, diff and roll back config, plan and model versions")
    vs = v.add_subparsers(dest="versions_command", metavar="SUBCOMMAND", required=True)
    p = vs.add_parser("list", formatter_class=_FMT, help="the newest versions of each kind, newest first")
    p.add_argument("kind", nargs="?", choices=("all", *KINDS), default="all", help="what to list")
    p.add_argument("--limit", type=int, default=20, help=_LIMIT_HELP)
    p.set_defaults(func=cmd_list)
    p = vs.add_parser("diff", formatter_class=_FMT,
                      help="what changed between two versions (for a config, B may be a TOML file)")
    p.add_argument("kind", choices=KINDS, help="what to compare")
    p.add_argument("a", metavar="A", help="the older version")
    p.add_argument("b", metavar="B", help="the newer version (config: or a TOML file)")
    p.add_argument("--text", action="store_true", help="config: also print the unified diff of the TOML text")
    p.set_defaults(func=cmd_diff)
    p = vs.add_parser("rollback", formatter_class=_FMT,
                      help="publish an earlier version again as the newest (a config is dry-run first)")
    p.add_argument("kind", choices=KINDS, help="what to roll back")
    _rollback_options(p, config="config: ")
    p.set_defaults(func=cmd_rollback)

    m = sub.add_parser("models", formatter_class=_FMT, help="list, show and roll back ranker and bandit versions")
    ms = m.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    p = ms.add_parser("list", formatter_class=_FMT, help="model versions (published and rejected), newest first")
    p.add_argument("kind", nargs="?", choices=("all", *MODEL_KINDS), default="all", help="which models")
    p.add_argument("--limit", type=int, default=20, help=_LIMIT_HELP)
    p.set_defaults(func=cmd_list, all_kinds=MODEL_KINDS)
    p = ms.add_parser("show", formatter_class=_FMT, help="one model version: status, artifact size and metrics")
    p.add_argument("kind", choices=MODEL_KINDS, help="which model")
    p.add_argument("version", metavar="VERSION", help="its version")
    p.set_defaults(func=cmd_show)
    p = ms.add_parser("diff", formatter_class=_FMT, help="the metrics that differ between two versions")
    p.add_argument("kind", choices=MODEL_KINDS, help="which model")
    p.add_argument("a", metavar="A", help="the older version")
    p.add_argument("b", metavar="B", help="the newer version")
    p.set_defaults(func=cmd_diff, text=False)
    p = ms.add_parser("rollback", formatter_class=_FMT,
                      help="serve an earlier published version again, published as the newest version")
    p.add_argument("kind", choices=MODEL_KINDS, help="which model")
    _rollback_options(p, config=None)
    p.set_defaults(func=cmd_rollback)

    pl = sub.add_parser("plans", formatter_class=_FMT, help="list the published plans (prices per constraint)")
    ps = pl.add_subparsers(dest="plans_command", metavar="SUBCOMMAND", required=True)
    p = ps.add_parser("list", formatter_class=_FMT, help="plan versions, newest first: config version and prices")
    p.add_argument("--limit", type=int, default=20, help=_LIMIT_HELP)
    p.set_defaults(func=cmd_list, kind="plan")
