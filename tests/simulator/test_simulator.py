"""Tests of the synthetic world against independent references: slow loops, brute-force layouts,
Monte Carlo sampling and closed forms."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
import pickle
import tomllib

import numpy as np
import pytest

from simulator import (
    CATEGORIES,
    DEFAULT_EVENT_WEIGHTS,
    EVENT_TYPES,
    FEEDBACK_TYPES,
    World,
    make_world,
)


@pytest.fixture(scope="module")
def default_world() -> World:
    return make_world()


@pytest.fixture(scope="module")
def default_units(default_world: World) -> np.ndarray:
    return default_world.expected_units_matrix(np.arange(default_world.n_users))


# ---- independent references ----------------------------------------------------------------------
def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def slow_event_probs(w: World, u: int, i: int) -> list[float]:
    """P(event | examined) from the world's parameters, one scalar at a time (the documented model)."""
    c = int(w.item_category[i])
    t = (float(w.category_bias[c]) + sum(float(a) * float(b) for a, b in zip(w.user_taste[u], w.item_taste[i], strict=True))
         + float(w.user_affinity[u, c]) + float(w.item_quality[i]))
    p = _sig(t + w.conformity * float(w.popularity_z[i]))
    a, b = w.followup_intercept, w.followup_slope
    return [p,
            p * _sig(a[0] + b * t + float(w.full_play_offset[i])),
            p * _sig(a[1] + b * t),
            p * _sig(a[2] + b * t),
            w.skip_rate * (1.0 - p)]


def slow_expected_reward(w: World, u: int, slot_items: np.ndarray) -> float:
    total = 0.0
    for s in range(slot_items.shape[0]):
        for j in range(slot_items.shape[1]):
            i = int(slot_items[s, j])
            if i < 0:
                continue
            units = sum(pr * DEFAULT_EVENT_WEIGHTS[e] for pr, e in zip(slow_event_probs(w, u, i), EVENT_TYPES, strict=True))
            total += (float(w.slot_examination[s]) * float(w.item_examination[j]) * units
                      * float(w.category_value[w.item_category[i]]))
    return total


def category_order(w: World, u: int, c: int) -> list[int]:
    """Items of category c by true expected units, descending; ties by item index."""
    items = [i for i in range(w.n_items) if w.item_category[i] == c]
    units = w.expected_units(np.full(len(items), u), np.array(items))
    return [items[k] for k in np.argsort(-units, kind="stable")]


def brute_force_oracle(w: World, u: int, modules_per_category: list[int]) -> float:
    """Best page over every assignment of distinct modules to slots (block rule applied by slot order)."""
    S, K = w.n_slots, w.items_per_module
    orders = [category_order(w, u, c) for c in range(w.n_categories)]
    modules = [c for c in range(w.n_categories) for _ in range(modules_per_category[c])]
    n_nonempty = sum(min(modules_per_category[c], -(-len(orders[c]) // K)) for c in range(w.n_categories))
    n_empty = S - min(S, n_nonempty)
    tokens = list(range(len(modules))) + [None] * n_empty
    best = -math.inf
    for perm in itertools.permutations(tokens, S):
        page = np.full((S, K), -1, dtype=np.int64)
        used = [0] * w.n_categories
        ok = True
        for s, m in enumerate(perm):
            if m is None:
                continue
            c = modules[m]
            block = orders[c][used[c] * K:(used[c] + 1) * K]
            used[c] += 1
            if not block:  # a module with nothing to show is not a valid choice
                ok = False
                break
            page[s, :len(block)] = block
        if ok:
            best = max(best, w.expected_reward(u, page))
    return best


def reference_long_tail(popularity: np.ndarray, item_category: np.ndarray, head_share: float
                        ) -> tuple[np.ndarray, np.ndarray]:
    """internals.md: head = shortest popularity-sorted prefix reaching head_share of the category;
    tail(i) = 0 in the head, 0.5 + 0.5 * j / (n_tail - 1) for the j-th tail item."""
    n = popularity.size
    is_tail, tail = np.zeros(n, dtype=bool), np.zeros(n)
    for c in np.unique(item_category):
        idx = np.flatnonzero(item_category == c)
        order = idx[np.lexsort((idx, -popularity[idx]))]
        before = np.cumsum(popularity[order]) - popularity[order]
        head = before < head_share * popularity[order].sum()
        head[0] = True
        is_tail[order] = ~head
        n_tail = int((~head).sum())
        tail[order[~head]] = 0.5 + 0.5 * np.arange(n_tail) / max(n_tail - 1, 1)
    return is_tail, tail


# ---- engagement model ---------------------------------------------------------------------------
def test_expected_reward_matches_slow_loop(seed: int) -> None:
    w = make_world(n_users=6, n_items=40, seed=seed, n_slots=3, items_per_module=4)
    rng = np.random.default_rng(seed)
    for u in range(w.n_users):
        page = rng.integers(-1, w.n_items, size=(3, 4))
        assert w.expected_reward(u, page) == pytest.approx(slow_expected_reward(w, u, page), rel=1e-10, abs=1e-12)


def test_event_probs_match_documented_model(seed: int) -> None:
    w = make_world(n_users=20, n_items=60, seed=seed)
    rng = np.random.default_rng(seed)
    u, i = rng.integers(0, 20, size=50), rng.integers(0, 60, size=50)
    got = w.event_probs(u, i)
    want = np.array([slow_event_probs(w, int(a), int(b)) for a, b in zip(u, i, strict=True)])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(w.expected_units(u, i), want @ [DEFAULT_EVENT_WEIGHTS[e] for e in EVENT_TYPES],
                               rtol=1e-10, atol=1e-14)
    # play = click; the follow-ups imply a play; skip is a share of the non-plays
    assert (got[:, 1:4] <= got[:, :1]).all() and np.allclose(got[:, 4], w.skip_rate * (1 - got[:, 0]))
    # follow-ups rise with true preference: compare each pair's conditional probability
    t = w.true_preference(u, i)
    fav_given_play = got[:, 2] / got[:, 0]
    order = np.argsort(t)
    assert (np.diff(fav_given_play[order]) >= -1e-12).all()


def test_matrix_views_match_pairwise(seed: int) -> None:
    w = make_world(n_users=30, n_items=80, seed=seed)
    users = np.array([3, 0, 29, 3])
    uu, ii = np.meshgrid(users, np.arange(w.n_items), indexing="ij")
    np.testing.assert_allclose(w.expected_units_matrix(users), w.expected_units(uu, ii).reshape(4, -1),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(w.true_preference_matrix(users), w.true_preference(uu, ii).reshape(4, -1),
                               rtol=1e-12, atol=1e-14)


def test_expected_reward_batch_equals_per_user(seed: int) -> None:
    w = make_world(n_users=200, n_items=500, seed=seed)
    rng = np.random.default_rng(seed)
    users = rng.integers(0, w.n_users, size=40)
    pages = rng.integers(-1, w.n_items, size=(40, w.n_slots, w.items_per_module))
    batch = w.expected_reward_batch(users, pages)
    single = np.array([w.expected_reward(int(u), p) for u, p in zip(users, pages, strict=True)])
    np.testing.assert_allclose(batch, single, rtol=1e-12, atol=1e-12)
    assert w.expected_reward_batch(users[:0], pages[:0]).shape == (0,)


def test_conformity_raises_click_prob_of_popular_items(seed: int) -> None:
    w = make_world(n_users=50, n_items=400, seed=seed, conformity=0.8)
    uu, ii = np.meshgrid(np.arange(50), np.arange(400), indexing="ij")
    play = w.event_probs(uu, ii)[:, 0].reshape(50, 400)
    alone = 1.0 / (1.0 + np.exp(-w.true_preference(uu, ii).reshape(50, 400)))
    log_pop = np.log(w.popularity)
    for c in range(w.n_categories):
        idx = np.flatnonzero(w.item_category == c)
        above = log_pop[idx] > log_pop[idx].mean() + 1e-9  # more popular than the geometric mean
        below = log_pop[idx] < log_pop[idx].mean() - 1e-9
        assert (play[:, idx[above]] > alone[:, idx[above]]).all()
        assert (play[:, idx[below]] < alone[:, idx[below]]).all()
        # the logit gap grows with popularity within the category
        gap = np.log(play / (1 - play)) - np.log(alone / (1 - alone))
        by_pop = idx[np.argsort(w.popularity[idx], kind="stable")]
        assert (np.diff(gap[0, by_pop]) >= -1e-9).all()
    w0 = make_world(n_users=50, n_items=400, seed=seed, conformity=0.0)
    np.testing.assert_allclose(w0.event_probs(uu, ii)[:, 0],
                               1.0 / (1.0 + np.exp(-w0.true_preference(uu, ii))), rtol=1e-12)


# ---- catalog and traffic ------------------------------------------------------------------------
def test_popularity_has_a_real_long_tail(default_world: World) -> None:
    w = default_world
    for c in range(w.n_categories):
        pop = np.sort(w.popularity[w.item_category == c])[::-1]
        head = int(np.searchsorted(np.cumsum(pop), 0.8 * pop.sum())) + 1  # items to reach 80 %
        assert 0.05 * pop.size < head < 0.35 * pop.size, (w.categories[c], head, pop.size)
        top20 = pop[: int(0.2 * pop.size)].sum() / pop.sum()
        assert 0.7 < top20 < 0.9
    sizes = [int((w.item_category == c).sum()) for c in range(w.n_categories)]
    assert sum(sizes) == w.n_items and sizes == sorted(sizes, reverse=True) and sizes[0] > 3 * sizes[-1]


def test_item_features_correlate_mildly_with_engagement(default_world: World, default_units: np.ndarray
                                                       ) -> None:
    w = default_world
    mean_units = w.user_activity @ default_units
    rating = w.item_features[:, list(w.item_feature_names).index("rating")]
    r = np.corrcoef(rating, w.item_quality)[0, 1]
    assert 0.3 < r < 0.95  # informative, not a copy of the latent quality
    within = [np.corrcoef(rating[w.item_category == c], mean_units[w.item_category == c])[0, 1]
              for c in range(w.n_categories)]
    assert all(0.05 < x < 0.9 for x in within)


def test_sample_users_follows_activity(seed: int) -> None:
    w = make_world(n_users=300, n_items=100, seed=seed)
    n = 60_000
    draws = w.sample_users(n, np.random.default_rng(seed))
    assert draws.shape == (n,) and draws.dtype == np.int64
    heavy = np.argsort(-w.user_activity)[:30]  # top 10 % of users by activity
    share = np.isin(draws, heavy).mean()
    p = w.user_activity[heavy].sum()
    assert abs(share - p) <= 5 * math.sqrt(p * (1 - p) / n)
    assert p > 0.3  # traffic is skewed: the top tenth of users makes far more than a tenth of it


def test_determinism_by_seed(seed: int) -> None:
    a, b, c = (make_world(n_users=40, n_items=90, seed=s) for s in (seed, seed, seed + 1))
    for f in dataclasses.fields(World):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, np.ndarray):
            np.testing.assert_array_equal(va, vb)
        else:
            assert va == vb
    assert not np.array_equal(a.user_taste, c.user_taste)
    page = np.arange(a.n_slots * a.items_per_module).reshape(a.n_slots, -1)
    fa = a.sample_feedback(1, page, np.random.default_rng(seed))
    fb = b.sample_feedback(1, page, np.random.default_rng(seed))
    assert fa == fb
    np.testing.assert_array_equal(a.sample_users(50, np.random.default_rng(seed)),
                                  b.sample_users(50, np.random.default_rng(seed)))


def test_world_is_immutable_and_picklable() -> None:
    w = make_world(n_users=10, n_items=20)
    with pytest.raises(ValueError, match="read-only"):
        w.popularity[0] = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.conformity = 0.0  # type: ignore[misc]
    w.event_weights["play"] = 100.0  # a copy: the world does not change
    assert w.event_weights == DEFAULT_EVENT_WEIGHTS
    w2 = pickle.loads(pickle.dumps(w))
    np.testing.assert_array_equal(w2.expected_units_matrix([0, 1]), w.expected_units_matrix([0, 1]))


def test_catalog_csv_round_trip(tmp_path) -> None:
    w = make_world(n_users=5, n_items=25, seed=3)
    path = tmp_path / "catalog.csv"
    w.to_catalog_csv(path)
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["item_id", "category", "popularity", *w.item_feature_names]
    assert [r["item_id"] for r in rows] == w.item_ids.tolist()
    assert [r["category"] for r in rows] == [w.categories[c] for c in w.item_category]
    np.testing.assert_array_equal([float(r["popularity"]) for r in rows], w.popularity)
    feats = np.array([[float(r[n]) for n in w.item_feature_names] for r in rows])
    np.testing.assert_array_equal(feats, w.item_features)


# ---- feedback sampling --------------------------------------------------------------------------
def _sample_money(w: World, fb, n_rows: int) -> np.ndarray:
    weight = {"impression": 0.0, **DEFAULT_EVENT_WEIGHTS}
    money = np.array([weight[e] for e in fb.event]) * w.category_value[w.item_category[fb.item_idx]]
    return np.bincount(fb.row, weights=money, minlength=n_rows)


def test_sampled_feedback_matches_expected_reward(seed: int) -> None:
    w = make_world(n_users=100, n_items=300, seed=seed)
    rng = np.random.default_rng(seed)
    u = int(rng.integers(w.n_users))
    page, _ = w.oracle(u, np.array([2, 2, 1, 1]))
    page = page.copy()
    page[2, 3:] = -1  # some empty positions too
    n = 30_000
    fb = w.sample_feedback_batch(np.full(n, u), np.broadcast_to(page, (n, *page.shape)), rng)
    money = _sample_money(w, fb, n)
    se = money.std(ddof=1) / math.sqrt(n)
    assert abs(money.mean() - w.expected_reward(u, page)) <= 4.5 * se
    # examination: P(impression at (s, j)) = slot_examination[s] * item_examination[j]
    imp = fb.event == "impression"
    counts = np.zeros(page.shape)
    np.add.at(counts, (fb.slot[imp], fb.position[imp]), 1)
    p = np.outer(w.slot_examination, w.item_examination) * (page >= 0)
    assert (np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12).all()
    # each behaviour's frequency per examined impression matches event_probs
    probs = w.event_probs(np.full(page.size, u), np.maximum(page.ravel(), 0)).reshape(*page.shape, 5)
    exam = (p * n).sum()
    for k, e in enumerate(EVENT_TYPES):
        expect = (p * n * probs[..., k]).sum() / exam
        got = (fb.event == e).sum() / imp.sum()
        assert abs(got - expect) <= 5 * math.sqrt(expect * (1 - expect) / imp.sum())


def test_sample_feedback_events_are_consistent(seed: int) -> None:
    w = make_world(n_users=20, n_items=200, seed=seed)
    rng = np.random.default_rng(seed)
    page = rng.choice(w.n_items, size=(w.n_slots, w.items_per_module), replace=False)
    page[1, :] = -1
    draws = [w.sample_feedback(3, page, rng) for _ in range(300)]
    total = 0.0
    for events in draws:
        by_item: dict[tuple[int, int], list[str]] = {}
        for s, i, e in events:
            assert e in FEEDBACK_TYPES and page[s].tolist().count(i) == 1
            by_item.setdefault((s, i), []).append(e)
        for seq in by_item.values():
            assert seq[0] == "impression" and seq.count("impression") == 1
            assert len(set(seq)) == len(seq)  # each behaviour at most once per impression
            played = "play" in seq
            assert played or not {"full_play", "favorite", "share"} & set(seq)
            assert not (played and "skip" in seq)
        total += sum(DEFAULT_EVENT_WEIGHTS.get(e, 0.0) * w.category_value[w.item_category[i]]
                     for _, i, e in events)
        assert all(s != 1 for s, _, _ in events)  # empty slot: nothing examined
    # the per-user path samples the same model as the batch path (loose: 300 draws)
    fb = w.sample_feedback_batch(np.full(20_000, 3), np.broadcast_to(page, (20_000, *page.shape)), rng)
    money = _sample_money(w, fb, 20_000)
    se = money.std(ddof=1) * math.sqrt(1 / 300 + 1 / 20_000)
    assert abs(total / 300 - money.mean()) <= 4.5 * se


# ---- oracle -------------------------------------------------------------------------------------
ORACLE_CASES = [
    # categories, n_items, n_slots, K, modules_per_category, slot_examination
    (("songs", "videos", "live"), 9, 3, 2, [2, 2, 1], None),  # videos' second block is partial
    (("songs", "videos", "live"), 9, 3, 2, [1, 0, 1], None),  # fewer modules than slots: one empty
    (("songs", "videos", "live"), 9, 3, 2, [2, 1, 2], (0.5, 1.0, 0.7)),  # weights not sorted
    (("songs", "videos", "live"), 7, 3, 3, [2, 2, 2], None),  # partial blocks everywhere
    (("songs", "audio"), 10, 4, 2, [3, 3], (1.0, 0.9, 0.6, 0.6)),  # ties in slot weights
]


@pytest.mark.parametrize("cats, n_items, n_slots, k, mpc, slot_exam", ORACLE_CASES)
def test_oracle_matches_brute_force(seed: int, cats, n_items, n_slots, k, mpc, slot_exam) -> None:
    w = make_world(n_users=15, n_items=n_items, seed=seed, categories=cats, n_slots=n_slots,
                   items_per_module=k, slot_examination=slot_exam)
    pages, values = w.oracle_batch(np.arange(w.n_users), np.array(mpc))
    for u in range(w.n_users):
        best = brute_force_oracle(w, u, mpc)
        page, value = w.oracle(u, np.array(mpc))
        assert value == pytest.approx(best, rel=1e-9, abs=1e-12)
        assert w.expected_reward(u, page) == pytest.approx(value, rel=1e-9, abs=1e-12)
        np.testing.assert_array_equal(pages[u], page)
        assert values[u] == pytest.approx(value, rel=1e-12, abs=1e-12)
        # the page obeys the block rule: rebuild it from its slots' categories
        used = [0] * w.n_categories
        for s in range(n_slots):
            shown = page[s][page[s] >= 0]
            if shown.size == 0:
                assert (page[s] == -1).all()
                continue
            c = int(w.item_category[shown[0]])
            want = category_order(w, u, c)[used[c] * k:(used[c] + 1) * k]
            used[c] += 1
            assert page[s, :len(want)].tolist() == want and (page[s, len(want):] == -1).all()
        assert all(used[c] <= mpc[c] for c in range(w.n_categories))


def test_oracle_breaks_ties_by_item_index() -> None:
    w = make_world(n_users=3, n_items=30, seed=1, categories=("songs",), n_slots=1, items_per_module=2)
    quality = np.full(w.n_items, -3.0)
    quality[[5, 3, 7]] = [2.0, 1.0, 1.0]
    pop_z, off = w.popularity_z.copy(), w.full_play_offset.copy()
    pop_z[7], off[7] = pop_z[3], off[3]
    tied = dataclasses.replace(w, item_taste=np.zeros_like(w.item_taste), item_quality=quality,
                               popularity_z=pop_z, full_play_offset=off)
    units = tied.expected_units_matrix(np.arange(3))
    assert (units[:, 3] == units[:, 7]).all()  # an exact tie straddling the block boundary
    pages, _ = tied.oracle_batch(np.arange(3), np.array([1]))
    assert (pages[:, 0, :] == [5, 3]).all()


def test_oracle_batch_on_default_world(default_world: World) -> None:
    w = default_world
    users = np.arange(0, w.n_users, 97)
    mpc = w.default_modules_per_category
    pages, values = w.oracle_batch(users, mpc)
    np.testing.assert_allclose(w.expected_reward_batch(users, pages), values, rtol=1e-9)
    rng = np.random.default_rng(0)
    # rearrangement: no permutation of the chosen blocks over the slots is worth more
    for row, u in enumerate(users):
        perm = rng.permutation(w.n_slots)
        assert w.expected_reward(int(u), pages[row][perm]) <= values[row] + 1e-9
    assert pages.shape == (users.size, w.n_slots, w.items_per_module) and (pages >= 0).all()


# ---- the operator config ------------------------------------------------------------------------
def test_default_config_toml_has_documented_shape(default_world: World) -> None:
    w = default_world
    cfg = tomllib.loads(w.default_config_toml())
    assert set(cfg) == {"homepage", "categories", "modules", "events", "tilt", "constraints", "exploration"}
    assert cfg["homepage"] == {"slots": 6, "position_weights": [1.0, 0.8, 0.65, 0.5, 0.4, 0.3],
                               "items_per_module": 10}
    assert [c["name"] for c in cfg["categories"]] == list(CATEGORIES)
    assert [c["value_per_engagement"] for c in cfg["categories"]] == w.category_value.tolist()
    per_cat = {c: [m["id"] for m in cfg["modules"] if m["category"] == c] for c in CATEGORIES}
    assert all(len(v) >= 2 for v in per_cat.values()) and len(per_cat["songs"]) == 3
    assert per_cat["songs"] == ["daily_30", "new_releases", "top_charts"]
    assert len({m["id"] for m in cfg["modules"]}) == len(cfg["modules"])
    assert [len(per_cat[c]) for c in CATEGORIES] == w.default_modules_per_category.tolist()
    assert cfg["events"] == DEFAULT_EVENT_WEIGHTS
    levels = cfg["tilt"]["levels"]
    assert set(cfg["tilt"]) == {"levels", "head_share"} and cfg["tilt"]["head_share"] == 0.8
    assert len(levels) >= 3 and levels[0] == 0.0 and levels == sorted(set(levels))
    assert cfg["constraints"] == [
        {"name": "live_floor", "kind": "category_share", "category": "live", "min": 0.10},
        {"name": "long_tail", "kind": "long_tail_share", "min": 0.25},
    ]
    assert cfg["exploration"] == {"budget": 0.05}
    small = tomllib.loads(make_world(n_users=5, n_items=30, n_slots=3, categories=("songs", "podcasts"))
                          .default_config_toml())
    assert small["homepage"]["slots"] == 3 and len(small["homepage"]["position_weights"]) == 3
    assert [c["name"] for c in small["constraints"]] == ["long_tail"]  # no live category, no live floor
    assert {m["category"] for m in small["modules"]} == {"songs", "podcasts"}


def _greedy_pages(w: World, scores: np.ndarray, mpc: np.ndarray, beta: float, tail: np.ndarray,
                  force_live_first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A value-maximising engine: items by score + beta * tail, block value = category value x mean
    untilted score, the largest blocks in the most examined slots (rearrangement; slot weights fall)."""
    n, K = scores.shape[0], w.items_per_module
    n_r = int(mpc.max())
    value = np.full((n, n_r, w.n_categories), -np.inf)
    items = np.zeros((n, n_r, w.n_categories, K), dtype=np.int64)
    for c in range(w.n_categories):
        cols = np.flatnonzero(w.item_category == c)
        top = np.argsort(-(scores[:, cols] + beta * tail[cols]), axis=1, kind="stable")[:, :mpc[c] * K]
        sc = np.take_along_axis(scores[:, cols], top, axis=1).reshape(n, mpc[c], K)
        value[:, :mpc[c], c] = w.category_value[c] * sc.mean(axis=2)
        items[:, :mpc[c], c] = cols[top].reshape(n, mpc[c], K)
    if force_live_first:
        value[:, 0, w.categories.index("live")] = np.inf
    flat = value.reshape(n, -1)
    pick = np.argsort(-flat, axis=1, kind="stable")[:, :w.n_slots]  # ties keep block order
    pages = items.reshape(n, -1, K)[np.arange(n)[:, None], pick]
    cats = pick % w.n_categories
    return cats, pages


def test_config_floors_bind_for_a_greedy_engine_but_are_feasible(default_world: World,
                                                                 default_units: np.ndarray) -> None:
    w = default_world
    cfg = tomllib.loads(w.default_config_toml())
    live_min = cfg["constraints"][0]["min"]
    tail_min = cfg["constraints"][1]["min"]
    is_tail, tail = reference_long_tail(w.popularity, w.item_category, cfg["tilt"]["head_share"])
    traffic = w.user_activity
    live = w.categories.index("live")
    slot_w = w.slot_examination / w.slot_examination.sum()
    units = default_units
    # the popularity scorer is the best non-personal one (the same scores for every user: one row)
    scorers = {"personalised": (units, traffic), "popularity": ((traffic @ units)[None, :], np.ones(1))}
    mpc = w.default_modules_per_category
    for name, (scores, share) in scorers.items():
        cats, pages = _greedy_pages(w, scores, mpc, 0.0, tail)
        live_share = share @ ((cats == live) @ slot_w)
        tail_share = share @ is_tail[pages].reshape(len(share), -1).mean(axis=1)
        assert live_share < live_min and tail_share < tail_min, (name, live_share, tail_share)
        # feasible: live module first and the strongest tilt meets both floors on traffic
        cats, pages = _greedy_pages(w, scores, mpc, max(cfg["tilt"]["levels"]), tail, force_live_first=True)
        assert share @ ((cats == live) @ slot_w) >= live_min + 0.1, name
        tail_share = share @ is_tail[pages].reshape(len(share), -1).mean(axis=1)
        assert tail_share >= tail_min + 0.05, (name, tail_share)


# ---- argument checks ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"n_users": 0}, ValueError, r"n_users must be >= 1; got 0"),
    ({"n_users": 2.5}, TypeError, r"n_users must be an int; got 2.5"),
    ({"n_items": 3}, ValueError, r"n_items must be >= 4; got 3"),
    ({"seed": -1}, ValueError, r"seed must be >= 0; got -1"),
    ({"conformity": -0.1}, ValueError, r"conformity must be in \[0, inf\); got -0.1"),
    ({"conformity": float("nan")}, ValueError, r"conformity must be a finite number; got nan"),
    ({"n_slots": 0}, ValueError, r"n_slots must be >= 1; got 0"),
    ({"items_per_module": 0}, ValueError, r"items_per_module must be >= 1; got 0"),
    ({"slot_examination": [1.0, 0.5]}, ValueError, r"slot_examination must have n_slots \(6\) entries"),
    ({"n_slots": 2, "slot_examination": [1.0, 1.5]}, ValueError, r"slot_examination\[1\] must be in \(0, 1\]; got 1.5"),
    ({"n_slots": 2, "slot_examination": [1.0, 0.0]}, ValueError, r"slot_examination\[1\] must be in \(0, 1\]; got 0.0"),
    ({"item_examination_decay": 0.0}, ValueError, r"item_examination_decay must be in \(0, 1\]; got 0.0"),
    ({"category_value": [1.0, 2.0]}, ValueError, r"category_value must have one entry per category \(4\)"),
    ({"category_value": [1.0, 2.0, -1.0, 1.0]}, ValueError, r"category_value\[2\] must be in \[0, inf\); got -1.0"),
    ({"category_item_share": [1.0, 0.0, 1.0, 1.0]}, ValueError, r"category_item_share\[1\] must be in \(0, inf\)"),
    ({"categories": ("songs", "songs")}, ValueError, r"categories must be one or more distinct non-empty names"),
    ({"categories": "songs"}, ValueError, r"categories must be a sequence of names"),
    ({"popularity_quality_corr": 1.0}, ValueError, r"popularity_quality_corr must be in \[0, 1\); got 1.0"),
    ({"skip_rate": 1.2}, ValueError, r"skip_rate must be in \[0, 1\]; got 1.2"),
    ({"taste_dim": 0}, ValueError, r"taste_dim must be >= 1; got 0"),
])
def test_make_world_rejects_invalid_arguments(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        make_world(**{"n_users": 5, "n_items": 20, **kwargs})


def test_methods_reject_invalid_arguments() -> None:
    w = make_world(n_users=5, n_items=20, n_slots=2, items_per_module=3)
    page = np.zeros((2, 3), dtype=np.int64)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"user_idx must be in \[0, 5\); got 5"):
        w.expected_reward(5, page)
    with pytest.raises(TypeError, match=r"user_idx must be an int; got 1.0"):
        w.expected_reward(1.0, page)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"slot_items must have shape \(2, 3\); got \(3, 2\)"):
        w.expected_reward(0, page.T)
    bad = page.copy()
    bad[0, 0] = -2
    with pytest.raises(ValueError, match=r"slot_items must be in \[-1, 20\); got values in \[-2, 0\]"):
        w.expected_reward(0, bad)
    with pytest.raises(ValueError, match=r"slot_items must hold integer item indices"):
        w.expected_reward(0, page.astype(float))
    with pytest.raises(ValueError, match=r"slot_items must have one page per user \(2\); got 1"):
        w.expected_reward_batch(np.array([0, 1]), page[None])
    with pytest.raises(ValueError, match=r"user_idx must be a 1-d integer array; got shape \(\)"):
        w.expected_reward_batch(np.int64(0), page[None])
    with pytest.raises(ValueError, match=r"item_idx must be in \[0, 20\); got values in \[0, 20\]"):
        w.event_probs([0, 1], [0, 20])
    with pytest.raises(ValueError, match=r"must broadcast to one shape"):
        w.event_probs([0, 1], [0, 1, 2])
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator"):
        w.sample_feedback(0, page, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"rng must be a numpy.random.Generator"):
        w.sample_users(3, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"n must be >= 0; got -1"):
        w.sample_users(-1, rng)
    with pytest.raises(ValueError, match=r"modules_per_category must be 4 integers"):
        w.oracle(0, np.array([1, 1]))
    with pytest.raises(ValueError, match=r"modules_per_category must be >= 0"):
        w.oracle(0, np.array([1, -1, 1, 1]))


def test_exposure_log_pairs_every_event_with_an_impression(seed):
    from simulator import exposure_log

    world = make_world(n_users=30, n_items=200, seed=seed)
    imp, ev = exposure_log(world, 150, np.random.default_rng(seed))
    seen = set(zip(imp["decision"].tolist(), imp["item"].tolist(), strict=True))
    assert len(seen) == imp["item"].size  # one impression per examined (request, item)
    assert all((d, i) in seen for d, i in zip(ev["decision"].tolist(), ev["item"].tolist(), strict=True))
    assert ev["type"].min() >= 0 and ev["type"].max() < len(EVENT_TYPES)
    assert (ev["ts"] > imp["ts"].min()).all() and np.array_equal(imp["user"], imp["user"].astype(int))
