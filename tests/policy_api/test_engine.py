"""The decision engine in-process: reproducible draws, the exploration budget, the safe default."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from allocator import parse_config_text
from bandits import budget_pmf
from policy_api.engine import DecisionEngine, RequestIds, ScorerHandle, build_state
from policy_api.engine._engine import member
from simulator import make_world
from tests.test_common import world_catalog


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=100, n_items=600, seed=1)


@pytest.fixture(scope="module")
def state(world):
    cfg = parse_config_text(world.default_config_toml())
    cat = world_catalog(world)
    return build_state(cfg, cat, prices=np.array([0.5, 0.3]))


def test_same_request_id_reproduces_the_decision(state):
    eng = DecisionEngine(state)
    ids = RequestIds(b"k")
    for _ in range(5):
        rid = ids.issue()
        a, b = eng.decide("u00003", rid), eng.decide("u00003", rid)
        assert (a.candidates, a.pmf, a.chosen, a.modules) == (b.candidates, b.pmf, b.chosen, b.modules)


def test_exploration_stays_within_budget_and_propensity_is_pmf_of_chosen(state):
    eng = DecisionEngine(state)
    ids = RequestIds(b"k")
    n = 600
    ex = state.config.exploration
    assert ex.temperature > 0
    for k in range(n):
        d = eng.decide(f"u{k % 50:05d}", ids.issue())
        assert d.propensity == pytest.approx(d.pmf[d.chosen])
        assert sum(d.pmf) == pytest.approx(1.0)
        # exploited: the softmax of the logged priced scores at temperature * max |value| (computed here
        # from the log); served: each exploited layout mixed with uniform exploration within the budget
        score = np.array([c["score"] for c in d.candidates])
        value = np.array([c["value"] for c in d.candidates])
        z = np.exp((score - score.max()) / (ex.temperature * np.abs(value).max()))
        q = z / z.sum()
        J = score.size
        ref = sum(q[j] * budget_pmf(np.full(J, 1.0 / J), j, ex.budget) for j in range(J))
        np.testing.assert_allclose(d.pmf, ref, atol=1e-4)  # logged numbers are rounded to 1e-6
        assert 0.5 * np.abs(np.asarray(d.pmf) - q).sum() <= ex.budget + 1e-4


def test_at_temperature_zero_exactly_the_budget_leaves_the_greedy_layout(state):
    cfg = state.config
    eng = DecisionEngine(replace(state, config=replace(cfg, exploration=replace(cfg.exploration, temperature=0.0))))
    n, off = 1500, 0
    budget = cfg.exploration.budget
    for k in range(n):  # fixed request ids: the draws (seeded by the id) are the same on every run
        d = eng.decide(f"u{k % 50:05d}", f"budget-{k}")
        greedy = d.context["greedy"]
        assert 1 - d.pmf[greedy] == pytest.approx(budget, abs=1e-12)
        off += d.chosen != greedy
    se = np.sqrt(budget * (1 - budget) / n)
    assert abs(off / n - budget) <= 3 * se


def test_every_page_respects_the_layout_model(state, world):
    eng = DecisionEngine(state)
    d = eng.decide("u00001", RequestIds(b"k").issue())
    K = state.config.items_per_module
    seen = [it["item_id"] for m in d.modules for it in m["items"]]
    assert len(seen) == len(set(seen)) == K * state.config.slots
    cat_of = dict(zip(world.item_ids.tolist(), (world.categories[c] for c in world.item_category), strict=True))
    for m in d.modules:
        assert {cat_of[it["item_id"]] for it in m["items"]} == {m["category"]}
    # the served candidate's logged exposure matches the page: slot-weighted live share, long-tail share
    chosen = d.candidates[d.chosen]
    w = np.asarray(state.config.position_weights)
    live = sum(w[m["slot"]] for m in d.modules if m["category"] == "live") / w.sum()
    tail = np.mean([it["long_tail"] for m in d.modules for it in m["items"]])
    assert chosen["exposure"] == pytest.approx([live, tail], abs=1e-6)  # logged rounded to 1e-6
    # ... and names the page's modules, categories and tilt (logged columnar, one list per field)
    assert chosen["modules"] == [m["module_id"] for m in d.modules]
    assert chosen["categories"] == [m["category"] for m in d.modules]
    assert chosen["tilt"] == d.modules[0]["tilt"]
    stored = d.row()["candidates"]
    assert stored["$n"] == len(d.pmf) and all(len(v) == len(d.pmf) for k, v in stored.items() if k != "$n")


class Broken:
    def score(self, user_idx, item_idx):
        raise RuntimeError("ranker backend down")


def test_upstream_failure_serves_the_safe_default_marked_as_such(state):
    from dataclasses import replace

    eng = DecisionEngine(replace(state, scorer=ScorerHandle(Broken())))
    d = eng.decide("u1", RequestIds(b"k").issue())
    assert d.fallback and "ranker backend down" in d.fallback_reason
    assert d.propensity == 1.0
    assert [m["module_id"] for m in d.modules] == list(state.config.module_ids[: state.config.slots])
    assert len({it["item_id"] for m in d.modules for it in m["items"]}) == state.config.items_per_module * state.config.slots


def test_request_ids_are_signed():
    a, b = RequestIds(b"one"), RequestIds(b"two")
    rid = a.issue()
    assert a.issued(rid) and not b.issued(rid)
    assert not a.issued(rid[:-1] + ("0" if rid[-1] != "0" else "1"))
    assert not a.issued("garbage") and not a.issued("")


def test_new_categories_get_their_own_exploration_share(world):
    """With `new = true` on a category and `new_category_share = eta`, at least eta of traffic goes to
    layouts showing it, on top of the budget; the logged propensity stays pmf[chosen]."""
    text = world.default_config_toml().replace('name = "audio"\n', 'name = "audio"\nnew = true\n')
    text = text.replace("budget = 0.05", "budget = 0.05\nnew_category_share = 0.2")
    cfg = parse_config_text(text)
    assert cfg.categories[2].new and cfg.exploration.new_category_share == 0.2
    cat = world_catalog(world)
    # a price that pushes the greedy layout away from audio, so the share must come from exploration
    eng = DecisionEngine(build_state(cfg, cat, prices=np.array([0.5, 0.3])))
    n, shown, expected = 1500, 0, 0.0
    for k in range(n):  # fixed request ids: the same draws on every run
        d = eng.decide(f"u{k % 50:05d}", f"new-category-{k}")
        with_audio = np.array(["audio" in c["categories"] for c in d.candidates])
        assert d.propensity == pytest.approx(d.pmf[d.chosen]) and sum(d.pmf) == pytest.approx(1.0)
        if with_audio.any():
            assert float(np.dot(d.pmf, with_audio)) >= 0.2 - 1e-12
        expected += float(np.dot(d.pmf, with_audio))
        shown += any(m["category"] == "audio" for m in d.modules)
    se = np.sqrt(max(expected / n * (1 - expected / n), 1e-9) / n)
    assert abs(shown / n - expected / n) <= 4 * se  # the draws follow the logged pmf


def test_a_category_the_calibration_has_barely_seen_leads_a_layout_on_part_of_the_budget():
    """Six categories, one worth next to nothing (kids): the engine exploits layouts without it. When the
    plan's calibration holds fewer than UNEXPLORED_IMPRESSIONS examined impressions of kids,
    every request offers a layout led by it and sends UNEXPLORED_SHARE of the budget there (the draws
    follow the logged pmf); with enough impressions, or with the budget at 0, it is left alone."""
    from policy_api.engine import UNEXPLORED_IMPRESSIONS, UNEXPLORED_SHARE, with_plan_calibration
    from policy_api.registry import PlanRecord

    cats = ("songs", "videos", "audio", "live", "news", "kids")
    world = make_world(n_users=100, n_items=1200, seed=1, categories=cats, n_slots=5,
                       category_value=(1.0, 1.4, 1.2, 2.0, 0.8, 0.05))
    text = world.default_config_toml()
    text = text[:text.index("[[constraints]]")] if "[[constraints]]" in text else text
    cfg = parse_config_text(text)
    base = build_state(cfg, world_catalog(world), prices=np.zeros(0))

    def engine(kids_impressions: float, budget: float = 0.05) -> DecisionEngine:
        cal = {c: {"head": [100.0, 1000.0], "tail": [50.0, 1000.0], "seen": [1000.0, 1000.0]} for c in cats}
        # the counted impressions carry the catalog's prior: the window saw only "seen" of them
        cal["kids"] = {"head": [1.0, 200.0], "tail": [1.0, 200.0], "seen": [kids_impressions / 2] * 2}
        plan = PlanRecord(version=1, config_version=1, status="active", prices={}, solver={"calibration": cal})
        st = with_plan_calibration(base, plan)
        if budget != cfg.exploration.budget:
            st = replace(st, config=replace(st.config, exploration=replace(st.config.exploration, budget=budget)))
        return DecisionEngine(st)

    def run(eng: DecisionEngine, n: int) -> tuple[float, float, int]:
        led, expected, offered = 0, 0.0, 0
        for k in range(n):
            d = eng.decide(f"u{k % 50:05d}", f"unexplored-{k}")
            first = np.array([c["categories"][0] == "kids" for c in d.candidates])
            offered += int(first.any())
            expected += float(np.dot(d.pmf, first))
            led += d.modules[0]["category"] == "kids"
        return led / n, expected / n, offered

    n = 1200
    led, expected, offered = run(engine(UNEXPLORED_IMPRESSIONS / 4), n)
    assert offered == n and expected >= UNEXPLORED_SHARE * 0.05 - 1e-12
    assert abs(led - expected) <= 4 * np.sqrt(expected * (1 - expected) / n)  # the draws follow the logged pmf
    _, seen, _ = run(engine(UNEXPLORED_IMPRESSIONS * 4), 300)
    assert seen < UNEXPLORED_SHARE * 0.05  # measured enough: only the budget's own share of it
    led, off, _ = run(engine(UNEXPLORED_IMPRESSIONS / 4, budget=0.0), 300)
    assert off < 1e-4 and led == 0.0  # no exploration budget, no exploring (the softmax tail only)


def _with_new_items(world, names_per_category: int = 3, share: float | None = None, days: float | None = None):
    """The world's engine state with the least popular items of songs and live added an hour ago, an
    hour after serving began (and the catalog's other items before it), and those new items."""
    import time

    from policy_api.engine import with_fresh_items, with_plan_calibration

    text = world.default_config_toml()
    if share is not None or days is not None:
        extra = "".join(f"\n{k} = {v}" for k, v in (("new_item_share", share), ("new_item_days", days)) if v is not None)
        text = text.replace("[exploration]", f"[exploration]{extra}")
    cfg = parse_config_text(text)
    cat = world_catalog(world)
    now = time.time()
    added = np.full(cat.n_items, now - 86400.0)
    new = []
    for c in ("songs", "live"):
        rows = np.flatnonzero(cat.category == c)
        new.extend(rows[np.argsort(cat.popularity[rows], kind="stable")[:names_per_category]].tolist())
    added[new] = now - 3600.0
    st = build_state(cfg, replace(cat, added_at=added), prices=np.array([0.5, 0.3]))
    return with_plan_calibration(with_fresh_items(st, now - 7200.0), None), np.array(sorted(new))


def test_new_items_are_shown_in_place_of_a_modules_last_item_of_their_kind(world):
    """Items added after serving began and not yet measured: a served module of their category shows one
    of them with chance ``new_item_share``, in place of its last item of the same kind (with a long-tail
    bound: a long-tail item for a long-tail one, so the page's long-tail exposure is what its layout was
    priced with), never one twice on a page. Without it (share 0) these items, the least popular of their
    categories, are never shown at all."""
    assert _with_new_items(world)[0].config.exploration.new_item_share == 0.5  # the default
    st, new = _with_new_items(world, share=0.3)
    assert st.space.tail_goal and sorted(st.new_items.tolist()) == new.tolist() and st.is_tail[new].all()
    q = st.config.exploration.new_item_share
    ids = st.catalog.id_list()
    new_ids = {ids[i] for i in new}
    cat_of = {ids[i]: str(st.catalog.category[i]) for i in new}
    eng = DecisionEngine(st)
    n, eligible, swapped, seen = 1500, 0, 0, set()
    for k in range(n):
        d = eng.decide(f"u{k % 50:05d}", f"new-items-{k}")
        on_page: dict[str, int] = {}
        page = []
        for m in d.modules:
            items = [it["item_id"] for it in m["items"]]
            page += items
            assert len(items) == st.config.items_per_module
            fresh = [j for j, i in enumerate(items) if i in new_ids]
            assert len(fresh) <= 1
            tails = [j for j, it in enumerate(m["items"]) if it["long_tail"]]
            # eligible: a module of a category with a new item not yet on the page, showing a long-tail item
            # (the swap keeps the module's long-tail count, so this reads the same before and after it)
            if m["category"] in ("songs", "live") and tails and on_page.get(m["category"], 0) < 3:
                eligible += 1
                if fresh:
                    swapped += 1
                    assert fresh[0] == tails[-1]  # the module's last long-tail item
                    on_page[m["category"]] = on_page.get(m["category"], 0) + 1
                    assert cat_of[items[fresh[0]]] == m["category"]
            else:
                assert not fresh
        assert len(page) == len(set(page))
        logged = [i for i in page if i in new_ids]
        assert d.context.get("new_items", []) == logged
        seen.update(logged)
    assert eligible > 150
    assert abs(swapped / eligible - q) <= 4 * np.sqrt(q * (1 - q) / eligible)
    assert seen == new_ids  # every new item was drawn

    # share 0: the same items are never shown; a week-old item is no longer new
    for share, days in ((0.0, None), (None, 1.0 / 48)):  # 30 minutes: the items came an hour ago
        quiet, _ = _with_new_items(world, share=share, days=days)
        eng = DecisionEngine(quiet)
        for k in range(300):
            d = eng.decide(f"u{k % 50:05d}", f"new-items-{k}")
            assert not {it["item_id"] for m in d.modules for it in m["items"]} & new_ids
            assert "new_items" not in d.context


def test_a_new_item_the_calibration_has_measured_is_new_no_more(world):
    """A plan whose calibration holds NEW_ITEM_IMPRESSIONS examined impressions of a new item takes it off
    the new items (its own rate now places it); one with fewer keeps it."""
    from policy_api.engine import NEW_ITEM_IMPRESSIONS, measured_items, with_new_items

    st, new = _with_new_items(world)
    ids = st.catalog.id_list()
    songs = [ids[i] for i in new if st.catalog.category[i] == "songs"]
    cal = {"songs": {"items": {"ids": songs + ["not-in-the-catalog"],
                               "exposure": [NEW_ITEM_IMPRESSIONS, NEW_ITEM_IMPRESSIONS - 1, 0.0, 1e6]}}}
    assert measured_items(cal, st.config.category_names, st.catalog.index_of()).tolist() == [
        st.catalog.index_of()[songs[0]]]
    after = with_new_items(st, cal)
    assert sorted(after.new_items.tolist()) == sorted(set(new.tolist()) - {st.catalog.index_of()[songs[0]]})
    assert after.fresh_items.tolist() == st.fresh_items.tolist()  # fresh stays: a later plan decides again
    assert sorted(with_new_items(after, None).new_items.tolist()) == new.tolist()


# ---------------------------------------------------------------------------------------------------
# the published ranker on the request path: live sequences, the fast path, the response bytes


@pytest.fixture(scope="module")
def ranker_state(state):
    """The engine state with a ranker (random weights) over the catalog: users u00000..u00009 known,
    the catalog's last 5 items unknown to the model."""
    import torch

    from rankers import Ranker, RankerScorer, UserHistory

    torch.manual_seed(0)
    n_cat = state.catalog.n_items
    n_items, C, L = n_cat - 5, len(state.config.category_names), 6
    cat = torch.tensor(np.maximum(state.item_category[:n_items], 0))
    model = Ranker(n_users=10, n_items=n_items, n_categories=C, item_category=cat,
                   dense=torch.tensor(np.array(state.catalog.features[:n_items]), dtype=torch.float32),
                   pop=torch.tensor(np.log1p(state.catalog.popularity[:n_items, None]), dtype=torch.float32),
                   embed_dim=8, cin_layers=(4, 4), expert_dim=8, tower_dim=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    hist = UserHistory(pos_items=rng.integers(0, n_items, (10, L)), pos_types=rng.integers(0, 4, (10, L)),
                       neg_items=rng.integers(-1, n_items, (10, L)), pos_count=rng.integers(6, 20, 10),
                       neg_count=rng.integers(0, 9, 10))
    scorer = RankerScorer(model.eval(), {"play": 1.0, "full_play": 2.0, "favorite": 4.0, "share": 5.0, "skip": -0.5},
                          hist)
    remap = np.concatenate([np.arange(n_items), np.full(5, -1)])
    handle = ScorerHandle(scorer, {f"u{k:05d}": k for k in range(10)}, remap, name="ranker:1")
    from dataclasses import replace

    return replace(state, scorer=handle)


def live_in(state, category: str, n: int = 4, seed: int = 0):
    """A live state whose recent plays are all in ``category`` (and one play of an item the model does
    not know), plus two skips."""
    from policy_api.engine import LiveSignals

    names = state.config.category_names
    c = names.index(category)
    rng = np.random.default_rng(seed)
    plays = rng.choice(np.flatnonzero(state.item_category[:-5] == c), n, replace=False)
    positives = np.concatenate([plays, [state.catalog.n_items - 1]])
    skips = rng.choice(np.flatnonzero(state.item_category[:-5] >= 0), 2, replace=False)
    engagement = np.zeros(len(names))
    engagement[c] = float(n)
    return LiveSignals("hit", engagement, skips, n + 3, positives=positives,
                       positive_types=np.arange(n + 1) % 4, n_positive=n + 1, n_negative=2)


@pytest.mark.parametrize("user", ["u00003", "never-seen"])
def test_ranker_scores_with_the_live_sequences(ranker_state, user):
    """The engine's scores are the ranker's, called directly with the live sequences ahead of the
    snapshot (torch, float64), times the live tilt and the skip demotion."""
    import copy

    from policy_api.engine import SKIP_DEMOTION
    from rankers import RankerScorer, live_category_preferences, live_score_multiplier

    st = ranker_state
    eng = DecisionEngine(st)
    h = st.scorer
    u = h.user_idx(user)
    live = live_in(st, "videos")
    pool = eng.pool(st, np.random.default_rng(3))
    got, prefs = eng.item_scores(st, u, pool, live)
    sc = h.scorer
    ref = RankerScorer(copy.deepcopy(sc.model).double(), sc.event_weights, sc.history)
    known_live = h.item_remap[live.positives] >= 0
    seq = ref.sequences(u, h.item_remap[live.positives][known_live], live.positive_types[known_live],
                        h.item_remap[live.negatives], (live.n_positive, live.n_negative))
    mapped = h.item_remap[pool]
    units, head = ref.score_sequences(u, np.maximum(mapped, 0), seq)
    units = np.where(mapped >= 0, units, np.median(units[mapped >= 0]))
    pop = st.population_prefs
    want_prefs = live_category_preferences(live.engagement, pop, head)
    mult = live_score_multiplier(want_prefs, pop, strength=0.5)
    want = units * mult[st.item_category[pool]] * np.where(np.isin(pool, live.negatives), SKIP_DEMOTION, 1.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)
    np.testing.assert_allclose(prefs, want_prefs, atol=1e-6)
    # the live sequences changed the ranker's scores: not the snapshot's
    snap, _ = ref.score_sequences(u, np.maximum(mapped, 0), ref.sequences(u))
    assert np.abs(snap - units)[mapped >= 0].max() > 1e-3


def test_ranker_decision_times_its_stages_and_answers_in_orjson(ranker_state):
    import json

    eng = DecisionEngine(ranker_state)
    d = eng.decide("never-seen", RequestIds(b"k").issue(), live=live_in(ranker_state, "songs"))
    assert not d.fallback, d.fallback_reason
    assert set(d.stages) == {"pool", "scoring", "block_table", "candidates", "pmf", "draw", "layout"}
    assert all(v >= 0 for v in d.stages.values()) and sum(d.stages.values()) <= d.elapsed_s + 1e-9
    assert json.loads(d.response_json()) == json.loads(json.dumps(d.response()))
    assert d.context["live"] == "hit"


def test_live_sequences_are_the_states_recent_events_as_catalog_rows():
    """Positives with their ranker codes and skips, newest first, items outside the catalog left out
    (a slow reference over the events)."""
    from policy_api.live import LiveEvent, apply_events, live_sequences
    from rankers import EVENT_TYPES

    rng = np.random.default_rng(0)
    types = ["play", "full_play", "favorite", "share", "skip"]
    events = [LiveEvent("u", f"i{int(rng.integers(0, 12))}", "songs", types[int(rng.integers(0, 5))], 1.0, float(t))
              for t in rng.permutation(30)]
    state = apply_events(None, events, half_life_s=60.0, max_events=20)
    index = {f"i{k}": 100 + k for k in range(10)}  # i10, i11 are not in the catalog
    pos, codes, neg = live_sequences(state, index)
    newest = sorted(events, key=lambda e: -e.ts)[:20]
    kept = [e for e in newest if e.item_id in index]
    assert pos.tolist() == [index[e.item_id] for e in kept if e.type != "skip"]
    assert codes.tolist() == [EVENT_TYPES.index(e.type) for e in kept if e.type != "skip"]
    assert neg.tolist() == [index[e.item_id] for e in kept if e.type == "skip"]
    assert pos.dtype == codes.dtype == neg.dtype == np.int64


def test_calibration_is_per_category_head_and_tail(state):
    from policy_api.engine import calibrated, category_calibration

    C = len(state.config.categories)
    top = state.config.items_per_module
    items = np.flatnonzero(state.item_category >= 0)
    scores = state.scorer.score(-1, items)
    cat, tail = state.item_category[items], state.is_tail[items]

    def p(c, t):  # mean score of a group's top items, computed here
        return np.sort(scores[(cat == c) & (tail == t)])[::-1][:top].mean()

    rates = np.zeros((C, 2, 2))
    rates[0, 0] = [3.0e5 * p(0, False), 1e6]  # head of category 0: 0.3 units per examined impression per score
    rates[0, 1] = [1.0e5 * p(0, True), 1e6]  # its tail: a third of that
    rates[1, 0] = [2.0e5 * p(1, False), 1e6]  # category 1: head only; its tail has no data
    got = calibrated(state, rates).score_multiplier
    m = {(c, t): got[items[(cat == c) & (tail == t)]] for c in range(2) for t in (False, True)}
    assert all(np.ptp(v) == 0 for v in m.values())  # one multiplier per group
    # with 10^6 impressions the prior of 200 barely moves a group off its own ratio U / (I p)
    assert m[0, False][0] == pytest.approx(0.3, rel=1e-3) and m[0, True][0] == pytest.approx(0.1, rel=1e-3)
    assert m[1, False][0] == pytest.approx(0.2, rel=1e-3)
    # a group without data takes its category's multiplier (the category's pooled, shrunk rate)
    pooled = category_calibration(scores, cat, rates.sum(axis=1), top)
    assert m[1, True][0] == pytest.approx(pooled[1], rel=1e-12)
    assert got[state.item_category < 0].tolist() == [1.0] * int((state.item_category < 0).sum())
    # a net-negative group (skipped more than played): its top items are valued at the observed
    # negative rate, and its items keep the scorer's order
    rates[2, 0] = [-0.05e6, 1e6]
    st2 = calibrated(state, rates)
    sel = items[(cat == 2) & ~tail]
    cal = scores[(cat == 2) & ~tail] * st2.score_multiplier[sel] + st2.score_offset[sel]
    assert np.sort(cal)[::-1][:top].mean() == pytest.approx(-0.05, rel=1e-3)
    assert (np.argsort(-cal, kind="stable") == np.argsort(-scores[(cat == 2) & ~tail], kind="stable")).all()


def test_without_a_long_tail_goal_tilted_layouts_get_only_the_exploration_budget(world):
    """With no long-tail constraint, the tilted candidates' total probability is at most the
    exploration budget (reference: the config's budget); with the constraint they are exploited."""
    text = world.default_config_toml()
    cfg = parse_config_text(text)
    assert any(c.kind == "long_tail_share" for c in cfg.constraints)
    cat = world_catalog(world)
    no_tail = replace(cfg, constraints=tuple(c for c in cfg.constraints if c.kind != "long_tail_share"))
    ids = RequestIds(b"k")
    for config, prices, goal in ((cfg, np.array([0.5, 0.3]), True), (no_tail, np.array([0.5]), False)):
        eng = DecisionEngine(build_state(config, cat, prices=prices))
        tilted = []
        for u in range(40):
            d = eng.decide(f"u{u:05d}", ids.issue())
            t = np.array([c["tilt"] for c in d.candidates])
            tilted.append(float(np.asarray(d.pmf)[t > 0].sum()))
        if goal:
            assert max(tilted) > config.exploration.budget + 0.05
        else:
            assert max(tilted) <= config.exploration.budget + 1e-12


def test_live_rate_factors_are_the_shrunk_rate_ratio(seed):
    from policy_api.engine import LIVE_PRIOR_IMPRESSIONS, live_rate_factors

    rng = np.random.default_rng(seed)
    C = 5
    raw_top, top = rng.uniform(0.5, 2.0, C), rng.uniform(0.5, 2.0, C)
    rate = np.array([0.3, 0.1, 0.05, -0.02, 0.2])  # category 3 is net negative over the population
    units, imps = rng.uniform(-1.0, 30.0, C), rng.uniform(0.0, 200.0, C)
    units[1] = -40.0  # a category this user skips more than takes
    rho, factor, offset = live_rate_factors(raw_top, top, rate, units, imps)
    k = LIVE_PRIOR_IMPRESSIONS
    for c in range(C):
        t = min(max(raw_top[c] / top[c], 0.1), 10.0)
        want_rho = (units[c] + k * rate[c]) / (imps[c] + k)
        assert rho[c] == pytest.approx(want_rho)
        if rate[c] > 0:  # scaled to the user's rate; a net loss added where the user's rate is negative
            m = min(max(want_rho / rate[c], -20.0), 20.0)
            assert factor[c] == pytest.approx(max(m, 0.05) / t) and offset[c] == pytest.approx(min(m, 0.0) * rate[c])
        else:  # the population skips it more than it plays it: shifted by the user's difference
            assert factor[c] == 1.0 and offset[c] == pytest.approx(want_rho - rate[c])
    assert rho[1] < 0 and offset[1] < 0  # its items are a loss to show to this user
    # no evidence: the population's rate (the scorer's own category tilt taken out, nothing added);
    # much evidence: the user's own rate
    rho0, f0, o0 = live_rate_factors(raw_top, top, rate, np.zeros(C), np.zeros(C))
    assert rho0 == pytest.approx(rate) and (o0 == 0).all()
    rho1, _, _ = live_rate_factors(raw_top, top, rate, 1e6 * 2 * rate, np.full(C, 1e6))
    assert rho1 == pytest.approx(2 * rate, rel=1e-4)


def test_a_user_who_ignores_a_category_is_shown_less_of_it(state, world):
    """Impressions without engagement lower a category's value for that user, whatever share of the
    user's plays it holds; engagement above the population's rate raises it."""
    from policy_api.engine import LiveSignals, calibrated

    C = len(state.config.categories)
    rates = np.zeros((C, 2, 2))
    rates[:, 0] = [[3000.0, 1e4], [2000.0, 1e4], [1000.0, 1e4], [1500.0, 1e4]][:C]
    rates[:, 1] = rates[:, 0] * [0.5, 1.0]
    st = calibrated(state, rates)
    engine = DecisionEngine(st)
    rng = np.random.default_rng(0)
    pool = engine.pool(st, rng)
    cold, _ = engine.item_scores(st, -1, pool, None)
    # the user was shown plenty of category 0 and took none of it; of category 1 took 3x the population
    units = np.zeros(C)
    imps = np.zeros(C)
    imps[0], imps[1], units[1] = 300.0, 100.0, 3 * 100.0 * st.category_rate[1]
    live = LiveSignals("hit", units, np.zeros(0, dtype=np.int64), impressions=imps)
    got, prefs = engine.item_scores(st, -1, pool, live)
    cat = st.item_category[pool]
    raw = st.scorer.score(-1, pool)
    k = 20.0
    for c in range(C):
        sel = cat == c
        t = np.sort(raw[sel])[::-1][:st.config.items_per_module].mean() / st.category_top[c]
        m = (units[c] + k * st.category_rate[c]) / ((imps[c] + k) * st.category_rate[c])
        np.testing.assert_allclose(got[sel], cold[sel] * max(m, 0.05) / t, rtol=1e-9)
    assert prefs is not None and prefs[0] < st.population_prefs[0] and prefs[1] > st.population_prefs[1]
    # the decisions follow: fewer modules of category 0, more of category 1, than for a cold user
    name = [c.name for c in st.config.categories]
    shown = np.zeros((2, C))
    for k_req in range(150):
        for row, signals in enumerate((None, live)):
            d = engine.decide("u-new", f"rq{k_req}", live=signals)
            for m_ in d.modules:
                shown[row, name.index(m_["category"])] += 1
    assert shown[1, 0] < shown[0, 0] and shown[1, 1] > shown[0, 1]


def test_before_any_feedback_categories_engage_as_their_best_items_are_popular(state):
    """The catalog's prior: each (category, head | tail) group's top items score, after calibration, in
    proportion to their mean popularity (computed here from the catalog), the most popular group
    keeping the scorer's own level."""
    from policy_api.engine import calibrated, catalog_prior_rates

    rates = catalog_prior_rates(state)
    assert rates is not None
    st = calibrated(state, rates)
    items = np.flatnonzero(st.item_category >= 0)
    pop = st.catalog.popularity[items]
    raw = st.scorer.score(-1, items)
    cal = raw * st.score_multiplier[items] + st.score_offset[items]
    top = st.config.items_per_module
    groups = {}
    for c in range(len(st.config.categories)):
        for t in (False, True):
            sel = (st.item_category[items] == c) & (st.is_tail[items] == t)
            best = np.argsort(-pop[sel], kind="stable")[:top]
            groups[c, t] = (pop[sel][best].mean(), cal[sel][best].mean(), raw[sel][best].mean())
    p_best = max(g[0] for g in groups.values())
    (c0, t0), g0 = max(groups.items(), key=lambda kv: kv[1][0])
    assert g0[1] == pytest.approx(g0[2], rel=1e-3)  # the most popular group keeps its level
    for g in groups.values():  # the others in proportion to their popularity (the prior binds: 10^6 impressions)
        assert g[1] == pytest.approx(g0[2] * g[0] / p_best, rel=2e-3)
    assert catalog_prior_rates(replace(state, catalog=replace(state.catalog, popularity=np.zeros(state.catalog.n_items)))) is None


@given(a=hnp.arrays(np.int64, hnp.array_shapes(max_dims=2, min_side=0, max_side=40), elements=st.integers(-5, 30)),
       b=hnp.arrays(np.int64, st.integers(0, 40), elements=st.integers(-5, 30)))
@settings(max_examples=200, deadline=None)
def test_member_equals_numpy_isin(a, b):
    """The request path's membership test against numpy's, on small and large arrays alike."""
    got = member(a, b)
    assert got.shape == a.shape and got.dtype == bool
    np.testing.assert_array_equal(got, np.isin(a, b))


def test_member_of_large_arrays_takes_numpy_isin_path_with_the_same_answer():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5000, 3000), rng.integers(0, 5000, 400)  # 1.2M pairs: above the pairwise limit
    np.testing.assert_array_equal(member(a, b), np.isin(a, b))
    np.testing.assert_array_equal(member(a.astype(np.float64), b), np.isin(a, b))
