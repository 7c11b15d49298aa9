"""The decision engine: for one request, rankers -> candidate pool -> candidate layouts -> priced
scores -> budgeted pmf -> seeded draw -> the served layout and its log row.

Serving calls it per request; jobs call it to build candidates exactly as serving does (planning,
dry runs, replay checks). :func:`load_state` builds the immutable state from what is published.
"""

from ._engine import (
    CALIBRATION_PRIOR,
    ITEM_LIFT_PRIOR,
    LIVE_PRIOR_IMPRESSIONS,
    SKIP_DEMOTION,
    Decision,
    DecisionEngine,
    EngineState,
    LiveSignals,
    Scorer,
    ScorerHandle,
    build_state,
    calibrated,
    calibration_predicted,
    calibration_rates,
    calibration_shift,
    catalog_long_tail,
    catalog_prior_rates,
    category_calibration,
    category_rates,
    curve_rate,
    item_lift,
    item_lift_of,
    live_rate_factors,
    repeat_lift,
    with_item_lift,
)
from ._features import layout_features, shared_features
from ._ids import RequestIds, load_secret, seed_of
from ._state import load_catalog, load_state, ranker_scorer, with_plan_calibration

__all__ = [
    "CALIBRATION_PRIOR",
    "calibrated",
    "calibration_predicted",
    "calibration_rates",
    "catalog_long_tail",
    "catalog_prior_rates",
    "calibration_shift",
    "category_calibration",
    "category_rates",
    "live_rate_factors",
    "repeat_lift",
    "item_lift",
    "curve_rate",
    "item_lift_of",
    "with_item_lift",
    "ITEM_LIFT_PRIOR",
    "LIVE_PRIOR_IMPRESSIONS",
    "SKIP_DEMOTION",
    "LiveSignals",
    "Decision",
    "DecisionEngine",
    "EngineState",
    "RequestIds",
    "Scorer",
    "ScorerHandle",
    "build_state",
    "layout_features",
    "load_catalog",
    "load_secret",
    "load_state",
    "ranker_scorer",
    "seed_of",
    "shared_features",
    "with_plan_calibration",
]
