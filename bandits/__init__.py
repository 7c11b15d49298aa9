"""The layout bandit: exploration within a budget, the VW ``cb_explore_adf`` adapter, off-policy
estimators for replay and the DSJSON export. Arrays in, arrays and frozen dataclasses out."""

from ._dsjson import ACTION_NAMESPACE, SHARED_NAMESPACE, DSJsonDecision, parse_dsjson_line, to_dsjson_line
from ._explore import EpsilonGreedy, budget_pmf, sample, sample_batch, softmax_pmf, uniform_from_seed
from ._ope import (
    DM,
    DR,
    IPS,
    SNDR,
    SNIPS,
    BootstrapCI,
    Estimate,
    OverlapDiagnostics,
    RidgeRewardModel,
    SwitchDR,
    bootstrap_ci,
    cross_fit_rewards,
    estimate_all,
    overlap_diagnostics,
)
from ._vw import ALGORITHMS, VWLayoutBandit

__all__ = [
    "ACTION_NAMESPACE",
    "ALGORITHMS",
    "DM",
    "DR",
    "IPS",
    "SHARED_NAMESPACE",
    "SNDR",
    "SNIPS",
    "BootstrapCI",
    "DSJsonDecision",
    "EpsilonGreedy",
    "Estimate",
    "OverlapDiagnostics",
    "RidgeRewardModel",
    "SwitchDR",
    "VWLayoutBandit",
    "bootstrap_ci",
    "budget_pmf",
    "cross_fit_rewards",
    "estimate_all",
    "overlap_diagnostics",
    "parse_dsjson_line",
    "sample",
    "sample_batch",
    "softmax_pmf",
    "to_dsjson_line",
    "uniform_from_seed",
]
