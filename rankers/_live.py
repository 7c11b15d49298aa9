"""Category preferences and score multipliers from a user's live (real-time) engagement.

Serving knows, per user, the decayed engagement units by category from the last minutes and hours
(the live state). A user with three plays must not be all-in on one category, so the live shares are
shrunk toward the population and toward the ranker's category head, with the evidence (decayed
positive units) as the weight of the live part.
"""

from __future__ import annotations

import numpy as np

__all__ = ["live_category_preferences", "live_score_multiplier"]


def _distribution(name: str, p: np.ndarray, size: int) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.shape != (size,) or not np.isfinite(a).all() or (a < 0).any():
        raise ValueError(f"{name} must be a finite, non-negative (C,) = ({size},) array; got {a!r}")
    s = a.sum()
    return a / s if s > 0 else np.full(size, 1.0 / size)


def live_category_preferences(engagement: np.ndarray, population: np.ndarray, model: np.ndarray | None = None,
                              *, k_population: float = 3.0, k_model: float = 3.0) -> np.ndarray:
    """Shrunk category preferences, ``(U p_live + k_pop p_pop + k_model p_model) / (U + k_pop + k_model)``.

    Parameters
    ----------
    engagement
        Shape (C,): decayed engagement units by category (negative entries, from skips, count as 0).
        ``U`` is their positive sum and ``p_live`` their shares.
    population
        Shape (C,): the population's category shares (normalised here).
    model
        Shape (C,) or None: the ranker's category head for the user (normalised here); without it
        ``k_model`` is 0.
    k_population, k_model
        Pseudo-units of evidence that the population and the model count as.

    Returns
    -------
    np.ndarray
        Shape (C,), sums to 1.

    Examples
    --------
    >>> live_category_preferences(np.array([3.0, 0.0]), np.array([0.5, 0.5])).tolist()
    [0.75, 0.25]
    >>> live_category_preferences(np.zeros(2), np.array([1.0, 3.0]), np.array([1.0, 0.0])).tolist()
    [0.625, 0.375]
    """
    e = np.maximum(np.asarray(engagement, dtype=np.float64), 0.0)
    C = e.size
    if e.ndim != 1 or C == 0 or not np.isfinite(e).all():
        raise ValueError(f"engagement must be a finite (C,) array; got {engagement!r}")
    if not (k_population >= 0 and k_model >= 0 and k_population + (k_model if model is not None else 0) > 0):
        raise ValueError(f"k_population and k_model must be >= 0 with a positive total; got {k_population!r}, "
                         f"{k_model!r}")
    pop = _distribution("population", population, C)
    units = float(e.sum())
    total = units * (e / units if units > 0 else np.zeros(C)) + k_population * pop
    weight = units + k_population
    if model is not None:
        total = total + k_model * _distribution("model", model, C)
        weight += k_model
    return total / weight


def live_score_multiplier(preferences: np.ndarray, population: np.ndarray, *, strength: float = 1.0,
                          low: float = 0.25, high: float = 4.0) -> np.ndarray:
    """Per-category multiplier of item scores, ``clip(pref_c / pop_c, low, high) ** strength``.

    Items of a category the user engages with more than the population score higher; 1 everywhere
    when the preferences equal the population. ``strength`` 0 turns it off.

    Examples
    --------
    >>> live_score_multiplier(np.array([0.75, 0.25]), np.array([0.5, 0.5])).tolist()
    [1.5, 0.5]
    """
    C = np.asarray(preferences).size
    pref = _distribution("preferences", preferences, C)
    pop = _distribution("population", population, C)
    if not (0 < low <= 1 <= high) or not strength >= 0:
        raise ValueError(f"low, high and strength must satisfy 0 < low <= 1 <= high, strength >= 0; got {low!r}, "
                         f"{high!r}, {strength!r}")
    ratio = np.divide(pref, pop, out=np.ones(C), where=pop > 0)
    return np.clip(ratio, low, high) ** strength
