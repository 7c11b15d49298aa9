"""bandits partial sums of a partitioned log: every estimator, its standard error and its weight
diagnostics against a plain numpy computation over the concatenated log; a partition handed over in
blocks equals the partition in one call; validation names the partition's own rounds.

Run every seeded test for seeds 0..99 with ``SEEDS=all pytest tests/bandits/test_ope_partial_sums.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from bandits import combine_partial_sums, estimate_all, ope_partial_sums, ope_partial_sums_blocks
from bandits._ope import _PARTIAL_BLOCK_ROWS, _W_EDGES, _weight_bins

TAU = 3.0


def make_log(rng: np.random.Generator, n: int, n_cand: int = 5, model: bool = True):
    """A logged-candidates log whose weights reach past ``TAU`` (so Switch-DR switches)."""
    behaviour = rng.dirichlet(np.ones(n_cand), size=n)
    action = (behaviour.cumsum(1) > rng.random(n)[:, None]).argmax(1)
    action = np.minimum(action, n_cand - 1)
    pscore = behaviour[np.arange(n), action]
    target = rng.dirichlet(np.full(n_cand, 0.5), size=n)
    reward = rng.binomial(1, 0.1 + 0.6 * action / n_cand).astype(float)
    q = rng.random((n, n_cand)) if model else None
    return reward, action, pscore, target, q


def numpy_reference(reward, action, pscore, target, q, tau=TAU):
    """Each estimator's value and standard error over the whole log, from its formula: one row per
    round, then a mean or a ratio of sums, and the delta method's influence terms."""
    n = reward.shape[0]
    w = target[np.arange(n), action] / pscore
    out = {"IPS": w * reward}
    snips = np.sum(w * reward) / np.sum(w)
    out["SNIPS"] = (snips, (w * reward - snips * w) / np.mean(w) + snips)
    if q is not None:
        q_pi = np.sum(target * q, axis=1)
        res = w * (reward - q[np.arange(n), action])
        out["DM"] = q_pi
        out["DR"] = q_pi + res
        sn = np.sum(res) / np.sum(w)
        out["SNDR"] = (np.mean(q_pi) + sn, q_pi + (res - sn * w) / np.mean(w) + sn)
        out["Switch-DR"] = q_pi + np.where(w <= tau, res, 0.0)
    ref = {}
    for name, x in out.items():
        value, psi = (x if isinstance(x, tuple) else (float(np.mean(x)), x))
        ref[name] = (value, float(np.std(psi, ddof=1)) / np.sqrt(n))
    return ref, w


@pytest.mark.parametrize("model", [True, False])
def test_combined_blocks_equal_a_numpy_reference_over_the_whole_log(seed, model):
    rng = np.random.default_rng(seed)
    n = 3 * _PARTIAL_BLOCK_ROWS + 1234  # partitions and blocks that straddle the pass's own blocks
    log = make_log(rng, n, model=model)
    cuts = [0, 5000, 5001, 20000, n]  # partition 0: rows 0-5000 in one call; partition 1: in 3 blocks
    part0 = ope_partial_sums(*(x[:5001] if x is not None else None for x in log), switch_tau=TAU)
    blocks = [tuple(x[s:e] if x is not None else None for x in log) for s, e in zip(cuts[2:-1], cuts[3:], strict=True)]
    blocks.insert(0, tuple(x[5001:5001] if x is not None else None for x in log))  # an empty block is fine
    part1 = ope_partial_sums_blocks(iter(blocks), n - 5001, switch_tau=TAU, partition=1)
    rows = combine_partial_sums([part0, part1])
    ref, w = numpy_reference(*log)
    assert [r["estimator"] for r in rows] == [e["estimator"] for e in estimate_all(*log, switch_tau=TAU)]
    assert {r["estimator"] for r in rows} == set(ref)
    for r in rows:
        value, se = ref[r["estimator"]]
        assert r["value"] == pytest.approx(value, abs=1e-9, rel=1e-9), r["estimator"]
        assert r["se"] == pytest.approx(se, abs=1e-9, rel=1e-9), r["estimator"]
        assert r["n_rounds"] == n
        assert r["ess"] == pytest.approx(w.sum() ** 2 / (w @ w), rel=1e-9)
        assert r["mean_weight"] == pytest.approx(w.mean(), rel=1e-9)
        assert r["max_weight"] == w.max()
        # the quantile is the upper edge of its histogram bin: at or above the row's, within one bin
        for key, level in (("weight_q50", 0.5), ("weight_q90", 0.9), ("weight_q99", 0.99)):
            exact = np.sort(w)[int(np.ceil(level * n)) - 1]
            assert exact <= r[key] <= exact * (1 + 1 / 16) or r[key] == w.max(), key


def test_a_partition_in_blocks_equals_it_in_one_call(seed):
    rng = np.random.default_rng(seed)
    n = 2 * _PARTIAL_BLOCK_ROWS + 77
    log = make_log(rng, n)
    whole = ope_partial_sums(*log, n_boot=5, seed=9, partition=4, switch_tau=TAU)
    cuts = np.sort(rng.choice(np.arange(1, n), 6, replace=False))
    bounds = [0, *cuts.tolist(), n]
    blocks = [tuple(x[s:e] for x in log) for s, e in zip(bounds[:-1], bounds[1:], strict=True)]
    before = [x.copy() for x in log]
    parts = ope_partial_sums_blocks(blocks, n, n_boot=5, seed=9, partition=4, switch_tau=TAU)
    assert all(np.array_equal(x, y) for x, y in zip(log, before, strict=True))  # inputs untouched
    assert parts.estimators == whole.estimators and parts.plan == whole.plan and parts.n == n
    np.testing.assert_allclose(parts.gram, whole.gram, rtol=1e-12, atol=1e-9)
    np.testing.assert_array_equal(parts.w_hist, whole.w_hist)
    assert parts.w_max == whole.w_max
    # the bootstrap's counts are the partition's own stream, whatever the blocks: the same sums
    assert parts.boot is not None and whole.boot is not None
    np.testing.assert_allclose(parts.boot, whole.boot, rtol=1e-12, atol=1e-9)
    # ... and they are default_rng([seed, partition]).poisson(1, n), one resample after another
    g = np.random.default_rng([9, 4])
    w = log[3][np.arange(n), log[1]] / log[2]
    counts = np.stack([g.poisson(1.0, n) for _ in range(5)]).astype(float)
    np.testing.assert_allclose(parts.boot[:, 0], counts.sum(1))
    np.testing.assert_allclose(parts.boot[:, 3], counts @ w, rtol=1e-12)


def test_float32_and_positions_equal_estimate_all(seed):
    rng = np.random.default_rng(seed)
    r, a, p, pi, q = make_log(rng, 3000)
    pi32, q32 = pi.astype(np.float32), q.astype(np.float32)
    pi32 /= pi32.sum(1, keepdims=True)
    for args, kw in (((r, a, p, pi32, q32), {}), ((r, a, p, pi[:, :, None], q[:, :, None]), {"position": np.zeros(3000, int)})):
        rows = combine_partial_sums([ope_partial_sums(*args, switch_tau=TAU, **kw)])
        for got, want in zip(rows, estimate_all(*args, switch_tau=TAU, **kw), strict=True):
            assert got["estimator"] == want["estimator"]
            assert got["value"] == pytest.approx(want["value"], abs=1e-9, rel=1e-9)
            assert got["se"] == pytest.approx(want["se"], abs=1e-9, rel=1e-9)


def test_weight_bins_equal_numpy_histogram():
    edges = _W_EDGES
    assert edges[0] == 0 and edges[-1] == np.inf and np.all(np.diff(edges[1:-1]) > 0)
    assert edges[1] == 2.0**-20 and edges[-2] == 2.0**20
    widths = edges[2:-1] / edges[1:-2] - 1
    assert widths.min() == pytest.approx(1 / 63) and widths.max() == pytest.approx(1 / 32)
    rng = np.random.default_rng(0)
    w = np.concatenate([[0.0, -0.0, 5e-324, 1e-300, 1e300], edges[1:-1], np.nextafter(edges[1:-1], 0),
                        np.exp(rng.uniform(-20, 20, 10_000))])
    np.testing.assert_array_equal(np.bincount(_weight_bins(w.copy()), minlength=edges.size - 1),
                                  np.histogram(np.abs(w), edges)[0])


def test_validation_names_the_partitions_own_rounds():
    rng = np.random.default_rng(1)
    n = _PARTIAL_BLOCK_ROWS + 500
    r, a, p, pi, q = make_log(rng, n)
    bad = p.copy()
    bad[n - 3] = 1.5
    with pytest.raises(ValueError, match=rf"pscore must be in \(0, 1\]; got 1.5 at round {n - 3}"):
        ope_partial_sums(r, a, bad, pi, q)
    off = pi.copy()
    off[n - 10, 0] += 0.01
    with pytest.raises(ValueError, match=rf"action_dist rows must sum to 1 \(within 1e-05\); row {n - 10} sums to"):
        ope_partial_sums(r, a, p, off, q)
    with pytest.raises(ValueError, match=rf"action_dist rows must sum to 1 \(within 1e-05\); row {n - 10} sums to"):
        ope_partial_sums_blocks([(r[:100], a[:100], p[:100], pi[:100], q[:100]),
                                 (r[100:], a[100:], p[100:], off[100:], q[100:])], n)
    # without a model, the rows estimate_all checks (1,024 spread over the log; the last among them)
    with pytest.raises(ValueError, match=rf"action_dist rows must sum to 1 \(within 1e-05\); row {n - 1} sums to"):
        off = pi.copy()
        off[n - 1, (a[n - 1] + 1) % 5] += 0.5
        ope_partial_sums(r, a, p, off)
    nq = q.copy()
    nq[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"estimated_rewards must be finite; got non-finite entries"):
        ope_partial_sums(r, a, p, pi, nq)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda log: ope_partial_sums_blocks([log], 9), r"blocks must hold n_rounds = 9 rows in all; got more"),
        (lambda log: ope_partial_sums_blocks([log], 11), r"blocks must hold n_rounds = 11 rows in all; got 10"),
        (lambda log: ope_partial_sums_blocks([], 10), r"blocks must hold n_rounds = 10 rows in all; got no block"),
        (lambda log: ope_partial_sums_blocks([log], 1), r"n_rounds must be an integer >= 2 \(for a standard error\)"),
        (lambda log: ope_partial_sums_blocks([(*log[:4], None), log], 20),
         r"estimated_rewards must be given for every block or for none"),
        (lambda log: ope_partial_sums_blocks([(*log[:3], log[3][:, :3], log[4])], 10),
         r"estimated_rewards must have the shape of action_dist \(10, 3\); got \(10, 5\)"),
        (lambda log: ope_partial_sums(*(x[:1] for x in log)), r"reward must have at least 2 rounds"),
        (lambda log: ope_partial_sums(log[0], log[1] + 5, *log[2:]), r"action must be in \[0, 5\); got values in"),
        (lambda log: ope_partial_sums(log[0], log[1].astype(float), *log[2:]), r"action must be integer indices"),
    ],
)
def test_bad_inputs_are_named(call, match):
    log = make_log(np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match=match):
        call(log)
