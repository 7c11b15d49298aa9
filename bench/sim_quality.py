"""Served-page and ground-truth quality in our simulator's default world, through the CLI.

The world is ``simulator.make_world(seed=0)`` (2,000 users, 3,000 items, item quality only
0.5-correlated with popularity, a conformity term in every click that the ground truth leaves out).
Its history is ``simulator.exposure_log``: each slot position shows an item drawn in proportion to
its popularity (``--popularity-bias``), every examined item is an ``impression`` line and each
behaviour goes at its request's time (so that ``homepage import`` puts an item's impression and its
events in one decision). The catalog and the config are the simulator's (``World.to_catalog_csv``,
``World.default_config_toml``).

Then, as ``real_data.py`` does and with its helpers: ``homepage catalog load`` -> ``config apply`` ->
``import`` -> ``train`` (timed) -> ``evaluate``. Prints JSON lines: the publish gate's table (every
scorer's served-page Recall/NDCG, paired-bootstrap CIs of the differences with the best baseline),
what it published, the training time, ``homepage evaluate``'s rows, and the ground-truth NDCG@10 of
every scorer: for each held-out user of the gate, each category's 100 random items ranked by the
scorer and judged against the simulator's true preference (``rankers.ground_truth_ndcg``), every
scorer fitted on the log before the gate's cutoff (the trained model with the coefficients and dial
of its registry row, as the gate judged it), with paired-bootstrap CIs over users of its difference
with popularity and with the item prior. Last, two scorers that know the simulator's truth on the
gate's holdout (``oracle_choice``: what each user goes on to choose; ``oracle_item``: the same
without the users' latent tastes), to show how much recall item-level signals can add.

Scorers judged on the ground truth: the built-in baselines, the catalog's popularity column, the
*item prior* (``rankers.ItemPriorBaseline``: each item's per-task rates smoothed toward the mean, in
units), the *item rate* alone (``rankers.item_rates``, the residual ranker's feature) and the
residual ranker.

Run: ``.venv/bin/python bench/sim_quality.py [--requests N] [--work DIR]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import ROOT, cli, cli_env, print_evaluation, print_training, trained_model  # noqa: E402

sys.path.insert(0, str(ROOT))
import rankers  # noqa: E402
from policy_api import jobs, registry  # noqa: E402
from policy_api.engine import EngineState, build_state  # noqa: E402
from policy_api.log import Catalog, load_items, make_engine  # noqa: E402
from simulator import EVENT_TYPES, World, exposure_log, make_world  # noqa: E402

BENCH = "sim_quality"


def write_log(world: World, path: Path, n_requests: int, seed: int, popularity_bias: float) -> dict[str, int]:
    """The exposure log as ``user_id,item_id,event,timestamp`` lines: impressions, then behaviours at
    their request's time."""
    imp, ev = exposure_log(world, n_requests, np.random.default_rng(seed), popularity_bias=popularity_bias)
    request_ts = ev["ts"] - 5.0  # exposure_log stamps behaviours 5 s after their request
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "event", "timestamp"])
        w.writerows(zip(world.user_ids[imp["user"]].tolist(), world.item_ids[imp["item"]].tolist(),
                        ["impression"] * imp["item"].size, imp["ts"].tolist(), strict=True))
        w.writerows(zip(world.user_ids[ev["user"]].tolist(), world.item_ids[ev["item"]].tolist(),
                        [EVENT_TYPES[t] for t in ev["type"].tolist()], request_ts.tolist(), strict=True))
    return {"impressions": int(imp["item"].size), "behaviours": int(ev["item"].size)}


def truth_lists(state: EngineState, users: np.ndarray, seed: int, width: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(users (n_lists,), candidates (n_lists, width)): each user's list of ``width`` random items of
    each category, as ``homepage train`` draws them for its ground-truth figure."""
    rng = np.random.default_rng(seed)
    lists = []
    for items in state.by_category:
        m = min(width, items.size)
        keys = rng.random((users.size, items.size))
        lists.append(items[np.argpartition(keys, m - 1, axis=1)[:, :m]])
    m = min(x.shape[1] for x in lists)
    return np.tile(users, len(lists)), np.concatenate([x[:, :m] for x in lists])


def truth_ndcg(env: dict[str, str], world: World, metrics: dict[str, object], n_boot: int) -> None:
    """Ground-truth NDCG@10 of every scorer, fitted on the log before the gate's cutoff, over the
    gate's held-out users (JSON lines)."""
    db = make_engine(env["DATABASE_URL"])
    cfg = registry.require_active_config(db).config
    catalog = Catalog.from_arrays(load_items(db))
    data = jobs.log_training_arrays(db, catalog)
    state = build_state(cfg, catalog)
    wv = cfg.event_weight_vector()
    gate = metrics["gate"]
    assert isinstance(gate, dict)
    cutoff = float(gate["cutoff"])
    h = jobs.gate_holdout(state, data, cutoff, wv)
    cat = np.where(state.item_category >= 0, state.item_category, 0)
    world_item = {iid: k for k, iid in enumerate(world.item_ids.tolist())}
    world_user = {uid: k for k, uid in enumerate(world.user_ids.tolist())}
    item_to_world = np.array([world_item[i] for i in catalog.item_ids.tolist()])
    user_to_world = np.array([world_user[u] for u in data["user_ids"]])
    n_users = int(data["n_users"])

    def pairs_of(fixed: np.ndarray):  # an item-level score as a pair scorer
        return lambda u, i: fixed[i]

    scorers = {b: jobs.fit_baseline(b, h.train_user, h.train_item, h.train_ts, h.train_weight, item_category=cat,
                                    n_users=n_users).score_pairs for b in jobs.BASELINE_SCORERS}
    scorers["catalog_popularity"] = pairs_of(np.asarray(catalog.popularity, dtype=np.float64))
    # the item prior: per-task rates of the exposures before the cutoff, smoothed toward the mean, in units
    past = {k: {c: np.asarray(v)[np.asarray(t["ts"]) < cutoff] for c, v in t.items()}
            for k, t in (("impressions", data["impressions"]), ("events", data["events"]))}
    ex = rankers.build_examples(past["impressions"], past["events"], n_users=n_users, n_items=catalog.n_items,
                                item_category=cat, item_features=catalog.features, n_categories=len(cfg.category_names))
    prior = rankers.ItemPriorBaseline(rankers.item_priors(ex))
    scorers["item_prior"] = pairs_of(prior.prob_ @ rankers.task_weights_from_events(dict(cfg.events)))
    shown, positive = jobs.shown_items(data, wv, cutoff)
    rate, _ = rankers.item_rates(shown, positive, cat)
    scorers["item_rate"] = pairs_of(rate)
    coef_map = metrics["coef"]
    assert isinstance(coef_map, dict)
    residual = jobs.residual_scorer(data, cat, np.array(list(coef_map.values())), float(metrics["pop_exponent"]), wv,
                                    before=cutoff)
    assert residual.feature_names() == tuple(coef_map)
    scorers["residual"] = residual.score_pairs

    lu, cand = truth_lists(state, h.users, seed=0)
    u, i = np.repeat(lu, cand.shape[1]), cand.ravel()
    truth = world.true_preference(user_to_world[u], item_to_world[i]).reshape(cand.shape)
    scores = {n: np.asarray(f(u, i), dtype=np.float64).reshape(cand.shape) for n, f in scorers.items()}
    per_user = {}
    n_cat = cand.shape[0] // h.users.size
    for name, s in scores.items():  # each user's mean over the user's per-category lists
        vals = np.empty(h.users.size)
        for r in range(h.users.size):
            rows = r + h.users.size * np.arange(n_cat)
            vals[r] = rankers.ground_truth_ndcg(lambda _u, _i, rows=rows, s=s: s[rows].ravel(),
                                                lambda _u, _i, rows=rows: truth[rows].ravel(),
                                                h.users[np.zeros(n_cat, dtype=np.int64)], cand[rows], k=10)
        per_user[name] = vals
    served = metrics.get("served") or {}
    assert isinstance(served, dict)
    for name, vals in per_user.items():
        row: dict[str, object] = {"bench": BENCH, "part": "truth_ndcg", "scorer": name, "ndcg@10": round(float(vals.mean()), 4),
                                  "n_users": int(h.users.size), "lists_per_user": n_cat, "list_size": int(cand.shape[1])}
        for ref in ("popularity", "item_prior"):
            if name != ref:
                d = rankers.paired_bootstrap(vals, per_user[ref], n_boot=n_boot, seed=0)
                row[f"vs_{ref}"] = [round(float(d[k]), 4) for k in ("mean_diff", "ci_low", "ci_high")]
        print(json.dumps(row))
    print(json.dumps({"bench": BENCH, "part": "truth_served", "served_kind": served.get("kind"),
                      "served_scorer": served.get("scorer"),
                      "coef_logit_item_rate": coef_map.get("logit_item_rate"), "load_1m": os.getloadavg()[0]}))
    db.dispose()


def oracles(env: dict[str, str], world: World, metrics: dict[str, object], n_boot: int) -> None:
    """Where the served-page recall is: the gate's holdout judged (JSON lines) with scorers that know
    the simulator's truth, next to the gate's best baseline. ``oracle_choice``: the chance that the
    log's policy shows the item and the user then plays it, ``popularity * P(play)`` (what a user goes
    on to choose); ``oracle_item``: the same without the user's latent taste (the user's category
    affinity and the item's own quality and conformity only: as much as item rates can know)."""
    db = make_engine(env["DATABASE_URL"])
    cfg = registry.require_active_config(db).config
    catalog = Catalog.from_arrays(load_items(db))
    data = jobs.log_training_arrays(db, catalog)
    state = build_state(cfg, catalog)
    gate = metrics["gate"]
    assert isinstance(gate, dict)
    h = jobs.gate_holdout(state, data, float(gate["cutoff"]), cfg.event_weight_vector())
    world_item = {iid: k for k, iid in enumerate(world.item_ids.tolist())}
    world_user = {uid: k for k, uid in enumerate(world.user_ids.tolist())}
    item_to_world = np.array([world_item[i] for i in catalog.item_ids.tolist()])
    user_to_world = np.array([world_user[u] for u in data["user_ids"]])

    def play(u: np.ndarray, i: np.ndarray, taste: bool) -> np.ndarray:
        c = world.item_category[i]
        t = (world.true_preference(u, i) if taste else
             world.user_affinity[u, c] + world.category_bias[c] + world.item_quality[i])
        return world.popularity[i] / (1.0 + np.exp(-(t + world.conformity * world.popularity_z[i])))

    def page_scorer(taste: bool) -> jobs.PageScorer:
        def score(users: np.ndarray, pools: np.ndarray) -> np.ndarray:
            u = user_to_world[np.repeat(users, pools.shape[1])]
            return play(u, item_to_world[pools.ravel()], taste).reshape(pools.shape)
        return score

    best = str(gate["best_baseline"])
    scorers = jobs.baseline_scorers(h, state.item_category, names=[best]) if best != "catalog_popularity" else {}
    scorers.update(oracle_choice=page_scorer(True), oracle_item=page_scorer(False))
    res = jobs.evaluate_pages(state, h, scorers, baselines=[best], n_boot=n_boot)
    for name in ("oracle_choice", "oracle_item"):
        d = res.diff(name, "recall")
        print(json.dumps({"bench": BENCH, "part": "oracle", "scorer": name, "recall": round(res.row(name)["recall"], 4),
                          "ndcg": round(res.row(name)["ndcg"], 4), "vs": best,
                          "best_baseline_recall": round(res.row(best)["recall"], 4),
                          "recall_diff": [round(float(d[k]), 4) for k in ("mean_diff", "ci_low", "ci_high")]}))
    lu, cand = truth_lists(state, h.users, seed=0)
    u, i = user_to_world[np.repeat(lu, cand.shape[1])], item_to_world[cand.ravel()]
    got = rankers.ground_truth_ndcg(lambda _u, _i: play(u, i, True), lambda _u, _i: world.true_preference(u, i),
                                    lu, cand, k=10)
    print(json.dumps({"bench": BENCH, "part": "oracle_truth_ndcg", "scorer": "oracle_choice", "ndcg@10": round(got, 4)}))
    db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30000, help="requests of the exposure log")
    ap.add_argument("--seed", type=int, default=0, help="the world's seed")
    ap.add_argument("--log-seed", type=int, default=1, help="the exposure log's seed")
    ap.add_argument("--popularity-bias", type=float, default=1.0, help="exposure in proportion to popularity ** this")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--work", help="keep the files and the database in this folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(args.work or t)
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "h.db").unlink(missing_ok=True)
        world = make_world(seed=args.seed)
        world.to_catalog_csv(tmp / "items.csv")
        (tmp / "homepage.toml").write_text(world.default_config_toml())
        sizes = write_log(world, tmp / "log.csv", args.requests, args.log_seed, args.popularity_bias)
        env = cli_env(tmp)
        cli(env, "db", "upgrade")
        cli(env, "catalog", "load", str(tmp / "items.csv"))
        cli(env, "config", "apply", str(tmp / "homepage.toml"))
        t0 = time.perf_counter()
        cli(env, "import", str(tmp / "log.csv"))
        import_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = cli(env, "train", "--report-dir", str(tmp / "report"))
        train_s = time.perf_counter() - t0
        status, metrics = trained_model(env)
        print(json.dumps({"bench": BENCH, "users": world.n_users, "items": world.n_items, "requests": args.requests,
                          "popularity_bias": args.popularity_bias, **sizes, "import_s": round(import_s, 2),
                          "train_cli_s": round(train_s, 2), "train_fit_s": round(float(metrics["train_s"]), 2),
                          "model_status": status, "load_1m": os.getloadavg()[0]}))
        print_training(BENCH, out, metrics)
        print_evaluation(BENCH, env, tmp, args.n_boot)
        truth_ndcg(env, world, metrics, args.n_boot)
        oracles(env, world, metrics, args.n_boot)


if __name__ == "__main__":
    main()
