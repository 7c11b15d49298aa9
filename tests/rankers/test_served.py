"""rankers: served-page metrics, coverage, top-k pages and the paired bootstrap, each against an
independent reference (slow per-user loops, hand-computed pages, closed forms, a per-resample loop)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from rankers import coverage, page_metrics, paired_bootstrap, top_k_pages

LOG2 = math.log2


# ---------------------------------------------------------------- references


def slow_page_metrics(pages, pos_sets, is_tail=None):
    """Per-user loop: the definitions of the docstring, one slot at a time."""
    k = len(pages[0])
    out = {"hit": [], "recall": [], "ndcg": [], "long_tail_share": []}
    for page, pos in zip(pages, pos_sets, strict=True):
        seen, dcg, n_rel, n_tail = set(), 0.0, 0, 0
        for r, item in enumerate(page):
            item = int(item)
            if item < 0 or item in seen:
                continue
            seen.add(item)
            if is_tail is not None and is_tail[item]:
                n_tail += 1
            if item in pos:
                n_rel += 1
                dcg += 1.0 / LOG2(r + 2)
        out["long_tail_share"].append(n_tail / len(seen) if seen else math.nan)
        if not pos:
            for name in ("hit", "recall", "ndcg"):
                out[name].append(math.nan)
            continue
        m = min(len(pos), k)
        out["hit"].append(float(n_rel > 0))
        out["recall"].append(n_rel / m)
        out["ndcg"].append(dcg / sum(1.0 / LOG2(r + 2) for r in range(m)))
    return {name: np.array(v) for name, v in out.items()}


def random_instance(rng, n_users=40, n_items=25, k=8):
    """Pages with empty slots and repeated items, positives with empty rows."""
    pages = rng.integers(-1, n_items, size=(n_users, k))
    dense = rng.random((n_users, n_items)) < rng.uniform(0.0, 0.3, size=(n_users, 1))
    dense[rng.random(n_users) < 0.2] = False  # some users without positives
    return pages, dense


def pos_sets_of(dense):
    return [set(np.flatnonzero(row).tolist()) for row in dense]


def assert_same_metrics(got, want, names=("hit", "recall", "ndcg")):
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-12, err_msg=name)


# ---------------------------------------------------------------- page_metrics: hand-computed pages


def test_ndcg_two_of_two_positives_at_ranks_1_and_3():
    pages = np.array([[2, 0, 4]])
    positives = sp.csr_matrix(np.array([[0, 0, 1, 0, 1]]))
    m = page_metrics(pages, positives, n_items=5)
    assert m["ndcg"][0] == pytest.approx((1 / LOG2(2) + 1 / LOG2(4)) / (1 / LOG2(2) + 1 / LOG2(3)))
    assert m["recall"][0] == 1.0 and m["hit"][0] == 1.0
    assert m["n_positives"].tolist() == [2] and m["has_positives"].tolist() == [True]


def test_more_positives_than_slots_normalise_by_page_size():
    # |P| = 4 > k = 3: recall = 1 / 3, IDCG = three positives at the top
    pages = np.array([[0, 1, 2]])
    positives = sp.csr_matrix(([1, 1, 1, 1], ([0, 0, 0, 0], [1, 5, 6, 7])), shape=(1, 8))
    m = page_metrics(pages, positives, n_items=8)
    assert m["recall"][0] == pytest.approx(1 / 3)
    assert m["ndcg"][0] == pytest.approx((1 / LOG2(3)) / (1 + 1 / LOG2(3) + 1 / LOG2(4)))
    assert m["hit"][0] == 1.0


def test_empty_slots_keep_their_rank_and_repeats_count_once():
    pages = np.array([[-1, 3, 3], [3, 3, -1], [0, 1, 2]])
    dense = np.zeros((3, 5), dtype=bool)
    dense[0, 3] = dense[1, 3] = True
    dense[2, [3, 4]] = True
    m = page_metrics(pages, dense, n_items=5)
    assert m["ndcg"].tolist() == pytest.approx([1 / LOG2(3), 1.0, 0.0])
    assert m["recall"].tolist() == pytest.approx([1.0, 1.0, 0.0])
    assert m["hit"].tolist() == [1.0, 1.0, 0.0]


def test_users_without_positives_are_nan_and_flagged():
    pages = np.array([[0, 1], [1, 2]])
    positives = sp.csr_matrix(np.array([[0, 0, 0], [0, 1, 0]]))
    m = page_metrics(pages, positives, n_items=3)
    assert m["has_positives"].tolist() == [False, True]
    for name in ("hit", "recall", "ndcg"):
        assert math.isnan(m[name][0]) and m[name][1] == 1.0
    assert m["n_positives"].tolist() == [0, 1]


def test_long_tail_share_counts_distinct_shown_items():
    is_tail = np.array([False, True, True, False])
    pages = np.array([[1, 1, 0, -1], [-1, -1, -1, -1], [2, 3, 1, 0]])
    positives = np.zeros((3, 4), dtype=bool)
    m = page_metrics(pages, positives, n_items=4, is_tail=is_tail)
    np.testing.assert_allclose(m["long_tail_share"], [1 / 2, np.nan, 2 / 4])
    assert "long_tail_share" not in page_metrics(pages, positives, n_items=4)


def test_positives_representations_agree():
    dense = np.array([[0, 2, 0, 1], [0, 0, 0, 0], [3, 0, 0, 0]])
    pages = np.array([[1, 0], [2, 3], [0, 3]])
    want = page_metrics(pages, dense != 0, n_items=4)
    coo_with_dupes_and_zero = sp.coo_matrix(
        ([1, 1, 1, 1, 0], ([0, 0, 0, 2, 1], [1, 1, 3, 0, 2])), shape=(3, 4)
    )  # a duplicate (0, 1) and an explicit zero at (1, 2), which is not a positive
    for positives in (
        dense,
        sp.csr_matrix(dense),
        sp.csr_array(dense),
        sp.csc_matrix(dense),
        coo_with_dupes_and_zero,
    ):
        got = page_metrics(pages, positives, n_items=4)
        assert_same_metrics(got, want)
        assert got["n_positives"].tolist() == [2, 0, 1]


# ---------------------------------------------------------------- page_metrics: against the slow loop


def test_page_metrics_matches_slow_loop(seed):
    rng = np.random.default_rng(seed)
    pages, dense = random_instance(rng)
    is_tail = rng.random(dense.shape[1]) < 0.5
    got = page_metrics(pages, sp.csr_matrix(dense), n_items=dense.shape[1], is_tail=is_tail)
    want = slow_page_metrics(pages, pos_sets_of(dense), is_tail)
    assert_same_metrics(got, want, names=("hit", "recall", "ndcg", "long_tail_share"))
    assert np.array_equal(got["has_positives"], dense.any(axis=1))


def slow_weighted_metrics(pages, pos_sets, w):
    """Per-user loop of the weighted definitions: each positive counts w[item]; the ideal page holds
    the heaviest min(|P|, k) positives, heaviest first."""
    k = len(pages[0])
    recall, ndcg = [], []
    for page, pos in zip(pages, pos_sets, strict=True):
        if not pos:
            recall.append(math.nan)
            ndcg.append(math.nan)
            continue
        seen, mass, dcg = set(), 0.0, 0.0
        for r, item in enumerate(page):
            item = int(item)
            if item < 0 or item in seen:
                continue
            seen.add(item)
            if item in pos:
                mass += w[item]
                dcg += w[item] / LOG2(r + 2)
        best = sorted((w[i] for i in pos), reverse=True)[:k]
        recall.append(mass / sum(best))
        ndcg.append(dcg / sum(b / LOG2(r + 2) for r, b in enumerate(best)))
    return np.array(recall), np.array(ndcg)


def test_weighted_page_metrics_match_the_slow_loop_and_weights_of_one_change_nothing(seed):
    rng = np.random.default_rng(seed)
    pages, dense = random_instance(rng)
    n_items = dense.shape[1]
    w = rng.lognormal(0.0, 1.5, size=n_items)
    got = page_metrics(pages, sp.csr_matrix(dense), n_items=n_items, item_weight=w)
    recall, ndcg = slow_weighted_metrics(pages, pos_sets_of(dense), w)
    np.testing.assert_allclose(got["recall"], recall, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got["ndcg"], ndcg, rtol=1e-12, equal_nan=True)
    plain = page_metrics(pages, sp.csr_matrix(dense), n_items=n_items)
    ones = page_metrics(pages, sp.csr_matrix(dense), n_items=n_items, item_weight=np.ones(n_items))
    for name in ("hit", "recall", "ndcg"):
        np.testing.assert_allclose(ones[name], plain[name], rtol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(got["hit"], plain["hit"])  # HR does not depend on the weights
    with pytest.raises(ValueError, match=r"item_weight must be finite and > 0 on every positive item"):
        page_metrics(pages, sp.csr_matrix(dense), n_items=n_items, item_weight=np.zeros(n_items))
    with pytest.raises(ValueError, match=rf"item_weight must have shape \({n_items},\); got \(3,\)"):
        page_metrics(pages, sp.csr_matrix(dense), n_items=n_items, item_weight=np.ones(3))


@st.composite
def instances(draw):
    n_users = draw(st.integers(1, 4))
    n_items = draw(st.integers(1, 7))
    k = draw(st.integers(1, 6))
    pages = np.array(
        draw(
            st.lists(
                st.lists(st.integers(-1, n_items - 1), min_size=k, max_size=k),
                min_size=n_users,
                max_size=n_users,
            )
        )
    )
    dense = np.array(
        draw(
            st.lists(
                st.lists(st.booleans(), min_size=n_items, max_size=n_items),
                min_size=n_users,
                max_size=n_users,
            )
        )
    )
    return pages, dense


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(instances())
def test_page_metrics_property_matches_slow_loop_and_is_bounded(instance):
    pages, dense = instance
    got = page_metrics(pages, sp.csr_array(dense), n_items=dense.shape[1])
    assert_same_metrics(got, slow_page_metrics(pages, pos_sets_of(dense)))
    has = got["has_positives"]
    for name in ("hit", "recall", "ndcg"):
        v = got[name][has]
        assert ((v >= 0) & (v <= 1 + 1e-12)).all()
    assert np.array_equal(got["hit"][has] > 0, got["recall"][has] > 0)
    assert np.array_equal(got["hit"][has] > 0, got["ndcg"][has] > 0)


def test_page_metrics_does_not_mutate_inputs(seed):
    rng = np.random.default_rng(seed)
    pages, dense = random_instance(rng)
    positives = sp.coo_matrix(dense.astype(np.float64))
    is_tail = rng.random(dense.shape[1]) < 0.3
    before = (pages.copy(), positives.copy(), is_tail.copy())
    page_metrics(pages, positives, n_items=dense.shape[1], is_tail=is_tail)
    assert np.array_equal(pages, before[0]) and np.array_equal(is_tail, before[2])
    assert positives.format == "coo" and (positives != before[1]).nnz == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"pages": np.array([0, 1])},
            r"pages must be a 2-D array \(n_users, page_size\) with page_size >= 1",
        ),
        ({"pages": np.zeros((2, 0), dtype=int)}, r"page_size >= 1; got shape \(2, 0\)"),
        (
            {"pages": np.array([[0.0, 1.0], [1.0, 2.0]])},
            r"pages must hold int item indices; got dtype float64",
        ),
        (
            {"pages": np.array([[0, 4], [1, 2]])},
            r"pages must be in \[-1, 4\) \(-1 = empty slot\); got 0\.\.4",
        ),
        ({"pages": np.array([[0, -2], [1, 2]])}, r"pages must be in \[-1, 4\)"),
        (
            {"positives": np.zeros((3, 4))},
            r"positives must have shape \(n_users, n_items\) = \(2, 4\); got \(3, 4\)",
        ),
        ({"positives": np.zeros(4)}, r"positives must be a sparse matrix or a 2-D array of shape \(2, 4\)"),
        ({"n_items": 0}, r"n_items must be an int >= 1; got 0"),
        ({"n_items": 4.0}, r"n_items must be an int >= 1; got 4\.0"),
        (
            {"is_tail": np.zeros(3, dtype=bool)},
            r"is_tail must be a bool array of shape \(4,\); got shape \(3,\)",
        ),
        (
            {"is_tail": np.zeros(4)},
            r"is_tail must be a bool array of shape \(4,\); got shape \(4,\) dtype float64",
        ),
    ],
)
def test_page_metrics_errors_name_the_parameter(kwargs, message):
    args = {"pages": np.array([[0, 1], [2, 3]]), "positives": np.zeros((2, 4), dtype=bool), "n_items": 4}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        page_metrics(args.pop("pages"), args.pop("positives"), **args)


# ---------------------------------------------------------------- coverage


def test_coverage_hand_case_and_set_reference(seed):
    assert coverage(np.array([[0, 1], [1, -1]]), n_items=4) == 0.5
    assert coverage(np.full((3, 2), -1), n_items=5) == 0.0
    rng = np.random.default_rng(seed)
    pages, _ = random_instance(rng, n_items=60)
    shown = {int(i) for row in pages for i in row if i >= 0}
    assert coverage(pages, n_items=60) == pytest.approx(len(shown) / 60)
    with pytest.raises(ValueError, match=r"pages must be in \[-1, 3\)"):
        coverage(np.array([[0, 3]]), n_items=3)
    with pytest.raises(ValueError, match=r"n_items must be an int >= 1; got -1"):
        coverage(np.array([[0]]), n_items=-1)


# ---------------------------------------------------------------- top_k_pages


def slow_top_k(scores, k, exclude=None):
    pages = []
    for u, row in enumerate(scores):
        items = [
            j for j in range(len(row)) if row[j] > -math.inf and not (exclude is not None and exclude[u, j])
        ]
        items.sort(key=lambda j: (-row[j], j))  # ties: lower item index first
        pages.append((items + [-1] * k)[:k])
    return np.array(pages, dtype=np.int64)


def test_top_k_pages_matches_sorting_loop_with_ties_and_exclusions(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(30, 12)).astype(np.float64)  # many ties
    scores[rng.random(scores.shape) < 0.15] = -np.inf
    scores[0] = 1.0  # a whole row tied
    exclude = rng.random(scores.shape) < 0.2
    before = scores.copy()
    for k in (1, 3, 12, 15):
        np.testing.assert_array_equal(top_k_pages(scores, k), slow_top_k(scores, k))
        np.testing.assert_array_equal(
            top_k_pages(scores, k, exclude=sp.csr_matrix(exclude)), slow_top_k(scores, k, exclude)
        )
    np.testing.assert_array_equal(scores, before)


def test_top_k_pages_hand_case_and_errors():
    np.testing.assert_array_equal(top_k_pages(np.array([[0.1, 0.5, 0.5, -np.inf]]), k=4), [[1, 2, 0, -1]])
    np.testing.assert_array_equal(
        top_k_pages(np.array([[3.0, 1.0, 2.0]]), k=2, exclude=np.array([[1, 0, 0]])), [[2, 1]]
    )
    with pytest.raises(ValueError, match=r"k must be an int >= 1; got 0"):
        top_k_pages(np.zeros((1, 3)), k=0)
    with pytest.raises(ValueError, match=r"scores must not contain NaN"):
        top_k_pages(np.array([[0.0, np.nan]]), k=1)
    with pytest.raises(
        ValueError, match=r"scores must be a 2-D array \(n_users, n_items\); got shape \(3,\)"
    ):
        top_k_pages(np.zeros(3), k=1)
    with pytest.raises(
        ValueError, match=r"exclude must have shape \(n_users, n_items\) = \(1, 3\); got \(1, 2\)"
    ):
        top_k_pages(np.zeros((1, 3)), k=1, exclude=np.zeros((1, 2)))


# ---------------------------------------------------------------- paired_bootstrap


def slow_bootstrap(a, b, n_boot, seed, alpha):
    """One resample at a time from the same generator stream."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    means = []
    for _ in range(n_boot):
        idx = rng.integers(0, d.size, size=d.size)
        means.append(sum(d[idx].tolist()) / d.size)
    means = np.array(means)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return d.mean(), lo, hi, float((means <= 0).mean())


def test_paired_bootstrap_matches_per_resample_loop(seed):
    rng = np.random.default_rng(seed)
    a = rng.random(120)
    b = np.clip(a + rng.normal(-0.05, 0.2, 120), 0, 1)
    r = paired_bootstrap(a, b, n_boot=300, seed=seed, alpha=0.1)
    mean, lo, hi, p = slow_bootstrap(a, b, 300, seed, 0.1)
    assert r["mean_diff"] == pytest.approx(mean, abs=1e-12)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert r["p_value"] == pytest.approx(p)
    assert r["n_users"] == 120 and r["n_boot"] == 300 and r["alpha"] == 0.1


def test_paired_bootstrap_is_degenerate_when_a_equals_b(seed):
    a = np.random.default_rng(seed).random(50)
    r = paired_bootstrap(a, a.copy(), n_boot=200, seed=seed)
    assert r["mean_diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["se"] == 0.0 and r["p_value"] == 1.0


def test_paired_bootstrap_ci_covers_the_true_difference(seed):
    # d_u = a_u - b_u ~ N(0.1, 0.5^2 * 2) around a shared per-user level; the true E[a - b] is 0.1
    rng = np.random.default_rng(seed)
    true_diff, n, n_rep = 0.1, 200, 200
    covered, excludes_zero = 0, 0
    for rep in range(n_rep):
        level = rng.normal(0, 1, n)
        a = level + rng.normal(true_diff, 0.5, n)
        b = level + rng.normal(0.0, 0.5, n)
        r = paired_bootstrap(a, b, n_boot=300, seed=rep)
        covered += r["ci_low"] <= true_diff <= r["ci_high"]
        excludes_zero += r["ci_low"] > 0
    # nominal 95 % (about 0.94 for the percentile interval at n = 200; sd of the share over 200
    # replications ~ 0.017): 0.88 is 3.5 sd below
    assert 0.88 <= covered / n_rep <= 1.0
    # power: the half-width is about 1.96 * 0.71 / sqrt(200) ~ 0.098, so about half exclude 0
    assert excludes_zero / n_rep >= 0.3


def test_paired_bootstrap_width_matches_the_normal_interval(seed):
    rng = np.random.default_rng(seed)
    d = rng.normal(0.02, 0.3, 4000)
    b = rng.random(4000)
    r = paired_bootstrap(b + d, b, n_boot=1000, seed=seed)
    se = d.std(ddof=1) / math.sqrt(d.size)
    assert r["se"] == pytest.approx(se, rel=0.12)
    assert r["ci_high"] - r["ci_low"] == pytest.approx(2 * 1.959964 * se, rel=0.15)
    assert r["ci_low"] <= r["mean_diff"] <= r["ci_high"]


def test_paired_bootstrap_p_value_and_determinism(seed):
    rng = np.random.default_rng(seed)
    a = rng.random(300)
    better = paired_bootstrap(a + 0.5, a, n_boot=200, seed=seed)
    worse = paired_bootstrap(a - 0.5, a, n_boot=200, seed=seed)
    assert better["p_value"] == 0.0 and worse["p_value"] == 1.0
    assert better["mean_diff"] == pytest.approx(0.5)
    b = rng.random(300)
    before = (a.copy(), b.copy())
    r1 = paired_bootstrap(a, b, n_boot=100, seed=seed)
    assert r1 == paired_bootstrap(a, b, n_boot=100, seed=seed)
    assert r1 == paired_bootstrap(a, b, n_boot=100, seed=np.random.default_rng(seed))
    assert r1 != paired_bootstrap(a, b, n_boot=100, seed=seed + 1)
    assert np.array_equal(a, before[0]) and np.array_equal(b, before[1])


def test_paired_bootstrap_runs_many_users_in_chunks():
    # 1e4 users x 1000 resamples: drawn in chunks, same stream as one resample at a time
    rng = np.random.default_rng(0)
    a, b = rng.random(10_000), rng.random(10_000)
    r = paired_bootstrap(a, b, n_boot=1000, seed=3)
    assert r["ci_low"] < r["mean_diff"] < r["ci_high"]
    assert r["se"] == pytest.approx((a - b).std(ddof=1) / 100, rel=0.15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"a": np.zeros((2, 2)), "b": np.zeros((2, 2))},
            r"a must be a non-empty 1-D array \(n_users,\); got shape \(2, 2\)",
        ),
        ({"a": np.zeros(0), "b": np.zeros(0)}, r"a must be a non-empty 1-D array"),
        ({"b": np.zeros(4)}, r"b must have the shape of a \(3,\); got \(4,\)"),
        (
            {"a": np.array([0.0, np.nan, 1.0])},
            r"a must be finite; got 1 NaN/inf values \(keep users with positives only",
        ),
        ({"b": np.array([np.inf, np.nan, 1.0])}, r"b must be finite; got 2 NaN/inf values"),
        ({"n_boot": 0}, r"n_boot must be an int >= 1; got 0"),
        ({"n_boot": 10.0}, r"n_boot must be an int >= 1; got 10\.0"),
        ({"alpha": 0.0}, r"alpha must be in \(0, 1\); got 0\.0"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\); got 1\.5"),
    ],
)
def test_paired_bootstrap_errors_name_the_parameter(kwargs, message):
    args = {"a": np.array([0.0, 1.0, 0.5]), "b": np.array([1.0, 0.0, 0.5])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(args.pop("a"), args.pop("b"), **args)


def test_import_rankers_loads_neither_torch_nor_scipy_sparse():
    # serving imports rankers for the popularity scorer: the evaluation core must not slow that down
    code = "import sys, rankers; print(sorted(m for m in ('torch', 'scipy.sparse') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
