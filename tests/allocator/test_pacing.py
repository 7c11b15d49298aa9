"""Online dual pacing: closed-form steps, projection, convergence on a simulated stream."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from allocator._pacing import DualPacer, PacerConfig
from allocator._plan import choose_batch, plan_lp

INF = math.inf


def test_one_step_is_projected_dual_descent():
    cfg = PacerConfig(lower=(0.4, -INF, 0.1), upper=(INF, 0.3, 0.2), step_size=2.0)
    pacer = DualPacer(cfg)
    realised = np.array([[0.2, 0.5, 0.0], [0.4, 0.3, 0.0]])  # shares (0.3, 0.4, 0.0)
    prices = pacer.update(realised)
    # floor 0: 0 - 2 * (0.3 - 0.4) = 0.2; cap 1: -(0 - 2 * (0.3 - 0.4)) = -0.2;
    # constraint 2 (range): floor multiplier 2 * 0.1 = 0.2, cap multiplier clipped at 0
    assert prices == pytest.approx([0.2, -0.2, 0.2], abs=1e-12)
    assert pacer.shares_ == pytest.approx([0.3, 0.4, 0.0])
    # shares now above the floor: the floor price falls but never below 0 (projection)
    prices = pacer.update(np.array([[0.9, 0.1, 0.15]]))
    # cap 1: 0.2 - 2 * (0.3 - 0.1) < 0 -> 0; range 2: floor 0.2 - 2 * 0.05, cap stays 0
    assert prices == pytest.approx([0.0, 0.0, 0.2 - 2 * 0.05], abs=1e-12)
    assert pacer.floor_multipliers_[0] == 0.0 and pacer.cap_multipliers_[1] == 0.0
    assert pacer.n_updates_ == 2


def test_max_price_bounds_the_multipliers():
    pacer = DualPacer(PacerConfig(lower=(0.9,), upper=(INF,), step_size=10.0, max_price=1.5))
    for _ in range(5):
        pacer.update(np.zeros((3, 1)))
    assert pacer.prices_ == pytest.approx([1.5])


def test_weights_equal_repeated_rows(seed):
    rng = np.random.default_rng(seed)
    cfg = PacerConfig(lower=(0.5, -INF), upper=(INF, 0.4), step_size=0.7)
    rows = rng.random((6, 2))
    counts = rng.integers(0, 4, size=6)
    counts[0] += 1
    weighted = DualPacer(cfg).update(rows, weights=counts.astype(float))
    repeated = DualPacer(cfg).update(np.repeat(rows, counts, axis=0))
    assert weighted == pytest.approx(repeated, abs=1e-12)


def draw_users(rng, n, n_cand=8):
    """Synthetic traffic: a 'live' layout (worth less) appears at random; tail share in [0, 1]."""
    exposure = np.zeros((n, n_cand, 2))
    exposure[:, :, 0] = rng.random((n, n_cand)) < 0.3
    exposure[:, :, 1] = rng.random((n, n_cand))
    value = rng.standard_normal((n, n_cand)) - 0.8 * exposure[:, :, 0]
    return value, exposure


def test_pacing_drives_a_stream_to_its_targets_and_to_the_plan_prices(seed):
    rng = np.random.default_rng(seed)
    lower, upper = (0.4, -INF), (INF, 0.45)
    pacer = DualPacer(PacerConfig(lower=lower, upper=upper, step_size=0.5))
    shares, prices = [], []
    for _ in range(600):
        v, a = draw_users(rng, 100)
        served = a[np.arange(100), choose_batch(v, a, pacer.prices_)]
        shares.append(served.mean(axis=0))
        prices.append(pacer.update(served))
    late = np.array(shares[300:]).mean(axis=0)
    assert abs(late[0] - 0.4) <= 0.01 and abs(late[1] - 0.45) <= 0.01
    # the offline plan on a large sample of the same traffic: the prices the pacer hovers around
    v, a = draw_users(rng, 6000)
    unconstrained = a[np.arange(6000), choose_batch(v, a, np.zeros(2))].mean(axis=0)
    assert unconstrained[0] < 0.3 and unconstrained[1] > 0.47  # both targets bind
    plan = plan_lp(v, a, np.full(6000, 1 / 6000), np.array(lower), np.array(upper))
    assert np.array(prices[300:]).mean(axis=0) == pytest.approx(plan.prices, abs=0.1)


def test_dict_round_trip_continues_identically(seed):
    rng = np.random.default_rng(seed)
    cfg = PacerConfig(
        lower=(0.2, -INF), upper=(0.6, 0.5), step_size=0.3, max_price=4.0, names=("live", "tail")
    )
    a = DualPacer(cfg, prices=np.array([0.1, -0.2]))
    a.update(rng.random((10, 2)))
    b = DualPacer.from_dict(json.loads(json.dumps(a.to_dict())))
    assert b.config == cfg
    np.testing.assert_array_equal(b.prices_, a.prices_)
    batch = rng.random((10, 2))
    np.testing.assert_array_equal(a.update(batch), b.update(batch))
    assert b.n_updates_ == 2


def test_fresh_pacer_round_trips_with_nan_shares():
    pacer = DualPacer(PacerConfig(lower=(0.1,), upper=(INF,)))
    again = DualPacer.from_dict(json.loads(json.dumps(pacer.to_dict())))
    assert np.isnan(again.shares_).all() and again.n_updates_ == 0


def test_update_does_not_mutate_inputs():
    rows, w = np.array([[0.1], [0.3]]), np.array([1.0, 2.0])
    start = np.array([0.25])
    pacer = DualPacer(PacerConfig(lower=(0.5,), upper=(INF,)), prices=start)
    pacer.update(rows, weights=w)
    np.testing.assert_array_equal(rows, [[0.1], [0.3]])
    np.testing.assert_array_equal(w, [1.0, 2.0])
    np.testing.assert_array_equal(start, [0.25])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"lower": (0.5,), "upper": (0.4,)},
            r"lower must be <= upper for every constraint; got lower\[0\] = 0.5 > upper\[0\] = 0.4",
        ),
        ({"lower": (0.5, 0.1), "upper": (1.0,)}, r"upper must have the same length as lower \(2\); got 1"),
        ({"lower": (float("nan"),), "upper": (1.0,)}, r"lower must not contain NaN"),
        (
            {"lower": (0.1,), "upper": (1.0,), "step_size": 0.0},
            r"step_size must be a finite float > 0; got 0.0",
        ),
        ({"lower": (0.1,), "upper": (1.0,), "max_price": -1.0}, r"max_price must be > 0; got -1.0"),
        ({"lower": (0.1,), "upper": (1.0,), "names": ("a", "b")}, r"names must be empty or hold K = 1 names"),
    ],
)
def test_bad_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PacerConfig(**kwargs)


def test_bad_update_and_start_prices_are_named():
    cfg = PacerConfig(lower=(0.5, -INF), upper=(INF, 0.5))
    pacer = DualPacer(cfg)
    with pytest.raises(
        ValueError, match=r"realised_exposure must have shape \(n, K\) = \(n >= 1, 2\); got \(4, 3\)"
    ):
        pacer.update(np.zeros((4, 3)))
    with pytest.raises(
        ValueError, match=r"weights must be finite, >= 0, not all 0, of shape \(n,\) = \(4,\)"
    ):
        pacer.update(np.zeros((4, 2)), weights=np.zeros(4))
    with pytest.raises(
        ValueError, match=r"prices may be > 0 only on a constraint with a floor .* got prices\[1\] = 0.3"
    ):
        DualPacer(cfg, prices=np.array([0.0, 0.3]))
    with pytest.raises(
        ValueError, match=r"state must be a dict written by DualPacer.to_dict; missing or bad key"
    ):
        DualPacer.from_dict({"config": {}})
