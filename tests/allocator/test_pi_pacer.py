"""PI pacing: closed-form step response, the per-decision law, a stochastic serving plant, anti-windup,
state round trips and named errors.

References used: the first-order recursion of a linear plant written out by hand, a per-decision loop
of the law stated in ``allocator/_controller.py``, the plant's own argmax serving, and DualPacer.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from allocator import DualPacer, PacerConfig, PIPacer, PIPacerConfig

INF = math.inf


def run_linear(pacer, n_rows, plant, n_steps):
    """Serve ``n_rows[t]`` requests at the current prices on a noise-free plant; returns prices per step."""
    out = []
    for t in range(n_steps):
        share = plant(pacer.prices_)
        out.append(pacer.update(np.tile(share, (n_rows[t], 1))))
    return np.array(out)


# ----------------------------------------------------------------------------------------------
# 1. closed-form step response on a linear plant
# ----------------------------------------------------------------------------------------------


def test_step_response_is_the_first_order_recursion(seed):
    # plant: share_0 = 0.1 + 0.5 * price_0 (floor 0.30, aim 0.31); share_1 = 0.6 + 0.4 * price_1 (cap 0.40,
    # aim 0.39, price <= 0); share_2 = 0.5 whatever the price (floor 0.20: slack)
    s0, g = np.array([0.1, 0.6, 0.5]), np.array([0.5, 0.4, 0.0])
    cfg = PIPacerConfig(
        lower=(0.30, -INF, 0.20), upper=(INF, 0.40, INF), max_price=2.0, gain=0.01, margin=0.01
    )
    n_rows = np.random.default_rng(seed).integers(1, 80, size=200)  # gain * g * n <= 0.4: no clamp is hit
    prices = run_linear(PIPacer(cfg), n_rows, lambda p: s0 + g * p, 200)

    # by hand: between clamps the price moves by gain * (total deficit of the batch), the deficit of a
    # floor being aim - share and of a cap share - aim (its price is minus the cap multiplier)
    floor, cap = [], []
    lam0 = lam1 = 0.0
    for n in n_rows:
        lam0 = lam0 + 0.01 * n * (0.31 - (0.1 + 0.5 * lam0))
        lam1 = lam1 - 0.01 * n * ((0.6 + 0.4 * lam1) - 0.39)
        floor.append(lam0)
        cap.append(lam1)
    np.testing.assert_allclose(prices[:, 0], floor, rtol=0, atol=1e-12)
    np.testing.assert_allclose(prices[:, 1], cap, rtol=0, atol=1e-12)
    assert (prices[:, 2] == 0.0).all()  # slack floor: exactly 0 throughout
    # ... converging monotonically (no overshoot) to price* = (aim - s0) / g
    assert prices[-1, 0] == pytest.approx((0.31 - 0.1) / 0.5, abs=1e-9)
    assert prices[-1, 1] == pytest.approx((0.39 - 0.6) / 0.4, abs=1e-9)
    assert (np.diff(prices[:, 0]) >= -1e-12).all() and (np.diff(prices[:, 1]) <= 1e-12).all()


def test_response_scales_the_gain_and_gain_n_one_is_deadbeat():
    cfg = PIPacerConfig(lower=(0.30,), upper=(INF,), max_price=5.0, gain=1 / 50, margin=0.01)
    pacer = PIPacer(cfg)
    # share = 0.1 + 0.25 * price; response = the true slope and gain * n = 1: one batch lands on price*
    for _ in range(3):
        share = 0.1 + 0.25 * pacer.prices_
        pacer.update(np.tile(share, (50, 1)), response=np.array([0.25]))
        assert pacer.prices_[0] == pytest.approx((0.31 - 0.1) / 0.25, abs=1e-12)
    # a response of r is the same as gain / r
    a = PIPacer(cfg).update(np.full((7, 1), 0.2), response=np.array([0.5]))
    b = PIPacer(PIPacerConfig(lower=(0.30,), upper=(INF,), max_price=5.0, gain=1 / 25, margin=0.01)).update(
        np.full((7, 1), 0.2)
    )
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)


def test_between_clamps_it_moves_as_dual_pacer_with_step_gain_n(seed):
    # the module docstring's claim: same prices as DualPacer(step_size = gain * n, lower + margin)
    rng = np.random.default_rng(seed)
    s0, g = rng.uniform(0.05, 0.2, size=2), rng.uniform(0.3, 1.0, size=2)
    pi = PIPacer(PIPacerConfig(lower=(0.3, 0.25), upper=(INF, INF), max_price=3.0, gain=0.015, margin=0.02))
    dual = DualPacer(PacerConfig(lower=(0.32, 0.27), upper=(INF, INF), step_size=0.015 * 40, max_price=3.0))
    for _ in range(50):
        for pacer in (pi, dual):
            pacer.update(np.tile(s0 + g * pacer.prices_, (40, 1)))
        np.testing.assert_allclose(pi.prices_, dual.prices_, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# the batch sums against the per-decision law
# ----------------------------------------------------------------------------------------------


def test_batch_update_equals_the_per_decision_law(seed):
    rng = np.random.default_rng(seed)
    gain, half_life, aim = 0.003, 40.0, 0.5
    cfg = PIPacerConfig(
        lower=(0.45, 0.45), upper=(INF, INF), max_price=1e6, gain=gain, half_life=half_life, margin=0.05
    )
    pacer = PIPacer(cfg)
    gamma = 2.0 ** (-1.0 / half_life)
    s = [0.0, 0.0]
    w_sum = f = i = 0.0  # constraint 0's EW deficit F and integral I
    for _ in range(12):
        n = int(rng.integers(1, 30))
        rows = rng.uniform(0.0, 0.4, size=(n, 2))  # always under the aim: no clamp, so the law is linear
        weights = rng.uniform(0.1, 2.0, size=n)
        pacer.update(rows, weights=weights)
        wn = weights * n / weights.sum()
        for j in range(n):  # the module docstring's law, one decision at a time
            i += gain * (1 - gamma) * f
            f = gamma * f + wn[j] * (aim - rows[j, 0])
            w_sum = gamma * w_sum + wn[j]
            s = [gamma * s[c] + wn[j] * rows[j, c] for c in range(2)]
        assert pacer.n_effective_ == pytest.approx(w_sum, rel=1e-12)
        np.testing.assert_allclose(pacer.shares_, [s[0] / w_sum, s[1] / w_sum], rtol=1e-12)
        assert pacer.floor_integral_[0] == pytest.approx(i, rel=1e-9, abs=1e-12)
        assert pacer.prices_[0] == pytest.approx(i + gain * f, rel=1e-9, abs=1e-12)


def test_overshoot_is_the_ew_mean_excess_while_priced():
    cfg = PIPacerConfig(lower=(0.30,), upper=(INF,), max_price=5.0, gain=0.001, half_life=100.0, margin=0.01)
    pacer = PIPacer(cfg, prices=np.array([1.0]))  # the plan's price, on traffic already at share 0.5
    gamma = 2.0 ** (-1.0 / 100.0)
    pacer.update(np.full((10, 1), 0.5))
    assert pacer.overshoot_[0] == pytest.approx(0.5 - 0.31, abs=1e-12)
    assert pacer.prices_[0] > 0  # still priced: the next batch counts too
    pacer.update(np.full((20, 1), 0.6))
    w1 = sum(gamma**j for j in range(10))
    w2 = sum(gamma**j for j in range(20))
    share = (gamma**20 * w1 * 0.5 + w2 * 0.6) / (gamma**20 * w1 + w2)
    expected = (gamma**20 * w1 * 0.19 + w2 * (share - 0.31)) / (gamma**20 * w1 + w2)
    assert pacer.overshoot_[0] == pytest.approx(expected, abs=1e-12)
    # unpriced batches add zero excess: a slack floor at price 0 reports no overshoot
    slack = PIPacer(cfg)
    slack.update(np.full((10, 1), 0.9))
    assert slack.overshoot_[0] == 0.0 and slack.prices_[0] == 0.0


# ----------------------------------------------------------------------------------------------
# 2. a stochastic serving plant
# ----------------------------------------------------------------------------------------------

N_CAND, BATCH, N_BATCHES, BURN_IN, WINDOW = 6, 50, 160, 40, 300
LOWER, UPPER, MARGIN = (0.30, 0.20), (0.45, INF), 0.01
AIM = LOWER[0] + MARGIN


def draw_requests(rng, n):
    """Candidates of n requests: (n, N_CAND) values and (n, N_CAND, 2) exposures.

    A homepage of 40 modules; candidate l shows ``base + l`` modules of category A (``base`` in 10..12 per
    request), each worth 0.15 less than the request's best, plus N(0, 0.1) noise; its long-tail share is
    U(0.3, 0.5).  Unpriced, category A gets ~0.28: the 0.30 floor binds, its 0.45 cap and the 0.20
    long-tail floor are slack.
    """
    steps = np.arange(N_CAND)
    share_a = (rng.integers(10, 13, size=(n, 1)) + steps) / 40.0
    tail = rng.uniform(0.3, 0.5, size=(n, N_CAND))
    value = rng.normal(0.0, 0.1, size=(n, N_CAND)) - 0.15 * steps
    return value, np.stack([share_a, tail], axis=-1)


def serve(rng, n, prices):
    value, exposure = draw_requests(rng, n)
    return exposure[np.arange(n), np.argmax(value + exposure @ prices, axis=1)]


@pytest.fixture(scope="module")
def plan_sensitivity():
    """(price*, d share / d price at price*) of category A, from a large sample, as a plan would give them."""
    value, exposure = draw_requests(np.random.default_rng(2024), 20_000)

    def share(price):
        return exposure[np.arange(20_000), np.argmax(value + exposure[..., 0] * price, axis=1), 0].mean()

    lo, hi = 0.0, 15.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) < AIM else (lo, mid)
    return lo, share(lo + 0.5) - share(lo - 0.5)


def serve_stream(pacer, seed, **update_kwargs):
    """(N_BATCHES * BATCH, 2) served exposures and (N_BATCHES + 1, 2) prices; the same requests for any pacer."""
    rng = np.random.default_rng(seed)
    served, prices = [], [pacer.prices_.copy()]
    for _ in range(N_BATCHES):
        batch = serve(rng, BATCH, pacer.prices_)
        served.append(batch)
        prices.append(pacer.update(batch, **update_kwargs))
    return np.concatenate(served), np.array(prices)


def window_shares(x):
    """Share of every window of WINDOW consecutive requests after the burn-in."""
    c = np.concatenate([[0.0], np.cumsum(x[BURN_IN * BATCH :])])
    return (c[WINDOW:] - c[:-WINDOW]) / WINDOW


def test_stochastic_plant_holds_the_floor_within_one_point(seed, plan_sensitivity):
    price_star, slope = plan_sensitivity
    assert 3.0 < price_star < 7.0 and 0.01 < slope < 0.04  # the plant is as described
    pacer = PIPacer(PIPacerConfig(lower=LOWER, upper=UPPER, max_price=20.0, margin=MARGIN))
    served, prices = serve_stream(pacer, seed, response=np.array([slope, 1.0]))
    dev = window_shares(served[:, 0]) - AIM
    # every 300-request window after the burn-in within 1 pp of the aim (so above the 0.30 floor)
    assert np.abs(dev).max() <= 0.01, (dev.min(), dev.max())
    assert (prices[:, 1] == 0.0).all()  # the slack long-tail floor is never priced
    assert pacer.cap_multipliers_[0] == 0.0 and pacer.overshoot_[0] < 0.005
    assert prices[-1, 0] == pytest.approx(price_star, abs=1.5)

    # DualPacer on the same requests, aiming at the same share, with a step four times the plant's stable
    # one (1 / slope): a step tuned on a less sensitive plant. PIPacer states its gain per unit of slope.
    dual = DualPacer(PacerConfig(lower=(AIM, LOWER[1]), upper=UPPER, step_size=4.0 / slope, max_price=20.0))
    dual_served, _ = serve_stream(dual, seed)
    dual_dev = window_shares(dual_served[:, 0]) - AIM
    assert np.maximum(dev, 0.0).mean() < np.maximum(dual_dev, 0.0).mean()


# ----------------------------------------------------------------------------------------------
# 3. anti-windup
# ----------------------------------------------------------------------------------------------


def updates_to_settle(prices, plant, aim, tol=1e-3):
    """1 + the last step whose share is off the aim by more than tol."""
    off = np.flatnonzero(np.abs(plant(prices) - aim) > tol)
    return 0 if off.size == 0 else int(off[-1]) + 1


@pytest.mark.parametrize("n_saturated", [20, 400])
def test_recovery_after_an_unreachable_spell_is_bounded(n_saturated):
    # share stuck at 0.2 < aim 0.31 whatever the price, then share = 0.1 + 0.5 * price (price* = 0.42)
    cfg = PIPacerConfig(lower=(0.30,), upper=(INF,), max_price=1.0, gain=0.01, margin=0.01)
    pacer = PIPacer(cfg)
    held = None
    for _ in range(n_saturated):
        pacer.update(np.full((50, 1), 0.2))
        assert 0.0 <= pacer.floor_integral_[0] <= 1.0
        if held is None and pacer.prices_[0] == 1.0:
            held = pacer.floor_integral_[0]
    assert pacer.prices_[0] == 1.0 and pacer.floor_integral_[0] == held < 1.0  # not grown since the clamp
    after = run_linear(pacer, [50] * 100, lambda p: 0.1 + 0.5 * p, 100)[:, 0]
    assert (after <= 1.0).all() and after[0] < 1.0  # leaves the clamp on the first reachable batch
    # ~ log(1e-3 / 0.6) / log(1 - 0.25) = 22 updates: the linear loop's own settling time, whatever the spell
    assert updates_to_settle(after, lambda p: 0.1 + 0.5 * p, 0.31) <= 25

    # the same law without anti-windup (integral neither held nor bounded) takes longer the longer the spell
    gamma, f, i, lam = 2.0 ** (-1 / 300), 0.0, 0.0, 0.0
    naive = []
    for t in range(n_saturated + 300):
        share = 0.2 if t < n_saturated else 0.1 + 0.5 * lam
        for _ in range(50):
            i += 0.01 * (1 - gamma) * f
            f = gamma * f + (0.31 - share)
        lam = min(max(i + 0.01 * f, 0.0), 1.0)
        naive.append(lam)
    naive_settle = updates_to_settle(np.array(naive[n_saturated:]), lambda p: 0.1 + 0.5 * p, 0.31)
    assert naive_settle > {20: 15, 400: 150}[n_saturated]  # 20 and 165 updates


# ----------------------------------------------------------------------------------------------
# 4. state, inputs and errors
# ----------------------------------------------------------------------------------------------


def test_dict_round_trip_continues_identically(seed):
    rng = np.random.default_rng(seed)
    cfg = PIPacerConfig(
        lower=(0.2, -INF, 0.1),
        upper=(0.6, 0.5, 0.3),
        max_price=4.0,
        gain=0.02,
        half_life=80.0,
        margin=0.02,
        names=("a", "tail", "c"),
    )
    a = PIPacer(cfg, prices=np.array([0.1, -0.2, 0.0]))
    for _ in range(5):
        a.update(rng.random((int(rng.integers(1, 20)), 3)), response=rng.uniform(0.2, 2.0, size=3))
    b = PIPacer.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b.config == cfg and b.n_updates_ == 5
    for _ in range(5):
        batch, w, r = rng.random((9, 3)), rng.uniform(0.0, 1.0, size=9), rng.uniform(0.2, 2.0, size=3)
        np.testing.assert_array_equal(
            a.update(batch, weights=w, response=r), b.update(batch, weights=w, response=r)
        )
    for name in ("floor_integral_", "cap_integral_", "shares_", "overshoot_"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.n_effective_ == b.n_effective_


def test_fresh_pacer_round_trips_and_reset_forgets():
    cfg = PIPacerConfig(lower=(0.1,), upper=(INF,), max_price=2.0)
    fresh = PIPacer.from_dict(json.loads(json.dumps(PIPacer(cfg).to_dict())))
    assert np.isnan(fresh.shares_).all() and fresh.n_effective_ == 0.0 and fresh.n_updates_ == 0
    pacer = PIPacer(cfg)
    pacer.update(np.zeros((5, 1)))
    pacer.reset(np.array([0.7]))
    assert pacer.to_dict() == PIPacer(cfg, prices=np.array([0.7])).to_dict()


def test_inputs_are_not_mutated():
    rows, w, r, start = np.array([[0.1], [0.3]]), np.array([1.0, 3.0]), np.array([0.5]), np.array([0.25])
    pacer = PIPacer(PIPacerConfig(lower=(0.5,), upper=(INF,), max_price=1.0), prices=start)
    pacer.update(rows, weights=w, response=r)
    np.testing.assert_array_equal(rows, [[0.1], [0.3]])
    np.testing.assert_array_equal(w, [1.0, 3.0])
    np.testing.assert_array_equal(r, [0.5])
    np.testing.assert_array_equal(start, [0.25])
    state = pacer.to_dict()
    copy = json.loads(json.dumps(state))
    PIPacer.from_dict(state).update(rows)
    assert state == copy


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"lower": (0.5,), "upper": (0.4,)},
            r"lower must be <= upper for every constraint; got lower\[0\] = 0.5",
        ),
        ({"lower": (0.5, 0.1), "upper": (1.0,)}, r"upper must have the same length as lower \(2\); got 1"),
        ({"lower": (float("nan"),), "upper": (1.0,)}, r"lower must not contain NaN"),
        ({"max_price": INF}, r"max_price must be a finite float > 0; got inf"),
        ({"max_price": 0.0}, r"max_price must be a finite float > 0; got 0.0"),
        ({"gain": -0.1}, r"gain must be a finite float > 0; got -0.1"),
        ({"half_life": 0}, r"half_life must be a finite float > 0; got 0"),
        ({"margin": -0.01}, r"margin must be a finite float >= 0; got -0.01"),
        (
            {"lower": (0.3,), "upper": (0.35,), "margin": 0.03},
            r"margin must be <= \(upper - lower\) / 2 .* got margin = 0.03 with lower\[0\] = 0.3, upper\[0\] = 0.35",
        ),
        ({"names": ("a", "b")}, r"names must be empty or hold K = 1 names"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    base = {"lower": (0.1,), "upper": (0.9,), "max_price": 1.0}
    with pytest.raises(ValueError, match=match):
        PIPacerConfig(**(base | kwargs))


def test_bad_update_start_and_state_are_named():
    pacer = PIPacer(PIPacerConfig(lower=(0.5, -INF), upper=(INF, 0.5), max_price=1.0))
    with pytest.raises(
        ValueError, match=r"realised_exposure must have shape \(n, K\) = \(n >= 1, 2\); got \(4, 3\)"
    ):
        pacer.update(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"realised_exposure must be finite"):
        pacer.update(np.full((2, 2), np.nan))
    with pytest.raises(
        ValueError, match=r"weights must be finite, >= 0, not all 0, of shape \(n,\) = \(4,\)"
    ):
        pacer.update(np.zeros((4, 2)), weights=np.zeros(4))
    with pytest.raises(
        ValueError, match=r"response must be a finite array of shape \(K,\) = \(2,\) with every entry > 0"
    ):
        pacer.update(np.zeros((4, 2)), response=np.array([0.5, 0.0]))
    with pytest.raises(
        ValueError, match=r"prices may be > 0 only on a constraint with a floor .* got prices\[1\] = 0.3"
    ):
        PIPacer(pacer.config, prices=np.array([0.0, 0.3]))
    with pytest.raises(
        ValueError, match=r"state must be a dict written by PIPacer.to_dict; missing or bad key"
    ):
        PIPacer.from_dict({"config": {}})
    state = pacer.to_dict() | {"floor_integral": [0.1, -1.0]}
    with pytest.raises(ValueError, match=r"state\['floor_integral'\] must hold K = 2 values in \[0, 1.0\]"):
        PIPacer.from_dict(state)
    state = pacer.to_dict() | {"n_effective": 3.0}  # shares still None
    with pytest.raises(ValueError, match=r"state\['shares'\] must hold K = 2 values, NaN exactly when"):
        PIPacer.from_dict(state)
    with pytest.raises(ValueError, match=r"half_life must be a finite float > 0; got 'long'"):
        PIPacerConfig(lower=(0.1,), upper=(INF,), max_price=1.0, half_life="long")
    assert pacer.n_updates_ == 0  # failed updates change nothing
