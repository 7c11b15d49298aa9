"""OPE with positions and slates: obp-style ``(n, A, len_list)`` policies, slate IPS / IIPS / RIPS against
closed forms on exact small logs, DR-os, the logistic reward model against Newton's method.

The "population" logs below hold every slate in proportion to its logging probability (rewards are
the expected rewards), so an unbiased estimator returns the true policy value exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.special import expit

from bandits import (
    DM,
    DR,
    IPS,
    SNIPS,
    DRos,
    LogisticRewardModel,
    SlateIndependentIPS,
    SlateRewardInteractionIPS,
    SlateStandardIPS,
    bootstrap_ci,
    estimate_all,
    slate_pscores,
)

# ---- position: obp's (n, A, len_list) layout ------------------------------------------------------
# 4 rounds, 3 actions, 2 positions; the target's probability at the logged position (by hand):
#   round 0: action 0 at position 1 -> 0.6;  round 1: action 2 at 0 -> 0.5
#   round 2: action 1 at 1 -> 0.2;           round 3: action 1 at 0 -> 0.25
#   w = [0.6/0.5, 0.5/0.25, 0.2/0.4, 0.25/0.5] = [1.2, 2, 0.5, 0.5]; w r = [1.2, 0, 0.5, 0.5]
#   IPS = 2.2/4 = 0.55; SNIPS = 2.2/4.2
ACTION_DIST = np.array([
    [[0.2, 0.6], [0.3, 0.3], [0.5, 0.1]],
    [[0.25, 0.4], [0.25, 0.4], [0.5, 0.2]],
    [[0.1, 0.5], [0.6, 0.2], [0.3, 0.3]],
    [[0.5, 0.0], [0.25, 0.5], [0.25, 0.5]],
])
ACTION = np.array([0, 2, 1, 1])
POSITION = np.array([1, 0, 1, 0])
PSCORE = np.array([0.5, 0.25, 0.4, 0.5])
REWARD = np.array([1.0, 0.0, 1.0, 1.0])


def test_estimators_read_the_target_at_the_logged_position():
    assert IPS().estimate(REWARD, ACTION, PSCORE, ACTION_DIST, position=POSITION).value == pytest.approx(0.55)
    assert SNIPS().estimate(REWARD, ACTION, PSCORE, ACTION_DIST, position=POSITION).value == pytest.approx(2.2 / 4.2)
    # a per-position reward model is read at the logged position too: DR with q = its slice
    q = np.arange(24, dtype=float).reshape(4, 3, 2) / 24
    at = ACTION_DIST[np.arange(4), :, POSITION]
    q_at = q[np.arange(4), :, POSITION]
    want = DR().estimate(REWARD, ACTION, PSCORE, at, q_at).value
    assert DR().estimate(REWARD, ACTION, PSCORE, ACTION_DIST, q, position=POSITION).value == pytest.approx(want)
    rows = estimate_all(REWARD, ACTION, PSCORE, ACTION_DIST, q, position=POSITION)
    assert [r["value"] for r in rows] == pytest.approx([r["value"] for r in estimate_all(REWARD, ACTION, PSCORE,
                                                                                         at, q_at)])


def test_single_position_needs_no_position():
    one = ACTION_DIST[:, :, :1] / ACTION_DIST[:, :, :1].sum(1, keepdims=True)
    got = IPS().estimate(REWARD, ACTION, PSCORE, one).value
    assert got == pytest.approx(float(np.mean(one[np.arange(4), ACTION, 0] / PSCORE * REWARD)))


@pytest.mark.parametrize(("action_dist", "position", "match"), [
    (ACTION_DIST, None, r"position is required when action_dist has len_list = 2 positions"),
    (ACTION_DIST, np.array([0, 2, 1, 0]), r"position must be in \[0, len_list=2\) .*got values in \[0, 2\]"),
    (ACTION_DIST, np.array([0.0, 1.0, 1.0, 0.0]), r"position must be integer positions"),
    (ACTION_DIST, np.array([0, 1]), r"position must have shape \(4,\); got \(2,\)"),
    (ACTION_DIST[:, :, 0] / ACTION_DIST[:, :, 0].sum(1, keepdims=True), POSITION,
     r"position is given, so action_dist must have shape \(n_rounds, n_actions, len_list\)"),
])
def test_position_errors_name_positions(action_dist, position, match):
    with pytest.raises(ValueError, match=match):
        IPS().estimate(REWARD, ACTION, PSCORE, action_dist, position=position)


def test_per_position_reward_model_must_match_action_dist():
    with pytest.raises(ValueError, match=r"estimated_rewards must have the shape of action_dist \(4, 3, 2\)"):
        DM().estimate(REWARD, ACTION, PSCORE, ACTION_DIST, np.zeros((4, 3)), position=POSITION)


# ---- slates: exact population logs ------------------------------------------------------------------
SLATES = np.array(list(itertools.permutations(range(3), 2)))  # 6 slates of 2 slots from 3 items
P_B = np.array([1, 2, 3, 2, 2, 2]) / 12  # logging policy over the slates
P_E = np.array([3, 1, 1, 2, 4, 1]) / 12  # target policy
BASE = np.array([[0.5, 0.3], [0.2, 0.4], [0.8, 0.1]])  # expected reward of item a at slot k


def expected_reward(slate, cascade):
    r = np.array([BASE[slate[0], 0], BASE[slate[1], 1]])
    if cascade:  # the second slot's reward depends on the first slot's item
        r[1] *= 0.25 if slate[0] == 2 else 1.5
    return r


def population_log(cascade):
    counts = np.rint(P_B * 12).astype(int)
    chosen = np.repeat(np.arange(6), counts)
    n = chosen.size
    items = np.broadcast_to(SLATES, (n, 6, 2)).copy()
    reward = np.stack([expected_reward(SLATES[c], cascade) for c in chosen])
    b = slate_pscores(np.broadcast_to(P_B, (n, 6)), items, chosen)
    e = slate_pscores(np.broadcast_to(P_E, (n, 6)), items, chosen)
    truth = sum(P_E[s] * expected_reward(SLATES[s], cascade).sum() for s in range(6))
    return reward, b, e, truth


@pytest.mark.parametrize("cascade", [False, True])
def test_slate_estimators_against_the_closed_form(cascade):
    reward, b, e, truth = population_log(cascade)
    assert SlateStandardIPS().estimate(reward, b.slate, e.slate).value == pytest.approx(truth, abs=1e-12)
    assert SlateRewardInteractionIPS().estimate(reward, b.cascade, e.cascade).value == pytest.approx(truth, abs=1e-12)
    iips = SlateIndependentIPS().estimate(reward, b.item_position, e.item_position).value
    # its expectation by enumeration: sum_s p_b(s) sum_k r_k(s) p_e(s_k at k) / p_b(s_k at k)
    marg = [{a: (P[SLATES[:, k] == a]).sum() for a in range(3)} for P in (P_B, P_E) for k in range(2)]
    expect = sum(P_B[s] * sum(expected_reward(SLATES[s], cascade)[k] * marg[2 + k][SLATES[s, k]]
                              / marg[k][SLATES[s, k]] for k in range(2)) for s in range(6))
    assert iips == pytest.approx(expect, abs=1e-12)
    if cascade:  # IIPS assumes independent positions: biased here
        assert abs(iips - truth) > 5e-3
    else:
        assert iips == pytest.approx(truth, abs=1e-12)


def test_slate_pscores_match_a_loop(seed):
    rng = np.random.default_rng(seed)
    n, c, L = 30, 5, 3
    items = rng.integers(0, 4, size=(n, c, L))
    pmf = rng.dirichlet(np.ones(c), size=n)
    chosen = rng.integers(0, c, n)
    got = slate_pscores(pmf, items, chosen)
    for i in range(n):
        s = items[i, chosen[i]]
        assert got.slate[i] == pmf[i, chosen[i]]
        for k in range(L):
            assert got.item_position[i, k] == pytest.approx(sum(pmf[i, j] for j in range(c) if items[i, j, k] == s[k]))
            assert got.cascade[i, k] == pytest.approx(
                sum(pmf[i, j] for j in range(c) if (items[i, j, :k + 1] == s[:k + 1]).all()))


def test_rips_on_a_sampled_log_covers_simulated_truth(seed):
    rng = np.random.default_rng(seed)
    n = 20_000
    chosen = rng.choice(6, size=n, p=P_B)
    mean = np.stack([expected_reward(s, True) for s in SLATES])[chosen]
    reward = rng.binomial(1, np.clip(mean, 0, 1)).astype(float)
    items = np.broadcast_to(SLATES, (n, 6, 2))
    b = slate_pscores(np.broadcast_to(P_B, (n, 6)), items, chosen)
    e = slate_pscores(np.broadcast_to(P_E, (n, 6)), items, chosen)
    truth = sum(P_E[s] * np.clip(expected_reward(SLATES[s], True), 0, 1).sum() for s in range(6))
    est = SlateRewardInteractionIPS().estimate(reward, b.cascade, e.cascade)
    assert abs(est.value - truth) <= 4.5 * est.se


@pytest.mark.parametrize(("call", "match"), [
    (lambda: SlateIndependentIPS().estimate(np.ones((3, 2)), np.full((3, 2), 0.5), np.full((3, 3), 0.5)),
     r"target_pscore must have shape \(3, 2\); got \(3, 3\)"),
    (lambda: SlateIndependentIPS().estimate(np.ones((3, 2)), np.array([[0.5, 0.0]] * 3), np.full((3, 2), 0.5)),
     r"pscore must be in \(0, 1\] at every position; got 0.0 at \(round, position\) \(0, 1\)"),
    (lambda: SlateStandardIPS().estimate(np.ones(3), np.full(3, 0.5), np.full(3, 0.5)),
     r"reward must have shape \(n_rounds >= 2, len_list\)"),
    (lambda: slate_pscores(np.ones((2, 3)) / 3, np.zeros((2, 3, 2), int), np.array([0, 3])),
     r"chosen must be integer indices in \[0, 3\)"),
])
def test_slate_errors_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- DR-os ----------------------------------------------------------------------------------------
def test_dr_os_shrinks_between_dm_and_dr(seed):
    rng = np.random.default_rng(seed)
    n, A = 200, 4
    dist = rng.dirichlet(np.ones(A), size=n)
    action = rng.integers(0, A, n)
    pscore = np.full(n, 1 / A)
    reward = rng.random(n)
    q = rng.random((n, A))
    log = (reward, action, pscore, dist, q)
    assert DRos().estimate(*log).value == pytest.approx(DR().estimate(*log).value, abs=1e-12)
    assert DRos(lam=0.0).estimate(*log).value == pytest.approx(DM().estimate(*log).value, abs=1e-12)
    lam = 2.0
    w = dist[np.arange(n), action] / pscore
    ws = lam * w / (w**2 + lam)
    want = np.mean((dist * q).sum(1) + ws * (reward - q[np.arange(n), action]))
    assert DRos(lam=lam).estimate(*log).value == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match=r"lam must be a number >= 0 \(inf allowed\); got -1"):
        DRos(lam=-1)


# ---- logistic reward model ------------------------------------------------------------------------
def newton_logistic(z, y, pen):
    c = np.zeros(z.shape[1])
    for _ in range(100):
        p = expit(z @ c)
        g = z.T @ (p - y) + pen * c
        h = (z * (p * (1 - p))[:, None]).T @ z + np.diag(pen)
        step = np.linalg.solve(h, g)
        c -= step
        if np.abs(step).max() < 1e-13:
            break
    return c


def test_logistic_model_matches_newton_on_the_explicit_design(seed):
    rng = np.random.default_rng(seed)
    n, A, dx, df, L = 600, 5, 3, 2, 3
    x = rng.standard_normal((n, dx))
    f = rng.standard_normal((A, df))
    action = rng.integers(0, A, n)
    pos = rng.integers(0, L, n)
    logit = 0.3 * x[:, 0] - 0.5 * f[action, 1] + 0.4 * x[:, 1] * f[action, 0] - 0.3 * pos
    reward = rng.binomial(1, expit(logit))
    m = LogisticRewardModel(alpha=1.0).fit(x, f, action, reward, position=pos, len_list=L)
    # the design, built explicitly per logged row: [1, x, f_a, x (x) f_a, onehot(pos > 0)]
    z = np.concatenate([np.ones((n, 1)), x, f[action], (x[:, :, None] * f[action][:, None, :]).reshape(n, -1),
                        np.eye(L)[pos][:, 1:]], axis=1)
    pen = np.ones(z.shape[1])
    pen[0] = 0.0
    ref = newton_logistic(z, reward.astype(float), pen)
    np.testing.assert_allclose(m.coef_, ref, atol=1e-5)
    pred = m.predict(x[:7], f)
    assert pred.shape == (7, A, L) and ((pred > 0) & (pred < 1)).all()
    for i, a, k in itertools.product(range(7), range(A), range(L)):
        zi = np.concatenate([[1.0], x[i], f[a], np.outer(x[i], f[a]).ravel(), np.eye(L)[k][1:]])
        assert pred[i, a, k] == pytest.approx(expit(zi @ ref), abs=1e-6)


def test_logistic_model_rejects_non_binary_rewards():
    with pytest.raises(ValueError, match=r"reward must be binary \(0 or 1\).*got \[0.5\]"):
        LogisticRewardModel().fit(np.zeros((2, 1)), np.zeros((2, 1)), np.array([0, 1]), np.array([1.0, 0.5]))
    with pytest.raises(ValueError, match=r"action_features must have shape \(n_actions, d_f\)"):
        LogisticRewardModel().fit(np.zeros((2, 1)), np.zeros((2, 2, 1)), np.array([0, 1]), np.array([1, 0]))


def test_bootstrap_takes_a_seed():
    a = bootstrap_ci(IPS(), REWARD, ACTION, PSCORE, ACTION_DIST, position=POSITION, n_boot=50, seed=3)
    b = bootstrap_ci(IPS(), REWARD, ACTION, PSCORE, ACTION_DIST, position=POSITION, n_boot=50,
                     rng=np.random.default_rng(3))
    assert (a.low, a.high, a.se) == (b.low, b.high, b.se)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0; got -2"):
        bootstrap_ci(IPS(), REWARD, ACTION, PSCORE, ACTION_DIST, position=POSITION, seed=-2)


def obp_formulas(reward, action, pscore, action_dist, q, position, lam):
    """obp 0.4.1's estimators with positions, written out (``ope/estimators.py``): weights and the
    reward model are read at each round's logged position."""
    n = reward.shape[0]
    rows = np.arange(n)
    iw = action_dist[rows, action, position] / pscore
    q_pos = q[rows, :, position]
    dm = np.average(q_pos, weights=action_dist[rows, :, position], axis=1)
    resid = reward - q[rows, action, position]
    shrunk = lam * iw / (iw**2 + lam)
    return {"IPS": np.mean(iw * reward), "SNIPS": np.mean(iw * reward) / np.mean(iw),
            "DR": np.mean(dm + iw * resid), "DR-os": np.mean(dm + shrunk * resid)}


def test_position_estimators_equal_obp_formulas_over_several_blocks(seed):
    # 12,000 rounds x 4 actions x 3 positions span two of the scan's blocks
    rng = np.random.default_rng(seed)
    n, n_actions, len_list = 12_000, 4, 3
    pi = rng.random((n, n_actions, len_list))
    pi /= pi.sum(axis=1, keepdims=True)
    q = rng.random((n, n_actions, len_list))
    action, position = rng.integers(0, n_actions, n), rng.integers(0, len_list, n)
    pscore = rng.uniform(0.1, 0.5, n)
    reward = rng.binomial(1, 0.3, n).astype(float)
    want = obp_formulas(reward, action, pscore, pi, q, position, lam=5.0)
    for est in (IPS(), SNIPS(), DR(), DRos(lam=5.0)):
        got = est.estimate(reward, action, pscore, pi, q if est.needs_model else None, position=position).value
        assert got == pytest.approx(want[est.name], abs=1e-12, rel=1e-12), est.name


def test_validation_reads_what_each_estimator_needs():
    # IPS reads the logged action's probability at the logged position, and checks it
    bad = ACTION_DIST.copy()
    bad[1, 2, 0] = 1.5
    with pytest.raises(ValueError, match=r"action_dist must be in \[0, 1\]; got 1.5 at round 1, the logged action "
                                         r"and position"):
        IPS().estimate(REWARD, ACTION, PSCORE, bad, position=POSITION)
    # a short log has every row's sum at its logged position checked by IPS too
    bad = ACTION_DIST.copy()
    bad[2, 0, 1] = 0.4
    with pytest.raises(ValueError, match=r"action_dist rows must sum to 1 \(within 1e-05\); row 2 sums to 0.89999"):
        SNIPS().estimate(REWARD, ACTION, PSCORE, bad, position=POSITION)
    # a model-based estimator reads every row, and checks every position (here one never logged)
    bad = ACTION_DIST.copy()
    bad[3, 0, 1] = 0.2
    q = np.zeros((4, 3, 2))
    assert IPS().estimate(REWARD, ACTION, PSCORE, bad, position=POSITION).value == pytest.approx(0.55)
    with pytest.raises(ValueError, match=r"row 3 at position 1 sums to 1.2"):
        DR().estimate(REWARD, ACTION, PSCORE, bad, q, position=POSITION)
