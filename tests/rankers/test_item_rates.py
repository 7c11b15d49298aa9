"""The residual ranker's item-rate feature (rankers.item_rates) against a loop over the exposures,
without leakage of the label period (policy_api.jobs.shown_items / residual_scorer), the same
values on every scoring path, and its ranking of a simulated world's items against the truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logit

from policy_api.jobs import residual_scorer, shown_items
from rankers import (
    FEATURES,
    RATE_COLUMN,
    RATE_FEATURES,
    HistoryScorer,
    fit_residual,
    ground_truth_ndcg,
    item_rates,
)
from simulator import exposure_log, make_world

N_USERS, N_ITEMS, N_CAT = 30, 60, 4
RATE = FEATURES.index("logit_item_rate")
assert RATE == RATE_COLUMN
WEIGHTS = np.array([1.0, 2.0, 4.0, 5.0, -0.5])  # play, full_play, favorite, share, skip
DAY = 86400.0


def _loop_rates(shown, positive, cat, prior, n_bins):
    """The definition, one item and one bin at a time."""
    n = [0.0] * cat.size
    y = [0.0] * cat.size
    for j, p in zip(shown.tolist(), positive.tolist(), strict=True):
        n[j] += 1.0
        y[j] += 1.0 if p else 0.0
    overall = sum(y) / sum(n) if sum(n) else 0.5
    out = []
    for j in range(cat.size):
        mates = [m for m in range(cat.size) if cat[m] == cat[j]]
        edges = np.quantile([np.log1p(n[m]) for m in mates], np.linspace(0, 1, n_bins + 1)[1:-1])
        bin_of = {m: sum(e <= np.log1p(n[m]) for e in edges) for m in mates}
        same = [m for m in mates if bin_of[m] == bin_of[j]]
        sn, sy = sum(n[m] for m in same), sum(y[m] for m in same)
        cn, cy = sum(n[m] for m in mates), sum(y[m] for m in mates)
        f = sy / sn if sn else (cy / cn if cn else overall)
        f = min(max(f, 1e-3), 1 - 1e-3)
        out.append((y[j] + prior * f) / (n[j] + prior))
    return np.array(out), np.array(n)


@pytest.mark.parametrize("prior, n_bins", [(5.0, 8), (1.0, 1), (20.0, 3)])
def test_item_rates_match_a_loop_over_exposures(seed, prior, n_bins):
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    cat[:N_CAT] = np.arange(N_CAT)
    weight = rng.pareto(1.0, N_ITEMS - 5) + 0.01  # a long tail; the last 5 items are never shown
    shown = rng.choice(N_ITEMS - 5, size=500, p=weight / weight.sum())
    positive = rng.random(shown.size) < np.linspace(0.1, 0.6, N_ITEMS)[shown]
    got, n = item_rates(shown, positive, cat, prior=prior, n_bins=n_bins)
    want, want_n = _loop_rates(shown, positive, cat, prior, n_bins)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(n, want_n)
    assert (got > 0).all() and (got < 1).all() and np.isfinite(logit(got)).all()
    # no exposure at all: every item at 1/2
    empty, _ = item_rates(np.zeros(0, np.int64), np.zeros(0, bool), cat, prior=prior, n_bins=n_bins)
    np.testing.assert_array_equal(empty, np.full(N_ITEMS, 0.5))


@pytest.mark.parametrize("call, message", [
    (lambda c: item_rates(np.array([0]), np.array([True, False]), c), "shown_item and shown_positive must be 1-D"),
    (lambda c: item_rates(np.array([N_ITEMS]), np.array([True]), c), r"shown_item must be in \[0, 60\)"),
    (lambda c: item_rates(np.array([0]), np.array([True]), c, prior=0.0), "prior must be a finite number > 0"),
    (lambda c: item_rates(np.array([0]), np.array([True]), c, n_bins=0), "n_bins must be an int >= 1"),
    (lambda c: HistoryScorer("residual", c, coef=np.zeros(len(FEATURES)), item_rate_prior=-1.0),
     "item_rate_prior must be a finite number > 0"),
    (lambda c: HistoryScorer("popularity", c).fit(np.array([0]), np.array([0]), np.array([0.0]), np.array([1.0]),
                                                  n_users=1, shown_item=np.array([0])),
     "shown_item and shown_positive must be given together"),
])
def test_item_rate_errors_name_the_parameter(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.arange(N_ITEMS) % N_CAT)


def _events(rng, n=400):
    user = rng.integers(0, N_USERS - 3, size=n)
    item = rng.integers(0, N_ITEMS, size=n)
    ts = rng.uniform(0.0, 90 * DAY, size=n)
    weight = rng.choice([-0.5, 1.0, 2.0], size=n, p=[0.3, 0.5, 0.2])
    return user, item, ts, weight


def test_residual_reads_the_item_rates_on_every_path(seed):
    """The fitted rates are the feature's column, the same in batch, per request and per pair, kept by
    save/load; without exposures given, each event is one (positive when its weight is > 0)."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _events(rng)
    shown = rng.integers(0, N_ITEMS, size=900)
    positive = rng.random(shown.size) < 0.3
    coef = rng.normal(size=len(FEATURES))
    coef[RATE] = 2.0
    sc = HistoryScorer("residual", cat, coef=coef, type_weights=WEIGHTS).fit(
        user, item, ts, weight, n_users=N_USERS, shown_item=shown, shown_positive=positive)
    want = logit(_loop_rates(shown, positive, cat, 5.0, 8)[0])
    np.testing.assert_allclose(sc.rate_logit_, want, rtol=1e-10)
    users = np.r_[np.arange(8), -1]
    pools = np.stack([rng.permutation(N_ITEMS)[:15] for _ in users])
    x = sc.features(np.zeros((*pools.shape, 2)), np.zeros((users.size, N_CAT)), np.full((users.size, N_CAT), -np.inf),
                    pools)
    np.testing.assert_allclose(x[..., RATE], want[pools], rtol=1e-10)
    batch = sc.score_pools(users, pools)
    live = np.stack([sc.score_live(int(u), p, demote_seen=False) for u, p in zip(users, pools, strict=True)])
    pairs = sc.score_pairs(np.repeat(users, pools.shape[1]), pools.ravel()).reshape(pools.shape)
    back = HistoryScorer.load(sc.save())
    np.testing.assert_allclose(live, batch, rtol=1e-12)
    np.testing.assert_allclose(pairs, batch, rtol=1e-12)
    np.testing.assert_array_equal(back.rate_logit_, sc.rate_logit_)
    np.testing.assert_allclose(back.score_pools(users, pools), batch, rtol=1e-12)
    # the rate moves the score: the same model over other positives scores differently
    other = HistoryScorer("residual", cat, coef=coef, type_weights=WEIGHTS).fit(
        user, item, ts, weight, n_users=N_USERS, shown_item=shown, shown_positive=~positive)
    assert not np.allclose(other.score_pools(users, pools), batch)
    # no exposures given: a log of ratings, each event rated once, positive when its units are > 0
    ratings = HistoryScorer("residual", cat, coef=coef).fit(user, item, ts, weight, n_users=N_USERS)
    np.testing.assert_allclose(ratings.rate_logit_, logit(_loop_rates(item, weight > 0, cat, 5.0, 8)[0]), rtol=1e-10)
    assert sc.describe()["item_rates"]["items_exposed"] == np.unique(shown).size
    assert RATE_FEATURES == ("logit_item_rate",)


def test_a_model_saved_before_the_item_rates_loads_with_the_same_scores(seed):
    """A residual ranker saved without item rates (its coefficients one shorter) loads with a zero
    coefficient on them."""
    import io
    import json

    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    user, item, ts, weight = _events(rng)
    coef = rng.normal(size=len(FEATURES))
    coef[RATE] = 0.0
    sc = HistoryScorer("residual", cat, coef=coef).fit(user, item, ts, weight, n_users=N_USERS)
    data = sc.save()
    magic = data[:data.index(b"\n") + 1]
    with np.load(io.BytesIO(data[len(magic):]), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k not in ("rate_logit", "exposures")}
    arrays["coef"] = np.delete(arrays["coef"], RATE)
    meta = json.loads(str(arrays["meta"]))
    del meta["item_rate_prior"]
    arrays["meta"] = np.array(json.dumps(meta))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    old = HistoryScorer.load(magic + buf.getvalue())
    users = np.arange(N_USERS)
    pools = np.stack([rng.permutation(N_ITEMS)[:20] for _ in users])
    np.testing.assert_allclose(old.score_pools(users, pools), sc.score_pools(users, pools), rtol=1e-12)
    assert old.coef[RATE] == 0.0


def _log_data(rng, n_dec=300):
    """A log as ``log_training_arrays`` returns it: impressions (a decision's shown items, at its time)
    and behaviour events a few seconds later."""
    dec_ts = np.sort(rng.uniform(0.0, 60 * DAY, size=n_dec))
    dec_user = rng.integers(0, N_USERS, size=n_dec)
    per = rng.integers(1, 6, size=n_dec)
    dec = np.repeat(np.arange(n_dec), per)
    item = rng.integers(0, N_ITEMS, size=dec.size)
    key = np.unique(dec * N_ITEMS + item)
    dec, item = key // N_ITEMS, key % N_ITEMS
    imps = {"decision": dec, "user": dec_user[dec], "item": item, "ts": dec_ts[dec]}
    acted = rng.random(dec.size) < 0.6
    ev_type = rng.choice([0, 1, 2, 4], size=int(acted.sum()))
    ev_ts = dec_ts[dec[acted]] + rng.uniform(1.0, 3600.0, size=int(acted.sum()))
    events = {"decision": dec[acted], "user": dec_user[dec[acted]], "item": item[acted], "ts": ev_ts, "type": ev_type}
    return {"impressions": imps, "events": events, "user_ids": [f"u{k}" for k in range(N_USERS)], "n_users": N_USERS}


def _loop_shown(data, before):
    imp, ev = data["impressions"], data["events"]
    out = []
    for d, j, t in zip(imp["decision"].tolist(), imp["item"].tolist(), imp["ts"].tolist(), strict=True):
        if before is not None and t >= before:
            continue
        hit = any(ed == d and ej == j and WEIGHTS[et] > 0 and (before is None or ets < before)
                  for ed, ej, et, ets in zip(ev["decision"].tolist(), ev["item"].tolist(), ev["type"].tolist(),
                                             ev["ts"].tolist(), strict=True))
        out.append((j, hit))
    return np.array([j for j, _ in out]), np.array([h for _, h in out], dtype=bool)


def test_item_rates_see_nothing_after_the_cutoff(seed):
    """The exposures before a cutoff, by a loop over impressions and events; impressions, positives and
    events after it (the label period) change neither the rates nor the residual ranker's scores."""
    rng = np.random.default_rng(seed)
    cat = rng.integers(0, N_CAT, size=N_ITEMS)
    data = _log_data(rng)
    cutoff = float(np.quantile(data["impressions"]["ts"], 0.7))
    for before in (cutoff, None):
        got_item, got_pos = shown_items(data, WEIGHTS, before)
        want_item, want_pos = _loop_shown(data, before)
        np.testing.assert_array_equal(np.sort(got_item * 2 + got_pos), np.sort(want_item * 2 + want_pos))
    coef = rng.normal(size=len(FEATURES))
    coef[RATE] = 1.5
    sc = residual_scorer(data, cat, coef, 1.0, WEIGHTS, before=cutoff)
    # the label period grows: more positives on old impressions (after the cutoff), new impressions and events
    later = {k: {c: v.copy() for c, v in t.items()} if isinstance(t, dict) else t for k, t in data.items()}
    imp, ev = later["impressions"], later["events"]
    old = imp["ts"] < cutoff
    n_new = 200
    late_dec = imp["decision"].max() + 1 + np.arange(n_new)
    late_item = rng.integers(0, N_ITEMS, size=n_new)
    late_ts = cutoff + rng.uniform(0.0, 30 * DAY, size=n_new)
    for c, v in (("decision", late_dec), ("user", rng.integers(0, N_USERS, n_new)), ("item", late_item), ("ts", late_ts)):
        imp[c] = np.r_[imp[c], v]
    pick = rng.choice(np.flatnonzero(old), size=100)
    for c, v in (("decision", np.r_[imp["decision"][pick], late_dec]), ("user", np.r_[imp["user"][pick], imp["user"][-n_new:]]),
                 ("item", np.r_[imp["item"][pick], late_item]), ("ts", np.r_[np.full(100, cutoff + 1.0), late_ts + 5.0]),
                 ("type", np.full(100 + n_new, 2))):
        ev[c] = np.r_[ev[c], v]
    after = residual_scorer(later, cat, coef, 1.0, WEIGHTS, before=cutoff)
    np.testing.assert_array_equal(after.rate_logit_, sc.rate_logit_)
    users, pools = np.arange(N_USERS), np.tile(np.arange(N_ITEMS), (N_USERS, 1))
    np.testing.assert_array_equal(after.score_pools(users, pools), sc.score_pools(users, pools))
    # ... while the whole log's rates do see them (the test can tell)
    assert not np.array_equal(residual_scorer(later, cat, coef, 1.0, WEIGHTS).rate_logit_, sc.rate_logit_)


def test_item_rate_ranks_a_decoupled_world_closer_to_the_truth_than_popularity(seed):
    """A small world whose item quality is independent of popularity, its history shown in proportion
    to popularity: the residual ranker's item-rate feature, measured on the first 70 % of the log,
    ranks each category's items closer to the simulator's true preference than popularity (positive
    units) on the same events does. The reference is the simulator's truth (ground-truth NDCG@10)."""
    n_users, n_items = 300, 400
    world = make_world(n_users=n_users, n_items=n_items, seed=seed % 7, popularity_quality_corr=0.0)
    imp, ev = exposure_log(world, 3000, np.random.default_rng(seed))
    w = world.event_weight_values[ev["type"]]
    cutoff = float(np.quantile(imp["ts"], 0.7))
    past = ev["ts"] < cutoff
    positive_pairs = np.unique((ev["decision"] * n_items + ev["item"])[past & (w > 0)])
    early = imp["ts"] < cutoff
    shown = imp["item"][early]
    positive = np.isin(imp["decision"][early] * n_items + shown, positive_pairs)
    cat = world.item_category
    fit = {"n_users": n_users, "shown_item": shown, "shown_positive": positive}
    sc = HistoryScorer("residual", cat, coef=np.eye(len(FEATURES))[RATE]).fit(
        ev["user"][past], ev["item"][past], ev["ts"][past], w[past], **fit)
    pop = HistoryScorer("popularity", cat).fit(ev["user"][past], ev["item"][past], ev["ts"][past], w[past], **fit)
    rng = np.random.default_rng(seed)
    users = np.arange(n_users)
    lists = np.concatenate([np.stack([rng.permutation(world.category_items[c])[:40] for _ in users])
                            for c in range(world.n_categories)])
    lu = np.tile(users, world.n_categories)
    truth = world.true_preference
    rate = ground_truth_ndcg(sc.score_pairs, truth, lu, lists)
    popularity = ground_truth_ndcg(pop.score_pairs, truth, lu, lists)
    # a model of the rate alone: sigmoid(logit rate) is the rate itself
    np.testing.assert_allclose(sc.score_pairs(lu[:5], lists[:5, 0]), expit(sc.rate_logit_[lists[:5, 0]]), rtol=1e-12)
    assert rate - popularity >= 0.01, (rate, popularity)  # 0.018 at least over seeds 0..99, mean 0.039


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_fit_residual_keeps_the_rate_coefficient_nonnegative(seed, sign):
    """The bounded fit against L-BFGS-B with the same bound: a rate column that goes against the labels
    gets 0 (and the optimum's conditions hold there); one that goes with them is left as the free fit has it."""
    rng = np.random.default_rng(seed)
    U, P, F = 40, 25, 5
    x = rng.normal(size=(U, P, F))
    x[..., 0] = 1.0
    y = rng.random((U, P)) < expit(-2.0 + 0.8 * x[..., 1] + sign * 0.7 * x[..., 3])
    m = rng.random((U, P)) < 0.9
    free = fit_residual(x, y, m)
    got = fit_residual(x, y, m, nonnegative=(3,))
    X, Y = x[m], (y & m)[m].astype(float)
    reg = np.r_[1e-6, np.ones(F - 1)]

    def loss(w):
        z = X @ w
        return np.sum(np.logaddexp(0, z) - Y * z) + 0.5 * np.sum(reg * w * w)

    def grad(w):
        return X.T @ (expit(X @ w) - Y) + reg * w

    bounds = [(None, None)] * F
    bounds[3] = (0.0, None)
    ref = minimize(loss, np.zeros(F), jac=grad, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 10000, "gtol": 1e-10, "ftol": 1e-15})
    assert got[3] >= 0.0 and loss(got) <= ref.fun + 1e-6
    np.testing.assert_allclose(got, ref.x, atol=1e-4)
    g = grad(got)
    if sign < 0:
        assert free[3] < 0.0 and got[3] == 0.0 and g[3] >= -1e-8  # on the bound, pushing against it
        assert np.abs(np.delete(g, 3)).max() < 1e-5
    else:
        assert free[3] > 0.0
        np.testing.assert_array_equal(got, free)
    with pytest.raises(ValueError, match=r"nonnegative must hold columns in \[1, 5\); got \[0\]"):
        fit_residual(x, y, m, nonnegative=(0,))
