"""Scorers that serve from item popularity and each user's own history: the built-in baselines as
servable scorers, and a residual ranker that starts from them and learns the personal part.

Numpy + scipy.sparse, no torch. One object scores both ways, with the same arithmetic:

* in batch, for the offline evaluation and the publish gate: :meth:`HistoryScorer.score_pools`,
  users known to the fitted snapshot, a (U, P) grid of candidate items, vectorised over users;
* per request, for serving: :meth:`HistoryScorer.score_live`, one user's candidates with the user's
  live positive events (newest first) merged into the snapshot, the items the user already engaged
  with put below every other candidate.

Kinds (``kind``):

``popularity``
    ``pop_j = sum_{e: item_e = j} w_e`` over the positive events (``w_e`` = the event type's units).
``recent_popularity``
    ``sum_e w_e 2 ** (-(t_ref - ts_e) / half_life_s)`` (:class:`rankers.RecentPopularity`).
``category_popularity``
    ``pi_u(c_j) * pop_j / tot_{c_j}`` (:class:`rankers.CategoryPopularity`, ``alpha`` = 1, no decay).
``item_knn``
    ``sum_{i in H_u} S[i, j]``, the pruned cosine item-item similarity (:class:`rankers.ItemKNN`);
    users whose history has no neighbour at all get ``pop_j`` counted in users.
``catalog_popularity``
    ``p_j``, a popularity column given per item (the catalog's own, which the engine serves when nothing
    beats it), served with the user's history put below every other candidate like every kind here;
    the serving engine sets ``item_popularity`` from its current catalog at load.
``residual``
    ``sigmoid(x_uj . coef)``, a logistic model of the chance that the user goes on to choose the item
    (:func:`fit_residual`), with ``x_uj`` (see :data:`FEATURES`): the recent-popularity baseline's own
    score ``log(recent_j + 0.01)``, log(1 + item popularity) at several half-lives
    (multi-granularity recency), the item-kNN score of the user's history (plain, and weighted by
    recency from the user's own newest positive: the last session first), the user's smoothed
    category share, the log-odds of the item's own positive rate per exposure (:func:`item_rates`:
    what it earned each time it was shown, shrunk toward the rate of its category's items of like
    exposure; fitted once per snapshot, so a request reads one number per candidate), one-hot buckets
    of the time since the user's last positive event in the item's category (1 day, 1 week, 1 month,
    6 months, older, never: RoTE-style multi-granularity time gaps) and the category.
    ``pop_exponent`` is a PDA-style debiasing dial: it multiplies the popularity columns'
    coefficients (0 = no popularity at all, 1 = as fitted; not the item rate's), the intercept
    refitted for it (:func:`with_dial`).

References
----------
Zhang et al., "Causal Intervention for Leveraging Popularity Bias in Recommendation" (PDA), SIGIR 2021.
Wei et al., "Model-Agnostic Counterfactual Reasoning for Eliminating Popularity Bias" (MACR), KDD 2021.
Ferrari Dacrema et al., "Are We Really Making Much Progress?", RecSys 2019 (strong simple baselines).
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._simple import knn_similarity

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["BASE", "FEATURES", "HISTORY_KINDS", "HISTORY_MAGIC", "ITEM_RATE_PRIOR", "POP_HALF_LIVES_DAYS", "RATE_COLUMN",
           "RATE_FEATURES", "HistoryScorer", "fit_residual", "is_history_scorer", "item_rates", "repeat_share",
           "residual_grid", "with_dial"]

#: the kinds of :class:`HistoryScorer`, baselines first
HISTORY_KINDS: tuple[str, ...] = ("popularity", "recent_popularity", "category_popularity", "item_knn",
                                   "catalog_popularity", "residual")
#: the first bytes of :meth:`HistoryScorer.save`
HISTORY_MAGIC = b"HPHISTORY1\n"
#: half-lives (days) of the residual ranker's popularity features; None = no decay
POP_HALF_LIVES_DAYS: tuple[float | None, ...] = (3.0, 14.0, 60.0, None)
#: half-life (days) of the recency weight of each history item in the session kNN feature, counted back
#: from the user's own newest positive: what the user chose in the last session weighs most
SESSION_HALF_LIFE_DAYS = 1.0
#: upper edges (days) of the time-gap buckets; one more bucket for older, one for never
GAP_EDGES_DAYS: tuple[float, ...] = (1.0, 7.0, 30.0, 180.0)
_DAY = 86400.0
#: pseudo-exposures of the item-rate prior: an item shown this often weighs its own rate as much as the
#: prior's (see :func:`item_rates`)
ITEM_RATE_PRIOR = 5.0
#: bins of log exposure per category in the item-rate prior
RATE_BINS = 8
#: the item-rate feature: the log-odds of the item's smoothed positive rate per exposure
RATE_FEATURES: tuple[str, ...] = ("logit_item_rate",)


def item_rates(shown_item: np.ndarray, shown_positive: np.ndarray, item_category: np.ndarray, *,
               prior: float = ITEM_RATE_PRIOR, n_bins: int = RATE_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Each item's smoothed positive rate per exposure and its exposures, both shape (n_items,).

    ``r_j = (y_j + k f_j) / (n_j + k)``, with ``n_j`` the item's exposures, ``y_j`` those that earned a
    positive event and ``k = prior``. The prior ``f_j`` follows popularity: the items of ``j``'s
    category in ``n_bins`` bins by ``log(1 + n_j)`` (edges at the category's quantiles, so that items
    of equal exposure share a bin), ``f_j`` the pooled rate ``sum y / sum n`` of ``j``'s bin (of the
    category when the bin has no exposure, of all items when the category has none; 1/2 on an empty
    log), kept within [1e-3, 1 - 1e-3]. In a log with impressions an exposure is an impression; in a
    log of ratings it is a rated event (positives are the ratings mapped to positive events, the
    others count against the item).

    Parameters
    ----------
    shown_item
        Shape (m,): the item row of each exposure, in [0, n_items).
    shown_positive
        Shape (m,) bool: whether the exposure earned a positive event.
    item_category
        Shape (n_items,): ints in [0, n_categories).
    prior, n_bins
        The pseudo-exposures ``k`` (> 0) and the bins per category (>= 1).

    Examples
    --------
    One category, one bin, prior 1: item 0 shown 3 times with 2 positives, item 1 shown once without;
    the prior is the pooled rate 2/4.

    >>> r, n = item_rates(np.array([0, 0, 0, 1]), np.array([True, True, False, False]), np.zeros(2, int),
    ...                   prior=1.0, n_bins=1)
    >>> r.tolist(), n.tolist()
    ([0.625, 0.25], [3.0, 1.0])
    """
    if not (np.isfinite(prior) and prior > 0):
        raise ValueError(f"prior must be a finite number > 0; got {prior!r}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1; got {n_bins!r}")
    cat = np.asarray(item_category, dtype=np.int64)
    item = np.asarray(shown_item, dtype=np.int64)
    positive = np.asarray(shown_positive, dtype=bool)
    if item.shape != positive.shape or item.ndim != 1:
        raise ValueError(f"shown_item and shown_positive must be 1-D of one shape; got {item.shape} and "
                         f"{positive.shape}")
    n_items = cat.size
    if item.size and (item.min() < 0 or item.max() >= n_items):
        raise ValueError(f"shown_item must be in [0, {n_items}); got {item.min()}..{item.max()}")
    n = np.bincount(item, minlength=n_items).astype(np.float64)
    y = np.bincount(item[positive], minlength=n_items).astype(np.float64)
    x = np.log1p(n)
    overall = y.sum() / n.sum() if n.sum() > 0 else 0.5
    f = np.empty(n_items)
    for c in range(int(cat.max(initial=-1)) + 1):  # a handful of categories
        idx = np.flatnonzero(cat == c)
        if idx.size == 0:
            continue
        nc, yc = n[idx].sum(), y[idx].sum()
        level = yc / nc if nc > 0 else overall
        edges = np.quantile(x[idx], np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
        b = np.searchsorted(edges, x[idx], side="right")
        bn = np.bincount(b, weights=n[idx], minlength=n_bins)
        by = np.bincount(b, weights=y[idx], minlength=n_bins)
        f[idx] = np.where(bn[b] > 0, by[b] / np.where(bn[b] > 0, bn[b], 1.0), level)
    f = np.clip(f, 1e-3, 1.0 - 1e-3)
    return (y + prior * f) / (n + prior), n


def _feature_names(n_categories: int) -> tuple[str, ...]:
    pop = tuple(f"log1p_pop_{'all' if h is None else f'{h:g}d'}" for h in POP_HALF_LIVES_DAYS)
    gaps = tuple(f"gap_le_{e:g}d" for e in GAP_EDGES_DAYS) + ("gap_older", "gap_never")
    return ("bias", "log_recent_pop", *pop, "log1p_knn", "knn_share", "log1p_session_knn", "session_knn_share", "log_category_share",
            *RATE_FEATURES, *gaps, *(f"category_{c}" for c in range(n_categories)))


#: the residual ranker's features for 4 categories (the category one-hots grow with the catalog)
FEATURES: tuple[str, ...] = _feature_names(4)
_N_POP = len(POP_HALF_LIVES_DAYS)
#: the column of the recent-popularity baseline's own score, ``log(recent_j + RECENT_FLOOR)``
BASE = 1
#: added to the recent popularity before its log (units of decayed events): items without recent
#: engagement sit far below, but a strong personal signal can still lift them
RECENT_FLOOR = 0.01
#: the popularity columns (the base and the multi-granularity popularities): the dial scales them
POP_COLUMNS = np.arange(BASE, 2 + _N_POP)
#: the four kNN columns (plain and session kNN, each as log1p and as a share of the user's best)
_KNN = 2 + _N_POP
#: the user's category-share column
_SHARE = _KNN + 4
#: the item-rate column (after the kNN and category-share columns; outside the dial: a rate is what an
#: item earns per exposure, not how often it was shown)
RATE_COLUMN = _SHARE + 1
#: the recency-gap buckets' one-hot columns, then the categories' one-hot columns
_N_GAP = len(GAP_EDGES_DAYS) + 2
_GAP = RATE_COLUMN + len(RATE_FEATURES)
_CAT = _GAP + _N_GAP
#: the kinds whose scores read the item-item similarity
_KNN_KINDS = ("item_knn", "residual")


def _gap_bucket(gap: np.ndarray) -> np.ndarray:
    """The recency-gap bucket of each gap (seconds since the user's last positive in the category;
    inf = never): the first edge it does not exceed, then "older", then "never"."""
    bucket = np.searchsorted(np.asarray(GAP_EDGES_DAYS) * _DAY, gap, side="left")
    return np.where(np.isinf(gap), _N_GAP - 1, bucket)


def repeat_share(user: np.ndarray, item: np.ndarray, ts: np.ndarray, n_items: int) -> float:
    """Of the engagements given (``user``, ``item``, ``ts`` rows of one event type, say plays, in any
    order), the share that come back to an item the same user had engaged with at an earlier time
    (events of a pair at one time count once): 0 for ratings, where each film is rated once; high for
    songs, which users replay."""
    u = np.asarray(user, dtype=np.int64)
    if u.size == 0:
        return 0.0
    key = u * np.int64(n_items) + np.asarray(item, dtype=np.int64)
    engagements = np.unique(np.stack([key.astype(np.float64), np.asarray(ts, dtype=np.float64)]), axis=1).shape[1]
    return float((engagements - np.unique(key).size) / engagements)


def is_history_scorer(data: bytes) -> bool:
    """Whether ``data`` is a saved :class:`HistoryScorer`."""
    return data.startswith(HISTORY_MAGIC)


def _decayed(item: np.ndarray, ts: np.ndarray, w: np.ndarray, n_items: int, t_ref: float,
             half_life_s: float | None) -> np.ndarray:
    if half_life_s is None:
        return np.bincount(item, weights=w, minlength=n_items)
    return np.bincount(item, weights=w * np.exp2(-(t_ref - ts) / half_life_s), minlength=n_items)


class HistoryScorer:
    """A servable scorer from popularity and the user's history (see the module docstring).

    Parameters
    ----------
    kind
        One of :data:`HISTORY_KINDS`.
    item_category
        Shape (n_items,), ints in [0, n_categories).
    half_life_s
        Half-life of ``recent_popularity`` (seconds, > 0).
    type_weights
        Shape (n_event_types,): units of each event type code (the live events' weights); > 0 = positive.
    coef
        ``residual`` only: shape (n_features,), the fitted logistic coefficients.
    pop_exponent
        ``residual`` only: the debiasing dial multiplying the popularity coefficients (>= 0).
    n_neighbors, shrink
        Item-kNN pruning and shrinkage (``item_knn`` and ``residual``).
    item_rate_prior
        Pseudo-exposures of the item rates' prior (> 0; :func:`item_rates`).
    item_popularity
        ``catalog_popularity`` only (and required there): shape (n_items,), finite numbers >= 0.

    Attributes
    ----------
    n_users_, n_items_, t_ref_
        The snapshot's sizes and reference time (the newest event fitted).
    """

    def __init__(self, kind: str, item_category: np.ndarray, *, half_life_s: float = 14 * _DAY,
                 type_weights: np.ndarray | None = None, coef: np.ndarray | None = None, pop_exponent: float = 1.0,
                 n_neighbors: int = 100, shrink: float = 10.0, item_rate_prior: float = ITEM_RATE_PRIOR,
                 item_popularity: np.ndarray | None = None) -> None:
        if kind not in HISTORY_KINDS:
            raise ValueError(f"kind must be one of {', '.join(HISTORY_KINDS)}; got {kind!r}")
        cat = np.asarray(item_category)
        if cat.ndim != 1 or cat.size == 0 or not np.issubdtype(cat.dtype, np.integer) or cat.min() < 0:
            raise ValueError(f"item_category must be a non-empty 1-D array of ints >= 0; got shape {cat.shape}")
        if not (np.isfinite(half_life_s) and half_life_s > 0):
            raise ValueError(f"half_life_s must be a finite number > 0; got {half_life_s!r}")
        if not (np.isfinite(pop_exponent) and pop_exponent >= 0):
            raise ValueError(f"pop_exponent must be a finite number >= 0; got {pop_exponent!r}")
        if not (np.isfinite(item_rate_prior) and item_rate_prior > 0):
            raise ValueError(f"item_rate_prior must be a finite number > 0; got {item_rate_prior!r}")
        self.kind = kind
        self.item_category = cat.astype(np.int64)
        self.n_categories = int(cat.max()) + 1
        self.half_life_s = float(half_life_s)
        self.type_weights = np.ones(1) if type_weights is None else np.asarray(type_weights, dtype=np.float64)
        n_feat = len(_feature_names(self.n_categories))
        if kind == "residual":
            if coef is None or np.shape(coef) != (n_feat,):
                raise ValueError(f"coef must have shape ({n_feat},) for a residual scorer; got "
                                 f"{None if coef is None else np.shape(coef)}")
        self.coef = None if coef is None else np.asarray(coef, dtype=np.float64)
        self.item_popularity: np.ndarray | None = None
        if kind == "catalog_popularity" or item_popularity is not None:
            self.item_popularity = self._checked_popularity(item_popularity, cat.size)
        self.pop_exponent = float(pop_exponent)
        #: serving puts what the user already engaged with below every other candidate (right where users
        #: seldom come back to an item, as with films; not where they replay it, as with songs)
        self.demote_seen = True
        self.n_neighbors = int(n_neighbors)
        self.shrink = float(shrink)
        self.item_rate_prior = float(item_rate_prior)

    # -- fitting -------------------------------------------------------------------------------------
    def fit(self, user: np.ndarray, item: np.ndarray, ts: np.ndarray, weight: np.ndarray, *, n_users: int,
            t_ref: float | None = None, shown_item: np.ndarray | None = None,
            shown_positive: np.ndarray | None = None) -> HistoryScorer:
        """Fit on positive events (``weight`` > 0; others are ignored but by the item rates), the
        snapshot as of ``t_ref`` (default: the newest event).

        Parameters
        ----------
        user, item, ts, weight
            Shape (n,): user rows in [0, n_users), item rows in [0, n_items), epoch seconds, units.
        shown_item, shown_positive
            Shape (m,): the exposures before the snapshot (item rows, and whether each earned a
            positive event before it), for the item rates (:func:`item_rates`, with
            ``item_rate_prior``). None: each event given is one exposure, positive when its weight is
            > 0 (a log of ratings: the item's positives over all its rated events).
        """
        import scipy.sparse as sp

        u = np.asarray(user, dtype=np.int64)
        i = np.asarray(item, dtype=np.int64)
        t = np.asarray(ts, dtype=np.float64)
        w = np.asarray(weight, dtype=np.float64)
        if not (u.shape == i.shape == t.shape == w.shape) or u.ndim != 1:
            raise ValueError(f"user, item, ts and weight must be 1-D of one shape; got {u.shape}, {i.shape}, "
                             f"{t.shape}, {w.shape}")
        if (shown_item is None) != (shown_positive is None):
            raise ValueError("shown_item and shown_positive must be given together; got one of them")
        n_items = self.item_category.size
        if shown_item is None:
            shown_item, shown_positive = i, w > 0
        rate, self.exposures_ = item_rates(np.asarray(shown_item, dtype=np.int64), np.asarray(shown_positive),
                                           self.item_category, prior=self.item_rate_prior)
        self.rate_logit_ = np.log(rate) - np.log1p(-rate)
        keep = w > 0
        u, i, t, w = u[keep], i[keep], t[keep], w[keep]
        if u.size and (u.min() < 0 or u.max() >= n_users or i.min() < 0 or i.max() >= n_items):
            raise ValueError(f"user must be in [0, {n_users}) and item in [0, {n_items}); got "
                             f"{u.min()}..{u.max()} and {i.min()}..{i.max()}")
        self.n_users_, self.n_items_ = int(n_users), n_items
        self.t_ref_ = float(t.max()) if t_ref is None and t.size else float(t_ref or 0.0)
        C = self.n_categories
        self.pop_ = np.bincount(i, weights=w, minlength=n_items)
        self.recent_ = _decayed(i, t, w, n_items, self.t_ref_, self.half_life_s)
        self.pops_ = np.stack([_decayed(i, t, w, n_items, self.t_ref_, None if h is None else h * _DAY)
                               for h in POP_HALF_LIVES_DAYS])  # (H, n_items)
        tot = np.bincount(self.item_category, weights=self.pop_, minlength=C)
        self.category_share_ = tot / tot.sum() if tot.sum() > 0 else np.full(C, 1.0 / C)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.item_share_ = np.where(tot[self.item_category] > 0, self.pop_ / tot[self.item_category], 0.0)
        cu = self.item_category[i]
        self.user_category_ = np.bincount(u * C + cu, weights=w, minlength=n_users * C).reshape(n_users, C)
        last = np.full(n_users * C, -np.inf)
        np.maximum.at(last, u * C + cu, t)
        self.last_ = last.reshape(n_users, C)
        x = sp.csr_array((np.ones(u.size), (u, i)), shape=(n_users, n_items))
        x.sum_duplicates()
        x.data[:] = 1.0
        self.history_ = x
        # each history item's recency weight: its newest positive, counted back from the user's newest
        key = u * n_items + i
        order = np.lexsort((t, key))
        newest = np.r_[key[order][1:] != key[order][:-1], True]
        ku, kt = key[order][newest], t[order][newest]
        user_last = np.full(n_users, -np.inf)
        np.maximum.at(user_last, ku // n_items, kt)
        rw = np.exp2(-(user_last[ku // n_items] - kt) / (SESSION_HALF_LIFE_DAYS * _DAY))
        self.recency_ = sp.csr_array((rw, (ku // n_items, ku % n_items)), shape=(n_users, n_items))
        self.user_pop_ = np.asarray(x.sum(axis=0)).ravel()  # users per item (item-kNN's fallback)
        # the item-item similarity only where the scores read it (an empty one otherwise)
        self.similarity_ = (self._similarity(x) if self.kind in _KNN_KINDS else
                            sp.csr_array((n_items, n_items)))
        self._serving_index()
        return self

    def with_coef(self, coef: np.ndarray, pop_exponent: float) -> HistoryScorer:
        """A ``residual`` scorer sharing this one's fitted snapshot (read only) with other coefficients
        and dial: what refitting the same history with them would give, without refitting."""
        self._check_fitted()
        if self.kind != "residual" or self.coef is None:
            raise ValueError(f"with_coef needs a residual scorer; got kind {self.kind!r}")
        if np.shape(coef) != self.coef.shape or not (np.isfinite(pop_exponent) and pop_exponent >= 0):
            raise ValueError(f"coef must have shape {self.coef.shape} and pop_exponent be a finite number "
                             f">= 0; got {np.shape(coef)} and {pop_exponent!r}")
        out = copy.copy(self)
        out.coef = np.asarray(coef, dtype=np.float64)
        out.pop_exponent = float(pop_exponent)
        out._item_terms_cache = None
        return out

    def _serving_index(self) -> None:
        """What one request reads: ``S^T`` by rows (candidate j -> its neighbours) and each history
        item's neighbour count, built once per fit or load, never on a request."""
        import scipy.sparse as sp

        self.similarity_t_ = sp.csr_array(self.similarity_.T)
        self.similarity_t_.sort_indices()  # canonical already; the kernel's sums follow this order
        self.neighbour_count_ = np.diff(self.similarity_.indptr)
        self._item_terms_cache: tuple[bytes, np.ndarray, np.ndarray] | None = None  # of the new snapshot

    def _similarity(self, x: sp.csr_array) -> sp.csr_array:
        """``S`` as :class:`rankers.ItemKNN` builds it (row = history item i, column = scored item j)."""
        out: sp.csr_array = knn_similarity(x, self.shrink, self.n_neighbors)
        return out

    @staticmethod
    def _checked_popularity(pop: np.ndarray | None, n_items: int) -> np.ndarray:
        p = None if pop is None else np.asarray(pop, dtype=np.float64)
        if p is None or p.shape != (n_items,) or not (np.isfinite(p) & (p >= 0)).all():
            got = ("None" if p is None else f"shape {p.shape}" if p.shape != (n_items,) else
                   f"{int((~(np.isfinite(p) & (p >= 0))).sum())} values that are negative or not finite")
            raise ValueError(f"item_popularity must be {n_items} finite numbers >= 0 (one per item) for a "
                             f"catalog_popularity scorer; got {got}")
        return p

    def with_item_popularity(self, popularity: np.ndarray) -> HistoryScorer:
        """A ``catalog_popularity`` scorer sharing this one's fitted snapshot (read only) that scores
        with another popularity column (the catalog's as it stands now)."""
        self._check_fitted()
        if self.kind != "catalog_popularity":
            raise ValueError(f"with_item_popularity needs a catalog_popularity scorer; got kind {self.kind!r}")
        out = copy.copy(self)
        out.item_popularity = self._checked_popularity(popularity, self.n_items_)
        return out

    def _check_fitted(self) -> None:
        if not hasattr(self, "pop_"):
            raise ValueError(f"HistoryScorer({self.kind!r}) is not fitted; call fit(...) first")

    # -- the common arithmetic -----------------------------------------------------------------------
    def _scores(self, knn: np.ndarray, has_knn: np.ndarray, n_uc: np.ndarray, last: np.ndarray,
                items: np.ndarray) -> np.ndarray:
        """Scores (U, P) of ``items`` (U, P) from each user's kNN sums ``knn`` (U, P, 2: over the history,
        and over the history weighted by recency), whether the user's
        history has any neighbour ``has_knn`` (U,), category weights ``n_uc`` (U, C) and last positive
        time per category ``last`` (U, C)."""
        kind = self.kind
        if kind == "popularity":
            return self.pop_[items]
        if kind == "catalog_popularity":
            assert self.item_popularity is not None  # checked at construction
            return self.item_popularity[items]
        if kind == "recent_popularity":
            return self.recent_[items]
        if kind == "item_knn":
            return np.where(has_knn[:, None], knn[..., 0], self.user_pop_[items])
        if kind == "residual":
            return self._residual(knn, n_uc, last, items)
        pi = (n_uc + self.category_share_) / (n_uc.sum(axis=1, keepdims=True) + 1.0)  # alpha = 1
        share = np.take_along_axis(pi, self.item_category[items], axis=1)
        return share * self.item_share_[items]  # category_popularity

    def features(self, knn: np.ndarray, n_uc: np.ndarray, last: np.ndarray, items: np.ndarray,
                 share: np.ndarray | None = None) -> np.ndarray:
        """The residual ranker's features, shape (U, P, n_features) (see the module docstring), from
        the kNN sums ``knn`` (U, P, 2) of :meth:`_scores`."""
        U, P = items.shape
        C = self.n_categories
        cat = self.item_category[items]
        if share is None:
            pi = (n_uc + self.category_share_) / (n_uc.sum(axis=1, keepdims=True) + 1.0)
            share = np.take_along_axis(pi, cat, axis=1)
        # log(1 + decayed units): an item seen once recently is not a trend (shares of tiny counts are noise)
        logpop = np.log1p(self.pops_)  # (H, n_items)
        kmax = np.maximum(knn.max(axis=1, keepdims=True) if P else np.zeros((U, 1, 2)), 1e-12)
        bucket = _gap_bucket(self.t_ref_ - np.take_along_axis(last, cat, axis=1))
        x = np.empty((U, P, _CAT + C))
        x[..., 0] = 1.0
        x[..., BASE] = np.log(self.recent_[items] + RECENT_FLOOR)
        x[..., 2:_KNN] = np.moveaxis(logpop[:, items], 0, -1)
        x[..., _KNN] = np.log1p(knn[..., 0])
        x[..., _KNN + 1] = knn[..., 0] / kmax[..., 0]
        x[..., _KNN + 2] = np.log1p(knn[..., 1])
        x[..., _KNN + 3] = knn[..., 1] / kmax[..., 1]
        x[..., _SHARE] = np.log(share + 1e-9)  # a category without any engagement has share 0
        x[..., RATE_COLUMN:_GAP] = self.rate_logit_[items][..., None]
        x[..., _GAP:_CAT] = bucket[..., None] == np.arange(_N_GAP)
        x[..., _CAT:] = cat[..., None] == np.arange(C)
        return x

    # -- batch (evaluation, gate) --------------------------------------------------------------------
    def _user_rows(self, users: np.ndarray) -> tuple[sp.csr_array, sp.csr_array, np.ndarray, np.ndarray]:
        import scipy.sparse as sp

        u = np.asarray(users, dtype=np.int64)
        if u.size and (u.min() < -1 or u.max() >= self.n_users_):
            raise ValueError(f"user_idx must be in [-1, {self.n_users_}); got {u.min()}..{u.max()}")
        known = u >= 0
        r = np.where(known, u, 0)
        x = sp.csr_array(self.history_[r].multiply(known[:, None]))
        x.eliminate_zeros()
        v = sp.csr_array(self.recency_[r].multiply(known[:, None]))
        v.eliminate_zeros()
        n_uc = np.where(known[:, None], self.user_category_[r], 0.0)
        last = np.where(known[:, None], self.last_[r], -np.inf)
        return x, v, n_uc, last

    def _knn_grid(self, x: sp.csr_array, v: sp.csr_array, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """kNN sums (U, P, 2) of the candidates ``p`` and whether each user has any neighbour (U,)."""
        import scipy.sparse as sp

        prod = x @ self.similarity_
        knn = np.take_along_axis(np.asarray(prod.toarray()), p, axis=1)
        rec = np.take_along_axis(np.asarray((v @ self.similarity_).toarray()), p, axis=1)
        return np.stack([knn, rec], axis=-1), np.diff(sp.csr_array(prod).indptr) > 0

    def score_pools(self, users: np.ndarray, pools: np.ndarray, chunk: int = 512) -> np.ndarray:
        """Scores (U, P) of the snapshot users ``users`` (U,) in [-1, n_users) (-1 = no history) for
        their candidates ``pools`` (U, P); vectorised over users, ``chunk`` users per dense pass."""
        self._check_fitted()
        pools = np.asarray(pools, dtype=np.int64)
        users = np.asarray(users, dtype=np.int64)
        out = np.empty(pools.shape)
        for s in range(0, users.size, chunk):  # chunks of users, each one sparse-dense pass
            x, v, n_uc, last = self._user_rows(users[s:s + chunk])
            p = pools[s:s + chunk]
            if self.kind in _KNN_KINDS:
                knn, has = self._knn_grid(x, v, p)
            else:
                knn, has = np.zeros((*p.shape, 2)), np.zeros(p.shape[0], dtype=bool)
            out[s:s + chunk] = self._scores(knn, has, n_uc, last, p)
        return out

    def score_pairs(self, user_idx: np.ndarray, item_idx: np.ndarray, row: int = 1024) -> np.ndarray:
        """Scores (n,) of (user, item) pairs from the snapshot (planning, replay).

        A known user's pairs are scored together, as one request scores its pool (the kNN terms are
        shares of the user's best candidate); the pairs of users without history (-1), whose scores
        do not depend on each other, in rows of ``row``."""
        u = np.asarray(user_idx, dtype=np.int64)
        i = np.asarray(item_idx, dtype=np.int64)
        if u.shape != i.shape or u.ndim != 1:
            raise ValueError(f"user_idx and item_idx must be 1-D of one shape; got {u.shape} and {i.shape}")
        if self.kind in ("popularity", "recent_popularity"):
            return self.score_pools(np.full(1, -1), i[None, :])[0]
        out = np.empty(u.size)
        cold = np.flatnonzero(u < 0)
        if cold.size:  # rows of `row` pairs, the last one padded with the first pairs again
            padded = np.resize(i[cold], -(-cold.size // row) * row).reshape(-1, row)
            out[cold] = self.score_pools(np.full(len(padded), -1), padded).ravel()[:cold.size]
        known = np.flatnonzero(u >= 0)
        if not known.size:
            return out
        users, inv = np.unique(u[known], return_inverse=True)
        # one row per distinct user holding that user's pairs, padded with the user's first item (the
        # padding changes no share of the user's best)
        order = np.argsort(inv, kind="stable")
        counts = np.bincount(inv, minlength=users.size)
        starts = np.cumsum(counts) - counts
        slot = np.arange(known.size) - np.repeat(starts, counts)
        items = i[known][order]
        grid = np.repeat(items[starts][:, None], int(counts.max()), axis=1)
        grid[inv[order], slot] = items
        got = self.score_pools(users, grid)
        out[known[order]] = got[inv[order], slot]
        return out

    def score(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray:
        """Scores (n,) of one snapshot user's candidates (no live events)."""
        return self.score_live(user_idx, item_idx, demote_seen=False)

    def category_preferences(self, user_idx: int) -> None:
        """None: the page's categories come from the scores alone (as in the evaluation)."""
        return None

    # -- serving ---------------------------------------------------------------------------------------
    def score_live(self, user_idx: int, item_idx: np.ndarray, live_items: np.ndarray | None = None,
                   live_types: np.ndarray | None = None, *, demote_seen: bool | None = None,
                   seen_out: np.ndarray | None = None) -> np.ndarray:
        """One request: scores (n,) of ``item_idx`` (n,) for snapshot user ``user_idx`` (-1 = none) whose
        live positive events ``live_items`` (item rows, newest first; ``live_types`` their event-type
        codes) happened after the snapshot.

        The live events join the user's history (kNN), category weights (units of their types) and
        last-positive times (at the snapshot's reference time). With ``demote_seen`` (default: the
        scorer's :attr:`demote_seen`) every item of the history goes below every other candidate, as the
        evaluation's ``exclude_seen`` does: ``min(s) - 1 - max |s|`` over the candidates; ``seen_out``
        (bool, shape (n,)), when given, is set to which candidates were put there.
        """
        self._check_fitted()
        u = int(user_idx)
        if not -1 <= u < self.n_users_:
            raise ValueError(f"user_idx must be in [-1, {self.n_users_}); got {u}")
        items = np.asarray(item_idx, dtype=np.int64)
        if items.size and (items.min() < 0 or items.max() >= self.n_items_):
            raise ValueError(f"item_idx must be in [0, {self.n_items_}); got {items.min()}..{items.max()}")
        C = self.n_categories
        recency = np.zeros(self.n_items_)
        if u >= 0:
            lo, hi = self.history_.indptr[u], self.history_.indptr[u + 1]
            hist = self.history_.indices[lo:hi].astype(np.int64)
            n_uc, last = self.user_category_[u].copy(), self.last_[u].copy()
            rlo, rhi = self.recency_.indptr[u], self.recency_.indptr[u + 1]
            recency[self.recency_.indices[rlo:rhi]] = self.recency_.data[rlo:rhi]
        else:
            hist, n_uc, last = np.zeros(0, np.int64), np.zeros(C), np.full(C, -np.inf)
        live = np.zeros(0, np.int64) if live_items is None else np.asarray(live_items, dtype=np.int64)
        if live.size:
            if live.min() < 0 or live.max() >= self.n_items_:
                raise ValueError(f"live_items must be in [0, {self.n_items_}); got {live.min()}..{live.max()}")
            types = np.zeros(live.size, np.int64) if live_types is None else np.asarray(live_types, np.int64)
            tw = self.type_weights[np.clip(types, 0, self.type_weights.size - 1)]
            lc = self.item_category[live]
            n_uc += np.bincount(lc, weights=np.maximum(tw, 0.0), minlength=C)
            last[np.unique(lc)] = self.t_ref_
            hist = np.union1d(hist, live)
            recency[live] = 1.0  # the newest the scorer knows of
        if self.kind in _KNN_KINDS and items.size:
            knn = self._knn_of(hist, recency[hist], items)[None]
            has = np.array([bool(self.neighbour_count_[hist].sum() > 0)])
        else:
            knn, has = np.zeros((1, items.size, 2)), np.zeros(1, dtype=bool)
        if self.kind == "residual" and items.size:
            out = self._residual(knn, n_uc[None, :], last[None, :], items[None, :])[0]
        else:
            out = self._scores(knn, has, n_uc[None, :], last[None, :], items[None, :])[0]
        if seen_out is not None:
            seen_out[:] = False
        if (self.demote_seen if demote_seen is None else demote_seen) and hist.size and items.size:
            seen = np.isin(items, hist)
            if seen.any():
                out = np.where(seen, out.min() - 1.0 - np.abs(out).max(), out)
                if seen_out is not None:
                    seen_out[:] = seen
        return out

    def _item_terms(self) -> tuple[np.ndarray, np.ndarray]:
        """The residual score's terms that depend on the item alone, once per model and dial: (the sum of
        the bias, popularity, item-rate and category terms per item (n_items,), the coefficients with
        the dial applied)."""
        coef = self.coef.copy() if self.coef is not None else np.zeros(len(self.feature_names()))
        coef[POP_COLUMNS] *= self.pop_exponent
        key = coef.tobytes()
        cached = self._item_terms_cache
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        base = (coef[0] + coef[BASE] * np.log(self.recent_ + RECENT_FLOOR) + coef[2:_KNN] @ np.log1p(self.pops_)
                + coef[RATE_COLUMN:_GAP] @ self.rate_logit_[None, :] + coef[_CAT:][self.item_category])
        self._item_terms_cache = (key, base, coef)
        return base, coef

    def _residual(self, knn: np.ndarray, n_uc: np.ndarray, last: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Residual scores (U, P) of ``items`` (U, P) from the kNN sums ``knn`` (U, P, 2), category weights
        ``n_uc`` (U, C) and last positive times ``last`` (U, C): ``sigmoid(features(...) @ coef)``
        without the (U, P, n_features) matrix: the item terms come precomputed (:meth:`_item_terms`),
        the category-share and recency-gap terms once per user and category, the kNN terms per pair."""
        base, coef = self._item_terms()
        pi = (n_uc + self.category_share_) / (n_uc.sum(axis=1, keepdims=True) + 1.0)
        per_cat = coef[_SHARE] * np.log(pi + 1e-9) + coef[_GAP + _gap_bucket(self.t_ref_ - last)]  # (U, C)
        kmax = np.maximum(knn.max(axis=1, keepdims=True), 1e-12) if items.shape[1] else np.ones((len(items), 1, 2))
        z = (base[items] + np.take_along_axis(per_cat, self.item_category[items], axis=1)
             + coef[_KNN] * np.log1p(knn[..., 0]) + coef[_KNN + 1] * (knn[..., 0] / kmax[..., 0])
             + coef[_KNN + 2] * np.log1p(knn[..., 1]) + coef[_KNN + 3] * (knn[..., 1] / kmax[..., 1]))
        return np.exp(-np.logaddexp(0.0, -z))

    def _knn_of(self, hist: np.ndarray, recency: np.ndarray, items: np.ndarray) -> np.ndarray:
        """kNN sums (n, 2) of ``items``: ``sum_i w_i S[i, j]`` over the history items ``hist`` with
        weights 1 and their ``recency``: the candidates' rows of ``S^T`` read once for both, by a
        compiled kernel equal to scipy's product (nothing for a user without history)."""
        if not hist.size:
            return np.zeros((items.size, 2))
        from . import _kernels  # numba loads on the first request, not with the package

        st = self.similarity_t_
        return _kernels.knn_sums(st.indptr, st.indices, _kernels.arg(st.data, np.float64), _kernels.arg(items, np.int64),
                                 _kernels.arg(hist, np.int64), _kernels.arg(recency, np.float64), self.n_items_)

    def warm(self) -> None:
        """Load the request path's compiled kernel now, so that no request pays for it."""
        if self.kind in _KNN_KINDS and getattr(self, "similarity_t_", None) is not None:
            from . import _kernels

            st = self.similarity_t_
            _kernels.warm(st.indptr, st.indices, _kernels.arg(st.data, np.float64))

    # -- persistence ---------------------------------------------------------------------------------
    def save(self) -> bytes:
        """:data:`HISTORY_MAGIC`, then an ``.npz`` of the parameters and the fitted snapshot."""
        self._check_fitted()
        meta = {"kind": self.kind, "half_life_s": self.half_life_s, "pop_exponent": self.pop_exponent,
                "n_neighbors": self.n_neighbors, "shrink": self.shrink, "n_users": self.n_users_,
                "t_ref": self.t_ref_, "demote_seen": self.demote_seen, "item_rate_prior": self.item_rate_prior}
        h, s = self.history_, self.similarity_
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), item_category=self.item_category,
                 type_weights=self.type_weights, coef=np.zeros(0) if self.coef is None else self.coef,
                 h_indptr=h.indptr, h_indices=h.indices, r_indptr=self.recency_.indptr,
                 r_indices=self.recency_.indices, r_data=self.recency_.data, s_indptr=s.indptr, s_indices=s.indices, s_data=s.data,
                 pop=self.pop_, recent=self.recent_, pops=self.pops_, user_category=self.user_category_,
                 last=self.last_, rate_logit=self.rate_logit_, exposures=self.exposures_,
                 item_popularity=np.zeros(0) if self.item_popularity is None else self.item_popularity)
        return HISTORY_MAGIC + buf.getvalue()

    @classmethod
    def load(cls, data: bytes) -> HistoryScorer:
        """Inverse of :meth:`save`; scores are identical."""
        import scipy.sparse as sp

        if not is_history_scorer(data):
            raise ValueError(f"data must be a saved HistoryScorer ({HISTORY_MAGIC.strip().decode()}); got "
                             f"{data[:len(HISTORY_MAGIC)]!r}")
        with np.load(io.BytesIO(data[len(HISTORY_MAGIC):]), allow_pickle=False) as z:
            meta: dict[str, Any] = json.loads(str(z["meta"]))
            coef = z["coef"]
            n_items = z["item_category"].size
            has_rates = "rate_logit" in z.files
            if coef.size and not has_rates:
                # saved before the item-rate features: their coefficients are 0, its scores unchanged
                coef = np.insert(coef, RATE_COLUMN, np.zeros(len(RATE_FEATURES)))
            self = cls(meta["kind"], z["item_category"], half_life_s=meta["half_life_s"],
                       type_weights=z["type_weights"], coef=coef if coef.size else None,
                       pop_exponent=meta["pop_exponent"], n_neighbors=meta["n_neighbors"], shrink=meta["shrink"],
                       item_rate_prior=meta.get("item_rate_prior", ITEM_RATE_PRIOR),
                       item_popularity=(z["item_popularity"] if "item_popularity" in z.files
                                        and z["item_popularity"].size else None))
            self.rate_logit_ = z["rate_logit"] if has_rates else np.zeros(n_items)
            self.exposures_ = z["exposures"] if has_rates else np.zeros(n_items)
            self.demote_seen = bool(meta.get("demote_seen", True))
            n_users = int(meta["n_users"])
            self.n_users_, self.n_items_, self.t_ref_ = n_users, n_items, float(meta["t_ref"])
            self.pop_, self.recent_, self.pops_ = z["pop"], z["recent"], z["pops"]
            self.user_category_, self.last_ = z["user_category"], z["last"]
            self.history_ = sp.csr_array((np.ones(z["h_indices"].size), z["h_indices"], z["h_indptr"]),
                                         shape=(n_users, n_items))
            self.similarity_ = sp.csr_array((z["s_data"], z["s_indices"], z["s_indptr"]), shape=(n_items, n_items))
            self.recency_ = sp.csr_array((z["r_data"], z["r_indices"], z["r_indptr"]), shape=(n_users, n_items))
        C = self.n_categories
        tot = np.bincount(self.item_category, weights=self.pop_, minlength=C)
        self.category_share_ = tot / tot.sum() if tot.sum() > 0 else np.full(C, 1.0 / C)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.item_share_ = np.where(tot[self.item_category] > 0, self.pop_ / tot[self.item_category], 0.0)
        self.user_pop_ = np.asarray(self.history_.sum(axis=0)).ravel()
        self._serving_index()
        return self

    def feature_names(self) -> tuple[str, ...]:
        """The residual ranker's feature names for this catalog's categories (the order of ``coef``)."""
        return _feature_names(self.n_categories)

    def describe(self) -> dict[str, Any]:
        """The parameters that define the served scores, for the registry row and reports."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "recent_popularity":
            out["half_life_days"] = self.half_life_s / _DAY
        if self.kind in ("item_knn", "residual"):
            out.update(n_neighbors=self.n_neighbors, shrink=self.shrink)
        if self.kind == "residual" and self.coef is not None:
            out["pop_exponent"] = self.pop_exponent
            out["item_rate_prior"] = self.item_rate_prior
            if hasattr(self, "rate_logit_"):
                rate = 1.0 / (1.0 + np.exp(-self.rate_logit_))
                out["item_rates"] = {"items_exposed": int((self.exposures_ > 0).sum()),
                                     "exposures": float(self.exposures_.sum()),
                                     "rate_quantiles": dict(zip(("p10", "p50", "p90"),
                                                                np.round(np.quantile(rate, [0.1, 0.5, 0.9]), 4).tolist(),
                                                                strict=True))}
            out["coef"] = dict(zip(self.feature_names(), np.round(self.coef, 4).tolist(), strict=True))
        return out


def residual_grid(base: HistoryScorer, users: np.ndarray, pools: np.ndarray, positives: Any
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The residual ranker's training grid: features ``X`` (U, P, n_features) of every candidate of
    every user as of ``base``'s snapshot, labels ``Y`` (U, P) = the candidate is among the user's
    ``positives`` and ``mask`` (U, P) = the candidate is not in the user's history (the page never
    shows those, so they are not learned from).

    Parameters
    ----------
    base
        A fitted :class:`HistoryScorer` (any kind): events before the label period only.
    users
        Shape (U,): snapshot user rows (-1 = none).
    pools
        Shape (U, P): each user's candidates (the engine's pools).
    positives
        Shape (U, n_items), ``scipy.sparse`` or dense: each user's positives after the snapshot.
    """
    import scipy.sparse as sp

    base._check_fitted()
    probe = HistoryScorer("residual", base.item_category, coef=np.zeros(len(_feature_names(base.n_categories))),
                          n_neighbors=base.n_neighbors, shrink=base.shrink)
    probe.__dict__.update({k: v for k, v in base.__dict__.items() if k.endswith("_")})
    if base.kind not in _KNN_KINDS:  # fitted without the item-item similarity the grid reads
        probe.similarity_ = probe._similarity(base.history_)
    pools = np.asarray(pools, dtype=np.int64)
    pos = sp.csr_array(positives)
    users = np.asarray(users, dtype=np.int64)
    xs, ys, ms = [], [], []
    for s in range(0, pools.shape[0], 512):  # chunks of users
        x, v, n_uc, last = probe._user_rows(users[s:s + 512])
        p = pools[s:s + 512]
        knn, _ = probe._knn_grid(x, v, p)
        ms.append(~(np.take_along_axis(np.asarray(x.toarray()), p, axis=1) > 0))
        ys.append(np.take_along_axis(np.asarray(pos[s:s + 512].toarray()), p, axis=1) > 0)
        xs.append(probe.features(knn, n_uc, last, p))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ms)


def fit_residual(X: np.ndarray, Y: np.ndarray, mask: np.ndarray, *, l2: float = 1.0, n_iter: int = 50,
                 nonnegative: Sequence[int] = ()) -> np.ndarray:
    """The residual ranker's coefficients: L2-regularised logistic regression (damped Newton) of
    ``1[j in P_u]`` on the features of every eligible candidate j of every user u.

    ``coef = argmin sum_{u, j in M_u} BCE(y_uj, sigmoid(x_uj . coef)) + l2 / 2 |coef[1:]|^2``,
    subject to ``coef[k] >= 0`` for ``k`` in ``nonnegative``.

    The features include the baselines' own signals (log recent popularity, the popularity at several
    half-lives, item-kNN), so the model starts from what they know and learns how the user's own
    signals move it. ``homepage train`` keeps the item rate's coefficient (:data:`RATE_COLUMN`)
    non-negative: the rate enters as what an item earns per exposure. Fitted freely to what users go on
    to choose in a log whose exposure follows popularity, it turned negative (at equal past
    engagement, a better rate means fewer exposures, so fewer future positives: -0.19 in the
    simulator), which ranked the simulator's items further from their true preference and did not
    recall more. A constrained coefficient that the free fit makes negative is fixed at 0 and the
    others are refitted (the penalised loss is convex, so for one such column this is the
    constrained optimum).

    Parameters
    ----------
    X
        Shape (U, P, n_features): :func:`residual_grid`'s features.
    Y, mask
        Shape (U, P) bool: chosen, and eligible (``mask``: not already in the user's history).
    nonnegative
        Columns (in [1, n_features)) whose coefficient must be >= 0.
    """
    m = np.asarray(mask, dtype=bool)
    Xf = np.asarray(X, dtype=np.float64)[m]
    if not np.isfinite(Xf).all():
        raise ValueError("X must be finite on the eligible candidates; got NaN or inf")
    y = (np.asarray(Y, dtype=bool) & m)[m].astype(np.float64)
    F = Xf.shape[1]
    bounded = sorted({int(k) for k in nonnegative})
    if bounded and (bounded[0] < 1 or bounded[-1] >= F):
        raise ValueError(f"nonnegative must hold columns in [1, {F}); got {list(nonnegative)!r}")
    reg = np.full(F, float(l2))
    reg[0] = 1e-6  # the intercept is barely penalised
    free = np.ones(F, dtype=bool)
    w = np.zeros(F)
    for _ in range(len(bounded) + 1):  # active set: a bounded coefficient that goes negative is fixed at 0
        w = np.zeros(F)
        w[free] = _newton(Xf[:, free], y, reg[free], n_iter)
        neg = [k for k in bounded if w[k] < 0.0]
        if not neg:
            break
        free[neg] = False
    return w


def _newton(Xf: np.ndarray, y: np.ndarray, reg: np.ndarray, n_iter: int) -> np.ndarray:
    """Damped Newton on the penalised logistic loss of rows ``Xf`` (n, F), labels ``y`` (n,)."""
    w = np.zeros(Xf.shape[1])
    w[0] = np.log((y.mean() + 1e-9) / (1.0 - y.mean() + 1e-9)) if y.size else 0.0

    def loss(v: np.ndarray) -> float:
        z = Xf @ v
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * reg @ (v * v))

    current = loss(w)
    for _ in range(n_iter):
        p = np.exp(-np.logaddexp(0.0, -(Xf @ w)))
        grad = Xf.T @ (p - y) + reg * w
        hess = (Xf * (p * (1.0 - p))[:, None]).T @ Xf + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:  # damped Newton: halve the step until the penalised loss goes down
            trial = loss(w - t * step)
            if trial <= current or t < 1e-10:
                break
            t *= 0.5
        w = w - t * step
        done = current - trial <= 1e-12 * max(1.0, abs(current)) or np.abs(t * step).max() < 1e-9
        current = min(trial, current)
        if done:
            break
    return w


def with_dial(X: np.ndarray, Y: np.ndarray, mask: np.ndarray, coef: np.ndarray, pop_exponent: float) -> np.ndarray:
    """``coef`` whose intercept is refitted for the popularity dial ``pop_exponent`` (the scorer
    multiplies the popularity columns' coefficients by it), so that the mean predicted probability over
    the eligible candidates equals the share chosen: the dial moves the ranking, not the calibration.
    Bisection on ``sum sigmoid(a + s) = sum y`` with ``s`` the rest of the logit."""
    m = np.asarray(mask, dtype=bool)
    c = np.asarray(coef, dtype=np.float64).copy()
    scaled = c.copy()
    scaled[POP_COLUMNS] *= pop_exponent
    scaled[0] = 0.0
    s = np.asarray(X, dtype=np.float64)[m] @ scaled
    target = float((np.asarray(Y, dtype=bool) & m)[m].sum())
    n = s.size
    if n == 0 or target <= 0 or target >= n:
        return c
    # f(a) = sum sigmoid(a + s) - target increases in a; it is <= 0 at lo and >= 0 at hi: bisection
    base = float(np.log(target / (n - target)))
    lo, hi = base - float(s.max()), base - float(s.min())
    for _ in range(200):
        a = 0.5 * (lo + hi)
        if np.exp(-np.logaddexp(0.0, -(a + s))).sum() < target:
            lo = a
        else:
            hi = a
        if hi - lo < 1e-13 * max(1.0, abs(a)):
            break
    a = 0.5 * (lo + hi)
    c[0] = a
    return c
