"""Planning LP (PuLP + HiGHS), the smoothed-dual solver, infeasibility diagnosis and serving.

References used: hand-solved LPs, enumeration of the K-dimensional dual's vertices, brute force
over integer assignments, scipy.optimize.linprog on an independently built matrix, and the two
solvers against each other.
"""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import linprog

import allocator._dual as dual_module
from allocator._dual import _diagnose_dual, plan_dual
from allocator._plan import InfeasiblePlan, Plan, _validate, choose, choose_batch, plan_lp

SOLVERS = {"lp": plan_lp, "dual": plan_dual}


# ----------------------------------------------------------------------------------------------
# instances and references
# ----------------------------------------------------------------------------------------------


def random_instance(rng, n_users, n_cand, k, *, mask=False, zero_weights=False, loose=True, dtype=np.float64):
    """Random plan whose bounds are met by a random mixed policy (feasible) but not by the
    unconstrained argmax (binding); with ``loose``, the last bound is one that must stay slack."""
    value = rng.standard_normal((n_users, n_cand))
    exposure = rng.random((n_users, n_cand, k))
    weight = rng.random(n_users) + 0.1
    if zero_weights:
        weight[rng.random(n_users) < 0.2] = 0.0
    weight /= weight.sum()
    m = None
    if mask:
        m = rng.random((n_users, n_cand)) < 0.7
        m[np.arange(n_users), rng.integers(0, n_cand, n_users)] = True
        value = np.where(m, value, 50.0)  # padding would win if it were not masked out
        exposure = np.where(m[:, :, None], exposure, 0.0)
    real = np.ones((n_users, n_cand), bool) if m is None else m
    mix = rng.dirichlet(np.ones(n_cand), size=n_users) * real
    mix /= mix.sum(axis=1, keepdims=True)
    s_mix = weight @ np.einsum("ul,ulk->uk", mix, exposure)
    best = np.where(real, value, -np.inf).argmax(axis=1)
    s_best = weight @ exposure[np.arange(n_users), best]
    lower = np.full(k, -np.inf)
    upper = np.full(k, np.inf)
    theta = rng.uniform(0.3, 0.9, size=k)
    target = s_best + theta * (s_mix - s_best)
    for j in range(k - 1 if loose else k):
        if s_mix[j] > s_best[j]:
            lower[j] = target[j]
        else:
            upper[j] = target[j]
    if loose:
        lower[k - 1] = min(s_best[k - 1], s_mix[k - 1]) - 0.05
    return value.astype(dtype), exposure.astype(dtype), weight, lower, upper, m


def linprog_reference(value, exposure, weight, lower, upper, mask=None):
    """The same LP through scipy's linprog, built independently (dense rows, no scaling)."""
    n, c, k = exposure.shape
    real = np.ones((n, c), bool) if mask is None else mask
    u, cand = np.nonzero(real)
    a_eq = sp.csr_array((np.ones(u.size), (u, np.arange(u.size))), shape=(n, u.size))
    coef = weight[u, None] * exposure[u, cand].astype(np.float64)
    rows, rhs = [], []
    for j in range(k):
        if np.isfinite(lower[j]):
            rows.append(-coef[:, j])
            rhs.append(-lower[j])
        if np.isfinite(upper[j]):
            rows.append(coef[:, j])
            rhs.append(upper[j])
    res = linprog(
        -weight[u] * value[u, cand],
        A_ub=np.array(rows) if rows else None,
        b_ub=np.array(rhs) if rows else None,
        A_eq=a_eq,
        b_eq=np.ones(n),
        bounds=(0, None),
        method="highs",
    )
    assert res.status == 0, res.message
    x = np.zeros((n, c))
    x[u, cand] = res.x
    return -res.fun, weight @ np.einsum("ul,ulk->uk", x, exposure.astype(np.float64))


def dual_function(value, exposure, weight, lower, upper, prices):
    """g(lambda) = sum_u w_u max_l (v + a @ lambda) - alpha @ lower + beta @ upper (slow, explicit)."""
    total = sum(weight[u] * max(value[u] + exposure[u] @ prices) for u in range(len(weight)))
    for k, lam in enumerate(prices):
        if lam > 0:
            total -= lam * lower[k]
        elif lam < 0:
            total -= lam * upper[k]
    return total


def dual_min_by_enumeration(value, exposure, weight, lower, upper):
    """LP optimum = min of the convex piecewise-linear dual, attained at a vertex of the
    arrangement of its kinks {(a_ul - a_ul') @ lambda = v_ul' - v_ul} and {lambda_k = 0}."""
    n, c, k = exposure.shape
    planes = [(np.eye(k)[j], 0.0) for j in range(k)]
    for u in range(n):
        for l1, l2 in itertools.combinations(range(c), 2):
            d = exposure[u, l1] - exposure[u, l2]
            if np.any(d != 0):
                planes.append((d, value[u, l2] - value[u, l1]))
    points = []
    for combo in itertools.combinations(planes, k):
        a = np.array([p[0] for p in combo])
        b = np.array([p[1] for p in combo])
        if abs(np.linalg.det(a)) > 1e-12:
            points.append(np.linalg.solve(a, b))
    best = np.inf
    for lam in points:
        ok = all(
            (lam[j] <= 1e-12 or np.isfinite(lower[j])) and (lam[j] >= -1e-12 or np.isfinite(upper[j]))
            for j in range(k)
        )
        if ok:
            best = min(best, dual_function(value, exposure, weight, lower, upper, lam))
    return best


def integer_brute_force(value, exposure, weight, lower, upper):
    """Best objective over deterministic assignments that meet the bounds (-inf if none)."""
    n, c, _ = exposure.shape
    best = -np.inf
    for assign in itertools.product(range(c), repeat=n):
        idx = np.array(assign)
        shares = weight @ exposure[np.arange(n), idx]
        if np.all(shares >= lower - 1e-12) and np.all(shares <= upper + 1e-12):
            best = max(best, float(weight @ value[np.arange(n), idx]))
    return best


# ----------------------------------------------------------------------------------------------
# exact answers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_hand_solved_floor(solver):
    # one user, layouts worth 3 and 1, only the second exposes; floor 1/3 on exposure:
    # x = (2/3, 1/3), objective 3*2/3 + 1/3 = 7/3; indifference 3 = 1 + price -> price 2
    plan = SOLVERS[solver](
        np.array([[3.0, 1.0]]),
        np.array([[[0.0], [1.0]]]),
        np.array([1.0]),
        np.array([1 / 3]),
        np.array([np.inf]),
    )
    assert plan.objective == pytest.approx(7 / 3, rel=1e-9)
    assert plan.prices == pytest.approx([2.0], rel=1e-7)
    assert plan.shares == pytest.approx([1 / 3], abs=1e-9)
    assert plan.x == pytest.approx(np.array([[2 / 3, 1 / 3]]), abs=1e-9)
    assert plan.status == "optimal" and plan.gap <= 1e-9


@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_hand_solved_two_users_floor_and_cap(solver):
    # users worth (4, 1) and (2, 1.5), weight 1/2 each; the second layout exposes.
    # floor 2/3: moving user 2 costs 0.5/unit, user 1 costs 3/unit -> user 2 fully, user 1 a third:
    # objective 3 - 0.25 - 0.5 = 9/4, price 3 (user 1 indifferent: 4 = 1 + 3).
    v = np.array([[4.0, 1.0], [2.0, 1.5]])
    w = np.array([0.5, 0.5])
    a = np.array([[[0.0], [1.0]], [[0.0], [1.0]]])
    plan = SOLVERS[solver](v, a, w, np.array([2 / 3]), np.array([np.inf]))
    assert plan.objective == pytest.approx(9 / 4, rel=1e-9)
    assert plan.prices == pytest.approx([3.0], rel=1e-7)
    assert plan.x == pytest.approx(np.array([[2 / 3, 1 / 3], [0.0, 1.0]]), abs=1e-9)
    # the same plan as a cap on the complementary exposure: price -3
    plan = SOLVERS[solver](v, 1.0 - a, w, np.array([-np.inf]), np.array([1 / 3]))
    assert plan.objective == pytest.approx(9 / 4, rel=1e-9)
    assert plan.prices == pytest.approx([-3.0], rel=1e-7)


def test_lp_equals_dual_vertex_enumeration_and_bounds_integer_optimum(seed):
    rng = np.random.default_rng(seed)
    for k in (1, 2):
        v, a, w, lo, hi, _ = random_instance(rng, 3, 3, k, loose=False)
        plan = plan_lp(v, a, w, lo, hi)
        assert plan.objective == pytest.approx(dual_min_by_enumeration(v, a, w, lo, hi), rel=1e-8, abs=1e-10)
        assert integer_brute_force(v, a, w, lo, hi) <= plan.objective + 1e-10
        # weak duality at the returned prices (slow explicit g) and strong duality
        g = dual_function(v, a, w, lo, hi, plan.prices)
        assert g == pytest.approx(plan.objective, rel=1e-8, abs=1e-10)
    # with no bounds the LP picks each user's best layout: equal to the integer brute force
    free = np.full(2, np.inf)
    plan = plan_lp(v, a, w, -free, free)
    assert plan.objective == pytest.approx(integer_brute_force(v, a, w, -free, free), rel=1e-12)


def test_lp_matches_linprog_medium(seed):
    rng = np.random.default_rng(seed)
    v, a, w, lo, hi, m = random_instance(rng, 150, 6, 4, mask=True)
    ref_obj, ref_shares = linprog_reference(v, a, w, lo, hi, m)
    plan = plan_lp(v, a, w, lo, hi, m)
    assert plan.objective == pytest.approx(ref_obj, rel=1e-8)
    assert plan.shares == pytest.approx(ref_shares, abs=1e-6)
    assert plan.n_vars == int(m.sum())
    assert np.all(plan.x[~m] == 0) and plan.x.sum(axis=1) == pytest.approx(np.ones(150), abs=1e-9)
    simplex = plan_lp(v, a, w, lo, hi, m, method="simplex")
    assert simplex.objective == pytest.approx(ref_obj, rel=1e-8)


@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_prices_satisfy_complementary_slackness(seed, solver):
    rng = np.random.default_rng(seed)
    v, a, w, lo, hi, _ = random_instance(rng, 300, 5, 4)
    plan = SOLVERS[solver](v, a, w, lo, hi)
    s = plan.shares
    assert np.all(s >= lo - 1e-7) and np.all(s <= hi + 1e-7)
    for k, price in enumerate(plan.prices):
        if price > 1e-7:
            assert np.isfinite(lo[k]) and s[k] == pytest.approx(lo[k], abs=1e-7)
        elif price < -1e-7:
            assert np.isfinite(hi[k]) and s[k] == pytest.approx(hi[k], abs=1e-7)
    assert plan.prices[-1] == 0.0  # the loose bound
    assert np.count_nonzero(np.abs(plan.prices) > 1e-7) >= 1
    # reduced costs: every layout in use is a best layout for its user at these prices
    score = v + a @ plan.prices
    regret = score.max(axis=1, keepdims=True) - score
    assert np.all(regret[plan.x > 1e-9] <= 1e-7)
    # a vertex: at most K users are split between layouts
    assert np.count_nonzero((plan.x > 1e-9).sum(axis=1) > 1) <= a.shape[2]
    assert plan.dual_bound == pytest.approx(plan.objective, rel=1e-7)


@pytest.mark.parametrize("variant", ["plain", "mask_zero_weights", "float32"])
def test_dual_agrees_with_lp(seed, variant):
    rng = np.random.default_rng(seed)
    kw = {"mask": variant == "mask_zero_weights", "zero_weights": variant == "mask_zero_weights"}
    dtype = np.float32 if variant == "float32" else np.float64
    v, a, w, lo, hi, m = random_instance(rng, 2000, 8, 5, dtype=dtype, **kw)
    lp = plan_lp(v, a, w, lo, hi, m)
    d = plan_dual(v, a, w, lo, hi, m)
    assert d.status == "optimal" and d.method == "dual-lbfgs+crossover"
    assert abs(d.objective - lp.objective) <= 5e-3 * abs(lp.objective)  # the contract
    assert d.objective == pytest.approx(lp.objective, rel=1e-5)  # what it achieves
    assert np.max(np.abs(d.shares - lp.shares)) <= 5e-3
    assert d.gap <= 1e-6 and d.violation <= 1e-6
    assert d.dual_bound >= lp.objective - 1e-9 * abs(lp.objective)  # a true upper bound
    assert d.prices == pytest.approx(lp.prices, abs=1e-4)


def test_dual_float32_input_is_not_copied_and_matches_float64(seed):
    rng = np.random.default_rng(seed)
    v, a, w, lo, hi, _ = random_instance(rng, 1500, 6, 3)
    v32, a32 = v.astype(np.float32), a.astype(np.float32)
    assert _validate(v32, a32, w, lo, hi, None, None).exposure is a32  # the caller's array, no copy
    d32 = plan_dual(v32, a32, w, lo, hi)
    d64 = plan_lp(v32.astype(np.float64), a32.astype(np.float64), w, lo, hi)
    assert d32.objective == pytest.approx(d64.objective, rel=1e-5)


def test_softmax_plan_meets_bounds_and_is_the_softmax_of_its_prices(seed):
    rng = np.random.default_rng(seed)
    v, a, w, lo, hi, _ = random_instance(rng, 1000, 6, 3)
    tau = 0.05
    plan = plan_dual(v, a, w, lo, hi, temperature=tau, tol=1e-7)
    score = (v + a @ plan.prices) / tau
    expected = np.exp(score - score.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert plan.x == pytest.approx(expected, abs=1e-12)
    assert plan.violation <= 1e-7 and plan.status == "optimal"
    lp = plan_lp(v, a, w, lo, hi)
    # the smoothing costs something, and at most tau * log(n_cand)
    assert lp.objective - tau * np.log(6) - 1e-9 <= plan.objective <= lp.objective + 1e-9
    assert plan.dual_bound >= lp.objective - 1e-9


def test_mask_excludes_padding_like_removing_it(seed):
    rng = np.random.default_rng(seed)
    v, a, w, lo, hi, m = random_instance(rng, 40, 4, 2, mask=True)
    plan = plan_lp(v, a, w, lo, hi, m)
    # the same LP with padding priced out: value -1e3 makes a padded layout never worth using
    v_priced = np.where(m, v, -1e3)
    ref_obj, _ = linprog_reference(v_priced, a, w, lo, hi)
    assert plan.objective == pytest.approx(ref_obj, rel=1e-8)
    assert plan_dual(v, a, w, lo, hi, m).objective == pytest.approx(ref_obj, rel=1e-6)


def test_no_constraints_is_argmax():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 4))
    a = np.zeros((50, 4, 0))
    w = np.full(50, 1 / 50)
    for solver in SOLVERS.values():
        plan = solver(v, a, w, np.zeros(0), np.zeros(0))
        assert plan.objective == pytest.approx(float(w @ v.max(axis=1)), rel=1e-12)
        assert plan.prices.shape == (0,)


@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_inputs_not_mutated_and_plan_frozen(solver):
    rng = np.random.default_rng(1)
    args = random_instance(rng, 60, 4, 3, mask=True)
    copies = [None if x is None else x.copy() for x in args]
    plan = SOLVERS[solver](*args, names=["songs", "live", "tail"])
    for before, after in zip(copies, args, strict=True):
        if before is not None:
            np.testing.assert_array_equal(before, after)
    assert isinstance(plan, Plan) and plan.names == ("songs", "live", "tail")
    with pytest.raises(ValueError, match="read-only"):
        plan.prices[0] = 1.0
    with pytest.raises(AttributeError):
        plan.objective = 0.0  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# infeasibility
# ----------------------------------------------------------------------------------------------

NAMES = ["songs", "live", "audio"]


def category_instance(rng, n_users=300):
    """Every user has one layout of each category; exposure = one-hot category share."""
    exposure = np.repeat(np.eye(3)[None], n_users, axis=0)
    value = rng.random((n_users, 3))
    weight = rng.random(n_users) + 0.5
    return value, exposure, weight / weight.sum()


@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_conflicting_floors_are_diagnosed_and_the_relaxation_is_feasible(seed, solver):
    rng = np.random.default_rng(seed)
    v, a, w = category_instance(rng)
    lo = np.array([0.7, 0.5, -np.inf])  # songs + live >= 1.2, but shares sum to 1
    hi = np.full(3, np.inf)
    with pytest.raises(InfeasiblePlan, match=r"songs, live") as info:
        SOLVERS[solver](v, a, w, lo, hi, names=NAMES)
    d = info.value.diagnosis
    assert isinstance(info.value, ValueError)
    assert d.method == "elastic-lp" and d.conflicting == ("songs", "live")
    assert d.total_relaxation == pytest.approx(0.2, abs=1e-8)  # 0.7 + 0.5 - 1
    # each floor alone: songs down to 1 - 0.5, live down to 1 - 0.7
    alone = {r.name: r.suggested for r in d.alternatives}
    assert alone == pytest.approx({"songs": 0.5, "live": 0.3}, abs=1e-8)
    assert "min 0.7 -> 0.5" in str(info.value) and "min 0.5 -> 0.3" in str(info.value)
    relaxed = plan_lp(v, a, w, d.relaxed_lower, d.relaxed_upper, names=NAMES)
    assert relaxed.status == "optimal"
    assert relaxed.shares[:2].sum() == pytest.approx(1.0, abs=1e-9)
    for r in d.alternatives:  # and each alternative works too
        lo_alt = lo.copy()
        lo_alt[NAMES.index(r.name)] = r.suggested
        assert plan_lp(v, a, w, lo_alt, hi).violation <= 1e-7


def test_large_scale_diagnosis_by_the_elastic_dual(monkeypatch):
    rng = np.random.default_rng(3)
    v, a, w = category_instance(rng, 2000)
    lo = np.array([0.7, 0.5, -np.inf])
    hi = np.array([np.inf, np.inf, 0.2])
    monkeypatch.setattr(dual_module, "_EXACT_DIAGNOSIS_VARS", 0)
    with pytest.raises(InfeasiblePlan, match="elastic-dual") as info:
        plan_dual(v, a, w, lo, hi, names=NAMES)
    d = info.value.diagnosis
    assert set(d.conflicting) == {"songs", "live"}
    assert d.total_relaxation == pytest.approx(0.2, abs=1e-3)
    assert plan_lp(v, a, w, d.relaxed_lower, d.relaxed_upper).violation <= 1e-7
    # the same answer from the private entry point on a caller-built problem
    p = _validate(v, a, w, lo, hi, None, NAMES)
    assert _diagnose_dual(p, 1.0, 200).total_relaxation == pytest.approx(0.2, abs=1e-3)


@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_precheck_reports_unreachable_floor_and_cap(solver):
    rng = np.random.default_rng(0)
    n = 100
    v = rng.random((n, 3))
    a = np.repeat(np.eye(3)[None], n, axis=0)
    a[: n // 4] = [0.0, 1.0, 0.0]  # a quarter of users have only live layouts
    w = np.full(n, 1 / n)
    lo = np.array([-np.inf, -np.inf, 0.9])  # audio reaches at most 0.75
    hi = np.array([np.inf, np.inf, np.inf])
    with pytest.raises(InfeasiblePlan, match=r"audio: min 0\.9 -> 0\.75") as info:
        SOLVERS[solver](v, a, w, lo, hi, names=NAMES)
    d = info.value.diagnosis
    assert d.method == "precheck" and d.conflicting == ("audio",)
    assert d.relaxed_lower[2] == pytest.approx(0.75, abs=1e-12)
    # a cap below what every mix must show: live is at least 0.25 (the live-only users)
    with pytest.raises(InfeasiblePlan, match=r"live: max 0\.1 -> 0\.25"):
        SOLVERS[solver](v, a, w, np.full(3, -np.inf), np.array([np.inf, 0.1, np.inf]), names=NAMES)


def _elastic_reference(v, a, w, lo):
    """Minimum total relaxation of the floors ``lo`` by scipy's HiGHS on the elastic LP written out
    here (x per user and candidate, one slack per floor): the reference the diagnosis is checked on."""
    n, L, K = a.shape
    c = np.concatenate([np.zeros(n * L), np.ones(K)])
    eq = sp.hstack([sp.kron(sp.eye(n), np.ones((1, L))), sp.csr_matrix((n, K))])
    ub = sp.hstack([-sp.csr_matrix((w[:, None, None] * a).reshape(n * L, K).T), -sp.eye(K)])
    res = linprog(c, A_ub=ub, b_ub=-lo, A_eq=eq, b_eq=np.ones(n), bounds=(0, None), method="highs")
    assert res.status == 0
    return float(res.fun)


@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_bounds_each_beyond_reach_get_a_joint_relaxation_that_plans(solver):
    """Two floors each above what any mix reaches, and a third floor: moving each to its own reach (what
    the pre-check alone suggested) still fails, since one mix cannot reach both at once and hold the
    third. The suggested relaxation is the smallest joint one (scipy's elastic LP written out in the
    test), it plans, and no single move is offered as a fix."""
    rng = np.random.default_rng(5)
    n = 40
    v = rng.random((n, 4))
    a = np.zeros((n, 4, 3))
    a[:, 0, 0] = 0.27  # the only layouts that show module a, b, and a third kind
    a[:, 1, 1] = 0.17
    a[:, 2, 2] = 0.5
    a[:, 3] = [0.05, 0.05, 0.05]
    w = np.full(n, 1 / n)
    lo = np.array([0.3, 0.3, 0.2])
    hi = np.full(3, np.inf)
    with pytest.raises(InfeasiblePlan) as info:
        SOLVERS[solver](v, a, w, lo, hi, names=NAMES)
    d = info.value.diagnosis
    assert d.method.startswith("precheck+")
    assert d.alternatives == ()
    ref = _elastic_reference(v, a, w, lo)
    assert ref > (0.3 - 0.27) + (0.3 - 0.17) + 1e-3  # more than the pre-check's own moves
    assert d.total_relaxation == pytest.approx(ref, abs=2e-3)
    plan = plan_lp(v, a, w, d.relaxed_lower - 1e-9, d.relaxed_upper)
    assert plan.violation <= 1e-7
    # the printed relaxation (rounded outwards) plans too
    shown = lo.copy()
    for r in d.relaxations:
        shown[NAMES.index(r.name)] = float(str(r).rsplit("-> ", 1)[1])
    assert plan_lp(v, a, w, shown, hi).violation <= 1e-7
    # one bound beyond its reach and nothing else in the way: the pre-check's move, offered alone too
    with pytest.raises(InfeasiblePlan) as info:
        SOLVERS[solver](v, a, w, np.array([0.3, -np.inf, -np.inf]), hi, names=NAMES)
    d = info.value.diagnosis
    assert d.method == "precheck" and [str(r) for r in d.alternatives] == ["songs: min 0.3 -> 0.27"]


def test_infeasible_plan_pickles_with_its_diagnosis():
    rng = np.random.default_rng(0)
    v, a, w = category_instance(rng, 20)
    with pytest.raises(InfeasiblePlan) as info:
        plan_lp(v, a, w, np.array([0.7, 0.5, -np.inf]), np.full(3, np.inf), names=NAMES)
    again = pickle.loads(pickle.dumps(info.value))
    assert str(again) == str(info.value)
    assert again.diagnosis.total_relaxation == info.value.diagnosis.total_relaxation


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"value": np.zeros(4)}, r"value must be a 2-D array of shape \(n_users, n_cand\); got shape \(4,\)"),
        (
            {"exposure": np.zeros((4, 3))},
            r"exposure must have shape \(n_users, n_cand, K\) = \(4, 3, K\); got \(4, 3\)",
        ),
        ({"weight": np.full(3, 1 / 3)}, r"weight must have shape \(n_users,\) = \(4,\); got \(3,\)"),
        ({"weight": np.full(4, 0.5)}, r"weight must sum to 1 \(traffic shares\); got sum 2.0"),
        (
            {"weight": np.array([0.5, 0.75, -0.25, 0.0])},
            r"weight must be finite and >= 0; got weight\[2\] = -0.25",
        ),
        ({"lower": np.zeros(3)}, r"lower must have shape \(K,\) = \(2,\); got \(3,\)"),
        ({"upper": np.array([np.nan, 1.0])}, r"upper must not contain NaN"),
        (
            {"lower": np.array([0.5, 0.0]), "upper": np.array([0.4, 1.0])},
            r"lower must be <= upper for every constraint; got lower\[0\] = 0.5 > upper\[0\] = 0.4 \(songs\)",
        ),
        ({"lower": np.array([np.inf, 0.0])}, r"lower must be < \+inf; got lower\[0\] = inf"),
        (
            {"mask": np.zeros((4, 3), bool)},
            r"mask must mark at least one real candidate per user; users without any: \[0, 1, 2, 3\]",
        ),
        (
            {"mask": np.ones((3, 3), bool)},
            r"mask must have shape \(n_users, n_cand\) = \(4, 3\); got \(3, 3\)",
        ),
        ({"mask": np.ones((4, 3))}, r"mask must be a bool array; got dtype float64"),
        ({"names": ["songs"]}, r"names must hold K = 2 unique strings; got \['songs'\]"),
        (
            {"value": np.array([[0.0, np.nan, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0]])},
            r"value must be finite everywhere .*; got nan at index \(0, 1\)",
        ),
    ],
)
@pytest.mark.parametrize("solver", ["lp", "dual"])
def test_bad_inputs_are_named(solver, change, match):
    kw = {
        "value": np.zeros((4, 3)),
        "exposure": np.zeros((4, 3, 2)),
        "weight": np.full(4, 0.25),
        "lower": np.full(2, -np.inf),
        "upper": np.full(2, np.inf),
        "mask": None,
        "names": ["songs", "live"],
    }
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        SOLVERS[solver](**kw)


def test_solver_options_are_checked():
    v, a, w = np.zeros((1, 2)), np.zeros((1, 2, 1)), np.ones(1)
    b = (np.full(1, -np.inf), np.full(1, np.inf))
    with pytest.raises(ValueError, match=r"method must be one of \('simplex', 'ipm'\); got 'barrier'"):
        plan_lp(v, a, w, *b, method="barrier")
    with pytest.raises(ValueError, match=r"time_limit must be > 0 seconds or None; got 0"):
        plan_lp(v, a, w, *b, time_limit=0)
    with pytest.raises(ValueError, match=r"tol must be > 0; got 0.0"):
        plan_dual(v, a, w, *b, tol=0.0)
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0 or None; got -1.0"):
        plan_dual(v, a, w, *b, temperature=-1.0)


# ----------------------------------------------------------------------------------------------
# serving
# ----------------------------------------------------------------------------------------------


def test_choose_and_choose_batch_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    value = rng.standard_normal((500, 32))
    exposure = rng.random((500, 32, 8))
    prices = rng.standard_normal(8)
    mask = rng.random((500, 32)) < 0.8
    mask[:, 0] = True
    loop = [max(range(32), key=lambda j, i=i: value[i, j] + exposure[i, j] @ prices) for i in range(500)]
    assert [choose(value[i], exposure[i], prices) for i in range(500)] == loop
    np.testing.assert_array_equal(choose_batch(value, exposure, prices), loop)
    np.testing.assert_array_equal(
        choose_batch(value.astype(np.float32), exposure.astype(np.float32), prices), loop
    )
    masked = choose_batch(value, exposure, prices, mask)
    loop_masked = [
        max((j for j in range(32) if mask[i, j]), key=lambda j, i=i: value[i, j] + exposure[i, j] @ prices)
        for i in range(500)
    ]
    np.testing.assert_array_equal(masked, loop_masked)
    with pytest.raises(
        ValueError, match=r"exposure must have shape value.shape \+ prices.shape = \(500, 32, 8\)"
    ):
        choose_batch(value, exposure[:, :, :7], prices)
