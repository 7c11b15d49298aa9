"""Ranking and calibration metrics on arrays (numpy, vectorised over groups)."""

from __future__ import annotations

import numpy as np

__all__ = ["auc", "gauc", "logloss", "ece", "ndcg_at_k", "category_hit_rate", "group_auc"]


def _check_pair(name: str, y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y, dtype=np.float64).ravel()
    s = np.asarray(s, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(
            f"{name}: labels and scores must have the same length; got {y.shape[0]} and {s.shape[0]}"
        )
    return y, s


def group_auc(
    y: np.ndarray, score: np.ndarray, group: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC within each group by the rank-sum (Mann-Whitney) formula, ties counted 1/2.

    ``AUC_g = (R_g - P_g (P_g + 1) / 2) / (P_g N_g)`` with R_g the sum of the positives' average ranks
    among the group's scores, P_g / N_g the positives / negatives of the group.

    Returns
    -------
    (auc (n_groups,), size (n_groups,), valid (n_groups,) bool) over the sorted distinct groups;
    ``valid`` marks groups with both classes (auc is NaN elsewhere).
    """
    y = (np.asarray(y) > 0.5).astype(np.float64)
    score = np.asarray(score, dtype=np.float64)
    group = np.asarray(group)
    n = y.shape[0]
    if n == 0:
        e = np.empty(0)
        return e, e, e.astype(bool)
    order = np.lexsort((score, group))
    g, s, yy = group[order], score[order], y[order]
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]
    gid = np.cumsum(new_group) - 1
    rid = np.cumsum(new_run) - 1
    pos = np.arange(n) - np.flatnonzero(new_group)[gid] + 1.0  # 1-based rank within group
    rank = (np.bincount(rid, weights=pos) / np.bincount(rid))[rid]  # tie-averaged
    size = np.bincount(gid).astype(np.float64)
    n_pos = np.bincount(gid, weights=yy)
    n_neg = size - n_pos
    r_pos = np.bincount(gid, weights=rank * yy)
    valid = (n_pos > 0) & (n_neg > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        a = np.where(valid, (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)
    return a, size, valid


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (ties 1/2); NaN when only one class is present."""
    y, score = _check_pair("auc", y, score)
    a, _, valid = group_auc(y, score, np.zeros(y.shape[0], dtype=np.int64))
    return float(a[0]) if valid.size and valid[0] else float("nan")


def gauc(y: np.ndarray, score: np.ndarray, group: np.ndarray) -> float:
    """Group AUC: ``sum_g n_g AUC_g / sum_g n_g`` over groups (users) with both classes, n_g = the
    group's impressions. NaN when no group has both classes.

    References
    ----------
    Zhou et al., "Deep Interest Network for Click-Through Rate Prediction", KDD 2018 (GAUC).
    """
    y, score = _check_pair("gauc", y, score)
    group = np.asarray(group).ravel()
    if group.shape != y.shape:
        raise ValueError(f"gauc: group must have the labels' length {y.shape[0]}; got {group.shape[0]}")
    a, size, valid = group_auc(y, score, group)
    if not valid.any():
        return float("nan")
    return float((a[valid] * size[valid]).sum() / size[valid].sum())


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy ``-mean(y log p + (1 - y) log(1 - p))``, p clipped to [eps, 1 - eps]."""
    y, p = _check_pair("logloss", y, p)
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1 - eps)
    return float(-(y * np.log(p) + (1 - y) * np.log1p(-p)).mean())


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width bins on [0, 1]:
    ``sum_b (n_b / n) |mean(y in b) - mean(p in b)|``.

    References
    ----------
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
    """
    y, p = _check_pair("ece", y, p)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1; got {n_bins!r}")
    if y.size == 0:
        return float("nan")
    b = np.minimum((np.clip(p, 0, 1) * n_bins).astype(np.int64), n_bins - 1)
    sy = np.bincount(b, weights=y, minlength=n_bins)
    sp = np.bincount(b, weights=p, minlength=n_bins)
    return float(np.abs(sy - sp).sum() / y.shape[0])


def ndcg_at_k(
    relevance: np.ndarray, score: np.ndarray, group: np.ndarray, k: int = 10, *, gains: str = "exponential"
) -> float:
    """Mean NDCG@k over groups (lists): gains ``2^rel - 1`` (``gains="exponential"``) or ``rel``
    (``"linear"``), discount ``1 / log2(rank + 1)`` for 1-based rank.

    Each group's items are ranked by ``score`` descending (ties: lower row index first); the ideal
    DCG ranks by relevance. Groups with fewer than 2 items or no relevant item (IDCG = 0) are left
    out. NaN if no group qualifies.

    Parameters
    ----------
    relevance
        Shape (n,), graded relevance >= 0.
    score, group
        Shape (n,): the ranking score and the list each row belongs to.
    """
    rel, score = _check_pair("ndcg_at_k", relevance, score)
    group = np.asarray(group).ravel()
    if group.shape != rel.shape:
        raise ValueError(
            f"ndcg_at_k: group must have the relevance's length {rel.shape[0]}; got {group.shape[0]}"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    if (rel < 0).any():
        raise ValueError("relevance must be >= 0; got a negative value")
    if gains not in ("exponential", "linear"):
        raise ValueError(f"gains must be 'exponential' or 'linear'; got {gains!r}")
    n = rel.shape[0]
    if n == 0:
        return float("nan")
    _, gid = np.unique(group, return_inverse=True)
    n_groups = int(gid.max()) + 1
    idx = np.arange(n)
    gain = np.exp2(rel) - 1.0 if gains == "exponential" else rel

    def dcg(key: np.ndarray) -> np.ndarray:
        order = np.lexsort((idx, -key, gid))
        g = gid[order]
        start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
        rank = np.arange(n) - start[np.cumsum(np.r_[True, g[1:] != g[:-1]]) - 1]
        w = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
        return np.bincount(g, weights=gain[order] * w, minlength=n_groups)

    d, ideal = dcg(score), dcg(rel)
    size = np.bincount(gid, minlength=n_groups)
    ok = (size >= 2) & (ideal > 0)
    if not ok.any():
        return float("nan")
    return float((d[ok] / ideal[ok]).mean())


def category_hit_rate(preferences: np.ndarray, target: np.ndarray, top_n: int) -> float:
    """Share of rows whose ``target`` category is among the ``top_n`` highest ``preferences``
    (shape (n, n_categories); ties: lower category index first)."""
    preferences = np.asarray(preferences, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    if preferences.ndim != 2 or preferences.shape[0] != target.shape[0]:
        raise ValueError(
            f"preferences must have shape (n, n_categories) with n = len(target) = {target.shape[0]}; "
            f"got {preferences.shape}"
        )
    if not isinstance(top_n, int) or top_n < 1:
        raise ValueError(f"top_n must be an int >= 1; got {top_n!r}")
    if target.size == 0:
        return float("nan")
    top = np.argsort(-preferences, axis=1, kind="stable")[:, :top_n]
    return float((top == target[:, None]).any(axis=1).mean())
