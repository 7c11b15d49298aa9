"""Allocation: the operator config, valuation, candidate layouts with long-tail tilt, the planning LP,
its dual prices and online pacing. Pure numpy/scipy/pulp: arrays and dataclasses in and out."""

from ._config import (
    CONSTRAINT_KINDS,
    EVENT_TYPES,
    EXPLORATION_ALGORITHMS,
    FEEDBACK_TYPES,
    Category,
    ConfigError,
    Constraint,
    Exploration,
    HomepageConfig,
    Learning,
    Loop,
    Module,
    Tilt,
    load_config,
    parse_config,
    parse_config_text,
)
from ._controller import PIPacer, PIPacerConfig
from ._dual import plan_dual
from ._layout import (
    BlockTable,
    Candidates,
    LayoutSpace,
    block_table,
    build_candidates,
    layout_items,
    long_tail,
)
from ._pacing import DualPacer, PacerConfig
from ._plan import InfeasibilityDiagnosis, InfeasiblePlan, Plan, Relaxation, choose, choose_batch, plan_lp
from ._resolve import ResolvePacer, ResolvePacerConfig
from ._sharded import LocalShards, PlanShard, ShardedPlan, ShardMap, plan_dual_sharded
from ._softmax import exploit_pmf, serving_pmf, softmax_prices, softmax_response
from ._solve import LP_MAX_VARS, PLAN_METHODS, solve_plan
from ._valuation import ValueRefit, refit_values

__all__ = [
    "ResolvePacer",
    "ResolvePacerConfig",
    "exploit_pmf",
    "serving_pmf",
    "softmax_prices",
    "softmax_response",
    "LP_MAX_VARS",
    "PLAN_METHODS",
    "ValueRefit",
    "refit_values",
    "solve_plan",
    "CONSTRAINT_KINDS",
    "EVENT_TYPES",
    "EXPLORATION_ALGORITHMS",
    "FEEDBACK_TYPES",
    "BlockTable",
    "Candidates",
    "Category",
    "DualPacer",
    "InfeasibilityDiagnosis",
    "InfeasiblePlan",
    "PacerConfig",
    "PIPacer",
    "PIPacerConfig",
    "Plan",
    "Relaxation",
    "choose",
    "choose_batch",
    "plan_dual",
    "plan_dual_sharded",
    "LocalShards",
    "PlanShard",
    "ShardMap",
    "ShardedPlan",
    "plan_lp",
    "ConfigError",
    "Constraint",
    "Exploration",
    "HomepageConfig",
    "LayoutSpace",
    "Learning",
    "Loop",
    "Module",
    "Tilt",
    "block_table",
    "build_candidates",
    "layout_items",
    "load_config",
    "long_tail",
    "parse_config",
    "parse_config_text",
]
