"""Benchmark the VW layout bandit: choose latency and learning throughput.

Prints one JSON line per measurement. Not a test: figures only.

    .venv/bin/python bench/bandit.py
    .venv/bin/python bench/bandit.py --algorithms squarecb --decisions 5000

Features are shaped like the engine's: shared = [known user, 4 category preferences] (d_s = 5);
each of the 16 candidates = category one-hot for 6 slots x 4 categories + tilt + value + priced score
(d_a = 27, 9 non-zero). ``choose`` = ``predict`` (VW pmf) + ``budget_pmf`` + ``sample``, one request at
a time. ``learn_batch`` includes building the VW examples from the arrays. Targets: choose p99 <=
0.5 ms, learning >= 10,000 decisions/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from bandits import VWLayoutBandit, budget_pmf, sample

N_SLOTS, N_CATS, N_CAND = 6, 4, 16


def make_decisions(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    shared = np.column_stack([np.ones(n), rng.dirichlet(np.ones(N_CATS), size=n)])
    cats = rng.integers(0, N_CATS, size=(n, N_CAND, N_SLOTS))
    onehot = np.zeros((n, N_CAND, N_SLOTS, N_CATS))
    np.put_along_axis(onehot, cats[..., None], 1.0, axis=-1)
    tilt = rng.choice([0.0, 0.5, 1.0], size=(n, N_CAND, 1))
    value = rng.uniform(0.2, 1.0, size=(n, N_CAND, 1))
    score = value + rng.normal(scale=0.1, size=(n, N_CAND, 1))
    actions = np.concatenate([onehot.reshape(n, N_CAND, -1), tilt, value, score], axis=2)
    # a reward that depends on user preference x category, so learning has something to find
    pref_of_layout = np.einsum("nc,nksc->nk", shared[:, 1:], onehot) / N_SLOTS
    mean = pref_of_layout + 0.3 * value[..., 0]
    return shared, actions, mean, rng


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithms", default="squarecb,epsilon,bag,cover")
    ap.add_argument("--decisions", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=5000)
    args = ap.parse_args()
    n = args.decisions
    shared, actions, mean, rng = make_decisions(n + args.requests)
    chosen = rng.integers(0, N_CAND, n + args.requests)
    cost = -(mean[np.arange(n + args.requests), chosen] + rng.normal(scale=0.1, size=n + args.requests))
    pscore = np.full(n + args.requests, 1.0 / N_CAND)
    for algorithm in args.algorithms.split(","):
        bandit = VWLayoutBandit(algorithm, seed=1)
        t0 = time.perf_counter()
        bandit.learn_batch(shared[:n], actions[:n], chosen[:n], cost[:n], pscore[:n])
        dt = time.perf_counter() - t0
        print(json.dumps({"bench": "bandit.learn_batch", "algorithm": algorithm, "decisions": n,
                          "n_cand": N_CAND, "seconds": round(dt, 3), "decisions_per_s": round(n / dt),
                          "target_decisions_per_s": 10_000}), flush=True)
        t0 = time.perf_counter()
        m = min(2000, args.requests)
        for i in range(n, n + m):
            bandit.learn(shared[i], actions[i], int(chosen[i]), float(cost[i]), float(pscore[i]))
        dt = time.perf_counter() - t0
        print(json.dumps({"bench": "bandit.learn_one", "algorithm": algorithm, "decisions": m,
                          "decisions_per_s": round(m / dt)}), flush=True)
        # wall clock and this thread's CPU time: on an oversubscribed machine the wall-clock tail is
        # the scheduler's time slice, the CPU-time tail is the code's
        wall = np.empty((args.requests, 2), dtype=np.int64)
        cpu = np.empty((args.requests, 2), dtype=np.int64)
        for r, i in enumerate(range(n, n + args.requests)):
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            pmf = bandit.predict(shared[i], actions[i])
            t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
            q = budget_pmf(pmf, int(np.argmax(actions[i, :, -1])), 0.05, value=actions[i, :, -2], max_value_loss=0.02)
            sample(q, 10_000_019 * i)
            t2, c2 = time.perf_counter_ns(), time.thread_time_ns()
            wall[r] = t1 - t0, t2 - t0
            cpu[r] = c1 - c0, c2 - c0
        for k, name in enumerate(("bandit.predict", "bandit.choose")):
            ms, cms = wall[:, k] / 1e6, cpu[:, k] / 1e6
            print(json.dumps({"bench": name, "algorithm": algorithm, "n_cand": N_CAND, "requests": ms.size,
                              "p50_ms": round(float(np.percentile(ms, 50)), 4),
                              "p99_ms": round(float(np.percentile(ms, 99)), 4),
                              "max_ms": round(float(ms.max()), 3),
                              "cpu_p50_ms": round(float(np.percentile(cms, 50)), 4),
                              "cpu_p99_ms": round(float(np.percentile(cms, 99)), 4),
                              "target_p99_ms": 0.5}), flush=True)
    print(json.dumps({"bench": "bandit.uptime", "loadavg": [round(x, 2) for x in os.getloadavg()],
                      "cpus": os.cpu_count()}), flush=True)


if __name__ == "__main__":
    main()
