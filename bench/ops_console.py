"""Cost of the operator pages: the incremental aggregate behind ``/ops`` and ``/exposure`` against a
full scan of the window (what ``/exposure`` did before), as the log grows.

For each log size N (decisions in the last hour, SQLite, 16 candidates each): the full scan's time
(``jobs.exposure_report``), the aggregate's first catch-up, one tick after 1,000 new decisions, and
one request's read (``OpsAggregate.series`` + shares), which must not grow with N.

Prints JSON lines. Usage: python bench/ops_console.py [--sizes 2000,20000,100000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from allocator import parse_config_text
from policy_api.jobs import exposure_report
from policy_api.log import insert_decisions, make_engine, upgrade
from policy_api.serving._console import OpsAggregate
from simulator import make_world


def rows(n: int, cfg, rng: np.random.Generator, now: float, span_s: float) -> list[dict]:
    K, L, S = len(cfg.constraints), 16, cfg.slots
    mods = [m.id for m in cfg.modules]
    out = []
    ts = now - rng.uniform(0, span_s, n)
    for i in range(n):
        pmf = rng.dirichlet(np.ones(L))
        chosen = int(rng.integers(L))
        out.append({
            "request_id": f"r{i}-{rng.integers(1 << 62)}", "ts": datetime.fromtimestamp(ts[i], tz=UTC),
            "user_id": f"u{i % 5000}", "context": {"shared": rng.random(4).round(4).tolist()},
            "versions": {"config": 1, "plan": 1}, "policy": "bench",
            "candidates": [{"modules": list(rng.choice(mods, S, replace=False)), "tilt": 0.0,
                            "value": float(rng.random()), "score": float(rng.random()),
                            "exposure": rng.random(K).round(6).tolist()} for _ in range(L)],
            "pmf": pmf.tolist(), "chosen": chosen, "propensity": float(pmf[chosen]), "layout": None,
            "fallback_reason": None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="2000,20000,100000")
    args = ap.parse_args()
    cfg = parse_config_text(make_world(n_users=50, n_items=400, seed=3).default_config_toml())
    rng = np.random.default_rng(0)
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'log.db'}"
            upgrade(url)
            db = make_engine(url)
            now = time.time()
            for k in range(0, n, 5000):
                insert_decisions(db, rows(min(5000, n - k), cfg, rng, now, 3000.0))
            t0 = time.perf_counter()
            ref = exposure_report(db, cfg, 1, 3600.0)
            scan_s = time.perf_counter() - t0
            agg = OpsAggregate(db, max_window_s=3600.0, history_every_s=1e9)
            t0 = time.perf_counter()
            agg.tick()
            catch_up_s = time.perf_counter() - t0
            insert_decisions(db, rows(1000, cfg, rng, time.time(), 5.0))
            t0 = time.perf_counter()
            read = agg.tick()
            tick_s = time.perf_counter() - t0
            reps = 200
            t0 = time.perf_counter()
            for _ in range(reps):
                shares = agg.series(1, 3600.0, n_constraints=len(cfg.constraints)).shares()
            request_us = (time.perf_counter() - t0) / reps * 1e6
            after = exposure_report(db, cfg, 1, 3600.0)  # the reference, with the new rows
            want = np.array([c["realised"] for c in after["constraints"]], dtype=float)
            assert after["decisions"] == ref["decisions"] + 1000
            print(json.dumps({"decisions": n, "full_scan_s": round(scan_s, 3), "catch_up_s": round(catch_up_s, 3),
                              "tick_1000_new_s": round(tick_s, 3), "tick_rows_read": read,
                              "request_us": round(request_us, 1),
                              "max_abs_diff_vs_full_scan": float(np.abs(shares - want).max())}))
            db.dispose()


if __name__ == "__main__":
    main()
