"""Sharded planning (in-process shards): equal to the single-machine dual on the same users.

References: :func:`allocator.plan_dual` on the concatenated users (the single-machine dual), the exact
LP (:func:`allocator.plan_lp`) and a hand-solved plan. The Ray-backed ShardMap is tested against the
same reference in ``tests/policy_api/test_ray.py``.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from allocator import (
    ChunkedShard,
    CompactShard,
    InfeasiblePlan,
    LocalShards,
    PlanShard,
    plan_dual,
    plan_dual_sharded,
    plan_lp,
)
from tests.allocator.test_plan import random_instance


def split(v, a, w, m, cuts):
    """Contiguous shards at ``cuts`` (user indices), in order."""
    edges = [0, *cuts, v.shape[0]]
    return LocalShards([PlanShard(v[i:j], a[i:j], w[i:j], None if m is None else m[i:j])
                        for i, j in zip(edges[:-1], edges[1:], strict=True)])


def _variant_instance(seed, variant):
    """A 1,200-user instance of the parametrized variant and its single-machine dual plan."""
    rng = np.random.default_rng(seed)
    dtype = np.float32 if variant == "float32" else np.float64
    v, a, w, lo, hi, m = random_instance(rng, 1200, 6, 4, mask=variant == "mask", dtype=dtype)
    return v, a, w, lo, hi, m, plan_dual(v, a, w, lo, hi, m)


@pytest.mark.parametrize("variant", ["plain", "mask", "float32"])
def test_sharded_exact_plan_equals_single_machine_dual(seed, variant):
    v, a, w, lo, hi, m, single = _variant_instance(seed, variant)
    sharded = plan_dual_sharded(split(v, a, w, m, [300, 301, 800]), lo, hi)
    assert sharded.status == single.status == "optimal"
    assert sharded.method == "sharded-dual-lbfgs+crossover"
    assert sharded.objective == pytest.approx(single.objective, abs=1e-9, rel=1e-9)
    np.testing.assert_allclose(sharded.prices, single.prices, atol=1e-9, rtol=0)
    np.testing.assert_allclose(sharded.shares, single.shares, atol=1e-9, rtol=0)
    assert sharded.gap <= 1e-6 and sharded.violation <= 1e-6
    assert (sharded.n_users, sharded.n_vars, sharded.n_shards) == (1200, single.n_vars, 4)
    # and both are the LP's optimum
    assert sharded.objective == pytest.approx(plan_lp(v, a, w, lo, hi, m).objective, rel=1e-5)


def test_sharded_softmax_plan_equals_single_machine_dual(seed):
    rng = np.random.default_rng(seed)
    v, a, w, lo, hi, _ = random_instance(rng, 900, 5, 3)
    tau = 0.05
    single = plan_dual(v, a, w, lo, hi, temperature=tau, tol=1e-9)
    sharded = plan_dual_sharded(split(v, a, w, None, [450]), lo, hi, temperature=tau, tol=1e-9)
    assert sharded.objective == pytest.approx(single.objective, abs=1e-9, rel=0)
    # the smoothed dual's minimiser is pinned only to gtol / curvature: two runs whose sums differ in
    # the last bit stop within ~1e-8 of each other in prices (over seeds 0..99), 1e-10 in value
    np.testing.assert_allclose(sharded.prices, single.prices, atol=1e-7, rtol=0)
    assert sharded.dual_bound == pytest.approx(single.dual_bound, abs=1e-9, rel=0)
    # the shards' users choose what serving would at the plan's prices
    choice = np.concatenate(split(v, a, w, None, [450]).map("choose", sharded.prices))
    assert np.array_equal(choice, np.argmax(v + a @ sharded.prices, axis=1))


class Chunks:
    """Chunk ``i`` of an instance, rebuilt on every call (what a seeded generator does), counting builds."""

    def __init__(self, v, a, w, m, edges):
        self.arrays, self.edges, self.builds = (v, a, w, m), edges, 0

    def __call__(self, i):
        self.builds += 1
        v, a, w, m = self.arrays
        j, k = self.edges[i], self.edges[i + 1]
        # copies: nothing of the previous build is kept or shared
        return PlanShard(v[j:k].copy(), a[j:k].copy(), w[j:k].copy(), None if m is None else m[j:k].copy())


@pytest.mark.parametrize("variant", ["plain", "mask", "float32"])
def test_chunked_shards_rebuilt_every_pass_equal_single_machine_dual(seed, variant):
    v, a, w, lo, hi, m, single = _variant_instance(seed, variant)
    # two shards of 3 and 2 chunks (uneven sizes, one single-user chunk)
    first, second = Chunks(v, a, w, m, [0, 250, 251, 700]), Chunks(v, a, w, m, [700, 1000, 1200])
    shards = LocalShards([ChunkedShard(first, 3), ChunkedShard(second, 2)])
    sharded = plan_dual_sharded(shards, lo, hi)
    assert sharded.status == single.status == "optimal"
    assert sharded.objective == pytest.approx(single.objective, abs=1e-9, rel=1e-9)
    np.testing.assert_allclose(sharded.prices, single.prices, atol=1e-9, rtol=0)
    np.testing.assert_allclose(sharded.shares, single.shares, atol=1e-9, rtol=0)
    assert (sharded.n_users, sharded.n_vars) == (1200, single.n_vars)
    # every pass rebuilt every chunk: one build per chunk per pass, and one when the shard was built
    assert first.builds == 3 * (1 + sharded.iterations)
    assert second.builds == 2 * (1 + sharded.iterations)
    scores = v.astype(np.float64) + a.astype(np.float64) @ sharded.prices
    if m is not None:
        scores[~m] = -np.inf
    assert np.array_equal(np.concatenate(shards.map("choose", sharded.prices)), scores.argmax(axis=1))


def test_chunked_shard_errors_are_named():
    with pytest.raises(ValueError, match=r"n_chunks must be an integer >= 1; got 0"):
        ChunkedShard(partial(PlanShard, np.ones((1, 2)), np.ones((1, 2, 1)), np.ones(1)), 0)
    shapes = [np.ones((1, 2, 1)), np.ones((1, 2, 2))]
    with pytest.raises(ValueError, match=r"every chunk must have the same number of constraints K; got \[1, 2\]"):
        ChunkedShard(lambda i: PlanShard(np.ones((1, 2)), shapes[i], np.full(1, 0.5)), 2)


def test_hand_solved_plan_over_two_shards():
    # user 1 (weight 1/2): values 3, 1 with exposure 0, 1; user 2 (1/2): values 2, 2 with exposure 0, 1;
    # floor 0.6 on the share: user 2 takes the exposed layout for free (0.5), user 1 gives up 2 per
    # unit for the missing 0.1 -> x1 = 0.2, objective 0.5 * (3 - 2 * 0.2) + 0.5 * 2 = 2.3, price 2
    s1 = PlanShard(np.array([[3.0, 1.0]]), np.array([[[0.0], [1.0]]]), np.array([0.5]))
    s2 = PlanShard(np.array([[2.0, 2.0]]), np.array([[[0.0], [1.0]]]), np.array([0.5]))
    plan = plan_dual_sharded(LocalShards([s1, s2]), np.array([0.6]), np.array([np.inf]))
    assert plan.objective == pytest.approx(2.3, abs=1e-9)
    assert plan.prices.tolist() == pytest.approx([2.0], abs=1e-9)
    assert plan.shares.tolist() == pytest.approx([0.6], abs=1e-9)


def test_unreachable_floor_is_diagnosed_before_any_pass():
    s = PlanShard(np.array([[1.0, 0.0]]), np.array([[[0.0], [0.5]]]), np.array([1.0]))
    with pytest.raises(InfeasiblePlan, match=r"constraint_0: min 0.8 -> 0.5"):
        plan_dual_sharded(LocalShards([s]), np.array([0.8]), np.array([np.inf]))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PlanShard(np.ones((2, 2)), np.ones((2, 2, 1)), np.array([0.5, -0.5])), r"weight must be a 1-D"),
        (lambda: PlanShard(np.ones((2, 2)), np.ones((2, 3, 1)), np.array([0.5, 0.5])), r"exposure must have shape"),
        (lambda: plan_dual_sharded(LocalShards([PlanShard(np.ones((2, 2)), np.ones((2, 2, 1)),
                                                          np.array([0.2, 0.2]))]),
                                   np.array([0.0]), np.array([1.0])), r"weight must sum to 1 over all shards"),
        (lambda: plan_dual_sharded(LocalShards([PlanShard(np.ones((1, 2)), np.ones((1, 2, 1)), np.ones(1)),
                                                PlanShard(np.ones((1, 2)), np.ones((1, 2, 2)), np.zeros(1))]),
                                   np.zeros(1), np.ones(1)), r"same number of constraints K; got \[1, 2\]"),
        (lambda: plan_dual_sharded(LocalShards([PlanShard(np.ones((1, 2)), np.ones((1, 2, 1)), np.ones(1))]),
                                   np.zeros(2), np.ones(2)), r"lower must have shape \(K,\) = \(1,\)"),
        (lambda: LocalShards([]), r"shards must hold at least one shard"),
    ],
)
def test_bad_inputs_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------------------- compact shards


def count_instance(rng, n_users, n_cand, k, *, mask=False):
    """Exposures that are counts over a page of 60 items (uint8, unit 1/60), float16 values, and bounds
    met by a random mixed policy but not by the unconstrained argmax (as ``random_instance``)."""
    counts = rng.integers(0, 61, size=(n_users, n_cand, k), dtype=np.uint8)
    unit = np.full(k, 1 / 60)
    value = rng.standard_normal((n_users, n_cand)).astype(np.float16)
    weight = rng.random(n_users) + 0.1
    weight /= weight.sum()
    m = None
    if mask:
        m = rng.random((n_users, n_cand)) < 0.7
        m[np.arange(n_users), rng.integers(0, n_cand, n_users)] = True
    # the problem a CompactShard solves: float32 counts * unit, the values widened
    a = np.multiply(counts, unit.astype(np.float32), dtype=np.float32)
    v = value.astype(np.float32)
    real = np.ones((n_users, n_cand), bool) if m is None else m
    mix = rng.dirichlet(np.ones(n_cand), size=n_users) * real
    mix /= mix.sum(axis=1, keepdims=True)
    s_mix = weight @ np.einsum("ul,ulk->uk", mix, a.astype(np.float64))
    s_best = weight @ a[np.arange(n_users), np.where(real, v, -np.inf).argmax(axis=1)].astype(np.float64)
    target = s_best + rng.uniform(0.3, 0.9, size=k) * (s_mix - s_best)
    lower = np.where(s_mix > s_best, target, -np.inf)
    upper = np.where(s_mix > s_best, np.inf, target)
    return value, counts, unit, weight, m, v, a, lower, upper


@pytest.mark.parametrize("masked", [False, True])
def test_compact_shard_solves_the_float32_problem_of_its_counts(seed, masked):
    rng = np.random.default_rng(seed)
    value, counts, unit, weight, m, v, a, lo, hi = count_instance(rng, 1500, 6, 4, mask=masked)
    single = plan_dual(v, a, weight, lo, hi, m)
    cuts = [0, 700, 1500]
    shards = LocalShards([CompactShard(value[i:j], counts[i:j], unit, weight[i:j], None if m is None else m[i:j],
                                       chunk_users=256) for i, j in zip(cuts[:-1], cuts[1:], strict=True)])
    plan = plan_dual_sharded(shards, lo, hi)
    assert plan.status == single.status == "optimal"
    assert plan.objective == pytest.approx(single.objective, abs=1e-9, rel=1e-9)
    np.testing.assert_allclose(plan.prices, single.prices, atol=1e-9, rtol=0)
    np.testing.assert_allclose(plan.shares, single.shares, atol=1e-9, rtol=0)
    assert plan.n_vars == single.n_vars
    # a scalar weight is every user's
    one = CompactShard(value, counts, unit, 1 / 1500)
    np.testing.assert_allclose(one.summary(), PlanShard(v, a, np.full(1500, 1 / 1500)).summary(), atol=1e-12, rtol=0)


def test_compact_shard_refuses_what_it_cannot_hold():
    v, c, u = np.zeros((2, 3), np.float32), np.zeros((2, 3, 1), np.uint8), np.ones(1)
    with pytest.raises(ValueError, match=r"counts must be an unsigned integer array .* got dtype float64"):
        CompactShard(v, c.astype(np.float64), u, 0.5)
    with pytest.raises(ValueError, match=r"unit must hold K = 1 finite values > 0 .* got \[0.0\]"):
        CompactShard(v, c, np.zeros(1), 0.5)
    with pytest.raises(ValueError, match=r"value must be a 2-D float16/float32/float64 array .* got dtype int64"):
        CompactShard(np.zeros((2, 3), np.int64), c, u, 0.5)
    with pytest.raises(ValueError, match=r"value must be finite everywhere"):
        CompactShard(np.full((2, 3), np.inf, np.float16), c, u, 0.5)
    with pytest.raises(ValueError, match=r"mask must be a bool array of shape \(2, 3\) with a real candidate"):
        CompactShard(v, c, u, 0.5, np.zeros((2, 3), bool))
    with pytest.raises(ValueError, match=r"weight must be one float or have shape \(n_users,\) = \(2,\); got shape \(3,\)"):
        CompactShard(v, c, u, np.ones(3))


def test_crossover_counts_equal_one_count_per_band(seed):
    rng = np.random.default_rng(seed)
    v, a, w, _, _, m = random_instance(rng, 700, 6, 3, mask=True)
    prices = rng.normal(0, 0.5, 3)
    deltas = np.array([0.0, 1e-3, 0.01, 0.05, 0.2, 1.0, 10.0])
    for shard in (PlanShard(v, a, w, m), ChunkedShard(lambda i: PlanShard(v[i * 350:(i + 1) * 350],
                                                                           a[i * 350:(i + 1) * 350],
                                                                           w[i * 350:(i + 1) * 350],
                                                                           m[i * 350:(i + 1) * 350]), 2)):
        counts = shard.crossover_counts(prices, deltas)
        assert counts.tolist() == [shard.crossover_count(prices, float(d)) for d in deltas]
    # brute force: pairs of users with a runner-up within the band, each pair within it
    s = np.where(m, v + a @ prices, -np.inf)
    behind = s.max(axis=1, keepdims=True) - s
    near = behind[:, :, None] <= deltas
    assert counts.tolist() == np.where(near.sum(axis=1) >= 2, near.sum(axis=1), 0).sum(axis=0).tolist()


def test_a_warm_start_from_a_sample_reaches_the_optimum_in_a_few_passes(seed):
    rng = np.random.default_rng(seed)
    v, a, w, lo, hi, _ = random_instance(rng, 6000, 8, 4)
    single = plan_dual(v, a, w, lo, hi)
    cold = plan_dual_sharded(split(v, a, w, None, [3000]), lo, hi)
    # the plan of a 10 % sample of the users (weights renormalised) starts the full problem
    idx = np.sort(rng.choice(6000, 600, replace=False))
    sample = plan_dual_sharded(split(v[idx], a[idx], w[idx] / w[idx].sum(), None, [300]), lo, hi)
    for start in (sample.prices, np.zeros(4), 50 * rng.standard_normal(4)):
        warm = plan_dual_sharded(split(v, a, w, None, [3000]), lo, hi, start=start)
        assert warm.status == "optimal" and warm.gap <= 1e-6 and warm.violation <= 1e-6
        assert warm.objective == pytest.approx(single.objective, abs=1e-9, rel=1e-9)
        np.testing.assert_allclose(warm.shares, single.shares, atol=1e-8, rtol=0)
    warm = plan_dual_sharded(split(v, a, w, None, [3000]), lo, hi, start=sample.prices)
    assert warm.method == "sharded-dual-warm-crossover"
    assert warm.iterations <= 6 < cold.iterations
    np.testing.assert_allclose(warm.prices, single.prices, atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match=r"start must hold K = 4 finite prices; got \[0.0, 0.0\]"):
        plan_dual_sharded(split(v, a, w, None, [3000]), lo, hi, start=np.zeros(2))
