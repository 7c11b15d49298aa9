"""Scale-out on a real local Ray cluster (one per module): sharded planning and partitioned replay equal
the single-machine results; the partial sums equal :func:`bandits.estimate_all` and a brute-force
Poisson bootstrap; partition files are read back in batches, bit for bit; the pool's workers run at
the driver's priority and give results in the items' order; without Ray the core still imports and
the ray engine names the extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest

from allocator import ChunkedShard, LocalShards, PlanShard, plan_dual, plan_dual_sharded
from bandits import combine_partial_sums, estimate_all, ope_partial_sums
from policy_api.errors import InvalidInput
from policy_api.scale import (
    RayPool,
    RayShards,
    iter_ope_batches,
    partition_sums,
    read_ope_partition,
    replay_partitions,
    write_ope_partition,
)

ray = pytest.importorskip("ray")  # the dev extra carries ray, so CI runs these


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def make_shard(seed: int, part: int, n_users: int, n_total: int) -> PlanShard:
    """A shard generated where it lives, from a seed (no user data crosses the network)."""
    rng = np.random.default_rng([seed, part])
    v = rng.standard_normal((n_users, 6))
    a = rng.random((n_users, 6, 3)) * (1 + (np.arange(6) % 3 == part % 3))[None, :, None]
    return PlanShard(v, a, np.full(n_users, 1.0 / n_total))


@pytest.mark.slow
def test_plan_on_ray_equals_single_machine_dual(cluster, seed):
    sizes = [300, 500, 400]
    builders = [partial(make_shard, seed, i, n, sum(sizes)) for i, n in enumerate(sizes)]
    local = LocalShards(builders)
    v = np.concatenate([s.p.value for s in local.shards])
    a = np.concatenate([s.p.exposure for s in local.shards])
    w = np.concatenate([s.p.weight for s in local.shards])
    s_best = w @ a[np.arange(v.shape[0]), v.argmax(1)]
    lo = np.array([s_best[0] + 0.05, -np.inf, -np.inf])
    hi = np.array([np.inf, s_best[1] - 0.05, np.inf])
    single = plan_dual(v, a, w, lo, hi)
    with RayShards(builders, n_workers=2) as shards:
        assert shards.n_workers == 2 and shards.n_shards == 3
        on_ray = plan_dual_sharded(shards, lo, hi)
    assert on_ray.status == single.status == "optimal"
    assert on_ray.objective == pytest.approx(single.objective, abs=1e-9, rel=1e-9)
    np.testing.assert_allclose(on_ray.prices, single.prices, atol=1e-9, rtol=0)
    assert on_ray.prices[0] > 0 and on_ray.prices[1] < 0  # both bounds bind


def chunk_of(seed: int, first: int, n_users: int, n_total: int, i: int) -> PlanShard:
    return make_shard(seed, first + i, n_users, n_total)


@pytest.mark.slow
def test_chunked_shards_rebuilt_in_ray_workers_equal_single_machine_dual(cluster, seed):
    # 5 chunks of 250 users; worker 0 rebuilds chunks 0-2 on every pass, worker 1 chunks 3-4
    chunks = [make_shard(seed, i, 250, 1250) for i in range(5)]
    v, a, w = (np.concatenate([getattr(c.p, f) for c in chunks]) for f in ("value", "exposure", "weight"))
    s_best = w @ a[np.arange(v.shape[0]), v.argmax(1)]
    lo = np.array([s_best[0] + 0.05, -np.inf, -np.inf])
    hi = np.array([np.inf, s_best[1] - 0.05, np.inf])
    single = plan_dual(v, a, w, lo, hi)
    builders = [partial(ChunkedShard, partial(chunk_of, seed, 0, 250, 1250), 3),
                partial(ChunkedShard, partial(chunk_of, seed, 3, 250, 1250), 2)]
    with RayShards(builders, n_workers=2) as shards:
        on_ray = plan_dual_sharded(shards, lo, hi)
    assert on_ray.status == single.status == "optimal" and on_ray.n_users == 1250
    assert on_ray.objective == pytest.approx(single.objective, abs=1e-9, rel=1e-9)
    np.testing.assert_allclose(on_ray.prices, single.prices, atol=1e-9, rtol=0)


def ope_log(rng, n, L=4, model=True):
    pscore_dist = rng.dirichlet(np.ones(L), size=n)
    action = (pscore_dist.cumsum(1) > rng.random(n)[:, None]).argmax(1)
    pscore = pscore_dist[np.arange(n), action]
    target = rng.dirichlet(np.ones(L), size=n)
    reward = rng.binomial(1, 0.2 + 0.15 * action / L).astype(float)
    q = rng.random((n, L)) * 0.5 if model else None
    return reward, action, pscore, target, q


def test_partial_sums_equal_estimate_all_and_a_brute_force_poisson_bootstrap(seed):
    rng = np.random.default_rng(seed)
    log = ope_log(rng, 900)
    parts = [ope_partial_sums(*(x[0:250] for x in log), n_boot=30, seed=7, partition=0),
             ope_partial_sums(*(x[250:900] for x in log), n_boot=30, seed=7, partition=1)]
    rows = combine_partial_sums(parts)
    ref = estimate_all(*log)
    for r, e in zip(rows, ref, strict=True):
        assert r["estimator"] == e["estimator"]
        for key in ("value", "se", "ci_low", "ci_high", "ess", "mean_weight", "max_weight"):
            assert r[key] == pytest.approx(e[key], abs=1e-9, rel=1e-9), (r["estimator"], key)
        # histogram quantiles: the upper edge of a 2.3 %-wide bin (np.quantile interpolates between rows)
        for q in ("weight_q50", "weight_q90", "weight_q99"):
            assert r[q] == pytest.approx(e[q], rel=0.05)
    # brute force: each resample as a weighted estimate over the rows, counts drawn as documented
    reward, action, pscore, target, q = log
    w = target[np.arange(900), action] / pscore
    g0 = np.random.default_rng([7, 0])
    g1 = np.random.default_rng([7, 1])
    counts = np.stack([np.concatenate([g0.poisson(1.0, 250), g1.poisson(1.0, 650)]) for _ in range(30)])
    snips = (counts @ (w * reward)) / (counts @ w)
    ips = (counts @ (w * reward)) / counts.sum(1)
    for name, vals in (("IPS", ips), ("SNIPS", snips)):
        row = next(r for r in rows if r["estimator"] == name)
        lo, hi = np.quantile(vals, [0.025, 0.975])
        assert (row["boot_low"], row["boot_high"]) == pytest.approx((lo, hi), abs=1e-12)
        assert row["boot_se"] == pytest.approx(vals.std(ddof=1), abs=1e-12)


@pytest.mark.slow
def test_replay_over_parquet_partitions_on_ray_equals_local(cluster, tmp_path, seed):
    rng = np.random.default_rng(seed)
    paths = []
    logs = []
    for hour in range(5):
        log = ope_log(rng, 400 + 100 * hour)
        p = tmp_path / f"2026-11-30T{10 + hour:02d}.parquet"
        write_ope_partition(p, *log, row_group_rows=128)  # each partition read in several batches
        paths.append(str(p))
        logs.append(log)
    local = replay_partitions(paths, n_boot=20, seed=3)
    on_ray = replay_partitions(paths, engine="ray", workers=2, n_boot=20, seed=3)
    whole = [np.concatenate([lg[i] for lg in logs]) for i in range(5)]
    ref = estimate_all(*whole)
    for lr, rr, e in zip(local, on_ray, ref, strict=True):
        for key, val in lr.items():
            assert rr[key] == (val if isinstance(val, str) else pytest.approx(val, abs=1e-9, rel=1e-9)), key
        assert lr["value"] == pytest.approx(e["value"], abs=1e-9, rel=1e-9)
        assert lr["se"] == pytest.approx(e["se"], abs=1e-9, rel=1e-9)
    # the partitions' bootstrap, brute force: each partition's counts from default_rng([seed, index])
    gens = [np.random.default_rng([3, i]) for i in range(5)]
    counts = np.stack([np.concatenate([g.poisson(1.0, lg[0].shape[0]) for g, lg in zip(gens, logs, strict=True)])
                       for _ in range(20)])
    reward, action, pscore, target, q = whole
    w = target[np.arange(reward.shape[0]), action] / pscore
    q_a = q[np.arange(reward.shape[0]), action]
    dr = (counts @ ((target * q).sum(1) + w * (reward - q_a))) / counts.sum(1)
    row = next(r for r in local if r["estimator"] == "DR")
    assert (row["boot_low"], row["boot_high"]) == pytest.approx(tuple(np.quantile(dr, [0.025, 0.975])), abs=1e-12)


@pytest.mark.slow
def test_core_runs_without_ray_and_the_engine_names_the_extra():
    code = (
        "import sys; sys.modules['ray'] = None\n"  # import ray now fails, as when it is not installed
        "import allocator, bandits, policy_api.jobs, policy_api.cli, policy_api.scale as s\n"
        "assert 'ray' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    s.require_ray()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "InvalidInput engine 'ray' needs Ray, which is not installed" in out.stdout
    assert "pip install 'homepage-engine[ray]'" in out.stdout


@pytest.mark.parametrize("compression", ["lz4", "zstd", "snappy", "none"])
def test_partition_files_read_back_bit_for_bit(tmp_path, seed, compression):
    rng = np.random.default_rng(seed)
    log = ope_log(rng, 257)
    path = tmp_path / "p.parquet"
    write_ope_partition(path, *log, compression=compression)
    got = read_ope_partition(path)
    for name, want in zip(("reward", "action", "pscore", "action_dist", "estimated_rewards"), log, strict=True):
        assert got[name].dtype == np.asarray(want).dtype and np.array_equal(got[name], want), name
    assert "estimated_rewards" not in read_ope_partition(path, with_model=False)


def test_partition_files_are_read_in_batches_of_row_groups(tmp_path, seed):
    rng = np.random.default_rng(seed)
    log = ope_log(rng, 1000)
    for name, rows, batch in (("groups.parquet", 96, 96), ("one_group.parquet", 1000, 64)):
        path = tmp_path / name
        write_ope_partition(path, *log, row_group_rows=rows)
        n, batches = iter_ope_batches(path, batch_rows=batch)
        got = list(batches)
        assert n == 1000 and [b[0].shape[0] for b in got] == [batch] * (1000 // batch) + [1000 % batch]
        for i, want in enumerate(log):
            assert np.array_equal(np.concatenate([b[i] for b in got]), want), (name, i)
        # one partition, read batch by batch, equals its arrays in one call (bootstrap included)
        sums, ref = partition_sums(str(path), 6, n_boot=4, seed=2), ope_partial_sums(*log, n_boot=4, seed=2, partition=6)
        np.testing.assert_allclose(sums.gram, ref.gram, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(sums.boot, ref.boot, rtol=1e-12, atol=1e-12)
        assert np.array_equal(sums.w_hist, ref.w_hist) and sums.w_max == ref.w_max
    path = tmp_path / "plain.parquet"
    write_ope_partition(path, *log[:4])
    assert [b[4] for b in iter_ope_batches(path)[1]] == [None]
    with pytest.raises(ValueError, match=r"row_group_rows must be an integer >= 1; got 0"):
        write_ope_partition(path, *log, row_group_rows=0)


def slow_square(x: int) -> tuple[int, int]:
    time.sleep(0.05 if x % 3 == 0 else 0.0)  # items finish out of order
    return x * x, os.getpid()


@pytest.mark.slow
def test_pool_gives_results_in_item_order_at_the_drivers_priority(cluster):
    with RayPool(2) as pool:
        assert pool.n_workers == 2
        assert pool.worker_niceness == [os.nice(0)] * 2  # Ray's default would be 15 more
        cpu0 = pool.cpu_seconds()
        out = pool.map(slow_square, list(range(12)))
        assert [v for v, _ in out] == [x * x for x in range(12)]
        assert len({pid for _, pid in out}) == 2  # both workers took items
        assert pool.map(slow_square, []) == []
        assert sum(pool.cpu_seconds()) >= sum(cpu0)


def test_nested_list_partitions_are_read_too(tmp_path, seed):
    # Arrow's fixed_size_list<double>, as other writers produce it
    import pyarrow as pa
    import pyarrow.parquet as pq

    r, a, p, pi, q = ope_log(np.random.default_rng(seed), 100)
    nested = {"reward": r, "action": a, "pscore": p,
              "action_dist": pa.FixedSizeListArray.from_arrays(pa.array(pi.reshape(-1)), pi.shape[1]),
              "estimated_rewards": pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), q.shape[1])}
    pq.write_table(pa.table(nested), tmp_path / "nested.parquet", row_group_size=40)  # 3 chunks
    got = read_ope_partition(tmp_path / "nested.parquet")
    assert np.array_equal(got["action_dist"], pi) and np.array_equal(got["estimated_rewards"], q)
    pq.write_table(pa.table({**nested, "action_dist": pa.array(r)}), tmp_path / "bad.parquet")
    with pytest.raises(InvalidInput, match=r"column action_dist must be fixed_size_binary \(n_cand float64 per "
                                           r"row\) or fixed_size_list<double>; got double"):
        read_ope_partition(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"compression must be one of lz4, zstd, snappy, none; got 'gzip'"):
        write_ope_partition(tmp_path / "x.parquet", r, a, p, pi, compression="gzip")
    with pytest.raises(InvalidInput, match=r"columns \['pscore'\] are missing"):
        pq.write_table(pa.table({"reward": r, "action": a, "action_dist": nested["action_dist"]}),
                       tmp_path / "missing.parquet")
        read_ope_partition(tmp_path / "missing.parquet")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: replay_partitions(["x.parquet"], engine="spark"), r"engine must be one of local, ray; got 'spark'"),
        (lambda: replay_partitions([]), r"partitions: at least one partition file"),
        (lambda: RayShards([]), r"shards: at least one shard is needed"),
        (lambda: RayShards([lambda: None], n_workers=0), r"workers must be an integer >= 1; got 0"),
        (lambda: RayPool(0), r"workers must be an integer >= 1; got 0"),
        (lambda: RayPool(1, niceness=20), r"niceness must be an integer in \[0, 19\]; got 20"),
        (lambda: ope_partial_sums(np.ones(3), np.zeros(3, int), np.ones(3), np.ones((3, 1)), n_boot=1),
         r"n_boot must be 0 or an integer >= 2; got 1"),
        (lambda: ope_partial_sums(np.ones(3), np.zeros(3, int), np.ones(3), np.ones((3, 1)), partition=-1),
         r"partition must be an integer >= 0; got -1"),
        (lambda: combine_partial_sums([]), r"parts must hold at least one partition"),
    ],
)
def test_bad_inputs_are_named(call, match):
    with pytest.raises((InvalidInput, ValueError), match=match):
        call()


@pytest.mark.slow
def test_homepage_plan_engine_ray_publishes_the_single_machine_plan(cluster, tmp_path, monkeypatch, capsys):
    from datetime import UTC, datetime, timedelta

    from policy_api import cli, jobs, registry
    from policy_api import log as store
    from policy_api.engine import DecisionEngine, RequestIds, build_state
    from policy_api.log import make_engine, read_catalog_csv
    from simulator import make_world

    world = make_world(n_users=50, n_items=300, seed=0)
    cfg = tmp_path / "homepage.toml"
    cfg.write_text(world.default_config_toml())
    world.to_catalog_csv(tmp_path / "items.csv")
    url = f"sqlite:///{tmp_path / 'h.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("HOMEPAGE_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("HOMEPAGE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["catalog", "load", str(tmp_path / "items.csv"), "--config", str(cfg)]) == 0
    assert cli.main(["config", "apply", str(cfg)]) == 0
    eng = make_engine(url)
    rec = registry.active_config(eng)
    engine = DecisionEngine(build_state(rec.config, read_catalog_csv(tmp_path / "items.csv", rec.config.category_names),
                                        versions={"config": rec.version}))
    ids = RequestIds(b"k")
    rows = [engine.decide(f"u{k}", ids.issue()).row() for k in range(60)]  # 60 users of recent traffic
    for r in rows:
        r["ts"] = datetime.now(tz=UTC) - timedelta(seconds=30)
    store.insert_decisions(eng, rows)
    single = jobs.plan(eng, users=40, method="dual", publish=False)
    assert cli.main(["plan", "--engine", "ray", "--workers", "2", "--users", "40"]) == 0
    assert "sharded-dual" in capsys.readouterr().out
    published = registry.latest_plan(eng, rec.version)
    assert published is not None
    key = "lp_prices" if "lp_prices" in single.solver else None  # prices before the serving temperature
    want = single.solver[key] if key else single.prices
    got = published.solver[key] if key else published.prices
    assert got == pytest.approx(want, abs=1e-9)
    assert published.solver["users"] == single.users > 20
    with pytest.raises(InvalidInput, match=r"method 'lp' runs on one machine"):
        jobs.plan(eng, users=40, method="lp", engine="ray", publish=False)
    eng.dispose()


@pytest.mark.slow
def test_homepage_replay_partitions_engine_ray(cluster, tmp_path, capsys):
    from policy_api import cli

    rng = np.random.default_rng(5)
    logs = [ope_log(rng, 300) for _ in range(2)]
    for i, log in enumerate(logs):
        write_ope_partition(tmp_path / f"2026-11-30T{i:02d}.parquet", *log)
    assert cli.main(["replay", "--partitions", str(tmp_path), "--engine", "ray", "--workers", "2",
                     "--n-boot", "0"]) == 0
    out = capsys.readouterr().out
    assert "replay of 2 partitions (600 logged decisions) on engine ray" in out
    ref = estimate_all(*[np.concatenate([lg[i] for lg in logs]) for i in range(5)])
    for r in ref:
        assert f"{r['estimator']:<10} {r['value']:>10.4f}" in out
    assert cli.main(["replay", "--engine", "ray", "--policy", "logged"]) == 2
    assert ("--engine ray replays a time-partitioned log: pass --from-parquet DIR (exported partitions) or "
            "--partitions DIR") in capsys.readouterr().err
    assert cli.main(["replay", "--partitions", str(tmp_path / "none")]) == 2
    assert "partitions: no *.parquet files in" in capsys.readouterr().err


@pytest.mark.slow
def test_replay_of_exported_time_partitions_on_ray(cluster, tmp_path, monkeypatch, capsys):
    """Two hours of a real log exported as two partitions: Ray == local, IPS/SNIPS == the one-file replay."""
    from datetime import UTC, datetime, timedelta

    from policy_api import cli, jobs, registry
    from policy_api import log as store
    from policy_api.engine import DecisionEngine, RequestIds, build_state
    from policy_api.log import export_parquet, join_rewards, make_engine, read_catalog_csv, upgrade
    from simulator import make_world

    world = make_world(n_users=50, n_items=300, seed=1)
    (tmp_path / "homepage.toml").write_text(world.default_config_toml())
    world.to_catalog_csv(tmp_path / "items.csv")
    url = f"sqlite:///{tmp_path / 'h.db'}"
    upgrade(url)
    eng = make_engine(url)
    version = registry.activate_config(eng, world.default_config_toml(), author="test")
    cfg = registry.active_config(eng).config
    cat = read_catalog_csv(tmp_path / "items.csv", cfg.category_names)
    engine = DecisionEngine(build_state(cfg, cat, versions={"config": version}))
    ids = RequestIds(b"k")
    rng = np.random.default_rng(3)
    t0 = datetime(2026, 11, 30, 10, tzinfo=UTC)
    rows, fb = [], []
    for k in range(80):
        row = engine.decide(f"u{k % 23}", ids.issue()).row()
        row["ts"] = t0 + timedelta(minutes=1.5 * k)  # 60 in the first hour, 20 in the second
        rows.append(row)
        for j in range(int(rng.integers(0, 3))):
            item = str(cat.item_ids[int(rng.integers(0, cat.n_items))])
            fb.append({"event_id": f"{k}:{j}", "request_id": row["request_id"], "slot": j, "item_id": item,
                       "type": str(rng.choice(["play", "full_play", "skip"])), "value": None,
                       "ts": row["ts"] + timedelta(seconds=5), "received_at": row["ts"] + timedelta(seconds=5)})
    store.insert_decisions(eng, rows)
    store.insert_feedback(eng, fb)
    parts = tmp_path / "parts"
    for h in range(2):
        export_parquet(eng, parts / f"2026-11-30T{10 + h}.parquet", t0 + timedelta(hours=h),
                       t0 + timedelta(hours=h + 1))
    export_parquet(eng, tmp_path / "whole.parquet", t0, t0 + timedelta(hours=2))
    item_ids, item_cats = np.asarray(cat.item_ids, dtype=str), np.asarray(cat.category, dtype=str)
    paths = [str(p) for p in sorted(parts.glob("*.parquet"))]
    local = jobs.replay_partitioned(paths, cfg, item_ids, item_cats, "greedy", n_boot=20, seed=1)
    on_ray = jobs.replay_partitioned(paths, cfg, item_ids, item_cats, "greedy", engine="ray", workers=2,
                                     n_boot=20, seed=1)
    for lr, rr in zip(local, on_ray, strict=True):
        for key, val in lr.items():
            assert rr[key] == (val if isinstance(val, str) else pytest.approx(val, abs=1e-9, rel=1e-9)), key
    dlog, fbw = jobs.log_from_parquet(tmp_path / "whole.parquet", cfg)
    reward = join_rewards(dlog, fbw, cfg, item_ids, item_cats).reward
    assert reward.std() > 0
    whole = {r["estimator"]: r for r in jobs.replay(dlog, reward, "greedy", cfg, n_boot=0).rows}
    for r in local:
        if r["estimator"] in ("IPS", "SNIPS"):
            assert r["n_rounds"] == whole[r["estimator"]]["n_rounds"] == 80
            assert r["value"] == pytest.approx(whole[r["estimator"]]["value"], abs=1e-9, rel=1e-9)
            assert r["se"] == pytest.approx(whole[r["estimator"]]["se"], abs=1e-9, rel=1e-9)
    # the command line: a folder of exports, from the files alone (config + catalog files); the engine
    # flag's way to Ray is tested above, so this run stays in-process
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'absent' / 'none.db'}")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["replay", "--from-parquet", str(parts), "--policy", "greedy", "--config", "homepage.toml",
                     "--catalog", "items.csv", "--n-boot", "0"]) == 0
    out = capsys.readouterr().out
    assert "replay of 2 partitions (80 logged decisions) on engine local" in out
    ips = next(r for r in local if r["estimator"] == "IPS")
    assert f"{'IPS':<10} {ips['value']:>10.4f}" in out
    with pytest.raises(InvalidInput, match=r"policy must be one of logged, greedy, uniform for a partitioned"):
        jobs.replay_partitioned(paths, cfg, item_ids, item_cats, "bandit")
    eng.dispose()
