"""bandits: exploration budget, deterministic draws, the VW adapter and the DSJSON export.

Run every seeded test for seeds 0..99 with ``SEEDS=all pytest tests/test_bandits.py``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import pickle

import numpy as np
import pytest

from bandits import (
    EpsilonGreedy,
    VWLayoutBandit,
    budget_pmf,
    parse_dsjson_line,
    sample,
    sample_batch,
    softmax_pmf,
    to_dsjson_line,
    uniform_from_seed,
)


def random_pmf(rng: np.random.Generator, n: int, zeros: int = 0) -> np.ndarray:
    p = rng.dirichlet(np.full(n, 0.7))
    if zeros:
        p[rng.choice(n, size=zeros, replace=False)] = 0.0
        p /= p.sum()
    return p


def brute_force_budget(p: np.ndarray, g: int, budget: float, v: np.ndarray | None = None,
                       m: float | None = None) -> np.ndarray:
    """Smallest mixing t toward e_g meeting the constraints, by bisection on t (independent of the
    closed form): constraints evaluated on the mixed pmf itself."""
    e = np.zeros_like(p)
    e[g] = 1.0

    def ok(t: float) -> bool:
        q = (1 - t) * p + t * e
        fine = q.sum() - q[g] <= budget + 1e-13
        if m is not None and v is not None:
            fine = fine and v[g] - q @ v <= m * abs(v[g]) + 1e-13
        return bool(fine)

    if ok(0.0):
        return p.copy()
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return (1 - hi) * p + hi * e


# -- budget_pmf ---------------------------------------------------------------------------------
def test_budget_pmf_hand_example() -> None:
    # off-greedy mass 0.5 > 0.1: scale the others by 0.1 / 0.5 = 0.2
    q = budget_pmf(np.array([0.25, 0.25, 0.5]), 2, 0.1)
    np.testing.assert_allclose(q, [0.05, 0.05, 0.9], atol=1e-15)
    # within budget already: unchanged
    np.testing.assert_allclose(budget_pmf(np.array([0.05, 0.05, 0.9]), 2, 0.2), [0.05, 0.05, 0.9])
    # budget 0: all mass on greedy
    np.testing.assert_array_equal(budget_pmf(np.array([0.2, 0.3, 0.5]), 1, 0.0), [0.0, 1.0, 0.0])


def test_budget_pmf_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(30):
        n = int(rng.integers(1, 9))
        p = random_pmf(rng, n, zeros=int(rng.integers(0, n)))
        g = int(rng.integers(n))
        budget = float(rng.choice([0.0, 0.01, 0.1, 0.5, 1.0, rng.random()]))
        v = rng.normal(size=n) * 3
        m = float(rng.choice([0.0, 0.05, 0.3, rng.random()]))
        p_in, v_in = p.copy(), v.copy()
        q = budget_pmf(p, g, budget)
        np.testing.assert_allclose(q, brute_force_budget(p, g, budget), atol=1e-9)
        q2 = budget_pmf(p, g, budget, value=v, max_value_loss=m)
        np.testing.assert_allclose(q2, brute_force_budget(p, g, budget, v, m), atol=1e-9)
        for r in (q, q2):
            assert r.sum() == pytest.approx(1.0, abs=1e-12) and (r >= 0).all()
            assert r.sum() - r[g] <= budget + 1e-12
            assert (r[p == 0] == 0).all() or p[g] == 0  # zero candidates stay zero (greedy excepted)
        assert v[g] - q2 @ v <= m * abs(v[g]) + 1e-12
        np.testing.assert_array_equal(p, p_in)  # inputs not mutated
        np.testing.assert_array_equal(v, v_in)


def test_budget_pmf_batch_equals_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_rounds, n_cand = 50, 6
    p = np.stack([random_pmf(rng, n_cand, zeros=int(rng.integers(0, 3))) for _ in range(n_rounds)])
    g = rng.integers(0, n_cand, n_rounds)
    v = rng.normal(size=(n_rounds, n_cand))
    q = budget_pmf(p, g, 0.2, value=v, max_value_loss=0.1)
    rows = np.stack([budget_pmf(p[i], int(g[i]), 0.2, value=v[i], max_value_loss=0.1) for i in range(n_rounds)])
    np.testing.assert_allclose(q, rows, atol=1e-14)


def test_budget_holds_over_long_stream(seed: int) -> None:
    """Served traffic: the off-greedy share stays within the budget (+3 SE), and the realised value
    given up matches its expectation, which the pmf keeps at or under the cap."""
    rng = np.random.default_rng(seed)
    n_req, n_cand, budget, cap = 20000, 8, 0.07, 0.02
    p = rng.dirichlet(np.ones(n_cand), size=n_req)  # a wildly exploring base policy
    v = rng.uniform(0.5, 2.0, size=(n_req, n_cand))
    g = np.argmax(v, axis=1)
    q = budget_pmf(p, g, budget, value=v, max_value_loss=cap)
    seeds = np.array([int.from_bytes(hashlib.blake2b(f"{seed}/req{i}".encode(), digest_size=8).digest(),
                                     "little") for i in range(n_req)], dtype=np.uint64)
    drawn = sample_batch(q, seeds)
    off = drawn != g
    assert off.mean() <= budget + 3 * np.sqrt(budget * (1 - budget) / n_req)
    v_g = v[np.arange(n_req), g]
    expected_loss = (v_g - np.einsum("ij,ij->i", q, v)) / v_g
    assert expected_loss.max() <= cap + 1e-12  # exact, per request
    realised = (v_g - v[np.arange(n_req), drawn]) / v_g
    se = realised.std() / np.sqrt(n_req)
    assert abs(realised.mean() - expected_loss.mean()) <= 4 * se
    assert realised.mean() <= cap + 4 * se


def test_budget_pmf_rejects_bad_inputs() -> None:
    p = np.array([0.5, 0.5])
    with pytest.raises(ValueError, match=r"budget must be a number in \[0, 1\]; got 1.5"):
        budget_pmf(p, 0, 1.5)
    with pytest.raises(ValueError, match=r"pmf must sum to 1"):
        budget_pmf(np.array([0.5, 0.6]), 0, 0.1)
    with pytest.raises(ValueError, match=r"pmf must be >= 0"):
        budget_pmf(np.array([1.5, -0.5]), 0, 0.1)
    with pytest.raises(ValueError, match=r"greedy must be in \[0, 2\)"):
        budget_pmf(p, 2, 0.1)
    with pytest.raises(ValueError, match=r"greedy must be an integer index"):
        budget_pmf(p, 0.5, 0.1)
    with pytest.raises(ValueError, match=r"value is required when max_value_loss is set"):
        budget_pmf(p, 0, 0.1, max_value_loss=0.1)
    with pytest.raises(ValueError, match=r"value must have the shape of pmf"):
        budget_pmf(p, 0, 0.1, value=np.ones(3), max_value_loss=0.1)
    with pytest.raises(ValueError, match=r"max_value_loss must be a number in \[0, 1\]"):
        budget_pmf(p, 0, 0.1, value=np.ones(2), max_value_loss=-0.1)


# -- EpsilonGreedy, softmax ---------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 16])
@pytest.mark.parametrize("budget", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_epsilon_greedy_puts_budget_off_greedy(n: int, budget: float) -> None:
    pmf = EpsilonGreedy(budget).pmf(0, n)
    off = pmf[1:].sum()
    assert pmf.sum() == pytest.approx(1.0)
    if n == 1:
        np.testing.assert_array_equal(pmf, [1.0])
    elif budget <= (n - 1) / n:
        assert off == pytest.approx(budget, abs=1e-12)  # exactly the budget
        np.testing.assert_allclose(pmf[1:], budget / (n - 1))
    else:
        np.testing.assert_allclose(pmf, np.full(n, 1.0 / n))  # capped at uniform


def test_epsilon_greedy_batch_with_padding() -> None:
    mask = np.array([[True, True, True, False], [True, True, True, True]])
    q = EpsilonGreedy(0.2).pmf_batch(np.array([1, 3]), mask)
    np.testing.assert_allclose(q[0], [0.1, 0.8, 0.1, 0.0])
    np.testing.assert_allclose(q[1], [0.2 / 3, 0.2 / 3, 0.2 / 3, 0.8])
    with pytest.raises(ValueError, match=r"greedy must index a real candidate"):
        EpsilonGreedy(0.2).pmf_batch(np.array([3, 0]), mask)
    with pytest.raises(ValueError, match=r"budget must be a number in \[0, 1\]"):
        EpsilonGreedy(-0.1)


def test_softmax_pmf_matches_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(4, 6))
    mask = rng.random((4, 6)) < 0.7
    mask[:, 0] = True
    t = 0.7
    ref = np.where(mask, np.exp(s / t), 0.0)
    ref /= ref.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(softmax_pmf(s, t, mask), ref, rtol=1e-12)
    np.testing.assert_allclose(softmax_pmf(s[0] + 1000.0, t), softmax_pmf(s[0], t), rtol=1e-12)  # stable
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0; got 0"):
        softmax_pmf(s, 0)


# -- the draw -----------------------------------------------------------------------------------
def test_uniform_from_seed_is_splitmix64() -> None:
    # published SplitMix64 outputs for state 0: 0xE220A8397B1DCDAF, then 0x6E789E6AA1B965F4
    assert uniform_from_seed(0) == (0xE220A8397B1DCDAF >> 11) * 2.0**-53
    assert uniform_from_seed(0x9E3779B97F4A7C15) == (0x6E789E6AA1B965F4 >> 11) * 2.0**-53


def test_propensities_equal_draw_frequencies(seed: int) -> None:
    """Over many seeded requests each candidate is drawn with its logged propensity (chi-square)."""
    rng = np.random.default_rng(seed)
    pmf = random_pmf(rng, 6, zeros=1)
    n = 20000
    seeds = [int.from_bytes(hashlib.blake2b(f"{seed}-{i}".encode(), digest_size=8).digest(), "little")
             for i in range(n)]
    counts = np.bincount([sample(pmf, s) for s in seeds], minlength=6)
    assert counts[pmf == 0].sum() == 0  # zero propensity is never served
    live = pmf > 0
    exp = n * pmf[live]
    chi2 = float(((counts[live] - exp) ** 2 / exp).sum())
    assert chi2 < 25.7  # chi-square, df=4, p = 1e-4
    # the batch draw makes the same choices
    np.testing.assert_array_equal(sample_batch(np.tile(pmf, (500, 1)), np.array(seeds[:500], dtype=np.uint64)),
                                  [sample(pmf, s) for s in seeds[:500]])


def test_sample_is_deterministic_and_validates() -> None:
    pmf = np.array([0.2, 0.3, 0.5])
    assert [sample(pmf, 12345) for _ in range(3)] == [sample(pmf, 12345)] * 3
    assert sample(np.array([0.0, 1.0, 0.0]), 2**64 - 1) == 1
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\); got -1"):
        sample(pmf, -1)
    with pytest.raises(ValueError, match=r"pmf must have shape \(n_cand,\)"):
        sample(np.tile(pmf, (2, 1)), 1)
    with pytest.raises(ValueError, match=r"seeds must be >= 0"):
        sample_batch(np.tile(pmf, (2, 1)), np.array([1, -1]))


# -- VW adapter ---------------------------------------------------------------------------------
def contextual_problem(seed: int, d_s: int = 4, d_a: int = 4, n_cand: int = 6):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d_s, d_a))

    def draw(n: int):
        x = rng.normal(size=(n, d_s))
        z = rng.normal(size=(n, n_cand, d_a))
        mean = np.einsum("ns,sa,nka->nk", x, w, z)  # reward depends on shared x action features
        return x, z, mean

    return rng, draw


def test_vw_learns_contextual_problem(seed: int) -> None:
    rng, draw = contextual_problem(seed)
    bandit = VWLayoutBandit("squarecb", seed=seed % 1000)
    x, z, mean = draw(3000)
    for i in range(x.shape[0]):
        pmf = bandit.predict(x[i], z[i])
        a = sample(pmf, seed * 100003 + i)
        r = mean[i, a] + rng.normal(scale=0.5)
        bandit.learn(x[i], z[i], a, cost=-r, pscore=float(pmf[a]))
    xt, zt, mt = draw(400)
    pmf = bandit.predict_batch(xt, zt)
    greedy = mt[np.arange(400), pmf.argmax(axis=1)].mean()
    uniform, oracle = mt.mean(), mt.max(axis=1).mean()
    assert greedy - uniform >= 0.6 * (oracle - uniform)


@pytest.mark.parametrize("algorithm", ["squarecb", "epsilon", "bag", "cover"])
def test_vw_save_load_and_pickle_predict_identically(algorithm: str) -> None:
    _, draw = contextual_problem(7)
    x, z, mean = draw(150)
    rng = np.random.default_rng(7)
    chosen = rng.integers(0, z.shape[1], 150)
    b = VWLayoutBandit(algorithm, seed=3)
    b.learn_batch(x, z, chosen, -mean[np.arange(150), chosen], np.full(150, 1 / 6))
    before = b.predict_batch(x[:40], z[:40])
    for other in (VWLayoutBandit.load(b.save()), pickle.loads(pickle.dumps(b))):
        np.testing.assert_array_equal(other.predict_batch(x[:40], z[:40]), before)
        assert other.get_params() == b.get_params() and other.n_learned_ == 150
        assert (other.n_shared_features_, other.n_action_features_) == (4, 4)
    # a clone from the parameters is unfitted: every candidate ties
    clone = VWLayoutBandit(**b.get_params())
    np.testing.assert_allclose(clone.predict(x[0], z[0]), np.full(6, 1 / 6), atol=1e-6)  # VW pmfs are float32
    # same data, same seed: same model
    b2 = VWLayoutBandit(algorithm, seed=3)
    b2.learn_batch(x, z, chosen, -mean[np.arange(150), chosen], np.full(150, 1 / 6))
    np.testing.assert_array_equal(b2.predict_batch(x[:40], z[:40]), before)
    if algorithm in ("epsilon", "squarecb"):  # learning goes on exactly after a load
        loaded = VWLayoutBandit.load(b.save())
        for m in (b, loaded):
            m.learn_batch(x[:50], z[:50], chosen[:50], mean[np.arange(50), chosen[:50]], np.full(50, 0.5))
        np.testing.assert_array_equal(loaded.predict_batch(x[:40], z[:40]), b.predict_batch(x[:40], z[:40]))


def test_vw_trained_on_our_dsjson_equals_trained_on_arrays() -> None:
    """VW parses the DSJSON we write into the same examples the adapter builds: the model learned
    by VW's own DSJSON parser predicts exactly like the one learned from arrays (zeros included)."""
    _, draw = contextual_problem(11, n_cand=5)
    x, z, mean = draw(200)
    z[np.abs(z) < 0.5] = 0.0  # sparse candidates: zeros are skipped on both paths
    x[:, 1] = 0.0
    rng = np.random.default_rng(11)
    chosen = rng.integers(0, 5, 200)
    pscore = rng.uniform(0.1, 0.9, 200)
    cost = -mean[np.arange(200), chosen]
    lines = []
    for i in range(200):
        pmf = np.full(5, (1 - pscore[i]) / 4)
        pmf[chosen[i]] = pscore[i]
        lines.append(to_dsjson_line(event_id=f"r{i}", timestamp=1.7e9 + i, shared=x[i], actions=z[i], pmf=pmf,
                                    chosen=int(chosen[i]), cost=float(cost[i])))
    unlabeled = to_dsjson_line(event_id="u", timestamp=0.0, shared=x[0], actions=z[0], pmf=np.full(5, 0.2), chosen=0)
    a = VWLayoutBandit("squarecb", seed=1)
    a.learn_batch(x, z, chosen, cost, pscore)
    b = VWLayoutBandit("squarecb", seed=1)
    assert b.learn_dsjson(lines + [unlabeled, ""]) == 200
    np.testing.assert_array_equal(a.predict_batch(x[:50], z[:50]), b.predict_batch(x[:50], z[:50]))


def test_vw_predict_batch_with_padding_equals_predict() -> None:
    _, draw = contextual_problem(3)
    x, z, mean = draw(60)
    b = VWLayoutBandit("epsilon", epsilon=0.1)
    b.learn_batch(x, z, np.argmax(mean, axis=1), -mean.max(axis=1), np.full(60, 0.9))
    n_act = np.array([6, 2, 1, 4, 6])
    pad = z[:5].copy()
    for i, k in enumerate(n_act):
        pad[i, k:] = 99.0  # padding must be ignored
    out = b.predict_batch(x[:5], pad, n_actions=n_act)
    for i, k in enumerate(n_act):
        np.testing.assert_array_equal(out[i, :k], b.predict(x[i], z[i, :k]))
        assert (out[i, k:] == 0).all() and out[i].sum() == pytest.approx(1.0)
    # with epsilon 0.1, the greedy candidate of a k-candidate row gets 1 - 0.1 + 0.1 / k
    assert out[0].max() == pytest.approx(0.9 + 0.1 / 6, abs=1e-6)


def test_vw_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"algorithm must be one of \('epsilon', 'squarecb', 'bag', 'cover'\); got 'ucb'"):
        VWLayoutBandit("ucb")
    with pytest.raises(ValueError, match=r"epsilon must be a number in \[0.0, 1.0\]; got 2"):
        VWLayoutBandit("epsilon", epsilon=2)
    with pytest.raises(ValueError, match=r"gamma_scale must be a number in \(0.0"):
        VWLayoutBandit(gamma_scale=0.0)
    with pytest.raises(ValueError, match=r"interactions must be a sequence of strings over 's' and 'a'"):
        VWLayoutBandit(interactions=("sx",))
    b = VWLayoutBandit()
    b.predict(np.ones(3), np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"shared/actions must have 3/2 features \(fixed by the first call\); got 3/5"):
        b.predict(np.ones(3), np.ones((4, 5)))
    with pytest.raises(ValueError, match=r"actions must be finite"):
        b.predict(np.ones(3), np.full((4, 2), np.nan))
    with pytest.raises(ValueError, match=r"actions must have at least one candidate row"):
        b.predict(np.ones(3), np.ones((0, 2)))
    with pytest.raises(ValueError, match=r"chosen must be in \[0, n_actions\); got 4 at row 0 with 4 candidates"):
        b.learn(np.ones(3), np.ones((4, 2)), 4, cost=1.0, pscore=0.5)
    with pytest.raises(ValueError, match=r"pscore must be in \(0, 1\]"):
        b.learn(np.ones(3), np.ones((4, 2)), 1, cost=1.0, pscore=0.0)
    with pytest.raises(ValueError, match=r"cost must be finite"):
        b.learn(np.ones(3), np.ones((4, 2)), 1, cost=np.inf, pscore=0.5)
    with pytest.raises(ValueError, match=r"data is not a VWLayoutBandit model \(bad magic header\)"):
        VWLayoutBandit.load(b"not a model")
    with pytest.raises(ValueError, match=r"VW could not load it"):
        VWLayoutBandit.load(b.save()[:-200])
    with pytest.raises(ValueError, match=r"VW could not parse DSJSON line 1"):
        b.learn_dsjson(['{"c": {"_multi": [}'])


# -- DSJSON -------------------------------------------------------------------------------------
def test_dsjson_fields_by_hand() -> None:
    line = to_dsjson_line(event_id="req-1", timestamp=dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
                          shared=np.array([1.5, 0.0, 2.0]), actions=np.array([[1.0, 0.0], [0.0, 0.5], [0.3, 0.0]]),
                          pmf=np.array([0.5, 0.2, 0.3]), chosen=2, cost=-1.25, outcomes=[1.0, 0.25],
                          model_version="bandit/7", tags=["l0", "l1", "l2"])
    obj = json.loads(line)
    assert obj["_label_cost"] == -1.25 and obj["_label_probability"] == 0.3
    assert obj["_label_Action"] == 3 and obj["_labelIndex"] == 2
    assert obj["a"] == [3, 1, 2] and obj["p"] == [0.3, 0.5, 0.2]  # chosen first, p in a's order
    assert obj["Timestamp"] == "2024-01-02T03:04:05.1234560Z" and obj["Version"] == "1"
    assert obj["EventId"] == "req-1" and obj["VWState"] == {"m": "bandit/7"}
    assert obj["o"] == [{"v": 1.0, "EventId": "req-1", "ActionTaken": False},
                        {"v": 0.25, "EventId": "req-1", "ActionTaken": False}]
    assert obj["c"] == {"s": {"0": 1.5, "2": 2.0},
                        "_multi": [{"_tag": "l0", "a": {"0": 1.0}}, {"_tag": "l1", "a": {"1": 0.5}},
                                   {"_tag": "l2", "a": {"0": 0.3}}]}
    no_label = json.loads(to_dsjson_line(event_id="r", timestamp=0, shared=np.ones(1), actions=np.ones((2, 1)),
                                         pmf=np.array([0.5, 0.5]), chosen=1))
    assert "_label_cost" not in no_label and no_label["Timestamp"] == "1970-01-01T00:00:00.0000000Z"


def test_dsjson_round_trip(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_cand, d_s, d_a = int(rng.integers(1, 9)), 5, 7
    s = np.where(rng.random(d_s) < 0.5, rng.normal(size=d_s), 0.0)
    a = np.where(rng.random((n_cand, d_a)) < 0.5, rng.normal(size=(n_cand, d_a)), 0.0)
    pmf = random_pmf(rng, n_cand)
    chosen = int(rng.integers(n_cand))
    line = to_dsjson_line(event_id="e", timestamp=1.7e9, shared=s, actions=a, pmf=pmf, chosen=chosen,
                          cost=-2.5, outcomes=[2.5])
    d = parse_dsjson_line(line, n_shared_features=d_s, n_action_features=d_a)
    np.testing.assert_array_equal(d.shared, s)
    np.testing.assert_array_equal(d.actions, a)
    np.testing.assert_array_equal(d.pmf, pmf)
    assert (d.chosen, d.cost, d.outcomes, d.event_id) == (chosen, -2.5, (2.5,), "e")


def test_dsjson_rejects_bad_inputs() -> None:
    ok = {"event_id": "e", "timestamp": 0.0, "shared": np.ones(2), "actions": np.ones((2, 2)),
          "pmf": np.array([0.5, 0.5]), "chosen": 0}
    with pytest.raises(ValueError, match=r"chosen must be an integer in \[0, 2\); got 2"):
        to_dsjson_line(**{**ok, "chosen": 2})
    with pytest.raises(ValueError, match=r"pmf\[chosen\] must be > 0"):
        to_dsjson_line(**{**ok, "pmf": np.array([0.0, 1.0])})
    with pytest.raises(ValueError, match=r"pmf must be a distribution of shape \(2,\)"):
        to_dsjson_line(**{**ok, "pmf": np.array([0.5, 0.6])})
    with pytest.raises(ValueError, match=r"cost must be a finite number or None"):
        to_dsjson_line(**{**ok, "cost": float("nan")})
    with pytest.raises(ValueError, match=r"DSJSON line misses required field 'a'"):
        parse_dsjson_line('{"EventId": "e", "c": {}, "p": []}')
    with pytest.raises(ValueError, match=r"line is not valid JSON"):
        parse_dsjson_line("{")
    line = to_dsjson_line(**ok)
    with pytest.raises(ValueError, match=r"c._multi\[0\].a has feature 1 but only 1 features were declared"):
        parse_dsjson_line(line, n_action_features=1)
