"""bandits off-policy estimators: hand-computed values, unbiasedness, bounds, identities, CIs.

Run every seeded test for seeds 0..99 with ``SEEDS=all pytest tests/test_ope.py``.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from bandits import (
    DM,
    DR,
    IPS,
    SNDR,
    SNIPS,
    RidgeRewardModel,
    SwitchDR,
    bootstrap_ci,
    cross_fit_rewards,
    estimate_all,
    overlap_diagnostics,
)

# A 4-round log over at most 3 candidates (round 3 had only 2: padded with 0), worked by hand:
#   w = pi_e(a|x) / pscore = [1/.5, .5/.25, .5/.5, .5/.5] = [2, 2, 1, 1]
#   w r = [2, 0, 2, 1]                           IPS   = 5/4
#   sum w = 6                                    SNIPS = 5/6
#   q(pi_e) = [1, .25+.25, .5+.5, 0+1] = [1, .5, 1, 1]          DM = 3.5/4
#   q(a_i) = [1, .5, 1, 2]; r - q(a_i) = [0, -.5, 1, -1]; w (r - q) = [0, -1, 1, -1]
#   DR = (3.5 - 1)/4 = 5/8;  SNDR = 3.5/4 - 1/6;  Switch-DR(tau=1.5) keeps rounds 2, 3: (3.5 + 0)/4
REWARD = np.array([1.0, 0.0, 2.0, 1.0])
ACTION = np.array([0, 1, 2, 1])
PSCORE = np.array([0.5, 0.25, 0.5, 0.5])
ACTION_DIST = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.5, 0.0]])
Q = np.array([[1.0, 0.0, 1.0], [0.5, 0.5, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
TINY = (REWARD, ACTION, PSCORE, ACTION_DIST, Q)


@pytest.mark.parametrize(("estimator", "expected"), [
    (DM(), 3.5 / 4), (IPS(), 5 / 4), (SNIPS(), 5 / 6), (DR(), 5 / 8), (SNDR(), 3.5 / 4 - 1 / 6),
    (SwitchDR(tau=1.5), 3.5 / 4), (SwitchDR(tau=2.0), 5 / 8), (SwitchDR(tau=0.0), 3.5 / 4),
])
def test_estimators_on_hand_computed_log(estimator, expected: float) -> None:
    copies = [x.copy() for x in TINY]
    est = estimator.estimate(*TINY)
    assert est.value == pytest.approx(expected, abs=1e-12)
    assert est.n_rounds == 4 and est.estimator == estimator.name
    z = 1.959963984540054
    assert est.ci_low == pytest.approx(est.value - z * est.se) and est.ci_high == pytest.approx(est.value + z * est.se)
    for a, b in zip(TINY, copies, strict=True):
        np.testing.assert_array_equal(a, b)  # inputs not mutated


def test_standard_errors_by_hand() -> None:
    # IPS: psi = w r = [2, 0, 2, 1]; sample variance 2.75 / 3
    assert IPS().estimate(*TINY).se == pytest.approx(math.sqrt(2.75 / 3 / 4), abs=1e-12)
    # SNIPS (delta method): se^2 = n/(n-1) * sum (w_i (r_i - V))^2 / (sum w)^2
    w, v = np.array([2.0, 2.0, 1.0, 1.0]), 5 / 6
    se2 = 4 / 3 * ((w * (REWARD - v)) ** 2).sum() / 36
    assert SNIPS().estimate(*TINY).se == pytest.approx(math.sqrt(se2), abs=1e-12)


def test_overlap_diagnostics_by_hand() -> None:
    ov = overlap_diagnostics(ACTION, PSCORE, ACTION_DIST)  # w = [2, 2, 1, 1]
    assert ov.ess == pytest.approx(36 / 10) and ov.ess_ratio == pytest.approx(0.9)
    assert ov.max_weight == 2.0 and ov.mean_weight == 1.5
    assert ov.weight_q50 == 1.5 and ov.weight_q90 == 2.0
    assert IPS().estimate(*TINY).overlap == ov


def test_overlap_quantiles_are_numpys_to_the_bit(seed: int) -> None:
    from bandits._ope import _OVERLAP_QUANTILES, _upper_quantiles

    rng = np.random.default_rng(seed)
    for n in (2, 3, 7, 1000, 12_345):
        for w in (rng.random(n) * 80, rng.integers(0, 4, n).astype(float), np.full(n, 1.5)):
            assert np.array_equal(_upper_quantiles(w, _OVERLAP_QUANTILES), np.quantile(w, _OVERLAP_QUANTILES))


def test_the_logged_probabilities_are_read_alike_from_any_memory_layout(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k, slots = 500, 6, 3
    pi = rng.random((slots, k, n)).T  # (n, k, slots), not C-contiguous
    pi /= pi.sum(axis=1, keepdims=True)
    action, position = rng.integers(0, k, n), rng.integers(0, slots, n)
    pscore, reward = rng.uniform(0.1, 1.0, n), rng.random(n)
    want = float(np.mean(pi[np.arange(n), action, position] / pscore * reward))  # the formula, by hand
    for dist in (pi, np.ascontiguousarray(pi)):
        assert IPS().estimate(reward, action, pscore, dist, position=position).value == pytest.approx(want, rel=1e-12)
    flat = np.ascontiguousarray(pi[:, :, 0] / pi[:, :, 0].sum(axis=1, keepdims=True))
    want2 = float(np.mean(flat[np.arange(n), action] / pscore * reward))
    for dist in (flat, np.asfortranarray(flat)):
        assert IPS().estimate(reward, action, pscore, dist).value == pytest.approx(want2, rel=1e-12)


def synthetic_world(rng: np.random.Generator, n_ctx: int = 20, n_cand: int = 4):
    """Contexts uniform over n_ctx types; Bernoulli rewards with known means; a logging policy with
    full support and a different target policy. Returns the truth and a log sampler."""
    mu = rng.uniform(0.05, 0.95, size=(n_ctx, n_cand))
    # half uniform: propensities >= 1 / (2 n_cand), so weights stay bounded (good overlap)
    behaviour = 0.5 / n_cand + 0.5 * rng.dirichlet(np.full(n_cand, 2.0), size=n_ctx)
    target = np.exp(4 * mu)
    target /= target.sum(axis=1, keepdims=True)
    truth = float((target * mu).sum(axis=1).mean())

    def log(n: int, model_bias: float = 0.0):
        ctx = rng.integers(0, n_ctx, n)
        u = rng.random(n)[:, None]
        action = np.minimum((np.cumsum(behaviour[ctx], axis=1) <= u).sum(axis=1), n_cand - 1)
        reward = (rng.random(n) < mu[ctx, action]).astype(np.float64)
        return reward, action, behaviour[ctx, action], target[ctx], mu[ctx] + model_bias

    return truth, log


def test_ips_and_dr_are_unbiased(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth, log = synthetic_world(rng)
    ips, dr = [], []
    for _ in range(300):
        r, a, p, pi, q = log(300, model_bias=0.3)  # DR with a wrong model stays unbiased
        ips.append(IPS().estimate(r, a, p, pi).value)
        dr.append(DR().estimate(r, a, p, pi, q).value)
    for values in (np.array(ips), np.array(dr)):
        assert abs(values.mean() - truth) <= 4 * values.std(ddof=1) / np.sqrt(values.size)


def test_normal_ci_covers_truth(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth, log = synthetic_world(rng)
    covered = {"IPS": 0, "SNIPS": 0, "DR": 0}
    n_logs = 200
    for _ in range(n_logs):
        r, a, p, pi, q = log(400, model_bias=0.1)
        for e in (IPS().estimate(r, a, p, pi), SNIPS().estimate(r, a, p, pi), DR().estimate(r, a, p, pi, q)):
            covered[e.estimator] += e.ci_low <= truth <= e.ci_high
    for name, c in covered.items():
        assert 0.85 <= c / n_logs <= 0.995, name  # 100 seeds: 0.89 to 0.99 seen


def test_snips_within_reward_range(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        n, k = int(rng.integers(2, 50)), int(rng.integers(1, 6))
        r = rng.normal(size=n) * 5
        a = rng.integers(0, k, n)
        p = rng.uniform(0.01, 1.0, n)
        pi = rng.dirichlet(np.full(k, 0.3), size=n)
        pi[0, a[0]] = max(pi[0, a[0]], 1e-3)  # keep sum w > 0
        pi /= pi.sum(axis=1, keepdims=True)
        v = SNIPS().estimate(r, a, p, pi).value
        assert r.min() - 1e-12 <= v <= r.max() + 1e-12


def test_identities_between_estimators(seed: int) -> None:
    rng = np.random.default_rng(seed)
    _, log = synthetic_world(rng)
    r, a, p, pi, q = log(500)
    zero = np.zeros_like(q)
    # model 0: DR is IPS, SNDR is SNIPS
    assert DR().estimate(r, a, p, pi, zero).value == pytest.approx(IPS().estimate(r, a, p, pi).value, rel=1e-12)
    assert SNDR().estimate(r, a, p, pi, zero).value == pytest.approx(SNIPS().estimate(r, a, p, pi).value, rel=1e-12)
    # a model that fits every logged reward: DR is DM
    fit = q.copy()
    fit[np.arange(500), a] = r
    assert DR().estimate(r, a, p, pi, fit).value == pytest.approx(DM().estimate(r, a, p, pi, fit).value, rel=1e-12)
    # Switch-DR interpolates: tau = inf is DR, tau = 0 is DM
    assert SwitchDR().estimate(r, a, p, pi, q).value == pytest.approx(DR().estimate(r, a, p, pi, q).value, rel=1e-12)
    assert SwitchDR(tau=0.0).estimate(r, a, p, pi, q).value == pytest.approx(DM().estimate(r, a, p, pi, q).value,
                                                                              rel=1e-12)
    # target = logging policy on a deterministic log (pscore 1): every weight is 1, IPS is the mean
    one = np.zeros_like(pi)
    one[np.arange(500), a] = 1.0
    assert IPS().estimate(r, a, np.ones(500), one).value == pytest.approx(r.mean(), rel=1e-12)


def test_bootstrap_matches_slow_loop(seed: int) -> None:
    """The vectorised multinomial bootstrap equals re-running the estimator on explicitly resampled
    logs drawn from the same random stream (the Poisson default: test_ope_bootstrap.py)."""
    rng = np.random.default_rng(seed)
    _, log = synthetic_world(rng)
    data = log(300, model_bias=0.2)
    n = 300
    for est in (IPS(), SNIPS(), SNDR(), SwitchDR(tau=3.0)):
        ci = bootstrap_ci(est, *data, n_boot=40, alpha=0.1, rng=np.random.default_rng(seed), method="multinomial")
        ref_rng = np.random.default_rng(seed)
        values = []
        for _ in range(40):
            idx = ref_rng.integers(0, n, size=n)
            values.append(est.estimate(*(x[idx] for x in data)).value)
        lo, hi = np.quantile(values, [0.05, 0.95])
        assert (ci.low, ci.high) == pytest.approx((lo, hi), abs=1e-12)
        assert ci.se == pytest.approx(np.std(values, ddof=1), rel=1e-9)


def test_bootstrap_agrees_with_normal_ci_on_large_log() -> None:
    truth, log = synthetic_world(np.random.default_rng(5))
    data = log(20000, model_bias=0.1)
    for est in (IPS(), DR()):
        e = est.estimate(*data)
        b = bootstrap_ci(est, *data, n_boot=200, rng=np.random.default_rng(1))
        assert b.se == pytest.approx(e.se, rel=0.2)
        width = e.ci_high - e.ci_low
        assert abs(b.low - e.ci_low) <= 0.2 * width and abs(b.high - e.ci_high) <= 0.2 * width


def test_estimate_all_rows() -> None:
    rows = estimate_all(*TINY, switch_tau=1.5, n_boot=20, rng=np.random.default_rng(0))
    names = [row["estimator"] for row in rows]
    assert names == ["DM", "IPS", "SNIPS", "DR", "SNDR", "Switch-DR"]
    singles = [DM(), IPS(), SNIPS(), DR(), SNDR(), SwitchDR(tau=1.5)]
    for row, est in zip(rows, singles, strict=True):
        ref = est.estimate(*TINY).as_row()
        assert {k: row[k] for k in ref} == ref
        assert {"boot_low", "boot_high", "boot_se", "ess", "max_weight", "weight_q999"} <= set(row)
        assert row["boot_low"] <= row["boot_high"]
    no_model = estimate_all(*TINY[:4])
    assert [row["estimator"] for row in no_model] == ["IPS", "SNIPS"] and "boot_low" not in no_model[0]


def test_ridge_reward_model_matches_lstsq(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k, d = 200, 5, 3
    x = rng.normal(size=(n, k, d))
    a = rng.integers(0, k, n)
    r = x[np.arange(n), a] @ np.array([1.0, -2.0, 0.5]) + 3.0 + rng.normal(scale=0.1, size=n)
    m = RidgeRewardModel(alpha=0.0).fit(x, a, r)
    design = np.column_stack([np.ones(n), x[np.arange(n), a]])
    beta = np.linalg.lstsq(design, r, rcond=None)[0]
    assert m.intercept_ == pytest.approx(beta[0], abs=1e-9)
    np.testing.assert_allclose(m.coef_, beta[1:], atol=1e-9)
    np.testing.assert_allclose(m.predict(x), x @ beta[1:] + beta[0], atol=1e-9)
    # ridge: penalised normal equations with an unpenalised intercept
    lam = 5.0
    m2 = RidgeRewardModel(alpha=lam).fit(x, a, r)
    pen = np.diag([0.0, lam, lam, lam])
    beta2 = np.linalg.solve(design.T @ design + pen, design.T @ r)
    np.testing.assert_allclose(np.r_[m2.intercept_, m2.coef_], beta2, atol=1e-9)
    # cross-fitting: every round is predicted by a model that did not see it
    est = cross_fit_rewards(x, a, r, n_folds=2, alpha=1.0, rng=np.random.default_rng(seed))
    fold = np.random.default_rng(seed).permutation(n) % 2
    for f in range(2):
        other = RidgeRewardModel(1.0).fit(x[fold != f], a[fold != f], r[fold != f])
        np.testing.assert_allclose(est[fold == f], other.predict(x[fold == f]), atol=1e-12)


def test_estimators_pickle_and_compare() -> None:
    for est in (DM(), IPS(), SNIPS(), DR(), SNDR(), SwitchDR(tau=2.0)):
        clone = pickle.loads(pickle.dumps(est))
        assert clone == est and clone.estimate(*TINY) == est.estimate(*TINY)


def test_bad_inputs_raise_clear_errors() -> None:
    r, a, p, pi, q = TINY
    with pytest.raises(ValueError, match=r"pscore must be in \(0, 1\]; got 0.0 at round 1"):
        IPS().estimate(r, a, np.array([0.5, 0.0, 0.5, 0.5]), pi)
    with pytest.raises(ValueError, match=r"pscore must be in \(0, 1\]; got 1.5"):
        IPS().estimate(r, a, np.array([0.5, 1.5, 0.5, 0.5]), pi)
    with pytest.raises(ValueError, match=r"action must be in \[0, 3\); got values in \[0, 3\]"):
        IPS().estimate(r, np.array([0, 1, 3, 1]), p, pi)
    with pytest.raises(ValueError, match=r"action must be integer indices"):
        IPS().estimate(r, a.astype(float), p, pi)
    bad = pi.copy()
    bad[2, 2] = 0.4
    with pytest.raises(ValueError, match=r"action_dist rows must sum to 1 \(within 1e-05\); row 2 sums to 0.9"):
        IPS().estimate(r, a, p, bad)
    bad[2] = [1.5, -0.5, 0.0]
    with pytest.raises(ValueError, match=r"action_dist must be >= 0; got min -0.5"):
        IPS().estimate(r, a, p, bad)
    bad[2] = [np.nan, 0.5, 0.5]
    with pytest.raises(ValueError, match=r"row 2 sums to nan"):
        IPS().estimate(r, a, p, bad)
    with pytest.raises(ValueError, match=r"action_dist must have shape \(4, n_cand\); got \(3, 3\)"):
        IPS().estimate(r, a, p, pi[:3])
    with pytest.raises(ValueError, match=r"reward must be finite"):
        IPS().estimate(np.array([1.0, np.inf, 0.0, 0.0]), a, p, pi)
    with pytest.raises(ValueError, match=r"pscore must have shape \(4,\); got \(3,\)"):
        IPS().estimate(r, a, p[:3], pi)
    with pytest.raises(ValueError, match=r"estimated_rewards is required by this estimator"):
        DR().estimate(r, a, p, pi)
    with pytest.raises(ValueError, match=r"estimated_rewards must have the shape of action_dist \(4, 3\); got \(4, 2\)"):
        DR().estimate(r, a, p, pi, q[:, :2])
    with pytest.raises(ValueError, match=r"at least 2 rounds"):
        IPS().estimate(r[:1], a[:1], p[:1], pi[:1])
    with pytest.raises(ValueError, match=r"tau must be a number >= 0"):
        SwitchDR(tau=-1.0)
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\); got 1.5"):
        IPS().estimate(r, a, p, pi, alpha=1.5)
    zero_target = np.zeros_like(pi)
    zero_target[np.arange(4), (a + 1) % 2] = 1.0  # never the logged action
    with pytest.raises(ValueError, match=r"the importance weights sum to 0"):
        SNIPS().estimate(r, a, p, zero_target)
    with pytest.raises(ValueError, match=r"rng must be a numpy.random.Generator; got NoneType"):
        bootstrap_ci(IPS(), r, a, p, pi)
    with pytest.raises(ValueError, match=r"n_boot must be an integer >= 2; got 1"):
        bootstrap_ci(IPS(), r, a, p, pi, n_boot=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"method must be one of \('poisson', 'multinomial'\); got 'efron'"):
        bootstrap_ci(IPS(), r, a, p, pi, seed=0, method="efron")
    with pytest.raises(ValueError, match=r"RidgeRewardModel is not fitted"):
        RidgeRewardModel().predict(np.ones((2, 2, 1)))
