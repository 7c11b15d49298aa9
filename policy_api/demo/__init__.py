"""``homepage demo``: the closed loop over real HTTP on a simulated world, its jobs and its report."""

from ._demo import DemoSettings, PhaseLog, run_demo
from ._replay import MIN_ESS_RATIO, candidate_pages, true_candidate_values, validate_replay

__all__ = ["MIN_ESS_RATIO", "DemoSettings", "PhaseLog", "candidate_pages", "run_demo", "true_candidate_values",
           "validate_replay"]
