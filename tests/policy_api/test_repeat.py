"""The repeat lift: what an item earns when shown again to a user who engaged with it before, measured
from the log (against a loop over the events), carried by the plan, and used by serving."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from policy_api import jobs, registry
from policy_api import log as store
from policy_api.engine import (
    DecisionEngine,
    LiveSignals,
    build_state,
    catalog_long_tail,
    load_state,
    repeat_lift,
)
from policy_api.jobs import repeat_rates
from tests.test_common import world_database


def _brute(user, request, item, ts, units, impression, weight, item_category, is_tail, C, prior=10.0):
    """The same figures by a plain loop over the events."""
    n = len(user)
    ok = [0 <= item[k] < item_category.size and item_category[item[k]] >= 0 for k in range(n)]
    pair_units: dict[tuple[int, int], float] = {}
    for k in range(n):
        if ok[k] and not impression[k]:
            pair_units[(request[k], item[k])] = pair_units.get((request[k], item[k]), 0.0) + units[k]
    first: dict[tuple[int, int], tuple[float, int]] = {}
    for k in sorted((k for k in range(n) if ok[k] and not impression[k] and units[k] > 0), key=lambda k: ts[k]):
        first.setdefault((user[k], item[k]), (ts[k], request[k]))
    imps = [k for k in range(n) if ok[k] and impression[k]]

    def is_repeat(k):
        f = first.get((user[k], item[k]))
        return f is not None and f[0] < ts[k] and f[1] != request[k]

    g_units: dict[int, float] = {}
    g_imps: dict[int, float] = {}
    i_units: dict[int, float] = {}
    i_imps: dict[int, float] = {}
    for k in imps:
        if is_repeat(k):
            continue
        g = int(item_category[item[k]]) * 2 + int(is_tail[item[k]])
        got = pair_units.get((request[k], item[k]), 0.0)
        g_units[g] = g_units.get(g, 0.0) + got
        g_imps[g] = g_imps.get(g, 0.0) + weight[k]
        i_units[item[k]] = i_units.get(item[k], 0.0) + got
        i_imps[item[k]] = i_imps.get(item[k], 0.0) + weight[k]
    out = np.zeros((C, 3))
    for k in imps:
        if not is_repeat(k):
            continue
        i = item[k]
        g = int(item_category[i]) * 2 + int(is_tail[i])
        g_rate = g_units.get(g, 0.0) / g_imps[g] if g_imps.get(g, 0.0) > 0 else 0.0
        rate = (i_units.get(i, 0.0) + prior * g_rate) / (i_imps.get(i, 0.0) + prior)
        c = int(item_category[i])
        out[c] += [pair_units.get((request[k], i), 0.0), weight[k] * rate, weight[k]]
    return out


def test_repeat_rates_equal_a_loop_over_the_events():
    rng = np.random.default_rng(3)
    n_items, C, n_req = 40, 3, 300
    item_category = rng.integers(-1, C, size=n_items)
    is_tail = rng.random(n_items) < 0.4
    req_user = rng.integers(0, 12, size=n_req)
    req_ts = np.sort(rng.random(n_req)) * 1e4
    rows = []
    for r in range(n_req):  # each request: a few impressions, some engaged with (+ an unknown item)
        shown = rng.choice(n_items + 2, size=6, replace=False)
        for slot, i in enumerate(shown):
            rows.append((r, i if i < n_items else -1, 0.0, True, 1.0 + 0.1 * slot))
            u = rng.random()
            if u < 0.35:
                rows.append((r, i if i < n_items else -1, 1.0, False, 0.0))
                if u < 0.1:
                    rows.append((r, i if i < n_items else -1, 3.0, False, 0.0))
            elif u < 0.5:
                rows.append((r, i if i < n_items else -1, -0.5, False, 0.0))
    rows = [rows[k] for k in rng.permutation(len(rows))]  # any arrival order
    request = np.array([x[0] for x in rows])
    user, ts = req_user[request], req_ts[request]
    item = np.array([x[1] for x in rows])
    units = np.array([x[2] for x in rows])
    impression = np.array([x[3] for x in rows])
    weight = np.array([x[4] for x in rows])
    got = repeat_rates(user, request, item, ts, units, impression, weight, item_category, is_tail, C)
    want = _brute(user.tolist(), request.tolist(), item.tolist(), ts.tolist(), units.tolist(), impression.tolist(),
                  weight.tolist(), item_category, is_tail, C)
    assert want[:, 2].sum() > 20  # the draw has repeats to measure
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_repeat_lift_is_shrunk_toward_one_and_bounded():
    names = ("a", "b", "c", "d")
    rates = {"a": {"repeat": [30.0, 10.0, 100.0]},  # 3x what the items earn elsewhere, 100 impressions
             "b": {"repeat": [1.0, 10.0, 100.0]},
             "c": {"repeat": [5.0, -2.0, 50.0]},  # the items' expectation is negative: no lift
             "d": {"repeat": [0.0, 0.0, 0.0]}}
    got = repeat_lift(rates, names, prior=100.0)
    e = 10.0 / 100.0
    assert got is not None
    assert got.tolist() == pytest.approx([(30 + 100 * e) / (10 + 100 * e), (1 + 100 * e) / (10 + 100 * e), 1.0, 1.0])
    assert repeat_lift({"a": {"repeat": [1e6, 1.0, 1e6]}}, ("a",), prior=1.0).tolist() == [10.0]
    assert repeat_lift({"a": {"head": [1.0, 2.0]}}, ("a",)) is None  # an older plan: nothing measured


def test_serving_lifts_the_users_recent_positives_and_brings_back_a_liked_tail_item(world_state):
    _, _, _, state = world_state
    C = len(state.config.categories)
    lift = np.array([3.0, 0.5, 1.0, 2.0])[:C]
    st = replace(state, repeat_lift=lift)
    engine = DecisionEngine(st)
    # the user liked a head item of category 0, one of category 1, and a long-tail item of category 0
    # that a request's pool would hold only by chance
    head0, head1 = st.by_category[0][3], st.by_category[1][2]
    tail0 = st.by_category[0][-1]
    assert st.is_tail[tail0] and not st.is_tail[head0]
    positives = np.array([tail0, head0, head1], dtype=np.int64)
    live = LiveSignals("hit", np.zeros(C), np.zeros(0, dtype=np.int64), positives=positives,
                       positive_types=np.zeros(3, dtype=np.int64))
    rng = np.random.default_rng(0)
    pool = engine.pool(st, rng, positives)
    assert tail0 in pool and np.unique(pool).size == pool.size
    assert pool.size == engine.pool(st, np.random.default_rng(0)).size  # the same pool size per category
    base, _ = engine.item_scores(st, -1, pool, LiveSignals("hit", np.zeros(C), np.zeros(0, dtype=np.int64)))
    got, _ = engine.item_scores(st, -1, pool, live)
    cat = st.item_category[pool]
    want = np.where(np.isin(pool, positives), base * lift[np.maximum(cat, 0)], base)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # without a measured lift, neither the pool nor the scores change
    plain = DecisionEngine(state)
    assert np.array_equal(plain.pool(state, np.random.default_rng(0)), engine.pool(st, np.random.default_rng(0)))
    got0, _ = plain.item_scores(state, -1, pool, live)
    np.testing.assert_allclose(got0, base, rtol=1e-12)


def test_the_plan_carries_the_repeat_lift_measured_on_the_log(database_url, world_state):
    """On both backends: the repeat lift the plan measured (its window sliced from the read of the
    items' longer window) and the one read on its own equal a loop over the rows as written."""
    world, cfg, cat, _ = world_state
    eng = world_database(database_url, world, cat)
    state = build_state(cfg, cat)
    engine = DecisionEngine(state)
    rng = np.random.default_rng(5)
    t0 = datetime.now(tz=UTC) - timedelta(minutes=30)
    decisions, rows = [], []
    plays = ("play", "favorite")
    for r in range(240):
        user = f"u{r % 12}"
        d = engine.decide(user, f"r{r}")
        decisions.append(d.row())
        ts = t0 + timedelta(seconds=5 * r)
        for s, m in enumerate(d.modules):
            for j, it in enumerate(m["items"][:4]):
                k = len(rows)
                rows.append({"event_id": f"e{k}", "request_id": f"r{r}", "slot": s, "item_id": it["item_id"],
                             "type": "impression", "value": None, "ts": ts, "received_at": ts})
                if rng.random() < 0.3:
                    rows.append({"event_id": f"e{k}p", "request_id": f"r{r}", "slot": s, "item_id": it["item_id"],
                                 "type": plays[j % 2], "value": None, "ts": ts, "received_at": ts})
    store.insert_decisions(eng, decisions)
    store.insert_feedback(eng, rows)
    # the same figures from the rows as written
    index = cat.index_of()
    users = {d["request_id"]: int(d["user_id"][1:]) for d in decisions}
    pw = np.ones(cfg.slots)  # viewed impressions (the default): one examined impression each
    assert cfg.impressions == "viewed"
    is_tail, _ = catalog_long_tail(cat, cfg)
    want = _brute([users[x["request_id"]] for x in rows], [int(x["request_id"][1:]) for x in rows],
                  [index[x["item_id"]] for x in rows], [x["ts"].timestamp() for x in rows],
                  [0.0 if x["type"] == "impression" else cfg.events[x["type"]] for x in rows],
                  [x["type"] == "impression" for x in rows], [float(pw[x["slot"]]) for x in rows],
                  cat.category_index(cfg.category_names), is_tail, len(cfg.category_names))
    assert want[:, 2].sum() > 50
    got = jobs.repeat_engagement(eng, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    res = jobs.plan(eng, users=20)
    plan = registry.latest_plan(eng, registry.require_active_config(eng).version)
    assert plan is not None and plan.version == res.plan_version
    cal = plan.solver["calibration"]
    np.testing.assert_allclose([cal[c]["repeat"] for c in cfg.category_names], want, rtol=1e-9)
    served = load_state(eng)
    assert served.repeat_lift is not None
    np.testing.assert_allclose(served.repeat_lift, repeat_lift(cal, cfg.category_names))
    # a calibration window of the newest 40 % of the events: its start falls inside the items' read,
    # and the slice of that read must hold exactly the events at or after it
    n = int(0.4 * len(rows))
    cut = sorted((x["ts"] for x in rows), reverse=True)[n - 1]
    registry.activate_config(eng, world.default_config_toml() + f"\n[loop]\ncalibration_events = {n}\n", author="test")
    recent = [x for x in rows if x["ts"] >= cut]
    assert len(rows) > len(recent) >= n
    want = _brute([users[x["request_id"]] for x in recent], [int(x["request_id"][1:]) for x in recent],
                  [index[x["item_id"]] for x in recent], [x["ts"].timestamp() for x in recent],
                  [0.0 if x["type"] == "impression" else cfg.events[x["type"]] for x in recent],
                  [x["type"] == "impression" for x in recent], [float(pw[x["slot"]]) for x in recent],
                  cat.category_index(cfg.category_names), is_tail, len(cfg.category_names))
    assert want[:, 2].sum() > 10
    active = registry.require_active_config(eng)
    jobs.plan(eng, users=20)
    cal = registry.latest_plan(eng, active.version).solver["calibration"]
    np.testing.assert_allclose([cal[c]["repeat"] for c in cfg.category_names], want, rtol=1e-9)
    np.testing.assert_allclose(jobs.repeat_engagement(eng, active.config), want, rtol=1e-9)
