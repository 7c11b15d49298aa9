"""``homepage demo``: the closed loop over real HTTP on a simulated world, its jobs and its report."""

from ._demo import DemoSettings, PhaseLog, next_steps, run_demo, summary_lines
from ._replay import MIN_ESS_RATIO, candidate_pages, true_candidate_values, validate_replay

__all__ = ["MIN_ESS_RATIO", "DemoSettings", "PhaseLog", "candidate_pages", "next_steps", "run_demo", "summary_lines", "true_candidate_values",
           "validate_replay"]
