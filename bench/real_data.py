"""Served-page quality on a real log: MovieLens-100k split by time, through the CLI.

The data ships inside the ``recbole==1.2.1`` wheel; its licence forbids redistribution, so it is
fetched at run time (``pip download --no-deps recbole==1.2.1``) into a temporary folder and never
stored in the repository. ``--data DIR`` reads ``ml-100k.inter`` and ``ml-100k.item`` (RecBole's
atomic files) or ``u.data`` and ``u.item`` (GroupLens' original files) from DIR instead.

Conversion:

* catalog: one row per movie, ``category`` from its genres (``action`` for action / adventure /
  thriller / sci-fi / war / western / crime / horror / mystery / film-noir, else ``drama``, else
  ``comedy``, else ``other``), ``popularity`` = its ratings in the training 80 % (+1), features =
  the 19 genre flags and the standardised release year;
* events: rating 5 -> ``favorite``, 4 -> ``play``, 1-3 -> ``skip`` at the rating's timestamp;
* config: 2 slots x 5 items (a page of 10), one module per category, no exposure constraints.

Then ``homepage import`` -> ``homepage train`` (timed) -> ``homepage evaluate`` on the same temporal
split (first 80 % of ratings = the past; each held-out user's page judged against the movies they
went on to rate 4 or 5). Prints JSON lines: every scorer's HR/Recall/NDCG with the paired-bootstrap
CI of its difference with the best baseline, the publish gate's table (the candidate model trained on
the past only, judged with the users' history as of the cutoff) and the training time.

Run: ``.venv/bin/python bench/real_data.py [--data DIR] [--max-epochs N]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
ACTION = {"Action", "Adventure", "Thriller", "Sci-Fi", "War", "Western", "Crime", "Horror", "Mystery", "Film-Noir"}
CATEGORIES = ("action", "drama", "comedy", "other")

CONFIG = """[homepage]
slots = 2
position_weights = [1.0, 0.8]
items_per_module = 5
""" + "".join(f'\n[[categories]]\nname = "{c}"\nvalue_per_engagement = 1.0\n' for c in CATEGORIES) + "".join(
    f'\n[[modules]]\nid = "{c}_picks"\ncategory = "{c}"\n' for c in CATEGORIES) + """
[events]
play = 1.0
full_play = 2.0
favorite = 2.0
share = 3.0
skip = -0.5

[tilt]
levels = [0.0, 0.25, 0.5]
head_share = 0.8
"""


def fetch(tmp: Path) -> Path:
    """ml-100k from the recbole wheel, extracted into ``tmp``."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "recbole==1.2.1", "-d", str(tmp)],
                   check=True)
    wheel = next(tmp.glob("recbole-1.2.1-*.whl"))
    out = tmp / "ml-100k"
    out.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for name in ("ml-100k.inter", "ml-100k.item"):
            (out / name).write_bytes(z.read(f"recbole/dataset_example/ml-100k/{name}"))
    return out


def read(data: Path) -> tuple[np.ndarray, dict[str, tuple[list[str], str]]]:
    """(ratings (n, 4) user, item, rating, ts as int64; item id -> (genres, year))."""
    if (data / "ml-100k.inter").is_file():
        r = np.loadtxt(data / "ml-100k.inter", skiprows=1, dtype=np.int64)
        items = {}
        with (data / "ml-100k.item").open(encoding="latin-1") as fh:
            next(fh)
            for line in fh:
                iid, _title, year, genres = line.rstrip("\n").split("\t")
                items[iid] = (genres.split(" "), year)
        return r, items
    r = np.loadtxt(data / "u.data", dtype=np.int64)
    items = {}
    with (data / "u.item").open(encoding="latin-1") as fh:
        for line in fh:
            f = line.rstrip("\n").split("|")
            items[f[0]] = ([g for g, x in zip(GENRES, f[5:], strict=True) if x == "1"], f[2][-4:])
    return r, items


def synthetic(out: Path, n_ratings: int, n_users: int = 6040, n_items: int = 3706, seed: int = 0) -> Path:
    """A synthetic log in GroupLens' ``u.data`` / ``u.item`` form, the size of MovieLens-1M by default,
    for checking the pipeline's scale (not its quality): Zipf popularity, one to four genres per movie,
    each user's genre taste a Dirichlet draw and activity log-normal; a rating picks a genre by the
    user's taste, then the best of 10 popularity-drawn movies for it; ratings from the movie's quality
    and the genre match; one rating per (user, movie), timestamps spread over three years."""
    rng = np.random.default_rng(seed)
    G = len(GENRES)
    genres = rng.random((n_items, G)) < 0.12
    genres[np.arange(n_items), rng.integers(1, G, n_items)] = True
    genres[:, 0] = False  # "unknown"
    quality = rng.normal(0.0, 1.0, n_items)
    pop = np.minimum(rng.zipf(1.6, n_items), 5000).astype(np.float64)
    taste = rng.dirichlet(np.full(G, 0.3), n_users)
    activity = rng.lognormal(0.0, 1.2, n_users)
    n_draw = int(n_ratings * 6)  # draws repeat (user, movie) pairs; about n_ratings stay distinct
    user = rng.choice(n_users, n_draw, p=activity / activity.sum())
    g = (taste[user].cumsum(axis=1) > rng.random((n_draw, 1))).argmax(axis=1)
    cand = rng.choice(n_items, (n_draw, 10), p=pop / pop.sum())
    fit = 2.0 * genres[cand, g[:, None]] + 0.5 * quality[cand] + rng.normal(0.0, 1.0, cand.shape)
    item = cand[np.arange(n_draw), fit.argmax(axis=1)]
    rating = np.clip(np.round(3.3 + 0.8 * quality[item] + 0.6 * genres[item, g] + rng.normal(0.0, 0.9, n_draw)), 1, 5)
    ts = np.sort(rng.uniform(956703932, 956703932 + 3 * 365 * 86400, n_draw)).astype(np.int64)
    _, first = np.unique(user * n_items + item, return_index=True)
    first = np.sort(first)[:n_ratings]
    out.mkdir(parents=True, exist_ok=True)
    np.savetxt(out / "u.data", np.c_[user[first] + 1, item[first] + 1, rating[first], ts[first]], fmt="%d",
               delimiter="\t")
    year = 1930 + rng.integers(0, 70, n_items)
    with (out / "u.item").open("w", encoding="latin-1") as fh:
        for i in range(n_items):  # writing the fixture file, not a measured path
            flags = "|".join(str(int(v)) for v in genres[i])
            fh.write(f"{i + 1}|Movie {i + 1} ({year[i]})|01-Jan-{year[i]}||http://example.org|{flags}\n")
    return out


def category(genres: list[str]) -> str:
    if ACTION & set(genres):
        return "action"
    if "Drama" in genres:
        return "drama"
    return "comedy" if "Comedy" in genres else "other"


def cli(env: dict[str, str], *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "policy_api.cli", *args], env=env, capture_output=True, text=True,
                       cwd=env["HOMEPAGE_DATA_DIR"])
    if p.returncode not in (0, 1):
        raise SystemExit(f"homepage {' '.join(args)} failed ({p.returncode}): {p.stderr[-2000:]}")
    return p.stdout


def cli_env(tmp: Path) -> dict[str, str]:
    """The environment of the CLI runs on the database and config in ``tmp``."""
    return dict(os.environ, DATABASE_URL=f"sqlite:///{tmp / 'h.db'}", HOMEPAGE_DATA_DIR=str(tmp),
                HOMEPAGE_CONFIG=str(tmp / "homepage.toml"), PYTHONPATH=str(ROOT))


def _rounded(row: dict[str, object]) -> dict[str, object]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}


def trained_model(env: dict[str, str]) -> tuple[str, dict[str, object]]:
    """(status, metrics) of the model `homepage train` trained last (its registry row: the newest one
    that is not a baseline served in its place), with ``served`` = what the newest row serves."""
    eng = sa.create_engine(env["DATABASE_URL"])
    with eng.connect() as c:
        found = c.execute(sa.text("SELECT status, metrics FROM models WHERE name = 'ranker' "
                                  "ORDER BY version DESC")).all()
    eng.dispose()
    decoded = [(st, json.loads(m) if isinstance(m, str) else m) for st, m in found]
    status, metrics = next((st, m) for st, m in decoded if (m.get("served") or {}).get("kind") != "baseline")
    return status, {**metrics, "served": decoded[0][1].get("served", {})}


def print_training(bench: str, out: str, metrics: dict[str, object]) -> None:
    """JSON lines of a `homepage train` run: its last line, the publish gate (its table and every
    difference with the best baseline), the served scorer and the residual ranker's dial and
    coefficients."""
    print(json.dumps({"bench": bench, "part": "train_output", "text": out.splitlines()[-1]}))
    gate = metrics.get("gate", {})
    assert isinstance(gate, dict)
    print(json.dumps({"bench": bench, "part": "gate", "passed": gate.get("passed"), "chosen": gate.get("chosen"),
                      "reason": gate.get("reason"), "valid_play_ece": gate.get("valid_play_ece"),
                      "n_users": gate.get("n_users"), "page_size": gate.get("page_size")}))
    for r in gate.get("scorers", []):
        print(json.dumps({"bench": bench, "part": "gate_scorer", **_rounded(r)}))
    for d in gate.get("differences_vs_best_baseline", []):
        print(json.dumps({"bench": bench, "part": "gate_diff", **_rounded(d)}))
    print(json.dumps({"bench": bench, "part": "served_scorer", **metrics.get("served", {})}, default=str))
    if metrics.get("model") == "residual":
        print(json.dumps({"bench": bench, "part": "residual", "pop_exponent": metrics["pop_exponent"],
                          "inner_split": metrics["inner_split"], "coef": metrics["coef"]}))


def print_evaluation(bench: str, env: dict[str, str], tmp: Path, n_boot: int) -> dict[str, object]:
    """`homepage evaluate` (JSON into ``tmp``) and its rows as JSON lines; returns its result."""
    cli(env, "evaluate", "--n-boot", str(n_boot), "--json", str(tmp / "eval.json"), "--out", str(tmp / "ev"))
    res = json.loads((tmp / "eval.json").read_text())
    for r in res["scorers"]:
        print(json.dumps({"bench": bench, "part": "evaluate", "n_users": res["n_users"], "page_size": res["page_size"],
                          "best_baseline": res["best_baseline"], **_rounded(r)}))
    for d in res["differences_vs_best_baseline"]:
        print(json.dumps({"bench": bench, "part": "evaluate_diff", **_rounded(d)}))
    return dict(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="folder with ml-100k.inter/.item or u.data/u.item (default: from the recbole wheel)")
    ap.add_argument("--synthetic", type=int, metavar="N_RATINGS",
                    help="a synthetic MovieLens-1M-sized log of about N_RATINGS ratings instead (a scale check)")
    ap.add_argument("--synthetic-items", type=int, default=3706, metavar="N",
                    help="movies in the synthetic log's catalog (default: MovieLens-1M's 3,706)")
    ap.add_argument("--synthetic-users", type=int, default=6040, metavar="N",
                    help="users in the synthetic log (default: MovieLens-1M's 6,040)")
    ap.add_argument("--max-epochs", type=int, default=10)
    ap.add_argument("--interaction", choices=("cin", "cross"), default="cross", help="torch ranker only")
    ap.add_argument("--model", choices=("residual", "torch"), default="residual")
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--work", help="keep the converted files and the database in this folder (default: a temporary one)")
    ap.add_argument("--import-only", action="store_true", help="stop after the import (with --work: for experiments)")
    ap.add_argument("--skip-served", action="store_true",
                    help="skip the served-page check (past-only import -> train -> the engine's decisions)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(args.work or t)
        tmp.mkdir(parents=True, exist_ok=True)
        data = (synthetic(Path(t) / "synthetic", args.synthetic, args.synthetic_users, args.synthetic_items) if args.synthetic else
                Path(args.data) if args.data else fetch(Path(t)))
        ratings, meta = read(data)
        ts = ratings[:, 3].astype(np.float64)
        cutoff = np.sort(ts)[int(ts.size * 0.8)]
        past = ts < cutoff
        ids = sorted(meta, key=int)
        count = {i: 1 for i in ids}
        for i in ratings[past, 1].tolist():
            count[str(i)] += 1
        years = np.array([float(meta[i][1]) if meta[i][1].isdigit() else np.nan for i in ids])
        years = np.where(np.isnan(years), np.nanmean(years), years)
        z = (years - years.mean()) / years.std()
        with (tmp / "items.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["item_id", "category", "popularity", *[f"g_{g}" for g in GENRES], "year"])
            for k, i in enumerate(ids):
                g = meta[i][0]
                w.writerow([i, category(g), count[i], *[int(x in g) for x in GENRES], round(float(z[k]), 4)])
        event = np.where(ratings[:, 2] >= 5, "favorite", np.where(ratings[:, 2] >= 4, "play", "skip"))
        with (tmp / "ratings.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["user_id", "item_id", "event", "timestamp"])
            w.writerows(zip(ratings[:, 0].tolist(), ratings[:, 1].tolist(), event.tolist(), ratings[:, 3].tolist(),
                            strict=True))
        (tmp / "homepage.toml").write_text(CONFIG)
        env = cli_env(tmp)
        cli(env, "catalog", "load", str(tmp / "items.csv"))
        cli(env, "config", "apply", str(tmp / "homepage.toml"))
        t0 = time.perf_counter()
        cli(env, "import", str(tmp / "ratings.csv"))
        import_s = time.perf_counter() - t0
        if args.import_only:
            print(json.dumps({"bench": "real_data", "ratings": int(ts.size), "import_s": round(import_s, 2),
                              "load_1m": os.getloadavg()[0]}))
            return
        t0 = time.perf_counter()
        out = cli(env, "train", "--max-epochs", str(args.max_epochs), "--interaction", args.interaction,
                  "--report-dir", str(tmp / "report"), *(["--model", args.model] if args.model != "residual" else []))
        train_s = time.perf_counter() - t0
        status, metrics = trained_model(env)
        print(json.dumps({"bench": "real_data", "ratings": int(ts.size), "users": int(np.unique(ratings[:, 0]).size),
                          "items": len(ids), "import_s": round(import_s, 2), "train_cli_s": round(train_s, 2),
                          "train_fit_s": round(float(metrics["train_s"]), 2), "model_status": status,
                          "best_epoch": metrics.get("best_epoch"), "load_1m": os.getloadavg()[0]}))
        print_training("real_data", out, metrics)
        print_evaluation("real_data", env, tmp, args.n_boot)
        if not args.skip_served:
            served_check(tmp, ratings, cutoff, args)


def served_check(tmp: Path, ratings: np.ndarray, cutoff: float, args: argparse.Namespace) -> None:
    """What `homepage serve` puts on each held-out user's page: a second database holding only the
    ratings before the cutoff (import -> train, timed), then the serving engine's own decisions
    (``DecisionEngine.decide``, the code behind ``GET /layout``: pool, scorer, candidates, pmf with the
    config's exploration, seeded draw) for every held-out user, scored against the same future
    positives as the evaluation's baselines (fitted on the same past)."""
    sys.path.insert(0, str(ROOT))
    import rankers
    from policy_api import jobs, registry
    from policy_api.engine import DecisionEngine, build_state, load_state
    from policy_api.log import Catalog, load_items, make_engine

    past_dir = tmp / "past"
    past_dir.mkdir(exist_ok=True)
    keep = ratings[:, 3] < cutoff
    with (tmp / "ratings.csv").open() as src, (past_dir / "ratings.csv").open("w", newline="") as dst:
        rows = list(csv.reader(src))
        w = csv.writer(dst)
        w.writerow(rows[0])
        w.writerows(r for r in rows[1:] if float(r[3]) < cutoff)
    for name in ("items.csv", "homepage.toml"):
        (past_dir / name).write_bytes((tmp / name).read_bytes())
    (past_dir / "h.db").unlink(missing_ok=True)
    env = cli_env(past_dir)
    cli(env, "catalog", "load", str(past_dir / "items.csv"))
    cli(env, "config", "apply", str(past_dir / "homepage.toml"))
    cli(env, "import", str(past_dir / "ratings.csv"))
    t0 = time.perf_counter()
    out = cli(env, "train", "--report-dir", str(past_dir / "report"))
    train_s = time.perf_counter() - t0
    print(json.dumps({"bench": "real_data", "part": "past_only_train", "ratings": int(keep.sum()),
                      "train_cli_s": round(train_s, 2), "load_1m": os.getloadavg()[0],
                      "text": [x for x in out.splitlines() if x.startswith(("SERVED SCORER", "published", "trained"))]}))
    full = make_engine(f"sqlite:///{tmp / 'h.db'}")
    past = make_engine(env["DATABASE_URL"])
    serve_dir = tmp / "serve"  # the trained past-only database as it stands, for `homepage serve` below
    serve_dir.mkdir(exist_ok=True)
    (serve_dir / "homepage.db").unlink(missing_ok=True)
    with sqlite3.connect(past_dir / "h.db") as src, sqlite3.connect(serve_dir / "homepage.db") as dst:
        src.backup(dst)
    (serve_dir / "homepage.toml").write_bytes((past_dir / "homepage.toml").read_bytes())
    cfg = registry.require_active_config(full)
    catalog = Catalog.from_arrays(load_items(full))
    ev = jobs.log_events(full, catalog)
    h = jobs.holdout_split(ev["user"], ev["item"], ev["ts"], ev["type"], event_weights=cfg.config.event_weight_vector(),
                           n_users=ev["n_users"], n_items=catalog.n_items, cutoff=float(cutoff))
    state = build_state(cfg.config, catalog)
    base = jobs.evaluate_pages(state, h, jobs.baseline_scorers(h, state.item_category), n_boot=args.n_boot)
    index = catalog.index_of()
    k = cfg.config.items_per_module
    # as configured (exploration budget 0.05, softmax temperature 0.1, tilt levels), then with the
    # exploration and the tilt switched off: the layout the evaluation assumes (the tilt-0 argmax)
    greedy = (past_dir / "homepage.toml").read_text().replace("levels = [0.0, 0.25, 0.5]", "levels = [0.0]")
    greedy += "\n[exploration]\nbudget = 0.0\ntemperature = 0.0\n"
    for setting in ("as_configured", "no_exploration"):
        if setting == "no_exploration":
            registry.activate_config(past, greedy, author="bench")
        engine = DecisionEngine(load_state(past))
        pages = np.full((h.users.size, cfg.config.slots * k), -1)
        t0 = time.perf_counter()
        for r, u in enumerate(h.users.tolist()):  # one request per held-out user, as GET /layout serves it
            d = engine.decide(ev["user_ids"][u], f"bench-{r}")
            for m in d.modules:
                got = [index[it["item_id"]] for it in m["items"]]
                pages[r, m["slot"] * k:m["slot"] * k + len(got)] = got
        decide_s = time.perf_counter() - t0
        met = rankers.page_metrics(pages, h.positives, n_items=catalog.n_items)
        print(json.dumps({"bench": "real_data", "part": "served_by_engine", "setting": setting,
                          "scorer": engine.state.scorer.name, "n_users": int(h.users.size),
                          "recall": round(float(np.mean(met["recall"])), 4), "ndcg": round(float(np.mean(met["ndcg"])), 4),
                          "hr": round(float(np.mean(met["hit"])), 4), "decide_ms": round(1000 * decide_s / h.users.size, 2)}))
        for b in jobs.BASELINE_SCORERS:
            for metric in ("recall", "ndcg"):
                d = rankers.paired_bootstrap(met[metric], base.per_user[b][metric], n_boot=args.n_boot, seed=0)
                print(json.dumps({"bench": "real_data", "part": "served_vs_baseline", "setting": setting, "baseline": b,
                                  "metric": metric, "baseline_value": round(float(np.mean(base.per_user[b][metric])), 4),
                                  **{x: round(float(d[x]), 4) for x in ("mean_diff", "ci_low", "ci_high")}}))
    served_by_api(serve_dir, h, ev["user_ids"], index, base, args)
    full.dispose()
    past.dispose()


def served_by_api(folder: Path, h: Any, user_ids: list[str], index: dict[str, int], base: Any,
                  args: argparse.Namespace) -> None:
    """What an independent client sees: ``homepage serve`` (its loop on, the config as written) on the
    trained past-only database, one ``GET /layout?user_id=`` per held-out user in turn, each page
    judged against the user's future positives next to the baselines' evaluated pages."""
    import requests
    from live_loop import Server

    import rankers

    server = Server(folder, workers=2)
    server.start()
    try:
        ready_s = server.wait_ready()
        sess = requests.Session()
        pages = None
        t0 = time.perf_counter()
        for r, u in enumerate(h.users.tolist()):
            body = sess.get(f"{server.url}/layout", params={"user_id": user_ids[u]}, timeout=30).json()
            mods = body["modules"]
            k = max(len(m["items"]) for m in mods)
            if pages is None:
                pages = np.full((h.users.size, len(mods) * k), -1)
            for m in mods:
                got = [index[it["item_id"]] for it in m["items"]]
                pages[r, m["slot"] * k:m["slot"] * k + len(got)] = got
        per_request_ms = 1000 * (time.perf_counter() - t0) / h.users.size
        readyz = server.get_json("/readyz")
    finally:
        server.stop()
    met = rankers.page_metrics(pages, h.positives, n_items=h.n_items)
    print(json.dumps({"bench": "real_data", "part": "served_by_api", "n_users": int(h.users.size),
                      "ready_s": round(ready_s, 1), "ms_per_request": round(per_request_ms, 2),
                      "versions": body.get("versions"), "recall": round(float(np.mean(met["recall"])), 4),
                      "ndcg": round(float(np.mean(met["ndcg"])), 4), "hr": round(float(np.mean(met["hit"])), 4),
                      "loop_live": ((readyz.get("body") or {}).get("loop") or {}).get("live")}))
    from policy_api import jobs

    for b in jobs.BASELINE_SCORERS:
        for metric in ("recall", "ndcg"):
            d = rankers.paired_bootstrap(met[metric], base.per_user[b][metric], n_boot=args.n_boot, seed=0)
            print(json.dumps({"bench": "real_data", "part": "api_vs_baseline", "baseline": b, "metric": metric,
                              "baseline_value": round(float(np.mean(base.per_user[b][metric])), 4),
                              **{x: round(float(d[x]), 4) for x in ("mean_diff", "ci_low", "ci_high")}}))


if __name__ == "__main__":
    main()
