"""``homepage learn``, ``train`` and ``replay``: the ML engineer's and the analyst's commands."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .. import jobs
from ..errors import InvalidInput
from ..log import join_rewards, read_catalog_csv
from ..reports import write_replay_report, write_train_report
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
        res = jobs.train_ranker(db, cfg, interaction=args.interaction, max_epochs=args.max_epochs,
                                threads=args.threads, force=args.force, on_epoch=on_epoch, seed=args.seed)
    finally:
        if bar is not None:
            bar.close()
    print(res.text)
    page = write_train_report(Path(args.report_dir), res)
    m = res.metrics
    if res.published is not None:
        print(f"published ranker version {res.published} (validation play GAUC {m['valid_play_gauc']:.4f} vs "
              f"popularity {m['valid_play_gauc_popularity']:.4f}); report: {page}")
        return 0
    print(f"NOT published: on validation the ranker must beat popularity on play GAUC "
          f"({m['valid_play_gauc']:.4f} vs {m['valid_play_gauc_popularity']:.4f}) and on NDCG@10 of the served "
          f"score ({m['valid_ndcg']:.4f} vs {m['valid_ndcg_popularity']:.4f}); use --force to publish anyway. "
          f"Report: {page}")
    return 1


def cmd_replay(args: argparse.Namespace) -> int:
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
    p.add_argument("--interaction", choices=("cin", "cross"), default="cin",
                   help="feature-interaction block: CIN (xDeepFM) or the cheaper DCN-v2 cross layer")
    p.add_argument("--max-epochs", type=int, default=20, help="upper bound; early stopping on validation logloss")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on 2 shared cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation and batching")
    p.add_argument("--force", action="store_true", help="publish even if it does not beat popularity")
    p.add_argument("--report-dir", default="homepage-data/report", help="where train.txt and train.png go")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("replay", formatter_class=fmt,
                       help="estimate what another policy or config would have earned on the log")
    p.add_argument("--policy", required=True, metavar="TARGET",
                   help="logged | greedy | uniform | bandit[:VERSION] | VERSION | path/to/config.toml")
    p.add_argument("--since", help="ISO time (inclusive)")
    p.add_argument("--until", help="ISO time (exclusive)")
    p.add_argument("--from-parquet", metavar="FILE", help="read a `homepage log export` file instead of the database")
    p.add_argument("--catalog", metavar="CSV", help="with --from-parquet: item categories from this catalog file "
                                                    "instead of the database")
    config_arg(p)
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (0: normal CIs only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reward model's folds and the bootstrap")
    p.add_argument("--out", help="report folder (default homepage-data/report/replay-<time>)")
    p.set_defaults(func=cmd_replay)
