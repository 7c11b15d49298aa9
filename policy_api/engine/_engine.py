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
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from allocator import (
    HomepageConfig,
    LayoutSpace,
    block_table,
    build_candidates,
    layout_items,
    long_tail,
)
from bandits import VWLayoutBandit, budget_pmf, sample
from rankers import PopularityScorer, live_category_preferences, live_score_multiplier

from ..log import Catalog
from ._features import layout_features, shared_features
from ._ids import seed_of

__all__ = ["CALIBRATION_PRIOR", "SKIP_DEMOTION", "calibrated", "category_calibration", "Decision", "DecisionEngine", "EngineState", "LiveSignals", "Scorer", "ScorerHandle",
           "build_state"]

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


@dataclass(frozen=True, slots=True)
class LiveSignals:
    """What the live state says about one user at decision time.

    ``status``: ``"hit"`` (state read, events seen), ``"cold"`` (no state yet) or ``"timeout"`` (the
    state store did not answer within its deadline: treated as cold, and the decision says so).
    """

    status: str
    engagement: np.ndarray  # (C,) decayed engagement units by config category
    negatives: np.ndarray  # catalog indices of items the user recently skipped
    n_events: int = 0

    @classmethod
    def cold(cls, n_categories: int, status: str = "cold") -> LiveSignals:
        return cls(status, np.zeros(n_categories), np.zeros(0, dtype=np.int64))


#: a recently skipped item's score is multiplied by this (the negative feedback sequence)
SKIP_DEMOTION = 0.2


#: impressions of evidence that count as much as the scorer's own estimate of a category's engagement
CALIBRATION_PRIOR = 200.0


def category_calibration(scores: np.ndarray, item_category: np.ndarray, rates: np.ndarray, top: int,
                         prior: float = CALIBRATION_PRIOR) -> np.ndarray:
    """Shape (C,): per-category multipliers that bring a scorer's predicted engagement of the items it
    would show in each category in line with the engagement observed there.

    ``m_c = (U_c + k g p_c) / ((I_c + k) p_c)``, floored at ``g / 100``: ``U_c``, ``I_c`` the observed
    units and impressions of category ``c``, ``p_c`` the mean score of its ``top`` best-scored items,
    ``g = sum U / sum I p`` the observed-to-predicted ratio over all categories and ``k`` = ``prior``
    impressions. A category with no data keeps the common factor ``g`` (no change between categories);
    one with many impressions gets its own ratio ``U_c / (I_c p_c)``.

    Examples
    --------
    >>> scores = np.array([2.0, 2.0, 1.0, 1.0]); cat = np.array([0, 0, 1, 1])
    >>> category_calibration(scores, cat, np.array([[10.0, 100.0], [0.0, 0.0]]), top=2, prior=100.0).round(3).tolist()
    [0.05, 0.05]
    >>> category_calibration(scores, cat, np.array([[40.0, 100.0], [10.0, 100.0]]), top=2, prior=1e-9).round(3).tolist()
    [0.2, 0.1]
    """
    C = rates.shape[0]
    p = np.zeros(C)
    for c in range(C):  # C is a handful of categories
        s = np.sort(scores[item_category == c])[::-1][:top]
        p[c] = float(s.mean()) if s.size else 0.0
    units, imps = rates[:, 0].astype(np.float64), rates[:, 1].astype(np.float64)
    have = p > 0
    denom = float((imps * p)[have].sum())
    if not have.any() or denom <= 0:
        return np.ones(C)
    g = max(float(units[have].sum()) / denom, 1e-12)
    m = np.full(C, g)
    m[have] = (units[have] + prior * g * p[have]) / ((imps[have] + prior) * p[have])
    return np.maximum(m, g / 100.0)


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
    population_prefs: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (C,) category shares of popularity
    # (C,) score multipliers from the plan's category calibration (see :func:`calibrated`); None: none
    category_multiplier: np.ndarray | None = None


def calibrated(state: EngineState, rates: np.ndarray | None) -> EngineState:
    """``state`` calibrated by ``rates`` (C, 2): engagement units and impressions per category seen
    recently. A popularity scorer ranks items within a category well but knows nothing of how much a
    category is engaged with when shown; its multipliers are computed once here, from each category's
    best-scored items (the ones every request's pool holds), not per request. A learned ranker is
    calibrated by its training: it gets none.
    """
    if rates is None or state.scorer.name != "popularity":
        return replace(state, category_multiplier=None)
    items = np.flatnonzero(state.item_category >= 0)
    scores = state.scorer.score(-1, items)
    mult = category_calibration(scores, state.item_category[items], rates, state.config.items_per_module)
    return replace(state, category_multiplier=mult)


@dataclass
class Decision:
    request_id: str
    user_id: str
    ts: float
    policy: str
    versions: dict[str, Any]
    context: dict[str, Any]
    candidates: list[dict[str, Any]]
    pmf: list[float]
    chosen: int
    propensity: float
    modules: list[dict[str, Any]]
    fallback_reason: str | None = None
    elapsed_s: float = 0.0

    @property
    def fallback(self) -> bool:
        return self.fallback_reason is not None

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

    def row(self) -> dict[str, Any]:
        """The ``decisions`` table row."""
        return {
            "request_id": self.request_id,
            "ts": datetime.fromtimestamp(self.ts, tz=UTC),
            "user_id": self.user_id,
            "context": self.context,
            "versions": self.versions,
            "policy": self.policy,
            "candidates": self.candidates,
            "pmf": self.pmf,
            "chosen": self.chosen,
            "propensity": self.propensity,
            "layout": self.modules,
            "fallback_reason": self.fallback_reason,
        }


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
    is_tail, tail = long_tail(pop, np.where(served, item_cat, len(cats)), config.tilt.head_share)
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
    return EngineState(
        config=config, catalog=catalog, space=space, item_category=item_cat, is_tail=is_tail, tail=tail,
        by_category=tuple(by_cat), head_quota=head, rest_quota=rest, scorer=scorer, prices=pr,
        bandit=bandit, versions=dict(versions or {}), fallback_modules=fb,
        new_categories=np.array([k for k, c in enumerate(config.categories) if c.new], dtype=np.int64),
        population_prefs=np.bincount(item_cat[served], weights=pop[served], minlength=C) / max(pop[served].sum(), 1e-12),
    )


class DecisionEngine:
    """Decides layouts. Thread-safe: the state is read once per request and replaced atomically."""

    def __init__(self, state: EngineState) -> None:
        self._state = state

    @property
    def state(self) -> EngineState:
        return self._state

    def swap(self, state: EngineState) -> None:
        self._state = state

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
    def pool(self, st: EngineState, rng: np.random.Generator) -> np.ndarray:
        """Candidate items for one request: each category's most popular items plus a draw from its
        rest, so the long tail gets a chance to be scored."""
        parts = []
        for c, items in enumerate(st.by_category):
            h, r = int(st.head_quota[c]), int(st.rest_quota[c])
            parts.append(items[:h])
            if r:
                parts.append(items[h + np.sort(rng.choice(items.size - h, size=r, replace=False))])
        return np.concatenate(parts)

    def item_scores(self, st: EngineState, u: int, pool: np.ndarray, live: LiveSignals | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores of the pool's items for user row ``u`` and the user's category preferences, as the
        decision uses them: the scorer's, calibrated by the plan's category engagement (popularity
        scorer), then tilted by the live state."""
        scores = st.scorer.score(u, pool)
        if scores.shape != pool.shape or not np.isfinite(scores).all():
            raise ValueError(f"scorer returned {scores.shape} scores with non-finite values for "
                             f"{pool.size} items")
        prefs = st.scorer.category_preferences(u)
        if st.category_multiplier is not None:
            scores = scores * st.category_multiplier[np.maximum(st.item_category[pool], 0)]
        if live is not None and live.status == "hit":
            # the live state: category preferences shrunk toward the population and the model's head;
            # item scores tilted toward the user's categories now (fully for a user the model does not
            # know, half for one it does) and away from what the user just skipped
            pop = st.population_prefs
            model = prefs if u >= 0 else None
            prefs = live_category_preferences(live.engagement, pop, model)
            cat = st.item_category[pool]
            mult = live_score_multiplier(prefs, pop, strength=0.5 if u >= 0 else 1.0)
            scores = scores * np.where(cat >= 0, mult[np.maximum(cat, 0)], 1.0)
            if live.negatives.size:
                scores = np.where(np.isin(pool, live.negatives), scores * SKIP_DEMOTION, scores)
        return scores, prefs

    def _decide(self, st: EngineState, user_id: str, request_id: str, context: dict[str, Any],
                live: LiveSignals | None) -> Decision:
        rng = np.random.default_rng(seed_of(request_id))
        u = st.scorer.user_idx(user_id)
        pool = self.pool(st, rng)
        scores, prefs = self.item_scores(st, u, pool, live)
        tbl = block_table(st.space, scores[None, :], st.item_category[pool], st.is_tail[pool],
                          st.tail[pool])
        lead = None
        if prefs is not None:
            lead = np.argsort(-prefs, kind="stable")[None, : min(prefs.size, 4)]
        cand = build_candidates(st.space, tbl, st.prices, lead_categories=lead)
        real = np.flatnonzero(cand.mask[0])
        if real.size == 0:
            raise ValueError("no feasible candidate layout (catalog too small for the modules?)")
        priced = cand.scores(st.prices)[0, real]
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
        pmf = budget_pmf(base, greedy, ex.budget, value=value, max_value_loss=ex.max_value_loss)
        if ex.new_category_share > 0 and st.new_categories.size:
            # new categories get their own exploration share, on top of the budget: that much traffic
            # goes uniformly to the candidates showing a new category (the logged pmf includes it)
            shows_new = np.isin(cand.categories[0, real], st.new_categories).any(axis=1)
            if shows_new.any():
                eta = ex.new_category_share
                pmf = (1.0 - eta) * pmf + eta * shows_new / shows_new.sum()
        chosen = int(sample(pmf, seed_of(request_id + "/draw")))
        lc = int(real[chosen])
        shown = layout_items(st.space, tbl, 0, cand.categories[0, lc], cand.blocks[0, lc], int(cand.tilt[0, lc]))
        cfg = st.config
        beta = float(st.space.tilt_levels[cand.tilt[0, lc]])
        modules = []
        for s in range(st.space.n_slots):
            m = cfg.modules[int(cand.modules[0, lc, s])]
            items = pool[shown[s]]
            modules.append({"slot": s, "module_id": m.id, "category": m.category, "tilt": beta,
                            "items": [{"item_id": str(st.catalog.item_ids[i]), "long_tail": bool(st.is_tail[i])}
                                      for i in items.tolist()]})
        mod_ids, cat_names = cfg.module_ids, cfg.category_names
        R = tbl.mean_score.shape[-1]
        cc, bb, tt = cand.categories[0, real], np.minimum(cand.blocks[0, real], R - 1), cand.tilt[0, real]
        eng = np.nan_to_num(tbl.mean_score[0, tt[:, None], cc, bb])  # (n_real, S) slot engagement
        tail_share = tbl.n_tail[0, tt[:, None], cc, bb].sum(1) / np.maximum(tbl.n_shown[0, tt[:, None], cc, bb].sum(1), 1)
        # logged numbers are rounded to 1e-6 (half the log's bytes); the pmf keeps full precision

        def r6(a: np.ndarray) -> list[Any]:
            return np.round(a, 6).tolist()

        values, scores_, exps, engs, tails = (r6(cand.value[0, real]), r6(priced), r6(cand.exposure[0, real]),
                                              r6(eng), r6(tail_share))
        candidates = [
            {"modules": [mod_ids[j] for j in cand.modules[0, i].tolist()],
             "categories": [cat_names[c] for c in cc[k].tolist()],
             "tilt": float(st.space.tilt_levels[cand.tilt[0, i]]),
             "value": values[k], "exposure": exps[k], "score": scores_[k], "engagement": engs[k], "tail": tails[k]}
            for k, i in enumerate(real.tolist())
        ]
        ctx = dict(context)
        ctx.update({"known_user": u >= 0, "shared": shared.tolist(), "greedy": greedy,
                    "live": "none" if live is None else live.status})
        return Decision(request_id, user_id, time.time(), policy, dict(st.versions), ctx, candidates,
                        pmf.tolist(), chosen, float(pmf[chosen]), modules)
