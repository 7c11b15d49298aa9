"""The Poisson bootstrap of bandits' off-policy estimators (the default of ``bootstrap_ci`` and
``estimate_all``): its counts against the Poisson(1) law, its CIs against a plain loop over the same
counts, and its coverage on simulated logs with a known value.

Run every seeded test for seeds 0..99 with ``SEEDS=all pytest tests/bandits/test_ope_bootstrap.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bandits import DR, IPS, SNDR, SNIPS, SwitchDR, bootstrap_ci, estimate_all
from bandits import _ope as ope

from .test_ope import synthetic_world


def _resampled(data: tuple[np.ndarray, ...], counts: np.ndarray) -> tuple[np.ndarray, ...]:
    """The log with round i repeated counts[i] times (the resample the counts stand for)."""
    idx = np.repeat(np.arange(counts.size), counts.astype(np.int64))
    return tuple(x[idx] for x in data)


def test_poisson_table_against_scipy() -> None:
    """Every 16-bit bin's count is the Poisson(1) quantile count #{k: F(k) <= u} at both ends of the
    bin (scipy's CDF), and the bins marked 255 are exactly those where the two ends differ."""
    k = np.arange(40)
    cdf = stats.poisson.cdf(k, 1.0)
    lo = np.arange(1 << 16) / 65536.0
    hi = np.nextafter((np.arange(1 << 16) + 1) / 65536.0, 0.0)  # the bin's last double
    at_lo = (cdf[None, :] <= lo[:, None]).sum(axis=1)
    at_hi = (cdf[None, :] <= hi[:, None]).sum(axis=1)
    table = ope._POIS_TABLE.astype(np.int64)
    same = at_lo == at_hi
    assert np.array_equal(table[same], at_lo[same])
    assert np.array_equal(np.flatnonzero(~same), np.flatnonzero(table == 255))
    assert np.flatnonzero(~same).size == 8  # F(0..6) fall in distinct bins, F(7..) all in the last
    assert ope._POIS_CDF == pytest.approx(stats.poisson.cdf(np.arange(ope._POIS_CDF.size), 1.0), abs=1e-15)


@pytest.mark.parametrize("block_counts", [1 << 18, 96])
def test_poisson_counts_follow_poisson1(seed: int, monkeypatch: pytest.MonkeyPatch, block_counts: int) -> None:
    """The counts' frequencies match the Poisson(1) pmf (scipy) within 5 binomial standard errors,
    their mean and variance are 1, resamples are uncorrelated, and blocks of any size draw the same
    law (96 counts per block: the 64-row minimum, so 32 blocks, the last of 19 rows)."""
    monkeypatch.setattr(ope, "_BOOT_BLOCK_COUNTS", block_counts)
    c = ope._poisson_counts(2003, 1000, np.random.default_rng(seed))
    assert c.shape == (1000, 2003) and np.array_equal(c, np.round(c)) and c.min() >= 0
    n = c.size
    freq = np.bincount(c.astype(np.int64).ravel(), minlength=9)[:9] / n
    pmf = stats.poisson.pmf(np.arange(9), 1.0)
    se = np.sqrt(pmf * (1 - pmf) / n)
    assert np.all(np.abs(freq - pmf) <= 5 * se + 1e-7), (freq, pmf)
    tail = float((c >= 5).mean())
    assert tail == pytest.approx(stats.poisson.sf(4, 1.0), abs=5 * math.sqrt(0.0037 / n))
    assert c.mean() == pytest.approx(1.0, abs=5 / math.sqrt(n))
    assert c.var() == pytest.approx(1.0, abs=5 * math.sqrt(3.0 / n))  # var of (X - 1)^2 is 3 for Poisson(1)
    sizes = c.sum(axis=1)  # resample sizes: Poisson(2003), independent
    assert sizes.var(ddof=1) == pytest.approx(2003, rel=5 * math.sqrt(2 / 999))
    r = np.corrcoef(c[:, :500])  # rows: resamples
    off = r[~np.eye(r.shape[0], dtype=bool)]
    assert abs(off.mean()) <= 5 / math.sqrt(500 * off.size / 2)


@pytest.mark.parametrize("block_counts", [1 << 18, 40 * 64])
def test_poisson_bootstrap_matches_slow_loop(seed: int, monkeypatch: pytest.MonkeyPatch, block_counts: int) -> None:
    """bootstrap_ci's CI and se equal re-running each estimator on the resampled logs (rounds repeated
    by the same seeded counts) in a plain loop, to 1e-12; with 40 * 64 counts per block the 300 rounds
    span 5 blocks."""
    monkeypatch.setattr(ope, "_BOOT_BLOCK_COUNTS", block_counts)
    _, log = synthetic_world(np.random.default_rng(seed))
    data = log(300, model_bias=0.2)
    counts = ope._poisson_counts(300, 40, np.random.default_rng(seed))
    for est in (IPS(), SNIPS(), DR(), SNDR(), SwitchDR(tau=3.0)):
        ci = bootstrap_ci(est, *data, n_boot=40, alpha=0.1, seed=seed)
        values = [est.estimate(*_resampled(data, c)).value for c in counts]
        lo, hi = np.quantile(values, [0.05, 0.95])
        assert (ci.low, ci.high) == pytest.approx((lo, hi), abs=1e-12), est.name
        assert ci.se == pytest.approx(np.std(values, ddof=1), rel=1e-9), est.name


def test_estimate_all_poisson_bootstrap_is_paired_and_matches_slow_loop(seed: int) -> None:
    """estimate_all's boot columns come from one shared set of Poisson resamples: each row equals the
    plain loop over the same counts for that estimator, to 1e-12."""
    _, log = synthetic_world(np.random.default_rng(seed))
    data = log(200, model_bias=0.1)
    rows = estimate_all(*data, switch_tau=2.0, n_boot=30, seed=seed)
    counts = ope._poisson_counts(200, 30, np.random.default_rng(seed))
    ests = (ope.DM(), IPS(), SNIPS(), DR(), SNDR(), SwitchDR(tau=2.0))
    for row, est in zip(rows, ests, strict=True):
        values = [est.estimate(*_resampled(data, c)).value for c in counts]
        lo, hi = np.quantile(values, [0.025, 0.975])
        assert (row["boot_low"], row["boot_high"]) == pytest.approx((lo, hi), abs=1e-12), est.name
        assert row["boot_se"] == pytest.approx(np.std(values, ddof=1), rel=1e-9), est.name


def test_poisson_bootstrap_ci_covers_truth(seed: int) -> None:
    """On simulated logs with a known policy value, the 90 % percentile CIs of IPS, SNIPS and DR cover
    it in 90 % of 150 logs, within 0.80..0.97 (binomial sd 0.024; 100 seeds: 0.82 to 0.96, mean 0.89)."""
    truth, log = synthetic_world(np.random.default_rng(seed))
    covered = {"IPS": 0, "SNIPS": 0, "DR": 0}
    n_logs = 150
    for i in range(n_logs):
        r, a, p, pi, q = log(400, model_bias=0.1)
        for row in estimate_all(r, a, p, pi, q, n_boot=200, alpha=0.1, seed=i):
            if row["estimator"] in covered:
                covered[row["estimator"]] += row["boot_low"] <= truth <= row["boot_high"]
    for name, c in covered.items():
        assert 0.80 <= c / n_logs <= 0.97, (name, c / n_logs)


def test_poisson_and_multinomial_agree_on_large_log() -> None:
    """On 20,000 rounds the Poisson and multinomial bootstraps' se agree with each other and with the
    delta-method se within 15 %."""
    _, log = synthetic_world(np.random.default_rng(3))
    data = log(20000, model_bias=0.1)
    for est in (IPS(), SNIPS(), DR()):
        se = est.estimate(*data).se
        pois = bootstrap_ci(est, *data, n_boot=300, seed=1)
        mult = bootstrap_ci(est, *data, n_boot=300, seed=1, method="multinomial")
        assert pois.se == pytest.approx(se, rel=0.15) and mult.se == pytest.approx(se, rel=0.15), est.name
