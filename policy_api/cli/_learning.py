"""``homepage learn``, ``train``, ``evaluate`` and ``replay``: the ML engineer's and the analyst's commands."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import jobs, scale
from ..errors import InvalidInput
from ..log import join_rewards, read_catalog_csv
from ..reports import write_evaluation_report, write_replay_report, write_train_report
from ._common import active_config, config_arg, db_engine, load_cfg, parse_time

__all__ = ["add_commands"]


def cmd_learn(args: argparse.Namespace) -> int:
    db = db_engine()
    while True:
        out = jobs.learn(db, min_decisions=args.min_decisions)
        if out is None:
            print("nothing to learn yet (no decisions whose reward window has closed since the last model)")
        else:
            print(f"published bandit version {out.bandit_version}: {out.decisions} decisions, "
                  f"mean reward {out.mean_reward:.4f}, {out.decisions_per_s:.0f} decisions/s")
        if not args.follow:
            return 0
        time.sleep(args.every_s)


def cmd_train(args: argparse.Namespace) -> int:
    db = db_engine()
    cfg = active_config(db, args)
    bar = tqdm(total=args.max_epochs, desc="train rankers", unit="epoch") if sys.stderr.isatty() else None

    def on_epoch(epoch: int, total: int, m: Mapping[str, float]) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(valid_logloss=f"{m['valid_logloss']:.4f}")

    try:
        res = jobs.train_ranker(db, cfg, model=args.model, interaction=args.interaction, max_epochs=args.max_epochs,
                                threads=args.threads, force=args.force, on_epoch=on_epoch, seed=args.seed,
                                max_ece=args.max_ece, min_gate_users=args.min_gate_users,
                                sampled_negatives=args.sampled_negatives)
    finally:
        if bar is not None:
            bar.close()
    print(res.text)
    page = write_train_report(Path(args.report_dir), res)
    m = res.metrics
    served = m.get("served") or {}
    if res.published is not None and served.get("kind") == "baseline":
        print(f"trained model NOT published (version {res.rejected} recorded as rejected); serving the best built-in "
              f"baseline {served.get('scorer')} as ranker version {res.published}: {served.get('reason')}. "
              f"Report: {page}")
        return 0
    if res.published is not None:
        print(f"published ranker version {res.published} ({m.get('gate', {}).get('reason', 'forced')}); "
              f"report: {page}")
        return 0
    g = m.get("gate", {})
    print(f"NOT published: the pages it would serve must beat the best built-in baseline on the temporal "
          f"holdout ({g.get('reason', 'not evaluated')}) and its validation play ECE must be at most "
          f"{g.get('max_ece', float('nan')):.3f} (got {g.get('valid_play_ece', float('nan')):.4f}); "
          f"use --force to publish anyway. Report: {page}")
    return 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    db = db_engine()
    cfg = active_config(db, args)
    n_scorers = len(jobs.BASELINE_SCORERS) + 1 + (0 if args.no_model else 1)  # + the catalog's popularity
    bar = tqdm(total=n_scorers, desc="evaluate served pages", unit="scorer") if sys.stderr.isatty() else None

    def progress(name: str) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(scorer=name)

    try:
        res = jobs.evaluate_served(db, cfg, train_share=args.train_share, max_users=args.max_users or None,
                                   half_life_days=args.half_life_days, include_model=not args.no_model,
                                   exclude_seen=not args.include_seen, n_boot=args.n_boot, seed=args.seed,
                                   progress=progress)
    finally:
        if bar is not None:
            bar.close()
    print(res.table())
    if args.json:
        Path(args.json).write_text(res.to_json() + "\n")
        print(f"json: {args.json}")
    out = Path(args.out) if args.out else Path("homepage-data") / "report" / f"evaluate-{int(time.time())}"
    print(f"report: {write_evaluation_report(out, res)}")
    return 0


def _replay_partitions(args: argparse.Namespace) -> int:
    """``replay --partitions DIR``: every estimator over a time-partitioned log, combined from partial sums."""
    paths = scale.partition_paths(args.partitions)
    rows = scale.replay_partitions(paths, engine=args.engine, workers=args.workers, n_boot=args.n_boot,
                                   seed=args.seed)
    return _print_partitioned(rows, len(paths), args.engine)


def _replay_exports(args: argparse.Namespace) -> int:
    """``replay --from-parquet DIR``: the target over exported time partitions, combined from partial sums."""
    paths = scale.partition_paths(args.from_parquet)
    _, cfg = load_cfg(args)
    if args.catalog:
        cat = read_catalog_csv(args.catalog, cfg.category_names)
        ids, cats = np.asarray(cat.item_ids, dtype=str), np.asarray(cat.category, dtype=str)
    else:
        ids, cats = jobs.catalog_categories(db_engine())
    rows = jobs.replay_partitioned(paths, cfg, ids, cats, args.policy, engine=args.engine, workers=args.workers,
                                   n_boot=args.n_boot, seed=args.seed)
    return _print_partitioned(rows, len(paths), args.engine)


def _print_partitioned(rows: list[dict[str, Any]], n_parts: int, engine: str) -> int:
    print(f"replay of {n_parts} partitions ({rows[0]['n_rounds']} logged decisions) on engine {engine}")
    print(f"{'estimator':<10} {'estimate':>10} {'95% CI':>23} {'bootstrap CI':>23} {'ESS':>12}")
    for r in rows:
        print(f"{r['estimator']:<10} {r['value']:>10.4f} [{r['ci_low']:>9.4f}, {r['ci_high']:>9.4f}] "
              f"[{r.get('boot_low', float('nan')):>9.4f}, {r.get('boot_high', float('nan')):>9.4f}] {r['ess']:>12.0f}")
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if args.partitions:
        return _replay_partitions(args)
    if args.policy is None:
        raise InvalidInput(f"--policy is required (one of {jobs.TARGETS}) unless --partitions is given",
                           field="--policy")
    if args.from_parquet and Path(args.from_parquet).is_dir():
        return _replay_exports(args)
    if args.engine != "local":
        raise InvalidInput(f"--engine {args.engine} replays a time-partitioned log: pass --from-parquet DIR "
                           f"(exported partitions) or --partitions DIR", field="--engine")
    jobs.parse_target(args.policy)  # argument errors before reading a possibly large log
    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    db = None
    if args.from_parquet:
        _, cfg = load_cfg(args)
        try:
            dlog, fb = jobs.log_from_parquet(Path(args.from_parquet), cfg)
        except (OSError, ValueError, KeyError) as e:  # missing file, not Parquet, not a log export
            raise InvalidInput(f"--from-parquet {args.from_parquet!r}: cannot read a `homepage log export` file "
                               f"({type(e).__name__}: {e})", field="--from-parquet") from None
        if args.catalog:
            cat = read_catalog_csv(args.catalog, cfg.category_names)
            ids, cats = np.asarray(cat.item_ids, dtype=str), np.asarray(cat.category, dtype=str)
        else:
            db = db_engine()
            ids, cats = jobs.catalog_categories(db)
        reward = join_rewards(dlog, fb, cfg, ids, cats).reward
    else:
        db = db_engine()
        rec = active_config(db, argparse.Namespace(config=None))
        cfg = rec.config
        dlog, rw = jobs.load_log(db, cfg, since, until, config_version=rec.version)
        reward = rw.reward
    res = jobs.replay(dlog, reward, args.policy, cfg, db, n_boot=args.n_boot, seed=args.seed)
    print(f"replay of {res.label} on {res.n} logged decisions (logged mean reward {res.logged_mean:.4f})")
    boot = any(r.get("boot_low") is not None for r in res.rows)  # --n-boot 0: no bootstrap column
    print(f"{'estimator':<10} {'estimate':>10} {'95% CI':>23} " + (f"{'bootstrap CI':>23} " if boot else "")
          + f"{'vs logged':>10} {'ESS':>8} {'max weight':>10}")
    for r in res.rows:
        rel = r["relative_to_logged"]
        boot_ci = f"[{r['boot_low']:>9.4f}, {r['boot_high']:>9.4f}] " if boot else ""
        print(f"{r['estimator']:<10} {r['value']:>10.4f} [{r['ci_low']:>9.4f}, {r['ci_high']:>9.4f}] {boot_ci}"
              f"{'' if rel is None else f'{rel:+.1%}':>10} {r['ess']:>8.0f} {r.get('max_weight', float('nan')):>10.4g}")
    print(f"exposure shares against the bounds of the {res.targets_of}:")
    for s in res.shares:
        print(f"  {s['constraint']:<16} logged {s['logged']:.4f}  target {s['target']:.4f}  "
              f"(min {s['min']}, max {s['max']})")
    for w in res.warnings:
        print(f"WARNING: {w}")
    out = Path(args.out) if args.out else Path("homepage-data") / "report" / f"replay-{int(time.time())}"
    print(f"report: {write_replay_report(out, res)}")
    return 0


def add_commands(sub: Any) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("learn", formatter_class=fmt,
                       help="learn the layout bandit from the log (Lagrangian reward) and publish it")
    p.add_argument("--follow", action="store_true", help="keep learning every --every-s seconds")
    p.add_argument("--every-s", type=float, default=60.0, help="seconds between runs with --follow")
    p.add_argument("--min-decisions", type=int, default=100, help="learn only from at least this many decisions")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("train", formatter_class=fmt,
                       help="train the per-category rankers from the log, evaluate, publish a version")
    config_arg(p)
    p.add_argument("--model", choices=("residual", "torch"), default="residual",
                   help="residual: logistic residual over the baselines' signals (numpy, seconds); torch: the "
                        "multi-task ranker. A model the gate refuses is not served: the best baseline is")
    p.add_argument("--interaction", choices=("cin", "cross"), default="cin",
                   help="torch model: feature-interaction block, CIN (xDeepFM) or the cheaper DCN-v2 cross layer")
    p.add_argument("--max-epochs", type=int, default=20, help="upper bound; early stopping on validation logloss")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batching")
    p.add_argument("--force", action="store_true",
                   help="publish even if its served pages do not beat the best baseline on the temporal holdout")
    p.add_argument("--max-ece", type=float, default=jobs.MAX_ECE,
                   help="publish gate: the largest validation ECE of the play probability allowed")
    p.add_argument("--min-gate-users", type=int, default=jobs.MIN_GATE_USERS,
                   help="publish gate: the fewest held-out users it decides on (fewer: nothing is published)")
    p.add_argument("--sampled-negatives", type=int, default=4,
                   help="imported history: unchosen catalog items drawn per chosen one as negatives")
    p.add_argument("--report-dir", default="homepage-data/report", help="where train.txt and train.png go")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", formatter_class=fmt,
                       help="offline evaluation of the served page: temporal holdout, baselines vs the published ranker")
    config_arg(p)
    p.add_argument("--train-share", type=float, default=0.8,
                   help="share of the log's events (in time order) before the cutoff; the rest is the future")
    p.add_argument("--max-users", type=int, default=5000, help="held-out users sampled (0: all)")
    p.add_argument("--half-life-days", type=float, default=14.0, help="decay of the recent-popularity baseline")
    p.add_argument("--no-model", action="store_true", help="baselines only, not the published ranker")
    p.add_argument("--include-seen", action="store_true",
                   help="keep items the user already engaged with at their score (default: at the bottom)")
    p.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the candidate pools, user sample and bootstrap")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--out", help="report folder (default homepage-data/report/evaluate-<time>)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("replay", formatter_class=fmt,
                       help="estimate what another policy or config would have earned on the log")
    p.add_argument("--policy", metavar="TARGET",
                   help="logged | greedy | uniform | bandit[:VERSION] | VERSION | path/to/config.toml "
                        "(required unless --partitions)")
    p.add_argument("--since", help="ISO time (inclusive)")
    p.add_argument("--until", help="ISO time (exclusive)")
    p.add_argument("--from-parquet", metavar="FILE", help="read a `homepage log export` file instead of the database "
                                                          "(a folder: its files are time partitions, replayed "
                                                          "partition by partition; --engine ray runs them on Ray)")
    p.add_argument("--catalog", metavar="CSV", help="with --from-parquet: item categories from this catalog file "
                                                    "instead of the database")
    config_arg(p)
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (0: normal CIs only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reward model's folds and the bootstrap")
    p.add_argument("--out", help="report folder (default homepage-data/report/replay-<time>)")
    p.add_argument("--partitions", metavar="DIR",
                   help="replay a time-partitioned log: DIR's *.parquet files in name order, each with the columns "
                        "reward, action, pscore, action_dist[, estimated_rewards] (the target is in the files)")
    p.add_argument("--engine", choices=scale.ENGINES, default="local",
                   help="with --partitions or --from-parquet DIR: local (this process) or ray (partitions in Ray "
                        "actors; the 'ray' extra)")
    p.add_argument("--workers", type=int, default=None, help="with --engine ray: actors (default: the cluster's CPUs)")
    p.set_defaults(func=cmd_replay)
