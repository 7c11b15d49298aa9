"""rankers: the simple served-page baselines (RecentPopularity, CategoryPopularity, ItemKNN) against
independent references: closed-form decay sums, per-event loops and a brute-force item-kNN."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from rankers import (
    CategoryPopularity,
    ItemKNN,
    RecentPopularity,
    page_metrics,
    paired_bootstrap,
    top_k_pages,
)

# ---------------------------------------------------------------- data and references


def random_log(rng, n_users=9, n_items=7, n=40):
    """Interactions with repeats, zero weights and users without any interaction (the last two)."""
    user = rng.integers(0, n_users - 2, size=n)
    item = rng.integers(0, n_items, size=n)
    ts = rng.uniform(0.0, 10 * 86400.0, size=n)
    weight = rng.choice([0.0, 0.5, 1.0, 2.0], size=n, p=[0.15, 0.25, 0.4, 0.2])
    weight[0] = 1.0  # at least one positive weight
    return user, item, ts, weight


def slow_recent_popularity(item, ts, weight, n_items, half_life_s):
    t_end = max(ts.tolist())
    pop = [0.0] * n_items
    for i, t, w in zip(item.tolist(), ts.tolist(), weight.tolist(), strict=True):
        pop[i] += w * 0.5 ** ((t_end - t) / half_life_s)
    return np.array(pop)


def slow_category_popularity(user, item, ts, weight, n_users, item_category, n_cat, alpha, half_life_s):
    """Scores (n_users + 1, n_items); the last row is the unknown user."""
    t_end = max(ts.tolist())
    n_items = len(item_category)
    pop = [0.0] * n_items
    n_uc = [[0.0] * n_cat for _ in range(n_users)]
    for u, i, t, w in zip(user.tolist(), item.tolist(), ts.tolist(), weight.tolist(), strict=True):
        wd = w if half_life_s is None else w * 0.5 ** ((t_end - t) / half_life_s)
        pop[i] += wd
        n_uc[u][int(item_category[i])] += wd
    tot = [sum(pop[j] for j in range(n_items) if item_category[j] == c) for c in range(n_cat)]
    g = [t / sum(tot) for t in tot]
    p = [pop[j] / tot[item_category[j]] if tot[item_category[j]] > 0 else 0.0 for j in range(n_items)]
    rows = []
    for u in range(n_users + 1):
        if u < n_users:
            n_u = sum(n_uc[u])
            pi = [(n_uc[u][c] + alpha * g[c]) / (n_u + alpha) for c in range(n_cat)]
        else:
            pi = g
        rows.append([pi[item_category[j]] * p[j] for j in range(n_items)])
    return np.array(rows)


def slow_item_knn(user, item, weight, n_users, n_items, n_neighbors, shrink):
    """Scores (n_users + 1, n_items) by the definition, one pair at a time; the last row = unknown user."""
    hist = [set() for _ in range(n_users)]
    for u, i, w in zip(user.tolist(), item.tolist(), weight.tolist(), strict=True):
        if w > 0:
            hist[u].add(i)
    co = [[sum(1 for h in hist if i in h and j in h) for j in range(n_items)] for i in range(n_items)]
    sim = [
        [
            co[i][j] / (math.sqrt(co[i][i]) * math.sqrt(co[j][j]) + shrink)
            if i != j and co[i][j] > 0
            else 0.0
            for j in range(n_items)
        ]
        for i in range(n_items)
    ]
    kept = [[0.0] * n_items for _ in range(n_items)]
    for j in range(n_items):
        near = sorted((i for i in range(n_items) if sim[i][j] > 0), key=lambda i: (-sim[i][j], i))
        for i in near[:n_neighbors]:
            kept[i][j] = sim[i][j]
    pop = [float(sum(1 for h in hist if j in h)) for j in range(n_items)]
    rows = []
    for u in range(n_users + 1):
        h = hist[u] if u < n_users else set()
        row = [sum(kept[i][j] for i in h) for j in range(n_items)]
        rows.append(row if any(v > 0 for v in row) else pop)
    return np.array(rows)


def all_users(n_users):
    return np.r_[np.arange(n_users), -1]


# ---------------------------------------------------------------- RecentPopularity


def test_recent_popularity_equals_closed_form_decay_sum(seed):
    rng = np.random.default_rng(seed)
    user, item, ts, weight = random_log(rng, n=60)
    h = float(rng.uniform(3600.0, 5 * 86400.0))
    m = RecentPopularity(half_life_s=h).fit(user, item, ts, weight, n_users=9, n_items=7)
    want = slow_recent_popularity(item, ts, weight, 7, h)
    np.testing.assert_allclose(m.popularity_, want, rtol=1e-12)
    scores = m.score_all(all_users(9))
    assert scores.shape == (10, 7) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, np.broadcast_to(want, (10, 7)), rtol=1e-12)
    assert m.t_end_ == ts.max()


def test_recent_popularity_hand_case_one_half_life_counts_half():
    # item 0: now and one half-life ago (1 + 1/2); item 1: two half-lives ago with weight 2 (2/4)
    m = RecentPopularity(half_life_s=100.0).fit(
        np.array([0, 1, 1]),
        np.array([0, 0, 1]),
        np.array([300.0, 200.0, 100.0]),
        np.array([1.0, 1.0, 2.0]),
        n_users=2,
        n_items=3,
    )
    np.testing.assert_allclose(m.popularity_, [1.5, 0.5, 0.0])
    np.testing.assert_array_equal(top_k_pages(m.score_all(np.array([0])), k=3), [[0, 1, 2]])


# ---------------------------------------------------------------- CategoryPopularity


@pytest.mark.parametrize("half_life_s", [None, 2 * 86400.0])
def test_category_popularity_matches_per_event_loop(seed, half_life_s):
    rng = np.random.default_rng(seed)
    user, item, ts, weight = random_log(rng, n=50)
    item_category = rng.integers(0, 3, size=7)
    item_category[:3] = [0, 1, 2]
    alpha = float(rng.uniform(0.1, 5.0))
    m = CategoryPopularity(item_category, alpha=alpha, half_life_s=half_life_s).fit(
        user, item, ts, weight, n_users=9, n_items=7
    )
    want = slow_category_popularity(user, item, ts, weight, 9, item_category, 3, alpha, half_life_s)
    np.testing.assert_allclose(m.score_all(all_users(9)), want, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(m.user_category_share_.sum(axis=1), 1.0)


def test_category_popularity_without_history_is_plain_popularity(seed):
    rng = np.random.default_rng(seed)
    user, item, ts, weight = random_log(rng, n=50)
    item_category = rng.integers(0, 3, size=7)
    m = CategoryPopularity(item_category, n_categories=3).fit(user, item, ts, weight, n_users=9, n_items=7)
    pop = np.bincount(item, weights=weight, minlength=7)
    s = m.score_all(np.array([-1, 7, 8]))  # unknown, and two training users without interactions
    np.testing.assert_allclose(s, np.broadcast_to(pop / pop.sum(), (3, 7)), rtol=1e-12, atol=1e-15)


def test_category_popularity_puts_the_users_categories_on_top(seed):
    rng = np.random.default_rng(seed)
    n_users, n_items, n_cat = 30, 40, 5
    item_category = np.arange(n_items) % n_cat
    own = rng.integers(0, n_cat, size=(n_users, 2))  # each user's two categories
    user = np.repeat(np.arange(n_users), 12)
    cat = own[user, rng.integers(0, 2, size=user.size)]
    item = cat + n_cat * rng.integers(0, n_items // n_cat, size=user.size)
    ts = rng.uniform(0, 1e5, size=user.size)
    weight = rng.uniform(0.5, 2.0, size=user.size)
    m = CategoryPopularity(item_category, alpha=1e-6).fit(
        user, item, ts, weight, n_users=n_users, n_items=n_items
    )
    pages = top_k_pages(m.score_all(np.arange(n_users)), k=n_items)
    popular = np.bincount(item, minlength=n_items) > 0
    used = np.zeros((n_users, n_cat), dtype=bool)  # the categories each user actually used (1 or 2)
    used[user, item_category[item]] = True
    in_own = used[:, item_category]
    n_top = (in_own & popular[None, :]).sum(axis=1)  # the user's categories' items with popularity > 0
    for u in range(n_users):  # a handful of users: a readable check of the page, not a hot path
        top = pages[u, : n_top[u]]
        assert in_own[u, top].all(), (u, top, np.flatnonzero(used[u]))
    # and the global shares alone would not do that
    g = CategoryPopularity(item_category, alpha=1e6).fit(
        user, item, ts, weight, n_users=n_users, n_items=n_items
    )
    np.testing.assert_allclose(
        g.user_category_share_, np.broadcast_to(g.category_share_, (n_users, n_cat)), atol=1e-4
    )


# ---------------------------------------------------------------- ItemKNN


@pytest.mark.parametrize(("n_neighbors", "shrink"), [(1, 0.0), (2, 3.0), (100, 0.5)])
def test_item_knn_equals_brute_force(seed, n_neighbors, shrink):
    rng = np.random.default_rng(seed)
    user, item, ts, weight = random_log(rng, n_users=9, n_items=7, n=30)
    m = ItemKNN(n_neighbors=n_neighbors, shrink=shrink).fit(user, item, ts, weight, n_users=9, n_items=7)
    want = slow_item_knn(user, item, weight, 9, 7, n_neighbors, shrink)
    np.testing.assert_allclose(m.score_all(all_users(9)), want, rtol=1e-12, atol=1e-15)
    assert (np.diff(m.similarity_.tocsc().indptr) <= n_neighbors).all()
    assert m.similarity_.diagonal().sum() == 0.0


@pytest.mark.parametrize("block_entries", [1, 6, 40, 10**9])
def test_knn_similarity_built_in_blocks_equals_a_per_item_brute_force(seed, block_entries):
    """The co-occurrences built a block of scored items at a time (one item per block, a few, all at
    once) against each item's neighbours ranked one by one: same entries, same values, bit for bit."""
    import scipy.sparse as sp

    from rankers._simple import knn_similarity

    rng = np.random.default_rng(seed)
    x = (rng.random((25, 18)) < 0.3).astype(np.float64)
    x[:, 4] = 0.0  # an item nobody has
    k, shrink = 3, 2.0
    got = knn_similarity(sp.csr_array(x), shrink, k, block_entries=block_entries)
    c, norm = x.T @ x, np.sqrt(x.sum(axis=0))
    want = np.zeros((18, 18))
    for j in range(18):
        cands = sorted((-(c[i, j] / (norm[i] * norm[j] + shrink)), i) for i in range(18) if i != j and c[i, j] > 0)
        for neg, i in cands[:k]:
            want[i, j] = -neg
    assert got.shape == (18, 18) and got.nnz == np.count_nonzero(want)
    np.testing.assert_array_equal(got.toarray(), want)
    with pytest.raises(ValueError, match="block_entries must be >= 1; got 0"):
        knn_similarity(sp.csr_array(x), shrink, k, block_entries=0)


def test_item_knn_hand_case():
    # u0 saw {0, 1}, u1 saw {0, 1, 2}: C01 = 2, C00 = C11 = 2, C22 = 1, C02 = C12 = 1
    user, item = np.array([0, 0, 1, 1, 1, 1]), np.array([0, 1, 0, 1, 2, 2])
    m = ItemKNN(n_neighbors=5, shrink=0.0).fit(user, item, np.zeros(6), n_users=3, n_items=4)
    s = m.score_all(np.array([0, 2]))
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(s[0], [1.0, 1.0, 2 * r, 0.0])  # item 0 <- sim(1, 0) = 2 / (sqrt2 sqrt2)
    np.testing.assert_allclose(s[1], [2.0, 2.0, 1.0, 0.0])  # no history: users per item
    shrunk = ItemKNN(n_neighbors=1, shrink=1.0).fit(user, item, np.zeros(6), n_users=3, n_items=4)
    # item 2's single neighbour is item 0 (sim 1 / (sqrt2 + 1) ties with item 1's: lower index wins)
    np.testing.assert_allclose(
        shrunk.score_all(np.array([0]))[0], [2 / 3, 2 / 3, 1 / (math.sqrt(2) + 1), 0.0]
    )


def test_item_knn_zero_weight_interactions_are_not_history():
    user, item = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 2])
    m = ItemKNN(shrink=0.0).fit(user, item, np.zeros(4), np.array([1.0, 0.0, 1.0, 1.0]), n_users=2, n_items=3)
    assert m.history_.toarray().tolist() == [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]]
    np.testing.assert_allclose(m.popularity_, [2.0, 0.0, 1.0])


# ---------------------------------------------------------------- shared contract


def make_scorers(item_category):
    return [
        RecentPopularity(half_life_s=86400.0),
        CategoryPopularity(item_category, alpha=2.0, half_life_s=3 * 86400.0),
        ItemKNN(n_neighbors=3, shrink=1.0),
    ]


def test_scorers_do_not_mutate_inputs_and_round_trip(seed):
    rng = np.random.default_rng(seed)
    user, item, ts, weight = random_log(rng, n=50)
    item_category = rng.integers(0, 3, size=7)
    users = np.array([3, -1, 8, 3, 0])
    frozen = [x.copy() for x in (user, item, ts, weight, item_category, users)]
    for m in make_scorers(item_category):
        m.fit(user, item, ts, weight, n_users=9, n_items=7)
        s = m.score_all(users)
        assert s.shape == (5, 7) and s.dtype == np.float64 and np.isfinite(s).all()
        np.testing.assert_array_equal(s[0], s[3])  # a user's row does not depend on the batch
        np.testing.assert_array_equal(s, m.score_all(users))
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(m)).score_all(users), s)
        s[:] = -1.0  # the caller owns the result: writing into it changes nothing in the scorer
        assert (m.score_all(users) >= 0).all()
        for before, after in zip(frozen, (user, item, ts, weight, item_category, users), strict=True):
            np.testing.assert_array_equal(before, after)
    item_category[:] = 0  # the scorer kept its own copy of the catalog
    m = make_scorers(frozen[4])[1]
    assert not np.shares_memory(m.item_category, frozen[4])


def test_simple_scorers_beat_popularity_on_planted_groups(seed):
    # two user groups that only use their own half of the catalog: the personalised baselines stay in
    # the group, global popularity does not
    rng = np.random.default_rng(seed)
    n_users, n_items, k = 200, 40, 5
    group = np.arange(n_users) % 2
    item_group = (np.arange(n_items) >= n_items // 2).astype(np.int64)
    per_user = rng.permuted(np.tile(np.arange(n_items // 2), (n_users, 1)), axis=1)[:, :8]
    items = per_user + (n_items // 2) * group[:, None]
    train, future = items[:, :5], items[:, 5:]
    user = np.repeat(np.arange(n_users), 5)
    item, ts = train.ravel(), rng.uniform(0, 1e5, size=user.size)
    positives = np.zeros((n_users, n_items), dtype=bool)
    np.put_along_axis(positives, future, True, axis=1)
    seen = np.zeros((n_users, n_items), dtype=bool)
    np.put_along_axis(seen, train, True, axis=1)
    recall = {}
    for name, m in (
        ("pop", RecentPopularity(half_life_s=1e5)),
        ("cat", CategoryPopularity(item_group)),
        ("knn", ItemKNN(n_neighbors=20, shrink=1.0)),
    ):
        m.fit(user, item, ts, n_users=n_users, n_items=n_items)
        pages = top_k_pages(m.score_all(np.arange(n_users)), k, exclude=seen)
        recall[name] = page_metrics(pages, positives, n_items=n_items)["recall"]
    for name in ("cat", "knn"):
        r = paired_bootstrap(recall[name], recall["pop"], n_boot=500, seed=seed)
        assert r["ci_low"] > 0, (name, r)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RecentPopularity(half_life_s=0.0), r"half_life_s must be a finite number > 0; got 0\.0"),
        (lambda: RecentPopularity(half_life_s=None), r"half_life_s must be a finite number > 0; got None"),
        (
            lambda: CategoryPopularity(np.array([0, 1]), half_life_s=-1.0),
            r"half_life_s must be a finite number > 0; got -1\.0",
        ),
        (
            lambda: CategoryPopularity(np.array([0, 1]), alpha=0.0),
            r"alpha must be a finite number > 0; got 0\.0",
        ),
        (
            lambda: CategoryPopularity(np.array([0.0, 1.0])),
            r"item_category must be a non-empty 1-D int array; got shape \(2,\) dtype float64",
        ),
        (
            lambda: CategoryPopularity(np.array([0, 3]), n_categories=2),
            r"item_category must be in \[0, 2\); got 0\.\.3",
        ),
        (
            lambda: CategoryPopularity(np.array([0, 1]), n_categories=0),
            r"n_categories must be an int >= 1; got 0",
        ),
        (lambda: ItemKNN(n_neighbors=0), r"n_neighbors must be an int >= 1; got 0"),
        (lambda: ItemKNN(n_neighbors=2.5), r"n_neighbors must be an int >= 1; got 2\.5"),
        (lambda: ItemKNN(shrink=-1.0), r"shrink must be a finite number >= 0; got -1\.0"),
    ],
)
def test_constructor_errors_name_the_parameter(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"user": np.array([], dtype=np.int64), "item": np.array([], dtype=np.int64), "ts": np.array([])},
            r"user must hold at least one interaction; got 0",
        ),
        (
            {"user": np.array([0.0, 1.0, 1.0])},
            r"user must be a 1-D int array; got shape \(3,\) dtype float64",
        ),
        ({"item": np.array([0, 1])}, r"item must have the shape of user \(3,\); got \(2,\)"),
        ({"ts": np.array([0.0, 1.0])}, r"ts must have the shape of user \(3,\); got \(2,\)"),
        ({"weight": np.ones(4)}, r"weight must have the shape of user \(3,\); got \(4,\)"),
        ({"user": np.array([0, 1, 3])}, r"user must be in \[0, 3\); got 0\.\.3"),
        ({"item": np.array([0, -1, 1])}, r"item must be in \[0, 2\); got -1\.\.1"),
        ({"ts": np.array([0.0, np.nan, 1.0])}, r"ts must be finite; got NaN or inf"),
        ({"weight": np.array([1.0, -0.5, 1.0])}, r"weight must be finite and >= 0; got -0\.5 at row 1"),
        ({"weight": np.array([1.0, 1.0, np.inf])}, r"weight must be finite and >= 0; got inf at row 2"),
        ({"n_users": 0}, r"n_users must be an int >= 1; got 0"),
        ({"n_items": 2.0}, r"n_items must be an int >= 1; got 2\.0"),
    ],
)
@pytest.mark.parametrize(
    "make", [lambda: RecentPopularity(60.0), lambda: CategoryPopularity(np.array([0, 1])), ItemKNN]
)
def test_fit_errors_name_the_parameter(make, kwargs, message):
    args = {
        "user": np.array([0, 1, 1]),
        "item": np.array([0, 1, 0]),
        "ts": np.array([0.0, 1.0, 2.0]),
        "weight": None,
        "n_users": 3,
        "n_items": 2,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        make().fit(args.pop("user"), args.pop("item"), args.pop("ts"), args.pop("weight"), **args)


def test_score_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"ItemKNN is not fitted; call fit\(\.\.\.\) first"):
        ItemKNN().score_all(np.array([0]))
    m = RecentPopularity(60.0).fit(
        np.array([0, 1]), np.array([0, 1]), np.array([0.0, 1.0]), n_users=2, n_items=2
    )
    with pytest.raises(ValueError, match=r"user_idx must be in \[-1, 2\); got 0\.\.2"):
        m.score_all(np.array([0, 2]))
    with pytest.raises(ValueError, match=r"user_idx must be a 1-D int array; got shape \(1, 1\)"):
        m.score_all(np.array([[0]]))
    with pytest.raises(ValueError, match=r"n_items must equal len\(item_category\) = 2; got 3"):
        CategoryPopularity(np.array([0, 1])).fit(
            np.array([0]), np.array([0]), np.array([0.0]), n_users=1, n_items=3
        )
