"""One entry point for planning: the exact LP for small problems, the dual method beyond."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._dual import plan_dual
from ._plan import Plan, plan_lp

__all__ = ["LP_MAX_VARS", "PLAN_METHODS", "solve_plan"]

#: above this many variables (real candidate layouts) ``method="auto"`` uses the dual method
LP_MAX_VARS = 100_000
PLAN_METHODS = ("auto", "lp", "dual")


def solve_plan(value: np.ndarray, exposure: np.ndarray, weight: np.ndarray, lower: np.ndarray, upper: np.ndarray,
               mask: np.ndarray | None = None, *, names: Sequence[str] | None = None,
               method: str = "auto") -> Plan:
    """Solve the exposure-constrained plan with the method that fits its size.

    Parameters
    ----------
    value, exposure, weight, lower, upper, mask, names
        As for :func:`plan_lp` / :func:`plan_dual`: ``value`` (n_users, L), ``exposure``
        (n_users, L, K), ``weight`` (n_users,), bounds (K,) with ``-inf`` / ``inf`` for none.
    method
        ``"lp"`` (PuLP + HiGHS, exact, with infeasibility diagnosis), ``"dual"`` (entropy-smoothed
        dual, for large problems) or ``"auto"``: ``"lp"`` up to :data:`LP_MAX_VARS` real candidates.

    Raises
    ------
    InfeasiblePlan
        When the bounds cannot all hold.

    Examples
    --------
    >>> v = np.array([[1.0, 0.0]]); a = np.array([[[0.0], [1.0]]])
    >>> plan = solve_plan(v, a, np.ones(1), np.array([0.25]), np.array([np.inf]))
    >>> plan.method, round(float(plan.shares[0]), 6)
    ('pulp-highs-ipm', 0.25)
    """
    if method not in PLAN_METHODS:
        raise ValueError(f"method must be one of {PLAN_METHODS}; got {method!r}")
    if method == "auto":
        n_vars = int(np.asarray(mask).sum()) if mask is not None else int(np.asarray(value).size)
        method = "lp" if n_vars <= LP_MAX_VARS else "dual"
    solve = plan_lp if method == "lp" else plan_dual
    return solve(value, exposure, weight, lower, upper, mask, names=names)
