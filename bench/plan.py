"""Benchmark the planning solvers: PuLP+HiGHS LP vs the smoothed-dual method, and serving.

Prints one JSON line per measurement. Not a test: figures only.

    .venv/bin/python bench/plan.py                 # the full run (~2 minutes on 2 cores)
    .venv/bin/python bench/plan.py --quick         # 1e4 and 1e5 only
    .venv/bin/python bench/plan.py --sharded 1000000   # only: sharded dual, in-process vs Ray (2 workers)

Instances: ``n_cand = 16`` candidates per user, K = 8 constraints (4 category shares, a long-tail
share, a new-category share, two module shares), of which 5 bind; traffic weights are lognormal.

``choose`` (serving: one request's argmax of ``value + exposure @ prices``) is timed per call for 32
candidates and K = 8; its target, p50 <= 50 us, is a figure here rather than a test assertion,
because wall-clock time on a shared machine is not a property of the code.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from allocator import LocalShards, PlanShard, choose, choose_batch, plan_dual, plan_dual_sharded, plan_lp

NAMES = ("songs", "videos", "audio", "live", "long_tail", "new_category", "module_a", "module_b")


def make_instance(
    n_users: int, n_cand: int = 16, seed: int = 0, dtype: type = np.float64
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A homepage-like planning instance with 8 constraints, 5 of them binding."""
    rng = np.random.default_rng(seed)
    k = 8
    exposure = np.empty((n_users, n_cand, k), dtype=dtype)
    exposure[:, :, :4] = rng.dirichlet(np.full(4, 0.5), size=(n_users, n_cand))
    exposure[:, :, 4] = rng.uniform(0.0, 0.6, size=(n_users, n_cand))
    exposure[:, :, 5] = rng.beta(0.5, 5.0, size=(n_users, n_cand))
    exposure[:, :, 6] = rng.integers(0, 3, size=(n_users, n_cand)) * 0.25
    exposure[:, :, 7] = rng.integers(0, 3, size=(n_users, n_cand)) * 0.25
    affinity = rng.lognormal(0.0, 0.5, size=(n_users, 4))
    value = np.einsum("ulc,uc->ul", exposure[:, :, :4], affinity, dtype=np.float64)
    value *= 1.0 - 0.5 * exposure[:, :, 4]
    value += 0.1 * rng.standard_normal((n_users, n_cand))
    value = value.astype(dtype)
    weight = rng.lognormal(0.0, 1.0, size=n_users)
    weight /= weight.sum()
    best = np.argmax(value, axis=1)
    s0 = weight @ exposure[np.arange(n_users), best].astype(np.float64)
    lower = np.full(k, -np.inf)
    upper = np.full(k, np.inf)
    upper[0] = s0[0] - 0.05  # songs cap (binds)
    lower[1] = s0[1] + 0.04  # videos floor (binds)
    lower[2], upper[2] = s0[2] - 0.2, s0[2] + 0.2  # audio range (slack)
    upper[3] = s0[3] + 0.1  # live cap (slack)
    lower[4] = s0[4] + 0.05  # long-tail floor (binds)
    lower[5] = s0[5] + 0.02  # new-category floor (binds)
    upper[6] = s0[6] - 0.01  # module_a cap (binds)
    lower[7] = 0.0  # module_b floor (slack)
    return value, exposure, weight, lower, upper


def emit(**kw: object) -> None:
    print(json.dumps(kw), flush=True)


def bench_size(n_vars: int, *, lp: bool) -> None:
    n_cand = 16
    n_users = n_vars // n_cand
    v, a, w, lo, hi = make_instance(n_users, n_cand, seed=1)
    lp_plan = None
    if lp:
        for method in ("simplex", "ipm"):
            t0 = time.perf_counter()
            plan = plan_lp(v, a, w, lo, hi, names=NAMES, method=method)
            emit(
                what="plan_lp",
                n_vars=n_vars,
                method=plan.method,
                pulp_build_s=round(plan.build_s, 3),
                highs_solve_s=round(plan.solve_s, 3),
                total_s=round(time.perf_counter() - t0, 3),
                iterations=plan.iterations,
                status=plan.status,
                objective=plan.objective,
                gap=plan.gap,
                violation=plan.violation,
            )
            lp_plan = plan
    else:
        emit(
            what="plan_lp",
            n_vars=n_vars,
            skipped="over the ~2 min budget: measured once on this machine (load ~7) at 67 s PuLP build "
            "+ 389 s HiGHS IPM = 460 s, 2.3 GB RSS; run with --lp-1e6 to measure again",
        )
    t0 = time.perf_counter()
    dplan = plan_dual(v, a, w, lo, hi, names=NAMES)
    total = time.perf_counter() - t0
    row: dict[str, object] = dict(
        what="plan_dual",
        n_vars=n_vars,
        dtype="float64",
        total_s=round(total, 3),
        solve_s=round(dplan.solve_s, 3),
        iterations=dplan.iterations,
        method=dplan.method,
        status=dplan.status,
        objective=dplan.objective,
        gap=dplan.gap,
        violation=dplan.violation,
    )
    if lp_plan is not None:
        row["objective_rel_diff_vs_lp"] = abs(dplan.objective - lp_plan.objective) / abs(lp_plan.objective)
        row["shares_max_abs_diff_vs_lp"] = float(np.max(np.abs(dplan.shares - lp_plan.shares)))
        row["prices_max_abs_diff_vs_lp"] = float(np.max(np.abs(dplan.prices - lp_plan.prices)))
    emit(**row)


def bench_dual_large(n_vars: int) -> None:
    n_cand = 16
    v, a, w, lo, hi = make_instance(n_vars // n_cand, n_cand, seed=2, dtype=np.float32)
    t0 = time.perf_counter()
    dplan = plan_dual(v, a, w, lo, hi, names=NAMES)
    total = time.perf_counter() - t0
    emit(
        what="plan_dual",
        n_vars=n_vars,
        dtype="float32",
        exposure_mb=round(a.nbytes / 2**20),
        total_s=round(total, 3),
        solve_s=round(dplan.solve_s, 3),
        iterations=dplan.iterations,
        method=dplan.method,
        status=dplan.status,
        objective=dplan.objective,
        gap=dplan.gap,
        violation=dplan.violation,
    )


def bench_choose(n_cand: int = 32, k: int = 8, n_calls: int = 20000) -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal((n_calls, n_cand))
    exposures = rng.random((n_calls, n_cand, k))
    prices = rng.standard_normal(k)
    times = np.empty(n_calls)
    for i in range(n_calls):
        t0 = time.perf_counter()
        choose(values[i], exposures[i], prices)
        times[i] = time.perf_counter() - t0
    t0 = time.perf_counter()
    choose_batch(values, exposures, prices)
    batch = time.perf_counter() - t0
    emit(
        what="choose",
        n_cand=n_cand,
        K=k,
        p50_us=round(float(np.percentile(times, 50)) * 1e6, 2),
        p99_us=round(float(np.percentile(times, 99)) * 1e6, 2),
        target_p50_us=50.0,
        batch_us_per_request=round(batch / n_calls * 1e6, 3),
    )


class BenchShard(PlanShard):
    """A shard generated where it lives from its seed (no user data crosses the network), float32."""

    def __init__(self, seed: int, n_users: int, n_total: int) -> None:
        v, a, _, _, _ = make_instance(n_users, 16, seed=seed, dtype=np.float32)
        super().__init__(v, a, np.full(n_users, 1.0 / n_total))

    def rss_mb(self) -> int:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def sharded_bounds(shards: object) -> tuple[np.ndarray, np.ndarray]:
    """make_instance's bounds, from the shards' unconstrained (argmax) shares."""
    tot = np.sum(shards.map("softmax_totals", np.zeros(8), 1e-9), axis=0)  # type: ignore[attr-defined]
    s0 = tot[1:]
    lower = np.full(8, -np.inf)
    upper = np.full(8, np.inf)
    upper[0], lower[1] = s0[0] - 0.05, s0[1] + 0.04
    lower[2], upper[2] = s0[2] - 0.2, s0[2] + 0.2
    upper[3], lower[4], lower[5], upper[6], lower[7] = s0[3] + 0.1, s0[4] + 0.05, s0[5] + 0.02, s0[6] - 0.01, 0.0
    return lower, upper


def bench_sharded(n_users: int, n_shards: int = 4) -> None:
    """The sharded dual over generated shards: in this process, then in 2 Ray actors."""
    from functools import partial

    import ray

    from policy_api.scale import RayShards

    sizes = [n_users // n_shards + (i < n_users % n_shards) for i in range(n_shards)]
    builders = [partial(BenchShard, 100 + i, n, n_users) for i, n in enumerate(sizes)]
    results = {}
    for engine in ("local", "ray"):
        t0 = time.perf_counter()
        if engine == "local":
            shards: object = LocalShards(builders)
        else:
            ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            shards = RayShards(builders, n_workers=2)
        built = time.perf_counter() - t0
        lo, hi = sharded_bounds(shards)
        t0 = time.perf_counter()
        plan = plan_dual_sharded(shards, lo, hi, names=NAMES)  # type: ignore[arg-type]
        total = time.perf_counter() - t0
        results[engine] = plan
        rss = shards.map("rss_mb")  # type: ignore[attr-defined]
        emit(what="plan_dual_sharded", engine=engine, n_users=n_users, n_vars=plan.n_vars, n_shards=n_shards,
             workers=1 if engine == "local" else 2, dtype="float32", build_s=round(built, 2),
             solve_s=round(total, 2), passes=plan.iterations, s_per_pass=round(total / plan.iterations, 3),
             status=plan.status, gap=plan.gap, violation=plan.violation, objective=plan.objective,
             peak_rss_mb_per_worker=sorted(set(rss)),
             bytes_out_per_pass_per_shard=8 * 8 + 8, bytes_back_per_pass_per_shard=8 * (8 + 2))
        if engine == "ray":
            shards.close()  # type: ignore[attr-defined]
            ray.shutdown()
    emit(what="plan_dual_sharded_agreement",
         objective_abs_diff=abs(results["local"].objective - results["ray"].objective),
         prices_max_abs_diff=float(np.max(np.abs(results["local"].prices - results["ray"].prices))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1e4 and 1e5 only")
    ap.add_argument("--lp-1e6", action="store_true", help="also run PuLP+HiGHS at 1e6 (~8 min here)")
    ap.add_argument("--sharded", type=int, metavar="N_USERS", help="only the sharded dual over N_USERS users")
    args = ap.parse_args()
    emit(what="machine", uptime=os.popen("uptime").read().strip(), cpus=os.cpu_count())
    if args.sharded:
        bench_sharded(args.sharded)
        return
    bench_choose()
    bench_size(10**4, lp=True)
    bench_size(10**5, lp=True)
    if args.quick:
        return
    bench_size(10**6, lp=args.lp_1e6)
    bench_dual_large(10**7)
    emit(
        what="machine",
        uptime=os.popen("uptime").read().strip(),
        maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )


if __name__ == "__main__":
    main()
