"""Baselines: the popularity scorer served today (numpy only, no torch), the smoothed per-item prior
and logistic regression on the ranker's dense features."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from ._data import TASKS, Examples, UserHistory, dense_item_features


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-z))`` without overflow for large ``|z|`` (separable features drive logits far)."""
    return np.exp(-np.logaddexp(0.0, -z))


__all__ = ["PopularityScorer", "ItemPriorBaseline", "LogisticBaseline", "popularity_rank"]

_DEFAULT_WEIGHTS = {"play": 1.0, "full_play": 2.0, "favorite": 4.0, "share": 5.0, "skip": -0.5}


def _task_weights(event_weights: Mapping[str, float]) -> np.ndarray:
    # same mapping as rankers._train.task_weights_from_events, kept here so this module needs no torch
    collect = event_weights.get("collect")
    if collect is None:
        collect = (float(event_weights["favorite"]) + float(event_weights["share"])) / 2.0
    return np.array(
        [
            float(event_weights["play"]),
            float(event_weights["full_play"]),
            float(collect),
            float(event_weights["skip"]),
        ]
    )


def popularity_rank(popularity: np.ndarray) -> np.ndarray:
    """Normalised popularity rank ``q_i = (average rank of i from the least popular, 1-based) / n``,
    in (0, 1], 1 for the most popular item; ties share their average rank. Shape (n_items,)."""
    popularity = np.asarray(popularity, dtype=np.float64)
    n = popularity.shape[0]
    order = np.argsort(popularity, kind="stable")
    p = popularity[order]
    new = np.r_[True, p[1:] != p[:-1]]
    rid = np.cumsum(new) - 1
    pos = np.arange(1, n + 1, dtype=np.float64)
    avg = (np.bincount(rid, weights=pos) / np.bincount(rid))[rid]
    q = np.empty(n)
    q[order] = avg / n
    return q


class PopularityScorer:
    """The non-personalised baseline: engagement units from the item's popularity rank.

    ``units_i = mean_units * 2 * q_i`` with ``q_i`` = :func:`popularity_rank` (in (0, 1]): the order is
    the popularity order, the mean over the catalog is about ``mean_units`` (engagement units per
    examined impression, e.g. fitted by :meth:`from_examples`), and no item gets more than
    ``2 * mean_units``, so the scale stays plausible even under a Zipf popularity where raw
    popularity spans orders of magnitude. ``category_preferences`` is each category's share of total
    popularity, the same for every user. Numpy only.

    Parameters
    ----------
    popularity
        Shape (n_items,), >= 0.
    item_category
        Shape (n_items,), ints in [0, n_categories).
    mean_units
        Average engagement units per examined impression (> 0).
    n_categories
        Defaults to ``item_category.max() + 1``.
    """

    def __init__(
        self,
        popularity: np.ndarray,
        item_category: np.ndarray,
        *,
        mean_units: float = 0.5,
        n_categories: int | None = None,
    ) -> None:
        popularity = np.array(popularity, dtype=np.float64)  # a copy: save() must write what was fitted
        item_category = np.asarray(item_category)
        if popularity.ndim != 1 or popularity.size == 0:
            raise ValueError(f"popularity must be a non-empty 1-D array; got shape {popularity.shape}")
        if not np.isfinite(popularity).all() or (popularity < 0).any():
            raise ValueError("popularity must be finite and >= 0; got a negative or non-finite value")
        if item_category.shape != popularity.shape or not np.issubdtype(item_category.dtype, np.integer):
            raise ValueError(
                f"item_category must be an int array of shape {popularity.shape}; got shape {item_category.shape}"
            )
        if not (mean_units > 0 and np.isfinite(mean_units)):
            raise ValueError(f"mean_units must be > 0; got {mean_units!r}")
        n_categories = int(item_category.max()) + 1 if n_categories is None else int(n_categories)
        if item_category.min() < 0 or item_category.max() >= n_categories:
            raise ValueError(
                f"item_category must be in [0, {n_categories}); got {item_category.min()}..{item_category.max()}"
            )
        self.popularity = popularity
        self.item_category = item_category.astype(np.int64)
        self.mean_units = float(mean_units)
        self.n_categories = n_categories
        self.units_ = self.mean_units * 2.0 * popularity_rank(popularity)
        share = np.bincount(self.item_category, weights=popularity, minlength=n_categories)
        total = share.sum()
        self.category_share_ = share / total if total > 0 else np.full(n_categories, 1.0 / n_categories)

    @classmethod
    def from_examples(
        cls,
        examples: Examples,
        popularity: np.ndarray | None = None,
        event_weights: Mapping[str, float] | None = None,
    ) -> PopularityScorer:
        """Fit ``mean_units`` = mean over ``examples`` of ``labels @ task weights``; popularity defaults
        to the catalog's, else the impression counts of ``examples``."""
        w = _task_weights(event_weights or _DEFAULT_WEIGHTS)
        if popularity is None:
            popularity = examples.popularity
        if popularity is None:
            popularity = np.bincount(examples.item, minlength=examples.n_items).astype(np.float64)
        mean_units = float((examples.labels @ w).mean()) if len(examples) else 0.5
        return cls(
            popularity,
            examples.item_category,
            mean_units=max(mean_units, 1e-6),
            n_categories=examples.n_categories,
        )

    def _items(self, item_idx: np.ndarray) -> np.ndarray:
        item_idx = np.asarray(item_idx)
        if item_idx.size and (item_idx.min() < 0 or item_idx.max() >= self.units_.shape[0]):
            raise ValueError(
                f"item_idx must be in [0, {self.units_.shape[0]}); got {item_idx.min()}..{item_idx.max()}"
            )
        return item_idx.astype(np.int64, copy=False)

    def score(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray:
        """Engagement units per examined impression, shape (n,); the same for every user."""
        return self.units_[self._items(item_idx)]

    def score_pairs(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """Units for (user, item) pairs, shape (n,)."""
        return self.units_[self._items(item_idx)]

    def category_preferences(self, user_idx: int) -> np.ndarray:
        """Shape (n_categories,): each category's share of popularity (sums to 1)."""
        return self.category_share_.copy()

    def save(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            popularity=self.popularity,
            item_category=self.item_category,
            mean_units=np.array(self.mean_units),
            n_categories=np.array(self.n_categories),
        )
        return buf.getvalue()

    @classmethod
    def load(cls, data: bytes) -> PopularityScorer:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return cls(
                z["popularity"],
                z["item_category"],
                mean_units=float(z["mean_units"]),
                n_categories=int(z["n_categories"]),
            )


class ItemPriorBaseline:
    """Smoothed per-item engagement rates (Beta prior, from the training part): ``p_t(i) = r_it``."""

    def __init__(self, priors: np.ndarray) -> None:
        self.prob_ = 1.0 / (1.0 + np.exp(-np.asarray(priors)[:, : len(TASKS)]))

    def predict_pairs(self, user: np.ndarray, item: np.ndarray, seq: UserHistory) -> np.ndarray:
        return self.prob_[item]


def _lr_features(
    item: np.ndarray, seq: UserHistory, dense: np.ndarray, item_category: np.ndarray, n_categories: int
) -> np.ndarray:
    """Rows of [1, standardised item dense (features + priors), category one-hot, share of the user's
    positive / skip sequence in the candidate's category, log1p activity]."""
    cat = item_category[item]
    onehot = np.eye(n_categories)[cat]

    def share(items: np.ndarray) -> np.ndarray:
        valid = items >= 0
        same = valid & (item_category[np.where(valid, items, 0)] == cat[:, None])
        return same.sum(1) / np.maximum(valid.sum(1), 1)

    return np.column_stack(
        [
            np.ones(item.shape[0]),
            dense[item],
            onehot,
            share(seq.pos_items),
            share(seq.neg_items),
            np.log1p(seq.pos_count),
            np.log1p(seq.neg_count),
        ]
    )


class LogisticBaseline:
    """One L2-regularised logistic regression per task on the same inputs as the ranker's dense side
    (catalog features + item priors), the item's category and the user's category affinity from the
    behaviour sequences; fitted by Newton's method (IRLS), numpy only.

    ``w = argmin sum_i BCE(y_i, sigmoid(x_i w)) + l2 / 2 |w|^2``.
    """

    def __init__(self, l2: float = 1.0, n_iter: int = 25) -> None:
        if not l2 > 0:
            raise ValueError(f"l2 must be > 0; got {l2!r}")
        self.l2, self.n_iter = float(l2), int(n_iter)

    def fit(self, train: Examples) -> LogisticBaseline:
        assert train.item_priors is not None
        self.dense_ = dense_item_features(train)
        self.item_category_ = train.item_category
        self.n_categories_ = train.n_categories
        x = _lr_features(train.item, train.seq, self.dense_, self.item_category_, self.n_categories_)
        reg = np.full(x.shape[1], self.l2)
        reg[0] = 1e-6  # the intercept is barely penalised
        coef = np.zeros((x.shape[1], len(TASKS)))
        for t in range(len(TASKS)):
            y = train.labels[:, t].astype(np.float64)
            w = np.zeros(x.shape[1])
            w[0] = np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3))
            for _ in range(self.n_iter):
                p = _sigmoid(x @ w)
                grad = x.T @ (p - y) + reg * w
                hess = (x * (p * (1 - p))[:, None]).T @ x + np.diag(reg)
                step = np.linalg.solve(hess, grad)
                w -= step
                if np.abs(step).max() < 1e-8:
                    break
            coef[:, t] = w
        self.coef_ = coef
        return self

    def predict_pairs(self, user: np.ndarray, item: np.ndarray, seq: UserHistory) -> np.ndarray:
        """Task probabilities (n, 4) for items ``item`` (n,) with the users' sequences ``seq`` (n rows)."""
        x = _lr_features(item, seq, self.dense_, self.item_category_, self.n_categories_)
        return _sigmoid(x @ self.coef_)
