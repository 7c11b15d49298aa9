"""Rankers: per-category multi-task rankers on a shared cross-domain user tower, with popularity
debiasing and a category-preference head; the data builder, trainer, metrics, baselines and the
serving scorers. numpy + torch; arrays and dataclasses in and out.

The data builder, metrics and :class:`PopularityScorer` need numpy only: torch is imported on first
use of a torch-backed name (model blocks, ``fit``, ``RankerScorer``, ``evaluate``), so serving the
popularity baseline never loads torch.

The served-page evaluation core is numpy + scipy.sparse as well: :func:`top_k_pages`,
:func:`page_metrics`, :func:`coverage` and :func:`paired_bootstrap`, and the simple scorers
:class:`RecentPopularity`, :class:`CategoryPopularity` and :class:`ItemKNN` (``fit`` on interaction
arrays, ``score_all(user_idx) -> (n, n_items)``); :class:`HistoryScorer` serves the same baselines
(and the residual ranker that starts from them) per request, with the user's live events.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._baselines import ItemPriorBaseline, LogisticBaseline, PopularityScorer, popularity_rank
from ._data import (
    EVENT_TYPES,
    PRIOR_COLUMNS,
    TASKS,
    Examples,
    UserHistory,
    behaviour_grade,
    build_examples,
    item_priors,
    split_by_time,
)
from ._history import (
    BASE,
    FEATURES,
    HISTORY_KINDS,
    ITEM_RATE_PRIOR,
    POP_HALF_LIVES_DAYS,
    RATE_COLUMN,
    RATE_FEATURES,
    HistoryScorer,
    fit_residual,
    is_history_scorer,
    item_rates,
    repeat_share,
    residual_grid,
    with_dial,
)
from ._live import live_category_preferences, live_score_multiplier
from ._metrics import auc, category_hit_rate, ece, gauc, logloss, ndcg_at_k
from ._served import coverage, page_metrics, paired_bootstrap, top_k_pages
from ._simple import CategoryPopularity, ItemKNN, RecentPopularity

_LAZY = {
    "._model": (
        "CGC",
        "CIN",
        "INTERACTIONS",
        "CategoryHead",
        "CategoryRanker",
        "CrossNet",
        "ItemOnlyBranch",
        "ItemTower",
        "Ranker",
        "RankerOutput",
        "TargetAttention",
        "UserOnlyBranch",
        "UserTower",
        "task_bce",
        "task_log_probs",
        "torch_threads",
    ),
    "._train": (
        "DEFAULT_EVENT_WEIGHTS",
        "TrainConfig",
        "TrainHistory",
        "build_model",
        "fit",
    "fit_residual",
        "predict",
        "predict_categories",
        "task_weights_from_events",
    ),
    "._scorer": ("RankerScorer",),
    "._evaluate": ("RankerMetrics", "evaluate", "ground_truth_ndcg", "report_table"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'rankers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BASE",
    "CGC",
    "CIN",
    "DEFAULT_EVENT_WEIGHTS",
    "EVENT_TYPES",
    "FEATURES",
    "HISTORY_KINDS",
    "HistoryScorer",
    "INTERACTIONS",
    "ITEM_RATE_PRIOR",
    "POP_HALF_LIVES_DAYS",
    "PRIOR_COLUMNS",
    "RATE_COLUMN",
    "RATE_FEATURES",
    "TASKS",
    "CategoryHead",
    "CategoryPopularity",
    "CategoryRanker",
    "CrossNet",
    "Examples",
    "ItemKNN",
    "ItemOnlyBranch",
    "ItemPriorBaseline",
    "ItemTower",
    "LogisticBaseline",
    "PopularityScorer",
    "Ranker",
    "RankerMetrics",
    "RankerOutput",
    "RankerScorer",
    "RecentPopularity",
    "TargetAttention",
    "TrainConfig",
    "TrainHistory",
    "UserHistory",
    "UserOnlyBranch",
    "UserTower",
    "auc",
    "behaviour_grade",
    "build_examples",
    "build_model",
    "category_hit_rate",
    "coverage",
    "ece",
    "evaluate",
    "fit",
    "fit_residual",
    "gauc",
    "ground_truth_ndcg",
    "is_history_scorer",
    "repeat_share",
    "item_priors",
    "item_rates",
    "live_category_preferences",
    "live_score_multiplier",
    "logloss",
    "ndcg_at_k",
    "page_metrics",
    "paired_bootstrap",
    "popularity_rank",
    "predict",
    "predict_categories",
    "report_table",
    "residual_grid",
    "split_by_time",
    "task_bce",
    "task_log_probs",
    "task_weights_from_events",
    "top_k_pages",
    "torch_threads",
    "with_dial",
]
