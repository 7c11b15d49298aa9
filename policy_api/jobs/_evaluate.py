"""Offline evaluation of what would be *served*: a temporal split of the log, each held-out user's
homepage built by the engine's own machinery under each scorer, scored against the user's future
positives.

The page of a user under a scorer is the one the engine would build with the plan's prices and the
tilt switched off: the same candidate pool (each category's head plus a seeded draw from its rest,
identical for every scorer), the same block table and candidate layouts, and the layout of highest
expected value among the tilt-0 candidates (``v(u, l)``, unpriced: the prices are in the scorer's
units, which baselines do not share). Its items, slot by slot, are the page; its size is
``slots x items_per_module``.

Split: the events of the log (or of an imported history) in time order; the first ``train_share`` of
them is the past that every scorer is fitted on, the rest is the future. A held-out user is one with
a positive event (an event type of weight > 0 in the config) in the future on an item they had no
positive event with in the past; those items are the user's future positives. With ``exclude_seen``
(the default) the items of the user's past positive events go to the bottom of their category's
ranking for every scorer alike (a page that repeats what the user already chose cannot recall a new
positive); ``exclude_seen=False`` judges the scores exactly as they are.

Exposure: in a log where the client reports what it showed (``impression`` events), a future positive
needs the item to have been shown, and popularity-led exposure shows some items far more than others:
counted as they are, the positives reward a page for what was shown as well as for what users prefer.
There the report adds recall and NDCG with each positive weighted by the inverse of its item's exposure
propensity over the held-out period (``recall_ipw``, ``ndcg_ipw``; :class:`Exposure`), the
inverse-propensity estimate of Yang et al., "Unbiased offline recommender evaluation for
missing-not-at-random implicit feedback" (RecSys 2018). The propensity is per item: right for a log
whose exposure does not depend on the user (e.g. popularity-led), biased for the engine's own
personalised pages, which is why the publish gate does not use it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy.engine import Engine

import rankers
from allocator import block_table, build_candidates

from .. import registry
from ..engine import EngineState, ScorerHandle, build_state, head_first
from ..errors import InvalidInput
from ..log import Catalog, load_items
from ..registry import ConfigRecord

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["BASELINE_SCORERS", "CATALOG_POPULARITY", "MIN_EXPOSURES", "EvaluationResult", "Exposure", "Holdout",
           "PageScorer", "baseline_scorers", "catalog_page_scorer", "evaluate_pages", "evaluate_served",
           "exposure_of", "fit_baseline", "history_page_scorer", "holdout_split", "log_events", "ranker_page_scorer",
           "served_pages", "with_catalog_popularity"]

#: ``f(user_rows (U,), pools (U, P)) -> scores (U, P)``: a scorer as the page builder calls it
PageScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]

#: the built-in baselines, in the order the report lists them
BASELINE_SCORERS: tuple[str, ...] = ("popularity", "recent_popularity", "category_popularity", "item_knn")
#: the page scorer of the catalog's own popularity column: what the engine serves with no ranker published
CATALOG_POPULARITY = "catalog_popularity"
#: the page scorer of each item's positive rate per reported impression before the holdout: what the
#: engine serves built in once the plan carries item rates (popularity, each head item lifted to its rate)
ITEM_RATE = "item_rate"
#: the baselines the engine serves without publishing anything: the publish gate judges them, and
#: when one of them is the best, nothing is published
BUILT_IN_SCORERS: tuple[str, ...] = (CATALOG_POPULARITY, ITEM_RATE)

#: users scored per chunk by the dense baselines (bounds memory to chunk x n_items floats)
_CHUNK = 512

#: an item's exposure propensity is taken as at least this many of the period's pages: one positive on
#: an item shown once would otherwise outweigh hundreds on the items shown most
MIN_EXPOSURES = 10
#: the least share of a period's positive (page, item) pairs that must carry an explicit impression for
#: the period to count as exposure-logged
MIN_EXPLICIT_SHARE = 0.5


def log_events(db: Engine, catalog: Catalog) -> dict[str, Any]:
    """Every behaviour event of the log on a catalog item: ``user`` (index into ``user_ids``), ``item``
    (catalog row), ``ts`` (epoch seconds), ``type`` (code into ``EVENT_TYPES``)."""
    from ._train import log_training_arrays

    data = log_training_arrays(db, catalog)
    ev = data["events"]
    return {"user": np.asarray(ev["user"], dtype=np.int64), "item": np.asarray(ev["item"], dtype=np.int64),
            "ts": np.asarray(ev["ts"], dtype=np.float64), "type": np.asarray(ev["type"], dtype=np.int64),
            "user_ids": list(data["user_ids"]), "n_users": int(data["n_users"]),
            "impressions": data["impressions"], "events": ev}


@dataclass(frozen=True, eq=False)
class Exposure:
    """What a period of the log showed, from the client's ``impression`` events.

    Attributes
    ----------
    start, end
        Epoch seconds: the period ``[start, end)`` (by the decision's time).
    n_pages
        Decisions in the period with at least one explicit impression.
    propensity
        Shape (n_items,): the share of those pages that showed each item (0 for one never shown).
    explicit_share
        The share of the period's positive (decision, item) pairs that carry an explicit impression.
    """

    start: float
    end: float
    n_pages: int
    propensity: np.ndarray
    explicit_share: float

    def item_weight(self) -> np.ndarray:
        """Shape (n_items,): ``1 / max(propensity, MIN_EXPOSURES / n_pages)``, the weight of a positive
        on each item (:func:`rankers.page_metrics`' ``item_weight``)."""
        return 1.0 / np.maximum(self.propensity, MIN_EXPOSURES / max(self.n_pages, 1))

    def summary(self) -> dict[str, Any]:
        shown = self.propensity > 0
        return {"pages": self.n_pages, "items_shown": int(shown.sum()),
                "explicit_share": round(self.explicit_share, 4), "min_exposures": MIN_EXPOSURES,
                "propensity_p50": float(np.median(self.propensity[shown])) if shown.any() else 0.0,
                "propensity_max": float(self.propensity.max(initial=0.0))}


def exposure_of(data: Mapping[str, Any], event_weights: np.ndarray, start: float, end: float, *,
                n_items: int) -> Exposure | None:
    """The period's :class:`Exposure` from :func:`log_training_arrays`' ``data``, or None when it is
    not exposure-logged: fewer than :data:`MIN_EXPLICIT_SHARE` of its positive (decision, item) pairs
    carry an explicit ``impression`` event (an imported history of choices has none)."""
    imp, ev = data.get("impressions"), data["events"]
    if imp is None or "explicit" not in imp:
        return None
    explicit = np.asarray(imp["explicit"], dtype=bool)
    its = np.asarray(imp["ts"], dtype=np.float64)
    inside = explicit & (its >= start) & (its < end)
    if not inside.any():
        return None
    dec = np.asarray(imp["decision"], dtype=np.int64)[inside]
    item = np.asarray(imp["item"], dtype=np.int64)[inside]
    pages = np.unique(dec)
    pos = np.asarray(event_weights, dtype=np.float64)[np.asarray(ev["type"], dtype=np.int64)] > 0
    # a behaviour event belongs to the page it came from, in the period by the page's time (every such
    # page has an impression row: an impression is a (page, item) pair with any event)
    e_dec, e_item = np.asarray(ev["decision"], dtype=np.int64)[pos], np.asarray(ev["item"], dtype=np.int64)[pos]
    all_dec = np.asarray(imp["decision"], dtype=np.int64)
    page_ts = np.full(int(max(all_dec.max(initial=-1), e_dec.max(initial=-1))) + 1, np.nan)
    page_ts[all_dec] = its
    in_period = (page_ts[e_dec] >= start) & (page_ts[e_dec] < end)
    key_pos = np.unique(e_dec[in_period] * np.int64(n_items + 1) + e_item[in_period])
    if key_pos.size == 0:
        return None
    share = float(np.isin(key_pos, dec * np.int64(n_items + 1) + item).mean())
    if share < MIN_EXPLICIT_SHARE:
        return None
    return Exposure(start=float(start), end=float(end), n_pages=int(pages.size),
                    propensity=np.bincount(item, minlength=n_items)[:n_items] / pages.size,
                    explicit_share=share)


@dataclass(frozen=True, eq=False)
class Holdout:
    """A temporal split of interactions.

    Attributes
    ----------
    cutoff
        Epoch seconds: events before it are the past, from it on the future.
    train_user, train_item, train_ts, train_weight
        Shape (n,): the past positive events (weight = the event type's engagement units, > 0).
    users
        Shape (U,) int64: the held-out users (rows of the log's user index).
    positives
        ``scipy.sparse.csr_array`` (U, n_items): each held-out user's future positives.
    seen
        ``scipy.sparse.csr_array`` (U, n_items): each held-out user's past positives.
    n_users, n_items
        Sizes of the user and item index spaces.
    item_weight
        Shape (n_items,): where the future is exposure-logged, the weight of a future positive on each
        item (:meth:`Exposure.item_weight`) for the exposure-weighted figures reported beside the
        plain ones (``recall_ipw``, ``ndcg_ipw``); None reports the plain ones only.
    """

    cutoff: float
    train_user: np.ndarray
    train_item: np.ndarray
    train_ts: np.ndarray
    train_weight: np.ndarray
    users: np.ndarray
    positives: sp.csr_array
    seen: sp.csr_array
    n_users: int
    n_items: int
    item_weight: np.ndarray | None = None


def holdout_split(user: np.ndarray, item: np.ndarray, ts: np.ndarray, event_type: np.ndarray, *,
                  event_weights: np.ndarray, n_users: int, n_items: int, train_share: float = 0.8,
                  cutoff: float | None = None, max_users: int | None = None, seed: int = 0) -> Holdout:
    """Split events by time and collect the held-out users' future positives.

    Parameters
    ----------
    user, item, ts, event_type
        Shape (n,): the events (user row, item row, epoch seconds, code into ``EVENT_TYPES``).
    event_weights
        Shape (len(EVENT_TYPES),): engagement units per event type; > 0 is a positive.
    train_share
        In (0, 1): the share of events (in time order) before the cutoff; ignored with ``cutoff``.
    cutoff
        The split time itself (events with ``ts < cutoff`` are the past).
    max_users
        Keep at most this many held-out users (a seeded sample); None keeps all.
    """
    import scipy.sparse as sp

    ts = np.asarray(ts, dtype=np.float64)
    n = ts.size
    if n == 0:
        raise InvalidInput("the log has no behaviour events; serve traffic or `homepage import` history first",
                           field="log")
    if cutoff is None:
        if not 0.0 < train_share < 1.0:
            raise InvalidInput(f"train_share must be in (0, 1); got {train_share!r}", field="train_share")
        cutoff = float(np.sort(ts)[min(int(n * train_share), n - 1)])
    w = np.asarray(event_weights, dtype=np.float64)[np.asarray(event_type, dtype=np.int64)]
    pos = w > 0
    past = ts < cutoff
    tr = pos & past
    fut = pos & ~past
    if not tr.any():
        raise InvalidInput(f"no positive event before the cutoff {cutoff!r}; lower the split or import more history",
                           field="train_share")
    seen_all = sp.csr_array((np.ones(int(tr.sum())), (user[tr], item[tr])), shape=(n_users, n_items))
    seen_all.sum_duplicates()
    fut_all = sp.csr_array((np.ones(int(fut.sum())), (user[fut], item[fut])), shape=(n_users, n_items))
    fut_all.sum_duplicates()
    new = fut_all - fut_all.multiply(seen_all > 0)  # future positives on items not already liked
    new.eliminate_zeros()
    users = np.flatnonzero(np.diff(new.indptr) > 0).astype(np.int64)
    if users.size == 0:
        raise InvalidInput(f"no user has a new positive after the cutoff {cutoff!r}; raise the split share or "
                           "wait for more traffic", field="train_share")
    if max_users is not None and users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    return Holdout(cutoff=float(cutoff), train_user=user[tr], train_item=item[tr], train_ts=ts[tr],
                   train_weight=w[tr], users=users, positives=sp.csr_array(new[users]),
                   seen=sp.csr_array(seen_all[users]), n_users=int(n_users), n_items=int(n_items))


def held_in_pools(m: Any, pools: np.ndarray) -> np.ndarray:
    """(U, P) whether ``m`` (a sparse (U, n_items) matrix) holds a positive value at each pool item of
    its user's row, without a dense (U, n_items) copy."""
    c = m.tocsr()
    n = np.int64(c.shape[1])
    key = np.repeat(np.arange(c.shape[0], dtype=np.int64), np.diff(c.indptr)) * n + c.indices
    return np.isin(np.arange(pools.shape[0], dtype=np.int64)[:, None] * n + pools, key[c.data > 0])


#: :func:`_pools` draws at most this many random keys at a time (a large category's rest for thousands
#: of users would otherwise take gigabytes at once)
POOL_KEYS = 2_000_000


def _pools(state: EngineState, n_users: int, seed: int) -> np.ndarray:
    """Shape (U, P): each user's candidate pool as :meth:`DecisionEngine.pool` builds one (the head of
    each category plus a uniform draw without replacement from its rest), vectorised over users."""
    rng = np.random.default_rng(seed)
    parts = []
    for c, items in enumerate(state.by_category):
        h, r = int(state.head_quota[c]), int(state.rest_quota[c])
        parts.append(np.broadcast_to(items[:h], (n_users, h)))
        if r:
            n_rest = items.size - h
            pick = np.empty((n_users, r), dtype=np.int64)
            step = max(1, POOL_KEYS // n_rest)  # users at a time: the same draws as one (n_users, n_rest) call
            for a in range(0, n_users, step):
                keys = rng.random((min(step, n_users - a), n_rest))
                pick[a:a + keys.shape[0]] = np.sort(np.argpartition(keys, r - 1, axis=1)[:, :r], axis=1)
            parts.append(items[h + pick])
    return np.concatenate(parts, axis=1).astype(np.int64)


#: :func:`served_pages` builds the pages of this many users at a time (its block tables and candidates
#: take ~0.25 MB a user with a 600-item pool)
PAGE_USERS = 1000


def served_pages(state: EngineState, scores: np.ndarray, pools: np.ndarray, last: np.ndarray | None = None
                 ) -> np.ndarray:
    """The page the engine would serve for each user: the tilt-0 candidate of highest expected value.

    Parameters
    ----------
    scores
        Shape (U, P): the scorer's units for each user's pool items.
    pools
        Shape (U, P): catalog rows of each user's pool.
    last
        Shape (U, P) bool or None: items ranked below every other of the pool (the user's seen items).

    Returns
    -------
    Shape (U, slots * items_per_module) int64: catalog rows slot by slot, best first in each module;
    -1 where a module shows fewer items.
    """
    U = pools.shape[0]
    if U > PAGE_USERS:  # each user's page depends on that user's row alone
        return np.concatenate([served_pages(state, scores[a:a + PAGE_USERS], pools[a:a + PAGE_USERS],
                                            None if last is None else last[a:a + PAGE_USERS])
                               for a in range(0, U, PAGE_USERS)])
    space = state.space
    P = pools.shape[1]
    cat = state.item_category[pools]
    # the head first at level 0, as serving orders it (engine.head_first)
    rank = head_first(scores, state.is_tail[pools])
    if last is not None:
        rank = np.where(last, rank.min(axis=1, keepdims=True) - 1.0 - np.ptp(rank, axis=1, keepdims=True), rank)
    tbl = block_table(space, scores, cat, state.is_tail[pools], state.tail[pools], rank_scores=rank)
    cand = build_candidates(space, tbl, np.zeros(space.n_constraints))
    b0 = int(np.argmin(np.abs(space.tilt_levels)))  # the untilted level (0 in every config's default)
    ok = cand.mask & (cand.tilt == b0)
    ok[~ok.any(axis=1)] = cand.mask[~ok.any(axis=1)]  # no tilt-0 candidate: any real one
    val = np.where(ok, np.nan_to_num(cand.value, nan=-np.inf), -np.inf)
    best = np.argmax(val, axis=1)
    rows = np.arange(U)
    cats = cand.categories[rows, best]  # (U, S)
    blocks = cand.blocks[rows, best]
    tilt = cand.tilt[rows, best]
    C, K = space.category_value.size, space.items_per_module
    counts = np.zeros((U, C), dtype=np.int64)
    np.add.at(counts, (np.repeat(rows, P), cat.ravel()), 1)
    first = np.cumsum(counts, axis=1) - counts
    rank = blocks[:, :, None] * K + np.arange(K)[None, None, :]  # (U, S, K) rank within the category
    have = rank < np.take_along_axis(counts, cats, axis=1)[:, :, None]
    where = np.take_along_axis(first, cats, axis=1)[:, :, None] + np.minimum(rank, P - 1)
    order = tbl.order[rows, tilt]  # (U, P) pool positions sorted by (category, score desc)
    pos = np.take_along_axis(order, np.minimum(where, P - 1).reshape(U, -1), axis=1).reshape(where.shape)
    items = np.where(have, np.take_along_axis(pools, pos.reshape(U, -1), axis=1).reshape(pos.shape), -1)
    return items.reshape(U, -1)


def _dense(score_all: Callable[[np.ndarray], np.ndarray]) -> PageScorer:
    def score(users: np.ndarray, pools: np.ndarray) -> np.ndarray:
        out = np.empty(pools.shape)
        for s in range(0, users.size, _CHUNK):  # chunks of users, each one dense pass
            out[s:s + _CHUNK] = np.take_along_axis(score_all(users[s:s + _CHUNK]), pools[s:s + _CHUNK], axis=1)
        return out
    return score


def history_page_scorer(scorer: rankers.HistoryScorer) -> PageScorer:
    """A fitted :class:`rankers.HistoryScorer` as a page scorer: the same arithmetic it serves with."""
    def score(users: np.ndarray, pools: np.ndarray) -> np.ndarray:
        return scorer.score_pools(users, pools, chunk=_CHUNK)
    return score


def fit_baseline(name: str, user: np.ndarray, item: np.ndarray, ts: np.ndarray, weight: np.ndarray, *,
                 item_category: np.ndarray, n_users: int, half_life_s: float = 14 * 86400.0,
                 type_weights: np.ndarray | None = None) -> rankers.HistoryScorer:
    """One built-in baseline (a name of :data:`BASELINE_SCORERS`) fitted on positive events, as the
    servable :class:`rankers.HistoryScorer` the evaluation judges and serving publishes."""
    if name not in BASELINE_SCORERS:
        raise InvalidInput(f"baseline must be one of {', '.join(BASELINE_SCORERS)}; got {name!r}", field="baselines")
    cat = np.where(item_category >= 0, item_category, 0).astype(np.int64)
    return rankers.HistoryScorer(name, cat, half_life_s=half_life_s, type_weights=type_weights).fit(
        user, item, ts, weight, n_users=n_users)


def baseline_scorers(h: Holdout, item_category: np.ndarray, *, half_life_s: float = 14 * 86400.0,
                     names: Iterable[str] = BASELINE_SCORERS) -> dict[str, PageScorer]:
    """The built-in baselines fitted on the holdout's past positives.

    ``popularity``: past positive units per item; ``recent_popularity``: the same decayed with
    ``half_life_s`` (as :class:`rankers.RecentPopularity`); ``category_popularity``: the user's category
    shares times popularity within the category (as :class:`rankers.CategoryPopularity`); ``item_knn``:
    item-item cosine over co-occurrence (as :class:`rankers.ItemKNN`). Each is the
    :class:`rankers.HistoryScorer` that ``homepage train`` publishes when no trained model beats it.
    """
    out: dict[str, PageScorer] = {}
    for name in names:
        out[name] = history_page_scorer(fit_baseline(
            name, h.train_user, h.train_item, h.train_ts, h.train_weight, item_category=item_category,
            n_users=h.n_users, half_life_s=half_life_s))
    return out


def catalog_page_scorer(popularity: np.ndarray) -> PageScorer | None:
    """The catalog's popularity column as a page scorer (the same score for every user), or None when
    the catalog gives no popularity (all zero)."""
    pop = np.asarray(popularity, dtype=np.float64)
    if not (pop > 0).any():
        return None

    def score(users: np.ndarray, pools: np.ndarray) -> np.ndarray:
        return pop[pools]
    return score


def with_catalog_popularity(scorers: dict[str, PageScorer], popularity: np.ndarray) -> list[str]:
    """Add the catalog's popularity column to ``scorers`` as :data:`CATALOG_POPULARITY` (what the engine
    serves with nothing published), when the catalog has one; returns the baselines' names."""
    prior = catalog_page_scorer(popularity)
    if prior is None:
        return list(BASELINE_SCORERS)
    scorers[CATALOG_POPULARITY] = prior
    return [*BASELINE_SCORERS, CATALOG_POPULARITY]


def _as_of_cutoff(scorer: Any, ev: Mapping[str, Any], h: Holdout, item_category: np.ndarray,
                  event_weights: np.ndarray, popularity: np.ndarray) -> rankers.HistoryScorer | None:
    """A published :class:`rankers.HistoryScorer` refitted on the log before the holdout's cutoff
    (None for another scorer, one whose snapshot is not newer than the cutoff, or one whose
    coefficients do not fit this catalog's categories)."""
    if not isinstance(scorer, rankers.HistoryScorer) or scorer.t_ref_ < h.cutoff:
        return None
    if scorer.kind == CATALOG_POPULARITY:  # the catalog's column (as now) over the history before the cutoff
        cat = np.where(item_category >= 0, item_category, 0).astype(np.int64)
        return rankers.HistoryScorer(CATALOG_POPULARITY, cat, item_popularity=popularity).fit(
            h.train_user, h.train_item, h.train_ts, h.train_weight, n_users=h.n_users)
    if scorer.kind != "residual" or scorer.coef is None:
        if scorer.kind not in BASELINE_SCORERS:
            return None
        return fit_baseline(scorer.kind, h.train_user, h.train_item, h.train_ts, h.train_weight,
                            item_category=item_category, n_users=h.n_users, half_life_s=scorer.half_life_s)
    from ._train import residual_scorer

    try:
        return residual_scorer(ev, item_category, scorer.coef, scorer.pop_exponent, event_weights, before=h.cutoff,
                               half_life_days=scorer.half_life_s / 86400.0)
    except ValueError:  # coefficients of another set of categories: judged as stored
        return None


def ranker_page_scorer(handle: ScorerHandle, user_ids: list[str]) -> PageScorer:
    """A ranker (published, or a candidate) as a page scorer: log user rows are mapped to the model's
    user index by id (unknown users score as cold starts)."""
    model_row = np.array([handle.user_idx(str(u)) for u in user_ids], dtype=np.int64)

    def score(users: np.ndarray, pools: np.ndarray) -> np.ndarray:
        u = np.repeat(model_row[users], pools.shape[1])
        return handle.score_pairs(u, pools.ravel()).reshape(pools.shape)
    return score


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    """Served-page metrics per scorer and paired-bootstrap differences against the best baseline.

    ``rows``: one dict per scorer: ``scorer``, ``hr``, ``recall``, ``ndcg`` (means over the held-out
    users, at the page size), ``coverage``, ``long_tail_share``, ``score_s``. ``diffs``: one dict per
    (scorer other than the best baseline, metric in hr/recall/ndcg) with :func:`rankers.paired_bootstrap`'s
    ``mean_diff``, ``ci_low``, ``ci_high``, ``p_value`` (scorer minus best baseline). ``per_user``:
    the per-user recall and NDCG of each scorer (for plots).
    """

    rows: list[dict[str, Any]]
    diffs: list[dict[str, Any]]
    best_baseline: str
    page_size: int
    n_users: int
    cutoff: float
    n_train_events: int
    per_user: dict[str, dict[str, np.ndarray]] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def row(self, scorer: str) -> dict[str, Any]:
        for r in self.rows:
            if r["scorer"] == scorer:
                return r
        raise KeyError(f"scorer must be one of {[r['scorer'] for r in self.rows]}; got {scorer!r}")

    def diff(self, scorer: str, metric: str = "recall") -> dict[str, Any]:
        for d in self.diffs:
            if d["scorer"] == scorer and d["metric"] == metric:
                return d
        raise KeyError(f"no difference for scorer {scorer!r} and metric {metric!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"best_baseline": self.best_baseline, "page_size": self.page_size, "n_users": self.n_users,
                "cutoff": self.cutoff, "n_train_events": self.n_train_events, "scorers": self.rows,
                "differences_vs_best_baseline": self.diffs, **({"info": self.info} if self.info else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=float)

    def table(self) -> str:
        k = self.page_size
        ipw = all("recall_ipw" in r for r in self.rows)
        lines = [f"served-page evaluation: {self.n_users} held-out users, page of {k} items, "
                 f"cutoff {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(self.cutoff))} UTC, "
                 f"{self.n_train_events} past positive events",
                 f"{'scorer':<22} {'HR@' + str(k):>8} {'Recall@' + str(k):>10} {'NDCG@' + str(k):>9} "
                 f"{'coverage':>9} {'tail':>6}   recall vs {self.best_baseline} [95% CI]"
                 + ("   IPW recall / NDCG" if ipw else "")]
        for r in self.rows:
            s = r["scorer"]
            if s == self.best_baseline:
                vs = "(best baseline)"
            else:
                d = self.diff(s, "recall")
                vs = f"{d['mean_diff']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
            lines.append(f"{s:<22} {r['hr']:>8.4f} {r['recall']:>10.4f} {r['ndcg']:>9.4f} {r['coverage']:>9.4f} "
                         f"{r['long_tail_share']:>6.3f}   {vs}"
                         + (f"   {r['recall_ipw']:.4f} / {r['ndcg_ipw']:.4f}" if ipw else ""))
        return "\n".join(lines)


def evaluate_pages(state: EngineState, h: Holdout, scorers: Mapping[str, PageScorer], *,
                   baselines: Iterable[str] = BASELINE_SCORERS, exclude_seen: bool = True, n_boot: int = 1000,
                   seed: int = 0, progress: Callable[[str], None] | None = None) -> EvaluationResult:
    """Build every scorer's served pages for the holdout's users and score them.

    ``baselines`` names the scorers among ``scorers`` the others are compared with: the one of highest
    mean recall (NDCG breaks a tie) is the best baseline. ``progress(name)`` is called after each scorer.
    """
    names = list(scorers)
    base = [b for b in baselines if b in scorers]
    if not base:
        raise InvalidInput(f"baselines must name at least one of the scorers {names}; got {list(baselines)}",
                           field="baselines")
    U = h.users.size
    pools = _pools(state, U, seed)
    seen_pool = held_in_pools(h.seen, pools) if exclude_seen else None
    metrics: dict[str, dict[str, np.ndarray]] = {}
    rows = []
    for name in names:
        t0 = time.perf_counter()
        sc = np.asarray(scorers[name](h.users, pools), dtype=np.float64)
        if sc.shape != pools.shape or not np.isfinite(sc).all():
            raise ValueError(f"scorer {name!r} must return finite scores of shape {pools.shape}; got {sc.shape}")
        if seen_pool is not None:  # below every unseen item of the user's pool
            sc = np.where(seen_pool, sc.min(axis=1, keepdims=True) - 1.0 - np.abs(sc).max(axis=1, keepdims=True),
                          sc)
        pages = served_pages(state, sc, pools, last=seen_pool)
        m = rankers.page_metrics(pages, h.positives, n_items=h.n_items, is_tail=state.is_tail)
        metrics[name] = m
        row = {"scorer": name, "hr": float(np.mean(m["hit"])), "recall": float(np.mean(m["recall"])),
               "ndcg": float(np.mean(m["ndcg"])), "coverage": rankers.coverage(pages, h.n_items),
               "long_tail_share": float(np.nanmean(m["long_tail_share"]))}
        if h.item_weight is not None:
            mw = rankers.page_metrics(pages, h.positives, n_items=h.n_items, item_weight=h.item_weight)
            row.update(recall_ipw=float(np.mean(mw["recall"])), ndcg_ipw=float(np.mean(mw["ndcg"])))
        rows.append({**row, "score_s": time.perf_counter() - t0})
        if progress is not None:
            progress(name)
    # highest recall; a tie (a page that holds nearly every future positive) goes to the higher NDCG
    best = max(base, key=lambda b: (float(metrics[b]["recall"].mean()), float(metrics[b]["ndcg"].mean())))
    diffs = []
    for name in names:
        if name == best:
            continue
        for metric in ("hit", "recall", "ndcg"):
            d = rankers.paired_bootstrap(metrics[name][metric], metrics[best][metric], n_boot=n_boot, seed=seed)
            diffs.append({"scorer": name, "metric": "hr" if metric == "hit" else metric, "vs": best,
                          **{k: d[k] for k in ("mean_diff", "ci_low", "ci_high", "p_value")}})
    per_user = {n: {"recall": metrics[n]["recall"], "ndcg": metrics[n]["ndcg"]} for n in names}
    info = {"recall_ipw": "recall and NDCG with each positive weighted by the inverse of its item's exposure "
                          "propensity over the held-out period"} if h.item_weight is not None else {}
    return EvaluationResult(rows=rows, diffs=diffs, best_baseline=best, page_size=state.space.n_slots * state.space.items_per_module, n_users=int(U),
                            cutoff=h.cutoff, n_train_events=int(h.train_item.size), per_user=per_user, info=info)


def evaluate_served(db: Engine, config: ConfigRecord, *, train_share: float = 0.8, max_users: int | None = 5000,
                    half_life_days: float = 14.0, include_model: bool = True, exclude_seen: bool = True,
                    n_boot: int = 1000, seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> EvaluationResult:
    """``homepage evaluate``: the temporal holdout of the log, the built-in baselines (the catalog's
    popularity column among them, when it has one) and the published ranker (if any), each scorer's
    served pages scored against the held-out users' future positives.

    A published history scorer (the residual ranker, or a baseline published in its place) whose
    snapshot is newer than the cutoff is judged as of the cutoff: its parameters (the residual's
    coefficients and dial, a baseline's kind) on the history before it, as the publish gate judges a
    candidate; its own snapshot holds the held-out events, which would count as already seen. The
    torch ranker is judged as it is stored: if it was trained on events after the cutoff its figures
    are optimistic (the publish gate avoids this by judging a model trained before it).
    """
    if not half_life_days > 0:
        raise InvalidInput(f"half_life_days must be > 0; got {half_life_days!r}", field="half_life_days")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InvalidInput(f"n_boot must be an int >= 1; got {n_boot!r}", field="n_boot")
    if max_users is not None and max_users < 1:
        raise InvalidInput(f"max_users must be >= 1 (or None for all); got {max_users!r}", field="max_users")
    cfg = config.config
    catalog = Catalog.from_arrays(load_items(db))
    if catalog.n_items == 0:
        raise InvalidInput("the catalog is empty; load one with `homepage catalog load items.csv`", field="catalog")
    ev = log_events(db, catalog)
    h = holdout_split(ev["user"], ev["item"], ev["ts"], ev["type"], event_weights=cfg.event_weight_vector(),
                      n_users=max(ev["n_users"], 1), n_items=catalog.n_items, train_share=train_share,
                      max_users=max_users, seed=seed)
    exposure = exposure_of(ev, cfg.event_weight_vector(), h.cutoff, np.inf, n_items=catalog.n_items)
    if exposure is not None:
        h = replace(h, item_weight=exposure.item_weight())
    state = build_state(cfg, catalog)
    scorers = baseline_scorers(h, state.item_category, half_life_s=half_life_days * 86400.0)
    base = with_catalog_popularity(scorers, catalog.popularity)
    info: dict[str, Any] = {"train_share": train_share, "half_life_days": half_life_days,
                            "exclude_seen": exclude_seen, "config_version": config.version,
                            "exposure": None if exposure is None else exposure.summary()}
    if include_model:
        rec = registry.model(db, "ranker")
        if rec is not None and rec.artifact is not None:
            from ..engine import ranker_scorer

            handle = ranker_scorer(rec, catalog)
            as_of = _as_of_cutoff(handle.scorer, ev, h, state.item_category, cfg.event_weight_vector(),
                                  catalog.popularity)
            if as_of is not None:
                scorers[handle.name] = history_page_scorer(as_of)
                info["ranker_judged"] = "as of the cutoff (its parameters on the history before it)"
            else:
                scorers[handle.name] = ranker_page_scorer(handle, ev["user_ids"])  # e.g. residual:3, ranker:2
                info["ranker_judged"] = "as stored"
            info["ranker_version"] = rec.version
    res = evaluate_pages(state, h, scorers, baselines=base, exclude_seen=exclude_seen, n_boot=n_boot, seed=seed,
                         progress=progress)
    return EvaluationResult(res.rows, res.diffs, res.best_baseline, res.page_size, res.n_users, res.cutoff,
                            res.n_train_events, res.per_user, {**res.info, **info})

