"""The learner end to end: read the decision log from SQL, parse it, join rewards in the window, build
features and learn the VW bandit. Prints JSON lines (decisions/s per stage and in total).

Target: learner >= 10,000 decisions/s including parsing. Measured in one run on the same log, the
paths in alternation: the learner's path before the stream (the whole log read and parsed, every
candidate field, the reward query beside the read; then features; then VW learns) and the stream
(``homepage learn``'s path now: chunks of 4,096 decisions, the learner's candidate fields only, the
next chunk read and parsed in one thread and joined to its rewards in another while VW learns the
current one). ``--all`` adds the earlier paths: decisions stored one object per candidate with every
behaviour event read and joined in numpy, and the reward join in SQL after the read.
Usage: python bench/learn.py [--decisions N] [--keep DIR] [--rounds R] [--all]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np


def build_log(url: str, n: int) -> None:
    """A real log: engine decisions (16+ candidates each) and simulator feedback, written through the store."""
    from allocator import parse_config_text
    from policy_api.engine import DecisionEngine, RequestIds, build_state
    from policy_api.log import Catalog, insert_decisions, insert_feedback, make_engine, upgrade, upsert_items
    from policy_api.registry import activate_config
    from simulator import make_world

    world = make_world(n_users=2000, n_items=3000, seed=0)
    text = world.default_config_toml()
    cfg = parse_config_text(text)
    cat = Catalog(np.asarray(world.item_ids, dtype=object),
                  np.array([world.categories[c] for c in world.item_category], dtype=object),
                  np.asarray(world.popularity, float), np.asarray(world.item_features, float),
                  tuple(world.item_feature_names))
    upgrade(url)
    db = make_engine(url)
    upsert_items(db, cat.rows())
    version = activate_config(db, text, author="bench")
    eng = DecisionEngine(build_state(cfg, cat, prices=np.array([0.3, 0.5]), versions={"config": version}))
    ids = RequestIds(b"bench")
    rng = np.random.default_rng(0)
    users = world.sample_users(n, rng)
    index = {iid: i for i, iid in enumerate(world.item_ids.tolist())}
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    decisions, feedback = [], []
    for k in range(n):  # building the fixture log is not timed
        d = eng.decide(str(world.user_ids[users[k]]), ids.issue())
        row = d.row()
        row["ts"] = t0 + timedelta(milliseconds=10 * k)
        decisions.append(row)
        page = np.full((world.n_slots, world.items_per_module), -1)
        for m in d.modules:
            its = [index[i["item_id"]] for i in m["items"]]
            page[m["slot"], :len(its)] = its
        for j, (s, it, e) in enumerate(world.sample_feedback(int(users[k]), page, rng)):
            feedback.append({"event_id": f"{d.request_id}:{j}", "request_id": d.request_id, "slot": s,
                             "item_id": str(world.item_ids[it]), "type": e, "value": None,
                             "ts": row["ts"] + timedelta(seconds=1), "received_at": row["ts"]})
        if len(decisions) >= 2000:
            insert_decisions(db, decisions)
            insert_feedback(db, feedback)
            decisions, feedback = [], []
    insert_decisions(db, decisions)
    insert_feedback(db, feedback)


def old_form_copy(url: str, path: Path) -> str:
    """The same log with its decisions stored as before the columnar encoding (one object per
    candidate), for the same-run comparison."""
    import sqlite3

    import sqlalchemy as sa

    from policy_api.log import DECISION_COLUMNS, decisions, make_engine, read_decisions

    with sqlite3.connect(str(sa.make_url(url).database)) as src, sqlite3.connect(path) as dst:
        src.backup(dst)  # a snapshot with what is still in the write-ahead log
    copy = f"sqlite:///{path}"
    db = make_engine(copy)
    cols = read_decisions(db)
    plain = {c: (cols[c].tolist() if hasattr(cols[c], "tolist") else cols[c]) for c in DECISION_COLUMNS}
    plain["ts"] = [t.replace(tzinfo=UTC) for t in cols["ts"].astype("datetime64[us]").tolist()]
    plain["chosen"] = [int(v) for v in plain["chosen"]]
    rows = [{c: plain[c][i] for c in DECISION_COLUMNS} for i in range(len(plain["request_id"]))]
    with db.begin() as conn:
        conn.execute(sa.delete(decisions))
        conn.execute(sa.insert(decisions), rows)  # the table's JSON type writes the list as is
    db.dispose()
    return copy


def measure(url: str, path: str, label: str) -> dict:
    """``path``: "numpy" (events read and joined here), "sql-serial" (the decisions read, then the
    reward query), "sql" (the reward query beside the read of the whole log), "stream" (the
    learner's: chunks read, joined and learned in a pipeline)."""
    from policy_api.jobs import load_log, log_features, new_bandit
    from policy_api.log import iter_log_rewards, make_engine, read_decision_log, read_rewards
    from policy_api.registry import require_active_config

    db = make_engine(url)
    active = require_active_config(db)
    version, cfg = active.version, active.config

    def read() -> tuple:
        # the learner's read: without each candidate's module ids (homepage learn does the same)
        if path == "sql-serial":
            dlog = read_decision_log(db, cfg, None, None, version)
            return dlog, read_rewards(db, dlog, cfg)
        return load_log(db, cfg, None, None, version, with_modules=False, sql_join=path == "sql")

    if path == "stream":
        for _ in iter_log_rewards(db, cfg, None, None, version):  # warm imports and caches
            pass
        bandit = new_bandit(cfg)
        rewards, wait, feat, learn = [], 0.0, 0.0, 0.0
        t0, cpu0 = time.perf_counter(), time.process_time()
        chunks = iter_log_rewards(db, cfg, None, None, version)
        while True:  # homepage learn's loop (jobs.learn), without publishing the model
            ta = time.perf_counter()
            item = next(chunks, None)
            tb = time.perf_counter()
            wait += tb - ta
            if item is None:
                break
            dlog, rw = item
            shared, actions = log_features(dlog, cfg)
            tc = time.perf_counter()
            bandit.learn_batch(shared, actions, dlog.action, -rw.reward, dlog.pscore, dlog.n_cand)
            feat, learn = feat + tc - tb, learn + time.perf_counter() - tc
            rewards.append(rw.reward)
        total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        db.dispose()
        reward = np.concatenate(rewards)
        n = reward.size
        return {"bench": "learn_end_to_end", "path": label, "decisions": n, "mean_reward": round(float(reward.mean()), 9),
                "model_sha256": hashlib.sha256(bandit.save()).hexdigest()[:16],
                "waiting_for_chunks_s": round(wait, 3), "features_s": round(feat, 3), "vw_learn_s": round(learn, 3),
                "total_s": round(total, 3), "cpu_s": round(cpu, 3), "decisions_per_s": round(n / total),
                "target_decisions_per_s": 10000,
                "load_avg_1m": round(os.getloadavg()[0], 2)}

    read()  # warm imports and caches
    t0, cpu0 = time.perf_counter(), time.process_time()
    dlog, rw = read()
    t1 = time.perf_counter()
    shared, actions = log_features(dlog, cfg)
    t2 = time.perf_counter()
    bandit = new_bandit(cfg)
    bandit.learn_batch(shared, actions, dlog.action, -rw.reward, dlog.pscore, dlog.n_cand)
    t3, cpu = time.perf_counter(), time.process_time() - cpu0
    db.dispose()
    n = len(dlog)
    return {"bench": "learn_end_to_end", "path": label, "decisions": n, "events": rw.n_events,
            "mean_reward": round(float(rw.reward.mean()), 9), "candidates_mean": float(dlog.n_cand.mean()),
            "model_sha256": hashlib.sha256(bandit.save()).hexdigest()[:16],
            "read_parse_join_s": round(t1 - t0, 3), "features_s": round(t2 - t1, 3), "vw_learn_s": round(t3 - t2, 3),
            "total_s": round(t3 - t0, 3), "cpu_s": round(cpu, 3), "decisions_per_s": round(n / (t3 - t0)),
            "target_decisions_per_s": 10000,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--keep", type=Path, default=None,
                    help="a folder for the two logs: built there once, reused by later runs")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the paths in alternation")
    ap.add_argument("--all", action="store_true", help="also the paths before the learner's previous one")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        d = a.keep or Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{d / 'log.db'}"
        t = time.perf_counter()
        if not (d / "old.db").exists():
            build_log(url, a.decisions)
            old_form_copy(url, d / "old.db")
        old = f"sqlite:///{d / 'old.db'}"
        print(json.dumps({"bench": "learn_end_to_end", "fixture_build_s": round(time.perf_counter() - t, 1),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)
        print(json.dumps({"bench": "learn_end_to_end", "utc": datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M"),
                          "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}),
              flush=True)
        for _ in range(a.rounds):  # alternate, so that a change of the machine's load shows
            if a.all:
                # decisions stored one object per candidate, every behaviour event read and joined here
                print(json.dumps(measure(old, "numpy", "object candidates, events joined in numpy")), flush=True)
                # columnar candidates, the reward join in SQL (one row per decision), after the read
                print(json.dumps(measure(url, "sql-serial", "columnar candidates, reward join in SQL after the read")),
                      flush=True)
            # before: the whole log read (every candidate field), the reward query beside the read
            print(json.dumps(measure(url, "sql", "before: whole log, reward join in SQL beside the read")), flush=True)
            # the learner's path: chunks read, parsed and joined in threads while VW learns
            print(json.dumps(measure(url, "stream", "stream: chunks read and joined while VW learns")), flush=True)
        print(json.dumps({"bench": "learn_end_to_end", "utc": datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M"),
                          "load_avg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
