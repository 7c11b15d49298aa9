"""One request's scoring with the published history scorer (the residual ranker ``homepage train``
publishes, or the baseline published in its place): ``HistoryScorer.score_live`` over a 600-item pool
for the log's heaviest users, users of median history and users unknown to the model. Prints one
JSON line per group: the best of 5 passes' mean ms per request (1 thread).

Usage: python bench/history_scoring.py --db URL   (a database with a published ranker, e.g. the one
``bench/real_data.py --work DIR`` leaves in DIR/h.db)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import sqlalchemy as sa


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--users", type=int, default=50, help="users per group")
    a = ap.parse_args()

    from policy_api.engine import load_state
    from policy_api.log import make_engine

    db = make_engine(a.db)
    st = load_state(db)
    handle = st.scorer
    hist = handle.scorer
    pool = np.random.default_rng(0).choice(hist.n_items_, min(600, hist.n_items_), replace=False)
    with db.connect() as c:
        counts = c.execute(sa.text("SELECT user_id, COUNT(*) AS n FROM decisions GROUP BY user_id ORDER BY n DESC")).all()
    mid = len(counts) // 2
    groups = {"heaviest": counts[:a.users], "median": counts[mid:mid + a.users]}
    for name, rows in groups.items():
        users = [handle.user_idx(str(u)) for u, _ in rows]
        emit(name, hist, users, pool, int(np.median([n for _, n in rows])))
    emit("unknown", hist, [-1] * a.users, pool, 0)
    db.dispose()


def emit(group: str, hist: object, users: list[int], pool: np.ndarray, events: int) -> None:
    for u in users[:5]:
        hist.score_live(u, pool)  # warm
    best = np.inf
    for _ in range(5):
        t = time.perf_counter()
        for u in users:
            hist.score_live(u, pool)
        best = min(best, (time.perf_counter() - t) / len(users))
    print(json.dumps({"bench": "history_scoring", "scorer": hist.kind, "group": group, "median_events": events,
                      "pool": int(pool.size), "ms_per_request": round(best * 1e3, 3),
                      "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
