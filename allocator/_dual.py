"""Large-scale planning: the entropy-smoothed Lagrangian dual over the K prices.

Only the K exposure rows couple users, so the Lagrangian dual of the planning LP is
K-dimensional whatever the number of users.  With floor multipliers ``alpha >= 0``, cap
multipliers ``beta >= 0`` and prices ``lambda = alpha - beta``::

    g(alpha, beta) = sum_u w_u max_l (v[u,l] + a[u,l] @ lambda) - alpha @ lower + beta @ upper

is an upper bound on the LP optimum for *every* such point (weak duality), and its minimum
equals the optimum (strong duality).  ``g`` is piecewise linear; replacing ``max`` by the
soft maximum ``tau * logsumexp(. / tau)`` gives ``g_tau`` with ``g <= g_tau <= g + tau log n_cand``,
smooth, with gradient ``shares(softmax policy) - lower`` / ``upper - shares``: one vectorised
pass over the users per evaluation, minimised by L-BFGS-B under the sign bounds.
``g_tau`` is the dual of the entropy-regularised plan ``max sum_u w_u (x_u @ v_u + tau H(x_u))``,
so its minimiser's softmax policy meets the bounds exactly.

Exact plans (``temperature=None``): anneal ``tau`` down (0.1, 0.01, 0.001 of the value scale),
then *cross over*: users whose best and runner-up scores are more than ``delta`` apart take
their argmax; the few marginal users get an exact reduced LP (HiGHS via
``scipy.optimize.linprog``) over their near-best candidates, with the floors and caps less what
the fixed users already contribute.  The reduced LP's solution is feasible for the full LP,
its row duals are new prices, and ``g`` at those prices certifies the gap; if the certificate is
not within ``tol`` the band ``delta`` widens and the crossover repeats.

References
----------
Nesterov, Y. (2005). Smooth minimization of non-smooth functions. Math. Programming 103.
Zhong, W. et al. (2015). Stock constrained recommendation in Tmall. KDD (dual of allocation LPs).
Agrawal, S. et al. (2018). Proportional allocation: simple, distributed, and diverse matching with
high entropy. ICML (entropy-regularised allocation duals).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, TypeVar

import numpy as np

from allocator._plan import (
    InfeasibilityDiagnosis,
    InfeasiblePlan,
    Plan,
    Relaxation,
    _chunks,
    _diagnose_elastic_lp,
    _joint,
    _lagrangian_bound,
    _objective_and_shares,
    _precheck,
    _prices_cast,
    _Problem,
    _rel_gap,
    _scores,
    _validate,
    _violation,
)

__all__ = ["plan_dual"]

#: Annealing schedule for exact plans, as fractions of the value scale.
_TAUS = (1e-1, 1e-2, 1e-3)
#: Initial crossover band, in units of the last temperature.
_DELTA_PER_TAU = 10.0
_MAX_CROSSOVER_ROUNDS = 6
#: Above this many variables the reduced LP is not attempted (the softmax policy is returned).
_MAX_CROSSOVER_VARS = 400_000
#: Below this many variables an infeasible plan is diagnosed with the exact elastic LP.
_EXACT_DIAGNOSIS_VARS = 200_000


class _Infeasible(Exception):
    """Raised inside the dual minimisation once the dual bound proves infeasibility."""


class _Pass(NamedTuple):
    smooth: float  # sum_u w_u tau * logsumexp(scores / tau)
    hard: float  # sum_u w_u max_l scores
    shares: np.ndarray  # (K,) shares of the softmax policy


def _smoothed_pass(
    p: _Problem, prices: np.ndarray, tau: float, policy_out: np.ndarray | None = None
) -> _Pass:
    """One vectorised pass: soft and hard maxima of the scores and the softmax policy's shares."""
    pc = _prices_cast(p, prices)
    k = p.n_constraints
    smooth = 0.0
    hard = 0.0
    shares = np.zeros(k)
    inv_tau = 1.0 / tau
    for i0, i1 in _chunks(p.n_users):
        s = _scores(p, i0, i1, pc)
        w = p.weight[i0:i1]
        m = s.max(axis=1)
        hard += float(w @ m)
        s -= m[:, None]
        s *= inv_tau
        np.exp(s, out=s)
        z = s.sum(axis=1)
        smooth += float(w @ (m + tau * np.log(z)))
        s /= z[:, None]  # the softmax policy
        if policy_out is not None:
            policy_out[i0:i1] = s
        s *= w[:, None]
        a2 = p.exposure[i0:i1].reshape((i1 - i0) * p.n_cand, k)
        # float32 exposure: float32 products summed over one block only (~1e-7 relative)
        shares += s.reshape(-1).astype(a2.dtype, copy=False) @ a2
    return _Pass(smooth, hard, shares)


class _DualProblem:
    """The smoothed dual as a function of y = (alpha on finite floors, beta on finite caps)."""

    def __init__(self, p: _Problem, value_floor: float, scale: float, mult_cap: float | None = None) -> None:
        self.p = p
        self.floors = np.flatnonzero(np.isfinite(p.lower))
        self.caps = np.flatnonzero(np.isfinite(p.upper))
        self.n_floor = self.floors.size
        self.value_floor = value_floor
        self.scale = scale
        self.mult_cap = mult_cap
        self.tau = 1.0
        self.n_passes = 0
        self.n_iter = 0
        # rounding allowance on the infeasibility proof: float32 scores carry ~1e-7 relative error
        rel = 1e-5 if p.exposure.dtype == np.float32 or p.value.dtype == np.float32 else 1e-9
        self.margin = rel * (abs(value_floor) + scale) if math.isfinite(value_floor) else 0.0

    @property
    def n_mult(self) -> int:
        return int(self.floors.size + self.caps.size)

    def prices(self, y: np.ndarray) -> np.ndarray:
        lam = np.zeros(self.p.n_constraints)
        np.add.at(lam, self.floors, y[: self.n_floor])
        np.subtract.at(lam, self.caps, y[self.n_floor :])
        return lam

    def linear(self, y: np.ndarray) -> float:
        return float(
            -y[: self.n_floor] @ self.p.lower[self.floors] + y[self.n_floor :] @ self.p.upper[self.caps]
        )

    def __call__(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        lam = self.prices(y)
        r = _smoothed_pass(self.p, lam, self.tau)
        self.n_passes += 1
        lin = self.linear(y)
        bound = r.hard + lin
        if self.mult_cap is None and bound < self.value_floor - self.margin:
            # every feasible plan is worth >= value_floor, and bound >= the optimum: none exists
            raise _Infeasible
        grad = np.concatenate(
            [r.shares[self.floors] - self.p.lower[self.floors], self.p.upper[self.caps] - r.shares[self.caps]]
        )
        return r.smooth + lin, grad

    def minimise(self, y0: np.ndarray, tau: float, gtol: float, max_iter: int) -> np.ndarray:
        from scipy.optimize import minimize  # here, not at import: serving processes never plan

        self.tau = tau
        hi = self.mult_cap
        res = minimize(
            self,
            y0,
            jac=True,
            method="L-BFGS-B",
            bounds=[(0.0, hi)] * self.n_mult,
            options={"maxiter": max_iter, "maxfun": 4 * max_iter, "gtol": gtol, "ftol": 1e-15, "maxcor": 20},
        )
        self.n_iter += int(res.nit)
        return np.asarray(res.x, dtype=np.float64)


def _value_stats(p: _Problem) -> tuple[float, float]:
    """(sum_u w_u min_l v, sum_u w_u (max_l v - min_l v)) over real candidates."""
    floor = 0.0
    spread = 0.0
    for i0, i1 in _chunks(p.n_users):
        v = p.value[i0:i1].astype(np.float64)
        if p.mask is None:
            lo, hi = v.min(axis=1), v.max(axis=1)
        else:
            mk = p.mask[i0:i1]
            lo = np.where(mk, v, np.inf).min(axis=1)
            hi = np.where(mk, v, -np.inf).max(axis=1)
        w = p.weight[i0:i1]
        floor += float(w @ lo)
        spread += float(w @ (hi - lo))
    return floor, spread


class _Crossover(NamedTuple):
    x: np.ndarray
    objective: float
    shares: np.ndarray
    prices: np.ndarray | None  # reduced-LP duals, None when the reduced LP was infeasible
    n_lp_vars: int


def _split_marginal(p: _Problem, prices: np.ndarray, delta: float
                    ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray, np.ndarray]:
    """At ``prices``: each user's priced argmax; the value and shares of the users whose runner-up is
    more than ``delta`` behind (fixed at their argmax); the other (marginal) users' rows and, for each,
    which candidates are within ``delta`` of the best (n_marginal, n_cand)."""
    pc = _prices_cast(p, np.asarray(prices, dtype=np.float64))
    best = np.empty(p.n_users, dtype=np.int64)
    fixed_obj = 0.0
    fixed_shares = np.zeros(p.n_constraints)
    marg_users: list[np.ndarray] = []
    marg_near: list[np.ndarray] = []
    for i0, i1 in _chunks(p.n_users):
        s = _scores(p, i0, i1, pc)
        m = s.max(axis=1)
        am = s.argmax(axis=1)
        best[i0:i1] = am
        near = s >= (m - delta)[:, None]
        marg = near.sum(axis=1) >= 2
        wf = np.where(marg, 0.0, p.weight[i0:i1])
        rows = np.arange(i1 - i0)
        fixed_obj += float(wf @ p.value[i0:i1][rows, am])
        fixed_shares += wf @ p.exposure[i0:i1][rows, am].astype(np.float64)
        idx = np.flatnonzero(marg)
        if idx.size:
            marg_users.append(idx + i0)
            marg_near.append(near[idx])
    users = np.concatenate(marg_users) if marg_users else np.zeros(0, dtype=np.int64)
    near_all = np.concatenate(marg_near) if marg_near else np.zeros((0, p.n_cand), dtype=bool)
    return best, fixed_obj, fixed_shares, users, near_all


def _crossover(p: _Problem, prices: np.ndarray, delta: float, time_limit: float | None) -> _Crossover | None:
    """Fix users whose runner-up is more than ``delta`` behind; solve the rest exactly."""
    best, fixed_obj, fixed_shares, users, near_all = _split_marginal(p, prices, delta)
    x = np.zeros((p.n_users, p.n_cand))
    x[np.arange(p.n_users), best] = 1.0
    if users.size == 0:
        return _Crossover(x, fixed_obj, fixed_shares, None, 0) if _violation(p, fixed_shares) == 0.0 else None
    ui, li = np.nonzero(near_all)
    gu = users[ui]
    n_p = gu.size
    if n_p > _MAX_CROSSOVER_VARS:
        return None
    w = p.weight[gu]
    val = p.value[gu, li].astype(np.float64)
    expo = p.exposure[gu, li].astype(np.float64)
    red = _reduced_lp(p, ui, users.size, w, val, expo, float(p.weight[users].sum()), fixed_shares, time_limit)
    if red is None:
        return None
    z, lp_prices = red
    x[users] = 0.0
    x[gu, li] = z
    obj = fixed_obj + float((w * z) @ val)
    shares = fixed_shares + (w * z) @ expo
    return _Crossover(x, obj, shares, lp_prices, n_p)


def _reduced_lp(p: _Problem, ui: np.ndarray, n_users: int, w: np.ndarray, val: np.ndarray, expo: np.ndarray,
                w_marg: float, fixed_shares: np.ndarray, time_limit: float | None
                ) -> tuple[np.ndarray, np.ndarray] | None:
    """The crossover's exact LP over the marginal users' near-best candidates: variable j belongs to
    marginal user ``ui[j]`` (of ``n_users``), with traffic weight ``w[j]``, value ``val[j]`` and
    exposure ``expo[j]`` (K,); the bounds less ``fixed_shares``, what the fixed users contribute.
    Returns the solution ``z`` and its row duals as prices, or None when HiGHS finds no solution."""
    import scipy.sparse as sp
    from scipy.optimize import linprog

    k = p.n_constraints
    n_p = ui.size
    # scale rows and objective alike (duals unchanged) so that coefficients are O(1)
    sc = n_users / w_marg if w_marg > 0 else 1.0
    coef = (sc * w)[:, None] * expo  # (n_p, K)
    floors = np.flatnonzero(np.isfinite(p.lower))
    caps = np.flatnonzero(np.isfinite(p.upper))
    a_ub = np.concatenate([-coef[:, floors].T, coef[:, caps].T])
    b_ub = np.concatenate(
        [-sc * (p.lower[floors] - fixed_shares[floors]), sc * (p.upper[caps] - fixed_shares[caps])]
    )
    a_eq = sp.csr_array((np.ones(n_p), (ui, np.arange(n_p))), shape=(n_users, n_p))
    opts: dict[str, object] = {"presolve": True}
    if time_limit is not None:
        opts["time_limit"] = time_limit
    res = linprog(
        -(sc * w) * val,
        A_ub=sp.csr_array(a_ub) if a_ub.size else None,
        b_ub=b_ub if a_ub.size else None,
        A_eq=a_eq,
        b_eq=np.ones(n_users),
        bounds=(0.0, None),
        method="highs-ds" if n_p <= 50_000 else "highs-ipm",
        options=opts,
    )
    if res.status != 0:
        return None
    marginals = np.asarray(res.ineqlin.marginals) if a_ub.size else np.zeros(0)
    lp_prices = np.zeros(k)
    # floor rows were written as -share <= -(lower - fixed): alpha = -marginal; caps: beta = -marginal
    np.add.at(lp_prices, floors, -marginals[: floors.size])
    np.add.at(lp_prices, caps, marginals[floors.size :])
    only_lo = np.isfinite(p.lower) & ~np.isfinite(p.upper)
    only_hi = np.isfinite(p.upper) & ~np.isfinite(p.lower)
    lp_prices[only_lo] = np.maximum(lp_prices[only_lo], 0.0)
    lp_prices[only_hi] = np.minimum(lp_prices[only_hi], 0.0)
    return np.clip(res.x, 0.0, None), lp_prices


class _Crossed(Protocol):
    @property
    def objective(self) -> float: ...
    @property
    def shares(self) -> np.ndarray: ...
    @property
    def prices(self) -> np.ndarray | None: ...


_C = TypeVar("_C", bound=_Crossed)


def _check_args(tol: float, temperature: float | None, max_iter: int) -> None:
    if not tol > 0:
        raise ValueError(f"tol must be > 0; got {tol!r}")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float > 0 or None; got {temperature!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1; got {max_iter!r}")


def _anneal(dp: _DualProblem, scale: float, temperature: float | None, tol: float, max_iter: int,
            on_infeasible: Callable[[], None], start: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Minimise the smoothed dual down the temperature schedule; returns the prices and the last
    temperature. ``on_infeasible`` runs when the dual bound proves infeasibility: it raises, or relaxes
    ``dp`` for one more try at that temperature. With ``start`` (multipliers near the optimum, e.g. a
    sample's) only the last temperature is minimised, from there."""
    if temperature is None:
        taus = [scale * t for t in _TAUS]
    else:
        taus = [t for t in (scale * t for t in _TAUS) if t > temperature] + [float(temperature)]
    y = np.zeros(dp.n_mult)
    if start is not None:
        taus, y = taus[-1:], np.array(start, dtype=np.float64)
    for i, tau in enumerate(taus if dp.n_mult else ()):
        last = i == len(taus) - 1
        gtol = (tol if temperature is not None else 1e-6) if last else 1e-4
        try:
            y = dp.minimise(y, tau, gtol=gtol, max_iter=max_iter)
        except _Infeasible:
            on_infeasible()
            y = dp.minimise(y, tau, gtol=gtol, max_iter=max_iter)
    return dp.prices(y), taus[-1]


def _crossover_rounds(p: _Problem, dp: _DualProblem, prices: np.ndarray, tau: float, tol: float,
                      crossover: Callable[[np.ndarray, float], _C | None],
                      lagrangian: Callable[[np.ndarray], float]) -> tuple[tuple[float, float, _C] | None, float]:
    """Cross over at widening bands until the dual bound certifies the gap and the shares hold within
    ``tol``: the best crossover by (gap, violation), and the bound. ``lagrangian`` evaluates ``g`` (one
    pass each)."""
    delta = _DELTA_PER_TAU * tau
    center = prices
    best: tuple[float, float, _C] | None = None
    bound = math.inf
    smooth_checked = False
    for _ in range(_MAX_CROSSOVER_ROUNDS):
        cx = crossover(center, delta)
        dp.n_passes += 1
        if cx is not None:
            # the certificate: Lagrangian bounds at the crossover's and the smoothing's prices
            if cx.prices is not None:
                bound = min(bound, lagrangian(cx.prices))
            if _rel_gap(bound, cx.objective) > tol and not smooth_checked:
                bound = min(bound, lagrangian(prices))
                smooth_checked = True
            gap = _rel_gap(bound, cx.objective)
            viol = _violation(p, cx.shares)
            if best is None or (gap, viol) < (best[0], best[1]):
                best = (gap, viol, cx)
            if gap <= tol and viol <= tol:
                break
            if cx.prices is not None:
                center = cx.prices
        delta *= 4.0
    return best, bound


def _diagnose_dual(p: _Problem, scale: float, max_iter: int) -> InfeasibilityDiagnosis:
    """Elastic plan through the same smoothed dual: ``value = 0``, multipliers boxed in [0, 1].

    ``min_{0 <= alpha, beta <= 1} sum_u w_u max_l a[u,l] @ lambda - alpha @ lower + beta @ upper``
    equals ``-(smallest total relaxation)``.  The softmax policy at the last temperature is a
    witness: moving each violated bound to that policy's share makes the plan feasible, and the
    total move exceeds the minimum by at most ``tau * log(n_cand)``.
    """
    zero = p._replace(value=np.broadcast_to(np.zeros((1, 1), dtype=p.exposure.dtype), (p.n_users, p.n_cand)))
    dp = _DualProblem(zero, value_floor=-math.inf, scale=1.0, mult_cap=1.0)
    y = np.zeros(dp.n_mult)
    a_scale = 1.0
    taus = [a_scale * t for t in (1e-1, 1e-2, 1e-3, 1e-4)]
    for tau in taus:
        y = dp.minimise(y, tau, gtol=1e-9, max_iter=max_iter)
    policy = np.empty((p.n_users, p.n_cand))
    _smoothed_pass(zero, dp.prices(y), taus[-1], policy_out=policy)
    _, shares = _objective_and_shares(p, policy)
    new_lo = np.where(np.isfinite(p.lower), np.minimum(p.lower, shares), p.lower)
    new_hi = np.where(np.isfinite(p.upper), np.maximum(p.upper, shares), p.upper)
    relax: list[Relaxation] = []
    conflicting: list[str] = []
    mult = np.zeros((p.n_constraints, 2))
    mult[dp.floors, 0] = y[: dp.n_floor]
    mult[dp.caps, 1] = y[dp.n_floor :]
    for k in range(p.n_constraints):
        moved_lo = new_lo[k] < p.lower[k] - 1e-9
        moved_hi = new_hi[k] > p.upper[k] + 1e-9
        if moved_lo or moved_hi or mult[k].max() > 1e-3:
            conflicting.append(p.names[k])
        if moved_lo:
            relax.append(Relaxation(p.names[k], "min", float(p.lower[k]), float(new_lo[k])))
        else:
            new_lo[k] = p.lower[k]
        if moved_hi:
            relax.append(Relaxation(p.names[k], "max", float(p.upper[k]), float(new_hi[k])))
        else:
            new_hi[k] = p.upper[k]
    fin_lo = np.isfinite(p.lower)
    fin_hi = np.isfinite(p.upper)
    total = float(np.sum(p.lower[fin_lo] - new_lo[fin_lo]) + np.sum(new_hi[fin_hi] - p.upper[fin_hi]))
    return InfeasibilityDiagnosis(
        conflicting=tuple(conflicting),
        relaxations=tuple(relax),
        alternatives=(),
        relaxed_lower=new_lo,
        relaxed_upper=new_hi,
        total_relaxation=total,
        method="elastic-dual",
    )


def _diagnose(p: _Problem, scale: float, max_iter: int) -> InfeasibilityDiagnosis:
    if p.n_vars <= _EXACT_DIAGNOSIS_VARS:
        return _diagnose_elastic_lp(p, "ipm", None)
    return _diagnose_dual(p, scale, max_iter)


def plan_dual(
    value: np.ndarray,
    exposure: np.ndarray,
    weight: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    names: Sequence[str] | None = None,
    tol: float = 1e-6,
    temperature: float | None = None,
    max_iter: int = 500,
    time_limit: float | None = None,
) -> Plan:
    """Solve the planning LP at scale through its K-dimensional smoothed dual.

    Parameters
    ----------
    value, exposure, weight, lower, upper, mask, names
        As in :func:`allocator.plan_lp`. ``value`` and ``exposure`` may be float32 and are not
        copied (a non-contiguous ``exposure`` is copied once); padding must be finite.
    tol
        Target relative duality gap and largest constraint violation (share units).
    temperature
        None (default): the exact LP plan, ``tau`` annealed then crossed over to a vertex.
        A float ``tau > 0`` (value units): the entropy-regularised plan at that temperature,
        ``x[u] = softmax((value[u] + exposure[u] @ prices) / tau)`` -- the serving policy that
        samples from the softmax of the dual-adjusted scores (a propensity for free) and meets
        the bounds exactly; ``gap`` then reports what the smoothing costs against the LP bound.
    max_iter
        L-BFGS-B iterations per temperature.
    time_limit
        Seconds for each reduced LP of the crossover.

    Returns
    -------
    Plan
        ``iterations`` counts passes over the data; ``gap`` is certified by the best dual
        bound seen, ``(g(lambda) - objective) / |g(lambda)|``.

    Raises
    ------
    InfeasiblePlan
        When the pre-check fails or the dual bound falls below ``sum_u w_u min_l v`` (a proof
        that no plan meets the bounds); the diagnosis is the exact elastic LP up to 2e5
        variables, the elastic smoothed dual above.

    Examples
    --------
    >>> plan = plan_dual(np.array([[3.0, 1.0]]), np.array([[[0.0], [1.0]]]), np.array([1.0]),
    ...                  np.array([1 / 3]), np.array([np.inf]))
    >>> round(plan.objective, 9), plan.prices.round(9).tolist(), plan.status
    (2.333333333, [2.0], 'optimal')
    """
    _check_args(tol, temperature, max_iter)
    t0 = time.perf_counter()
    p = _validate(value, exposure, weight, lower, upper, mask, names)
    value_floor, spread = _value_stats(p)
    scale = spread if spread > 0 else 1.0
    pre = _precheck(p)
    if pre is not None:
        raise InfeasiblePlan(_joint(p, pre, lambda q: _diagnose(q, scale, max_iter)))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dp = _DualProblem(p, value_floor, scale)

    def relax() -> None:
        diag = _diagnose(p, scale, max_iter)
        if diag.total_relaxation > tol:
            raise InfeasiblePlan(diag) from None
        dp.value_floor = -math.inf  # numerically feasible (within tol): carry on without the proof check

    prices, tau = _anneal(dp, scale, temperature, tol, max_iter, relax)
    if temperature is not None:
        return _softmax_plan(p, dp, prices, tau, tol, build_s, t0, exact=False)

    # ---- exact plan: crossover to a vertex, certified by the dual bound ----
    def lagrangian(at: np.ndarray) -> float:
        dp.n_passes += 1
        return _lagrangian_bound(p, at)

    def cross(center: np.ndarray, delta: float) -> _Crossover | None:
        return _crossover(p, center, delta, time_limit)

    best, bound = _crossover_rounds(p, dp, prices, tau, tol, cross, lagrangian)
    if best is not None and best[1] <= tol:
        gap, viol, cx = best
        status = "optimal" if gap <= tol else "iteration_limit"
        out_prices = cx.prices if cx.prices is not None else prices
        return Plan(
            prices=out_prices,
            objective=cx.objective,
            shares=cx.shares,
            x=cx.x,
            status=status,
            gap=gap,
            violation=viol,
            dual_bound=bound,
            n_vars=p.n_vars,
            build_s=build_s,
            solve_s=time.perf_counter() - t0,
            iterations=dp.n_passes,
            method="dual-lbfgs+crossover",
            names=p.names,
        )
    plan = _softmax_plan(p, dp, prices, tau, tol, build_s, t0, exact=True)
    if plan.violation > max(tol, 1e-6):
        diag = _diagnose(p, scale, max_iter)
        if diag.total_relaxation > tol:
            raise InfeasiblePlan(diag)
    return plan


def _softmax_plan(
    p: _Problem,
    dp: _DualProblem,
    prices: np.ndarray,
    tau: float,
    tol: float,
    build_s: float,
    t0: float,
    *,
    exact: bool,
) -> Plan:
    """The softmax policy at ``tau``: the answer in temperature mode, the fallback otherwise
    (where ``status`` also requires the gap to the LP bound within ``tol``)."""
    x = np.empty((p.n_users, p.n_cand))
    _smoothed_pass(p, prices, tau, policy_out=x)
    bound = _lagrangian_bound(p, prices)
    dp.n_passes += 2
    obj, shares = _objective_and_shares(p, x)
    viol = _violation(p, shares)
    gap = _rel_gap(bound, obj)
    ok = viol <= tol and (gap <= tol or not exact)
    return Plan(
        prices=prices,
        objective=obj,
        shares=shares,
        x=x,
        status="optimal" if ok else "iteration_limit",
        gap=gap,
        violation=viol,
        dual_bound=bound,
        n_vars=p.n_vars,
        build_s=build_s,
        solve_s=time.perf_counter() - t0,
        iterations=dp.n_passes,
        method=f"dual-lbfgs-softmax(tau={tau:.3g})",
        names=p.names,
    )
