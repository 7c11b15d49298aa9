"""Each item's own rate, measured on the log: what it earns per examined impression from an average user
(against a loop over the impressions, and against the simulator's truth), carried by the plan, and used
by serving to order and price the head of each category."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from scipy.stats import spearmanr

from allocator import parse_config_text
from policy_api import jobs, registry
from policy_api import log as store
from policy_api.engine import (
    ITEM_LIFT_PRIOR,
    DecisionEngine,
    LiveSignals,
    build_state,
    curve_rate,
    item_lift,
    item_lift_of,
    load_state,
    with_item_lift,
)
from policy_api.jobs import item_rates
from simulator import make_world
from tests.test_common import world_catalog, world_database


def _brute_curve(x, units, exposure, prior, knots):
    """A category's knots by plain loops: measured items sorted by x, cut into equal-count bins."""
    rows = sorted((x[i], units[i], exposure[i]) for i in range(len(x)) if exposure[i] > 0)
    if not rows:
        return [0.0], [0.0]
    n_bins = min(knots, max(1, len(rows) // 10))
    edges = [round(b * len(rows) / n_bins) for b in range(n_bins + 1)]
    kx, ky = [], []
    for b in range(n_bins):
        sw = sx = sy = 0.0
        for xi, yi, ai in rows[edges[b]:edges[b + 1]]:
            w = ai / (ai + prior)
            sw, sx, sy = sw + w, sx + w * xi, sy + w * yi / ai
        if sw > 0 and (not kx or sx / sw > kx[-1]):
            kx.append(sx / sw)
            ky.append(sy / sw)
    return kx, ky


def _brute(user, request, item, units, impression, x, category, user_prior, item_prior, iterations, knots):
    """item_rates by a plain loop over the impressions."""
    n_items = len(x)
    ok = [0 <= item[k] < n_items and category[item[k]] >= 0 for k in range(len(user))]
    pair: dict[tuple[int, int], float] = {}
    for k in range(len(user)):
        if ok[k] and not impression[k]:
            pair[(request[k], item[k])] = pair.get((request[k], item[k]), 0.0) + max(units[k], 0.0)
    imps = [(user[k], item[k], int(category[item[k]]), pair.get((request[k], item[k]), 0.0))
            for k in range(len(user)) if ok[k] and impression[k]]
    items = sorted({i for _, i, _, _ in imps})
    C = max(category) + 1
    y = {i: 0.0 for i in items}
    for _, i, _, v in imps:
        y[i] += v
    a: dict[tuple[int, int], float] = {}
    exposure = {i: float(sum(1 for _, j, _, _ in imps if j == i)) for i in items}
    for _ in range(iterations):
        curves = []
        for c in range(C):
            mine = [i for i in items if category[i] == c]
            curves.append(_brute_curve([x[i] for i in mine], [y[i] for i in mine], [exposure[i] for i in mine],
                                       item_prior, jobs.CURVE_KNOTS))
        rate = {}
        for i in items:
            kx, ky = curves[int(category[i])]
            f = float(curve_rate(np.array([x[i]]), np.array(kx), np.array(ky))[0])
            rate[i] = (y[i] + item_prior * f) / (exposure[i] + item_prior)
        keys = sorted({(u, c) for u, _, c, _ in imps})
        for key in keys:
            yy = sum(v for u, i, c, v in imps if (u, c) == key)
            ee = sum(rate[i] for u, i, c, _ in imps if (u, c) == key)
            nn = sum(1 for u, _, c, _ in imps if (u, c) == key)
            per = ee / nn
            a[key] = (yy + user_prior * per) / (ee + user_prior * per) if ee > 0 else 1.0
        for c in range(C):
            on = [a[(u, cc)] for u, _, cc, _ in imps if cc == c]
            level = sum(on) / len(on) if on else 1.0
            for key in keys:
                if key[1] == c and level > 0:
                    a[key] /= level
        exposure = {i: sum(a[(u, c)] for u, j, c, _ in imps if j == i) for i in items}
    return items, [y[i] for i in items], [exposure[i] for i in items], curves


def test_item_rates_equal_a_loop_over_the_impressions():
    rng = np.random.default_rng(7)
    n_items, C, n_req = 60, 2, 150
    category = rng.integers(-1, C, size=n_items)
    x = np.log1p(rng.pareto(1.0, size=n_items) * 100)
    quality = rng.random(n_items)
    rows = []
    for r in range(n_req):
        u = int(rng.integers(0, 15))
        for i in rng.choice(n_items + 1, size=8, replace=False):
            i = int(i) if i < n_items else -1
            rows.append((u, r, i, 0.0, True))
            if i >= 0 and rng.random() < quality[i] * (0.5 + u / 30):
                rows.append((u, r, i, 1.0, False))
                if rng.random() < 0.3:
                    rows.append((u, r, i, 4.0, False))
            elif rng.random() < 0.2:
                rows.append((u, r, i, -0.5, False))  # a skip: not a positive unit
    rows = [rows[k] for k in rng.permutation(len(rows))]
    user, request, item, units, impression = (np.array(c) for c in zip(*rows, strict=True))
    got = item_rates(user, request, item, units, impression, x, category, user_prior=5.0, item_prior=20.0,
                     iterations=3)
    items, y, exposure, curves = _brute(user.tolist(), request.tolist(), item.tolist(), units.tolist(),
                                        impression.tolist(), x.tolist(), category.tolist(), 5.0, 20.0, 3, jobs.CURVE_KNOTS)
    assert got.items.tolist() == items
    np.testing.assert_allclose(got.units, y, rtol=1e-12)
    np.testing.assert_allclose(got.exposure, exposure, rtol=1e-10)
    for c in range(C):
        np.testing.assert_allclose(got.curve[c][0], curves[c][0], rtol=1e-12)
        np.testing.assert_allclose(got.curve[c][1], curves[c][1], rtol=1e-10)


def test_the_users_factors_undo_who_an_item_was_shown_to():
    """Two items of equal quality: one shown to everyone, the other only to the category's fans (who
    engage three times as much). Per impression the second looks 2.5 times better; with the users'
    factors the two come out equal."""
    rng = np.random.default_rng(0)
    rows = []
    fan = np.arange(200) < 50
    r = 0
    for _ in range(40):
        for u in range(200):
            shown = [0, 1] if fan[u] else [0]
            for i in shown:
                rows.append((u, r, i, 0.0, True))
                if rng.random() < (0.6 if fan[u] else 0.2):
                    rows.append((u, r, i, 1.0, False))
            r += 1
    user, request, item, units, impression = (np.array(c) for c in zip(*rows, strict=True))
    x, category = np.array([5.0, 5.0]), np.zeros(2, dtype=np.int64)
    raw = item_rates(user, request, item, units, impression, x, category, user_prior=1e12, item_prior=1e-9)
    naive = raw.units / raw.exposure
    assert naive[1] / naive[0] == pytest.approx(0.6 / 0.3, rel=0.1)  # 0.6 against 0.25 * 0.6 + 0.75 * 0.2
    got = item_rates(user, request, item, units, impression, x, category, user_prior=1.0, item_prior=1e-9,
                     iterations=30)
    rate = got.units / got.exposure
    assert rate[1] / rate[0] == pytest.approx(1.0, abs=0.05)
    # the default prior (20 impressions a user, against 40-80 here) takes away most of the difference
    dflt = item_rates(user, request, item, units, impression, x, category, item_prior=1e-9)
    rate = dflt.units / dflt.exposure
    assert rate[1] / rate[0] - 1.0 < 0.25 * (naive[1] / naive[0] - 1.0)


def test_measured_rates_find_the_better_head_items_of_a_simulated_world():
    """From an exposure log of popularity-ordered pages with random items mixed in, the items the rates
    put first in each category's head earn more, by the simulator's truth, than the most popular ones,
    and the rates rank the measured items closer to the truth than popularity does."""
    world = make_world(n_users=400, n_items=600, seed=4)
    rng = np.random.default_rng(1)
    n_req, S, K = 1500, world.n_slots, world.items_per_module
    users = world.sample_users(n_req, rng)
    pages = np.full((n_req, S, K), -1, dtype=np.int64)
    by_cat = [np.flatnonzero(world.item_category == c) for c in range(world.n_categories)]
    by_cat = [c[np.argsort(-world.popularity[c])] for c in by_cat]
    for r in range(n_req):  # each slot: a category's 40 most popular items, 10 drawn at random
        for s in range(S):
            head = by_cat[(r + s) % world.n_categories][:40]
            pages[r, s] = rng.choice(head, size=K, replace=False)
    fb = world.sample_feedback_batch(users, pages, rng)
    units = np.array([world.event_weights.get(e, 0.0) for e in fb.event])
    x = np.log1p(world.popularity)
    got = item_rates(users[fb.row], fb.row, fb.item_idx, np.where(fb.event == "impression", 0.0, units),
                     fb.event == "impression", x, world.item_category)
    rate = got.rates(x, world.item_category)
    truth = np.zeros(world.n_items)
    weight = world.user_activity / world.user_activity.sum()
    truth = weight @ world.expected_units_matrix(np.arange(world.n_users))
    seen = got.items[got.impressions >= 30]
    assert seen.size > 60
    assert spearmanr(rate[seen], truth[seen])[0] > spearmanr(world.popularity[seen], truth[seen])[0] + 0.1
    better = 0
    for c in range(world.n_categories):
        head = by_cat[c][:40]
        mine = truth[head[np.argsort(-rate[head])[:10]]].mean()
        popular = truth[head[:10]].mean()
        better += mine > popular
    assert better == world.n_categories


def test_item_lift_is_the_rate_over_the_score_each_group_averaging_one():
    names = ("a", "b")
    index = {"h1": 0, "h2": 1, "h3": 2, "t1": 3, "b1": 4, "t2": 5, "t3": 6}
    cat = np.array([0, 0, 0, 0, 1, 0, 0])
    is_tail = np.array([False, False, False, True, False, True, True])
    pop = np.array([1000.0, 100.0, 10.0, 1.0, 50.0, 2.0, 3.0])
    score = np.array([1.0, 0.8, 0.6, 0.2, 0.5, 0.3, 0.25])
    kx, ky = [np.log1p(10.0), np.log1p(1000.0)], [0.1, 0.5]
    rates = {"a": {"items": {"ids": ["h1", "h2", "zz", "t1", "t2"], "units": [20.0, 60.0, 5.0, 90.0, 10.0],
                             "exposure": [100.0, 100.0, 10.0, 100.0, 300.0], "curve": {"x": kx, "rate": ky},
                             "scale": [0.5, 2.0]}},
             "b": {"head": [1.0, 2.0]}}  # no item rates for b
    got = item_lift_of(rates, names, index, cat, is_tail, pop, score, prior=50.0)
    assert got is not None
    f = curve_rate(np.log1p(pop), np.array(kx), np.array(ky))
    # h3 and t3 never shown: their curve's rate
    r = np.array([(20.0 + 50 * f[0]) / 150.0, (60.0 + 50 * f[1]) / 150.0, f[2]])
    raw = r / (0.5 * score[:3])
    level = (100.0 * raw[0] + 100.0 * raw[1]) / 200.0  # the head's measured items, by exposure
    np.testing.assert_allclose(got[:3], np.clip(raw / level, 0.25, 4.0), rtol=1e-12)
    # the long tail on its own scale (2.0), averaging 1 over its own measured items t1 and t2
    rt = np.array([(90.0 + 50 * f[3]) / 150.0, (10.0 + 50 * f[5]) / 350.0, f[6]])
    raw_t = rt / (2.0 * score[[3, 5, 6]])
    level_t = (100.0 * raw_t[0] + 300.0 * raw_t[1]) / 400.0
    np.testing.assert_allclose(got[[3, 5, 6]], np.clip(raw_t / level_t, 0.25, 4.0), rtol=1e-12)
    assert got[3] > 1.0 > got[5]  # t1 earned 0.9 per impression, t2 0.03: t1 first among the tail
    assert got[4] == 1.0  # a category without item rates
    # a tail with no measured item keeps its scores
    head_only = {"a": {"items": {k: v[:3] if isinstance(v, list) else v for k, v in rates["a"]["items"].items()}}}
    got = item_lift_of(head_only, names, index, cat, is_tail, pop, score, prior=50.0)
    assert got is not None and got[[3, 5, 6]].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(got[:3], np.clip(raw / level, 0.25, 4.0), rtol=1e-12)
    # bounded: an item earns at most 4 times, at least a quarter of, what its score says
    big = {"a": {"items": {**rates["a"]["items"], "units": [0.0, 6000.0, 5.0, 90.0, 10.0],
                           "exposure": [1000.0, 100.0, 10.0, 100.0, 300.0]}}}
    got = item_lift_of(big, names, index, cat, is_tail, pop, score, prior=50.0)
    r = np.array([(0.0 + 50 * f[0]) / 1050.0, (6000.0 + 50 * f[1]) / 150.0, f[2]])
    raw = r / (0.5 * score[:3])
    level = (1000.0 * raw[0] + 100.0 * raw[1]) / 1100.0
    assert raw[1] / level > 4.0 and raw[0] / level < 0.25  # beyond the bounds either way
    assert got is not None and got[:3].tolist() == pytest.approx(np.clip(raw / level, 0.25, 4.0).tolist())
    assert got[0] == 0.25 and got[1] == 4.0
    assert item_lift_of({"a": {"head": [1.0, 2.0]}}, names, index, cat, is_tail, pop, score) is None


def test_serving_multiplies_the_scores_by_the_lift_and_orders_each_pool_by_lifted_value(world_state):
    _, _, _, state = world_state
    rng = np.random.default_rng(3)
    lift = np.where(state.is_tail, 1.0, np.exp(rng.normal(0.0, 0.7, size=state.item_category.size)))
    st = with_item_lift(replace(state, item_lift=lift), lift)
    engine, plain = DecisionEngine(st), DecisionEngine(state)
    C = len(st.config.categories)
    pool = plain.pool(state, np.random.default_rng(0))
    cold = LiveSignals("hit", np.zeros(C), np.zeros(0, dtype=np.int64))
    base, _ = plain.item_scores(state, -1, pool, cold)
    got, _ = engine.item_scores(st, -1, pool, cold)
    np.testing.assert_allclose(got, base * lift[pool], rtol=1e-12)
    items = np.flatnonzero(st.item_category >= 0)
    value = np.zeros(st.item_category.size)
    value[items] = st.scorer.score(-1, items) * lift[items] * st.score_multiplier[items] if st.score_multiplier is not None \
        else st.scorer.score(-1, items) * lift[items]
    for c, order in enumerate(st.by_category):
        assert sorted(order.tolist()) == sorted(state.by_category[c].tolist())
        assert (np.diff(value[order]) <= 1e-15).all()  # best lifted value first
        head = order[: st.head_quota[c]]
        want_head = state.by_category[c][np.argsort(-value[state.by_category[c]], kind="stable")][: st.head_quota[c]]
        assert set(head.tolist()) == set(want_head.tolist())
        rest = order[st.head_quota[c]:]
        assert st.tail_lead[c].tolist() == rest[st.is_tail[rest]][: st.rest_quota[c] // 2].tolist()
        # the draw starts with the category's best long-tail items outside the head
        drawn = engine.pool(st, np.random.default_rng(9))
        assert set(st.tail_lead[c].tolist()) <= set(drawn.tolist())
    # taking the lifts off (a plan without item rates, a new scorer) brings back the popularity order
    off = with_item_lift(st, None)
    assert off.item_lift is None and off.tail_lead == ()
    assert all(a.tolist() == b.tolist() for a, b in zip(off.by_category, state.by_category, strict=True))
    assert off.category_rank is not None and state.category_rank is not None
    assert off.category_rank.tolist() == state.category_rank.tolist()
    # a second set of lifts orders from the popularity order, not from the first lifts' order
    again = with_item_lift(replace(st, item_lift=lift), lift)
    assert all(a.tolist() == b.tolist() for a, b in zip(again.by_category, st.by_category, strict=True))
    # the pool against a plain reference: per category its head, then the user's liked items outside
    # it, then the category's best long-tail items, then the seeded draw's other items (the same draw)
    liked = np.array([st.by_category[0][-1], st.by_category[1][-3]], dtype=np.int64)
    for recent in (None, liked):
        got = engine.pool(st, np.random.default_rng(11), recent)
        rng_ref = np.random.default_rng(11)
        want = []
        for c, items in enumerate(st.by_category):
            h, r = int(st.head_quota[c]), int(st.rest_quota[c])
            want += items[:h].tolist()
            drawn = items[h + np.sort(rng_ref.choice(items.size - h, size=r, replace=False))].tolist()
            own = [] if recent is None else [i for i in recent.tolist() if st.item_category[i] == c][:r]
            lead = (own + [i for i in st.tail_lead[c].tolist() if i not in own])[:r]
            want += lead + [i for i in drawn if i not in lead][: r - len(lead)]
        assert got.tolist() == want


@pytest.mark.parametrize("short_modules", [False, True], ids=["10 items a module", "6 items a module"])
def test_the_plan_carries_item_rates_measured_on_the_log_and_serving_uses_them(tmp_path, world_state, short_modules):
    """With modules of 6 items, a category of two modules never shows 20 head items often: it needs
    12 well-measured ones, and one carries its rates with fewer than 20 (checked below)."""
    world, cfg, cat, _ = world_state
    if short_modules:
        world = make_world(n_users=60, n_items=600, seed=2, items_per_module=6)
        cfg = parse_config_text(world.default_config_toml())
        cat = world_catalog(world)
    eng = world_database(tmp_path / "h.db", world, cat)
    engine = DecisionEngine(build_state(cfg, cat))
    rng = np.random.default_rng(5)
    t0 = datetime.now(tz=UTC) - timedelta(minutes=30)
    decisions, rows = [], []
    index = cat.index_of()
    for r in range(1200):
        user = f"u{r % 20}"
        d = engine.decide(user, f"r{r}")
        decisions.append(d.row())
        ts = t0 + timedelta(seconds=5 * r)
        slot_items = np.array([[index[it["item_id"]] for it in m["items"]] for m in d.modules])
        fb = world.sample_feedback(r % 20, slot_items, rng)
        for k, (s, i, e) in enumerate(fb):
            rows.append({"event_id": f"r{r}:{k}", "request_id": f"r{r}", "slot": int(s),
                         "item_id": str(world.item_ids[i]), "type": str(e), "value": None, "ts": ts, "received_at": ts})
    store.insert_decisions(eng, decisions)
    store.insert_feedback(eng, rows)
    # the same rates from the rows as written (users by their id, requests in order)
    names = cfg.category_names
    item_cat = cat.category_index(names)
    users = {d["request_id"]: int(d["user_id"][1:]) for d in decisions}
    want = item_rates(np.array([users[x["request_id"]] for x in rows]), np.array([int(x["request_id"][1:]) for x in rows]),
                      np.array([index[x["item_id"]] for x in rows]),
                      np.array([0.0 if x["type"] == "impression" else cfg.events[x["type"]] for x in rows]),
                      np.array([x["type"] == "impression" for x in rows]), np.log1p(cat.popularity), item_cat)
    res = jobs.plan(eng, users=20)
    plan = registry.latest_plan(eng, registry.require_active_config(eng).version)
    assert plan is not None and plan.version == res.plan_version
    cal = plan.solver["calibration"]
    assert isinstance(plan.solver.get("feedback_seen"), int) and plan.solver["feedback_seen"] >= len(rows)
    is_tail = load_state(eng).is_tail
    well = np.bincount(item_cat[want.items], weights=~is_tail[want.items] & (want.impressions >= ITEM_LIFT_PRIOR),
                       minlength=len(names))
    # a category needs MIN_MEASURED_ITEMS of them, or as many as its modules show at once if fewer
    need = [min(jobs.MIN_MEASURED_ITEMS, sum(m.category == c for m in cfg.modules) * cfg.items_per_module)
            for c in names]
    assert (well >= need).any()
    if short_modules:  # a category with its rates that the fixed count of 20 would have kept waiting
        assert any(need[k] <= well[k] < jobs.MIN_MEASURED_ITEMS for k in range(len(names)))
    for k, c in enumerate(names):
        if well[k] < need[k]:  # too few well-measured head items: no rates yet
            assert "items" not in cal[c]
            continue
        got = cal[c]["items"]
        mine = item_cat[want.items] == k
        assert sorted(got["ids"]) == sorted(str(cat.item_ids[i]) for i in want.items[mine])
        order = {i: j for j, i in enumerate(got["ids"])}
        at = [order[str(cat.item_ids[i])] for i in want.items[mine]]
        np.testing.assert_allclose(np.array(got["units"])[at], want.units[mine], rtol=1e-9)
        np.testing.assert_allclose(np.array(got["exposure"])[at], want.exposure[mine], rtol=1e-9)
        np.testing.assert_allclose(got["curve"]["rate"], want.curve[k][1], rtol=1e-9)
    served = load_state(eng)
    assert served.item_lift is not None
    np.testing.assert_allclose(served.item_lift, item_lift(cal, served), rtol=1e-12)
    # both the head's and the long tail's measured items move within their group
    assert np.ptp(served.item_lift[served.is_tail]) > 0.1 and np.ptp(served.item_lift[~served.is_tail]) > 0.1
    # the lifts reorder the head of the categories' pools away from the popularity order
    moved = 0
    for c, order in enumerate(served.by_category):
        mine = np.flatnonzero(item_cat == c)
        popular = mine[np.argsort(-cat.popularity[mine], kind="stable")]
        moved += order[: served.head_quota[c]].tolist() != popular[: served.head_quota[c]].tolist()
    assert moved > 0


def test_a_new_items_lift_has_no_ceiling_and_leaves_its_groups_level_alone():
    """An item loaded after serving began (``uncapped``): its catalog popularity, and so its score, says
    nothing of it, so its measured rate lifts it as far as it goes (a new release that earns like the head
    of the tail rises there), and it does not count toward its group's level (the others' lifts are what
    they would be without it measured)."""
    names = ("a",)
    index = {"h1": 0, "t1": 1, "t2": 2, "new": 3}
    cat = np.zeros(4, dtype=np.int64)
    is_tail = np.array([False, True, True, True])
    pop = np.array([1000.0, 5.0, 4.0, 0.0])
    score = np.array([1.0, 0.3, 0.25, 0.01])
    kx, ky = [np.log1p(1.0), np.log1p(1000.0)], [0.1, 0.5]
    block = {"ids": ["h1", "t1", "t2", "new"], "units": [50.0, 30.0, 20.0, 80.0],
             "exposure": [100.0, 100.0, 100.0, 100.0], "curve": {"x": kx, "rate": ky}, "scale": [1.0, 1.0]}
    f = curve_rate(np.log1p(pop), np.array(kx), np.array(ky))
    rate = (np.array(block["units"]) + 50.0 * f) / 150.0
    raw = rate / score
    capped = item_lift_of({"a": {"items": block}}, names, index, cat, is_tail, pop, score, prior=50.0)
    free = item_lift_of({"a": {"items": block}}, names, index, cat, is_tail, pop, score, prior=50.0,
                        uncapped=np.array([3]))
    assert capped is not None and free is not None
    level_all = raw[1:].mean()  # equal exposures: the tail's level is the plain mean
    np.testing.assert_allclose(capped[1:], np.clip(raw[1:] / level_all, 0.25, 4.0), rtol=1e-12)
    assert capped[3] <= 4.0 and capped[1] < free[1]  # counted, it drags its group's lifts down
    level = raw[1:3].mean()  # without the new item
    np.testing.assert_allclose(free[1:3], np.clip(raw[1:3] / level, 0.25, 4.0), rtol=1e-12)
    np.testing.assert_allclose(free[3], raw[3] / level, rtol=1e-12)
    assert free[3] > 20.0 and free[3] * score[3] > free[1] * score[1]  # above the tail's best: where it earns
    assert free[0] == capped[0] == 1.0  # the head alone in its group
