"""Ranker benchmark: training throughput (examples/s) at 1 and 2 torch threads for a ~1M-parameter
model with the CIN and the cross interaction, and the latency of scoring 500 candidates for one user.

Prints one JSON line per figure. Not a test. On a shared machine compare figures from one run only,
and note the load (the last line carries ``os.getloadavg()``).

    .venv/bin/python bench/ranker.py [--requests 6000] [--repeats 300]

(Not ``rankers.py``: a script's folder comes first on ``sys.path``, so that name would shadow the
``rankers`` package for every bench script that imports it.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from rankers import (
    RankerScorer,
    TrainConfig,
    build_examples,
    fit,
    split_by_time,
)
from simulator import exposure_log, make_world


def world_log(world, n_requests: int, rng: np.random.Generator, popularity_bias: float = 0.5):
    """Impressions and events from the simulator under a popularity-biased exposure policy."""
    return exposure_log(world, n_requests, rng, popularity_bias)


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20000)
    ap.add_argument("--items", type=int, default=30000)
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()

    world = make_world(n_users=args.users, n_items=args.items, seed=0)
    rng = np.random.default_rng(0)
    imp, ev = world_log(world, args.requests, rng)
    ex = build_examples(
        imp,
        ev,
        n_users=world.n_users,
        n_items=world.n_items,
        item_category=world.item_category,
        item_features=world.item_features,
        popularity=world.popularity,
    )
    train, valid, _ = split_by_time(ex, valid=0.05, test=0.0)
    emit(what="data", train_examples=len(train), valid_examples=len(valid))

    models = {}
    for interaction in ("cin", "cross"):
        for threads in (1, 2):
            config = TrainConfig(interaction=interaction, threads=threads, max_epochs=2, patience=5)
            model, history = fit(train, valid, config)
            models[interaction] = model
            emit(
                what="train_throughput",
                interaction=interaction,
                threads=threads,
                n_params=history.n_params,
                examples_per_s=round(history.examples_per_s),
                epochs=len(history.train_loss),
            )

    candidates = np.random.default_rng(1).choice(world.n_items, size=(args.repeats, 500))
    users = world.sample_users(args.repeats, np.random.default_rng(2))
    for interaction, model in models.items():
        for threads in (1, 2):
            scorer = RankerScorer(model, world.event_weights, train.history, threads=threads)
            for r in range(10):  # warm-up
                scorer.score(int(users[r]), candidates[r])
            times = np.empty(args.repeats)
            for r in range(args.repeats):
                t0 = time.perf_counter()
                scorer.score(int(users[r]), candidates[r])
                times[r] = (time.perf_counter() - t0) * 1000.0
            emit(
                what="score_500_candidates",
                interaction=interaction,
                threads=threads,
                p50_ms=round(float(np.percentile(times, 50)), 3),
                p99_ms=round(float(np.percentile(times, 99)), 3),
            )
    emit(what="load", loadavg=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count())


if __name__ == "__main__":
    main()
