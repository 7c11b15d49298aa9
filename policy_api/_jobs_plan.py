"""Allocator jobs: plan (LP / dual), pace (online dual descent), config check, valuation refit,
and refreshing the long-tail head from logged impressions.

All of them read the log and publish versions; serving workers pick the new versions up by polling.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from allocator import (
    Candidates,
    HomepageConfig,
    InfeasiblePlan,
    Plan,
    block_table,
    build_candidates,
    parse_config_text,
    plan_dual,
    plan_lp,
)

from . import _store as store
from ._cli_common import CliError, config_arg, db_engine, load_cfg
from ._engine import DecisionEngine, EngineState
from ._logdata import decision_log

__all__ = ["add_commands", "sample_users", "user_candidates", "solve_plan", "publish_plan", "plan_job",
           "pace_once", "LP_MAX_VARS", "exposure_report", "refit_valuation"]

#: above this many variables the exact LP (PuLP + HiGHS) gives way to the dual method
LP_MAX_VARS = 100_000


# ---- building the planning problem -------------------------------------------------------------
def sample_users(db: Any, *, since: datetime | None = None, n: int = 2000, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Users of recent traffic and their traffic weights.

    Draws ``n`` logged decisions uniformly (so users come in proportion to their traffic) and weighs
    each drawn decision 1/n; repeated users merge. With no traffic yet: one cold-start user.
    """
    cols = store.read_decisions(db, since=since, columns=["user_id"])
    users = np.asarray(cols["user_id"], dtype=object)
    if users.size == 0:
        return np.array(["<cold-start>"], dtype=object), np.ones(1)
    rng = np.random.default_rng(seed)
    drawn = users[rng.integers(0, users.size, size=min(n, users.size))]
    uniq, counts = np.unique(drawn.astype(str), return_counts=True)
    return uniq.astype(object), counts / counts.sum()


def user_candidates(state: EngineState, user_ids: np.ndarray, seed: int = 0) -> Candidates:
    """Candidate layouts of many users, as serving builds them (one shared candidate pool)."""
    eng = DecisionEngine(state)
    pool = eng.pool(state, np.random.default_rng(seed))
    sc = state.scorer
    u_idx = np.array([sc.user_idx(str(u)) for u in user_ids.tolist()], dtype=np.int64)
    U, P = u_idx.size, pool.size
    scores = sc.score_pairs(np.repeat(u_idx, P), np.tile(pool, U)).reshape(U, P)
    prefs = [sc.category_preferences(int(u)) for u in u_idx.tolist()]
    lead = None
    if prefs and prefs[0] is not None:
        pref_rows = [p for p in prefs if p is not None]  # a scorer gives them for every user or for none
        lead = np.argsort(-np.stack(pref_rows), axis=1, kind="stable")[:, : min(len(prefs[0]), 4)]
    tbl = block_table(state.space, scores, state.item_category[pool], state.is_tail[pool], state.tail[pool])
    return build_candidates(state.space, tbl, state.prices, lead_categories=lead)


def solve_plan(config: HomepageConfig, cand: Candidates, weight: np.ndarray, method: str = "auto") -> Plan:
    """Exact LP up to LP_MAX_VARS variables, the dual method beyond (or as asked)."""
    lo, hi = config.bounds()
    n_vars = int(cand.mask.sum())
    if method == "auto":
        method = "lp" if n_vars <= LP_MAX_VARS else "dual"
    solve = plan_lp if method == "lp" else plan_dual
    return solve(cand.value, cand.exposure, weight, lo, hi, cand.mask, names=config.constraint_names)


def plan_summary(config: HomepageConfig, plan: Plan) -> dict[str, Any]:
    return {
        "prices": dict(zip(config.constraint_names, map(float, plan.prices), strict=True)),
        "projected": {"value": float(plan.objective),
                      "shares": dict(zip(config.constraint_names, map(float, plan.shares), strict=True))},
        "solver": {"method": plan.method, "status": plan.status, "gap": float(plan.gap),
                   "violation": float(plan.violation), "n_vars": int(plan.n_vars),
                   "build_s": float(plan.build_s), "solve_s": float(plan.solve_s),
                   "iterations": int(plan.iterations)},
    }


def publish_plan(db: Any, config_version: int | None, summary: dict[str, Any], extra: dict[str, Any] | None = None
                 ) -> int:
    solver = dict(summary["solver"])
    solver.update(extra or {})
    return store.insert_plan(db, config_version, summary["prices"], projected=summary["projected"], solver=solver)


def _active(db: Any, args: argparse.Namespace | None = None) -> tuple[int, HomepageConfig]:
    """The active config (and its version). ``--config``, when given, must be the active one."""
    active = store.active_config(db)
    if args is not None and getattr(args, "config", None):
        path, cfg = load_cfg(args)
        body = path.read_text(encoding="utf-8")
        if active is None or active[1] != body:
            version = store.insert_config(db, body=body, author="cli", status="active", note=f"from {path}")
            return version, cfg
        return active[0], cfg
    if active is None:
        path, cfg = load_cfg(args or argparse.Namespace(config=None))
        version = store.insert_config(db, body=path.read_text(encoding="utf-8"), author="cli", status="active",
                                      note=f"from {path}")
        return version, cfg
    return active[0], parse_config_text(active[1], source=f"configs.version={active[0]}")


def _state_for(db: Any, config: HomepageConfig, config_version: int | None) -> EngineState:
    from ._runtime import load_state

    return load_state(db, config=config, config_version=config_version)


def print_plan(summary: dict[str, Any], config: HomepageConfig, title: str) -> None:
    print(title)
    print(f"  projected value per request: {summary['projected']['value']:.4f}")
    print(f"  {'constraint':<20} {'min':>7} {'max':>7} {'projected':>10} {'price':>9}")
    for c in config.constraints:
        print(f"  {c.name:<20} {_b(c.min):>7} {_b(c.max):>7} {summary['projected']['shares'][c.name]:>10.4f} "
              f"{summary['prices'][c.name]:>9.4f}")
    s = summary["solver"]
    print(f"  solver {s['method']} ({s['status']}): {s['n_vars']} variables, build {s['build_s']:.2f} s, "
          f"solve {s['solve_s']:.2f} s, gap {s['gap']:.2e}, violation {s['violation']:.2e}")


def _b(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# ---- pacing ------------------------------------------------------------------------------------
def pace_once(db: Any, *, window_s: float = 300.0, step_size: float = 2.0, min_decisions: int = 50,
              now: datetime | None = None) -> dict[str, Any] | None:
    """One pacing step: realised exposure of recent served decisions moves the active plan's prices
    (dual descent); publishes a new plan version for the same config. Returns what it did, or None
    when there is not enough traffic in the window."""
    from allocator import DualPacer, PacerConfig

    version, cfg = _active(db)
    now = now or datetime.now(tz=UTC)
    cols = store.read_decisions(db, since=now - timedelta(seconds=window_s),
                                columns=["request_id", "ts", "candidates", "pmf", "chosen", "propensity", "versions"])
    if len(cols["chosen"]) < min_decisions or not cfg.constraints:
        return None
    dlog = decision_log(cols, cfg)
    # only decisions made under this config: older ones carry other constraint sets
    same = np.array([v.get("config") == version for v in dlog.versions], dtype=bool)
    if same.sum() < min_decisions:
        return None
    realised = dlog.chosen_exposure[same]
    plan = store.latest_plan(db)
    lo, hi = cfg.bounds()
    start = np.zeros(len(cfg.constraints))
    state = None
    if plan is not None and plan.get("config_version") == version:
        start = np.array([float(plan["prices"].get(n, 0.0)) for n in cfg.constraint_names])
        state = (plan.get("solver") or {}).get("pacer")
    if state is not None and state.get("config", {}).get("names") == list(cfg.constraint_names):
        pacer = DualPacer.from_dict(state)
        pacer.floor_multipliers_ = np.maximum(start, 0.0)
        pacer.cap_multipliers_ = np.maximum(-start, 0.0)
        pacer.prices_ = start.copy()
    else:
        pacer = DualPacer(PacerConfig(lower=tuple(lo), upper=tuple(hi), step_size=step_size,
                                      max_price=50.0, names=cfg.constraint_names),
                          prices=np.where(np.isfinite(lo), np.maximum(start, 0), 0) - np.where(np.isfinite(hi), np.maximum(-start, 0), 0))
    new = pacer.update(realised)
    summary: dict[str, Any] = {
        "prices": dict(zip(cfg.constraint_names, map(float, new), strict=True)),
        "projected": (plan or {}).get("projected"),
        "solver": {"method": "pacer", "window_s": window_s, "n_decisions": int(same.sum()),
                   "realised": dict(zip(cfg.constraint_names, map(float, pacer.shares_), strict=True)),
                   "pacer": pacer.to_dict(), "base_plan": None if plan is None else plan["version"]},
    }
    v = store.insert_plan(db, version, summary["prices"], projected=summary["projected"], solver=summary["solver"])
    return {"plan_version": v, "prices": summary["prices"], "realised": summary["solver"]["realised"],
            "n_decisions": int(same.sum())}


# ---- exposure (GET /exposure and reports) --------------------------------------------------------
def exposure_report(db: Any, config: HomepageConfig, config_version: int | None, window_s: float) -> dict[str, Any]:
    since = datetime.now(tz=UTC) - timedelta(seconds=window_s)
    cols = store.read_decisions(db, since=since, columns=["request_id", "ts", "candidates", "pmf", "chosen",
                                                           "propensity", "versions"])
    dlog = decision_log(cols, config)
    same = np.array([v.get("config") == config_version for v in dlog.versions], dtype=bool)
    rows = []
    shares = dlog.chosen_exposure[same].mean(0) if same.any() else np.full(len(config.constraints), np.nan)
    for k, c in enumerate(config.constraints):
        s = float(shares[k])
        ok = None if np.isnan(s) else bool((c.min is None or s >= c.min) and (c.max is None or s <= c.max))
        rows.append({"name": c.name, "kind": c.kind, "min": c.min, "max": c.max,
                     "realised": None if np.isnan(s) else s, "holds": ok})
    return {"window_s": window_s, "decisions": int(same.sum()), "config_version": config_version,
            "constraints": rows}


# ---- valuation ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Refit:
    category: str
    configured: float
    units: float
    revenue: float
    raw: float | None
    shrunk: float
    weight: float


def refit_valuation(db: Any, config: HomepageConfig, prior_units: float = 500.0,
                    since: datetime | None = None) -> list[Refit]:
    """Money per engagement unit by category from revenue in the feedback log, shrunk to the config.

    ``shrunk_c = (R_c + kappa * v0_c) / (U_c + kappa)``: R_c revenue and U_c engagement units of the
    category's events, v0_c the configured value, kappa = ``prior_units`` (evidence, in units, that
    counts as much as the configured value). The weight on the data, ``U_c / (U_c + kappa)``, grows
    with evidence.
    """
    if prior_units <= 0:
        raise ValueError(f"prior_units must be > 0; got {prior_units!r}")
    fb = store.read_feedback(db, since=since, columns=["item_id", "type", "value"])
    items = store.load_items(db)
    ids = np.asarray(items["item_ids"], dtype=str)
    cats = np.asarray(items["category"], dtype=str)
    io = np.argsort(ids)
    f_items = np.asarray(fb["item_id"], dtype=str)
    pos = np.minimum(np.searchsorted(ids[io], f_items), max(ids.size - 1, 0))
    known = ids[io][pos] == f_items if ids.size else np.zeros(f_items.size, bool)
    f_cat = np.where(known, cats[io][pos], "")
    types = np.asarray(fb["type"], dtype=str)
    uniq, inv = np.unique(types, return_inverse=True)
    unit_of = np.array([float(config.events.get(t, 0.0)) if t != "impression" else 0.0 for t in uniq.tolist()])
    units = unit_of[inv] if types.size else np.zeros(0)
    rev = np.nan_to_num(np.asarray(fb["value"], dtype=np.float64), nan=0.0)  # NULL value = no revenue
    out = []
    for c in config.categories:
        m = f_cat == c.name
        U = float(units[m].sum())
        R = float(rev[m].sum())
        shrunk = (R + prior_units * c.value_per_engagement) / (max(U, 0.0) + prior_units)
        out.append(Refit(c.name, c.value_per_engagement, U, R, R / U if U > 0 else None, shrunk,
                         max(U, 0.0) / (max(U, 0.0) + prior_units)))
    return out


# ---- demo job ----------------------------------------------------------------------------------
def plan_job(phase: str, ctx: dict[str, Any]) -> dict[str, Any]:
    db = ctx["db"]
    version, cfg = _active(db)
    users, weight = sample_users(db, n=1500, seed=0)
    state = _state_for(db, cfg, version)
    t0 = time.perf_counter()
    cand = user_candidates(state, users)
    try:
        plan = solve_plan(cfg, cand, weight)
    except InfeasiblePlan as e:
        return {"title": "Plan", "infeasible": str(e.diagnosis)}
    summary = plan_summary(cfg, plan)
    v = publish_plan(db, version, summary, {"users": int(users.size)})
    return {"title": "Plan (LP prices for the exposure constraints)", "plan_version": v,
            "seconds": time.perf_counter() - t0, **summary, "wait_versions": {"plan": v}}


# ---- CLI ---------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    db = db_engine()
    version, cfg = _active(db, args)
    since = datetime.now(tz=UTC) - timedelta(hours=args.since_hours) if args.since_hours else None
    users, weight = sample_users(db, since=since, n=args.users, seed=args.seed)
    state = _state_for(db, cfg, version)
    cand = user_candidates(state, users, seed=args.seed)
    try:
        plan = solve_plan(cfg, cand, weight, args.method)
    except InfeasiblePlan as e:
        print(f"plan is infeasible for config version {version}; nothing published.\n{e.diagnosis}")
        return 3
    summary = plan_summary(cfg, plan)
    print_plan(summary, cfg, f"plan for config version {version} over {users.size} users "
                             f"({int(cand.mask.sum())} candidate layouts)")
    if args.dry_run:
        return 0
    v = publish_plan(db, version, summary, {"users": int(users.size)})
    print(f"published plan version {v}")
    return 0


def cmd_pace(args: argparse.Namespace) -> int:
    db = db_engine()
    while True:
        out = pace_once(db, window_s=args.window_s, step_size=args.step)
        if out is None:
            print(f"not enough traffic under the active config in the last {args.window_s:.0f} s; prices unchanged")
        else:
            print(json.dumps(out))
        if not args.follow:
            return 0
        time.sleep(args.every_s)


def dry_run(db: Any, cfg: HomepageConfig, version: int | None, users: np.ndarray, weight: np.ndarray
            ) -> dict[str, Any]:
    """Plan ``cfg`` on ``users`` without publishing; {'ok', 'summary' | 'diagnosis'}."""
    from dataclasses import replace

    state = _state_for(db, cfg, version)
    state = replace(state, prices=np.zeros(len(cfg.constraints)))  # a new config starts from zero prices
    cand = user_candidates(state, users)
    try:
        plan = solve_plan(cfg, cand, weight)
    except InfeasiblePlan as e:
        return {"ok": False, "diagnosis": str(e.diagnosis),
                "conflicting": list(e.diagnosis.conflicting),
                "relaxations": [str(r) for r in e.diagnosis.relaxations]}
    return {"ok": True, "summary": plan_summary(cfg, plan)}


def cmd_config_check(args: argparse.Namespace) -> int:
    from allocator import ConfigError, load_config

    try:
        new = load_config(args.file)
    except (FileNotFoundError, ConfigError) as e:
        print(f"{args.file}: invalid\n{e}")
        return 2
    for w in new.warnings:
        print(f"warning: {w}")
    db = db_engine()
    users, weight = sample_users(db, n=args.users, seed=0)
    active = store.active_config(db)
    new_res = dry_run(db, new, None, users, weight)
    cur_res = None
    if active is not None:
        cur = parse_config_text(active[1])
        cur_res = dry_run(db, cur, active[0], users, weight)
    print(f"dry run over {users.size} recent users")
    if active is not None and cur_res is not None and cur_res["ok"]:  # cur_res is set only with active
        print_plan(cur_res["summary"], cur, f"current config (version {active[0]})")
    if not new_res["ok"]:
        print(f"{args.file}: INFEASIBLE — it would not be applied\n{new_res['diagnosis']}")
        return 1
    print_plan(new_res["summary"], new, f"{args.file}")
    return 0


def cmd_valuation_refit(args: argparse.Namespace) -> int:
    db = db_engine()
    _, cfg = _active(db, args)
    rows = refit_valuation(db, cfg, prior_units=args.prior_units)
    print(f"{'category':<12} {'configured':>10} {'units':>10} {'revenue':>10} {'raw':>8} {'refit':>8} {'weight':>7}")
    for r in rows:
        raw = "-" if r.raw is None else f"{r.raw:.4f}"
        print(f"{r.category:<12} {r.configured:>10.4f} {r.units:>10.1f} {r.revenue:>10.2f} {raw:>8} "
              f"{r.shrunk:>8.4f} {r.weight:>7.3f}")
    if args.write:
        from dataclasses import replace

        from ._configio import config_to_toml

        cats = tuple(replace(c, value_per_engagement=round(r.shrunk, 6))
                     for c, r in zip(cfg.categories, rows, strict=True))
        with open(args.write, "w", encoding="utf-8") as fh:
            fh.write(config_to_toml(replace(cfg, categories=cats)))
        print(f"wrote {args.write}; check it with `homepage config check {args.write}`")
    return 0


def cmd_refresh_head(args: argparse.Namespace) -> int:
    """Popularity := impressions in the log over the window (items never shown: 0), so the head is
    what traffic actually sees."""
    db = db_engine()
    since = datetime.now(tz=UTC) - timedelta(days=args.days)
    fb = store.read_feedback(db, since=since, columns=["item_id", "type"])
    types = np.asarray(fb["type"], dtype=str)
    shown = np.asarray(fb["item_id"], dtype=str)[types == "impression"]
    items = store.load_items(db)
    ids = np.asarray(items["item_ids"], dtype=str)
    if shown.size < args.min_impressions:
        raise CliError(f"only {shown.size} impressions since {since:%Y-%m-%d}; need --min-impressions "
                       f"{args.min_impressions} to recompute the head")
    uniq, counts = np.unique(shown, return_counts=True)
    pos = np.searchsorted(uniq, ids)
    pos_c = np.minimum(pos, max(uniq.size - 1, 0))
    imp = np.where(uniq[pos_c] == ids, counts[pos_c], 0).astype(np.float64)
    pop = (1 - args.blend) * imp / imp.sum() + args.blend * items["popularity"] / max(items["popularity"].sum(), 1e-12)
    rows = [{"item_id": i, "category": c, "popularity": float(p), "features": list(map(float, f))}
            for i, c, p, f in zip(ids.tolist(), list(items["category"]), pop.tolist(), items["features"], strict=True)]
    store.upsert_items(db, rows)
    print(f"popularity of {ids.size} items recomputed from {shown.size} impressions since {since:%Y-%m-%d} "
          f"(blend with catalog popularity {args.blend})")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("plan", help="solve the exposure-constrained plan on recent users and publish its prices")
    config_arg(p)
    p.add_argument("--users", type=int, default=2000, help="users sampled from recent traffic")
    p.add_argument("--since-hours", type=float, default=24.0, help="traffic window (0 = all)")
    p.add_argument("--method", choices=("auto", "lp", "dual"), default="auto",
                   help=f"lp: PuLP+HiGHS (exact); dual: smoothed dual (large); auto: lp up to {LP_MAX_VARS} variables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the plan without publishing it")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("pace", help="online pacing: move the prices so realised exposure meets the targets")
    p.add_argument("--window-s", type=float, default=300.0, help="realised exposure over this window")
    p.add_argument("--step", type=float, default=2.0, help="price change per unit of share error")
    p.add_argument("--follow", action="store_true", help="keep pacing every --every-s seconds")
    p.add_argument("--every-s", type=float, default=30.0)
    p.set_defaults(func=cmd_pace)

    c = sub.add_parser("config", help="operator config")
    cs = c.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = cs.add_parser("check", help="validate a config and dry-run its plan next to the current one "
                                    "(exit 1 when infeasible, 2 when invalid)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--users", type=int, default=1000)
    p.set_defaults(func=cmd_config_check)

    v = sub.add_parser("valuation", help="category values")
    vs = v.add_subparsers(dest="valuation_command", metavar="SUBCOMMAND", required=True)
    p = vs.add_parser("refit", help="re-estimate money per engagement from revenue in the feedback log")
    config_arg(p)
    p.add_argument("--prior-units", type=float, default=500.0,
                   help="engagement units of evidence worth as much as the configured value")
    p.add_argument("--write", metavar="PATH", help="write a config with the refit values")
    p.set_defaults(func=cmd_valuation_refit)


def add_catalog_commands(cats: Any) -> None:
    p = cats.add_parser("refresh-head", help="recompute item popularity (and so the long-tail head) from "
                                             "logged impressions")
    p.add_argument("--days", type=float, default=7.0)
    p.add_argument("--blend", type=float, default=0.0, help="weight kept on the catalog's popularity")
    p.add_argument("--min-impressions", type=int, default=1000)
    p.set_defaults(func=cmd_refresh_head)
