"""Training examples from the impression/event log: labels, behaviour sequences, time split, item priors.

Pure numpy. Every step is vectorised (sort + ``searchsorted``); nothing loops over log rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

import numpy as np

__all__ = [
    "EVENT_TYPES",
    "TASKS",
    "PRIOR_COLUMNS",
    "Examples",
    "UserHistory",
    "build_examples",
    "split_by_time",
    "item_priors",
    "behaviour_grade",
    "dense_item_features",
    "standardize",
]

#: Event codes of the ``events["type"]`` array, in this order everywhere.
EVENT_TYPES: tuple[str, ...] = ("play", "full_play", "favorite", "share", "skip")
#: Prediction tasks (label columns), in this order everywhere. ``collect`` = favorite or share.
TASKS: tuple[str, ...] = ("play", "full_play", "collect", "skip")
#: Columns of :func:`item_priors`.
PRIOR_COLUMNS: tuple[str, ...] = (
    "logit_rate_play",
    "logit_rate_full_play",
    "logit_rate_collect",
    "logit_rate_skip",
    "log1p_impressions",
)

_PLAY, _FULL, _FAV, _SHARE, _SKIP = range(5)
_POSITIVE = (_PLAY, _FULL, _FAV, _SHARE)


@dataclass(frozen=True, eq=False)
class UserHistory:
    """Each user's most recent behaviour, most recent first, padded with -1.

    Attributes
    ----------
    pos_items, pos_types
        Shape (n_rows, seq_len). Items of the last positive events (play, full_play, favorite, share)
        and their event codes (index into ``EVENT_TYPES``); -1 where the user has fewer events.
    neg_items
        Shape (n_rows, seq_len). Items of the last skip events; -1 padding.
    pos_count, neg_count
        Shape (n_rows,). Number of positive / skip events before the cut (not truncated to seq_len):
        the user's activity.
    """

    pos_items: np.ndarray
    pos_types: np.ndarray
    neg_items: np.ndarray
    pos_count: np.ndarray
    neg_count: np.ndarray

    @property
    def seq_len(self) -> int:
        return int(self.pos_items.shape[1])

    def take(self, rows: np.ndarray) -> UserHistory:
        """Rows ``rows`` (shape (n,), -1 = unknown user: empty history)."""
        rows = np.asarray(rows, dtype=np.int64)
        known = rows >= 0
        safe = np.where(known, rows, 0)
        pad = ~known[:, None]
        return UserHistory(
            pos_items=np.where(pad, -1, self.pos_items[safe]).astype(np.int32),
            pos_types=np.where(pad, -1, self.pos_types[safe]).astype(np.int8),
            neg_items=np.where(pad, -1, self.neg_items[safe]).astype(np.int32),
            pos_count=np.where(known, self.pos_count[safe], 0),
            neg_count=np.where(known, self.neg_count[safe], 0),
        )


@dataclass(frozen=True, eq=False)
class Examples:
    """One row per shown item, with labels, the user's behaviour at decision time and the catalog.

    Attributes
    ----------
    decision, user, item
        Shape (n,) int64. ``user`` is -1 for an unknown (cold-start) user.
    ts
        Shape (n,) float64, epoch seconds of the impression.
    category
        Shape (n,) int64, ``item_category[item]``.
    labels
        Shape (n, 4) float32, columns ``TASKS``: play (any of play/full_play/favorite/share, since
        those imply a play), full_play, collect (favorite or share), skip. An impression without an
        event is 0 on every task.
    seq
        :class:`UserHistory` with one row per example: the user's behaviour strictly before ``ts``.
    history
        :class:`UserHistory` with one row per user (n_users rows): behaviour as of the last event of
        the log, the snapshot a serving scorer stores.
    item_category
        Shape (n_items,) int64 in [0, n_categories).
    item_features
        Shape (n_items, n_features) float64, catalog features.
    popularity
        Shape (n_items,) float64 or None, catalog popularity (used by the popularity branch).
    item_priors
        Shape (n_items, 5) float64 (columns ``PRIOR_COLUMNS``) or None until :func:`split_by_time`
        (or ``with_priors``) computes them from a training part.
    """

    decision: np.ndarray
    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray
    category: np.ndarray
    labels: np.ndarray
    seq: UserHistory
    history: UserHistory
    item_category: np.ndarray
    item_features: np.ndarray
    popularity: np.ndarray | None
    item_priors: np.ndarray | None
    n_users: int
    n_items: int
    n_categories: int

    def __len__(self) -> int:
        return int(self.item.shape[0])

    @property
    def seq_len(self) -> int:
        return self.seq.seq_len

    def subset(self, rows: np.ndarray) -> Examples:
        """The examples at ``rows`` (int indices or a bool mask); catalog arrays are shared."""
        rows = np.asarray(rows)
        seq = UserHistory(**{f.name: getattr(self.seq, f.name)[rows] for f in fields(UserHistory)})
        return replace(
            self,
            decision=self.decision[rows],
            user=self.user[rows],
            item=self.item[rows],
            ts=self.ts[rows],
            category=self.category[rows],
            labels=self.labels[rows],
            seq=seq,
        )

    def with_priors(self, priors: np.ndarray) -> Examples:
        """A copy carrying ``priors`` (shape (n_items, 5)) as ``item_priors``."""
        priors = np.asarray(priors, dtype=np.float64)
        if priors.shape != (self.n_items, len(PRIOR_COLUMNS)):
            raise ValueError(
                f"priors must have shape ({self.n_items}, {len(PRIOR_COLUMNS)}); got {priors.shape}"
            )
        return replace(self, item_priors=priors)


def behaviour_grade(labels: np.ndarray) -> np.ndarray:
    """Behaviour order of each example: collect 4 > full_play 3 > play 2 > no event 1 > skip 0.

    Parameters
    ----------
    labels
        Shape (n, 4), columns ``TASKS``.

    Returns
    -------
    Shape (n,) int64. The strongest behaviour wins; a skip without any positive event is 0, below an
    impression with no event (which may not have been examined).
    """
    labels = np.asarray(labels) > 0.5
    grade = np.ones(labels.shape[0], dtype=np.int64)
    grade[labels[:, 3] & ~labels[:, 0]] = 0
    grade[labels[:, 0]] = 2
    grade[labels[:, 1]] = 3
    grade[labels[:, 2]] = 4
    return grade


def standardize(x: np.ndarray, clip: float = 5.0) -> np.ndarray:
    """Columns of ``x`` (n, k) to zero mean and unit variance over rows, clipped to [-clip, clip]
    (a constant column becomes 0)."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    return np.clip(z, -clip, clip)


def dense_item_features(examples: Examples) -> np.ndarray:
    """The dense item inputs of the ranker and the logistic baseline, shape (n_items, n_features + 5):
    catalog features through a signed log ``sign(x) log1p(|x|)`` (durations, ages and counts are heavy
    tailed; a raw outlier, squared by the interaction layers, gives absurd logits), then the item
    priors; every column standardised over items and clipped to [-5, 5]."""
    if examples.item_priors is None:
        raise ValueError(
            "examples.item_priors must be set (use split_by_time or Examples.with_priors); got None"
        )
    f = examples.item_features
    return standardize(np.concatenate([np.sign(f) * np.log1p(np.abs(f)), examples.item_priors], axis=1))


def _column(table: Mapping[str, np.ndarray], name: str, key: str, dtype: type) -> np.ndarray:
    if key not in table:
        raise ValueError(f"{name} must have key {key!r}; got keys {sorted(table)!r}")
    arr = np.asarray(table[key])
    if arr.ndim != 1:
        raise ValueError(f"{name}[{key!r}] must be 1-D; got shape {arr.shape}")
    if dtype is np.int64 and arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}[{key!r}] must be integer; got dtype {arr.dtype}")
    return arr.astype(dtype, copy=False)


def _check_range(name: str, arr: np.ndarray, low: int, high: int) -> None:
    if arr.size and (arr.min() < low or arr.max() >= high):
        bad = arr[(arr < low) | (arr >= high)][0].item()
        raise ValueError(f"{name} must be in [{low}, {high}); got {bad!r}")


class _SortedEvents:
    """Events of one kind ordered by (user, time rank, log order), for window queries.

    A query (user, rank) finds the user's events with time rank < rank by two ``searchsorted`` calls
    on the combined integer key ``user * n_ranks + rank``.
    """

    def __init__(
        self, user: np.ndarray, rank: np.ndarray, item: np.ndarray, typ: np.ndarray, n_ranks: int
    ) -> None:
        key = user * n_ranks + rank
        order = np.argsort(key, kind="stable")
        self.key, self.item, self.type, self.n_ranks = key[order], item[order], typ[order], n_ranks

    def last(
        self, q_user: np.ndarray, q_rank: np.ndarray, seq_len: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Items (n, seq_len), types (n, seq_len) of the last events before each query, most recent
        first, -1 padded; and the number of such events (n,)."""
        known = q_user >= 0
        qu = np.where(known, q_user, 0)
        start = np.searchsorted(self.key, qu * self.n_ranks, side="left")
        end = np.searchsorted(self.key, qu * self.n_ranks + q_rank, side="left")
        end = np.where(known, end, start)
        pos = end[:, None] - 1 - np.arange(seq_len)[None, :]
        valid = pos >= start[:, None]
        if self.key.size == 0:
            return (
                np.full(pos.shape, -1, dtype=np.int32),
                np.full(pos.shape, -1, dtype=np.int8),
                np.zeros(pos.shape[0], dtype=np.int64),
            )
        pos = np.where(valid, pos, 0)
        items = np.where(valid, self.item[pos], -1).astype(np.int32)
        types = np.where(valid, self.type[pos], -1).astype(np.int8)
        return items, types, (end - start).astype(np.int64)


def build_examples(
    impressions: Mapping[str, np.ndarray],
    events: Mapping[str, np.ndarray],
    *,
    n_users: int,
    n_items: int,
    item_category: np.ndarray,
    item_features: np.ndarray,
    seq_len: int = 20,
    popularity: np.ndarray | None = None,
    n_categories: int | None = None,
) -> Examples:
    """Join impressions to their events and attach each user's behaviour sequences.

    Parameters
    ----------
    impressions
        ``decision``, ``user`` (-1 = unknown user), ``item``, ``ts``: shape (n,), one row per shown item.
    events
        ``decision``, ``user``, ``item``, ``ts``, ``type`` (code into ``EVENT_TYPES``): shape (m,).
        An event labels the impression with the same (decision, item); events without a matching
        impression only feed behaviour sequences.
    n_users, n_items
        Sizes of the user and item index spaces.
    item_category
        Shape (n_items,), ints in [0, n_categories).
    item_features
        Shape (n_items, n_features), catalog features (may have 0 columns).
    seq_len
        Length of the positive and of the negative (skip) sequence.
    popularity
        Shape (n_items,), optional catalog popularity (>= 0), fed to the popularity branch.
    n_categories
        Defaults to ``item_category.max() + 1``.

    Returns
    -------
    :class:`Examples` without item priors (see :func:`split_by_time`).

    Notes
    -----
    Sequences use only events with ``ts`` strictly before the impression's ``ts`` (an event at the
    same second is not yet known). Ties in time keep log order. Positive events are play, full_play,
    favorite and share, each kept with its type; skips form the negative sequence, as in Taobao
    Live's separate positive/negative feedback sequences.
    """
    if not isinstance(seq_len, int | np.integer) or seq_len < 1:
        raise ValueError(f"seq_len must be an int >= 1; got {seq_len!r}")
    if not isinstance(n_users, int | np.integer) or n_users < 0:
        raise ValueError(f"n_users must be an int >= 0; got {n_users!r}")
    if not isinstance(n_items, int | np.integer) or n_items < 1:
        raise ValueError(f"n_items must be an int >= 1; got {n_items!r}")
    item_category = np.asarray(item_category)
    if item_category.shape != (n_items,) or not np.issubdtype(item_category.dtype, np.integer):
        raise ValueError(
            f"item_category must be an int array of shape ({n_items},); "
            f"got shape {item_category.shape} dtype {item_category.dtype}"
        )
    item_category = item_category.astype(np.int64)
    if n_categories is None:
        n_categories = int(item_category.max()) + 1
    _check_range("item_category", item_category, 0, n_categories)
    item_features = np.asarray(item_features, dtype=np.float64)
    if item_features.ndim != 2 or item_features.shape[0] != n_items:
        raise ValueError(f"item_features must have shape ({n_items}, n_features); got {item_features.shape}")
    if not np.isfinite(item_features).all():
        raise ValueError("item_features must be finite; got NaN or inf")
    if popularity is not None:
        popularity = np.asarray(popularity, dtype=np.float64)
        if popularity.shape != (n_items,) or (popularity < 0).any() or not np.isfinite(popularity).all():
            raise ValueError(f"popularity must be finite, >= 0 and of shape ({n_items},)")

    i_dec = _column(impressions, "impressions", "decision", np.int64)
    i_user = _column(impressions, "impressions", "user", np.int64)
    i_item = _column(impressions, "impressions", "item", np.int64)
    i_ts = _column(impressions, "impressions", "ts", np.float64)
    e_dec = _column(events, "events", "decision", np.int64)
    e_user = _column(events, "events", "user", np.int64)
    e_item = _column(events, "events", "item", np.int64)
    e_ts = _column(events, "events", "ts", np.float64)
    e_type = _column(events, "events", "type", np.int64)
    for name, cols in (
        ("impressions", (i_dec, i_user, i_item, i_ts)),
        ("events", (e_dec, e_user, e_item, e_ts, e_type)),
    ):
        if len({c.shape[0] for c in cols}) != 1:
            raise ValueError(f"{name} arrays must have equal lengths; got {[c.shape[0] for c in cols]}")
    _check_range("impressions['user']", i_user, -1, n_users)
    _check_range("events['user']", e_user, -1, n_users)
    _check_range("impressions['item']", i_item, 0, n_items)
    _check_range("events['item']", e_item, 0, n_items)
    _check_range("events['type']", e_type, 0, len(EVENT_TYPES))
    if not (np.isfinite(i_ts).all() and np.isfinite(e_ts).all()):
        raise ValueError("ts must be finite; got NaN or inf")

    # labels: flag the event types seen for each distinct (decision, item) of the impressions
    n = i_item.shape[0]
    dec_codes, dec_inv = np.unique(np.concatenate([i_dec, e_dec]), return_inverse=True)
    i_key = dec_inv[:n] * n_items + i_item
    e_key = dec_inv[n:] * n_items + e_item
    uniq, inv = np.unique(i_key, return_inverse=True)
    flags = np.zeros((uniq.shape[0], len(EVENT_TYPES)), dtype=bool)
    if e_key.size and uniq.size:
        at = np.minimum(np.searchsorted(uniq, e_key), uniq.shape[0] - 1)
        hit = uniq[at] == e_key
        flags[at[hit], e_type[hit]] = True
    f = flags[inv]
    labels = np.stack(
        [f[:, list(_POSITIVE)].any(axis=1), f[:, _FULL], f[:, _FAV] | f[:, _SHARE], f[:, _SKIP]], axis=1
    ).astype(np.float32)

    # sequences: time as integer ranks so that (user, time) packs into one int64 key
    all_ts, ts_rank = np.unique(np.concatenate([i_ts, e_ts]), return_inverse=True)
    n_ranks = all_ts.shape[0] + 1
    i_rank, e_rank = ts_rank[:n], ts_rank[n:]
    pos_ev = (e_user >= 0) & (e_type != _SKIP)
    neg_ev = (e_user >= 0) & (e_type == _SKIP)
    pos = _SortedEvents(e_user[pos_ev], e_rank[pos_ev], e_item[pos_ev], e_type[pos_ev], n_ranks)
    neg = _SortedEvents(e_user[neg_ev], e_rank[neg_ev], e_item[neg_ev], e_type[neg_ev], n_ranks)

    def hist(q_user: np.ndarray, q_rank: np.ndarray) -> UserHistory:
        pi, pt, pc = pos.last(q_user, q_rank, seq_len)
        ni, _, nc = neg.last(q_user, q_rank, seq_len)
        return UserHistory(pos_items=pi, pos_types=pt, neg_items=ni, pos_count=pc, neg_count=nc)

    seq = hist(i_user, i_rank)
    # the serving snapshot: every event of the log (rank n_ranks - 1 is past the last timestamp)
    history = hist(np.arange(n_users, dtype=np.int64), np.full(n_users, n_ranks - 1, dtype=np.int64))
    return Examples(
        decision=i_dec,
        user=i_user,
        item=i_item,
        ts=i_ts,
        category=item_category[i_item],
        labels=labels,
        seq=seq,
        history=history,
        item_category=item_category,
        item_features=item_features,
        popularity=popularity,
        item_priors=None,
        n_users=int(n_users),
        n_items=int(n_items),
        n_categories=int(n_categories),
    )


def item_priors(examples: Examples, prior_strength: float = 20.0) -> np.ndarray:
    """Smoothed per-item engagement rates and log impression counts from ``examples``.

    For task t and item i with n_i impressions and k_it positives, the Beta-smoothed rate is
    ``r_it = (k_it + s * m_t) / (n_i + s)`` with m_t the overall rate of t and s = ``prior_strength``
    (a Beta(s m_t, s (1 - m_t)) prior). Columns (``PRIOR_COLUMNS``): ``logit(r_it)`` for the four
    tasks, then ``log1p(n_i)``.

    Parameters
    ----------
    examples
        The training part only: priors computed on validation or test rows leak their labels.
    prior_strength
        s > 0, pseudo-impressions of the prior.

    Returns
    -------
    Shape (n_items, 5) float64.
    """
    if not prior_strength > 0:
        raise ValueError(f"prior_strength must be > 0; got {prior_strength!r}")
    n_i = np.bincount(examples.item, minlength=examples.n_items).astype(np.float64)
    k = np.stack(
        [
            np.bincount(examples.item, weights=examples.labels[:, t], minlength=examples.n_items)
            for t in range(4)
        ],
        axis=1,
    )
    total = max(len(examples), 1)
    m = (examples.labels.sum(axis=0, dtype=np.float64) + 0.5) / (total + 1.0)  # never exactly 0 or 1
    rate = (k + prior_strength * m[None, :]) / (n_i[:, None] + prior_strength)
    return np.concatenate([np.log(rate) - np.log1p(-rate), np.log1p(n_i)[:, None]], axis=1)


def split_by_time(
    examples: Examples, valid: float = 0.1, test: float = 0.1, *, prior_strength: float = 20.0
) -> tuple[Examples, Examples, Examples]:
    """Time-ordered train / valid / test split, with item priors from the train part attached to all.

    Rows are ordered by (ts, decision); the last ``test`` fraction is the test part, the ``valid``
    fraction before it the validation part. A decision is never split: each cut moves forward to the
    next decision boundary.

    Returns
    -------
    (train, valid, test) :class:`Examples`, each with ``item_priors = item_priors(train)``.
    """
    for name, v in (("valid", valid), ("test", test)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {v!r}")
    if valid + test >= 1.0:
        raise ValueError(f"valid + test must be < 1; got {valid + test!r}")
    n = len(examples)
    order = np.lexsort((examples.decision, examples.ts))
    dec = examples.decision[order]
    boundary = np.flatnonzero(np.r_[True, dec[1:] != dec[:-1]])  # first row of each decision run

    def cut(frac: float) -> int:
        c = int(round(n * frac))
        j = np.searchsorted(boundary, c, side="left")
        return int(boundary[j]) if j < boundary.shape[0] else n

    c1, c2 = cut(1.0 - valid - test), cut(1.0 - test)
    train = examples.subset(order[:c1])
    priors = item_priors(train, prior_strength)
    return (
        train.with_priors(priors),
        examples.subset(order[c1:c2]).with_priors(priors),
        examples.subset(order[c2:]).with_priors(priors),
    )
