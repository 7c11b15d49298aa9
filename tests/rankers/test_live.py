"""Category preferences and score multipliers from live engagement, against their closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from rankers import live_category_preferences, live_score_multiplier


def test_preferences_equal_the_closed_form(seed):
    rng = np.random.default_rng(seed)
    C = 5
    engagement = rng.normal(1.0, 2.0, C)
    pop = rng.random(C) + 0.01
    model = rng.random(C)
    before = (engagement.copy(), pop.copy(), model.copy())
    got = live_category_preferences(engagement, pop, model, k_population=2.0, k_model=4.0)
    e = np.maximum(engagement, 0.0)
    U = e.sum()
    want = (e + 2.0 * pop / pop.sum() + 4.0 * model / model.sum()) / (U + 6.0)  # U * (e / U) == e
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got.sum() == pytest.approx(1.0)
    for a, b in zip(before, (engagement, pop, model), strict=True):
        np.testing.assert_array_equal(a, b)


def test_preferences_move_from_the_population_to_the_user_with_evidence():
    pop = np.array([0.7, 0.2, 0.1])
    np.testing.assert_allclose(live_category_preferences(np.zeros(3), pop), pop)
    # three plays in the smallest category: half way (k_population = 3 units), not all-in
    three = live_category_preferences(np.array([0.0, 0.0, 3.0]), pop)
    np.testing.assert_allclose(three, [0.35, 0.1, 0.55])
    lots = live_category_preferences(np.array([0.0, 0.0, 3000.0]), pop)
    assert lots[2] > 0.99
    # skips (negative engagement) are no evidence for a category
    np.testing.assert_allclose(live_category_preferences(np.array([-5.0, 0.0, 0.0]), pop), pop)


def test_multiplier_is_the_clipped_ratio():
    pop = np.array([0.5, 0.25, 0.25])
    np.testing.assert_allclose(live_score_multiplier(pop, pop), [1.0, 1.0, 1.0])
    got = live_score_multiplier(np.array([0.9, 0.05, 0.05]), pop, strength=0.5)
    np.testing.assert_allclose(got, np.array([1.8, 0.25, 0.25]) ** 0.5)
    np.testing.assert_allclose(live_score_multiplier(np.array([0.9, 0.05, 0.05]), pop, strength=0.0), 1.0)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"population must be a finite, non-negative \(C,\) = \(2,\) array"):
        live_category_preferences(np.zeros(2), np.array([0.5, -0.5]))
    with pytest.raises(ValueError, match=r"k_population and k_model must be >= 0 with a positive total"):
        live_category_preferences(np.zeros(2), np.ones(2), k_population=0.0)
    with pytest.raises(ValueError, match=r"low, high and strength must satisfy"):
        live_score_multiplier(np.ones(2), np.ones(2), low=2.0)
