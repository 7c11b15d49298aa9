"""The engine state from what is published: the active (or a given) config, the catalog, the plan's
prices for that config and the newest ranker and bandit.

A model that cannot be loaded never stops serving: the state falls back to the popularity scorer or
to epsilon-greedy exploration and logs why.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import rankers
from bandits import VWLayoutBandit

from .. import registry
from ..errors import InvalidInput, NotReady
from ..live._state import Forget
from ..live._transfer import ShiftMap
from ..log import Catalog, items, load_items, reading, serving_began
from ..registry import ConfigRecord, ModelRecord, PlanRecord
from ._engine import (
    EngineState,
    ScorerHandle,
    build_state,
    calibrated,
    calibration_predicted,
    calibration_rates,
    catalog_prior_rates,
    item_lift,
    repeat_lift,
    unexplored,
    with_item_lift,
    with_new_items,
)

__all__ = ["catalog_newest", "catalog_signature", "fresh_rows", "load_bandit", "load_catalog", "load_state", "ranker_scorer", "serving_since",
           "with_fresh_items", "with_plan_calibration"]

log = logging.getLogger("homepage.engine")


def load_catalog(db: Engine) -> Catalog:
    """The catalog in the database; :class:`NotReady` when none was loaded."""
    catalog = Catalog.from_arrays(load_items(db))
    if catalog.n_items == 0:
        raise NotReady("the catalog is empty; load one with `homepage catalog load items.csv`", field="catalog")
    return catalog


def ranker_scorer(model: ModelRecord, catalog: Catalog) -> ScorerHandle:
    """A published ranker as the engine's scorer, its item rows mapped onto ``catalog``'s: the torch
    ranker, or a :class:`rankers.HistoryScorer` (a built-in baseline the gate chose, or the residual
    ranker), each scoring with the user's live events on its numpy path."""
    if model.artifact is None:
        raise InvalidInput(f"ranker version {model.version} has no artifact", field="artifact")
    art = registry.unpack_ranker(model.artifact)
    lookup = {iid: i for i, iid in enumerate(art.item_ids)}
    remap = np.array([lookup.get(i, -1) for i in catalog.item_ids.tolist()], dtype=np.int64)
    users = {uid: i for i, uid in enumerate(art.user_ids)}
    if rankers.is_history_scorer(art.scorer):
        # a baseline published in place of a refused model, or the residual ranker: numpy only
        hist = rankers.HistoryScorer.load(art.scorer)
        if hist.kind == "catalog_popularity":  # the catalog's popularity as it stands, not as it was trained
            pop = np.zeros(len(art.item_ids))
            known = remap >= 0
            pop[remap[known]] = catalog.popularity[known]
            hist = hist.with_item_popularity(pop)
        return ScorerHandle(hist, users, remap, name=f"{hist.kind}:{model.version}")
    scorer = rankers.RankerScorer.load(art.scorer)  # torch loads here, on the first published ranker
    scorer.fast()  # the serving fast path's per-version precompute, now rather than on a request
    return ScorerHandle(scorer, users, remap, name=f"ranker:{model.version}")


def catalog_newest(db: Engine) -> str | None:
    """The newest ``items.updated_at`` (one index lookup): every load or refresh of items changes it, so
    a worker polls it to see a catalog loaded while it serves (:func:`catalog_signature`'s second part)."""
    with reading(db) as conn:
        newest = conn.execute(sa.select(sa.func.max(items.c.updated_at))).scalar()
    return None if newest is None else str(newest)


def catalog_signature(db: Engine) -> tuple[int, str | None]:
    """(items, the newest ``updated_at``) of the catalog: every load or refresh of items changes it
    (an upsert stamps the rows it writes), so a worker can tell whether its catalog is still current
    without reading it."""
    with reading(db) as conn:
        n, newest = conn.execute(sa.select(sa.func.count(), sa.func.max(items.c.updated_at))).one()
    return int(n), None if newest is None else str(newest)


def load_bandit(db: Engine) -> tuple[VWLayoutBandit | None, int | None]:
    """The newest published bandit and its version; (None, None) when there is none or it cannot be
    loaded (serving then explores epsilon-greedy; the reason is logged)."""
    bm = registry.model(db, "bandit")
    if bm is None:
        return None, None
    try:
        if bm.artifact is None:
            raise InvalidInput(f"bandit version {bm.version} has no artifact", field="artifact")
        return VWLayoutBandit.load(bm.artifact), bm.version
    except Exception:
        log.exception("bandit version %s could not be loaded; serving epsilon-greedy", bm.version)
        return None, None


def load_state(db: Engine, config: ConfigRecord | None = None, *, catalog: Catalog | None = None) -> EngineState:
    """The engine state for ``config`` (default: the active config) from the registry and the catalog."""
    cfg = config or registry.require_active_config(db)
    catalog = catalog if catalog is not None else load_catalog(db)
    prices, plan = registry.prices(db, cfg)
    versions: dict[str, int | None] = {"config": cfg.version, "plan": None if plan is None else plan.version,
                                       "ranker": None, "bandit": None}
    scorer = None
    ranker = registry.model(db, "ranker")
    if ranker is not None:
        try:
            scorer = ranker_scorer(ranker, catalog)
            versions["ranker"] = ranker.version
        except Exception:  # a broken artifact must not stop serving: popularity scoring stays
            log.exception("ranker version %s could not be loaded; serving popularity", ranker.version)
    bandit, versions["bandit"] = load_bandit(db)
    state = build_state(cfg.config, catalog, scorer=scorer, prices=prices, bandit=bandit, versions=versions)
    return with_plan_calibration(with_fresh_items(state, serving_since(db)), plan)


def serving_since(db: Engine) -> float | None:
    """When serving made its first logged decision (epoch seconds); None before any
    (:func:`~policy_api.log.serving_began`: imported history is not serving)."""
    began = serving_began(db)
    return None if began is None else began.timestamp()


def with_fresh_items(state: EngineState, since: float | None) -> EngineState:
    """``state`` with its fresh items: the served items its catalog records as added after ``since``
    (when serving began; None: not yet, and no item is fresh). The items of the catalog serving began
    with are not: the engine measures those from the start, in its pool's draw."""
    added = state.catalog.added_at
    rows = fresh_rows(state.catalog, state.item_category, since)
    return replace(state, fresh_items=rows, fresh_added=np.zeros(0) if added is None else added[rows])


def fresh_rows(catalog: Catalog, item_category: np.ndarray, since: float | None) -> np.ndarray:
    """Catalog rows of the served items (``item_category >= 0``) added after ``since`` (None: none)."""
    added = catalog.added_at
    if since is None or added is None:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero((added > since) & (item_category >= 0))  # NaN (not recorded) is not fresh


def plan_forget(solver: dict[str, Any]) -> Forget | None:
    """The population shift a plan carries (``solver["forget"]``: ``{"epoch", "keep"}``), or None."""
    got = solver.get("forget")
    if not isinstance(got, dict):
        return None
    try:
        return Forget(float(got["epoch"]), float(got["keep"]))
    except (KeyError, TypeError, ValueError, InvalidInput):
        log.warning("plan's forget ignored (not {epoch, keep}): %r", got)
        return None


def plan_shift_map(solver: dict[str, Any], n_categories: int) -> ShiftMap | None:
    """The shift map a plan carries (``solver["forget"]["map"]``, :meth:`ShiftMap.to_dict`), or None."""
    got = solver.get("forget")
    got = got.get("map") if isinstance(got, dict) else None
    if not isinstance(got, dict):
        return None
    try:
        m = ShiftMap.from_dict(got)
    except InvalidInput:
        log.warning("plan's shift map ignored: %r", got)
        return None
    return m if m.before_rate.size == n_categories else None


def with_plan_calibration(state: EngineState, plan: PlanRecord | None) -> EngineState:
    """``state`` with the category calibration the plan carries; without one (no feedback yet), the
    built-in popularity scorer gets the catalog's prior (:func:`~policy_api.engine.catalog_prior_rates`:
    its popularity ranks squeeze the categories together) and a published scorer none (its scores are
    the pages its gate judged)."""
    solver = {} if plan is None else (plan.solver or {})
    slope = solver.get("price_slope")
    if isinstance(slope, dict) and all(isinstance(slope.get(n), int | float) for n in state.config.constraint_names):
        state = replace(state, price_slope=np.array([float(slope[n]) for n in state.config.constraint_names]))
    else:
        state = replace(state, price_slope=None)
    state = replace(state, forget=plan_forget(solver), shift_map=plan_shift_map(solver, len(state.config.categories)))
    got = solver.get("calibration")
    state = with_new_items(state, got or None)
    if not got:  # nothing measured yet: no category is singled out as unexplored
        state = replace(state, unexplored_categories=np.zeros(0, dtype=np.int64))
        return calibrated(state, catalog_prior_rates(state) if state.scorer.name == "popularity" else None)
    names = state.config.category_names
    state = replace(state, unexplored_categories=unexplored(got, names))
    # the predicted units were summed with the scorer of the plan's time: used only with that scorer
    predicted = calibration_predicted(got, names) if solver.get("calibration_scorer") == state.scorer.name else None
    # each item's lift is over the scores of the plan's scorer, and the groups were calibrated on the
    # lifted scores: both used only with that scorer
    lift = item_lift(got, state) if predicted is not None else None
    state = replace(state, item_lift=lift)
    state = replace(calibrated(state, calibration_rates(got, names), predicted), repeat_lift=repeat_lift(got, names))
    return with_item_lift(state, lift)
