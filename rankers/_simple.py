"""Strong simple baselines for the served-page evaluation: recency-decayed popularity, per-user category
choice times within-category popularity, and item-item kNN. Numpy + scipy.sparse, no torch.

All three share one interface (the one :func:`rankers.top_k_pages` consumes):

``fit(user, item, ts, weight=None, *, n_users, n_items) -> self``
    Training interactions, one row per interaction: ``user`` (n,) in [0, n_users), ``item`` (n,) in
    [0, n_items), ``ts`` (n,) seconds, ``weight`` (n,) >= 0 (default 1). Inputs are not modified.
``score_all(user_idx) -> scores``
    ``user_idx`` (n_users_given,) in [-1, n_users), -1 = a user unknown to training (scored like a user
    without history); returns float64 scores of shape (n_users_given, n_items), higher = better. The
    result is dense: score large user sets in chunks.

Scores rank items for one user; they are not comparable across users or scorers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Self

import numpy as np

__all__ = ["RecentPopularity", "CategoryPopularity", "ItemKNN"]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def _check_half_life(half_life_s: Any, allow_none: bool) -> float | None:
    if half_life_s is None and allow_none:
        return None
    if not (_is_number(half_life_s) and 0.0 < half_life_s < np.inf):
        raise ValueError(f"half_life_s must be a finite number > 0; got {half_life_s!r}")
    return float(half_life_s)


def _decay(ts: np.ndarray, half_life_s: float | None) -> np.ndarray:
    """``2 ** (-(t_end - ts) / half_life_s)`` with ``t_end = max(ts)``, shape (n,); ones without a half-life."""
    if half_life_s is None:
        return np.ones(ts.shape[0])
    return np.exp2(-(ts.max() - ts) / half_life_s)


class _InteractionScorer(ABC):
    """Input checks shared by the scorers; subclasses implement ``_fit`` and ``_score``."""

    n_users_: int
    n_items_: int

    def fit(
        self,
        user: np.ndarray,
        item: np.ndarray,
        ts: np.ndarray,
        weight: np.ndarray | None = None,
        *,
        n_users: int,
        n_items: int,
    ) -> Self:
        """Fit on training interactions.

        Parameters
        ----------
        user, item
            Shape (n,), ints in [0, n_users) and [0, n_items); n >= 1.
        ts
            Shape (n,), finite timestamps in seconds.
        weight
            Shape (n,), finite and >= 0 (e.g. event weights of positive events); default 1.
        n_users, n_items
            Sizes of the user and item index spaces.

        Returns
        -------
        self
        """
        n_users = _check_int("n_users", n_users, 1)
        n_items = _check_int("n_items", n_items, 1)
        u = np.asarray(user)
        i = np.asarray(item)
        t = np.asarray(ts, dtype=np.float64)
        for name, x in (("user", u), ("item", i)):
            if x.ndim != 1 or (x.size and not np.issubdtype(x.dtype, np.integer)):
                raise ValueError(f"{name} must be a 1-D int array; got shape {x.shape} dtype {x.dtype}")
        n = u.shape[0]
        if n == 0:
            raise ValueError("user must hold at least one interaction; got 0")
        w = np.ones(n) if weight is None else np.asarray(weight, dtype=np.float64)
        for name, x in (("item", i), ("ts", t), ("weight", w)):
            if x.shape != (n,):
                raise ValueError(f"{name} must have the shape of user ({n},); got {x.shape}")
        if u.min() < 0 or u.max() >= n_users:
            raise ValueError(f"user must be in [0, {n_users}); got {u.min()}..{u.max()}")
        if i.min() < 0 or i.max() >= n_items:
            raise ValueError(f"item must be in [0, {n_items}); got {i.min()}..{i.max()}")
        if not np.isfinite(t).all():
            raise ValueError("ts must be finite; got NaN or inf")
        bad = ~np.isfinite(w) | (w < 0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"weight must be finite and >= 0; got {float(w[row])!r} at row {row}")
        self._fit(u.astype(np.int64), i.astype(np.int64), t, w, n_users, n_items)
        self.n_users_, self.n_items_ = n_users, n_items  # last: a failed fit leaves no fitted sizes
        return self

    @abstractmethod
    def _fit(
        self,
        user: np.ndarray,
        item: np.ndarray,
        ts: np.ndarray,
        weight: np.ndarray,
        n_users: int,
        n_items: int,
    ) -> None:
        """Implemented by each scorer."""

    def score_all(self, user_idx: np.ndarray) -> np.ndarray:
        """Scores of every catalog item for each user.

        Parameters
        ----------
        user_idx
            Shape (n,), ints in [-1, n_users); -1 = unknown user (no history).

        Returns
        -------
        Shape (n, n_items) float64, higher = better.
        """
        if not hasattr(self, "n_items_"):
            raise ValueError(f"{type(self).__name__} is not fitted; call fit(...) first")
        u = np.asarray(user_idx)
        if u.ndim != 1 or (u.size and not np.issubdtype(u.dtype, np.integer)):
            raise ValueError(f"user_idx must be a 1-D int array; got shape {u.shape} dtype {u.dtype}")
        if u.size and (u.min() < -1 or u.max() >= self.n_users_):
            raise ValueError(f"user_idx must be in [-1, {self.n_users_}); got {u.min()}..{u.max()}")
        return self._score(u.astype(np.int64))

    @abstractmethod
    def _score(self, user_idx: np.ndarray) -> np.ndarray:
        """Implemented by each scorer."""


class RecentPopularity(_InteractionScorer):
    """Exponentially time-decayed item popularity at the end of the training window, the same for
    every user.

    ``popularity_j = sum_{e: item_e = j} w_e * 2 ** (-(t_end - ts_e) / half_life_s)`` with
    ``t_end = max(ts)``, the last training interaction: an interaction one half-life older counts half.
    Measuring at a later end time ``T`` multiplies every item by the same ``2 ** (-(T - t_end) / h)``,
    so the ranking is that of the end of the training window either way.

    Parameters
    ----------
    half_life_s
        Half-life in seconds, > 0.

    Attributes
    ----------
    popularity_
        Shape (n_items,), the decayed popularity.
    t_end_
        ``max(ts)`` of the training interactions.
    """

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = _check_half_life(half_life_s, allow_none=False)

    def _fit(
        self,
        user: np.ndarray,
        item: np.ndarray,
        ts: np.ndarray,
        weight: np.ndarray,
        n_users: int,
        n_items: int,
    ) -> None:
        self.t_end_ = float(ts.max())
        self.popularity_ = np.bincount(item, weights=weight * _decay(ts, self.half_life_s), minlength=n_items)

    def _score(self, user_idx: np.ndarray) -> np.ndarray:
        return np.tile(self.popularity_, (user_idx.shape[0], 1))


class CategoryPopularity(_InteractionScorer):
    """Per-user category choice times popularity within the category:
    ``score(u, j) = pi_u(c_j) * p(j | c_j)``, the probability of j when u first picks a category from
    their own category shares and then an item by popularity within it.

    With ``w'_e = w_e * 2 ** (-(t_end - ts_e) / half_life_s)`` (``w'_e = w_e`` without a half-life),
    ``pop_j = sum_{e: item_e = j} w'_e``, ``tot_c = sum_{j in c} pop_j``, ``g_c = tot_c / sum_c tot_c``
    and ``n_uc = sum_{e: user_e = u, c(item_e) = c} w'_e``, ``n_u = sum_c n_uc``:

    * ``p(j | c) = pop_j / tot_c`` (0 in a category without training weight);
    * ``pi_u(c) = (n_uc + alpha * g_c) / (n_u + alpha)``, the user's category shares shrunk towards
      the global shares by ``alpha`` pseudo-interactions.

    A user without history (or unknown, -1) gets ``pi_u = g`` and so ``score = pop_j / sum pop``: plain
    popularity. For an active user (``n_u >> alpha``) the categories they never used get almost no
    weight, so the top of their page comes from their own categories, in proportion to their shares.

    Parameters
    ----------
    item_category
        Shape (n_items,), ints in [0, n_categories): the catalog's categories.
    alpha
        Smoothing towards the global category shares (pseudo-interactions), > 0.
    half_life_s
        Optional recency decay of every interaction's weight (seconds, > 0); None = no decay.
    n_categories
        Defaults to ``item_category.max() + 1``.

    Attributes
    ----------
    item_share_
        Shape (n_items,), ``p(j | c_j)``.
    category_share_
        Shape (n_categories,), ``g``.
    user_category_share_
        Shape (n_users, n_categories), ``pi_u`` (rows sum to 1 when any training weight is > 0).
    """

    def __init__(
        self,
        item_category: np.ndarray,
        *,
        alpha: float = 1.0,
        half_life_s: float | None = None,
        n_categories: int | None = None,
    ) -> None:
        cat = np.asarray(item_category)
        if cat.ndim != 1 or cat.size == 0 or not np.issubdtype(cat.dtype, np.integer):
            raise ValueError(
                f"item_category must be a non-empty 1-D int array; got shape {cat.shape} dtype {cat.dtype}"
            )
        n_cat = int(cat.max()) + 1 if n_categories is None else _check_int("n_categories", n_categories, 1)
        if cat.min() < 0 or cat.max() >= n_cat:
            raise ValueError(f"item_category must be in [0, {n_cat}); got {cat.min()}..{cat.max()}")
        if not (_is_number(alpha) and 0.0 < alpha < np.inf):
            raise ValueError(f"alpha must be a finite number > 0; got {alpha!r}")
        self.item_category = cat.astype(np.int64)  # a copy: the caller's array is never aliased
        self.alpha = float(alpha)
        self.half_life_s = _check_half_life(half_life_s, allow_none=True)
        self.n_categories = n_cat

    def _fit(
        self,
        user: np.ndarray,
        item: np.ndarray,
        ts: np.ndarray,
        weight: np.ndarray,
        n_users: int,
        n_items: int,
    ) -> None:
        if n_items != self.item_category.shape[0]:
            raise ValueError(
                f"n_items must equal len(item_category) = {self.item_category.shape[0]}; got {n_items}"
            )
        n_cat = self.n_categories
        w = weight * _decay(ts, self.half_life_s)
        pop = np.bincount(item, weights=w, minlength=n_items)
        tot = np.bincount(self.item_category, weights=pop, minlength=n_cat)
        total = tot.sum()
        g = tot / total if total > 0 else np.full(n_cat, 1.0 / n_cat)
        with np.errstate(invalid="ignore", divide="ignore"):
            cat_tot = tot[self.item_category]
            self.item_share_ = np.where(cat_tot > 0, pop / cat_tot, 0.0)
        n_uc = np.bincount(
            user * n_cat + self.item_category[item], weights=w, minlength=n_users * n_cat
        ).reshape(n_users, n_cat)
        self.category_share_ = g
        self.user_category_share_ = (n_uc + self.alpha * g) / (n_uc.sum(axis=1, keepdims=True) + self.alpha)

    def _score(self, user_idx: np.ndarray) -> np.ndarray:
        known = (user_idx >= 0)[:, None]
        pi = np.where(known, self.user_category_share_[np.maximum(user_idx, 0)], self.category_share_)
        return pi[:, self.item_category] * self.item_share_


#: :func:`knn_similarity` builds the co-occurrence counts this many (an upper bound) at a time
KNN_BLOCK_ENTRIES = 4_000_000


def knn_similarity(x: Any, shrink: float, n_neighbors: int, *, block_entries: int = KNN_BLOCK_ENTRIES) -> Any:
    """Item-item cosine similarity of the binary user x item matrix ``x`` (scipy sparse), shrunk:
    ``S[i, j] = c_ij / (sqrt(n_i n_j) + shrink)``, no self-similarity, and for each scored item j only
    its ``n_neighbors`` most similar items i (ties: lower i first). Row = history item, column = scored
    item, as a ``(n_items, n_items)`` CSR array.

    The co-occurrence counts ``C = X^T X`` are built a block of scored items (columns) at a time, each
    block holding at most ``block_entries`` counts (bounded above by the sum over its items' users
    of their history lengths; one item's column is never split), and pruned to the neighbours before
    the next: memory grows with the block and the result, not with the catalog's co-occurrence
    density (``C`` of a catalog of tens of thousands of items can hold 10^8 and more pairs)."""
    import scipy.sparse as sp

    if block_entries < 1:
        raise ValueError(f"block_entries must be >= 1; got {block_entries!r}")
    xc = sp.csc_array(x)
    xt = sp.csr_array(xc.T)
    n = xc.shape[1]
    norm = np.sqrt(np.asarray(xc.sum(axis=0)).ravel())
    history = np.diff(sp.csr_array(xc).indptr).astype(np.float64)  # each user's number of items
    users_of = sp.csr_array((np.ones(xt.nnz), xt.indices, xt.indptr), shape=xt.shape)
    ends = np.cumsum(users_of @ history)  # item j's column of C holds at most (users_of @ history)[j] counts
    cuts = [0]
    while cuts[-1] < n:  # one step per block, not per item
        lo = cuts[-1]
        budget = (ends[lo - 1] if lo else 0.0) + block_entries
        cuts.append(max(int(np.searchsorted(ends, budget, side="right")), lo + 1))
    rows, cols, sims = [], [], []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        c = (xt @ xc[:, a:b]).tocoo()
        row, col = c.row.astype(np.int64), c.col.astype(np.int64) + a
        off = row != col
        row, col = row[off], col[off]
        sim = c.data[off] / (norm[row] * norm[col] + shrink)
        if sim.size:
            # rank the candidate neighbours i of each scored item j: by j, then sim descending, then i
            order = np.lexsort((row, -sim, col))
            cs = col[order]
            new = np.r_[True, cs[1:] != cs[:-1]]
            start = np.flatnonzero(new)
            rank = np.arange(cs.size) - start[np.cumsum(new) - 1]
            top = order[rank < n_neighbors]
            rows.append(row[top])
            cols.append(col[top])
            sims.append(sim[top])
    if not sims:
        return sp.csr_array((n, n), dtype=np.float64)
    return sp.csr_array((np.concatenate(sims), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))


class ItemKNN(_InteractionScorer):
    """Item-item collaborative filtering: cosine similarity with shrinkage between the items' user
    sets, pruned to each item's ``n_neighbors`` nearest items.

    With the binary history ``X`` (n_users, n_items), ``X[u, i] = 1`` when u has an interaction of
    weight > 0 with i in training, and the co-occurrence counts ``C = X^T X``:

    * ``sim(i, j) = C_ij / (sqrt(C_ii) sqrt(C_jj) + shrink)`` for i != j, ``sim(i, i) = 0``;
    * ``S[i, j] = sim(i, j)`` if i is among the ``n_neighbors`` most similar items of j (ties: lower
      i first; only items with sim > 0), else 0;
    * ``score(u, j) = sum_{i in H_u} S[i, j] = (X S)_uj``, H_u = the user's history items.

    Users whose kNN scores are all 0 (no history, unknown users, or history items without any
    co-occurrence) get the item popularity ``pop_j = sum_u X[u, j]`` (training users per item) instead.
    History items are scored too; pass them as ``exclude`` to :func:`rankers.top_k_pages` to leave
    them off the page. ``C`` has one entry per co-occurring item pair: memory grows with the catalog's
    co-occurrence density.

    Parameters
    ----------
    n_neighbors
        Neighbours kept per item, an int >= 1.
    shrink
        Shrinkage of the cosine (>= 0), damping similarities supported by few users.

    Attributes
    ----------
    history_
        ``scipy.sparse.csr_array`` (n_users, n_items) float64, the binary history X.
    similarity_
        ``scipy.sparse.csr_array`` (n_items, n_items), the pruned S (row = history item i, column =
        scored item j).
    popularity_
        Shape (n_items,), the fallback popularity.

    References
    ----------
    Sarwar et al., "Item-Based Collaborative Filtering Recommendation Algorithms", WWW 2001.
    Ferrari Dacrema et al., "Are We Really Making Much Progress? A Worrying Analysis of Recent Neural
    Recommendation Approaches", RecSys 2019 (ItemKNN-CF with shrinkage as a strong baseline).
    """

    def __init__(self, n_neighbors: int = 100, shrink: float = 10.0) -> None:
        self.n_neighbors = _check_int("n_neighbors", n_neighbors, 1)
        if not (_is_number(shrink) and 0.0 <= shrink < np.inf):
            raise ValueError(f"shrink must be a finite number >= 0; got {shrink!r}")
        self.shrink = float(shrink)

    def _fit(
        self,
        user: np.ndarray,
        item: np.ndarray,
        ts: np.ndarray,
        weight: np.ndarray,
        n_users: int,
        n_items: int,
    ) -> None:
        import scipy.sparse as sp  # here, not at module level: `import rankers` stays light for serving

        keep = weight > 0
        x = sp.csr_array((np.ones(int(keep.sum())), (user[keep], item[keep])), shape=(n_users, n_items))
        x.sum_duplicates()
        x.data[:] = 1.0  # binary: repeated interactions count once
        self.similarity_ = knn_similarity(x, self.shrink, self.n_neighbors)
        self.history_ = x
        self.popularity_ = np.asarray(x.sum(axis=0)).ravel().astype(np.float64)  # n_i: each item's users

    def _score(self, user_idx: np.ndarray) -> np.ndarray:
        known = user_idx >= 0
        rows = self.history_[np.where(known, user_idx, 0)]
        scores = np.asarray((rows @ self.similarity_).toarray(), dtype=np.float64)
        scores[~known] = 0.0
        fallback = ~(scores > 0).any(axis=1)
        scores[fallback] = self.popularity_
        return scores
