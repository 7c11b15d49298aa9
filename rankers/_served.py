"""The numeric core of a served-page offline evaluation: top-k pages from scores, per-user page metrics
against future positives, catalog coverage and a paired bootstrap of two scorers on the same users.

Pure numpy / scipy.sparse, no I/O, vectorised over users (no Python loop over users or items).

Conventions
-----------
``pages``
    int array of shape (n_users, page_size): the item shown in each slot, left to right = rank 1, 2, ...
    ``-1`` is an empty slot; it keeps its rank (the items after it are not moved up). An item repeated
    on the same page counts once, at its first (best) slot.
``positives``
    the future positives as a sparse matrix (any ``scipy.sparse`` matrix or array, e.g. ``csr_matrix``)
    or a dense 2-D array of shape (n_users, n_items), row ``u`` = the user of ``pages[u]``; every entry
    ``!= 0`` is a positive, its value is ignored (binary relevance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["page_metrics", "coverage", "top_k_pages", "paired_bootstrap"]

# paired_bootstrap draws at most this many resample indices at once (about 16 MB of int64)
_BOOT_CHUNK = 2_000_000


def _check_n_items(n_items: Any) -> int:
    if isinstance(n_items, bool) or not isinstance(n_items, int | np.integer) or n_items < 1:
        raise ValueError(f"n_items must be an int >= 1; got {n_items!r}")
    return int(n_items)


def _check_pages(pages: Any, n_items: int) -> np.ndarray:
    pages = np.asarray(pages)
    if pages.ndim != 2 or pages.shape[1] < 1:
        raise ValueError(
            f"pages must be a 2-D array (n_users, page_size) with page_size >= 1; got shape {pages.shape}"
        )
    if pages.size and not np.issubdtype(pages.dtype, np.integer):
        raise ValueError(f"pages must hold int item indices; got dtype {pages.dtype}")
    pages = pages.astype(np.int64, copy=False)
    if pages.size and (pages.min() < -1 or pages.max() >= n_items):
        raise ValueError(
            f"pages must be in [-1, {n_items}) (-1 = empty slot); got {pages.min()}..{pages.max()}"
        )
    return pages


def _check_positives(positives: Any, shape: tuple[int, int], name: str = "positives") -> sp.csr_array:
    """Canonical CSR copy (sorted indices, no duplicates, no stored zeros) of ``positives``."""
    import scipy.sparse as sp  # here, not at module level: `import rankers` stays light for serving

    if sp.issparse(positives):
        csr = sp.csr_array(positives, copy=True)
    else:
        dense = np.asarray(positives)
        if dense.ndim != 2:
            raise ValueError(
                f"{name} must be a sparse matrix or a 2-D array of shape {shape}; got shape {dense.shape}"
            )
        csr = sp.csr_array(dense != 0)
    if csr.shape != shape:
        raise ValueError(f"{name} must have shape (n_users, n_items) = {shape}; got {csr.shape}")
    csr.sum_duplicates()  # also sorts the column indices of each row
    csr.eliminate_zeros()
    return csr


def _first_occurrence(pages: np.ndarray) -> np.ndarray:
    """Shape of ``pages``, bool: a filled slot whose item does not appear in an earlier slot of its row."""
    order = np.argsort(pages, axis=1, kind="stable")  # stable: the first slot of a run comes first
    s = np.take_along_axis(pages, order, axis=1)
    repeat = np.zeros(s.shape, dtype=bool)
    repeat[:, 1:] = s[:, 1:] == s[:, :-1]
    first = np.empty(s.shape, dtype=bool)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first & (pages >= 0)


def _discount(k: int) -> np.ndarray:
    """``1 / log2(r + 1)`` for ranks r = 1..k, shape (k,)."""
    return 1.0 / np.log2(np.arange(2, k + 2, dtype=np.float64))


def page_metrics(
    pages: np.ndarray, positives: Any, *, n_items: int, is_tail: np.ndarray | None = None,
    item_weight: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Per-user HR, recall and NDCG of served pages against each user's future positives.

    With page size ``k = pages.shape[1]``, ``S_u`` the distinct items on user u's page, ``P_u`` the
    user's positives and ``r_u(i)`` the 1-based slot of item i's first occurrence on the page:

    * ``hit_u = 1[|S_u ∩ P_u| > 0]`` (HR@k);
    * ``recall_u = |S_u ∩ P_u| / min(|P_u|, k)`` (normalised so that a perfect page scores 1);
    * ``ndcg_u = DCG_u / IDCG_u`` with binary gains and a log2 discount,
      ``DCG_u = sum_{i in S_u ∩ P_u} 1 / log2(r_u(i) + 1)`` and
      ``IDCG_u = sum_{r=1}^{min(|P_u|, k)} 1 / log2(r + 1)`` (all positives at the top);
    * ``long_tail_share_u = |{i in S_u : is_tail[i]}| / |S_u|`` (only when ``is_tail`` is given; it
      does not depend on the positives).

    Empty slots (-1) keep their rank and count towards ``k``; a repeated item counts once.

    With ``item_weight`` (``w``, e.g. inverse exposure propensities, which turn a positive into an
    estimate of the user's preference where exposure was uneven) each positive counts ``w_i`` instead
    of 1: ``recall_u = sum_{i in S_u ∩ P_u} w_i / W_u`` and ``DCG_u = sum_{i in S_u ∩ P_u} w_i /
    log2(r_u(i) + 1)``, where ``W_u`` and ``IDCG_u`` take the ``min(|P_u|, k)`` heaviest positives
    (in descending weight for the IDCG), so a perfect page still scores 1; ``w = 1`` gives the
    unweighted figures. HR does not depend on the weights.

    Parameters
    ----------
    pages
        Shape (n_users, k), int item indices in [-1, n_items), -1 = empty slot.
    positives
        Shape (n_users, n_items): a ``scipy.sparse`` matrix or array (e.g. ``csr_matrix``), or a dense
        array; entries ``!= 0`` are the user's future positives.
    n_items
        Catalog size.
    is_tail
        Shape (n_items,) bool, the long-tail items.
    item_weight
        Shape (n_items,), finite and > 0 on every positive; None weighs every positive 1.

    Returns
    -------
    dict of arrays of shape (n_users,):

    ``hit``, ``recall``, ``ndcg``
        float64, NaN for users without positives (so that a plain ``mean`` over all users shows NaN
        instead of silently counting them as misses); average over ``has_positives``.
    ``has_positives``
        bool, ``|P_u| > 0``.
    ``n_positives``
        int64, ``|P_u|``.
    ``long_tail_share``
        float64, only with ``is_tail``; NaN for a page without any item.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> pages = np.array([[2, 0, 4], [1, 3, -1]])
    >>> positives = sp.csr_matrix(np.array([[0, 0, 1, 0, 1], [0, 0, 0, 0, 0]]))
    >>> m = page_metrics(pages, positives, n_items=5)
    >>> m["hit"], m["recall"], m["has_positives"]
    (array([ 1., nan]), array([ 1., nan]), array([ True, False]))
    >>> bool(np.isclose(m["ndcg"][0], (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))))
    True
    """
    n_items = _check_n_items(n_items)
    pages = _check_pages(pages, n_items)
    n_users, k = pages.shape
    pos = _check_positives(positives, (n_users, n_items))
    tail = None if is_tail is None else np.asarray(is_tail)
    if tail is not None and (tail.shape != (n_items,) or tail.dtype != np.bool_):
        raise ValueError(
            f"is_tail must be a bool array of shape ({n_items},); got shape {tail.shape} dtype {tail.dtype}"
        )
    n_pos = np.diff(pos.indptr).astype(np.int64)

    # membership of each (user, shown item) in the positives: CSR keys u * n_items + i are sorted
    keys = np.repeat(np.arange(n_users, dtype=np.int64), n_pos) * n_items + pos.indices.astype(np.int64)
    first = _first_occurrence(pages)
    query = np.arange(n_users, dtype=np.int64)[:, None] * n_items + np.maximum(pages, 0)
    if keys.size:
        at = np.minimum(np.searchsorted(keys, query), keys.size - 1)
        relevant = first & (keys[at] == query)
    else:
        relevant = np.zeros(pages.shape, dtype=bool)

    has = n_pos > 0
    n_rel = relevant.sum(axis=1)
    disc = _discount(k)
    ideal_n = np.minimum(n_pos, k)
    if item_weight is None:
        gain = relevant.astype(np.float64)
        ideal_mass = ideal_n.astype(np.float64)
        idcg = np.r_[0.0, np.cumsum(disc)][ideal_n]
    else:
        w = _check_item_weight(item_weight, n_items, pos.indices)
        gain = np.where(relevant, w[np.maximum(pages, 0)], 0.0)
        ideal_mass, idcg = _ideal_weights(w[pos.indices], n_pos, k, disc)
    with np.errstate(invalid="ignore", divide="ignore"):
        out: dict[str, np.ndarray] = {
            "hit": np.where(has, (n_rel > 0).astype(np.float64), np.nan),
            "recall": np.where(has, gain.sum(axis=1) / ideal_mass, np.nan),
            "ndcg": np.where(has, (gain @ disc) / idcg, np.nan),
            "has_positives": has,
            "n_positives": n_pos,
        }
    if tail is not None:
        n_shown = first.sum(axis=1)
        n_tail = (first & tail[np.maximum(pages, 0)]).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["long_tail_share"] = np.where(n_shown > 0, n_tail / n_shown, np.nan)
    return out


def _check_item_weight(item_weight: Any, n_items: int, positive_items: np.ndarray) -> np.ndarray:
    w = np.asarray(item_weight, dtype=np.float64)
    if w.shape != (n_items,):
        raise ValueError(f"item_weight must have shape ({n_items},); got {w.shape}")
    on = w[positive_items]
    if on.size and not (np.isfinite(on).all() and (on > 0).all()):
        raise ValueError(f"item_weight must be finite and > 0 on every positive item; got min {float(on.min())!r}")
    return w


def _ideal_weights(w_pos: np.ndarray, n_pos: np.ndarray, k: int, disc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per user: the sum of the ``min(|P_u|, k)`` heaviest positive weights, and their DCG in
    descending order. ``w_pos`` holds the positives' weights row by row (CSR order)."""
    n_users = n_pos.size
    row = np.repeat(np.arange(n_users, dtype=np.int64), n_pos)
    order = np.lexsort((-w_pos, row))  # by user, heaviest first
    start = np.r_[0, np.cumsum(n_pos)[:-1]]
    rank = np.arange(w_pos.size, dtype=np.int64) - np.repeat(start, n_pos)
    top = rank < k
    ws, rs, us = w_pos[order][top], rank[top], row[top]
    mass = np.bincount(us, weights=ws, minlength=n_users)
    idcg = np.bincount(us, weights=ws * disc[rs], minlength=n_users)
    return mass, idcg


def coverage(pages: np.ndarray, n_items: int) -> float:
    """Catalog coverage: share of the catalog shown to at least one user,
    ``|union_u S_u| / n_items``.

    Parameters
    ----------
    pages
        Shape (n_users, k), int item indices in [-1, n_items), -1 = empty slot.
    n_items
        Catalog size.

    Examples
    --------
    >>> coverage(np.array([[0, 1], [1, -1]]), n_items=4)
    0.5
    """
    n_items = _check_n_items(n_items)
    pages = _check_pages(pages, n_items)
    shown = np.zeros(n_items, dtype=bool)
    shown[pages[pages >= 0]] = True
    return float(shown.sum() / n_items)


def top_k_pages(scores: np.ndarray, k: int, *, exclude: Any = None) -> np.ndarray:
    """The page of a plain ranked list: each row's ``k`` highest-scoring items, best first.

    Ties go to the lower item index (the order of a stable sort of ``-scores``). Items with score
    ``-inf`` and the items of ``exclude`` (e.g. the user's training items) are never shown; a row with
    fewer than ``k`` eligible items is padded with -1.

    Parameters
    ----------
    scores
        Shape (n_users, n_items), no NaN; not modified.
    k
        Page size, an int >= 1 (may exceed ``n_items``).
    exclude
        Shape (n_users, n_items), a ``scipy.sparse`` matrix or a dense array; entries ``!= 0`` are
        excluded.

    Returns
    -------
    Shape (n_users, k) int64, item indices in [-1, n_items).

    Examples
    --------
    >>> top_k_pages(np.array([[0.1, 0.5, 0.5, -np.inf]]), k=4)
    array([[ 1,  2,  0, -1]])
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be an int >= 1; got {k!r}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be a 2-D array (n_users, n_items); got shape {s.shape}")
    if np.isnan(s).any():
        raise ValueError("scores must not contain NaN; got NaN (use -inf for items never to show)")
    n_users, n_items = s.shape
    if exclude is not None:
        ex = _check_positives(exclude, (n_users, n_items), "exclude").tocoo()
        s = s.copy()  # never write into the caller's scores
        s[ex.row, ex.col] = -np.inf
    k_eff = min(int(k), n_items)
    pages = np.full((n_users, int(k)), -1, dtype=np.int64)
    if n_users == 0 or n_items == 0:
        return pages
    # threshold = the k-th largest score of each row; everything above it is in, and the first
    # (k - n_above) items equal to it by index fill the rest, so each row selects exactly k_eff items
    thresh = np.partition(s, n_items - k_eff, axis=1)[:, n_items - k_eff : n_items - k_eff + 1]
    above = s > thresh
    tie = s == thresh
    room = k_eff - above.sum(axis=1)
    chosen = above | tie
    crowded = np.flatnonzero(tie.sum(axis=1) > room)  # rows where the tie must be cut by item index
    if crowded.size:
        t = tie[crowded]
        chosen[crowded] = above[crowded] | (t & (np.cumsum(t, axis=1) <= room[crowded, None]))
    items = np.nonzero(chosen)[1].reshape(n_users, k_eff)  # row-major: ascending item index
    order = np.argsort(-np.take_along_axis(s, items, axis=1), axis=1, kind="stable")
    items = np.take_along_axis(items, order, axis=1)
    pages[:, :k_eff] = np.where(np.take_along_axis(s, items, axis=1) > -np.inf, items, -1)
    return pages


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int | np.random.Generator = 0,
    alpha: float = 0.05,
) -> dict[str, float | int]:
    """Paired (user-level) bootstrap of the mean difference of a per-user metric of two scorers.

    With ``d_u = a_u - b_u`` over the same n users, each resample r draws n users with replacement
    (indices ``I_r``) and takes ``m_r = mean(d[I_r])``. Then

    * ``mean_diff = mean(d)``;
    * ``ci_low, ci_high`` = the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of ``m_r`` (percentile
      interval for ``E[a - b]``);
    * ``p_value = (1 / n_boot) sum_r 1[m_r <= 0]``, the share of resamples where ``a`` does not beat
      ``b`` (a one-sided bootstrap p-value for "a > b"; 1 when ``a == b``);
    * ``se`` = the standard deviation of ``m_r`` (ddof 1).

    Resampling the users jointly for both scorers keeps the pairing, so the user-to-user variation
    that both share cancels out of the difference.

    Parameters
    ----------
    a, b
        Shape (n_users,), finite: the metric of each user under each scorer (e.g. ``recall`` of
        :func:`page_metrics` restricted to ``has_positives``), rows = the same users.
    n_boot
        Number of resamples, an int >= 1.
    seed
        Seed (or ``np.random.Generator``) of the resampling.
    alpha
        In (0, 1): the interval is a ``1 - alpha`` interval.

    Returns
    -------
    dict with floats ``mean_diff``, ``ci_low``, ``ci_high``, ``p_value``, ``se``, ``alpha`` and ints
    ``n_users``, ``n_boot``.

    References
    ----------
    Efron and Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall 1993 (ch. 13, percentile
    intervals). Sakai, "Evaluating Evaluation Metrics based on the Bootstrap", SIGIR 2006 (paired
    bootstrap for IR metrics).

    Examples
    --------
    >>> r = paired_bootstrap(np.array([0.5, 1.0, 0.0]), np.array([0.5, 1.0, 0.0]), n_boot=50)
    >>> r["mean_diff"], r["ci_low"], r["ci_high"], r["p_value"]
    (0.0, 0.0, 0.0, 1.0)
    """
    a_ = np.asarray(a, dtype=np.float64)
    b_ = np.asarray(b, dtype=np.float64)
    if a_.ndim != 1 or a_.size == 0:
        raise ValueError(f"a must be a non-empty 1-D array (n_users,); got shape {a_.shape}")
    if b_.shape != a_.shape:
        raise ValueError(f"b must have the shape of a {a_.shape}; got {b_.shape}")
    for name, x in (("a", a_), ("b", b_)):
        bad = int((~np.isfinite(x)).sum())
        if bad:
            raise ValueError(
                f"{name} must be finite; got {bad} NaN/inf values (keep users with positives only, "
                "e.g. page_metrics(...)['has_positives'])"
            )
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ValueError(f"n_boot must be an int >= 1; got {n_boot!r}")
    if isinstance(alpha, bool) or not (isinstance(alpha, float | int | np.floating) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1); got {alpha!r}")
    rng = np.random.default_rng(seed)
    d = a_ - b_
    n = d.size
    n_boot = int(n_boot)
    means = np.empty(n_boot)
    chunk = max(1, _BOOT_CHUNK // n)
    for start in range(0, n_boot, chunk):  # loops over chunks of resamples, not users
        stop = min(start + chunk, n_boot)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return {
        "mean_diff": float(d.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_value": float((means <= 0.0).mean()),
        "se": float(means.std(ddof=1)) if n_boot > 1 else 0.0,
        "n_users": n,
        "n_boot": n_boot,
        "alpha": float(alpha),
    }
