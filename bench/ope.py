"""Benchmark the off-policy estimators: rows/s on precomputed arrays and bootstrap time.

Prints one JSON line per measurement. Not a test: figures only.

    .venv/bin/python bench/ope.py                  # 10^7 rows x 16 candidates, bootstrap on 10^6
    .venv/bin/python bench/ope.py --rows 1000000   # smaller
    .venv/bin/python bench/ope.py --partitions 4 --rows 1000000   # only: Parquet partitions, local vs Ray

Each ``estimate`` call includes input validation (row sums, ranges), the weights, the influence
terms and the overlap diagnostics (weight quantiles). Targets: >= 5e6 rows/s for IPS/SNIPS/DR, and
<= 10 s for 200 bootstrap resamples over 10^6 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bandits import DR, IPS, SNDR, SNIPS, bootstrap_ci, estimate_all


def make_log(n_rounds: int, n_cand: int, seed: int = 0):
    """A logged-candidates log: uniform-ish logging propensities, a random target policy."""
    rng = np.random.default_rng(seed)
    action_dist = rng.random((n_rounds, n_cand))
    action_dist /= action_dist.sum(axis=1, keepdims=True)
    action = rng.integers(0, n_cand, n_rounds)
    pscore = rng.uniform(0.5, 1.5, n_rounds) / n_cand
    reward = rng.normal(size=n_rounds)
    estimated_rewards = rng.normal(size=(n_rounds, n_cand))
    return reward, action, pscore, action_dist, estimated_rewards


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_partitions(n_parts: int, rows: int, n_cand: int, n_boot: int) -> None:
    """Replay over a time-partitioned Parquet log generated here: in this process, then on 2 Ray actors."""
    import tempfile
    from pathlib import Path

    import ray

    from policy_api.scale import RayShards, replay_partitions, write_ope_partition

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        paths = []
        for i in range(n_parts):
            p = Path(tmp) / f"2026-11-30T{i:02d}.parquet"
            write_ope_partition(p, *make_log(rows, n_cand, seed=10 + i))
            paths.append(str(p))
        print(json.dumps({"bench": "ope.partitions.write", "partitions": n_parts, "rows": n_parts * rows,
                          "n_cand": n_cand, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
        out = {}
        for engine in ("local", "ray"):
            if engine == "ray":
                ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
                RayShards([lambda: 0], n_workers=1).close()  # cluster and worker start-up, not timed below
            t0 = time.perf_counter()
            out[engine] = replay_partitions(paths, engine=engine, workers=2, n_boot=n_boot, seed=0)
            s = time.perf_counter() - t0
            print(json.dumps({"bench": "ope.partitions.replay", "engine": engine, "workers": 1 if engine == "local"
                              else 2, "rows": n_parts * rows, "n_cand": n_cand, "n_boot": n_boot,
                              "seconds_incl_read": round(s, 2), "rows_per_s": round(n_parts * rows / s)}), flush=True)
            if engine == "ray":
                ray.shutdown()
        diff = max(abs(a["value"] - b["value"]) for a, b in zip(out["local"], out["ray"], strict=True))
        print(json.dumps({"bench": "ope.partitions.agreement", "max_value_abs_diff": diff}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--n-cand", type=int, default=16)
    ap.add_argument("--boot-rows", type=int, default=1_000_000)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=0,
                    help="only: replay over this many Parquet partitions of --rows rows, local vs Ray")
    args = ap.parse_args()
    if args.partitions:
        bench_partitions(args.partitions, args.rows, args.n_cand, 0)
        return

    t0 = time.perf_counter()
    r, a, p, pi, q = make_log(args.rows, args.n_cand)
    print(json.dumps({"bench": "ope.make_log", "rows": args.rows, "n_cand": args.n_cand,
                      "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    for est in (IPS(), SNIPS(), DR(), SNDR()):
        needs = est.needs_model
        s = best_of(lambda est=est, needs=needs: est.estimate(r, a, p, pi, q if needs else None), args.repeats)
        print(json.dumps({"bench": "ope.estimate", "estimator": est.name, "rows": args.rows,
                          "n_cand": args.n_cand, "seconds": round(s, 3), "rows_per_s": round(args.rows / s),
                          "target_rows_per_s": 5_000_000}), flush=True)
    s = best_of(lambda: estimate_all(r, a, p, pi, q), 1)
    print(json.dumps({"bench": "ope.estimate_all", "estimators": 6, "rows": args.rows, "seconds": round(s, 3),
                      "rows_per_s": round(args.rows / s)}), flush=True)
    del r, a, p, pi, q

    n = args.boot_rows
    r, a, p, pi, q = make_log(n, args.n_cand, seed=1)
    for est in (IPS(), SNIPS(), DR()):
        needs = est.needs_model
        t0 = time.perf_counter()
        ci = bootstrap_ci(est, r, a, p, pi, q if needs else None, n_boot=args.n_boot,
                          rng=np.random.default_rng(0))
        s = time.perf_counter() - t0
        print(json.dumps({"bench": "ope.bootstrap", "estimator": est.name, "rows": n, "n_boot": args.n_boot,
                          "seconds": round(s, 2), "target_seconds": 10.0, "ci": [round(ci.low, 5), round(ci.high, 5)]}),
              flush=True)
    t0 = time.perf_counter()
    estimate_all(r, a, p, pi, q, n_boot=args.n_boot, rng=np.random.default_rng(0))
    print(json.dumps({"bench": "ope.bootstrap_all", "estimators": 6, "rows": n, "n_boot": args.n_boot,
                      "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    print(json.dumps({"bench": "ope.uptime", "loadavg": [round(x, 2) for x in os.getloadavg()],
                      "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
