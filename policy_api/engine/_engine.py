"""The decision engine: the composition root of rankers, allocator and bandits for one request.

user_id -> scorer (rankers) -> candidate pool -> block table -> candidate layouts (allocator)
        -> dual-adjusted scores (plan prices) -> pmf (bandit, within the exploration budget)
        -> draw seeded by the request id -> served layout + decision row for the log.

An :class:`EngineState` is immutable; serving swaps the whole state atomically when a new config,
plan or model version is published. Anything failing upstream yields the state's safe default layout,
marked ``fallback`` with the reason, never an error.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from typing import Any, Protocol

import numpy as np
import orjson

from allocator import (
    BlockTable,
    HomepageConfig,
    LayoutSpace,
    block_table,
    build_candidates,
    exploit_pmf,
    exploitable,
    layout_items,
    long_tail,
    serving_pmf,
    showable,
    warm_kernels,
    window_correction,
)
from bandits import VWLayoutBandit, sample
from rankers import PopularityScorer, live_category_preferences, live_score_multiplier

from ..live._state import Forget
from ..live._transfer import ShiftMap
from ..log import N_CANDIDATES_KEY, Catalog, decode_candidates
from ._features import layout_features, shared_features
from ._ids import seed_of

__all__ = ["CALIBRATION_PRIOR", "ITEM_LIFT_PRIOR", "ITEM_LIFT_RANGE", "curve_rate", "head_first", "item_lift", "item_lift_of", "with_item_lift", "REPEAT_LIFT_RANGE", "repeat_lift", "SKIP_DEMOTION", "calibrated", "calibration_rates", "category_calibration", "group_calibration", "Decision", "DecisionEngine", "EngineState", "LiveSignals", "Scorer", "ScorerHandle",
           "NEW_ITEM_IMPRESSIONS", "build_state", "measured_items", "swap_in_new_items", "with_new_items"]


#: up to this many element pairs, :func:`member` compares every pair (no sort; the request path's sets
#: are a few to a few hundred items, where ``np.isin``'s sort costs 5-10 times more)
_MEMBER_PAIRS = 1 << 16


def member(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``np.isin(a, b)`` (shape of ``a``), without its sort when the arrays are small."""
    a, b = np.asarray(a), np.ravel(b)
    if a.size * b.size > _MEMBER_PAIRS:
        return np.isin(a, b)
    return (a[..., None] == b).any(axis=-1)

log = logging.getLogger("homepage.engine")


class Scorer(Protocol):
    """What the engine needs from a ranker: the popularity scorer, or a published ``RankerScorer``."""

    def score(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray: ...

    def score_pairs(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray: ...

    def category_preferences(self, user_idx: int) -> np.ndarray | None: ...


@dataclass(frozen=True)
class ScorerHandle:
    """A scorer plus the id mappings it was trained with (catalog rows -> model rows)."""

    scorer: Scorer
    user_index: dict[str, int] = field(default_factory=dict)
    item_remap: np.ndarray | None = None  # (n_catalog,) model item index, -1 if unknown to the model
    name: str = "popularity"

    def user_idx(self, user_id: str) -> int:
        return self.user_index.get(user_id, -1)

    def score(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray:
        if self.item_remap is None:
            return np.asarray(self.scorer.score(user_idx, item_idx), dtype=np.float64)
        mapped = self.item_remap[item_idx]
        known = mapped >= 0
        out = np.zeros(mapped.size)
        out[known] = self.scorer.score(user_idx, mapped[known])
        if not known.all():  # items newer than the model: the median of the user's known scores
            out[~known] = np.median(out[known]) if known.any() else 0.0
        return out

    def score_pairs(self, user_idx: np.ndarray, item_idx: np.ndarray) -> np.ndarray:
        """Units for (user, item) pairs, shapes (n,) -> (n,), batched (planning, replay)."""
        if self.item_remap is None:
            return np.asarray(self.scorer.score_pairs(user_idx, item_idx), dtype=np.float64)
        mapped = self.item_remap[item_idx]
        known = mapped >= 0
        out = np.zeros(mapped.size)
        out[known] = self.scorer.score_pairs(np.asarray(user_idx)[known], mapped[known])
        if not known.all():
            out[~known] = np.median(out[known]) if known.any() else 0.0
        return out

    def category_preferences(self, user_idx: int) -> np.ndarray | None:
        prefs = self.scorer.category_preferences(user_idx)
        return None if prefs is None else np.asarray(prefs, dtype=np.float64)

    def score_user(self, user_idx: int, item_idx: np.ndarray, live: LiveSignals | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None, bool, np.ndarray | None]:
        """Scores (n,) of one user's candidates, the user's category preferences, whether live sequences
        reached the scorer, and which candidates the scorer put last (what the user already engaged
        with, where a history scorer demotes it; None: none), from one user pass.

        A published ranker scores with the user's live sequences (recent plays and skips, newest
        first, ahead of the training snapshot), on its numpy fast path; a user unknown to the model is
        scored from the live events alone. A history scorer (a baseline the gate published, or the
        residual ranker) adds the live positives to its snapshot of the user's history. Other scorers
        score as :meth:`score`.
        """
        score_live = getattr(self.scorer, "score_live", None)
        if score_live is not None:
            return self._score_history(score_live, user_idx, item_idx, live)
        user_side = getattr(self.scorer, "user_side", None)
        if user_side is None:
            return self.score(user_idx, item_idx), self.category_preferences(user_idx), False, None
        sc: Any = self.scorer
        remap = self.item_remap
        used_live = False
        seq = None
        if live is not None and live.status == "hit" and (live.positives.size or live.negatives.size):
            pos, neg = live.positives, live.negatives
            types = live.positive_types
            if remap is not None:
                pos, neg = remap[pos], remap[neg]
                keep = pos >= 0
                pos, types, neg = pos[keep], types[keep], neg[neg >= 0]
            used_live = bool(pos.size or neg.size)
            if used_live:
                seq = sc.sequences(user_idx, pos, types, neg, (live.n_positive, live.n_negative))
        side = user_side(user_idx, seq)
        fast = sc.fast()
        if remap is None:
            scores = np.asarray(fast.score(side, item_idx), dtype=np.float64)
        else:
            mapped = remap[item_idx]
            known = mapped >= 0
            if known.all():
                scores = fast.score(side, mapped)
            else:  # items newer than the model: the median of the user's known scores
                scores = np.zeros(mapped.size)
                scores[known] = fast.score(side, mapped[known])
                scores[~known] = np.median(scores[known]) if known.any() else 0.0
        return scores, fast.category_preferences(side), used_live, None

    def _score_history(self, score_live: Any, user_idx: int, item_idx: np.ndarray, live: LiveSignals | None
                       ) -> tuple[np.ndarray, None, bool, np.ndarray | None]:
        """A history scorer (``rankers.HistoryScorer``): the user's live positives join the training
        snapshot, and what the user already engaged with goes below every other candidate."""
        pos = types = None
        if live is not None and live.status == "hit" and live.positives.size:
            pos, types = live.positives, live.positive_types
            if self.item_remap is not None:
                mapped = self.item_remap[pos]
                pos, types = mapped[mapped >= 0], types[mapped >= 0]
        used_live = pos is not None and bool(pos.size)
        seen = np.zeros(len(item_idx), dtype=bool)
        if self.item_remap is None:
            out = np.asarray(score_live(user_idx, item_idx, pos, types, seen_out=seen), dtype=np.float64)
            return out, None, used_live, seen if seen.any() else None
        mapped = self.item_remap[item_idx]
        known = mapped >= 0
        out = np.zeros(mapped.size)
        got = np.zeros(int(known.sum()), dtype=bool)
        out[known] = score_live(user_idx, mapped[known], pos, types, seen_out=got)
        seen[known] = got
        if not known.all():  # items newer than the scorer: the median of the user's known scores
            out[~known] = np.median(out[known]) if known.any() else 0.0
        return out, None, used_live, seen if seen.any() else None


@dataclass(frozen=True, slots=True)
class LiveSignals:
    """What the live state says about one user at decision time.

    ``status``: ``"hit"`` (state read, events seen), ``"cold"`` (no state yet) or ``"timeout"`` (the
    state store did not answer within its deadline: treated as cold, and the decision says so).
    """

    status: str
    engagement: np.ndarray  # (C,) decayed engagement units by config category
    negatives: np.ndarray  # catalog indices of items the user recently skipped, newest first
    n_events: int = 0
    #: catalog indices of the recent positive events, newest first, and their ``rankers.EVENT_TYPES`` codes
    positives: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    positive_types: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    n_positive: int = 0  # positive and negative events ever applied to the state
    n_negative: int = 0
    #: (C,) decayed examined impressions by config category (None: the state counts none)
    impressions: np.ndarray | None = None
    #: (C,) engagement and examined impressions before the last population shift (None: none)
    before: tuple[np.ndarray, np.ndarray] | None = None

    @classmethod
    def cold(cls, n_categories: int, status: str = "cold") -> LiveSignals:
        return cls(status, np.zeros(n_categories), np.zeros(0, dtype=np.int64))


#: a recently skipped item's score is multiplied by this (the negative feedback sequence)
SKIP_DEMOTION = 0.2


#: impressions of evidence that count as much as the scorer's own estimate of a category's engagement
CALIBRATION_PRIOR = 200.0


def _top_means(scores: np.ndarray, group: np.ndarray, n_groups: int, top: int) -> np.ndarray:
    """(n_groups,) mean score of each group's ``top`` best-scored items (0 for an empty group)."""
    p = np.zeros(n_groups)
    for g in range(n_groups):  # a handful of groups (categories, or their heads and tails)
        s = np.sort(scores[group == g])[::-1][:top]
        p[g] = float(s.mean()) if s.size else 0.0
    return p


def category_calibration(scores: np.ndarray, item_category: np.ndarray, rates: np.ndarray, top: int,
                         prior: float = CALIBRATION_PRIOR, base: np.ndarray | None = None,
                         shown: np.ndarray | None = None) -> np.ndarray:
    """Shape (C,): per-category multipliers that bring a scorer's predicted engagement of the items it
    would show in each category in line with the engagement observed there.

    ``m_c = (U_c + k g p_c) / ((I_c + k) p_c)``, floored at ``g / 100``: ``U_c``, ``I_c`` the observed
    units and impressions of category ``c``, ``p_c`` the mean score of its ``top`` best-scored items,
    ``g = sum U / sum I p`` the observed-to-predicted ratio over all categories and ``k`` = ``prior``
    impressions. A category with no data keeps the common factor ``g`` (no change between categories);
    one with many impressions gets its own ratio ``U_c / (I_c p_c)``. With ``base`` (C,), category
    ``c`` is shrunk toward ``base[c]`` instead of ``g`` (and floored at ``base[c] / 100``): the head and
    tail of one category are shrunk toward that category's own multiplier. With ``shown`` (C,), the
    mean score of the items each category actually showed (per examined impression), ``p_c`` is that
    instead, where it is positive.

    Examples
    --------
    >>> scores = np.array([2.0, 2.0, 1.0, 1.0]); cat = np.array([0, 0, 1, 1])
    >>> category_calibration(scores, cat, np.array([[10.0, 100.0], [0.0, 0.0]]), top=2, prior=100.0).round(3).tolist()
    [0.05, 0.05]
    >>> category_calibration(scores, cat, np.array([[40.0, 100.0], [10.0, 100.0]]), top=2, prior=1e-9).round(3).tolist()
    [0.2, 0.1]
    """
    C = rates.shape[0]
    p = _top_means(scores, item_category, C, top)
    if shown is not None:
        p = np.where(shown > 0, shown, p)
    units, imps = rates[:, 0].astype(np.float64), rates[:, 1].astype(np.float64)
    have = p > 0
    denom = float((imps * p)[have].sum())
    if not have.any() or denom <= 0:
        return np.ones(C)
    g = max(float(units[have].sum()) / denom, 1e-12)
    toward = np.full(C, g) if base is None else np.maximum(np.asarray(base, dtype=np.float64), 1e-12)
    m = toward.copy()
    m[have] = (units[have] + prior * toward[have] * p[have]) / ((imps[have] + prior) * p[have])
    return np.maximum(m, toward / 100.0)


@dataclass(frozen=True)
class EngineState:
    config: HomepageConfig
    catalog: Catalog
    space: LayoutSpace
    item_category: np.ndarray  # (n_items,) config category index, -1 = not served
    is_tail: np.ndarray  # (n_items,)
    tail: np.ndarray  # (n_items,)
    by_category: tuple[np.ndarray, ...]  # item indices per category, most popular first
    head_quota: np.ndarray  # (C,) items taken from the top of each category
    rest_quota: np.ndarray  # (C,) items drawn from the rest of each category per request
    scorer: ScorerHandle
    prices: np.ndarray  # (K,)
    bandit: VWLayoutBandit | None  # None: epsilon-greedy within the budget
    versions: dict[str, Any]
    fallback_modules: list[dict[str, Any]]
    new_categories: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # config indices
    # categories the plan's calibration holds too few examined impressions of to price (see
    # UNEXPLORED_IMPRESSIONS): each request offers a layout led by one of them, and the exploration
    # budget sends part of its traffic there
    unexplored_categories: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    population_prefs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (C,) category shares of popularity
    # the config's module ids and category names as object arrays (the logged candidates name them)
    module_id_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    category_name_array: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    # (n_items,) score multipliers from the plan's calibration, per category head and tail (see
    # :func:`calibrated`); None: none
    score_multiplier: np.ndarray | None = None
    score_offset: np.ndarray | None = None  # (n_items,) added after the multiplier (net-negative groups)
    # (C,) engagement units per examined impression of each category's head over the calibration's traffic,
    # and (C,) the mean score a user the scorer knows nothing of gets on each category's top items (see
    # :func:`live_rate_factors`); None: no calibration (or the torch ranker)
    category_rate: np.ndarray | None = None
    category_top: np.ndarray | None = None
    # (C,) what a user's recent positives earn when shown to that user again, over what the items earn
    # from anyone (see :func:`repeat_lift`); None: not measured (serving leaves them as scored)
    repeat_lift: np.ndarray | None = None
    # (n_items,) each item's rank in its category by popularity (0 = the most popular); -1 = not served
    category_rank: np.ndarray | None = None
    # (K,) d share / d price of each constraint under the served softmax (the pacer's, see
    # allocator.window_correction); None: the plan carries none, and serving does not steer its window
    price_slope: np.ndarray | None = None
    # (n_items,) each item's own engagement over what its score and group predict (see :func:`item_lift`;
    # 1 = no evidence); None: not measured
    item_lift: np.ndarray | None = None
    # per category, its best long-tail items outside its pool head, best first: the first places of the
    # category's pool draw (see :func:`with_item_lift`)
    tail_lead: tuple[np.ndarray, ...] = ()
    # per category, a flag per position of its pool's rest (past its head): the item there leads the draw
    tail_lead_rest: tuple[np.ndarray, ...] = ()
    # the population shift the loop detected last: live states older than it keep part of their category
    # sums (see policy_api.live.Forget); None: none detected
    forget: Forget | None = None
    # what a user's category rates before that shift say about them now (fitted by the loop on the users
    # seen since); None: not fitted, the user's new evidence is shrunk toward the population's rates
    shift_map: ShiftMap | None = None
    # catalog rows of the items added to the catalog after serving began, and when (epoch seconds)
    fresh_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fresh_added: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # those of them not yet measured (the plan's calibration holds fewer than NEW_ITEM_IMPRESSIONS of each):
    # a served module of their category shows one of them now and then (see :func:`swap_in_new_items`)
    new_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    new_added: np.ndarray = field(default_factory=lambda: np.zeros(0))


#: a category with fewer examined impressions than this in the plan's calibration window is unexplored:
#: the engine cannot tell what it is worth (one page leading with it gives a few of them)
UNEXPLORED_IMPRESSIONS = 100.0
#: the share of the exploration budget sent to layouts leading with an unexplored category
UNEXPLORED_SHARE = 0.5
#: a new item stops being explored once the plan's calibration holds this many examined impressions of it
#: (its own rate then outweighs its category's curve two to one, see :data:`ITEM_LIFT_PRIOR`)
NEW_ITEM_IMPRESSIONS = 100.0


def measured_items(rates: Mapping[str, Any], names: tuple[str, ...], index: Mapping[str, int],
                   at_least: float = NEW_ITEM_IMPRESSIONS) -> np.ndarray:
    """Catalog rows of the items a plan's ``calibration`` measured on at least ``at_least`` examined
    impressions (their ``"items"`` exposure; ids not in the catalog are left out).

    Examples
    --------
    >>> r = {"a": {"items": {"ids": ["x", "y", "gone"], "exposure": [150.0, 20.0, 500.0]}}}
    >>> measured_items(r, ("a",), {"x": 0, "y": 1}).tolist()
    [0]
    """
    rows: list[int] = []
    for c in names:
        r = rates.get(c)
        got = r.get("items") if isinstance(r, Mapping) else None
        if not isinstance(got, Mapping) or "ids" not in got or "exposure" not in got:
            continue
        exposure = np.asarray(got["exposure"], dtype=np.float64)
        ids = [str(i) for i, e in zip(got["ids"], exposure.tolist(), strict=True) if e >= at_least]
        rows.extend(k for k in (index.get(i, -1) for i in ids) if k >= 0)
    return np.unique(np.array(rows, dtype=np.int64))


def with_new_items(state: EngineState, rates: Mapping[str, Any] | None) -> EngineState:
    """``state`` with its new items: the fresh ones (added after serving began) that ``rates`` (a plan's
    calibration; None: nothing measured) does not hold :data:`NEW_ITEM_IMPRESSIONS` of yet."""
    keep = np.ones(state.fresh_items.size, dtype=bool)
    if rates and state.fresh_items.size:
        done = measured_items(rates, state.config.category_names, state.catalog.index_of())
        keep = ~np.isin(state.fresh_items, done)
    return replace(state, new_items=state.fresh_items[keep], new_added=state.fresh_added[keep])


def swap_in_new_items(state: EngineState, shown: list[np.ndarray], categories: np.ndarray,
                      rng: np.random.Generator, now: float) -> tuple[list[np.ndarray], list[int]]:
    """The catalog rows each slot shows (``shown``, one array per slot; ``categories`` their config
    category), with new items explored: each module whose category holds a new item (added after serving
    began, unmeasured, younger than ``[exploration] new_item_days``) shows, with chance ``[exploration]
    new_item_share``, one of them (drawn uniformly, never twice on a page) in place of its last item of
    the same kind (head or long tail, where the config bounds the long tail's share, so the page's
    long-tail exposure is the one its layout was priced with). Returns the rows and the items swapped in.

    A new item's score rests on its category's curve at its popularity: a value-greedy module never
    shows it, so it would never be measured. Once the plan's calibration holds
    :data:`NEW_ITEM_IMPRESSIONS` of it, its own rate (:func:`item_lift`) decides where it goes.
    """
    ex = state.config.exploration
    if not state.new_items.size or ex.new_item_share <= 0:
        return shown, []
    alive = state.new_items[(now - state.new_added) < ex.new_item_days * 86400.0]
    if not alive.size:
        return shown, []
    S = len(shown)
    hit = rng.random(S) < ex.new_item_share
    pick = rng.random(S)
    cat = state.item_category[alive]
    out = list(shown)
    # the new items on the page already (shown, or swapped in below): each is shown once at most
    on_page = np.zeros(state.item_category.size, dtype=bool)  # catalog rows: a gather, not a sort
    if S:
        on_page[np.concatenate(shown)] = True
    taken = on_page[alive]
    swapped: list[int] = []
    match_kind = state.space.tail_goal
    for s in np.flatnonzero(hit).tolist():
        row = shown[s]
        free = np.flatnonzero((cat == int(categories[s])) & ~taken)
        if not free.size or not row.size:
            continue
        j = int(alive[free[min(int(pick[s] * free.size), free.size - 1)]])
        same = np.flatnonzero(state.is_tail[row] == state.is_tail[j]) if match_kind else np.arange(row.size)
        if not same.size:
            continue
        row = row.copy()
        row[same[-1]] = j
        out[s] = row
        taken |= alive == j
        swapped.append(j)
    return out, swapped


def unexplored(rates: Mapping[str, Any], names: tuple[str, ...]) -> np.ndarray:
    """Config indices of the categories a plan's ``calibration`` saw fewer than
    :data:`UNEXPLORED_IMPRESSIONS` examined impressions of in its window (its ``"seen"``: the
    impressions it counts also carry earlier measurements and the catalog's prior); none for a
    calibration that does not say."""
    seen: list[float] = []
    for c in names:
        r = rates.get(c)
        got = r.get("seen") if isinstance(r, Mapping) else None
        if got is None:
            return np.zeros(0, dtype=np.int64)
        seen.append(float(np.sum(np.asarray(got, dtype=np.float64))))
    return np.flatnonzero(np.array(seen) < UNEXPLORED_IMPRESSIONS).astype(np.int64)


def calibration_rates(rates: Mapping[str, Any], names: tuple[str, ...]) -> np.ndarray:
    """(C, 2, 2) ``[category, head | tail, units | impressions]`` from a plan's ``calibration``
    (``{category: {"head": [u, i], "tail": [u, i]}}``; an older ``{category: [u, i]}`` applies to both)."""
    out = np.zeros((len(names), 2, 2))
    for k, c in enumerate(names):
        r = rates.get(c)
        if isinstance(r, Mapping):
            out[k, 0], out[k, 1] = r.get("head", (0.0, 0.0)), r.get("tail", (0.0, 0.0))
        elif r is not None:
            out[k, 0] = out[k, 1] = r
    return out


def catalog_prior_rates(state: EngineState, impressions: float = 1e6) -> np.ndarray | None:
    """(C, 2, 2) pseudo calibration rates from the catalog alone, for before any feedback: each (category,
    head | tail) group engages in proportion to the mean popularity of its best ``items_per_module``
    items, the best group at the scorer's own mean score of its top items (its multiplier 1), each group
    counted as ``impressions`` examined impressions so that the prior binds. The popularity scorer
    ranks by popularity rank, which squeezes a category whose best items have a third of another's
    plays to nearly the same score; before the first calibration, the category values alone decided.
    None when the catalog gives no popularity.
    """
    items = np.flatnonzero(state.item_category >= 0)
    pop = state.catalog.popularity[items]
    if not (pop > 0).any():
        return None
    C = len(state.config.category_names)
    group = state.item_category[items] * 2 + state.is_tail[items].astype(np.int64)
    top = state.config.items_per_module
    popular = _top_means(pop, group, 2 * C, top)
    scores = _top_means(state.scorer.score(-1, items), group, 2 * C, top)
    best = int(np.argmax(popular))
    rate = scores[best] * popular / popular[best]
    out = np.zeros((C, 2, 2))
    out[..., 0] = (rate * impressions).reshape(C, 2)
    out[..., 1] = np.where(popular > 0, impressions, 0.0).reshape(C, 2)
    return out


def catalog_prior_calibration(state: EngineState, impressions: float) -> dict[str, dict[str, list[float]]] | None:
    """:func:`catalog_prior_rates` in a plan's ``calibration`` form, each (category, head | tail) group
    counted as ``impressions`` examined impressions, its ``predicted`` the mean score of the group's
    best items (the items a page shows first) times them: what the engine believed of each group before
    any feedback, for :func:`policy_api.jobs.calibration`'s ``previous``. None when the catalog gives no
    popularity."""
    rates = catalog_prior_rates(state, impressions)
    if rates is None:
        return None
    items = np.flatnonzero(state.item_category >= 0)
    C = len(state.config.category_names)
    group = state.item_category[items] * 2 + state.is_tail[items].astype(np.int64)
    top = _top_means(state.scorer.score(-1, items), group, 2 * C, state.config.items_per_module).reshape(C, 2)
    return {c: {"head": rates[k, 0].tolist(), "tail": rates[k, 1].tolist(),
                "predicted": (top[k] * rates[k, :, 1]).tolist()}
            for k, c in enumerate(state.config.category_names)}


def _calibration_field(rates: Mapping[str, Any], names: tuple[str, ...], key: str, width: int) -> np.ndarray | None:
    """(C, width): each category's ``key`` entry of a plan's ``calibration`` (zeros where a category lacks
    it); None when no category has it."""
    out = np.zeros((len(names), width))
    found = False
    for k, c in enumerate(names):
        r = rates.get(c)
        if isinstance(r, Mapping) and r.get(key) is not None:
            out[k] = r[key]
            found = True
    return out if found else None


def calibration_predicted(rates: Mapping[str, Any], names: tuple[str, ...]) -> np.ndarray | None:
    """(C, 2) ``[category, head | tail]``: the scorer's summed scores of the items shown, each times its
    examined impressions, from a plan's ``calibration`` (None when it has none)."""
    return _calibration_field(rates, names, "predicted", 2)


#: examined impressions of the items' own expectation that a category's repeat lift is shrunk toward 1 with
REPEAT_PRIOR_IMPRESSIONS = 200.0
#: the repeat lift is kept within these bounds
REPEAT_LIFT_RANGE = (0.1, 10.0)


def repeat_lift(rates: Mapping[str, Any], names: tuple[str, ...], prior: float = REPEAT_PRIOR_IMPRESSIONS
                ) -> np.ndarray | None:
    """(C,) the repeat lift of each category from a plan's ``calibration`` (``"repeat": [units, expected,
    impressions]``, see ``jobs.repeat_rates``): ``(U + k e) / (E + k e)`` with ``e = E / I`` the expected
    units per examined impression and ``k`` = ``prior`` impressions, so a few repeats move it little; 1
    where the items' expectation is not positive (a category skipped more than played), bounded to
    :data:`REPEAT_LIFT_RANGE`. None when the calibration measured no repeats at all.

    Examples
    --------
    >>> repeat_lift({"a": {"repeat": [30.0, 10.0, 100.0]}, "b": {"repeat": [0.0, 0.0, 0.0]}}, ("a", "b"),
    ...             prior=100.0).round(3).tolist()
    [2.0, 1.0]
    """
    rep = _calibration_field(rates, names, "repeat", 3)
    if rep is None or not (rep[:, 2] > 0).any():
        return None
    units, expected, imps = rep[:, 0], rep[:, 1], rep[:, 2]
    e = np.divide(expected, imps, out=np.zeros(len(names)), where=imps > 0)
    ok = (expected > 0) & (e > 0)
    lift = np.divide(units + prior * e, expected + prior * e, out=np.ones(len(names)), where=ok)
    return np.clip(np.where(ok, lift, 1.0), *REPEAT_LIFT_RANGE)


#: examined impressions of an item's own that count as much as its category's curve (see :func:`item_lift`)
ITEM_LIFT_PRIOR = 50.0
#: the item lift is kept within these bounds
ITEM_LIFT_RANGE = (0.25, 4.0)


def head_first(rank: np.ndarray, is_tail: np.ndarray) -> np.ndarray:
    """Rank scores (last axis: a pool) with every long-tail item below every head item, the order within
    each kept: long-tail items reach a module through the tilt's quota only, and at level 0 a module
    shows its category's head (its tail only where the head runs out). The long-tail share is then what
    the allocator chose, not what happened to outscore the head (an item lift, a live tilt).

    Examples
    --------
    >>> head_first(np.array([0.5, 1.0, 0.0]), np.array([False, True, False])).tolist()
    [0.5, -1.0, 0.0]
    """
    rank = np.asarray(rank, dtype=np.float64)
    span = np.ptp(rank, axis=-1, keepdims=True) + 1.0
    return np.where(is_tail, rank - span, rank)


def curve_rate(x: np.ndarray, knots_x: np.ndarray, knots_rate: np.ndarray) -> np.ndarray:
    """A category's curve of item rates over log popularity ``x = log(1 + popularity)`` at ``x``: linear
    between the knots, flat above the last, and below the first in proportion to popularity (``rate_0
    (1 + p) / (1 + p_0)``): an item less popular than every item measured is assumed the worse for it,
    as a popularity prior would, until it is measured itself.

    Examples
    --------
    >>> curve_rate(np.array([np.log(2.0), np.log(3.0), 5.0]), np.array([np.log(4.0), 4.0]), np.array([0.4, 0.6]))
    array([0.2, 0.3, 0.6])
    """
    kx, ky = np.asarray(knots_x, dtype=np.float64), np.asarray(knots_rate, dtype=np.float64)
    out = np.interp(x, kx, ky)
    low = x < kx[0]
    return np.where(low, ky[0] * np.exp(np.minimum(x - kx[0], 0.0)), out)


def item_lift(rates: Mapping[str, Any], state: EngineState, prior: float = ITEM_LIFT_PRIOR) -> np.ndarray | None:
    """:func:`item_lift_of` for ``state``'s catalog and scorer."""
    items = np.flatnonzero(state.item_category >= 0)
    score = np.zeros(state.item_category.size)
    score[items] = np.asarray(state.scorer.score(-1, items), dtype=np.float64)
    return item_lift_of(rates, state.config.category_names, state.catalog.index_of(), state.item_category,
                        state.is_tail, state.catalog.popularity, score, prior, uncapped=state.fresh_items)


def item_lift_of(rates: Mapping[str, Any], names: tuple[str, ...], index: Mapping[str, int],
                 item_category: np.ndarray, is_tail: np.ndarray, popularity: np.ndarray, score: np.ndarray,
                 prior: float = ITEM_LIFT_PRIOR, uncapped: np.ndarray | None = None) -> np.ndarray | None:
    """(n_items,) what each catalog item earns over what a scorer says (``score``: its scores for a user
    it knows nothing of), from a plan's calibration (per category, ``"items": {"ids", "units",
    "exposure", "curve", "scale"}``, see ``jobs.item_rates``).

    An item's rate is ``r = (y + k f) / (A + k)``: its positive units ``y`` over its exposure ``A`` (its
    viewers' factors summed over its impressions), shrunk toward its category's curve ``f`` over log
    popularity (knots ``{"x", "rate"}``, :func:`curve_rate`) with ``k`` = ``prior`` impressions; an
    item never shown has its curve. Its lift is ``r / (scale * score)``, ``scale`` its (category, head
    | tail) group's ratio of the two over the group's impressions; the head's lifts, and the long
    tail's apart, are then divided by their mean over the group's measured items (weighted by
    exposure), so that they average 1 on what the group showed and move items within it (which tail
    items a tilted module shows), leaving its level to the groups' calibration. Serving multiplies
    the scorer's scores by it, before anything else: the plan's calibration of the groups is measured
    on the lifted scores. Bounded to :data:`ITEM_LIFT_RANGE` (an item earns at most 4 times, at least a
    quarter of, what its score says); 1 where the score is not positive, in a group with no measured
    item and where the category carries no rates. None when no category does.

    ``uncapped``: catalog rows whose lift has no upper bound and that do not count toward their group's
    level: the items loaded after serving began, whose catalog popularity (and so score) says nothing of
    them. A new release measured to earn like the head must be able to rise that far.

    Examples
    --------
    Item x shown 50 times earned 30 units, y never shown has the curve's 0.1, z is in the long tail
    (where nothing was measured):

    >>> r = {"a": {"items": {"ids": ["x"], "units": [30.0], "exposure": [50.0],
    ...                      "curve": {"x": [0.0], "rate": [0.1]}, "scale": [1.0, 1.0]}}}
    >>> item_lift_of(r, ("a",), {"x": 0, "y": 1, "z": 2}, np.array([0, 0, 0]), np.array([False, False, True]),
    ...              np.ones(3), np.array([0.5, 0.5, 0.5]), prior=50.0).round(3).tolist()
    [1.0, 0.286, 1.0]
    """
    out = np.ones(item_category.size)
    x = np.log1p(popularity)
    found = False
    for k, c in enumerate(names):
        r = rates.get(c)
        got = r.get("items") if isinstance(r, Mapping) else None
        if not isinstance(got, Mapping) or not isinstance(got.get("curve"), Mapping):
            continue
        found = True
        mine = np.flatnonzero(item_category == k)
        rate = np.zeros(item_category.size)
        rate[mine] = curve_rate(x[mine], got["curve"]["x"], got["curve"]["rate"])
        row = np.array([index.get(str(i), -1) for i in got["ids"]], dtype=np.int64)
        fine = row >= 0
        fine[fine] = item_category[row[fine]] == k
        row = row[fine]
        units = np.asarray(got["units"], dtype=np.float64)[fine]
        exposure = np.asarray(got["exposure"], dtype=np.float64)[fine]
        rate[row] = (units + prior * rate[row]) / (exposure + prior)
        scale = np.asarray(got["scale"], dtype=np.float64)[is_tail[mine].astype(np.int64)]
        den = scale * score[mine]
        lift = np.zeros(item_category.size)
        lift[mine] = np.where(den > 0, np.divide(rate[mine], den, out=np.ones(mine.size), where=den > 0), 1.0)
        # the head's lifts, and the long tail's apart, average 1 over what the group showed (its measured
        # items, by exposure), so that they move items within the group and leave its level to the
        # groups' calibration. Lifted on the head's scale, the tail's items were worth 2-4 times what
        # they earned (its rates rest on a curve drawn through the head): the long-tail share went far
        # past its floor, each tail item displacing a better head item. A group that showed nothing
        # measured keeps its scores.
        free = np.zeros(item_category.size, dtype=bool)
        if uncapped is not None and uncapped.size:
            free[uncapped] = True
        for tail in (False, True):
            group = is_tail[mine] == tail
            measured = (is_tail[row] == tail) & ~free[row]
            w = exposure[measured]
            level = float(np.average(lift[row[measured]], weights=w)) if w.sum() > 0 else 0.0
            lift[mine] = np.where(group, lift[mine] / level if level > 0 else 1.0, lift[mine])
        out[mine] = np.clip(lift[mine], ITEM_LIFT_RANGE[0], np.where(free[mine], np.inf, ITEM_LIFT_RANGE[1]))
    return out if found else None


def with_item_lift(state: EngineState, lift: np.ndarray | None) -> EngineState:
    """``state`` with item lifts (:func:`item_lift`): serving multiplies each item's score by its lift,
    and each category's pool is ordered by the lifted value (its head is the best items by what they
    earn, not by popularity alone). The category's best long-tail items by value outside the pool head
    take the first half of its pool draw (the rest stays random, so every item keeps a chance to be
    measured), so that the tilted modules show them rather than the draw's chance picks. ``None``
    takes the lifts off."""
    pop = state.catalog.popularity
    # each category by popularity, as build_state orders it (a state that carried lifts before starts
    # from it again)
    popular = [idx[np.lexsort((idx, -pop[idx]))] for idx in state.by_category]
    if lift is None:
        if state.item_lift is None:
            return state
        rank = np.full(state.item_category.size, -1, dtype=np.int64)
        for order in popular:
            rank[order] = np.arange(order.size)
        return replace(state, item_lift=None, by_category=tuple(popular), category_rank=rank, tail_lead=(),
                       tail_lead_rest=())
    items = np.flatnonzero(state.item_category >= 0)
    value = np.zeros(state.item_category.size)
    s = np.asarray(state.scorer.score(-1, items), dtype=np.float64)
    s = np.where(s > 0, s * lift[items], s / lift[items])
    if state.score_multiplier is not None:
        s = s * state.score_multiplier[items]
    value[items] = s if state.score_offset is None else s + state.score_offset[items]
    by_cat, lead, flags = [], [], []
    rank = np.full(state.item_category.size, -1, dtype=np.int64)
    for c, idx in enumerate(popular):
        # by lifted value; ties (items of equal value, none measured) keep their popularity order
        order = idx[np.lexsort((np.arange(idx.size), -value[idx]))]
        by_cat.append(order)
        rank[order] = np.arange(order.size)
        rest = order[int(state.head_quota[c]):]
        best = np.flatnonzero(state.is_tail[rest])[: int(state.rest_quota[c]) // 2]
        lead.append(rest[best])
        flag = np.zeros(rest.size, dtype=bool)
        flag[best] = True
        flags.append(flag)
    return replace(state, item_lift=lift, by_category=tuple(by_cat), category_rank=rank, tail_lead=tuple(lead),
                   tail_lead_rest=tuple(flags))


def calibration_shift(old: np.ndarray, new: np.ndarray, min_impressions: float = 1000.0) -> float:
    """The largest relative change of a (category, head | tail) engagement rate between two
    :func:`calibration_rates` arrays, over the groups with ``min_impressions`` examined impressions in
    both (0 when none has): ``|r_new - r_old| / max(|r_old|, 0.05 * max_g |r_old|)``."""
    ok = (old[..., 1] >= min_impressions) & (new[..., 1] >= min_impressions)
    if not ok.any():
        return 0.0
    r_old = old[..., 0][ok] / old[..., 1][ok]
    r_new = new[..., 0][ok] / new[..., 1][ok]
    floor = max(0.05 * float(np.abs(r_old).max()), 1e-12)
    return float((np.abs(r_new - r_old) / np.maximum(np.abs(r_old), floor)).max())


def calibrated(state: EngineState, rates: np.ndarray | None, predicted: np.ndarray | None = None) -> EngineState:
    """``state`` calibrated by ``rates`` (C, 2, 2): engagement units and examined impressions per
    category, head and long tail apart, seen recently (:func:`calibration_rates`). A popularity scorer
    ranks items within a category well but knows nothing of how much a category is engaged with when
    shown, nor how much less its long tail is; the multipliers are computed once here, from the
    best-scored items of each category's head and tail (the ones pages show first), not per request.
    The same holds for the built-in baselines and the residual ranker a training may publish (their
    scores rank items; they are not engagement units per examined impression). The multi-task torch
    ranker predicts each event's probability, so it is calibrated by its training: it gets none.

    ``predicted`` (C, 2), the scorer's scores of the items each group showed times their examined
    impressions (:func:`calibration_predicted`, computed with this scorer), makes each group's
    multiplier observed units over predicted units of what it showed; without it, the group's
    best-scored items stand for what it showed.
    """
    if rates is None or state.scorer.name.startswith("ranker:"):
        return replace(state, score_multiplier=None, score_offset=None, category_rate=None, category_top=None)
    items = np.flatnonzero(state.item_category >= 0)
    cat = state.item_category[items]
    group = cat * 2 + state.is_tail[items].astype(np.int64)
    scores = state.scorer.score(-1, items)
    if state.item_lift is not None:  # the lift is part of the scorer (see item_lift_of)
        lift = state.item_lift[items]
        scores = np.where(scores > 0, scores * lift, scores / lift)
    r = np.asarray(rates, dtype=np.float64)
    top = state.config.items_per_module
    shown_c = shown_g = None
    if predicted is not None:  # mean score per examined impression of what each group / category showed
        pr = np.asarray(predicted, dtype=np.float64)
        shown_g = np.divide(pr.ravel(), r[..., 1].ravel(), out=np.zeros(pr.size), where=r[..., 1].ravel() > 0)
        shown_c = np.divide(pr.sum(axis=1), r[..., 1].sum(axis=1), out=np.zeros(pr.shape[0]),
                            where=r[..., 1].sum(axis=1) > 0)
    # shrunk toward the common factor
    per_category = category_calibration(scores, cat, r.sum(axis=1), top, shown=shown_c)
    mult, offset = group_calibration(scores, group, r.reshape(-1, 2), top, np.repeat(per_category, 2), shown=shown_g)
    m, o = np.ones(state.item_category.size), np.zeros(state.item_category.size)
    m[items], o[items] = mult[group], offset[group]
    C = r.shape[0]
    # the live state's per-user rates count head items only: compared with the heads' rates
    return replace(state, score_multiplier=m, score_offset=o, category_rate=category_rates(r[:, 0]),
                   category_top=_top_means(scores, cat, C, top))


def category_rates(rates: np.ndarray, prior: float = CALIBRATION_PRIOR) -> np.ndarray | None:
    """Shape (C,): engagement units per examined impression of each category, ``(U_c + k g) / (I_c + k)``
    with ``g = sum U / sum I`` and ``k`` = ``prior`` impressions; None when nothing was shown.

    Examples
    --------
    >>> category_rates(np.array([[30.0, 100.0], [0.0, 0.0]]), prior=100.0).round(3).tolist()
    [0.3, 0.3]
    """
    units, imps = rates[:, 0].astype(np.float64), rates[:, 1].astype(np.float64)
    if not imps.sum() > 0:
        return None
    g = float(units.sum() / imps.sum())
    return (units + prior * g) / (imps + prior)


#: examined impressions of a user's own evidence that count as much as the scorer's belief about how the
#: user engages with a category (the live rate's prior)
LIVE_PRIOR_IMPRESSIONS = 20.0


def live_rate_factors(raw_top: np.ndarray, category_top: np.ndarray, category_rate: np.ndarray,
                      engagement: np.ndarray, impressions: np.ndarray,
                      prior: float = LIVE_PRIOR_IMPRESSIONS, toward: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per category, the user's own engagement rate, and the factor and offset that bring the scorer's
    category level for the user to it.

    The user's evidence, ``U_c`` engagement units over ``I_c`` examined impressions of the live state,
    shrunk toward the category's population rate ``r_c`` with ``k`` = ``prior`` impressions, is the
    user's rate ``rho_c = (U_c + k r_c) / (I_c + k)``. It replaces the scorer's own category level for
    the user, ``t_c = raw_top_c / category_top_c`` (its top items' mean score for this user over the
    same for a user it knows nothing of): where ``r_c > 0`` the items are scaled by
    ``m_c / t_c``, ``m_c = rho_c / r_c`` (at least 0.05), and a user who skips the category more than
    taking it (``rho_c < 0``) gets ``rho_c`` added: showing it is that loss for this user. Where the
    population's rate is not positive (a category skipped more than played, whose calibrated scores
    sit near ``r_c``), ``rho_c - r_c`` is added instead.

    A scorer fitted on the log learns a user's categories from engagement shares, which follow what
    the user was shown (a category never shown is never played); a rate per examined impression does
    not: a category the user was shown often and ignored falls, one shown little and taken rises. The
    scorer still ranks the items inside each category.

    ``toward`` (C,), when given, is what the evidence is shrunk toward instead of ``r_c`` (the user's
    expected rate from before a population shift, :class:`~policy_api.live.ShiftMap`).

    Returns
    -------
    rho, factor, offset
        Shapes (C,): the user's rate, the multiplier of the category's item scores and what is added
        to them.

    Examples
    --------
    >>> rho, f, o = live_rate_factors(np.array([1.0, 2.0, 1.0]), np.ones(3), np.array([0.1, 0.1, -0.05]),
    ...                               np.array([6.0, -6.0, 4.0]), np.array([20.0, 40.0, 20.0]), prior=20.0)
    >>> (rho.round(3).tolist(), f.round(3).tolist(), o.round(3).tolist())
    ([0.2, -0.067, 0.075], [2.0, 0.025, 1.0], [0.0, -0.067, 0.125])
    """
    t = np.clip(np.divide(raw_top, category_top, out=np.ones_like(raw_top), where=category_top > 0), 0.1, 10.0)
    r = category_rate
    rho = (engagement + prior * (r if toward is None else toward)) / (impressions + prior)
    ok = r > 0
    m = np.clip(np.divide(rho, r, out=np.zeros_like(rho), where=ok), -20.0, 20.0)
    factor = np.where(ok, np.maximum(m, 0.05) / t, 1.0)
    offset = np.where(ok, np.minimum(m, 0.0) * r, rho - r)
    return rho, factor, offset


def group_calibration(scores: np.ndarray, group: np.ndarray, rates: np.ndarray, top: int, base: np.ndarray,
                      prior: float = CALIBRATION_PRIOR, shown: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Shapes (G,), (G,): an increasing affine map ``m_g * score + o_g`` per group that brings the
    predicted engagement of its ``top`` best-scored items (mean score ``p_g``) to the observed rate,
    shrunk toward the prior ``base_g * p_g``: ``r_g = (U_g + k base_g p_g) / (I_g + k)``.

    A group engaged with positively is scaled (``m_g = r_g / p_g``, ``o_g = 0``). A group whose rate is
    negative (skipped more than played: its engagement units are net negative) keeps a tiny slope
    ``base_g / 100`` (its items stay ranked as the scorer ranks them) and an offset that puts its mean
    at ``r_g < 0``, so showing it is valued as the loss it is, not as zero. With ``shown`` (G,), the
    mean score per examined impression of the items each group actually showed, ``p_g`` is that
    instead, where it is positive.

    Examples
    --------
    >>> scores = np.array([2.0, 2.0, 1.0, 1.0]); g = np.array([0, 0, 1, 1])
    >>> m, o = group_calibration(scores, g, np.array([[40.0, 100.0], [-10.0, 100.0]]), 2, np.ones(2), prior=1e-9)
    >>> (m.round(3).tolist(), o.round(3).tolist())
    ([0.2, 0.01], [0.0, -0.11])
    """
    p = _top_means(scores, group, rates.shape[0], top)
    if shown is not None:
        p = np.where(shown > 0, shown, p)
    units, imps = rates[:, 0].astype(np.float64), rates[:, 1].astype(np.float64)
    b = np.maximum(np.asarray(base, dtype=np.float64), 1e-12)
    rate = (units + prior * b * p) / (imps + prior)
    have = p > 0
    m = np.where(have & (rate > 0), rate / np.where(have, p, 1.0), b / 100.0)
    m = np.where(have & (rate > 0), np.maximum(m, b / 100.0), m)
    o = np.where(have & (rate <= 0), rate - m * p, 0.0)
    return m, o


@dataclass
class Decision:
    request_id: str
    user_id: str
    ts: float
    policy: str
    versions: dict[str, Any]
    context: dict[str, Any]
    #: the candidates in their stored, columnar form (``{"$n": n, field: [one entry per candidate]}``,
    #: :func:`~policy_api.log.encode_candidates`), built so from the engine's arrays; [] for a fallback
    stored_candidates: dict[str, Any] | list[Any]
    pmf: list[float]
    chosen: int
    propensity: float
    modules: list[dict[str, Any]]
    fallback_reason: str | None = None
    elapsed_s: float = 0.0
    #: seconds spent in each stage of the decision (pool, scoring, block_table, candidates, pmf, draw, layout)
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def fallback(self) -> bool:
        return self.fallback_reason is not None

    @property
    def candidates(self) -> list[dict[str, Any]]:
        """One dict per candidate (modules, categories, tilt, value, exposure, score, engagement, tail)."""
        return decode_candidates(self.stored_candidates)

    def response(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "user_id": self.user_id,
            "fallback": self.fallback,
            "propensity": self.propensity,
            "versions": self.versions,
            "live_state": self.context.get("live", "none"),
            "modules": self.modules,
        }

    def response_json(self) -> bytes:
        """:meth:`response` as JSON bytes (orjson)."""
        return orjson.dumps(self.response(), option=orjson.OPT_SERIALIZE_NUMPY)

    def row(self) -> dict[str, Any]:
        """The ``decisions`` table row."""
        return {
            "request_id": self.request_id,
            "ts": datetime.fromtimestamp(self.ts, tz=UTC),
            "user_id": self.user_id,
            "context": self.context,
            "versions": self.versions,
            "policy": self.policy,
            "candidates": self.stored_candidates,
            "pmf": self.pmf,
            "chosen": self.chosen,
            "propensity": self.propensity,
            "layout": self.modules,
            "fallback_reason": self.fallback_reason,
        }


def catalog_long_tail(catalog: Catalog, config: HomepageConfig) -> tuple[np.ndarray, np.ndarray]:
    """(is_tail, tail) of every catalog item (:func:`allocator.long_tail` by the config's categories and
    ``[tilt] head_share``; items of other categories form one group of their own)."""
    names = config.category_names
    item_cat = catalog.category_index(names)
    return long_tail(catalog.popularity, np.where(item_cat >= 0, item_cat, len(names)), config.tilt.head_share)


def build_state(config: HomepageConfig, catalog: Catalog, *, scorer: ScorerHandle | None = None,
                prices: np.ndarray | None = None, bandit: VWLayoutBandit | None = None,
                versions: dict[str, Any] | None = None) -> EngineState:
    """Precompute everything a request needs that does not depend on the user."""
    space = LayoutSpace.from_config(config)
    cats = config.category_names
    item_cat = catalog.category_index(cats)
    served = item_cat >= 0
    if not served.any():
        raise ValueError(f"catalog has no item in the config's categories {cats}; load a catalog first")
    pop = catalog.popularity
    is_tail, tail = catalog_long_tail(catalog, config)
    by_cat = []
    C = len(cats)
    for c in range(C):
        idx = np.flatnonzero(item_cat == c)
        by_cat.append(idx[np.lexsort((idx, -pop[idx]))])
    n_c = np.array([a.size for a in by_cat])
    need = space.n_blocks * config.items_per_module  # items the modules can show
    share = np.round(config.pool_size * n_c / max(n_c.sum(), 1)).astype(np.int64)
    quota = np.minimum(np.maximum(share, 2 * need), n_c)
    head = np.minimum(np.maximum(quota // 2, need), quota)
    rest = quota - head
    if scorer is None:
        scorer = ScorerHandle(PopularityScorer(pop, np.where(served, item_cat, 0)))
    K = space.n_constraints
    pr = np.zeros(K) if prices is None else np.asarray(prices, dtype=np.float64)
    if pr.shape != (K,):
        raise ValueError(f"prices must have one entry per constraint ({K}); got shape {pr.shape}")
    # the safe default: modules in config order, most popular items, no tilt
    fb: list[dict[str, Any]] = []
    used = np.zeros(C, dtype=np.int64)
    Kit = config.items_per_module
    for s, m in enumerate(config.modules[: config.slots]):
        c = cats.index(m.category)
        items = by_cat[c][used[c] * Kit:(used[c] + 1) * Kit]
        used[c] += 1
        fb.append({"slot": s, "module_id": m.id, "category": m.category, "tilt": 0.0,
                   "items": [{"item_id": str(catalog.item_ids[i]), "long_tail": bool(is_tail[i])}
                             for i in items]})
    rank = np.full(item_cat.size, -1, dtype=np.int64)
    for idx in by_cat:
        rank[idx] = np.arange(idx.size)
    return EngineState(
        config=config, catalog=catalog, space=space, item_category=item_cat, is_tail=is_tail, tail=tail,
        category_rank=rank,
        by_category=tuple(by_cat), head_quota=head, rest_quota=rest, scorer=scorer, prices=pr,
        bandit=bandit, versions=dict(versions or {}), fallback_modules=fb,
        new_categories=np.array([k for k, c in enumerate(config.categories) if c.new], dtype=np.int64),
        population_prefs=np.bincount(item_cat[served], weights=pop[served], minlength=C) / max(pop[served].sum(), 1e-12),
        module_id_array=np.array(config.module_ids, dtype=object),
        category_name_array=np.array(config.category_names, dtype=object),
    )


def _warm(state: EngineState) -> None:
    """Load the request path's compiled kernels (the layout step's and the scorer's, where it has any)."""
    warm_kernels()
    warm = getattr(state.scorer.scorer, "warm", None)
    if callable(warm):
        warm()


@cache
def _one_blas_thread() -> None:
    # a decision is a few dozen small matmuls; a BLAS thread pool (on a few shared cores, beside other
    # workers) costs far more in wake-ups than it gives: one thread, set once per process
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


class DecisionEngine:
    """Decides layouts. Thread-safe: the state is read once per request and replaced atomically."""

    def __init__(self, state: EngineState) -> None:
        self._state = state
        # the exposure of this engine's last ``[loop] serve_window`` layouts (a ring), which it steers
        # toward the pacer's aims (see allocator.window_correction)
        self._recent = np.zeros((state.config.loop.serve_window, state.space.n_constraints))
        self._recent_sum = np.zeros(state.space.n_constraints)
        self._served = 0
        self._lock = threading.Lock()
        _one_blas_thread()
        _warm(state)

    @property
    def state(self) -> EngineState:
        return self._state

    def swap(self, state: EngineState) -> None:
        _warm(state)  # before the state serves: a new ranker's kernels load on this thread, not a request's
        old = self._state
        self._state = state
        if (state.versions.get("config") != old.versions.get("config")
                or state.space.n_constraints != self._recent.shape[1]
                or state.config.loop.serve_window != self._recent.shape[0]):
            with self._lock:  # a new config: its bounds (and window) start a new record
                self._recent = np.zeros((state.config.loop.serve_window, state.space.n_constraints))
                self._recent_sum = np.zeros(state.space.n_constraints)
                self._served = 0

    def window_offset(self, st: EngineState) -> np.ndarray | None:
        """(K,) the price offsets that steer this engine's recent shares back to the pacer's aims
        (:func:`allocator.window_correction`); None while it has no slope or too short a record."""
        loop = st.config.loop
        if st.price_slope is None or loop.serve_gain <= 0 or not st.space.n_constraints:
            return None
        with self._lock:
            n = min(self._served, self._recent.shape[0])
            if n < max(10, self._recent.shape[0] // 4):
                return None
            shares = self._recent_sum / n
        lo, hi = st.config.bounds()
        return window_correction(shares, lo, hi, st.prices, st.price_slope, margin=loop.pace_margin,
                                 gain=loop.serve_gain)

    def _record(self, exposure: np.ndarray) -> None:
        with self._lock:
            if self._recent.shape[1] == exposure.size and self._recent.shape[0]:
                k = self._served % self._recent.shape[0]
                self._recent_sum += exposure - self._recent[k]  # the ring's running sum
                self._recent[k] = exposure
                self._served += 1

    def decide(self, user_id: str, request_id: str, context: dict[str, Any] | None = None,
               live: LiveSignals | None = None) -> Decision:
        """The layout for one request. ``live``: the user's live state (None: none was read)."""
        st = self._state
        t0 = time.perf_counter()
        try:
            d = self._decide(st, user_id, request_id, context or {}, live)
        except Exception as e:  # anything upstream failing: serve the safe default, say why
            log.exception("decision failed for request %s; serving the default layout", request_id)
            d = Decision(request_id, user_id, time.time(), "fallback", dict(st.versions), dict(context or {}),
                         [], [1.0], 0, 1.0, st.fallback_modules, fallback_reason=f"{type(e).__name__}: {e}")
        d.elapsed_s = time.perf_counter() - t0
        return d

    # -- the request path ------------------------------------------------------------------------
    def pool(self, st: EngineState, rng: np.random.Generator, recent: np.ndarray | None = None) -> np.ndarray:
        """Candidate items for one request: each category's most popular items plus a draw from its
        rest, so the long tail gets a chance to be scored. ``recent``: catalog rows the user engaged
        with lately (newest first); those outside their category's head take the first places of its
        draw, so a liked long-tail item can come back (when the repeat lift says that pays); the
        category's best long-tail items by value (:func:`with_item_lift`) come next."""
        mine = None
        if recent is not None and recent.size and st.category_rank is not None:
            _, first = np.unique(recent, return_index=True)
            mine = recent[np.sort(first)]  # distinct, newest first
            mine = mine[(st.category_rank[mine] >= st.head_quota[np.maximum(st.item_category[mine], 0)])
                        & (st.item_category[mine] >= 0)]
        parts = []
        for c, items in enumerate(st.by_category):
            h, r = int(st.head_quota[c]), int(st.rest_quota[c])
            parts.append(items[:h])
            if r:
                at = np.sort(rng.choice(items.size - h, size=r, replace=False))
                own = mine[st.item_category[mine] == c][:r] if mine is not None and mine.size else None
                lead: np.ndarray | None = st.tail_lead[c] if st.tail_lead else None
                if own is None or not own.size:
                    if lead is not None and lead.size:  # the tail's best first, then the draw's others
                        at = at[~st.tail_lead_rest[c][at]][: r - lead.size]
                        parts.extend((lead, items[h + at]))
                    else:
                        parts.append(items[h + at])
                    continue
                drawn = items[h + at]
                lead = own if lead is None or not lead.size else np.concatenate([own, lead[~member(lead, own)]])[:r]
                parts.append(np.concatenate([lead, drawn[~member(drawn, lead)][: r - lead.size]]))
        return np.concatenate(parts)

    def item_scores(self, st: EngineState, u: int, pool: np.ndarray, live: LiveSignals | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores of the pool's items for user row ``u`` and the user's category preferences, as the
        decision uses them: the scorer's, calibrated by the plan's category engagement (popularity
        scorer), then tilted by the live state."""
        scores, _, prefs = self._scores(st, u, pool, live)
        return scores, prefs

    def pool_table(self, st: EngineState, u: int, pool: np.ndarray, live: LiveSignals | None = None
                   ) -> tuple[BlockTable, np.ndarray | None]:
        """The block table of one request's pool (values from the calibrated scores, order within a
        category and the tilt's reach from the scorer's own) and the user's category preferences."""
        scores, rank, prefs = self._scores(st, u, pool, live)
        tbl = block_table(st.space, scores[None, :], st.item_category[pool], st.is_tail[pool], st.tail[pool],
                          rank_scores=rank[None, :])
        return tbl, prefs

    def _scores(self, st: EngineState, u: int, pool: np.ndarray, live: LiveSignals | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        scores, prefs, ranker_live, last = st.scorer.score_user(u, pool, live)
        if scores.shape != pool.shape or not np.isfinite(scores).all():
            raise ValueError(f"scorer returned {scores.shape} scores with non-finite values for "
                             f"{pool.size} items")
        if st.item_lift is not None:  # what each item earned over what its score says: part of the scorer
            lift = st.item_lift[pool]
            scores = np.where(scores > 0, scores * lift, scores / lift)
        offset = None
        demote = None
        raw = scores
        if live is not None and live.status == "hit" and live.negatives.size:
            demote = member(pool, live.negatives)
        rank = scores if demote is None else np.where(demote, scores * SKIP_DEMOTION, scores)
        if st.score_multiplier is not None:
            scores = scores * st.score_multiplier[pool]
            if st.score_offset is not None:
                offset = st.score_offset[pool]  # net-negative groups: added last (see group_calibration)
        if (live is not None and live.status == "hit" and live.impressions is not None
                and st.category_rate is not None and st.category_top is not None):
            # the live state with impressions: the user's engagement per examined impression of each
            # category updates the scorer's belief about it (see live_rate_factors)
            cat = st.item_category[pool]
            C = st.category_rate.size
            raw_top = _top_means(raw, np.where(cat >= 0, cat, C), C + 1, st.config.items_per_module)[:C]
            toward = None
            if st.shift_map is not None and live.before is not None:  # the user's taste before the shift, moved
                toward = st.shift_map.prior(live.before[0], live.before[1], st.category_rate)
            rho, factor, loss = live_rate_factors(raw_top, st.category_top, st.category_rate, live.engagement,
                                                  live.impressions, toward=toward)
            # the offset of a net-negative group (skipped more than played) stays: what a user who likes
            # the category more takes from it is in the scaled scores, the skips' cost is not less for it
            scores = scores * np.where(cat >= 0, factor[np.maximum(cat, 0)], 1.0)
            if demote is not None:
                scores = np.where(demote, scores * SKIP_DEMOTION, scores)
            if (loss != 0).any():  # categories this user skips more than takes: a loss to show
                lost = np.where(cat >= 0, loss[np.maximum(cat, 0)], 0.0)
                offset = lost if offset is None else offset + lost
            r = st.category_rate
            pop = st.population_prefs * np.where(r > 0, np.maximum(rho, 0.0) / np.where(r > 0, r, 1.0), rho > 0)
            prefs = pop / pop.sum() if pop.sum() > 0 else st.population_prefs
        elif live is not None and live.status == "hit":
            # the live state: category preferences shrunk toward the population and the model's head;
            # item scores tilted toward the user's categories now (fully for a user the ranker knows
            # nothing of, half for one it knows or scored from the live sequences) and away from what
            # the user just skipped
            pop = st.population_prefs
            informed = u >= 0 or ranker_live
            model = prefs if informed else None
            prefs = live_category_preferences(live.engagement, pop, model)
            cat = st.item_category[pool]
            mult = live_score_multiplier(prefs, pop, strength=0.5 if informed else 1.0)
            tilt = np.where(cat >= 0, mult[np.maximum(cat, 0)], 1.0)
            scores = scores * tilt
            if offset is not None:  # a net-negative category costs less where the user leans toward it now
                offset = offset / tilt
            if demote is not None:
                scores = np.where(demote, scores * SKIP_DEMOTION, scores)
        if (live is not None and live.status == "hit" and live.positives.size and st.repeat_lift is not None):
            # what the user engaged with lately, shown again, earns the repeat lift the log measured
            again = member(pool, live.positives)
            if again.any():
                cat = st.item_category[pool]
                lift = np.where(again & (cat >= 0), st.repeat_lift[np.maximum(cat, 0)], 1.0)
                scores = np.where(scores > 0, scores * lift, scores / lift)
                rank = np.where(rank > 0, rank * lift, rank / lift)
        if offset is not None:
            scores = scores + offset
        rank = head_first(rank, st.is_tail[pool])
        if last is not None:  # what the scorer put last stays below the long tail too (as the evaluation orders it)
            rank = np.where(last, rank.min() - 1.0 - np.ptp(rank), rank)
        return scores, rank, prefs

    def _decide(self, st: EngineState, user_id: str, request_id: str, context: dict[str, Any],
                live: LiveSignals | None) -> Decision:
        clock = time.perf_counter
        t0 = clock()
        rng = np.random.default_rng(seed_of(request_id))
        u = st.scorer.user_idx(user_id)
        recent = live.positives if (live is not None and live.status == "hit" and st.repeat_lift is not None) else None
        pool = self.pool(st, rng, recent)
        t1 = clock()
        scores, rank, prefs = self._scores(st, u, pool, live)
        t2 = clock()
        # the table of the items its blocks can show (the same blocks as the whole pool's, at a
        # fraction of the cost); `pool` is that sub-pool from here on
        at = showable(st.space, rank, st.item_category[pool], st.is_tail[pool])
        pool, scores, rank = pool[at], scores[at], rank[at]
        tbl = block_table(st.space, scores[None, :], st.item_category[pool], st.is_tail[pool],
                          st.tail[pool], rank_scores=rank[None, :])
        t3 = clock()
        lead = None
        if prefs is not None:
            lead = np.argsort(-prefs, kind="stable")[None, : min(prefs.size, 4)]
        target, explore = -1, None
        if st.unexplored_categories.size and st.config.exploration.budget > 0:
            # one unexplored category per request (drawn by the request's seed) leads a layout of its
            # own, unless the user's top categories already lead one with it
            unx = st.unexplored_categories
            target = int(unx[seed_of(request_id + "/explore") % unx.size])
            if lead is None or target not in lead[0]:
                explore = np.array([target])
        cand = build_candidates(st.space, tbl, st.prices, lead_categories=lead, explore=explore)
        real = np.flatnonzero(cand.mask[0])
        if real.size == 0:
            raise ValueError("no feasible candidate layout (catalog too small for the modules?)")
        offset = self.window_offset(st)
        priced = cand.scores(st.prices if offset is None else st.prices + offset)[0, real]
        t4 = clock()
        greedy = int(np.argmax(priced))
        value = cand.value[0, real]
        ex = st.config.exploration
        C = st.space.category_value.size
        shared = shared_features(np.array(u >= 0), prefs if prefs is not None else np.zeros(C))
        if st.bandit is not None:
            actions = layout_features(cand.categories[0, real], st.space.tilt_levels[cand.tilt[0, real]], value,
                                      priced, C)
            # the bandit spends the exploration budget (which layouts to try, how often); the layout
            # exploited is the allocator's priced argmax, so the exposure constraints keep holding
            base = np.asarray(st.bandit.predict(shared, actions), dtype=np.float64)
            policy = "bandit"
        else:
            base = np.full(real.size, 1.0 / real.size)
            policy = "epsilon_greedy"
        # the exploited layouts: a softmax of the priced values (near-ties mixed, so each constraint's
        # share moves smoothly with its price), the bandit's pmf budgeted toward each of them
        ok = exploitable(st.space.tilt_levels[cand.tilt[0, real]], np.ones(real.size, dtype=bool), st.space.tail_goal)
        # layouts leading with the request's unexplored category get UNEXPLORED_SHARE of the budget (a
        # category no value-greedy layout shows would otherwise never be learned), the bandit the rest
        leads = cand.categories[0, real, 0] == target if target >= 0 else np.zeros(real.size, dtype=bool)
        unx_share = UNEXPLORED_SHARE * ex.budget if leads.any() else 0.0
        pmf = serving_pmf(base, exploit_pmf(priced, value, ex.temperature, ok), ex.budget - unx_share, value=value,
                          max_value_loss=ex.max_value_loss)
        if ex.new_category_share > 0 and st.new_categories.size:
            # new categories get their own exploration share, on top of the budget: that much traffic
            # goes uniformly to the candidates showing a new category (the logged pmf includes it)
            shows_new = member(cand.categories[0, real], st.new_categories).any(axis=1)
            if shows_new.any():
                eta = ex.new_category_share
                pmf = (1.0 - eta) * pmf + eta * shows_new / shows_new.sum()
        if unx_share > 0:  # the logged pmf includes it
            pmf = (1.0 - unx_share) * pmf + unx_share * leads / leads.sum()
        t5 = clock()
        chosen = int(sample(pmf, seed_of(request_id + "/draw")))
        t6 = clock()
        lc = int(real[chosen])
        self._record(cand.exposure[0, lc])
        shown = layout_items(st.space, tbl, 0, cand.categories[0, lc], cand.blocks[0, lc], int(cand.tilt[0, lc]))
        cfg = st.config
        beta = float(st.space.tilt_levels[cand.tilt[0, lc]])
        modules = []
        item_ids = st.catalog.id_list()
        rows = [pool[p] for p in shown]
        fresh: list[int] = []
        if st.new_items.size:
            rows, fresh = swap_in_new_items(st, rows, cand.categories[0, lc], rng, time.time())
        for s in range(st.space.n_slots):
            m = cfg.modules[int(cand.modules[0, lc, s])]
            items = rows[s]
            modules.append({"slot": s, "module_id": m.id, "category": m.category, "tilt": beta,
                            "items": [{"item_id": item_ids[i], "long_tail": t}
                                      for i, t in zip(items.tolist(), st.is_tail[items].tolist(), strict=True)]})
        R = tbl.mean_score.shape[-1]
        cc, bb, tt = cand.categories[0, real], np.minimum(cand.blocks[0, real], R - 1), cand.tilt[0, real]
        eng = np.nan_to_num(tbl.mean_score[0, tt[:, None], cc, bb])  # (n_real, S) slot engagement
        tail_share = tbl.n_tail[0, tt[:, None], cc, bb].sum(1) / np.maximum(tbl.n_shown[0, tt[:, None], cc, bb].sum(1), 1)
        # logged numbers are rounded to 1e-6 (half the log's bytes); the pmf keeps full precision

        def r6(a: np.ndarray) -> list[Any]:
            return np.round(a, 6).tolist()

        candidates = {N_CANDIDATES_KEY: int(real.size), "modules": st.module_id_array[cand.modules[0, real]].tolist(),
                      "categories": st.category_name_array[cc].tolist(),
                      "tilt": st.space.tilt_levels[cand.tilt[0, real]].tolist(), "value": r6(cand.value[0, real]),
                      "exposure": r6(cand.exposure[0, real]), "score": r6(priced), "engagement": r6(eng),
                      "tail": r6(tail_share)}
        ctx = dict(context)
        ctx.update({"known_user": u >= 0, "shared": shared.tolist(), "greedy": greedy,
                    "live": "none" if live is None else live.status})
        if offset is not None and offset.any():
            ctx["price_offset"] = r6(offset)
        share = cfg.loop.pace_sample
        if share > 0 and st.space.n_constraints and seed_of(request_id + "/pace") % 10_000 < share * 10_000:
            # the block table the candidates were built from: the pacer rebuilds them at the prices it tries
            ctx["pace"] = {"shape": list(tbl.mean_score.shape[1:]), "mean": r6(np.nan_to_num(tbl.mean_score[0]).ravel()),
                           "tail": tbl.n_tail[0].ravel().tolist(), "shown": tbl.n_shown[0].ravel().tolist(),
                           "lead": None if lead is None else lead[0].tolist(),
                           "explore": -1 if explore is None else int(explore[0])}
        if fresh:
            ctx["new_items"] = [item_ids[i] for i in fresh]
        t7 = clock()
        return Decision(request_id, user_id, time.time(), policy, dict(st.versions), ctx, candidates,
                        pmf.tolist(), chosen, float(pmf[chosen]), modules,
                        stages={"pool": t1 - t0, "scoring": t2 - t1, "block_table": t3 - t2, "candidates": t4 - t3,
                                "pmf": t5 - t4, "draw": t6 - t5, "layout": t7 - t6})
