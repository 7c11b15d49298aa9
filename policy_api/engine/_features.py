"""The bandit's features, built the same way at serving time and from the log (learn, replay)."""

from __future__ import annotations

import numpy as np

__all__ = ["layout_features", "shared_features"]


def layout_features(categories: np.ndarray, tilt: np.ndarray, value: np.ndarray, score: np.ndarray,
                    n_categories: int, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-candidate features: category one-hot by slot, tilt level, expected value and price-adjusted
    score, the last two divided by the decision's largest |value| (so they are scale-free).

    Parameters
    ----------
    categories
        Shape (..., L, S) category index per slot (-1 = padding/unknown: all-zero one-hot).
    tilt, value, score
        Shape (..., L).
    mask
        Shape (..., L): real candidates (padding is ignored in the scale).

    Returns
    -------
    Shape (..., L, S * n_categories + 3).
    """
    cats = np.asarray(categories)
    *batch, L, S = cats.shape
    onehot = (cats[..., None] == np.arange(n_categories)).reshape(*batch, L, S * n_categories)
    v = np.asarray(value, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    m = np.ones(v.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    top = np.maximum(np.max(np.where(m, np.abs(v), 0.0), axis=-1, keepdims=True), 1e-9)
    s = np.where(m & np.isfinite(s), s, 0.0)
    return np.concatenate([onehot.astype(np.float64), np.asarray(tilt, dtype=np.float64)[..., None],
                           (np.where(m, v, 0.0) / top)[..., None], (s / top)[..., None]], axis=-1)


def shared_features(known_user: np.ndarray, preferences: np.ndarray) -> np.ndarray:
    """Shape (..., 1 + n_categories): known-user flag and the user's category preferences."""
    return np.concatenate([np.asarray(known_user, dtype=np.float64)[..., None],
                           np.asarray(preferences, dtype=np.float64)], axis=-1)
