"""Bandit jobs: learn (join rewards in the window, Lagrangian cost, publish a VW model), replay
(off-policy estimates of another policy or config on the logged candidates, with a report), and
log export (Parquet, DSJSON)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from allocator import HomepageConfig, parse_config_text

from . import _store as store
from ._cli_common import CliError, config_arg, db_engine
from ._features import layout_features
from ._logdata import DecisionLog, Rewards, decision_log, join_rewards

__all__ = ["add_commands", "learn_once", "replay", "ReplayResult", "target_distribution", "load_log",
           "new_bandit"]

_DECISION_COLS = ["request_id", "ts", "user_id", "policy", "context", "versions", "candidates", "pmf", "chosen",
                  "propensity", "layout"]


def _parse_ts(s: str | None, name: str = "time") -> datetime | None:
    if s is None:
        return None
    try:
        t = datetime.fromisoformat(s)
    except ValueError:
        raise CliError(f"{name} must be an ISO 8601 time (e.g. 2026-11-22T08:00:00+00:00); got {s!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _active_config(db: Any) -> tuple[int, HomepageConfig]:
    active = store.active_config(db)
    if active is None:
        raise CliError("no active config in the database; start the server with --config or run `homepage plan`")
    return active[0], parse_config_text(active[1], source=f"configs.version={active[0]}")


def _prices(db: Any, cfg: HomepageConfig, version: int) -> np.ndarray:
    plan = store.latest_plan(db)
    if plan is None or plan.get("config_version") != version:
        return np.zeros(len(cfg.constraints))
    return np.array([float(plan["prices"].get(n, 0.0)) for n in cfg.constraint_names])


def _catalog_categories(db: Any) -> tuple[np.ndarray, np.ndarray]:
    items = store.load_items(db)
    return np.asarray(items["item_ids"], dtype=str), np.asarray(items["category"], dtype=str)


_LEARN_COLS = ["request_id", "ts", "context", "versions", "candidates", "pmf", "chosen", "propensity"]


def load_log(db: Any, cfg: HomepageConfig, since: datetime | None, until: datetime | None,
             config_version: int | None = None, columns: list[str] | None = None) -> tuple[DecisionLog, Rewards]:
    """Decisions in [since, until) made under ``config_version`` (all if None) and their rewards.

    ``columns`` (kept for callers) only matters for what the reference reader would fetch; the log is
    read through :func:`read_decision_log` (bulk JSON parsing in Arrow). Module ids per candidate come
    along unless only the learner's columns are asked for."""
    from ._logread import read_decision_log

    dlog = read_decision_log(db, cfg, since, until, config_version, with_modules=columns != _LEARN_COLS)
    # impressions carry no units: fetch behaviour events only, and which decisions saw any event
    fb = store.read_feedback(db, since=since, columns=["request_id", "item_id", "type", "ts"],
                             exclude_types=("impression",))
    seen = store.feedback_first_seen(db, since=since)
    ids, cats = _catalog_categories(db)
    return dlog, join_rewards(dlog, fb, cfg, ids, cats, first_seen=seen)


def log_features(dlog: DecisionLog, cfg: HomepageConfig) -> tuple[np.ndarray, np.ndarray]:
    """(shared (n, d_s), actions (n, L, d_a)) as serving built them."""
    actions = layout_features(dlog.categories, dlog.tilt, dlog.value, dlog.score, len(cfg.categories), dlog.mask)
    return dlog.shared, actions


def new_bandit(cfg: HomepageConfig) -> Any:
    from bandits import VWLayoutBandit

    algo = cfg.exploration.algorithm
    return VWLayoutBandit(algo if algo != "epsilon" else "epsilon", epsilon=max(cfg.exploration.budget, 1e-3), seed=0)


# ---- learn -------------------------------------------------------------------------------------
def learn_once(db: Any, *, until: datetime | None = None, min_decisions: int = 100) -> dict[str, Any] | None:
    """Learn from decisions whose reward window has closed and that the newest model has not seen;
    publish the next bandit version. Returns what it did, or None when there was nothing to learn."""
    from bandits import VWLayoutBandit

    version, cfg = _active_config(db)
    now = until or datetime.now(tz=UTC)
    closed = now - timedelta(seconds=cfg.learning.reward_window_s)
    latest = store.latest_model(db, "bandit")
    since = None
    bandit = None
    if latest is not None:
        metrics = latest[1] or {}
        if metrics.get("config_version") == version and latest[2] is not None:
            bandit = VWLayoutBandit.load(latest[2])
            since = _parse_ts(metrics.get("learned_until"))
    t0 = time.perf_counter()
    dlog, rw = load_log(db, cfg, since, closed, config_version=version, columns=_LEARN_COLS)
    if len(dlog) < min_decisions:
        return None
    bandit = bandit or new_bandit(cfg)
    prices = _prices(db, cfg, version)
    cost = -(rw.reward + dlog.chosen_exposure @ prices)
    shared, actions = log_features(dlog, cfg)
    bandit.learn_batch(shared, actions, dlog.action, cost, dlog.pscore, dlog.n_cand)
    secs = time.perf_counter() - t0
    metrics = {"config_version": version, "learned_until": closed.isoformat(), "decisions": len(dlog),
               "decisions_per_s": len(dlog) / max(secs, 1e-9), "mean_reward": float(rw.reward.mean()),
               "mean_lagrangian": float(-cost.mean()), "late_events": rw.n_late, "algorithm": bandit.algorithm,
               "previous": None if latest is None else latest[0]}
    v = store.publish_model(db, "bandit", metrics, bandit.save())
    return {"bandit_version": v, **metrics}


# ---- replay ------------------------------------------------------------------------------------
def _one_hot(idx: np.ndarray, L: int) -> np.ndarray:
    out = np.zeros((idx.size, L))
    out[np.arange(idx.size), idx] = 1.0
    return out


def _budgeted(pmf: np.ndarray, greedy: np.ndarray, value: np.ndarray, mask: np.ndarray, cfg: HomepageConfig) -> np.ndarray:
    """Serving's budget rule applied to a batch of target pmfs (padding stays 0)."""
    from bandits import budget_pmf

    ex = cfg.exploration
    return budget_pmf(np.where(mask, pmf, 0.0), greedy, ex.budget, value=np.where(mask, value, 0.0),
                      max_value_loss=ex.max_value_loss)


def config_candidates(dlog: DecisionLog, new: HomepageConfig, module_ids: list[list[list[str]]] | None = None,
                      logged_categories: tuple[str, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Value and exposure of the logged candidates under another config (its position weights,
    category values and constraints), from each candidate's logged per-slot engagement.

    ``dlog.categories`` index the logged config's categories; pass ``logged_categories`` (the logged
    config's ``category_names``) so a config that orders, adds or drops categories is matched by name.
    Without it the two configs must list the same categories in the same order.

    Returns ``value (n, L)`` (0 on padding) and ``exposure (n, L, K_new)`` in ``new``'s constraint order.
    """
    w = np.asarray(new.position_weights)
    S = min(w.size, dlog.categories.shape[-1])
    cats = dlog.categories[..., :S]
    if logged_categories is not None:
        remap = np.array([new.category_names.index(c) if c in new.category_names else -1
                          for c in logged_categories] + [-1], dtype=np.int64)
        cats = remap[np.where(cats >= 0, cats, -1)]
    vals = np.append(new.category_values(), 0.0)[np.where(cats >= 0, cats, -1)]
    value = (w[:S] * dlog.engagement[..., :S] * vals).sum(-1)
    wn = w[:S] / w[:S].sum()
    K = len(new.constraints)
    ex = np.zeros((*value.shape, K))
    names = new.category_names
    module_of: np.ndarray | None = None
    for k, c in enumerate(new.constraints):
        if c.kind == "category_share":
            ex[..., k] = ((cats == names.index(c.category or "")) * wn).sum(-1)
        elif c.kind == "long_tail_share":
            ex[..., k] = dlog.tail
        else:
            if module_ids is None:
                raise ValueError(f"constraint {c.name!r} (module_share) needs the logged module ids")
            if module_of is None:  # (n, L, S) module ids, "" on padding (rows have different counts)
                module_of = np.full(value.shape + (S,), "", dtype=object)
                for i, row in enumerate(module_ids):
                    for j, cand in enumerate(row):
                        mods = list(cand)[:S]
                        module_of[i, j, :len(mods)] = mods
            ex[..., k] = (module_of == c.module) @ wn
    return np.where(dlog.mask, value, 0.0), ex


_TARGETS = "logged, greedy, uniform, bandit[:VERSION], a bandit version number or a config file"


def _parse_target(target: str) -> tuple[str, int | None]:
    """``(kind, bandit version)`` of a ``--policy`` value; CliError naming the allowed values."""
    if target in ("logged", "greedy", "uniform"):
        return target, None
    if target.endswith(".toml") or Path(target).is_file():
        if not Path(target).is_file():
            raise CliError(f"--policy {target!r}: config file not found")
        return "config", None
    if target == "bandit" or target.startswith("bandit:") or target.isdigit():
        tail = target.split(":", 1)[1] if ":" in target else (target if target.isdigit() else "")
        if tail and not tail.isdigit():
            raise CliError(f"--policy must be {_TARGETS}; got {target!r} (the bandit version must be an integer)")
        return "bandit", int(tail) if tail else None
    raise CliError(f"--policy must be {_TARGETS}; got {target!r}")


def target_distribution(target: str, dlog: DecisionLog, cfg: HomepageConfig, db: Any | None = None,
                        ) -> tuple[np.ndarray, str, dict[str, Any]]:
    """The target policy's distribution over each logged decision's candidates, (n, L).

    ``target``: ``logged`` | ``greedy`` (the logged price-adjusted argmax) | ``uniform`` |
    ``bandit`` (newest model) | ``bandit:N`` | an integer N (bandit version) | a config file path.
    """
    L = dlog.mask.shape[1]
    info: dict[str, Any] = {}
    if target == "logged":
        return dlog.pmf, "logged policy", info
    if target == "greedy":
        return _one_hot(np.argmax(np.where(dlog.mask, dlog.score, -np.inf), axis=1), L), "greedy (logged prices)", info
    if target == "uniform":
        return dlog.mask / dlog.mask.sum(1, keepdims=True), "uniform over candidates", info
    kind, version = _parse_target(target)
    if kind == "config":
        return _config_target(Path(target), dlog, cfg, db, info)
    if db is None:
        raise CliError("a bandit policy needs the database (its model registry)")
    import sqlalchemy as sa

    from bandits import VWLayoutBandit

    from ._db import models

    with db.connect() as conn:
        q = sa.select(models.c.version, models.c.artifact).where(models.c.name == "bandit",
                                                                  models.c.status == "published")
        q = q.where(models.c.version == version) if version is not None else q.order_by(models.c.version.desc()).limit(1)
        row = conn.execute(q).first()
    if row is None:
        raise CliError(f"no published bandit model{'' if version is None else f' version {version}'}")
    bandit = VWLayoutBandit.load(bytes(row[1]))
    shared, actions = log_features(dlog, cfg)
    pmf = bandit.predict_batch(shared, actions, dlog.n_cand)
    # as serving does: the bandit spends the budget around the priced argmax
    greedy = np.argmax(np.where(dlog.mask, dlog.score, -np.inf), axis=1)
    info["bandit_version"] = int(row[0])
    return _budgeted(pmf, greedy, dlog.value, dlog.mask, cfg), f"bandit v{row[0]} (within the budget)", info


def _config_target(path: Path, dlog: DecisionLog, cfg: HomepageConfig, db: Any | None, info: dict[str, Any]
                   ) -> tuple[np.ndarray, str, dict[str, Any]]:
    from allocator import ConfigError, InfeasiblePlan, load_config, plan_dual, plan_lp

    try:
        new = load_config(path)
    except (FileNotFoundError, ConfigError) as e:
        raise CliError(str(e)) from None
    value, ex = config_candidates(dlog, new, dlog.modules, logged_categories=cfg.category_names)
    lo, hi = new.bounds()
    n = len(dlog)
    weight = np.full(n, 1.0 / n)
    solve = plan_lp if int(dlog.mask.sum()) <= 100_000 else plan_dual
    try:
        plan = solve(value, ex, weight, lo, hi, dlog.mask, names=new.constraint_names)
    except InfeasiblePlan as e:
        raise CliError(f"{path}: infeasible on the logged candidates; {e.diagnosis}") from None
    score = np.where(dlog.mask, value + ex @ plan.prices, -np.inf)
    greedy = np.argmax(score, axis=1)
    uniform = dlog.mask / dlog.mask.sum(1, keepdims=True)
    info.update({"prices": dict(zip(new.constraint_names, map(float, plan.prices), strict=True)),
                 "projected_value_model": float(plan.objective)})
    return _budgeted(uniform, greedy, value, dlog.mask, new), f"config {path.name} (planned, epsilon-greedy)", info


@dataclass
class ReplayResult:
    target: str
    label: str
    rows: list[dict[str, Any]]
    logged_mean: float
    n: int
    shares: list[dict[str, Any]]
    weights: np.ndarray
    info: dict[str, Any]


def replay(dlog: DecisionLog, reward: np.ndarray, target: str, cfg: HomepageConfig, db: Any | None = None,
           *, n_boot: int = 200, seed: int = 0) -> ReplayResult:
    """Every estimator of the target's value on the log, with CIs and overlap diagnostics."""
    from bandits import cross_fit_rewards, estimate_all

    if len(dlog) < 10:
        raise CliError(f"replay needs at least 10 logged decisions with candidates; found {len(dlog)}")
    dist, label, info = target_distribution(target, dlog, cfg, db)
    rng = np.random.default_rng(seed)
    _, actions = log_features(dlog, cfg)
    est_r = cross_fit_rewards(actions, dlog.action, reward, n_folds=2, rng=rng)
    rows = estimate_all(reward, dlog.action, dlog.pscore, dist, est_r, n_boot=n_boot, rng=rng)
    logged = float(reward.mean())
    for r in rows:  # relative change, signed as the value's change even when rewards are negative
        r["relative_to_logged"] = (r["value"] - logged) / abs(logged) if logged else None
    w = dist[np.arange(len(dlog)), dlog.action] / dlog.pscore
    shares = []
    proj = np.einsum("nl,nlk->k", dist, dlog.exposure) / len(dlog)
    logged_sh = dlog.chosen_exposure.mean(0)
    for k, c in enumerate(cfg.constraints):
        shares.append({"constraint": c.name, "min": c.min, "max": c.max, "logged": float(logged_sh[k]),
                       "target": float(proj[k])})
    return ReplayResult(target, label, rows, logged, len(dlog), shares, w, info)


def write_replay_report(out: Path, res: ReplayResult, truth: float | None = None) -> Path:
    from ._report import _plt, html_page, table_html

    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["estimator"] for r in res.rows]
    est = np.array([r["value"] for r in res.rows])
    lo = np.array([r.get("boot_low", r["ci_low"]) for r in res.rows])
    hi = np.array([r.get("boot_high", r["ci_high"]) for r in res.rows])
    ax.errorbar(names, est, yerr=[est - lo, hi - est], fmt="o", capsize=4)
    ax.axhline(res.logged_mean, color="#888", ls="--", label="logged mean reward")
    if truth is not None:
        ax.axhline(truth, color="#c33", ls=":", label="true value (simulator)")
    ax.set_title(f"estimates of {res.label}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "estimates.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    x = np.arange(len(res.shares))
    axes[0].bar(x - 0.2, [s["logged"] for s in res.shares], 0.4, label="logged")
    axes[0].bar(x + 0.2, [s["target"] for s in res.shares], 0.4, label="target (projected)")
    for i, s in enumerate(res.shares):
        for b in (s["min"], s["max"]):
            if b is not None:
                axes[0].hlines(b, i - 0.4, i + 0.4, colors="k", linestyles="--")
    axes[0].set_xticks(x, [s["constraint"] for s in res.shares])
    axes[0].set_title("exposure shares (dashed: targets)")
    axes[0].legend(fontsize=8)
    axes[1].hist(res.weights[res.weights > 0], bins=50, color="#58a")
    axes[1].set_yscale("log")
    axes[1].set_title("importance weights pi_target / pi_logged (served action)")
    fig.tight_layout()
    fig.savefig(out / "shares_weights.png", dpi=110)
    plt.close(fig)
    keep = ("estimator", "value", "ci_low", "ci_high", "boot_low", "boot_high", "relative_to_logged", "ess",
            "max_weight")
    table = [{k: r.get(k) for k in keep} for r in res.rows]
    sections = [("Estimates", f"<p>{res.n} logged decisions; logged mean reward {res.logged_mean:.4g}."
                 + (f" True value (simulator): {truth:.4g}." if truth is not None else "") + "</p>"
                 + table_html(table) + '<img src="estimates.png">'),
                ("Projected exposure and overlap", table_html(res.shares) + '<img src="shares_weights.png">')]
    if res.info:
        sections.append(("Target details", "<pre>" + json.dumps(res.info, indent=1, default=str) + "</pre>"))
    (out / "index.html").write_text(html_page(f"Replay: {res.label}", sections))
    return out / "index.html"


def _log_from_parquet(path: Path, cfg: HomepageConfig) -> tuple[DecisionLog, dict[str, np.ndarray]]:
    from ._export import read_parquet

    cols = read_parquet(path)
    n = len(cols["request_id"])
    cands = []
    for i in range(n):
        mods = cols["cand_modules"][i] or []
        row = []
        for j in range(len(mods)):
            row.append({"modules": mods[j], "tilt": cols["cand_tilt"][i][j], "value": cols["cand_value"][i][j],
                        "score": cols["cand_score"][i][j], "exposure": cols["cand_exposure"][i][j],
                        **{k: cols[f"cand_{k}"][i][j] for k in ("categories", "engagement", "tail")
                           if f"cand_{k}" in cols and cols[f"cand_{k}"][i] is not None}})
        cands.append(row)
    dcols = {k: cols[k] for k in ("request_id", "ts", "user_id", "policy", "chosen", "propensity", "pmf", "context",
                                  "versions", "layout")}
    dcols["candidates"] = cands
    dlog = decision_log(dcols, cfg)
    fb_rows = [(e["request_id"] if "request_id" in e else cols["request_id"][i], e["item_id"], e["type"], e["ts"])
               for i in range(n) for e in (cols["feedback"][i] or [])]
    fb = {"request_id": np.array([r[0] for r in fb_rows], dtype=object),
          "item_id": np.array([r[1] for r in fb_rows], dtype=object),
          "type": np.array([r[2] for r in fb_rows], dtype=object),
          "ts": np.array([r[3] for r in fb_rows], dtype=object)}
    return dlog, fb


# ---- CLI ---------------------------------------------------------------------------------------
def cmd_learn(args: argparse.Namespace) -> int:
    db = db_engine()
    while True:
        out = learn_once(db, min_decisions=args.min_decisions)
        if out is None:
            print("nothing to learn yet (no decisions whose reward window has closed since the last model)")
        else:
            print(f"published bandit version {out['bandit_version']}: {out['decisions']} decisions, "
                  f"mean reward {out['mean_reward']:.4f}, {out['decisions_per_s']:.0f} decisions/s")
        if not args.follow:
            return 0
        time.sleep(args.every_s)


def cmd_replay(args: argparse.Namespace) -> int:
    # argument errors before reading a possibly large log
    _parse_target(args.policy)
    since, until = _parse_ts(args.since, "--since"), _parse_ts(args.until, "--until")
    if args.from_parquet:
        from ._cli_common import load_cfg

        _, cfg = load_cfg(args)
        try:
            dlog, fb = _log_from_parquet(Path(args.from_parquet), cfg)
        except (OSError, ValueError, KeyError) as e:  # missing file, not Parquet, not a log export
            raise CliError(f"--from-parquet {args.from_parquet!r}: cannot read a `homepage log export` file "
                           f"({type(e).__name__}: {e})") from None
        if args.catalog:
            from ._catalog import CatalogError, read_catalog_csv

            try:
                cat = read_catalog_csv(args.catalog, cfg.category_names)
            except CatalogError as e:
                raise CliError(str(e)) from None
            ids, cats = np.asarray(cat.item_ids, dtype=str), np.asarray(cat.category, dtype=str)
            db = None
        else:
            db = db_engine()
            ids, cats = _catalog_categories(db)
        rw = join_rewards(dlog, fb, cfg, ids, cats)
    else:
        db = db_engine()
        version, cfg = _active_config(db)
        dlog, rw = load_log(db, cfg, since, until, config_version=version)
    res = replay(dlog, rw.reward, args.policy, cfg, db, n_boot=args.n_boot, seed=args.seed)
    print(f"replay of {res.label} on {res.n} logged decisions (logged mean reward {res.logged_mean:.4f})")
    print(f"{'estimator':<10} {'estimate':>10} {'95% CI':>23} {'bootstrap CI':>23} {'vs logged':>10} {'ESS':>8}")
    for r in res.rows:
        rel = r["relative_to_logged"]
        print(f"{r['estimator']:<10} {r['value']:>10.4f} [{r['ci_low']:>9.4f}, {r['ci_high']:>9.4f}] "
              f"[{r.get('boot_low', float('nan')):>9.4f}, {r.get('boot_high', float('nan')):>9.4f}] "
              f"{'' if rel is None else f'{rel:+.1%}':>10} {r['ess']:>8.0f}")
    for s in res.shares:
        print(f"  {s['constraint']:<16} logged {s['logged']:.4f}  target {s['target']:.4f}  "
              f"(min {s['min']}, max {s['max']})")
    out = Path(args.out) if args.out else Path("homepage-data") / "report" / f"replay-{int(time.time())}"
    page = write_replay_report(out, res)
    print(f"report: {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    db = db_engine()
    since, until = _parse_ts(args.since, "--since"), _parse_ts(args.until, "--until")
    out = Path(args.out)
    if args.format == "parquet":
        from ._export import export_parquet

        n = export_parquet(db, out, since, until)
        print(f"wrote {n} decisions to {out}")
        return 0
    from bandits import to_dsjson_line

    version, cfg = _active_config(db)
    dlog, rw = load_log(db, cfg, since, until, config_version=version)  # features mean one config
    shared, actions = log_features(dlog, cfg)
    # the cost `homepage learn` minimises (the Lagrangian reward, negated); the raw reward is the outcome
    cost = -(rw.reward + dlog.chosen_exposure @ _prices(db, cfg, version))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for i in range(len(dlog)):  # one JSON line per decision: this is the format's unit
            k = int(dlog.n_cand[i])
            fh.write(to_dsjson_line(event_id=str(dlog.request_id[i]), timestamp=float(dlog.ts[i]), shared=shared[i],
                                    actions=actions[i, :k], pmf=dlog.pmf[i, :k], chosen=int(dlog.action[i]),
                                    cost=float(cost[i]), outcomes=(float(rw.reward[i]),),
                                    model_version=str((dlog.versions[i] or {}).get("bandit") or "N/A")) + "\n")
    print(f"wrote {len(dlog)} DSJSON decisions to {out}")
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("learn", help="learn the layout bandit from the log (Lagrangian reward) and publish it")
    p.add_argument("--follow", action="store_true", help="keep learning every --every-s seconds")
    p.add_argument("--every-s", type=float, default=60.0)
    p.add_argument("--min-decisions", type=int, default=100)
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("replay", help="estimate what another policy or config would have earned on the log")
    p.add_argument("--policy", required=True, metavar="TARGET",
                   help="logged | greedy | uniform | bandit[:VERSION] | VERSION | path/to/config.toml")
    p.add_argument("--since", help="ISO time (inclusive)")
    p.add_argument("--until", help="ISO time (exclusive)")
    p.add_argument("--from-parquet", metavar="FILE", help="read a `homepage log export` file instead of the database")
    p.add_argument("--catalog", metavar="CSV", help="with --from-parquet: item categories from this catalog file "
                                                    "instead of the database")
    config_arg(p)
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (0: normal CIs only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="report folder (default homepage-data/report/replay-<time>)")
    p.set_defaults(func=cmd_replay)

    lg = sub.add_parser("log", help="the decision log")
    ls = lg.add_subparsers(dest="log_command", metavar="SUBCOMMAND", required=True)
    p = ls.add_parser("export", help="export decisions (and their feedback) to Parquet or Vowpal Wabbit DSJSON")
    p.add_argument("--format", choices=("parquet", "dsjson"), default="parquet")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--since")
    p.add_argument("--until")
    p.set_defaults(func=cmd_export)
