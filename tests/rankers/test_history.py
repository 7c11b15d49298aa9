"""rankers.HistoryScorer (the servable baselines and the residual ranker) against independent
references: the fit/score_all baselines, a per-user loop over the live history, a second optimiser
for the residual ranker's coefficients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.optimize import minimize
from scipy.special import expit

from rankers import (
    FEATURES,
    HISTORY_KINDS,
    CategoryPopularity,
    HistoryScorer,
    ItemKNN,
    RecentPopularity,
    fit_residual,
    is_history_scorer,
    repeat_share,
    residual_grid,
    with_dial,
)

N_USERS, N_ITEMS, N_CAT = 30, 50, 4
N_FEATURES = len(FEATURES)  # FEATURES names the residual's features for 4 categories
DAY = 86400.0


def _log(rng, n=400):
    user = rng.integers(0, N_USERS - 3, size=n)  # the last users have no history
    item = rng.integers(0, N_ITEMS, size=n)
    ts = rng.uniform(0.0, 90 * DAY, size=n)
    weight = rng.choice([-0.5, 1.0, 2.0], size=n, p=[0.2, 0.5, 0.3])
    return user, item, ts, weight


def _grid(rng, n_rows, width=20):
    return np.stack([rng.permutation(N_ITEMS)[:width] for _ in range(n_rows)])


@pytest.mark.parametrize("kind", ["popularity", "recent_popularity", "category_popularity", "item_knn",
                                  "catalog_popularity"])
def test_baselines_equal_the_reference_scorers(seed, kind):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    cat[:N_CAT] = np.arange(N_CAT)
    user, item, ts, weight = _log(rng)
    pos = weight > 0
    users = np.r_[np.arange(N_USERS), -1]
    pools = _grid(rng, users.size)
    column = rng.uniform(0.0, 100.0, N_ITEMS)  # a catalog's popularity column
    got = HistoryScorer(kind, cat, half_life_s=7 * DAY, item_popularity=column if kind == "catalog_popularity" else None
                        ).fit(user, item, ts, weight, n_users=N_USERS)
    args = (user[pos], item[pos], ts[pos], weight[pos])
    if kind == "catalog_popularity":
        want = np.tile(column, (users.size, 1))
    elif kind == "popularity":
        want = np.tile(np.bincount(item[pos], weights=weight[pos], minlength=N_ITEMS), (users.size, 1))
    elif kind == "recent_popularity":
        want = RecentPopularity(7 * DAY).fit(*args, n_users=N_USERS, n_items=N_ITEMS).score_all(users)
    elif kind == "category_popularity":
        want = CategoryPopularity(cat).fit(*args, n_users=N_USERS, n_items=N_ITEMS).score_all(users)
    else:
        want = ItemKNN().fit(*args, n_users=N_USERS, n_items=N_ITEMS).score_all(users)
    want = np.take_along_axis(want, pools, axis=1)
    np.testing.assert_allclose(got.score_pools(users, pools), want, rtol=1e-12, atol=1e-12)
    # one user at a time (the serving path, no live events, nothing demoted) and pairs give the same
    one = np.stack([got.score(int(u), p) for u, p in zip(users, pools, strict=True)])
    np.testing.assert_allclose(one, want, rtol=1e-12, atol=1e-12)
    pairs = got.score_pairs(np.repeat(users, pools.shape[1]), pools.ravel())
    np.testing.assert_allclose(pairs, want.ravel(), rtol=1e-12, atol=1e-12)


def _residual(rng, cat, user, item, ts, weight, gamma=1.0):
    coef = rng.normal(size=N_FEATURES)
    return HistoryScorer("residual", cat, coef=coef, pop_exponent=gamma,
                         type_weights=np.array([1.0, 2.0, 2.0, 3.0, -0.5])).fit(user, item, ts, weight,
                                                                                  n_users=N_USERS)


@pytest.mark.parametrize("kind", ["category_popularity", "item_knn", "residual", "catalog_popularity"])
def test_live_events_equal_a_per_user_reference(seed, kind):
    """Live positives join the snapshot: kNN sums over the union of the histories, category weights
    grow by the events' units, the category's last time becomes the reference time; everything the
    user engaged with goes below the rest as ``min - 1 - max |s|``."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _log(rng)
    column = rng.uniform(0.0, 100.0, N_ITEMS) if kind == "catalog_popularity" else None
    sc = (_residual(rng, cat, user, item, ts, weight) if kind == "residual" else
          HistoryScorer(kind, cat, type_weights=np.array([1.0, 2.0, 2.0, 3.0, -0.5]), item_popularity=column).fit(
              user, item, ts, weight, n_users=N_USERS))
    s = sc.similarity_.toarray()
    pos = weight > 0
    for u in (0, 5, N_USERS - 1, -1):
        live = rng.choice(N_ITEMS, size=3, replace=False)
        types = np.array([0, 2, 3])
        cand = rng.permutation(N_ITEMS)[:25]
        flagged = np.ones(cand.size, dtype=bool)
        got = sc.score_live(u, cand, live, types, seen_out=flagged)
        # the reference: a loop over the user's history as a set
        hist = set() if u < 0 else {int(i) for i, uu, w in zip(item, user, weight, strict=True) if uu == u and w > 0}
        hist |= set(live.tolist())
        n_uc = np.zeros(N_CAT) if u < 0 else sc.user_category_[u].copy()
        last = np.full(N_CAT, -np.inf) if u < 0 else sc.last_[u].copy()
        for j, tcode in zip(live.tolist(), types.tolist(), strict=True):
            n_uc[cat[j]] += [1.0, 2.0, 2.0, 3.0, -0.5][tcode]
            last[cat[j]] = sc.t_ref_
        # recency of each history item: its newest positive, counted back from the user's newest
        rec = {}
        mine = pos & (user == u)
        for i in set(item[mine].tolist()):
            rec[i] = 0.5 ** ((ts[mine].max() - ts[mine & (item == i)].max()) / DAY)
        rec.update({int(i): 1.0 for i in live})
        knn = np.array([[sum(s[i, j] for i in hist), sum(s[i, j] * rec[i] for i in hist)] for j in cand.tolist()])
        has = any(s[i].any() for i in hist)
        want = (column[cand] if column is not None else
                sc._scores(knn[None], np.array([has]), n_uc[None], last[None], cand[None])[0])
        seen = np.isin(cand, list(hist))
        np.testing.assert_array_equal(flagged, seen)
        want = np.where(seen, want.min() - 1.0 - np.abs(want).max(), want)
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        assert (got[seen][:, None] < got[~seen][None, :]).all()


def test_residual_features_match_their_definitions(seed):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _log(rng)
    sc = _residual(rng, cat, user, item, ts, weight)
    users = np.arange(6)
    pools = _grid(rng, users.size, 10)
    x = sc.features(np.zeros((*pools.shape, 2)), sc.user_category_[users], sc.last_[users], pools)
    pos = weight > 0
    for r, u in enumerate(users.tolist()):
        for c, j in enumerate(pools[r].tolist()):
            f = x[r, c]
            for k, h in enumerate((14.0, 3.0, 14.0, 60.0, None)):  # the base, then log1p of decayed popularity
                d = np.ones(pos.sum()) if h is None else 0.5 ** ((ts[pos].max() - ts[pos]) / (h * DAY))
                p = np.bincount(item[pos], weights=weight[pos] * d, minlength=N_ITEMS)
                assert f[1 + k] == pytest.approx(np.log(p[j] + 0.01) if k == 0 else np.log1p(p[j]))
            mine = pos & (user == u) & (cat[item] == cat[j])
            gap = (ts[pos].max() - ts[mine].max()) / DAY if mine.any() else None
            bucket = 5 if gap is None else int(np.searchsorted([1.0, 7.0, 30.0, 180.0], gap, side="left"))
            assert f[12:18].tolist() == [1.0 * (b == bucket) for b in range(6)]
            assert f[18:].tolist() == [1.0 * (c2 == cat[j]) for c2 in range(N_CAT)]
            assert f[11] == sc.rate_logit_[j]  # the item rate (tests/rankers/test_item_rates.py)
            n_uc = np.bincount(cat[item[pos & (user == u)]], weights=weight[pos & (user == u)], minlength=N_CAT)
            share = (n_uc[cat[j]] + sc.category_share_[cat[j]]) / (n_uc.sum() + 1.0)
            assert f[10] == pytest.approx(np.log(share + 1e-9))
            assert f[6:10].tolist() == [0.0, 0.0, 0.0, 0.0]  # no kNN given


def test_pop_exponent_is_the_popularity_dial(seed):
    """pop_exponent = 0 removes the popularity features: the scores equal a model without them."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _log(rng)
    full = _residual(rng, cat, user, item, ts, weight, gamma=0.0)
    mask = np.r_[1.0, np.zeros(5), np.ones(full.coef.size - 6)]  # the five popularity features off
    no_pop = HistoryScorer("residual", cat, coef=full.coef * mask).fit(user, item, ts, weight, n_users=N_USERS)
    users, pools = np.arange(N_USERS), _grid(rng, N_USERS)
    np.testing.assert_allclose(full.score_pools(users, pools), no_pop.score_pools(users, pools), rtol=1e-12)


def test_served_residual_scores_follow_the_dial_and_a_refit(seed):
    """A request's residual scores and the batch scores (item terms precomputed per model, no feature
    matrix) equal sigmoid(feature matrix @ coefficients), after the dial moves and after a refit on
    another log."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    sc = _residual(rng, cat, *_log(rng))
    users, pools = np.r_[np.arange(6), -1], _grid(rng, 7)

    def served() -> np.ndarray:
        return np.stack([sc.score_live(int(u), p, demote_seen=False) for u, p in zip(users, pools, strict=True)])

    def reference() -> np.ndarray:  # sigmoid(feature matrix @ coefficients, the dial on the popularity columns)
        x, v, n_uc, last = sc._user_rows(users)
        knn, _ = sc._knn_grid(x, v, pools)
        coef = sc.coef.copy()
        coef[1:6] *= sc.pop_exponent
        return expit(sc.features(knn, n_uc, last, pools) @ coef)

    before = served()
    for got in (before, sc.score_pools(users, pools), sc.score_pairs(np.repeat(users, 20), pools.ravel()).reshape(7, 20)):
        np.testing.assert_allclose(got, reference(), rtol=1e-12)
    sc.pop_exponent = 0.25
    dialled = served()
    np.testing.assert_allclose(dialled, reference(), rtol=1e-12)
    np.testing.assert_allclose(sc.score_pools(users, pools), reference(), rtol=1e-12)
    assert not np.allclose(dialled, before)
    sc.fit(*_log(rng), n_users=N_USERS)
    np.testing.assert_allclose(served(), reference(), rtol=1e-12)
    np.testing.assert_allclose(sc.score_pools(users, pools), reference(), rtol=1e-12)
    assert not np.allclose(served(), dialled)


@pytest.mark.parametrize("kind", ["category_popularity", "item_knn", "residual"])
def test_score_pairs_scores_each_users_pairs_as_one_pool(seed, kind):
    """Pairs of many users in any order, most without history (-1, as in planning), known users with
    pair sets of different sizes: each pair's score equals the user's own pool scored alone."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    log = _log(rng)
    sc = _residual(rng, cat, *log) if kind == "residual" else HistoryScorer(kind, cat).fit(*log, n_users=N_USERS)
    pools = {u: rng.permutation(N_ITEMS)[:int(rng.integers(3, 25))] for u in (0, 3, 7, 12)}
    cold = rng.integers(0, N_ITEMS, size=2500)  # more than one row of cold pairs
    u = np.concatenate([np.full(p.size, k) for k, p in pools.items()] + [np.full(cold.size, -1)])
    i = np.concatenate([*pools.values(), cold])
    perm = rng.permutation(u.size)
    got = np.empty(u.size)
    got[perm] = sc.score_pairs(u[perm], i[perm], row=1000)
    at = 0
    for k, p in pools.items():
        np.testing.assert_allclose(got[at:at + p.size], sc.score_pools(np.array([k]), p[None, :])[0], rtol=1e-12)
        at += p.size
    np.testing.assert_allclose(got[at:], sc.score_pools(np.array([-1]), np.arange(N_ITEMS)[None, :])[0][cold],
                               rtol=1e-12)


def test_with_coef_equals_a_refit_with_those_coefficients(seed):
    """The dial's scorers share one fitted snapshot: the same scores as fitting each anew."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    log = _log(rng)
    sc = _residual(rng, cat, *log)
    coef = rng.normal(size=N_FEATURES)
    users, pools = np.r_[np.arange(8), -1], _grid(rng, 9)
    shared = sc.with_coef(coef, 0.5)
    refit = HistoryScorer("residual", cat, coef=coef, pop_exponent=0.5, type_weights=sc.type_weights).fit(
        *log, n_users=N_USERS)
    np.testing.assert_allclose(shared.score_pools(users, pools), refit.score_pools(users, pools), rtol=1e-12)
    np.testing.assert_allclose(shared.score_live(3, pools[0]), refit.score_live(3, pools[0]), rtol=1e-12)
    assert not np.allclose(sc.score_pools(users, pools), shared.score_pools(users, pools))  # the original keeps its own
    with pytest.raises(ValueError, match="coef must have shape"):
        sc.with_coef(coef[:3], 0.5)


def test_fit_residual_matches_a_second_optimiser(seed):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _log(rng)
    base = HistoryScorer("popularity", cat).fit(user, item, ts, weight, n_users=N_USERS)
    users = np.arange(N_USERS)
    pools = _grid(rng, N_USERS, 30)
    fut = sp.csr_array((np.ones(60), (rng.integers(0, N_USERS, 60), rng.integers(0, N_ITEMS, 60))),
                       shape=(N_USERS, N_ITEMS))
    x, y, m = residual_grid(base, users, pools, fut)
    assert x.shape == (N_USERS, 30, N_FEATURES)
    # any kind of base gives the same grid: a popularity base is fitted without the item-item
    # similarity, which the kNN features read
    knn_base = HistoryScorer("item_knn", cat).fit(user, item, ts, weight, n_users=N_USERS)
    np.testing.assert_array_equal(residual_grid(knn_base, users, pools, fut)[0], x)
    assert base.similarity_.nnz == 0 and knn_base.similarity_.nnz > 0 and np.abs(x[..., 6]).max() > 0  # log1p_knn
    np.testing.assert_array_equal(y, np.take_along_axis(fut.toarray() > 0, pools, axis=1))
    np.testing.assert_array_equal(m, ~np.take_along_axis(base.history_.toarray() > 0, pools, axis=1))
    coef = fit_residual(x, y, m, l2=1.0)
    # the reference: the same penalised logistic loss minimised by L-BFGS over the same rows
    X, Y = x[m], (y & m)[m].astype(float)
    reg = np.r_[1e-6, np.ones(coef.size - 1)]

    def loss(w):
        z = X @ w
        return np.sum(np.logaddexp(0, z) - Y * z) + 0.5 * np.sum(reg * w * w)

    def grad(w):
        return X.T @ (expit(X @ w) - Y) + reg * w

    ref = minimize(loss, np.zeros(coef.size), jac=grad, method="L-BFGS-B",
                   options={"maxiter": 10000, "gtol": 1e-10, "ftol": 1e-15})
    assert loss(coef) <= ref.fun + 1e-6  # at least as good as L-BFGS's optimum
    # the one-hot groups sum to the (barely penalised) bias column: compare the fitted probabilities
    np.testing.assert_allclose(expit(X @ coef), expit(X @ ref.x), atol=5e-4)
    assert np.abs(grad(coef)).max() < 1e-5  # and the first-order condition holds
    # the dial keeps the calibration in the large: mean probability = share chosen, at every setting
    for gamma in (0.0, 0.5, 1.0, 1.5):
        c = with_dial(x, y, m, coef, gamma)
        scaled = c.copy()
        scaled[1:6] *= gamma
        assert np.sum(expit(X @ scaled)) == pytest.approx(Y.sum(), rel=1e-8)
        np.testing.assert_array_equal(np.delete(c, 0), np.delete(coef, 0))


@pytest.mark.parametrize("kind", HISTORY_KINDS)
def test_save_load_round_trip_and_inputs_untouched(seed, kind):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _log(rng)
    copies = [a.copy() for a in (user, item, ts, weight, cat)]
    pop = rng.uniform(0.0, 10.0, N_ITEMS) if kind == "catalog_popularity" else None
    sc = (_residual(rng, cat, user, item, ts, weight, gamma=0.5) if kind == "residual" else
          HistoryScorer(kind, cat, item_popularity=pop).fit(user, item, ts, weight, n_users=N_USERS))
    for a, b in zip((user, item, ts, weight, cat), copies, strict=True):
        np.testing.assert_array_equal(a, b)
    data = sc.save()
    assert is_history_scorer(data) and not is_history_scorer(b"HPRANKER1\n")
    back = HistoryScorer.load(data)
    users, pools = np.r_[np.arange(N_USERS), -1], _grid(rng, N_USERS + 1)
    np.testing.assert_array_equal(back.score_pools(users, pools), sc.score_pools(users, pools))
    live = np.array([3, 7])
    np.testing.assert_array_equal(back.score_live(2, pools[0], live), sc.score_live(2, pools[0], live))
    assert back.describe() == sc.describe()


@pytest.mark.parametrize(("make", "message"), [
    (lambda cat: HistoryScorer("nope", cat), r"kind must be one of popularity, recent_popularity"),
    (lambda cat: HistoryScorer("popularity", cat.astype(float)), r"item_category must be a non-empty 1-D array"),
    (lambda cat: HistoryScorer("recent_popularity", cat, half_life_s=0.0), r"half_life_s must be a finite number > 0"),
    (lambda cat: HistoryScorer("residual", cat), r"coef must have shape \(22,\) for a residual scorer; got None"),
    (lambda cat: HistoryScorer("popularity", cat, pop_exponent=-1.0), r"pop_exponent must be a finite number >= 0"),
    (lambda cat: HistoryScorer("catalog_popularity", cat), r"item_popularity must be \d+ finite numbers >= 0 \(one "
                                                          r"per item\) for a catalog_popularity scorer; got None"),
    (lambda cat: HistoryScorer("catalog_popularity", cat, item_popularity=-np.ones(cat.size)),
     r"item_popularity must be 50 finite numbers >= 0 .* got 50 values that are negative or not finite"),
    (lambda cat: HistoryScorer("catalog_popularity", cat, item_popularity=np.ones(3)),
     r"item_popularity must be 50 finite numbers >= 0 .* got shape \(3,\)"),
])
def test_constructor_errors_name_the_parameter(make, message):
    with pytest.raises(ValueError, match=message):
        make(np.arange(N_ITEMS) % N_CAT)


def test_use_errors_name_the_parameter():
    cat = np.arange(N_ITEMS) % N_CAT
    sc = HistoryScorer("item_knn", cat)
    with pytest.raises(ValueError, match=r"is not fitted; call fit"):
        sc.score_live(0, np.arange(3))
    sc.fit(np.array([0, 1]), np.array([2, 3]), np.array([0.0, 1.0]), np.array([1.0, 1.0]), n_users=2)
    with pytest.raises(ValueError, match=r"user_idx must be in \[-1, 2\); got 5"):
        sc.score_live(5, np.arange(3))
    with pytest.raises(ValueError, match=r"item_idx must be in \[0, 50\)"):
        sc.score_live(0, np.array([50]))
    with pytest.raises(ValueError, match=r"live_items must be in \[0, 50\)"):
        sc.score_live(0, np.arange(3), np.array([-2]))
    with pytest.raises(ValueError, match=r"user must be in \[0, 2\) and item in \[0, 50\)"):
        sc.fit(np.array([3]), np.array([1]), np.array([0.0]), np.array([1.0]), n_users=2)
    with pytest.raises(ValueError, match=r"data must be a saved HistoryScorer"):
        HistoryScorer.load(b"nonsense")


def test_fit_residual_converges_where_plain_newton_overshoots(seed):
    """A nearly separating feature of large magnitude: the damped Newton steps still reach the
    penalised optimum (the first-order condition) with finite coefficients."""
    rng = np.random.default_rng(seed)
    U, P = 20, 40
    x = np.zeros((U, P, 3))
    x[..., 0] = 1.0
    y = rng.random((U, P)) < 0.05
    x[..., 1] = np.where(y, 20.0, -20.0) + rng.normal(size=(U, P))
    x[..., 2] = rng.normal(size=(U, P)) * 30.0
    m = np.ones((U, P), dtype=bool)
    coef = fit_residual(x, y, m, l2=1.0)
    X, Y = x.reshape(-1, 3), y.ravel().astype(float)
    g = X.T @ (expit(X @ coef) - Y) + np.r_[1e-6, 1.0, 1.0] * coef
    assert np.isfinite(coef).all() and np.abs(g).max() < 1e-4
    x[0, 0, 1] = np.nan
    with pytest.raises(ValueError, match=r"X must be finite on the eligible candidates"):
        fit_residual(x, y, m)


def test_repeat_share_and_the_seen_items_switch(seed):
    """repeat_share counts positive events on an item the same user engaged with before (reference: a
    Python set walk); a scorer that keeps seen items serves them by score, and the switch survives
    save/load."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _log(rng)
    ts = np.round(ts / DAY) * DAY  # whole days: some pairs have several events at one time
    user, item = np.r_[user, user[:20]], np.r_[item, item[:20]]  # the same events twice: not repeats
    ts = np.r_[ts, ts[:20]]
    first: dict[tuple[int, int], float] = {}
    times: set[tuple[int, int, float]] = set()
    for u, i, t in sorted(zip(user.tolist(), item.tolist(), ts.tolist(), strict=True), key=lambda r: r[2]):
        first.setdefault((u, i), t)
        times.add((u, i, t))
    repeats = sum(t > first[(u, i)] for u, i, t in times)
    assert repeat_share(user, item, ts, N_ITEMS) == pytest.approx(repeats / len(times))
    assert repeat_share(np.zeros(3, int), np.zeros(3, int), np.zeros(3), N_ITEMS) == 0.0  # one time: once
    user, item, ts, weight = _log(rng)
    sc = HistoryScorer("recent_popularity", cat).fit(user, item, ts, weight, n_users=N_USERS)
    pool = np.arange(N_ITEMS)
    u = int(user[0])
    demoted = sc.score_live(u, pool)
    sc.demote_seen = False
    kept = sc.score_live(u, pool)
    np.testing.assert_array_equal(kept, sc.score(u, pool))  # nothing moved: the scores as they are
    hist = np.unique(item[(user == u) & (weight > 0)])
    assert hist.size and (demoted[hist] < demoted[np.setdiff1d(pool, hist)].min()).all()
    back = HistoryScorer.load(sc.save())
    assert back.demote_seen is False
    np.testing.assert_array_equal(back.score_live(u, pool), kept)


@pytest.mark.parametrize("kind", ["item_knn", "residual"])
def test_the_compiled_knn_read_equals_scipys_product(seed, kind):
    # a request's kNN sums come from a compiled kernel over S^T's CSR arrays: they must be scipy's
    # `S^T[items] @ w` bit for bit (the same additions in the same order), before and after save/load,
    # for users with and without history, repeated candidates included
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _log(rng, n=1500)
    sc = (_residual(rng, cat, user, item, ts, weight) if kind == "residual" else
          HistoryScorer(kind, cat).fit(user, item, ts, weight, n_users=N_USERS))
    for model in (sc, HistoryScorer.load(sc.save())):
        model.warm()
        for n_hist in (0, 1, 7, N_ITEMS):
            hist = np.sort(rng.choice(N_ITEMS, size=n_hist, replace=False))
            recency = rng.random(n_hist)
            items = rng.integers(0, N_ITEMS, size=60)
            got = model._knn_of(hist, recency, items)
            w = np.zeros((N_ITEMS, 2))
            w[hist, 0], w[hist, 1] = 1.0, recency
            want = np.asarray(model.similarity_t_[items] @ w) if n_hist else np.zeros((items.size, 2))
            assert got.shape == want.shape and got.dtype == np.float64
            np.testing.assert_array_equal(got, want)
        assert model.similarity_t_.nnz > 0
