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
