"""Softmax serving: the served pmf against bandits.budget_pmf, the response against finite differences."""

from __future__ import annotations

import numpy as np
import pytest

from allocator import exploit_pmf, exploitable, serving_pmf, softmax_prices, softmax_response
from bandits import budget_pmf


@pytest.mark.parametrize("mvl", [None, 0.05, 0.5])
def test_serving_pmf_is_the_exploit_mixture_of_budget_pmfs(mvl: float | None) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        J = int(rng.integers(1, 9))
        base = rng.dirichlet(np.ones(J))
        q = rng.dirichlet(np.full(J, 0.3))
        value = rng.normal(5, 3, J)
        budget = float(rng.uniform(0, 0.3))
        ref = sum(q[j] * budget_pmf(base, j, budget, value=value, max_value_loss=mvl) for j in range(J))
        got = serving_pmf(base, q, budget, value=value, max_value_loss=mvl)
        np.testing.assert_allclose(got, ref, atol=1e-12)
        # batched rows give the same rows
        np.testing.assert_allclose(serving_pmf(np.stack([base, base]), np.stack([q, q]), budget, value=np.stack(
            [value, value]), max_value_loss=mvl), np.stack([ref, ref]), atol=1e-12)


def test_one_hot_exploit_is_budget_pmf() -> None:
    base = np.array([0.1, 0.2, 0.3, 0.4])
    for g in range(4):
        np.testing.assert_allclose(serving_pmf(base, np.eye(4)[g], 0.07), budget_pmf(base, g, 0.07), atol=1e-12)


def test_exploit_pmf_limits_and_value_bound() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(10, 2, (200, 12))
    priced = v + rng.normal(0, 1, v.shape)
    arg = exploit_pmf(priced, v, 0.0)
    np.testing.assert_array_equal(arg.argmax(1), priced.argmax(1))
    assert set(np.unique(arg)) == {0.0, 1.0}
    for t in (0.001, 0.01, 0.1):
        q = exploit_pmf(priced, v, t)
        np.testing.assert_allclose(q.sum(1), 1.0)
        tau = t * np.abs(v).max(1)
        loss = priced.max(1) - (q * priced).sum(1)
        # the softmax's closed-form bound: what it gives up is at most tau * log J
        assert (loss <= tau * np.log(12) + 1e-12).all()
    # tiny temperature: the argmax
    np.testing.assert_allclose(exploit_pmf(priced, v, 1e-9), arg, atol=1e-12)
    # padding is never chosen, ties share equally
    q = exploit_pmf(np.array([[3.0, 3.0, 9.0]]), np.ones((1, 3)), 0.5, mask=np.array([[True, True, False]]))
    np.testing.assert_allclose(q, [[0.5, 0.5, 0.0]])


def test_softmax_response_is_the_derivative_of_the_shares() -> None:
    rng = np.random.default_rng(2)
    n, J, K = 300, 7, 2
    v = rng.normal(4, 1, (n, J))
    a = rng.uniform(0, 1, (n, J, K))
    w = rng.uniform(0.5, 2, n)
    p = np.array([0.3, -0.2])
    t = 0.05
    shares, d = softmax_response(v, a, p, t, weight=w)
    q = exploit_pmf(v + a @ p, v, t)
    np.testing.assert_allclose(shares, (w / w.sum()) @ np.einsum("nj,njk->nk", q, a), atol=1e-12)
    h = 1e-5
    for k in range(K):
        e = np.eye(K)[k] * h
        fd = (softmax_response(v, a, p + e, t, weight=w)[0][k] - softmax_response(v, a, p - e, t, weight=w)[0][k]) / (2 * h)
        assert d[k] == pytest.approx(fd, rel=1e-5)
    assert (softmax_response(v, a, p, 0.0)[1] == 0).all()


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="temperature"):
        exploit_pmf(np.ones(3), np.ones(3), -1.0)
    with pytest.raises(ValueError, match="budget"):
        serving_pmf(np.ones(2) / 2, np.array([1.0, 0.0]), 1.5)


def _problem(seed: int, n: int = 400, J: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    v = rng.normal(5, 1, (n, J))
    a = np.stack([rng.uniform(0, 0.5, (n, J)), rng.uniform(0, 1, (n, J))], axis=2)
    a[:, :, 0] -= 0.3 * (v - 5) / 5  # exposure of constraint 0 costs value: its floor binds
    w = rng.uniform(0.5, 1.5, n)
    return v, np.clip(a, 0, 1), w


def test_softmax_prices_meet_the_bounds_with_complementary_slackness() -> None:
    v, a, w = _problem(3)
    t = 0.02
    free, _ = softmax_response(v, a, np.zeros(2), t, weight=w)
    lo = np.array([free[0] + 0.05, -np.inf])  # a floor above what is served for free: binds
    hi = np.array([np.inf, free[1] + 0.2])  # a cap that does not bind
    p = softmax_prices(v, a, lo, hi, t, weight=w)
    shares, _ = softmax_response(v, a, p, t, weight=w)
    assert shares[0] == pytest.approx(lo[0], abs=1e-6)  # the binding floor is met exactly
    assert p[0] > 0 and p[1] == 0.0  # a price only where a bound binds
    assert shares[1] <= hi[1]
    # a binding cap gets a negative price and is met exactly
    hi2 = np.array([np.inf, free[1] - 0.05])
    p2 = softmax_prices(v, a, np.array([-np.inf, -np.inf]), hi2, t, weight=w)
    s2, _ = softmax_response(v, a, p2, t, weight=w)
    assert p2[1] < 0 and s2[1] == pytest.approx(hi2[1], abs=1e-6)


def test_softmax_price_of_one_floor_matches_a_brute_force_search() -> None:
    v, a, w = _problem(4, n=200, J=5)
    a = a[:, :, :1]
    t = 0.05
    free, _ = softmax_response(v, a, np.zeros(1), t, weight=w)
    lo = free + 0.04
    p = softmax_prices(v, a, lo, np.array([np.inf]), t, weight=w)
    # the share is increasing in the price: the smallest price on a fine grid meeting the floor
    grid = np.linspace(0, 20, 200_001)
    shares = np.array([softmax_response(v, a, np.array([g]), t, weight=w)[0][0] for g in grid[::1000]])
    k = int(np.argmax(shares >= lo[0]))
    fine = grid[max(k - 1, 0) * 1000:(k + 1) * 1000 + 1]
    s_fine = np.array([softmax_response(v, a, np.array([g]), t, weight=w)[0][0] for g in fine])
    ref = fine[int(np.argmax(s_fine >= lo[0]))]
    assert p[0] == pytest.approx(ref, abs=2e-4)


def test_softmax_prices_approach_the_lp_as_temperature_falls() -> None:
    from allocator import solve_plan

    v, a, w = _problem(5, n=150, J=6)
    free, _ = softmax_response(v, a, np.zeros(2), 1e-6, weight=w)
    lo, hi = np.array([free[0] + 0.05, -np.inf]), np.array([np.inf, np.inf])
    lp = solve_plan(v, a, w / w.sum(), lo, hi, np.ones(v.shape, dtype=bool), method="lp")
    gaps = []
    for t in (0.02, 0.005, 0.001):
        p = softmax_prices(v, a, lo, hi, t, weight=w, start=lp.prices)
        q = exploit_pmf(v + a @ p, v, t)
        value = (w / w.sum()) @ (q * v).sum(1)
        gaps.append(lp.objective - value)
    # never better than the LP optimum (it is feasible for the LP), and closer as the temperature falls
    assert all(g >= -1e-7 for g in gaps)
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.01 * abs(lp.objective)


def test_exploitable_keeps_tilts_only_for_a_long_tail_goal() -> None:
    tilt = np.array([[0.0, 0.25, 0.0, 0.5], [0.25, 0.5, 0.25, 0.0]])
    mask = np.array([[True, True, True, False], [True, True, True, False]])  # row 2's untilted one is padding
    np.testing.assert_array_equal(exploitable(tilt, mask, True), mask)
    np.testing.assert_array_equal(exploitable(tilt, mask, False),
                                  [[True, False, True, False], [True, False, True, False]])
    np.testing.assert_array_equal(exploitable(tilt[0], mask[0], False), [True, False, True, False])
