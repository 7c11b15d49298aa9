"""Benchmark the off-policy estimators: rows/s on precomputed arrays and bootstrap time.

Prints one JSON line per measurement. Not a test: figures only.

    .venv/bin/python bench/ope.py                  # 10^7 rows x 16 candidates, bootstrap on 10^6
    .venv/bin/python bench/ope.py --rows 1000000   # smaller
    .venv/bin/python bench/ope.py --partitions 4 --rows 1000000   # only: Parquet partitions, local vs Ray
    .venv/bin/python bench/ope.py --partitions 4 --rows 2500000 --passes 100 --workers 1 2   # 10^9 rows
    .venv/bin/python bench/ope.py --obp /path/to/obp-venv/bin/python   # only: obp 0.4.1 beside ours

``--passes P`` replays the generated partitions ``P`` times over (each pass's partitions get their own
indices, so their bootstrap streams differ), to reach 10^9 logged decisions from a few GB of files;
the report says how many distinct rows and files were read, and how often.

``--obp PYTHON`` runs obp 0.4.1's public calls (IPS, SNIPS, DR, DR-os with ``position``) in another
Python (a throwaway virtual environment: obp 0.4.1 needs numpy < 1.24 and pandas < 2) on the same
saved arrays as ours: the Open Bandit Dataset sample that obp ships ('random' policy, 'all' campaign:
80 actions, 3 positions) tiled to ``--obp-rows`` rows, with a seeded target ``action_dist`` and reward
model of shape (n_rounds, 80, 3).

``--boot-only`` runs only the bootstrap part: on ``--boot-rows`` rows, each estimator's
``bootstrap_ci`` with the multinomial bootstrap (the method and code of before the Poisson default,
same draws) and the Poisson bootstrap (the default) alternately, best of ``--repeats``, their ratio,
and where the time goes (drawing the counts alone vs the whole call); with the load average and the
time of day, since the machine is shared.

Each ``estimate`` call includes input validation (row sums, ranges), the weights, the influence
terms and the overlap diagnostics (weight quantiles). Targets: >= 5e6 rows/s for IPS/SNIPS/DR, and
<= 10 s for 200 bootstrap resamples over 10^6 rows.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import UTC, datetime

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


def bench_partitions(n_parts: int, rows: int, n_cand: int, n_boot: int, passes: int = 1,
                     workers: tuple[int, ...] = (2,), compression: str = "none") -> None:
    """Replay over a time-partitioned Parquet log generated here: one partition in this process (where
    its time goes), all of them in this process (``passes == 1``), then on a Ray pool with each worker
    count; the same files are read ``passes`` times. CPU seconds are the processes' own (user +
    system), which do not depend on other jobs' load the way wall time does."""
    import tempfile
    from pathlib import Path

    import ray

    from policy_api.scale import (
        RayPool,
        iter_ope_batches,
        partition_sums,
        replay_partitions,
        write_ope_partition,
    )

    def load() -> list[float]:
        return [round(x, 2) for x in os.getloadavg()]

    def now() -> str:
        return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    def cpu() -> float:
        t = os.times()
        return t.user + t.system

    print(json.dumps({"bench": "ope.partitions.start", "time": now(), "load": load(), "cpus": os.cpu_count(),
                      "niceness": os.nice(0)}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        files = []
        for i in range(n_parts):
            p = Path(tmp) / f"2026-11-30T{i:02d}.parquet"
            write_ope_partition(p, *make_log(rows, n_cand, seed=10 + i), compression=compression)
            files.append(str(p))
        size = sum(os.path.getsize(f) for f in files)
        print(json.dumps({"bench": "ope.partitions.write", "files": n_parts, "rows": n_parts * rows,
                          "n_cand": n_cand, "compression": compression, "bytes": size,
                          "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
        # where one partition's time goes, on this thread (page cache warm): reading and decoding its
        # batches alone, then reading and reducing them (the replay's per-partition work); best of 3
        partition_sums(files[0], 0)
        best: dict[str, tuple[float, float]] = {}
        for _ in range(3):
            for name in ("read", "read_and_sums"):
                t0, c0 = time.perf_counter(), cpu()
                if name == "read":
                    for _batch in iter_ope_batches(files[0])[1]:
                        pass
                else:
                    partition_sums(files[0], 0)
                got = (time.perf_counter() - t0, cpu() - c0)
                best[name] = min(best.get(name, got), got)
        (rs, rc), (ts, tc) = best["read"], best["read_and_sums"]
        print(json.dumps({"bench": "ope.partitions.one", "rows": rows, "read_s": round(rs, 3),
                          "estimators_s": round(ts - rs, 3), "total_s": round(ts, 3), "rows_per_s": round(rows / ts),
                          "cpu_ns_per_row": {"read": round(1e9 * rc / rows), "estimators": round(1e9 * (tc - rc) / rows),
                                             "total": round(1e9 * tc / rows)},
                          "rows_per_cpu_s": round(rows / tc), "load": load(), "time": now()}), flush=True)
        paths = files * passes
        total = len(paths) * rows
        out = {}
        if passes == 1:
            t0, c0 = time.perf_counter(), cpu()
            out["local"] = replay_partitions(paths, n_boot=n_boot, seed=0)
            s, c = time.perf_counter() - t0, cpu() - c0
            print(json.dumps({"bench": "ope.partitions.replay", "engine": "local", "workers": 1, "rows": total,
                              "n_boot": n_boot, "seconds_incl_read": round(s, 2), "rows_per_s": round(total / s),
                              "cpu_ns_per_row": round(1e9 * c / total), "load": load()}), flush=True)
        ray.init(num_cpus=max(workers), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            for nw in workers:
                t0 = time.perf_counter()
                with RayPool(nw) as pool:
                    start = time.perf_counter() - t0
                    load0, time0 = load(), now()
                    c0 = pool.cpu_seconds()
                    t0 = time.perf_counter()
                    out[f"ray{nw}"] = replay_partitions(paths, engine="ray", n_boot=n_boot, seed=0, pool=pool)
                    s = time.perf_counter() - t0
                    c = sum(pool.cpu_seconds()) - sum(c0)
                    print(json.dumps({"bench": "ope.partitions.replay", "engine": "ray", "workers": nw, "rows": total,
                                      "distinct_rows": n_parts * rows, "files": n_parts, "passes": passes,
                                      "bytes_read": size * passes, "n_boot": n_boot, "actor_start_s": round(start, 2),
                                      "worker_niceness": pool.worker_niceness, "seconds_incl_read": round(s, 2),
                                      "rows_per_s": round(total / s), "worker_cpu_s": round(c, 1),
                                      "cpu_ns_per_row": round(1e9 * c / total), "rows_per_cpu_s": round(total / c),
                                      "load_before": load0, "load_after": load(), "time": time0}), flush=True)
        finally:
            ray.shutdown()
        ref = next(iter(out.values()))
        diff = max(abs(a["value"] - b["value"]) for res in out.values() for a, b in zip(ref, res, strict=True))
        print(json.dumps({"bench": "ope.partitions.agreement", "runs": list(out), "max_value_abs_diff": diff,
                          "time": now()}), flush=True)


#: run by ``--obp PYTHON``: ``data DIR N`` saves the tiled Open Bandit Dataset sample, ``time DIR`` times obp
OBP_SCRIPT = r"""
import json, sys, time, warnings
import numpy as np
warnings.simplefilter("ignore")
import obp
from obp.dataset import OpenBanditDataset
from obp.ope import (DoublyRobust, DoublyRobustWithShrinkage, InverseProbabilityWeighting,
                     SelfNormalizedInverseProbabilityWeighting)
mode, folder = sys.argv[1], sys.argv[2]
if mode == "data":
    n = int(sys.argv[3])
    fb = OpenBanditDataset(behavior_policy="random", campaign="all").obtain_batch_bandit_feedback()
    reps = -(-n // fb["n_rounds"])
    for k in ("reward", "action", "position", "pscore"):
        np.save(f"{folder}/{k}.npy", np.tile(fb[k], reps)[:n])
    print(json.dumps({"obp": obp.__version__, "numpy": np.__version__, "n_rounds_sample": int(fb["n_rounds"]),
                      "n_actions": int(fb["n_actions"]), "len_list": int(fb["position"].max() + 1)}))
else:
    d = {k: np.load(f"{folder}/{k}.npy") for k in ("reward", "action", "position", "pscore", "action_dist",
                                                  "estimated_rewards")}
    lam = float(sys.argv[3])
    base = dict(reward=d["reward"], action=d["action"], position=d["position"], pscore=d["pscore"],
                action_dist=d["action_dist"])
    model = dict(base, estimated_rewards_by_reg_model=d["estimated_rewards"])
    for name, est, kw in (("IPS", InverseProbabilityWeighting(), base),
                          ("SNIPS", SelfNormalizedInverseProbabilityWeighting(), base),
                          ("DR", DoublyRobust(), model), ("DR-os", DoublyRobustWithShrinkage(lambda_=lam), model)):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            v = est.estimate_policy_value(**kw)
            times.append(time.perf_counter() - t0)
        print(json.dumps({"estimator": name, "value": float(v), "seconds": min(times)}), flush=True)
"""


def bench_obp(python: str, rows: int, seed: int = 0, lam: float = 100.0, repeats: int = 3) -> None:
    """obp 0.4.1's public calls in ``python`` beside ours, on the same saved arrays (see the module docstring)."""
    import subprocess
    import tempfile

    from bandits import DRos

    with tempfile.TemporaryDirectory() as tmp:
        info = json.loads(subprocess.run([python, "-c", OBP_SCRIPT, "data", tmp, str(rows)], check=True,
                                         capture_output=True, text=True).stdout.strip().splitlines()[-1])
        r, a, pos, p = (np.load(f"{tmp}/{k}.npy") for k in ("reward", "action", "position", "pscore"))
        n_actions, len_list = info["n_actions"], info["len_list"]
        rng = np.random.default_rng(seed)
        pi = rng.random((rows, n_actions, len_list))
        pi /= pi.sum(axis=1, keepdims=True)
        q = rng.uniform(0.0, 0.02, (rows, n_actions, len_list))  # click rates of the order of the sample's 0.4 %
        np.save(f"{tmp}/action_dist.npy", pi)
        np.save(f"{tmp}/estimated_rewards.npy", q)
        print(json.dumps({"bench": "ope.obp.input", "rows": rows, **info, "action_dist_shape": list(pi.shape)}),
              flush=True)
        ours = {}
        for est in (IPS(), SNIPS(), DR(), DRos(lam=lam)):
            model = q if est.needs_model else None

            def call(est: object = est, model: np.ndarray | None = model) -> float:
                return est.estimate(r, a, p, pi, model, position=pos).value  # type: ignore[attr-defined]

            ours[est.name] = (call(), best_of(call, repeats))
        del q
        res = subprocess.run([python, "-c", OBP_SCRIPT, "time", tmp, str(lam)], check=True, capture_output=True,
                             text=True).stdout.strip().splitlines()
        for line in res:
            o = json.loads(line)
            value, s = ours[o["estimator"]]
            print(json.dumps({"bench": "ope.obp", "estimator": o["estimator"], "rows": rows, "ours_s": round(s, 4),
                              "obp_s": round(o["seconds"], 4), "speedup": round(o["seconds"] / s, 1),
                              "abs_diff": abs(value - o["value"]), "value": value,
                              "load": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--n-cand", type=int, default=16)
    ap.add_argument("--boot-rows", type=int, default=1_000_000)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=0,
                    help="only: replay over this many Parquet partitions of --rows rows, local vs Ray")
    ap.add_argument("--passes", type=int, default=1, help="with --partitions: read the files this many times")
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="with --partitions: Ray worker counts")
    ap.add_argument("--compression", default="none", help="with --partitions: the files' codec (random floats "
                    "do not compress, so none by default)")
    ap.add_argument("--obp", metavar="PYTHON", help="only: obp 0.4.1 (installed for PYTHON) beside ours")
    ap.add_argument("--obp-rows", type=int, default=1_000_000)
    ap.add_argument("--boot-only", action="store_true", help="only: the bootstrap, multinomial vs Poisson")
    args = ap.parse_args()
    if args.boot_only:
        bench_bootstrap(args.boot_rows, args.n_cand, args.n_boot, args.repeats)
        return
    if args.partitions:
        bench_partitions(args.partitions, args.rows, args.n_cand, 0, args.passes, tuple(args.workers),
                         args.compression)
        return
    if args.obp:
        bench_obp(args.obp, args.obp_rows)
        return

    bench_estimates(args.rows, args.n_cand, args.repeats)
    bench_bootstrap(args.boot_rows, args.n_cand, args.n_boot, args.repeats)


def bench_estimates(rows: int, n_cand: int, repeats: int) -> None:
    """Each estimator's ``estimate`` and ``estimate_all`` on ``rows`` rows (no bootstrap)."""
    t0 = time.perf_counter()
    r, a, p, pi, q = make_log(rows, n_cand)
    print(json.dumps({"bench": "ope.make_log", "rows": rows, "n_cand": n_cand,
                      "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    for est in (IPS(), SNIPS(), DR(), SNDR()):
        needs = est.needs_model
        s = best_of(lambda est=est, needs=needs: est.estimate(r, a, p, pi, q if needs else None), repeats)
        print(json.dumps({"bench": "ope.estimate", "estimator": est.name, "rows": rows,
                          "n_cand": n_cand, "seconds": round(s, 3), "rows_per_s": round(rows / s),
                          "target_rows_per_s": 5_000_000}), flush=True)
    s = best_of(lambda: estimate_all(r, a, p, pi, q), 1)
    print(json.dumps({"bench": "ope.estimate_all", "estimators": 6, "rows": rows, "seconds": round(s, 3),
                      "rows_per_s": round(rows / s)}), flush=True)


def bench_bootstrap(n: int, n_cand: int, n_boot: int, repeats: int) -> None:
    """Multinomial (before) and Poisson (now) bootstrap on the same log, alternately in one run."""
    from bandits import _ope

    def load() -> list[float]:
        return [round(x, 2) for x in os.getloadavg()]

    def now() -> str:
        return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")

    print(json.dumps({"bench": "ope.bootstrap.start", "time": now(), "load": load(), "cpus": os.cpu_count()}),
          flush=True)
    r, a, p, pi, q = make_log(n, n_cand, seed=1)
    methods = ("multinomial", "poisson")
    for est in (IPS(), SNIPS(), DR()):
        model = q if est.needs_model else None
        times: dict[str, list[float]] = {m: [] for m in methods}
        cis = {}
        for _ in range(repeats):
            for m in methods:
                t0 = time.perf_counter()
                ci = bootstrap_ci(est, r, a, p, pi, model, n_boot=n_boot, seed=0, method=m)
                times[m].append(time.perf_counter() - t0)
                cis[m] = [round(ci.low, 5), round(ci.high, 5), round(ci.se, 6)]
        best = {m: min(times[m]) for m in methods}
        print(json.dumps({"bench": "ope.bootstrap", "estimator": est.name, "rows": n, "n_boot": n_boot,
                          "multinomial_s": round(best["multinomial"], 3), "poisson_s": round(best["poisson"], 3),
                          "speedup": round(best["multinomial"] / best["poisson"], 2),
                          "ms_per_resample": {m: round(1e3 * best[m] / n_boot, 2) for m in methods},
                          "ci_low_high_se": cis, "target_seconds": 10.0, "load": load()}), flush=True)
    times = {m: [] for m in methods}
    for _ in range(repeats):
        for m in methods:
            t0 = time.perf_counter()
            estimate_all(r, a, p, pi, q, n_boot=n_boot, seed=0, method=m)
            times[m].append(time.perf_counter() - t0)
    best = {m: min(times[m]) for m in methods}
    print(json.dumps({"bench": "ope.bootstrap_all", "estimators": 6, "rows": n, "n_boot": n_boot,
                      "multinomial_s": round(best["multinomial"], 3), "poisson_s": round(best["poisson"], 3),
                      "speedup": round(best["multinomial"] / best["poisson"], 2), "load": load()}), flush=True)

    # where the time goes: drawing the counts alone (what the old path does per resample: n uniform
    # row indices, then their bincount; the new: the blocks of Poisson counts), best of `repeats`
    def multinomial_draws() -> None:
        g = np.random.default_rng(0)
        for _ in range(n_boot):
            np.bincount(g.integers(0, n, size=n), minlength=n)

    def multinomial_indices() -> None:
        g = np.random.default_rng(0)
        for _ in range(n_boot):
            g.integers(0, n, size=n)

    def poisson_draws() -> None:
        for _ in _ope._poisson_blocks(n, n_boot, np.random.default_rng(0)):
            pass

    parts = {"multinomial_indices_s": multinomial_indices, "multinomial_indices_and_bincount_s": multinomial_draws,
             "poisson_counts_s": poisson_draws}
    print(json.dumps({"bench": "ope.bootstrap.draws", "rows": n, "n_boot": n_boot,
                      **{k: round(best_of(f, repeats), 3) for k, f in parts.items()}, "load": load(),
                      "time": now()}), flush=True)


if __name__ == "__main__":
    main()
