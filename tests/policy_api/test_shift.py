"""Population shifts: the detector's statistic against a plain loop, its false alarms and its delay on
simulated outcome streams with a known change point, and what the live states forget (closed forms)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from policy_api.errors import InvalidInput
from policy_api.live import Forget, LiveEvent, apply_events, before_vectors, category_vector
from policy_api.live._state import decode_state, encode_state
from policy_api.loop._shift import ShiftDetector, SlotOutcomes, category_shift

C, S = 4, 6


def _stream(rng: np.random.Generator, n: int, rate: np.ndarray) -> SlotOutcomes:
    """``n`` pages of ``S`` slots: a random category per slot, a predicted engagement per examined
    impression and ~10 examined impressions per slot; the units are Poisson with mean ``rate[d, c]``
    times the predicted units (``rate`` (n, C): the true observed-to-predicted ratio at each page)."""
    cat = rng.integers(0, C, size=(n, S))
    pred = rng.uniform(0.05, 0.5, size=(n, S)) * rng.poisson(10, size=(n, S))
    units = rng.poisson(rate[np.arange(n)[:, None], cat] * pred).astype(np.float64)
    return SlotOutcomes(np.arange(n, dtype=np.float64), cat, units, pred)


def _run(det: ShiftDetector, o: SlotOutcomes, every: int = 25) -> list[tuple[int, tuple[int, ...]]]:
    """Feed ``o`` ``every`` pages at a time, as the loop does, resetting after each detection."""
    hits = []
    for lo in range(0, len(o), every):
        det.add(o.part(lo, lo + every))
        got = det.check(C)
        if got is not None:
            hits.append((lo + every, got.categories))
            det.reset()
    return hits


def test_category_shift_equals_a_plain_loop():
    rng = np.random.default_rng(3)
    ref = _stream(rng, 300, np.full((300, C), 1.0))
    new = _stream(rng, 80, np.tile([0.5, 1.0, 2.0, 1.0], (80, 1)))
    ratio, z, p = category_shift(ref, new, C)
    for c in range(C):
        yr = pr = 0.0
        for d in range(300):
            for s in range(S):
                if ref.category[d, s] == c:
                    yr += ref.units[d, s]
                    pr += ref.predicted[d, s]
        e = yr / pr
        y = q = num = sq = 0.0
        for d in range(80):
            for s in range(S):
                if new.category[d, s] == c:
                    y += new.units[d, s]
                    q += new.predicted[d, s]
                    r = new.units[d, s] - e * new.predicted[d, s]
                    num += r
                    sq += r * r
        assert ratio[c] == pytest.approx(y / q / e, rel=1e-12)
        assert z[c] == pytest.approx(num / math.sqrt(sq), rel=1e-12)
        assert p[c] == pytest.approx(q, rel=1e-12)


def test_no_false_alarm_on_steady_streams_and_a_halved_category_is_found_within_the_window():
    """20 steady streams of 3,000 pages (true ratios 1.2, 0.9, 1.0, 1.1): no detection at all. The same
    streams with category 1's ratio halved from page 2,000: found in every stream, never before the
    change, at most ``recent`` + one batch after it, and category 1 among the shifted."""
    rng = np.random.default_rng(0)
    base = np.array([1.2, 0.9, 1.0, 1.1])
    delays = []
    for _ in range(20):
        steady = _stream(rng, 3000, np.tile(base, (3000, 1)))
        assert _run(ShiftDetector(recent=150, slots=S), steady) == []
        rate = np.tile(base, (3000, 1))
        rate[2000:, 1] *= 0.5
        hits = _run(ShiftDetector(recent=150, slots=S), _stream(rng, 3000, rate))
        assert len(hits) >= 1
        at, cats = hits[0]
        assert 2000 < at <= 2000 + 150 + 25 and 1 in cats
        delays.append(at - 2000)
    assert np.median(delays) <= 150


def test_a_small_move_of_every_category_is_found_by_the_whole_page():
    """Every category's ratio falls to 0.75 from page 2,000: no category moves 1.5 times, but the whole
    page's units, far less noisy, do: found within the window plus a batch, by the page test alone."""
    rng = np.random.default_rng(4)
    for _ in range(5):
        rate = np.tile([1.2, 0.9, 1.0, 1.1], (3000, 1))
        rate[2000:] *= 0.75
        det = ShiftDetector(recent=150, slots=S)
        hits = _run(det, _stream(rng, 3000, rate))
        assert hits and 2000 < hits[0][0] <= 2000 + 150 + 25 and hits[0][1] == ()


def test_a_reference_that_is_still_moving_is_not_judged():
    """While the calibration is still being learned, the ratios move on their own (here category 0's
    falls from 2.5 to 1 over the first 1,500 pages, then holds): the detector waits for a steady
    reference. Without that guard the same stream raises a false alarm, so the guard is what holds it
    back."""
    rng = np.random.default_rng(1)
    n = 3000
    rate = np.ones((n, C))
    rate[:1500, 0] = np.linspace(2.5, 1.0, 1500)
    o = _stream(rng, n, rate)
    assert _run(ShiftDetector(recent=150, slots=S), o) == []
    assert _run(ShiftDetector(recent=150, slots=S, steady=math.inf), o) != []


def test_serving_another_mix_of_categories_is_not_a_shift():
    """Each category's true ratio holds (2.0, 0.8, 0.8, 0.8), but from page 2,000 category 0 fills most
    slots (the pacer's prices moved): the page's plain observed-to-predicted ratio jumps (computed here
    over the slots, a plain sum), yet no category's ratio moved, and no shift is raised; the same
    streams with every category's ratio down to 0.7 are still found."""
    rng = np.random.default_rng(5)
    base = np.array([2.0, 0.8, 0.8, 0.8])
    n = 3000
    for _ in range(5):
        cat = rng.integers(0, C, size=(n, S))
        cat[2000:] = np.where(rng.random((n - 2000, S)) < 0.8, 0, cat[2000:])
        pred = rng.uniform(0.05, 0.5, size=(n, S)) * rng.poisson(10, size=(n, S))
        o = SlotOutcomes(np.arange(n, dtype=np.float64), cat, rng.poisson(base[cat] * pred).astype(np.float64), pred)
        plain = (o.units[2000:2150].sum() / o.predicted[2000:2150].sum()) / (o.units[:2000].sum() / o.predicted[:2000].sum())
        assert plain >= 1.25  # what an unadjusted whole-page test would have seen
        assert _run(ShiftDetector(recent=150, slots=S), o) == []
        moved = np.where(np.arange(n)[:, None] >= 2000, 0.7, 1.0) * base[cat]
        o2 = SlotOutcomes(o.ts, cat, rng.poisson(moved * pred).astype(np.float64), pred)
        hits = _run(ShiftDetector(recent=150, slots=S), o2)
        assert hits and 2000 < hits[0][0] <= 2000 + 150 + 25


def test_pages_doing_better_than_predicted_are_not_a_shift():
    """From page 2,000 every page earns more than predicted: category 1's ratio doubles, or every
    category's rises to 1.4 times (the engine learned better items than its logged predictions knew):
    no shift, while the same streams falling as much (halved, 0.7 times) are found."""
    rng = np.random.default_rng(6)
    base = np.array([1.2, 0.9, 1.0, 1.1])
    for up, down in (((1,), 2.0), ((0, 1, 2, 3), 1.4)):
        for factor, found in ((down, False), (1.0 / down, True)):
            rate = np.tile(base, (3000, 1))
            rate[2000:, list(up)] *= factor
            hits = _run(ShiftDetector(recent=150, slots=S), _stream(rng, 3000, rate))
            assert bool(hits) == found, (up, factor, hits)
            if found:
                assert 2000 < hits[0][0] <= 2000 + 150 + 25


def _ev(kind: str, cat: str, units: float, ts: float) -> LiveEvent:
    return LiveEvent(user_id="u", item_id="" if kind == "impression" else "i", category=cat, type=kind,
                     units=units, ts=ts)


def test_a_state_forgets_a_shift_once_and_a_reader_applies_it_to_states_that_predate_it():
    hl = 1e12  # (next to) no time decay
    st = apply_events(None, [_ev("play", "a", 1.0, 10.0), _ev("impression", "a", 4.0, 10.0)], half_life_s=hl,
                      max_events=10)
    assert st.epoch == 0.0 and st.category_engagement == {"a": 1.0} and st.category_impressions == {"a": 4.0}
    f = Forget(epoch=50.0, keep=0.25)
    # read: a state that predates the shift (its epoch is older) counts a quarter of its sums
    assert category_vector(st, ("a",), 20.0, hl, forget=f)[0] == pytest.approx(0.25)
    assert category_vector(st, ("a",), 20.0, hl, impressions=True, forget=f)[0] == pytest.approx(1.0)
    assert category_vector(st, ("a",), 20.0, hl, forget=Forget(0.0, 0.25))[0] == pytest.approx(1.0)  # not older
    # written: the old sums are cut once, the new events added in full, the state carries the epoch
    st2 = apply_events(st, [_ev("play", "a", 2.0, 60.0), _ev("impression", "a", 2.0, 60.0)], half_life_s=hl,
                       max_events=10, forget=f)
    assert st2.epoch == 50.0
    assert st2.before_engagement["a"] == pytest.approx(1.0) and st2.before_impressions["a"] == pytest.approx(4.0)
    assert st2.category_engagement["a"] == pytest.approx(0.25 * 1.0 + 2.0)
    assert st2.category_impressions["a"] == pytest.approx(0.25 * 4.0 + 2.0)
    assert category_vector(st2, ("a",), 60.0, hl, forget=f)[0] == pytest.approx(2.25)  # not cut again
    st3 = apply_events(st2, [_ev("play", "a", 1.0, 70.0)], half_life_s=hl, max_events=10, forget=f)
    assert st3.category_engagement["a"] == pytest.approx(3.25)
    assert st3.before_engagement == st2.before_engagement  # what it took before stays as it was
    # what a reader takes as the user's sums before the shift: moved or not yet moved, the same
    before = before_vectors(st3, ("a",), 70.0, hl, f)
    assert before is not None and before[0][0] == pytest.approx(1.0) and before[1][0] == pytest.approx(4.0)
    before = before_vectors(st, ("a",), 20.0, hl, f)
    assert before is not None and before[0][0] == pytest.approx(1.0) and before[1][0] == pytest.approx(4.0)
    assert before_vectors(st, ("a",), 20.0, hl, None) is None
    # a user first seen after the shift starts at its epoch; the sequences are kept whatever happens
    assert apply_events(None, [_ev("play", "b", 1.0, 70.0)], half_life_s=hl, max_events=10, forget=f).epoch == 50.0
    assert st3.items == ("i", "i", "i")
    # stored and read back exactly; a state stored before epochs existed reads as epoch 0
    assert decode_state(encode_state(st3)) == st3
    old = encode_state(st).decode().replace(',"epoch":0.0', "")
    assert "epoch" not in old and decode_state(old).epoch == 0.0


@pytest.mark.parametrize(("epoch", "keep", "field"), [(math.nan, 0.5, "epoch"), (1.0, 1.5, "keep"),
                                                      (1.0, -0.1, "keep")])
def test_a_bad_forget_names_its_field(epoch, keep, field):
    with pytest.raises(InvalidInput) as e:
        Forget(epoch, keep)
    assert e.value.field == field


def _users(rng: np.random.Generator, n: int, old_rate: np.ndarray, new_rate: np.ndarray, old_imp: float,
           new_imp: float) -> tuple[np.ndarray, ...]:
    """Before and after sums of ``n`` users: ``old_rate``/``new_rate`` (n, C) their true rates, Poisson
    examined impressions around ``old_imp``/``new_imp`` per category, binomial-like units."""
    bi = rng.poisson(old_imp, size=old_rate.shape).astype(np.float64)
    be = rng.binomial(bi.astype(np.int64), np.clip(old_rate, 0, 1)).astype(np.float64)
    ni = rng.poisson(new_imp, size=new_rate.shape).astype(np.float64)
    ne = rng.binomial(ni.astype(np.int64), np.clip(new_rate, 0, 1)).astype(np.float64)
    return be, bi, ne, ni


def test_the_shift_map_recovers_swapped_audiences_and_beats_the_population_rate():
    """Categories' audiences swap (each takes the next one's rates, as in the live-loop benchmark's drift):
    fitted on 400 users with a few pages since the shift, the map's rows point at the right old category
    and its prior for 2,000 other users is far closer to their true new rates than the population's."""
    from policy_api.live import fit_shift_map

    rng = np.random.default_rng(0)
    perm = np.roll(np.arange(C), -1)

    def world(n):
        old = rng.beta(2, 5, size=(n, C))
        return old, old[:, perm]

    old, new = world(400)
    be, bi, ne, ni = _users(rng, 400, old, new, 60, 10)
    before_rate = be.sum(0) / bi.sum(0)
    m = fit_shift_map(be, bi, ne, ni, before_rate)
    assert (np.argmax(m.coef, axis=1) == perm).all()
    old2, new2 = world(2000)
    be2, bi2, _, _ = _users(rng, 2000, old2, new2, 60, 0)
    prior = np.array([m.prior(be2[u], bi2[u], np.full(C, np.nan)) for u in range(2000)])
    err_map = np.mean((prior - new2) ** 2)
    err_pop = np.mean((new.mean(0) - new2) ** 2)
    assert err_map < 0.3 * err_pop


def test_a_map_row_needs_enough_users_and_falls_back_to_the_population_rate():
    from policy_api.live import ShiftMap, fit_shift_map

    rng = np.random.default_rng(1)
    old = rng.beta(2, 5, size=(50, C))
    be, bi, ne, ni = _users(rng, 50, old, old, 60, 10)
    ni[:, 2] = 0  # nobody saw category 2 since the shift
    ne[:, 2] = 0
    m = fit_shift_map(be, bi, ne, ni, be.sum(0) / bi.sum(0))
    assert np.isnan(m.intercept[2]) and np.isfinite(m.intercept[[0, 1, 3]]).all()
    assert m.users.tolist() == [int((ni[:, c] > 0).sum()) for c in range(C)]
    fallback = np.array([0.1, 0.2, 0.3, 0.4])
    assert m.prior(be[0], bi[0], fallback)[2] == 0.3
    # the map round-trips through the plan's JSON; a malformed one names the field
    back = ShiftMap.from_dict(m.to_dict())
    assert np.array_equal(back.coef, m.coef) and np.array_equal(np.isnan(back.intercept), np.isnan(m.intercept))
    with pytest.raises(InvalidInput) as e:
        ShiftMap.from_dict({"coef": [[1.0]]})
    assert e.value.field == "map"


def test_the_live_rate_is_shrunk_toward_the_maps_prior():
    from policy_api.engine._engine import live_rate_factors

    r = np.array([0.2, 0.4])
    eng, imp = np.array([2.0, 0.0]), np.array([10.0, 0.0])
    toward = np.array([0.5, 0.1])
    rho, _, _ = live_rate_factors(np.ones(2), np.ones(2), r, eng, imp, prior=20.0, toward=toward)
    assert rho.tolist() == pytest.approx([(2.0 + 20 * 0.5) / 30.0, 0.1])
    rho0, _, _ = live_rate_factors(np.ones(2), np.ones(2), r, eng, imp, prior=20.0)
    assert rho0.tolist() == pytest.approx([(2.0 + 20 * 0.2) / 30.0, 0.4])


def _logged_world(tmp_path, loop_toml: str):
    """A simulated catalog loaded into a fresh SQLite log with the world's config active (plus the
    ``[loop]`` lines given): ``(db, catalog, config record)``."""
    from policy_api import registry
    from policy_api.log import make_engine, read_catalog_csv, upgrade, upsert_items
    from simulator import make_world

    world = make_world(n_users=30, n_items=400, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    url = f"sqlite:///{tmp_path / 'log.db'}"
    upgrade(url)
    db = make_engine(url)
    cat = read_catalog_csv(tmp_path / "items.csv")
    upsert_items(db, cat.rows())
    registry.activate_config(db, world.default_config_toml() + "\n[loop]\n" + loop_toml, author="test")
    return db, cat, registry.active_config(db)


def _log_pages(db, cfg, rng: np.random.Generator, n: int, t: float, users: np.ndarray, items: list,
               rate: np.ndarray, predicted: np.ndarray) -> tuple[int, float]:
    """Log one page per user in ``users`` (requests r<n>, r<n+1>, ... at t, t + 0.02, ...): random
    categories per slot, each slot's logged engagement ``predicted[category]``, five impressions of the
    category's ``items`` and a play of each with the user's ``rate[user, category]``. Returns the next
    (n, t)."""
    from datetime import UTC, datetime

    from policy_api.log import insert_decisions, insert_feedback

    config = cfg.config
    names, S_ = config.category_names, config.slots
    rows, events = [], []
    for u in users:
        rid, ts = f"r{n}", datetime.fromtimestamp(t, tz=UTC)
        cats = rng.integers(0, len(names), size=S_)
        rows.append({"request_id": rid, "ts": ts, "user_id": f"u{u}", "context": {}, "policy": "test",
                     "versions": {"config": cfg.version}, "pmf": [1.0], "chosen": 0, "propensity": 1.0,
                     "layout": [], "fallback_reason": None,
                     "candidates": [{"modules": [config.modules[0].id] * S_, "categories": [names[c] for c in cats],
                                     "tilt": 0.0, "value": 1.0, "score": 1.0, "exposure": [0.0] * len(config.constraints),
                                     "engagement": predicted[cats].tolist(), "tail": 0.0}]})
        for s_, c in enumerate(cats):
            shown = rng.choice(items[c], size=5, replace=False)
            plays = rng.random(5) < rate[u, c]
            for j, it in enumerate(shown):
                events.append({"event_id": f"{rid}:{s_}:{j}", "request_id": rid, "slot": int(s_), "item_id": it,
                               "type": "impression", "value": None, "ts": ts})
                if plays[j]:
                    events.append({"event_id": f"{rid}:{s_}:{j}p", "request_id": rid, "slot": int(s_), "item_id": it,
                                   "type": "play", "value": None, "ts": ts})
        n += 1
        t += 0.02
    insert_decisions(db, rows)
    insert_feedback(db, events)
    return n, t


@pytest.mark.slow
def test_the_loop_finds_a_shift_forgets_and_serving_takes_the_map(tmp_path):
    """The loop's own steps on a real log: 300 users with their own rate per category (the truth) are
    served pages of random categories whose logged engagement is the population's rate; their plays
    are drawn from their own rates. After 1,000 pages every user's rates rotate (each category takes
    the next one's). The loop finds it within its window plus a batch, and not before; states written
    since hold the user's sums from before it (equal to the sums read when it was found); the plan it
    publishes carries the shift and a map whose rows point at the category each audience came from;
    and the engine loaded from that plan takes a returning user's old taste through the map (the
    prior served equals the map applied to the user's stored sums)."""
    from datetime import UTC, datetime

    from policy_api import jobs, registry
    from policy_api.engine import catalog_long_tail, load_state
    from policy_api.live import make_state_store
    from policy_api.loop import BackgroundLoop
    from policy_api.serving._runtime import live_signals_of

    # a generous state deadline: the read below is the test's reference, not a race with a busy machine
    db, _, cfg = _logged_world(tmp_path, "item_events = 0\nstate_deadline_ms = 5000\n")
    config = cfg.config
    names = config.category_names
    st0 = load_state(db)
    is_tail, _ = catalog_long_tail(st0.catalog, config)
    head = [[str(i) for i, c, t in zip(st0.catalog.item_ids, st0.item_category, is_tail, strict=True) if c == k and not t]
            for k in range(len(names))]
    jobs.plan(db, users=20)
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    loop._live_state()  # from now on
    store = make_state_store("sql", db)
    rng = np.random.default_rng(0)
    n_users = 300
    rate = rng.beta(2, 5, size=(n_users, C)) * np.array([1.0, 0.8, 0.5, 1.2])
    perm = np.roll(np.arange(C), -1)
    t = datetime.now(tz=UTC).timestamp() - 3600.0  # dated in the past: every page is settled when judged
    loop._shift_read = datetime.fromtimestamp(t - 1.0, tz=UTC)
    found, n, at_change = None, 0, {}
    while n < 1800:  # 36 batches of 50 pages, the loop's steps after each
        now_rate = rate if n < 1000 else rate[:, perm]
        pop = now_rate.mean(0) if n < 1000 else rate.mean(0)  # the engine's predictions stay the old ones
        n, t = _log_pages(db, cfg, rng, n, t, rng.integers(0, n_users, size=50), head, now_rate, pop)
        loop._live_state()
        _, detail = loop._detect_shift()
        if "population shift" in detail:
            assert found is None, detail  # once
            found = n
            # the states as the shift finds them
            at_change = {s_.user_id: s_ for s_ in store.read([f"u{u}" for u in range(n_users)], deadline_s=5.0)
                         if s_ is not None}
        if found is not None and (n - found) % 100 == 0:  # the loop plans at once, then every few seconds
            loop._plan()
    assert found is not None and 1000 < found <= 1000 + 150 + 50, found
    moved = [s_ for s_ in store.read(list(at_change), deadline_s=5.0) if s_ is not None and s_.before_impressions]
    assert len(moved) >= 200
    for s_ in moved:
        old = at_change[s_.user_id]
        for c in names:  # brought to the user's next page: the pages span 36 s of a 1-hour half-life (< 0.7 %)
            assert s_.before_impressions.get(c, 0.0) == pytest.approx(old.category_impressions.get(c, 0.0), rel=7e-3)
            assert s_.before_impressions.get(c, 0.0) <= old.category_impressions.get(c, 0.0) + 1e-12
    forget = registry.latest_plan(db, cfg.version).solver["forget"]
    assert forget["keep"] == 0.0 and "map" in forget
    st = load_state(db)
    assert st.forget is not None and st.shift_map is not None and np.isfinite(st.shift_map.intercept).all()
    assert (np.argmax(st.shift_map.coef, axis=1) == perm).all()
    # the loop's status (what /readyz and /ops show) names the shift and what the map was fitted on
    shown = loop.status()["shift"]
    assert datetime.fromisoformat(shown["since"]).timestamp() == pytest.approx(forget["epoch"], abs=1e-6)
    assert shown["keep"] == 0.0
    assert shown["map"]["users_per_category"] == dict(zip(names, forget["map"]["users"], strict=True))
    assert shown["map"]["users_both_sides"] >= max(forget["map"]["users"]) and shown["map"]["states_read"] >= len(moved)
    # the pacer's plans carry the shift and the last map as they are (a plan published by hand in
    # between, without them, would otherwise make the workers forget the shift)
    carried = loop._forget_field(refit=False)["forget"]
    assert carried["epoch"] == forget["epoch"] and carried["map"] == forget["map"]
    # serving: a user's stored sums from before the shift go through the map
    uid = moved[0].user_id
    live = live_signals_of(store, st, uid, now=t)
    want = st.shift_map.prior(np.array([moved[0].before_engagement.get(c, 0.0) for c in names]),
                              np.array([moved[0].before_impressions.get(c, 0.0) for c in names]), st.category_rate)
    assert live.before is not None
    assert st.shift_map.prior(live.before[0], live.before[1], st.category_rate) == pytest.approx(want)


@pytest.mark.parametrize("case", ["first_calibration", "no_calibration", "late_calibration"])
def test_a_young_engines_calibration_is_not_a_shift_but_the_same_jump_without_it_is(tmp_path, case):
    """Users' rates stay; after ``at`` pages every logged prediction doubles. With a plan of a new
    calibration published at that moment while the engine is young (1,000 pages: its windows not yet
    full once) the loop judges only the pages predicted with it and finds no shift; without one, the
    same jump is a shift (the detector sees it: the reference for the first case); and once the
    windows have been full (2,400 pages), a recalibration keeps them, so the jump is still found."""
    from datetime import UTC, datetime

    from policy_api import registry
    from policy_api.loop import BackgroundLoop

    db, cat, cfg = _logged_world(tmp_path, "item_events = 0\n")
    config = cfg.config
    names = config.category_names
    prices = dict.fromkeys(config.constraint_names, 0.0)
    registry.publish_plan(db, cfg.version, prices, solver={})  # planned before any traffic: no calibration
    items = [[str(i) for i, c in zip(cat.item_ids, cat.category, strict=True) if c == names[k]] for k in range(C)]
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    rng = np.random.default_rng(0)
    rate = rng.beta(2, 5, size=(300, C))
    pop = rate.mean(0)
    t = datetime.now(tz=UTC).timestamp() - 3600.0  # the pages' own clock; the loop judges by it

    def judge() -> str:
        return loop._detect_shift(now=datetime.fromtimestamp(t + 1.5, tz=UTC))[1]  # every page written settled

    judge()  # from now on
    found, n = None, 0
    at = 2400 if case == "late_calibration" else 1000
    while n < at + 800:  # batches of 50 pages, the shift step after each
        if n == at and case != "no_calibration":
            registry.publish_plan(db, cfg.version, prices, solver={"calibration": {"songs": {"head": [2.0, 10.0]}}})
            judge()
        n, t = _log_pages(db, cfg, rng, n, t, rng.integers(0, 300, size=50), items, rate,
                          pop if n < at else 2.0 * pop)
        if "population shift" in judge() and found is None:
            found = n
    if case == "first_calibration":
        assert found is None, found
    else:
        assert found is not None and at < found <= at + 200 + 50, found
