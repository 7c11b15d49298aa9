"""Benchmark the planning solvers: PuLP+HiGHS LP vs the smoothed-dual method, and serving.

Prints one JSON line per measurement. Not a test: figures only.

    .venv/bin/python bench/plan.py                 # the full run (~2 minutes on 2 cores)
    .venv/bin/python bench/plan.py --quick         # 1e4 and 1e5 only
    .venv/bin/python bench/plan.py --sharded 1000000   # only: sharded dual, in-process vs Ray (2 workers)
    .venv/bin/python bench/plan.py --scale 10000000    # only: Ray, 2 workers, users held in memory (float32)
    .venv/bin/python bench/plan.py --scale 100000000 --regenerate --passes 2   # chunks rebuilt every pass
    .venv/bin/python bench/plan.py --scale 100000000 --workers 4 --compact --warm   # 10^8 users, solved

``--scale`` users are generated in chunks of 62,500 inside the workers from ``(seed, chunk)``
(``fast_chunk``: the same kind of instance as ``make_instance``, with cheaper distributions), so no
user data crosses the network. Held in memory, a worker keeps its chunks as float32 arrays (512 bytes
of exposure per user); with ``--regenerate`` each worker is one :class:`allocator.ChunkedShard` that
rebuilds its chunks on every pass and holds one chunk at a time. ``--passes P`` times P dual passes
instead of solving (for sizes whose solve would take too long here); the full solve's pass count
comes from a smaller size.

With ``--compact`` the chunks are ``compact_chunk``'s: pages of 6 slots x 10 items whose exposures are
counts (``uint8``) held in :class:`allocator.CompactShard` with float16 values, 160 bytes per user.
With ``--warm`` the bounds and the starting prices come from samples drawn alike (other seeds) in the
driver: 125,000 users solved from zero, whose plan starts 10^6 users', which starts 10^7 users'
(levels at most a tenth of the next); the full users' solve starts from the last
(``plan_dual_sharded(..., start=...)``).

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
import sys
import time

import numpy as np

from allocator import (
    ChunkedShard,
    CompactShard,
    LocalShards,
    PlanShard,
    choose,
    choose_batch,
    plan_dual,
    plan_dual_sharded,
    plan_lp,
)

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


class PeakMemory:
    """A shard that tells its process's peak resident memory (``shards.map("rss_mb")``)."""

    def rss_mb(self) -> int:
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


class BenchShard(PeakMemory, PlanShard):
    """A shard generated where it lives from its seed (no user data crosses the network), float32."""

    def __init__(self, seed: int, n_users: int, n_total: int) -> None:
        v, a, _, _, _ = make_instance(n_users, 16, seed=seed, dtype=np.float32)
        super().__init__(v, a, np.full(n_users, 1.0 / n_total))


#: users per generated chunk (--scale)
CHUNK = 62_500


def fast_chunk(seed: int, n_users: int, n_total: int, chunk: int) -> BenchChunk:
    """Chunk ``chunk`` of a generated instance: ``n_users`` users x 16 candidates x 8 constraints,
    float32, weights ``1 / n_total``; the same arrays for the same ``(seed, chunk)``."""
    rng = np.random.default_rng([seed, chunk])
    # whole-array operations where possible: the build is the cost of a pass with --regenerate
    a = rng.random((n_users, 16, 8), dtype=np.float32)
    a *= a
    cat = a[:, :, :4]  # category mix u^2 / sum u^2, concentrated like a Dirichlet(0.5)
    cat /= np.einsum("ulc->ul", cat)[:, :, None]
    a *= np.array([1, 1, 1, 1, 0.6, 0.5**0.5, 3, 3], dtype=np.float32)
    a[:, :, 5] *= a[:, :, 5]  # new-category share 0.5 u^4, mostly small; long-tail share 0.6 u^2
    np.floor(a[:, :, 6:], out=a[:, :, 6:])  # two module shares in {0, 0.25, 0.5}
    a[:, :, 6:] *= 0.25
    affinity = np.zeros((n_users, 8), dtype=np.float32)
    affinity[:, :4] = np.exp(0.5 * rng.standard_normal((n_users, 4), dtype=np.float32))
    value = np.einsum("ulk,uk->ul", a, affinity)
    value *= 1.0 - 0.5 * a[:, :, 4]
    value += 0.1 * rng.standard_normal((n_users, 16), dtype=np.float32)
    return BenchChunk(value, a, np.full(n_users, 1.0 / n_total))


#: Exposure of one count of each constraint in ``compact_chunk``: items of a 6 x 10 page for the
#: category, long-tail and new-category shares, slots of 6 for the two module shares.
COMPACT_UNIT = np.array([1 / 60] * 6 + [1 / 6] * 2)


#: Items of each category on a page whose six slots' categories are the 2-bit digits of its index.
_PAGE_ITEMS = 10 * (((np.arange(4096)[:, None] >> (2 * np.arange(6))) & 3)[:, :, None]
                    == np.arange(4)).sum(axis=1).astype(np.uint8)


def compact_chunk(seed: int, n_users: int, n_total: int, chunk: int) -> BenchCompact:
    """Chunk ``chunk`` of a generated instance held compactly (:class:`allocator.CompactShard`):
    ``n_users`` users x 16 candidate pages of 6 slots x 10 items, K = 8 constraints whose exposures
    are counts (``uint8``) over the page (:data:`COMPACT_UNIT`): each category's items (10 per slot
    of its category, the slots' categories uniform), long-tail items (0..36), new-category items
    (0..31, mostly few), slots of two modules (0..3 each); the value (``float16``) is each page's
    category mix priced by the user's affinities, less half its long-tail share, plus noise;
    weights ``1 / n_total``; the same arrays for the same ``(seed, chunk)``."""
    rng = np.random.default_rng([seed, chunk])
    counts = np.empty((n_users, 16, 8), dtype=np.uint8)
    # six slots' categories, two bits each, as one 12-bit number per page; a table gives the counts
    counts[:, :, :4] = _PAGE_ITEMS[rng.integers(0, 4096, size=(n_users, 16), dtype=np.uint16)]
    r = rng.integers(0, 256, size=(n_users, 16, 4), dtype=np.uint8)
    np.remainder(r[:, :, 0], 37, out=counts[:, :, 4])
    counts[:, :, 5] = (r[:, :, 1].astype(np.uint16) ** 2) >> 11
    np.remainder(r[:, :, 2:], 4, out=counts[:, :, 6:])
    affinity = np.exp(0.5 * rng.standard_normal((n_users, 4), dtype=np.float32))
    value = np.einsum("ulc,uc->ul", counts[:, :, :4], affinity / 60, dtype=np.float32)
    value *= 1.0 - counts[:, :, 4] / np.float32(120)
    value += 0.1 * rng.standard_normal((n_users, 16), dtype=np.float32)
    return BenchCompact(value.astype(np.float16), counts, COMPACT_UNIT, 1.0 / n_total)


class BenchCompact(PeakMemory, CompactShard):
    pass


class BenchChunk(PeakMemory, PlanShard):
    pass


class ChunkRange:
    """``i -> fast_chunk(seed, CHUNK, n_total, first + i)``: a worker's run of chunks."""

    def __init__(self, seed: int, n_total: int, first: int) -> None:
        self.seed, self.n_total, self.first = seed, n_total, first

    def __call__(self, i: int) -> BenchChunk:
        return fast_chunk(self.seed, CHUNK, self.n_total, self.first + i)


class BenchChunked(PeakMemory, ChunkedShard):
    pass


def warm_start(n_users: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list[dict]]:
    """The bounds and the prices to start ``n_users`` from, on samples of other users drawn alike
    (``compact_chunk``, in this process): the bounds from 125,000 users' unconstrained shares, whose
    plan (solved from zero) starts 10^6 users', which starts 10^7 users' (each warm-started level a
    tenth of the next or less). ``(lower, upper, prices, one row per level)``."""
    levels = [m for m in (125_000, 10**6, 10**7) if 10 * m <= n_users]
    lo = hi = prices = None
    rows = []
    for i, m in enumerate(levels):
        t0 = time.perf_counter()
        sample = LocalShards([compact_chunk(seed + 1000 + i, CHUNK, m, c) for c in range(m // CHUNK)])
        built = time.perf_counter() - t0
        if lo is None:
            lo, hi = sharded_bounds(sample)
        t0 = time.perf_counter()
        plan = plan_dual_sharded(TimedShards(sample), lo, hi, names=NAMES, start=prices)
        prices = plan.prices
        print(json.dumps(dict(level=m, prices=prices.round(6).tolist(), method=plan.method)), file=sys.stderr)
        rows.append(dict(users=m, build_s=round(built, 1), solve_s=round(time.perf_counter() - t0, 1),
                         passes=plan.iterations, method=plan.method, status=plan.status))
        del sample
    if lo is None or hi is None:
        raise SystemExit(f"--warm needs at least 1250000 users (ten times the first sample); got {n_users}")
    return lo, hi, prices, rows


class TimedShards:
    """A ShardMap that prints each call (method, seconds, what came back in brief) to stderr."""

    def __init__(self, shards: object) -> None:
        self.shards = shards

    @property
    def n_shards(self) -> int:
        return self.shards.n_shards  # type: ignore[attr-defined]

    def map(self, method: str, *args: object) -> list:
        t0 = time.perf_counter()
        out = self.shards.map(method, *args)  # type: ignore[attr-defined]
        brief: object = None
        if method == "crossover_counts":
            brief = np.sum(out, axis=0)[::4].tolist()
        elif method == "crossover_part":
            brief = sum(int(pt.row.size) for pt in out)
        print(json.dumps(dict(call=method, s=round(time.perf_counter() - t0, 2), brief=brief)), file=sys.stderr,
              flush=True)
        return out

    def __getattr__(self, name: str) -> object:
        return getattr(self.shards, name)


def bench_scale(n_users: int, workers: int, regenerate: bool, passes: int | None, seed: int = 7,
                compact: bool = False, warm: bool = False) -> None:
    """The sharded dual on ``workers`` Ray actors over ``n_users`` generated users (see the docstring)."""
    from functools import partial

    import ray

    from policy_api.scale import RayShards

    if n_users % CHUNK:
        raise SystemExit(f"--scale must be a multiple of {CHUNK}; got {n_users}")
    n_chunks = n_users // CHUNK
    if compact:
        builders = [partial(compact_chunk, seed, CHUNK, n_users, c) for c in range(n_chunks)]
    elif regenerate:
        edges = [round(i * n_chunks / workers) for i in range(workers + 1)]
        builders = [partial(BenchChunked, ChunkRange(seed, n_users, edges[i]), edges[i + 1] - edges[i])
                    for i in range(workers)]
    else:
        builders = [partial(fast_chunk, seed, CHUNK, n_users, c) for c in range(n_chunks)]
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        t0 = time.perf_counter()
        shards = RayShards(builders, n_workers=workers)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        if warm:  # bounds and start prices from samples drawn alike; the full users' first pass is the solve's
            lo, hi, start, levels = warm_start(n_users, seed)
        else:
            lo, hi = sharded_bounds(shards)
            start, levels = None, []
        first_pass = time.perf_counter() - t0
        storage = ("uint8 counts + float16 values in memory" if compact else
                   "regenerated per pass" if regenerate else "float32 in memory")
        row: dict[str, object] = dict(what="plan_dual_scale", n_users=n_users, n_vars=16 * n_users, workers=workers,
                                      storage=storage, build_s=round(build, 1),
                                      **{"warm_s" if warm else "one_pass_s": round(first_pass, 2)})
        if passes:
            t0 = time.perf_counter()
            for i in range(passes):
                shards.map("smoothed", np.linspace(-0.2, 0.2, 8) * (i + 1), 0.01)
            row.update(timed_passes=passes, s_per_pass=round((time.perf_counter() - t0) / passes, 2))
        else:
            t0 = time.perf_counter()
            plan = plan_dual_sharded(TimedShards(shards), lo, hi, names=NAMES, start=start)  # type: ignore[arg-type]
            total = time.perf_counter() - t0
            row.update(warm_levels=levels, solve_s=round(total, 1), passes=plan.iterations,
                       s_per_pass=round(total / plan.iterations, 2), status=plan.status, gap=plan.gap,
                       violation=plan.violation, objective=plan.objective, method=plan.method,
                       prices=plan.prices.round(6).tolist(), total_s=round(build + first_pass + total, 1))
        rss = shards.map("rss_mb")
        row.update(peak_rss_mb_per_worker=max(rss), uptime=os.popen("uptime").read().strip())
        emit(**row)
        shards.close()
    finally:
        ray.shutdown()


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
    ap.add_argument("--scale", type=int, metavar="N_USERS", help="only: the sharded dual on Ray over N_USERS users")
    ap.add_argument("--workers", type=int, default=2, help="with --scale: Ray workers")
    ap.add_argument("--regenerate", action="store_true", help="with --scale: rebuild the chunks on every pass")
    ap.add_argument("--passes", type=int, help="with --scale: time this many passes instead of solving")
    ap.add_argument("--compact", action="store_true",
                    help="with --scale: exposures held as uint8 counts, values as float16 (compact_chunk)")
    ap.add_argument("--warm", action="store_true",
                    help="with --scale: start from the plans of 125,000, 10^6 and 10^7 other users drawn "
                         "alike (each level a tenth of the next or less)")
    args = ap.parse_args()
    emit(what="machine", uptime=os.popen("uptime").read().strip(), cpus=os.cpu_count())
    if args.scale:
        bench_scale(args.scale, args.workers, args.regenerate, args.passes, compact=args.compact, warm=args.warm)
        return
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
