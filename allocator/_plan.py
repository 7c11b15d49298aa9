"""Planning LP: traffic-weighted layout choice under exposure floors and caps.

The problem (docs/architecture.md, "The decision math")::

    maximise    sum_u weight_u sum_l x[u, l] value[u, l]
    subject to  sum_l x[u, l] = 1,  x >= 0                       (one layout per user)
                lower_k <= sum_u weight_u sum_l x[u, l] exposure[u, l, k] <= upper_k

Only the K exposure rows couple users, so the plan is summarised by K signed prices
``prices = (dual of the floor row) - (dual of the cap row)``: a user is served
``argmax_l value[u, l] + exposure[u, l] @ prices``.  Because both the objective and the
rows are weighted by ``weight``, the prices are in the units of ``value``.

This module holds the shared types (:class:`Plan`, :class:`InfeasiblePlan`), input
validation, the exact LP :func:`plan_lp` (PuLP + HiGHS) with its elastic-LP infeasibility
diagnosis, and serving helpers :func:`choose` / :func:`choose_batch`.  The large-scale dual
method lives in ``_dual.py`` and online pacing in ``_pacing.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pulp

__all__ = [
    "InfeasibilityDiagnosis",
    "InfeasiblePlan",
    "Plan",
    "Relaxation",
    "choose",
    "choose_batch",
    "plan_lp",
]

#: Users per vectorised block in the passes over data: big enough that numpy's per-call
#: overhead is amortised, small enough that a block of a float32 (n, 16, 8) exposure stays in
#: cache and that float32 sums over a block stay accurate (~1e-7).
CHUNK_USERS = 2048

#: Tolerance used to call a constraint "binding" or a price "non-zero" in reports.
_REPORT_TOL = 1e-9

_LP_METHODS = ("simplex", "ipm")


# ----------------------------------------------------------------------------------------------
# Results and errors
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Plan:
    """A solved plan.

    Attributes
    ----------
    prices
        Shape (K,). Signed prices: serving picks ``argmax_l value[l] + exposure[l] @ prices``.
        ``>= 0`` on a binding floor, ``<= 0`` on a binding cap, 0 on slack constraints.
    objective
        ``sum_u weight_u sum_l x[u, l] value[u, l]`` of the returned ``x``.
    shares
        Shape (K,). Achieved ``sum_u weight_u sum_l x[u, l] exposure[u, l, k]``.
    x
        Shape (n_users, n_cand). The primal solution; each row sums to 1, 0 on padding.
    status
        ``"optimal"`` (certified within tolerance), ``"time_limit"`` or ``"iteration_limit"``
        (best solution found; check ``gap`` and ``violation``).
    gap
        Relative duality gap ``(dual_bound - objective) / max(|dual_bound|, |objective|)``,
        where ``dual_bound = sum_u weight_u max_l (value + exposure @ prices) - alpha @ lower
        + beta @ upper`` is a valid upper bound on the LP optimum for the returned prices.
    violation
        ``max_k max(lower_k - shares_k, shares_k - upper_k, 0)``.
    dual_bound
        The upper bound used for ``gap``.
    n_vars
        Number of decision variables (real candidates).
    build_s, solve_s
        Seconds spent building the model and solving it. For :func:`plan_lp`, ``build_s`` is
        PuLP (the model, then its transfer to HiGHS) and ``solve_s`` is HiGHS's own run time;
        for :func:`plan_dual`, ``build_s`` is input validation and the pre-check.
    iterations
        :func:`plan_lp`: HiGHS iterations (simplex + interior point + crossover).
        :func:`plan_dual`: passes over the data (L-BFGS evaluations and crossover scans).
    method
        What solved it, e.g. ``"pulp-highs-ipm"`` or ``"dual-lbfgs+crossover"``.
    names
        Constraint names, in the order of ``prices``.
    """

    prices: np.ndarray
    objective: float
    shares: np.ndarray
    x: np.ndarray
    status: str
    gap: float
    violation: float
    dual_bound: float
    n_vars: int
    build_s: float
    solve_s: float
    iterations: int
    method: str
    names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        for arr in (self.prices, self.shares, self.x):
            arr.setflags(write=False)


@dataclass(frozen=True)
class Relaxation:
    """One suggested change to a bound: ``name: min 0.60 -> 0.43``.

    ``suggested`` is the exact relaxed bound; ``str()`` rounds it outwards (floors down, caps
    up) to 4 decimals, so the printed value is itself feasible.
    """

    name: str
    side: str  # "min" (a floor) or "max" (a cap)
    current: float
    suggested: float

    def __str__(self) -> str:
        if self.side == "min":
            shown = math.floor(self.suggested * 1e4 + 1e-5) / 1e4
        else:
            shown = math.ceil(self.suggested * 1e4 - 1e-5) / 1e4
        return f"{self.name}: {self.side} {_fmt(self.current)} -> {_fmt(shown)}"


def _fmt(x: float) -> str:
    s = f"{x:.4f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


@dataclass(frozen=True, eq=False)
class InfeasibilityDiagnosis:
    """Why a plan is infeasible and what to relax.

    Attributes
    ----------
    conflicting
        Names of the constraints in the conflict: the support of the infeasibility
        certificate (non-zero multipliers of the elastic LP), or those failing the pre-check.
    relaxations
        The smallest total relaxation (sum of the bound moves, in share units) that makes the
        plan feasible, one :class:`Relaxation` per bound that must move.
    alternatives
        For each conflicting bound, the smallest move of that bound *alone* (others kept) that
        makes the plan feasible; bounds that cannot fix it alone are left out.
    relaxed_lower, relaxed_upper
        Shape (K,). ``lower`` / ``upper`` with ``relaxations`` applied (feasible, up to the
        solver's 1e-7 tolerance).
    total_relaxation
        ``sum(lower - relaxed_lower) + sum(relaxed_upper - upper)``.
    method
        ``"precheck"`` (a bound beyond what any layout mix reaches), ``"elastic-lp"`` (exact,
        PuLP + HiGHS) or ``"elastic-dual"`` (smoothed dual with a softmax witness; the
        relaxation is feasible by construction and minimal up to the smoothing error).
    """

    conflicting: tuple[str, ...]
    relaxations: tuple[Relaxation, ...]
    alternatives: tuple[Relaxation, ...]
    relaxed_lower: np.ndarray
    relaxed_upper: np.ndarray
    total_relaxation: float
    method: str

    def __str__(self) -> str:
        moves = "; ".join(str(r) for r in self.relaxations) or "none beyond solver tolerance"
        lines = [
            "constraints in conflict: " + ", ".join(self.conflicting),
            "smallest total relaxation: " + moves,
        ]
        if self.alternatives:
            lines.append("or relax one alone: " + "; ".join(str(r) for r in self.alternatives))
        return "\n".join(lines)


class InfeasiblePlan(ValueError):
    """The floors and caps cannot all hold; ``diagnosis`` says which conflict and what to relax."""

    def __init__(self, diagnosis: InfeasibilityDiagnosis) -> None:
        self.diagnosis = diagnosis
        super().__init__(f"plan is infeasible (diagnosis by {diagnosis.method}):\n{diagnosis}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.diagnosis,))


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


class _Problem(NamedTuple):
    value: np.ndarray  # (n_users, n_cand) float32/float64, not copied
    exposure: np.ndarray  # (n_users, n_cand, K) float32/float64, C-contiguous, not copied if possible
    weight: np.ndarray  # (n_users,) float64
    lower: np.ndarray  # (K,) float64
    upper: np.ndarray  # (K,) float64
    mask: np.ndarray | None  # (n_users, n_cand) bool, None when every candidate is real
    names: tuple[str, ...]
    n_users: int
    n_cand: int
    n_constraints: int
    n_vars: int


def _as_float(name: str, arr: Any) -> np.ndarray:
    a = np.asarray(arr)
    if a.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise ValueError(f"{name} must be a numeric array; got dtype {a.dtype}")
        a = a.astype(np.float64)
    return a


def _check_finite_chunked(name: str, a: np.ndarray, n_users: int) -> None:
    for i0, i1 in _chunks(n_users, 8 * CHUNK_USERS):
        block = a[i0:i1]
        if not np.isfinite(block).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(block))[0])
            found = block[where]
            where = (where[0] + i0, *where[1:])
            raise ValueError(
                f"{name} must be finite everywhere (fill padding with 0 and mark it in mask); "
                f"got {float(found)!r} at index {where}"
            )


def _validate(
    value: Any,
    exposure: Any,
    weight: Any,
    lower: Any,
    upper: Any,
    mask: Any,
    names: Sequence[str] | None,
) -> _Problem:
    v = _as_float("value", value)
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 1:
        raise ValueError(f"value must be a 2-D array of shape (n_users, n_cand); got shape {v.shape}")
    n_users, n_cand = v.shape
    a = _as_float("exposure", exposure)
    if a.ndim != 3 or a.shape[:2] != (n_users, n_cand):
        raise ValueError(
            f"exposure must have shape (n_users, n_cand, K) = ({n_users}, {n_cand}, K); got {a.shape}"
        )
    a = np.ascontiguousarray(a)  # no copy when already contiguous
    n_constraints = a.shape[2]
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != (n_users,):
        raise ValueError(f"weight must have shape (n_users,) = ({n_users},); got {w.shape}")
    if not np.isfinite(w).all() or (w < 0).any():
        bad = int(np.flatnonzero(~np.isfinite(w) | (w < 0))[0])
        raise ValueError(f"weight must be finite and >= 0; got weight[{bad}] = {float(w[bad])!r}")
    total = float(w.sum())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"weight must sum to 1 (traffic shares); got sum {total!r}")
    bounds = []
    for nm, b_in in (("lower", lower), ("upper", upper)):
        b = np.asarray(b_in, dtype=np.float64)
        if b.shape != (n_constraints,):
            raise ValueError(f"{nm} must have shape (K,) = ({n_constraints},); got {b.shape}")
        if np.isnan(b).any():
            raise ValueError(
                f"{nm} must not contain NaN (use -inf/+inf for an absent bound); got {b.tolist()}"
            )
        bounds.append(b.copy())
    lo, hi = bounds
    if np.isposinf(lo).any():
        k = int(np.flatnonzero(np.isposinf(lo))[0])
        raise ValueError(f"lower must be < +inf; got lower[{k}] = inf")
    if np.isneginf(hi).any():
        k = int(np.flatnonzero(np.isneginf(hi))[0])
        raise ValueError(f"upper must be > -inf; got upper[{k}] = -inf")
    if names is None:
        nm_t = tuple(f"constraint_{k}" for k in range(n_constraints))
    else:
        nm_t = tuple(str(s) for s in names)
        if len(nm_t) != n_constraints or len(set(nm_t)) != n_constraints:
            raise ValueError(f"names must hold K = {n_constraints} unique strings; got {list(nm_t)!r}")
    inverted = np.flatnonzero(lo > hi)
    if inverted.size:
        k = int(inverted[0])
        raise ValueError(
            f"lower must be <= upper for every constraint; got lower[{k}] = {float(lo[k])!r} > "
            f"upper[{k}] = {float(hi[k])!r} ({nm_t[k]})"
        )
    m: np.ndarray | None
    if mask is None:
        m = None
        n_vars = n_users * n_cand
    else:
        m = np.asarray(mask)
        if m.dtype != np.bool_:
            raise ValueError(f"mask must be a bool array; got dtype {m.dtype}")
        if m.shape != (n_users, n_cand):
            raise ValueError(f"mask must have shape (n_users, n_cand) = ({n_users}, {n_cand}); got {m.shape}")
        empty = np.flatnonzero(~m.any(axis=1))
        if empty.size:
            raise ValueError(
                f"mask must mark at least one real candidate per user; users without any: {empty[:10].tolist()}"
            )
        n_vars = int(m.sum())
        if n_vars == n_users * n_cand:
            m = None
    _check_finite_chunked("value", v, n_users)
    _check_finite_chunked("exposure", a, n_users)
    return _Problem(v, a, w, lo, hi, m, nm_t, n_users, n_cand, n_constraints, n_vars)


def _chunks(n: int, size: int = CHUNK_USERS) -> Iterator[tuple[int, int]]:
    for i0 in range(0, n, size):
        yield i0, min(n, i0 + size)


# ----------------------------------------------------------------------------------------------
# Vectorised passes shared by plan_lp and plan_dual
# ----------------------------------------------------------------------------------------------


def _scores(p: _Problem, i0: int, i1: int, prices_c: np.ndarray, *, exact: bool = False) -> np.ndarray:
    """float64 (i1-i0, n_cand) scores ``value + exposure @ prices``, -inf on padding.

    With float32 exposure the product is float32 (~1e-7 relative) unless ``exact``, which
    converts the block to float64 first (for certificates).
    """
    a2 = p.exposure[i0:i1].reshape((i1 - i0) * p.n_cand, p.n_constraints)
    if exact and a2.dtype != np.float64:
        a2 = a2.astype(np.float64)
        prices_c = np.asarray(prices_c, dtype=np.float64)
    s = (a2 @ prices_c).reshape(i1 - i0, p.n_cand).astype(np.float64, copy=False)
    s = s + p.value[i0:i1]
    if p.mask is not None:
        np.putmask(s, ~p.mask[i0:i1], -np.inf)
    return s


def _prices_cast(p: _Problem, prices: np.ndarray) -> np.ndarray:
    # float32 exposure times float64 prices would make numpy upcast (copy) every block
    return np.asarray(prices, dtype=p.exposure.dtype)


def _multipliers(p: _Problem, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split signed prices into floor multipliers alpha >= 0 and cap multipliers beta >= 0."""
    alpha = np.where(np.isfinite(p.lower), np.maximum(prices, 0.0), 0.0)
    beta = np.where(np.isfinite(p.upper), np.maximum(-prices, 0.0), 0.0)
    return alpha, beta


def _bound_term(p: _Problem, prices: np.ndarray) -> float:
    """``-alpha @ lower + beta @ upper``; +inf when a price pushes towards an absent bound."""
    alpha, beta = _multipliers(p, prices)
    if not np.array_equal(alpha - beta, prices):
        return math.inf
    lo = np.where(alpha > 0, p.lower, 0.0)
    hi = np.where(beta > 0, p.upper, 0.0)
    return float(-alpha @ lo + beta @ hi)


def _lagrangian_bound(p: _Problem, prices: np.ndarray) -> float:
    """Lagrangian upper bound ``sum_u w_u max_l (v + a @ prices) - alpha @ lower + beta @ upper``,
    in float64 whatever the input dtype (it certifies the gap)."""
    pc = np.asarray(prices, dtype=np.float64)
    total = 0.0
    for i0, i1 in _chunks(p.n_users):
        total += float(p.weight[i0:i1] @ _scores(p, i0, i1, pc, exact=True).max(axis=1))
    return total + _bound_term(p, np.asarray(prices, dtype=np.float64))


def _objective_and_shares(p: _Problem, x: np.ndarray) -> tuple[float, np.ndarray]:
    obj = 0.0
    shares = np.zeros(p.n_constraints)
    for i0, i1 in _chunks(p.n_users):
        wx = x[i0:i1] * p.weight[i0:i1, None]
        obj += float(np.sum(wx * p.value[i0:i1]))
        shares += wx.reshape(-1) @ p.exposure[i0:i1].reshape((i1 - i0) * p.n_cand, p.n_constraints).astype(
            np.float64
        )
    return obj, shares


def _violation(p: _Problem, shares: np.ndarray) -> float:
    if p.n_constraints == 0:
        return 0.0
    return float(max(0.0, np.max(p.lower - shares), np.max(shares - p.upper)))


def _rel_gap(bound: float, obj: float) -> float:
    return max(0.0, (bound - obj) / max(abs(bound), abs(obj), 1e-12))


def _achievable_range(p: _Problem) -> tuple[np.ndarray, np.ndarray]:
    """Per constraint, the min and max share any layout mix reaches (each user alone at its extreme)."""
    lo = np.zeros(p.n_constraints)
    hi = np.zeros(p.n_constraints)
    for i0, i1 in _chunks(p.n_users):
        a = p.exposure[i0:i1]
        w = p.weight[i0:i1]
        if p.mask is None:
            hi += w @ a.max(axis=1)
            lo += w @ a.min(axis=1)
        else:
            mk = p.mask[i0:i1, :, None]
            hi += w @ np.where(mk, a, -np.inf).max(axis=1)
            lo += w @ np.where(mk, a, np.inf).min(axis=1)
    return lo, hi


def _precheck(p: _Problem) -> InfeasibilityDiagnosis | None:
    """Bounds that fail on their own: a floor above the max reachable share, a cap below the min."""
    if p.n_constraints == 0:
        return None
    reach_lo, reach_hi = _achievable_range(p)
    slack = 1e-12
    floors = np.flatnonzero(p.lower > reach_hi + slack)
    caps = np.flatnonzero(p.upper < reach_lo - slack)
    if floors.size == 0 and caps.size == 0:
        return None
    relax = [Relaxation(p.names[k], "min", float(p.lower[k]), float(reach_hi[k])) for k in floors]
    relax += [Relaxation(p.names[k], "max", float(p.upper[k]), float(reach_lo[k])) for k in caps]
    relax.sort(key=lambda r: p.names.index(r.name))
    new_lo = p.lower.copy()
    new_hi = p.upper.copy()
    new_lo[floors] = reach_hi[floors]
    new_hi[caps] = reach_lo[caps]
    total = float(np.sum(p.lower[floors] - reach_hi[floors]) + np.sum(reach_lo[caps] - p.upper[caps]))
    conflicting = tuple(r.name for r in relax)
    return InfeasibilityDiagnosis(
        conflicting=conflicting,
        relaxations=tuple(relax),
        # one bound beyond its reach: moving it alone is the fix; two or more: no single move is
        alternatives=tuple(relax) if len(relax) == 1 else (),
        relaxed_lower=new_lo,
        relaxed_upper=new_hi,
        total_relaxation=total,
        method="precheck",
    )


def _joint(p: _Problem, pre: InfeasibilityDiagnosis,
           diagnose: Callable[[_Problem], InfeasibilityDiagnosis]) -> InfeasibilityDiagnosis:
    """``pre`` (each bound beyond its own reach moved to it) checked against the other bounds: when the
    bounds so moved still cannot all hold together (two module floors each at its module's reach, and a
    category floor besides), the relaxation is ``diagnose``'s of that problem added to it. Without this
    check, a dry run suggested a relaxation that was itself infeasible."""
    moved = p._replace(lower=pre.relaxed_lower, upper=pre.relaxed_upper)
    more = diagnose(moved)
    if more.total_relaxation <= _REPORT_TOL * max(1, p.n_constraints):
        return pre
    lo, hi = more.relaxed_lower, more.relaxed_upper
    relax = [Relaxation(p.names[k], "min", float(p.lower[k]), float(lo[k]))
             for k in np.flatnonzero(lo < p.lower - _REPORT_TOL)]
    relax += [Relaxation(p.names[k], "max", float(p.upper[k]), float(hi[k]))
              for k in np.flatnonzero(hi > p.upper + _REPORT_TOL)]
    relax.sort(key=lambda r: (p.names.index(r.name), r.side == "max"))
    fl, fu = np.isfinite(p.lower), np.isfinite(p.upper)
    total = float(np.sum(np.where(fl, np.where(fl, p.lower, 0.0) - np.where(fl, lo, 0.0), 0.0))
                  + np.sum(np.where(fu, np.where(fu, hi, 0.0) - np.where(fu, p.upper, 0.0), 0.0)))
    return InfeasibilityDiagnosis(
        conflicting=tuple(dict.fromkeys((*pre.conflicting, *more.conflicting))),
        relaxations=tuple(relax),
        alternatives=pre.alternatives if len(relax) == 1 else (),
        relaxed_lower=lo,
        relaxed_upper=hi,
        total_relaxation=total,
        method=f"precheck+{more.method}",
    )


# ----------------------------------------------------------------------------------------------
# Exact LP: PuLP + HiGHS
# ----------------------------------------------------------------------------------------------


class _LpModel(NamedTuple):
    prob: pulp.LpProblem
    xs: list[pulp.LpVariable]
    users: np.ndarray  # (n_vars,) user of each variable
    cands: np.ndarray  # (n_vars,) candidate of each variable
    rows: dict[tuple[int, str], pulp.LpConstraint]  # (k, "min"|"max") -> row
    slacks: dict[tuple[int, str], pulp.LpVariable]  # elastic only
    scale: float


def _build_lp(p: _Problem, *, elastic: bool) -> _LpModel:
    """The planning LP as a PuLP model, rows scaled by ``n_users`` so coefficients are O(1).

    The objective is *minimised* (``-value``, or total slack when ``elastic``) so that the
    row duals follow HiGHS's minimisation convention: ``pi = d objective / d rhs``.
    Scaling the objective and the rows by the same factor leaves the duals in value units.
    """
    scale = float(p.n_users)
    prob = pulp.LpProblem("homepage_plan_elastic" if elastic else "homepage_plan", pulp.LpMinimize)
    if p.mask is None:
        users = np.repeat(np.arange(p.n_users), p.n_cand)
        cands = np.tile(np.arange(p.n_cand), p.n_users)
    else:
        users, cands = np.nonzero(p.mask)
    xs = [
        prob.add_variable(f"x_{u}_{c}", lowBound=0)
        for u, c in zip(users.tolist(), cands.tolist(), strict=True)
    ]
    sw = scale * p.weight[users]
    # one row per user: sum_l x[u, l] = 1 (users are contiguous in `users`)
    starts = np.searchsorted(users, np.arange(p.n_users + 1))
    for u in range(p.n_users):
        seg = xs[starts[u] : starts[u + 1]]
        prob.addConstraint(
            pulp.LpConstraint(
                pulp.LpAffineExpression([(x, 1.0) for x in seg]), pulp.LpConstraintEQ, f"one_{u}", 1.0
            )
        )
    rows: dict[tuple[int, str], pulp.LpConstraint] = {}
    slacks: dict[tuple[int, str], pulp.LpVariable] = {}
    coef_all = sw[:, None] * p.exposure[users, cands].astype(np.float64)  # (n_vars, K)
    for k in range(p.n_constraints):
        coef = coef_all[:, k]
        nz = np.flatnonzero(coef)
        terms = [(xs[i], c) for i, c in zip(nz.tolist(), coef[nz].tolist(), strict=True)]
        for side, bound, sense, sign in (
            ("min", p.lower[k], pulp.LpConstraintGE, 1.0),
            ("max", p.upper[k], pulp.LpConstraintLE, -1.0),
        ):
            if not np.isfinite(bound):
                continue
            expr = pulp.LpAffineExpression(terms)
            if elastic:
                s = prob.add_variable(f"slack_{side}_{k}", lowBound=0)
                slacks[(k, side)] = s
                expr = expr + sign * scale * s
            row = pulp.LpConstraint(expr, sense, f"{side}_{k}", scale * float(bound))
            prob.addConstraint(row)
            rows[(k, side)] = row
    if elastic:
        prob.setObjective(pulp.LpAffineExpression([(s, scale) for s in slacks.values()]))
    else:
        obj = -sw * p.value[users, cands].astype(np.float64)
        prob.setObjective(pulp.LpAffineExpression(list(zip(xs, obj.tolist(), strict=True))))
    return _LpModel(prob, xs, users, cands, rows, slacks, scale)


def _highs(method: str, time_limit: float | None) -> pulp.HiGHS:
    opts: dict[str, Any] = {"solver": method}
    if method == "ipm":
        opts["run_crossover"] = "on"  # a vertex: few fractional users, exact duals
    return pulp.HiGHS(msg=False, timeLimit=time_limit, **opts)


def _highs_info(prob: pulp.LpProblem) -> tuple[str, int]:
    h = prob.solverModel
    info = h.getInfo()
    iters = (
        int(info.simplex_iteration_count)
        + int(info.ipm_iteration_count)
        + int(info.crossover_iteration_count)
    )
    return h.modelStatusToString(h.getModelStatus()), iters


_SETTLED = ("Optimal", "Infeasible", "Time limit reached")


def _solve(prob: pulp.LpProblem, method: str, time_limit: float | None) -> tuple[str, int, str, float]:
    """Solve; returns (HiGHS model status, iterations, method used, HiGHS run seconds).

    HiGHS's interior point can end in "Solve error" on an infeasible LP instead of proving it;
    the dual simplex then settles the question.
    """
    prob.solve(_highs(method, time_limit))
    status, iters = _highs_info(prob)
    run_s = float(prob.solverModel.getRunTime())
    if status not in _SETTLED and method == "ipm":
        prob.solve(_highs("simplex", time_limit))
        status, more = _highs_info(prob)
        iters += more
        run_s += float(prob.solverModel.getRunTime())
        method = "ipm->simplex"
    return status, iters, method, run_s


def plan_lp(
    value: np.ndarray,
    exposure: np.ndarray,
    weight: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    names: Sequence[str] | None = None,
    time_limit: float | None = None,
    method: str = "ipm",
) -> Plan:
    """Solve the planning LP exactly with PuLP + HiGHS.

    ``max sum_u w_u sum_l x[u,l] v[u,l]`` s.t. ``sum_l x[u,l] = 1``, ``x >= 0``,
    ``lower_k <= sum_u w_u sum_l x[u,l] a[u,l,k] <= upper_k``.

    Parameters
    ----------
    value
        Shape (n_users, n_cand). Expected value of each candidate layout.
    exposure
        Shape (n_users, n_cand, K). Exposure vector of each candidate.
    weight
        Shape (n_users,). Traffic share of each user; >= 0, sums to 1.
    lower, upper
        Shape (K,). Floors and caps on the traffic-weighted exposure; ``-inf`` / ``+inf``
        where absent. ``lower <= upper``.
    mask
        Shape (n_users, n_cand), bool. False marks padding (no variable is created).
    names
        K constraint names, used in diagnoses. Default ``constraint_k``.
    time_limit
        Seconds for HiGHS. On expiry the best point is returned with ``status="time_limit"``.
    method
        ``"ipm"`` (the default: HiGHS interior point, then crossover to a vertex so that at
        most K users are split and the duals are exact) or ``"simplex"`` (HiGHS dual
        simplex). On this structure, thousands of one-row users plus K dense rows, the
        interior point is ~7x faster at 1e5 variables and equal at 1e4 (``bench/plan.py``).

    Returns
    -------
    Plan
        ``prices = pi(floor row) + pi(cap row)`` from HiGHS's row duals of the minimisation
        ``min -value`` (``pi >= 0`` on a binding ``>=`` row, ``<= 0`` on a binding ``<=`` row).

    Raises
    ------
    InfeasiblePlan
        When the bounds cannot all hold; ``.diagnosis`` comes from the pre-check or from an
        elastic LP (one slack per bound, minimum total slack).

    Examples
    --------
    One user, layouts worth 3 and 1, only the second exposes the category; floor 1/3:

    >>> plan = plan_lp(np.array([[3.0, 1.0]]), np.array([[[0.0], [1.0]]]), np.array([1.0]),
    ...                np.array([1 / 3]), np.array([np.inf]))
    >>> round(plan.objective, 9), plan.prices.round(9).tolist(), plan.x.round(9).tolist()
    (2.333333333, [2.0], [[0.666666667, 0.333333333]])
    """
    if method not in _LP_METHODS:
        raise ValueError(f"method must be one of {_LP_METHODS}; got {method!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds or None; got {time_limit!r}")
    p = _validate(value, exposure, weight, lower, upper, mask, names)
    pre = _precheck(p)
    if pre is not None:
        raise InfeasiblePlan(_joint(p, pre, lambda q: _diagnose_elastic_lp(q, method, time_limit)))
    t0 = time.perf_counter()
    model = _build_lp(p, elastic=False)
    model_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hstatus, iters, used, solve_s = _solve(model.prob, method, time_limit)
    call_s = time.perf_counter() - t0
    # solve_s is HiGHS's own clock; the rest of the call is PuLP handing the model over
    build_s = model_s + max(0.0, call_s - solve_s)
    if hstatus in ("Infeasible", "Primal infeasible or unbounded"):
        raise InfeasiblePlan(_diagnose_elastic_lp(p, method, time_limit))
    if hstatus == "Time limit reached":
        status = "time_limit"
    elif hstatus == "Optimal":
        status = "optimal"
    else:
        raise RuntimeError(f"HiGHS could not solve the plan: model status {hstatus!r}")
    sol = model.prob.solverModel.getSolution()
    if not sol.value_valid:
        raise RuntimeError(
            f"plan_lp hit time_limit={time_limit!r}s before HiGHS found a solution; "
            "raise time_limit or use plan_dual"
        )
    x = np.zeros((p.n_users, p.n_cand))
    x[model.users, model.cands] = np.fromiter((v.varValue for v in model.xs), float, len(model.xs))
    np.clip(x, 0.0, None, out=x)
    prices = np.zeros(p.n_constraints)
    for (k, _side), row in model.rows.items():
        prices[k] += float(row.pi or 0.0)
    prices = _clean_prices(p, prices)
    obj, shares = _objective_and_shares(p, x)
    bound = _lagrangian_bound(p, prices)
    return Plan(
        prices=prices,
        objective=obj,
        shares=shares,
        x=x,
        status=status,
        gap=_rel_gap(bound, obj),
        violation=_violation(p, shares),
        dual_bound=bound,
        n_vars=p.n_vars,
        build_s=build_s,
        solve_s=solve_s,
        iterations=iters,
        method=f"pulp-highs-{used}",
        names=p.names,
    )


def _clean_prices(p: _Problem, prices: np.ndarray) -> np.ndarray:
    """Zero solver noise of the wrong sign (a floor price may only be >= 0, a cap price <= 0)."""
    out = prices.copy()
    out[~np.isfinite(p.lower) & (out > 0)] = 0.0
    out[~np.isfinite(p.upper) & (out < 0)] = 0.0
    return out


def _diagnose_elastic_lp(p: _Problem, method: str, time_limit: float | None) -> InfeasibilityDiagnosis:
    """Elastic LP: one slack per bound, ``min sum slack``; then each conflicting bound alone."""
    model = _build_lp(p, elastic=True)
    prob = model.prob
    hstatus, _, _, _ = _solve(prob, method, time_limit)
    if hstatus != "Optimal":
        raise RuntimeError(f"elastic LP for the infeasibility diagnosis did not solve: {hstatus!r}")
    slack = {key: max(0.0, float(s.varValue or 0.0)) for key, s in model.slacks.items()}
    duals = {key: float(row.pi or 0.0) for key, row in model.rows.items()}
    # support of the Farkas certificate (+ every bound that moved)
    in_conflict = sorted(
        {key for key in model.rows if abs(duals[key]) > 1e-7 or slack[key] > _REPORT_TOL},
        key=lambda kv: (kv[0], kv[1] == "max"),
    )
    new_lo = p.lower.copy()
    new_hi = p.upper.copy()
    relax = []
    for k, side in in_conflict:
        s = slack[(k, side)]
        if s <= _REPORT_TOL:
            continue
        if side == "min":
            new_lo[k] = p.lower[k] - s
            relax.append(Relaxation(p.names[k], "min", float(p.lower[k]), float(new_lo[k])))
        else:
            new_hi[k] = p.upper[k] + s
            relax.append(Relaxation(p.names[k], "max", float(p.upper[k]), float(new_hi[k])))
    total = float(sum(slack.values()))
    # each conflicting bound alone: min its slack with every other slack fixed at 0
    alternatives = []
    for key in in_conflict:
        for other, s_var in model.slacks.items():
            s_var.upBound = None if other == key else 0.0
        prob.setObjective(pulp.LpAffineExpression([(model.slacks[key], model.scale)]))
        st, _, _, _ = _solve(prob, method, time_limit)
        if st != "Optimal":
            continue
        k, side = key
        s = max(0.0, float(model.slacks[key].varValue or 0.0))
        bound = p.lower[k] - s if side == "min" else p.upper[k] + s
        cur = p.lower[k] if side == "min" else p.upper[k]
        alternatives.append(Relaxation(p.names[k], side, float(cur), float(bound)))
    return InfeasibilityDiagnosis(
        conflicting=tuple(dict.fromkeys(p.names[k] for k, _ in in_conflict)),
        relaxations=tuple(relax),
        alternatives=tuple(alternatives),
        relaxed_lower=new_lo,
        relaxed_upper=new_hi,
        total_relaxation=total,
        method="elastic-lp",
    )


# ----------------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------------


def choose(value: np.ndarray, exposure: np.ndarray, prices: np.ndarray) -> int:
    """Index of the candidate maximising ``value + exposure @ prices`` (first on ties).

    >>> choose(np.array([3.0, 1.0]), np.array([[0.0], [1.0]]), np.array([2.5]))
    1

    Parameters
    ----------
    value
        Shape (n_cand,).
    exposure
        Shape (n_cand, K).
    prices
        Shape (K,), e.g. ``Plan.prices``.
    """
    # one request on the serving path: no validation beyond what numpy does itself
    return int(np.argmax(value + exposure @ prices))


def choose_batch(
    value: np.ndarray, exposure: np.ndarray, prices: np.ndarray, mask: np.ndarray | None = None
) -> np.ndarray:
    """Vectorised :func:`choose`: shape (n, n_cand), (n, n_cand, K), (K,) -> (n,) int64.

    Padding (``mask`` False) is never chosen.
    """
    value = np.asarray(value)
    exposure = np.asarray(exposure)
    prices = np.asarray(prices, dtype=np.float64)
    if value.ndim != 2 or exposure.shape != value.shape + prices.shape:
        raise ValueError(
            f"exposure must have shape value.shape + prices.shape = {value.shape + prices.shape}; "
            f"got {exposure.shape}"
        )
    n, n_cand = value.shape
    out = np.empty(n, dtype=np.int64)
    pc = prices.astype(exposure.dtype, copy=False) if exposure.dtype == np.float32 else prices
    for i0, i1 in _chunks(n):
        s = (exposure[i0:i1].reshape((i1 - i0) * n_cand, prices.size) @ pc).reshape(i1 - i0, n_cand) + value[
            i0:i1
        ]
        if mask is not None:
            np.putmask(s, ~np.asarray(mask[i0:i1], dtype=bool), -np.inf)
        out[i0:i1] = np.argmax(s, axis=1)
    return out
