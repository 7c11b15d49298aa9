"""The background loop: its database lease (one active loop per database, failover to a standby) and
its live-state step (feedback joined to its decision as it arrives, even before the decision row)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest

from policy_api import registry
from policy_api.live import make_state_store
from policy_api.log import (
    insert_decisions,
    insert_feedback,
    make_engine,
    read_catalog_csv,
    upgrade,
    upsert_items,
)
from policy_api.loop import BackgroundLoop, Lease, lease_info
from simulator import make_world


@pytest.fixture
def db(database_url):
    upgrade(database_url)
    eng = make_engine(database_url)
    yield eng
    eng.dispose()


def test_one_lease_holder_and_failover(db):
    a = Lease(db, ttl_s=0.6, holder="a")
    b = Lease(db, ttl_s=0.6, holder="b")
    assert a.acquire() and not b.acquire()
    assert a.renew({"k": 1}) and not b.renew()
    info = lease_info(db)
    assert info is not None and info.holder == "a" and info.status == {"k": 1} and info.live()
    time.sleep(0.8)  # a stops renewing: its lease expires and the standby takes over
    assert b.acquire() and not a.renew() and not a.acquire()
    assert lease_info(db).holder == "b"
    b.release()  # a graceful stop hands over at once
    assert a.acquire()


def _config(tmp_path, world, ttl_s: float = 1.0) -> str:
    return world.default_config_toml() + f"\n[loop]\nlease_ttl_s = {ttl_s}\nlearn_every_s = 3600\ntrain_every_s = 3600\n"


def test_two_loops_one_active_then_failover(db, tmp_path):
    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    # both loops share this process's interpreter here (in a deployment each has its own): the second
    # one's start must not starve the first one's heartbeat past the TTL on a loaded test host
    body = _config(tmp_path, world, ttl_s=4.0)
    registry.activate_config(db, body, author="test")
    upsert_items(db, read_catalog_csv(tmp_path / "items.csv").rows())
    stops = [threading.Event(), threading.Event()]
    loops = [BackgroundLoop(db, holder=h, tick_s=0.05) for h in ("first", "second")]
    threads = [threading.Thread(target=lp.run, args=(st,), daemon=True) for lp, st in zip(loops, stops, strict=True)]
    threads[0].start()
    deadline = time.time() + 20
    while loops[0].role != "active" and time.time() < deadline:
        time.sleep(0.05)
    threads[1].start()
    time.sleep(1.0)
    assert [lp.role for lp in loops] == ["active", "standby"]
    # the active loop planned before any traffic: the config has a plan from a prior over users
    while registry.latest_plan(db, 1) is None and time.time() < deadline:
        time.sleep(0.1)
    assert registry.latest_plan(db, 1) is not None
    stops[0].set()
    threads[0].join(timeout=10)
    deadline = time.time() + 5
    while loops[1].role != "active" and time.time() < deadline:
        time.sleep(0.05)
    assert loops[1].role == "active" and lease_info(db).holder == "second"
    stops[1].set()
    threads[1].join(timeout=10)


class _SlowLoop(BackgroundLoop):
    """A loop whose every tick takes twice the lease's TTL (a long plan or train on a loaded host)."""

    def tick(self, cfg):  # noqa: ANN001, ANN201
        self.ticks = getattr(self, "ticks", 0) + 1
        time.sleep(2.0)


def test_a_tick_longer_than_the_lease_keeps_it(db, tmp_path):
    world = make_world(n_users=30, n_items=200, seed=0)
    registry.activate_config(db, _config(tmp_path, world), author="test")  # lease_ttl_s = 1.0
    stops = [threading.Event(), threading.Event()]
    slow, other = _SlowLoop(db, holder="slow", tick_s=0.01), BackgroundLoop(db, holder="other", tick_s=0.01)
    threads = [threading.Thread(target=lp.run, args=(st,), daemon=True)
               for lp, st in zip((slow, other), stops, strict=True)]
    threads[0].start()
    deadline = time.time() + 20
    while slow.role != "active" and time.time() < deadline:
        time.sleep(0.01)
    threads[1].start()
    roles = set()
    end = time.time() + 5.0  # five TTLs, two and a half slow ticks
    while time.time() < end:
        roles.add((slow.role, other.role))
        time.sleep(0.02)
    assert roles <= {("active", "standby"), ("active", "starting")} and ("active", "standby") in roles
    assert slow.ticks >= 2 and lease_info(db).holder == "slow"
    for st in stops:
        st.set()
    for t in threads:
        t.join(timeout=10)
    assert lease_info(db).live() is False  # the graceful stop handed the lease back


def _decision(rid: str, user: str, t: datetime) -> dict:
    return {"request_id": rid, "ts": t, "user_id": user, "context": {}, "versions": {}, "policy": "test",
            "candidates": [], "pmf": [1.0], "chosen": 0, "propensity": 1.0, "layout": [], "fallback_reason": None}


def _event(eid: str, rid: str, item: str, kind: str, t: datetime, slot: int | None = 0) -> dict:
    return {"event_id": eid, "request_id": rid, "slot": slot, "item_id": item, "type": kind, "value": None, "ts": t}


@pytest.mark.parametrize("impressions", ["viewed", "rendered"])
def test_live_state_joins_feedback_as_it_arrives(db, tmp_path, impressions):
    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    text = _config(tmp_path, world).replace("[homepage]\n", f'[homepage]\nimpressions = "{impressions}"\n', 1)
    cfg_id = registry.activate_config(db, text, author="test")
    cat = read_catalog_csv(tmp_path / "items.csv")
    upsert_items(db, cat.rows())
    cfg = registry.active_config(db)
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    assert loop._live_state()[0] == "idle"  # the first tick starts from now
    items = [str(i) for i in cat.item_ids[:4]]
    category = dict(zip(map(str, cat.item_ids), map(str, cat.category), strict=True))
    t = datetime.now(tz=UTC)
    insert_decisions(db, [_decision("r1", "u1", t)])
    # feedback for r2 arrives before r2's decision row (another worker's queue); skips are negatives;
    # an event id sent twice is stored once (ON CONFLICT); impressions count as examined impressions of
    # their category (a viewed one as 1; a rendered one as its slot's position weight over the mean
    # weight, 1 without a slot)
    insert_feedback(db, [_event("e1", "r1", items[0], "play", t), _event("e2", "r1", items[1], "skip", t),
                         _event("e3", "r2", items[2], "favorite", t), _event("e4", "r1", items[3], "impression", t),
                         _event("e5", "r1", items[0], "impression", t, slot=2),
                         _event("e6", "r1", items[1], "impression", t, slot=None)])
    insert_feedback(db, [_event("e1", "r1", items[0], "play", t)])
    outcome, detail = loop._live_state()
    assert outcome == "ok" and "2 events and impressions of" in detail and "1 waiting" in detail
    store = make_state_store("sql", db)
    u1 = store.read(["u1"], deadline_s=1.0)[0]
    assert u1 is not None and set(u1.items) == {items[0], items[1]} and u1.n_positive == 1 and u1.n_negative == 1
    assert list(u1.negatives()) == [items[1]]
    # the category sums count the items of each category's head only (the config's head_share split)
    import numpy as np

    from allocator import long_tail

    names = cfg.config.category_names
    tail_of = dict(zip(map(str, cat.item_ids), long_tail(
        cat.popularity, np.array([names.index(c) for c in cat.category.tolist()]), cfg.config.tilt.head_share)[0].tolist(),
        strict=True))
    units = cfg.config.events
    want = {}
    for i, k in ((items[0], "play"), (items[1], "skip")):
        if not tail_of[i]:
            want[category[i]] = want.get(category[i], 0.0) + units[k]
    assert u1.category_engagement == pytest.approx(want, abs=1e-6)
    pw = list(cfg.config.position_weights) if impressions == "rendered" else [1.0] * cfg.config.slots
    shown: dict[str, float] = {}
    for i, w in ((items[3], pw[0]), (items[0], pw[2]), (items[1], sum(pw) / len(pw))):
        if not tail_of[i]:
            shown[category[i]] = shown.get(category[i], 0.0) + w / (sum(pw) / len(pw))
    assert u1.category_impressions == pytest.approx(shown, abs=1e-9)
    assert any(tail_of[i] for i in items[:4]) and not all(tail_of[i] for i in items[:4])  # both kinds here
    assert set(u1.items) == {items[0], items[1]}  # impressions join no sequence
    insert_decisions(db, [_decision("r2", "u2", t)])
    assert loop._live_state()[0] == "ok"
    u2 = store.read(["u2"], deadline_s=1.0)[0]
    assert u2 is not None and u2.items == (items[2],) and u2.n_positive == 1
    assert cfg_id == 1
    store.close()


def test_calibration_follows_a_shift_in_engagement_and_plans_again(db, tmp_path):
    """The calibration counts only the last ``calibration_events`` events (reference: the rates of the
    newest rows, counted by hand), and the loop plans again when a rate moves by more than 20 % although
    the impressions behind it have not doubled; not when the rate stays."""
    from datetime import timedelta

    import numpy as np

    from allocator import long_tail
    from policy_api import jobs
    from policy_api.loop._loop import CALIBRATION_SHIFT

    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    # item_events = 0: the items' own rates (and the replan on their evidence) are another test's
    registry.activate_config(db, _config(tmp_path, world) + "calibration_events = 4000\nitem_events = 0\n",
                             author="test")
    cat = read_catalog_csv(tmp_path / "items.csv")
    upsert_items(db, cat.rows())
    cfg = registry.active_config(db)
    names = cfg.config.category_names
    is_tail, _ = long_tail(cat.popularity, np.array([names.index(c) for c in cat.category.tolist()]),
                           cfg.config.tilt.head_share)
    head = [str(i) for i, c, t in zip(cat.item_ids, cat.category, is_tail, strict=True) if c == names[0] and not t]
    t0 = datetime.now(tz=UTC) - timedelta(minutes=30)
    n = [0]

    def phase(impressions: int, plays: int, start: datetime) -> None:
        kinds = ["impression"] * impressions + ["play"] * plays
        rows = [_event(f"e{n[0] + k}", f"r{n[0] + k}", head[k % len(head)], kind, start + timedelta(milliseconds=k))
                for k, kind in enumerate(kinds)]
        n[0] += len(rows)
        insert_decisions(db, [_decision(r["request_id"], "u0", r["ts"]) for r in rows])  # served without a live state
        insert_feedback(db, rows)

    assert cfg.config.impressions == "viewed"
    f = 1.0  # a viewed impression (slot 0) counts as one examined impression
    phase(2000, 600, t0)  # songs' head engages at 0.3 per impression
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    first = jobs.plan(db, users=20)
    # decisions without a live state: all of it is unpersonalised feedback, shrunk toward its own rate (the rate stays)
    k = jobs.UNPERSONALISED_PRIOR

    def shrunk(units: float, imps: float) -> list[float]:
        return [units + k * units / imps, imps + k]

    assert first.solver["calibration"][names[0]]["head"] == pytest.approx(shrunk(600.0, 2000.0 * f))
    assert loop._calibrate()[0] == "idle"
    phase(3080, 920, t0 + timedelta(minutes=5))  # 4,000 more at 0.2987: the window holds these only
    got = jobs.calibration(db, cfg.config)
    assert got is not None and got[names[0]]["head"] == pytest.approx(shrunk(920.0, 3080.0 * f))
    assert loop._calibrate()[0] == "idle"  # moved by 0.4 %, and 3,080 < 2 x 2,000 impressions
    phase(2800, 1200, t0 + timedelta(minutes=10))  # now 0.4286: moved by 43 %
    outcome, detail = loop._calibrate()
    assert 1200 / 2800 / 0.3 - 1 > CALIBRATION_SHIFT
    assert outcome == "ok" and "moved by 43%" in detail, detail


def test_the_loop_plans_again_as_the_items_evidence_grows(db, tmp_path):
    """With item rates on, the loop recalibrates once the feedback since the plan's calibration has grown
    by a quarter of the item window (at least 2,000 events), though no category's rate moved; the plan
    records the log's newest feedback row, and item_events = 0 turns this off."""
    from datetime import timedelta

    from policy_api import jobs
    from policy_api.loop._loop import _MIN_NEW_EVENTS, CALIBRATE_S, ITEM_EVIDENCE_GROWTH, YOUNG_CALIBRATE_S

    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    body = _config(tmp_path, world) + "item_events = 16000\n"
    registry.activate_config(db, body, author="test")
    cat = read_catalog_csv(tmp_path / "items.csv")
    upsert_items(db, cat.rows())
    items = [str(i) for i in cat.item_ids[:50]]
    t0 = datetime.now(tz=UTC) - timedelta(minutes=30)
    n = [0]

    def phase(events: int) -> None:  # one play per two impressions: the rates never move
        kinds = (["impression", "impression", "play"] * (events // 3 + 1))[:events]
        rows = [_event(f"e{n[0] + k}", f"r{n[0] + k}", items[k % 50], kind, t0 + timedelta(milliseconds=n[0] + k))
                for k, kind in enumerate(kinds)]
        n[0] += len(rows)
        insert_feedback(db, rows)

    phase(6000)
    cfg = registry.active_config(db)
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    first = jobs.plan(db, users=20)
    was = jobs.feedback_seen(db)  # the newest feedback row's id (6,000 rows in a fresh database)
    assert first.solver["feedback_seen"] == was >= 6000
    step = int(max(ITEM_EVIDENCE_GROWTH * min(was, 16000), _MIN_NEW_EVENTS))
    phase(step - 1)
    assert loop._calibrate()[0] == "idle"
    phase(1)
    outcome, detail = loop._calibrate()
    assert outcome == "ok" and f"{step} feedback events since the plan's item rates" in detail, detail
    # while the plan in force carries no item's own rate the loop looks again every YOUNG_CALIBRATE_S
    # (its first item rates are what a young engine gains most from); once it does, every CALIBRATE_S.
    # The plan carries a calibration: not the first looks' FIRST_CALIBRATE_S, though the config is new
    assert first.solver["calibration"] and not any("items" in v for v in first.solver["calibration"].values())
    assert loop._young and loop._next_calibrate_s() == YOUNG_CALIBRATE_S
    # ... until the config's first item_events feedback events have come without item rates
    phase(16000 - (jobs.feedback_seen(db) - was) - step)
    loop._calibrate()
    assert loop._young
    phase(step)
    loop._calibrate()
    assert not loop._young and loop._next_calibrate_s() == CALIBRATE_S
    # the same calibration with one category's item rates (as a plan carries them once 20 of its head
    # items are measured): from then on the loop looks every CALIBRATE_S
    cal = {**first.solver["calibration"]}
    some = next(iter(cal))
    cal[some] = {**cal[some], "items": {"ids": items[:3], "units": [1.0, 2.0, 3.0], "exposure": [60.0] * 3}}
    registry.publish_plan(db, cfg.version, first.prices, projected=first.projected,
                          solver={**first.solver, "calibration": cal, "feedback_seen": jobs.feedback_seen(db)})
    assert loop._calibrate()[0] == "idle" and not loop._young and loop._next_calibrate_s() == CALIBRATE_S
    registry.activate_config(db, _config(tmp_path, world) + "item_events = 0\n", author="test")
    cfg = registry.active_config(db)
    loop._on_config(cfg)
    jobs.plan(db, users=20)
    phase(9000)
    assert loop._calibrate()[0] == "idle"
    assert not loop._young  # no item rates to wait for


def test_a_loop_with_nothing_to_calibrate_on_stops_looking_often(db, tmp_path):
    """Without impressions there is nothing to calibrate on: the loop looks every FIRST_CALIBRATE_S for
    FIRST_CALIBRATE_FOR_S after taking up the config, every YOUNG_CALIBRATE_S until YOUNG_UNMEASURED_S
    (a young engine's first impressions come within seconds), then every CALIBRATE_S."""
    from policy_api import jobs
    from policy_api.loop._loop import (
        CALIBRATE_S,
        FIRST_CALIBRATE_FOR_S,
        FIRST_CALIBRATE_S,
        YOUNG_CALIBRATE_S,
        YOUNG_UNMEASURED_S,
    )

    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    registry.activate_config(db, _config(tmp_path, world), author="test")
    cat = read_catalog_csv(tmp_path / "items.csv")
    upsert_items(db, cat.rows())
    t0 = datetime.now(tz=UTC)
    insert_feedback(db, [_event(f"e{k}", f"r{k}", str(cat.item_ids[k % 50]), "play", t0) for k in range(500)])
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(registry.active_config(db))
    jobs.plan(db, users=20)
    assert FIRST_CALIBRATE_S < YOUNG_CALIBRATE_S < CALIBRATE_S
    assert loop._calibrate()[0] == "idle" and loop._next_calibrate_s() == FIRST_CALIBRATE_S
    loop._config_since -= FIRST_CALIBRATE_FOR_S  # ten seconds on: the first looks are over
    assert loop._calibrate()[0] == "idle" and loop._next_calibrate_s() == YOUNG_CALIBRATE_S
    loop._config_since -= YOUNG_UNMEASURED_S  # two minutes on, still no impression
    assert loop._calibrate()[0] == "idle" and loop._next_calibrate_s() == CALIBRATE_S


def _loop_with_a_pacer(db, tmp_path, prices):
    """A loop on a fresh catalog and config, and a re-solving pacer for its bounds at ``prices`` (one per
    constraint, cut to their number)."""
    import numpy as np

    from allocator import ResolvePacer, ResolvePacerConfig

    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    registry.activate_config(db, _config(tmp_path, world), author="test")
    upsert_items(db, read_catalog_csv(tmp_path / "items.csv").rows())
    cfg = registry.active_config(db)
    names = cfg.config.constraint_names
    lo, hi = cfg.config.bounds()
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    pacer = ResolvePacer(ResolvePacerConfig(lower=tuple(lo), upper=tuple(hi), temperature=0.02, names=names),
                         prices=np.array(prices)[:len(names)])
    return cfg, loop, pacer


def test_a_new_plan_keeps_the_pacers_prices_once_it_has_solved_a_window(db, tmp_path):
    """The planner prices sampled users without their live state; once the pacer has re-solved on a
    full window served under the config, a re-plan (a new calibration) publishes the pacer's prices
    with the new calibration instead of jumping to the planner's, and does not solve the plan."""
    from datetime import timedelta

    from policy_api import jobs
    from policy_api.loop._loop import _Pacing

    cfg, loop, pacer = _loop_with_a_pacer(db, tmp_path, [0.123, 0.456])
    names = cfg.config.constraint_names
    mine = pacer.prices_.copy()
    window = cfg.config.loop.pace_window
    # what counts is the decisions re-solved on under this config over all plans (``solved``), not under
    # the newest plan (``fresh``), which each re-plan starts again
    for solved, source in ((window - 1, "planner"), (window, "pacer")):
        # the reference: what the planner alone says, on the same database, as the loop calls it
        planner = jobs.plan(db, users=cfg.config.loop.plan_users, since=datetime.now(tz=UTC) - timedelta(hours=24),
                            publish=False).prices
        want = planner if source == "planner" else dict(zip(names, mine.tolist(), strict=True))
        loop._pacing = _Pacing(cfg.version, pacer, datetime.now(tz=UTC), 0, fresh=0, solved=solved)
        assert loop._plan()[0] == "ok"
        plan = registry.latest_plan(db, cfg.version)
        assert plan is not None and plan.prices == pytest.approx(want), source
        assert plan.solver["prices_from"] == source
        if source == "planner":
            assert plan.solver["planner_prices"] == pytest.approx(planner)
        else:  # no solve: the plan brings the calibration and the pacer's price sensitivity (an empty window: 0)
            assert plan.solver["method"] == "recalibrate" and "planner_prices" not in plan.solver
            assert plan.solver["price_slope"] == dict.fromkeys(names, 0.0)
            assert plan.solver.get("calibration") == jobs.plan_calibration(db, cfg)[0]


def test_before_the_pacer_owns_the_prices_the_planners_move_is_bounded_by_its_trust_region(db, tmp_path):
    """A pacer that has re-solved on served candidate sets, too few to own the prices: the planner's
    prices are published clipped to the pacer's trust region around its own (``max_step`` times the
    larger of each price's size and a quarter of the window's median value range), computed here from
    the window's arrays."""
    from datetime import timedelta

    import numpy as np

    from policy_api import jobs
    from policy_api.loop._loop import _Pacing

    cfg, loop, pacer = _loop_with_a_pacer(db, tmp_path, [0.01, 0.002])
    names = cfg.config.constraint_names
    K = len(names)
    mine = pacer.prices_.copy()
    rng = np.random.default_rng(0)
    value = rng.uniform(1.0, 1.1, (50, 6))  # a value range of ~0.1 per request
    pacer._keep(value, rng.uniform(0, 0.3, (50, 6, K)), np.ones((50, 6), dtype=bool))
    planner = jobs.plan(db, users=cfg.config.loop.plan_users, since=datetime.now(tz=UTC) - timedelta(hours=24),
                        publish=False).prices
    loop._pacing = _Pacing(cfg.version, pacer, datetime.now(tz=UTC), 0, fresh=0, solved=50)
    assert loop._plan()[0] == "ok"
    plan = registry.latest_plan(db, cfg.version)
    reach = np.maximum(np.abs(mine), 0.25 * np.median(value.max(axis=1) - value.min(axis=1)))
    want = np.clip([planner[n] for n in names], mine - reach, mine + reach)
    assert [plan.prices[n] for n in names] == pytest.approx(want.tolist())
    assert plan.solver["prices_from"] == "planner" and plan.solver["planner_prices"] == pytest.approx(planner)
    assert any(abs(planner[n] - w) > 1e-6 for n, w in zip(names, want, strict=True))  # the region binds


def test_the_planner_solves_off_the_loops_thread_and_is_clipped_to_the_pacer_as_it_then_stands(db, tmp_path):
    """Before the pacer owns the prices, the plan step starts the planner on a thread of its own and
    returns at once, so that the loop goes on pacing. The plan is published only once the pacer's state
    can be read (under its lock, which pacing holds), clipped to the trust region of the pacer as it
    stands then, not when the solve began: computed here from the moved prices and the window's arrays."""
    from datetime import timedelta

    import numpy as np

    from policy_api import jobs
    from policy_api.loop._loop import _Pacing

    cfg, loop, pacer = _loop_with_a_pacer(db, tmp_path, [0.01, 0.002])
    names = cfg.config.constraint_names
    K = len(names)
    rng = np.random.default_rng(0)
    value = rng.uniform(1.0, 1.1, (50, 6))
    pacer._keep(value, rng.uniform(0, 0.3, (50, 6, K)), np.ones((50, 6), dtype=bool))
    first = registry.publish_plan(db, cfg.version, dict(zip(names, pacer.prices_.tolist(), strict=True)))
    planner = jobs.plan(db, users=cfg.config.loop.plan_users, since=datetime.now(tz=UTC) - timedelta(hours=24),
                        publish=False).prices
    loop._pacing = _Pacing(cfg.version, pacer, datetime.now(tz=UTC), first, fresh=0, solved=50)
    moved = pacer.prices_ * 3.0
    with loop._pacer_lock:  # as a pacing step holds it
        assert loop._plan_step() == ("ok", "planning in the background (the pacer goes on)")
        assert loop.planning
        pacer.prices_ = moved.copy()  # the pacer moves while the planner solves
        time.sleep(0.2)
        latest = registry.latest_plan(db, cfg.version)
        assert latest is not None and latest.version == first  # nothing published while the pacer is held
    assert loop._planner is not None
    loop._planner.join(timeout=120)
    assert not loop.planning
    plan = registry.latest_plan(db, cfg.version)
    assert plan is not None and plan.version > first and plan.solver["prices_from"] == "planner"
    reach = np.maximum(np.abs(moved), 0.25 * np.median(value.max(axis=1) - value.min(axis=1)))
    want = np.clip([planner[n] for n in names], moved - reach, moved + reach)
    assert [plan.prices[n] for n in names] == pytest.approx(want.tolist())
    assert loop.steps["plan"].outcome == "ok" and f"plan version {plan.version}" in loop.steps["plan"].detail
    # once the pacer owns the prices, the step recalibrates on the loop's thread: no planner thread
    loop._pacing.solved = cfg.config.loop.pace_window
    assert loop._plan_step()[0] == "ok" and not loop.planning
    latest = registry.latest_plan(db, cfg.version)
    assert latest is not None and latest.solver["prices_from"] == "pacer"


def _loop_pacing_from_a_plan(db, tmp_path):
    """A loop on a fresh catalog and config that has planned and started its pacer, and an engine serving
    that plan: (config record, loop, plan, engine)."""
    from policy_api.engine import DecisionEngine, load_state

    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    registry.activate_config(db, _config(tmp_path, world), author="test")
    upsert_items(db, read_catalog_csv(tmp_path / "items.csv").rows())
    cfg = registry.active_config(db)
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    assert loop._plan()[0] == "ok"
    plan = registry.latest_plan(db, cfg.version)
    engine = DecisionEngine(load_state(db))
    assert loop._pace() == ("ok", "pacer started from the plan's prices")
    return cfg, loop, plan, engine


def test_the_pacer_re_solves_only_on_candidates_the_newest_ranker_scored(db, tmp_path):
    """Candidate sets a ranker scored before a newer one was published are dropped from the pacer's
    window (as those served under an older plan are): the pacer's window and its count of fresh
    decisions are those of the newest ranker's decisions, counted here from the rows written."""
    from policy_api.log import insert_decisions

    cfg, loop, plan, engine = _loop_pacing_from_a_plan(db, tmp_path)
    p = loop._pacing
    n = [0]

    def serve(count: int, ranker: int | None) -> None:
        rows = []
        for _ in range(count):
            d = engine.decide(f"u{n[0] % 7}", f"r{n[0]}").row()
            d["versions"] = {**d["versions"], "plan": plan.version, "ranker": ranker}
            rows.append(d)
            n[0] += 1
        insert_decisions(db, rows)
        time.sleep(0.6)  # the pacer reads decisions older than half a second (a worker's log queue)

    serve(40, None)  # the built-in scorer
    assert loop._pace()[0] == "ok"
    assert p.fresh == 40 and p.pacer._value.shape[0] == 40 and p.ranker == 0
    serve(25, 1)  # a ranker is published: the 40 built-in decisions leave the window
    assert loop._pace()[0] == "ok"
    assert p.ranker == 1 and p.fresh == 25 and p.pacer._value.shape[0] == 25 and p.solved == 65
    serve(10, 1)
    serve(5, None)  # a worker that has not swapped yet: counted as exposure, not re-solved on
    assert loop._pace()[0] == "ok"
    assert p.fresh == 35 and p.pacer._value.shape[0] == 35 and p.solved == 75


def test_a_recalibration_beside_the_pacers_prices_keeps_its_window(db, tmp_path):
    """A new plan that kept the pacer's prices and brought only a calibration leaves the pacer's window
    as it was (the decisions served before and after it are re-solved on), with or without a population
    shift; after a shift the pacer owns the prices after 200 decisions instead of a full window. A plan
    with the planner's prices starts the window again from its own decisions. Counted from the rows
    written."""
    from policy_api.engine import DecisionEngine, load_state
    from policy_api.live import Forget
    from policy_api.log import insert_decisions

    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    registry.activate_config(db, _config(tmp_path, world), author="test")
    upsert_items(db, read_catalog_csv(tmp_path / "items.csv").rows())
    cfg = registry.active_config(db)
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    assert loop._plan()[0] == "ok"
    engine = DecisionEngine(load_state(db))
    assert loop._pace() == ("ok", "pacer started from the plan's prices")
    p = loop._pacing
    assert p is not None
    n = [0]

    def serve(count: int, plan: int) -> None:
        rows = []
        for _ in range(count):
            d = engine.decide(f"u{n[0] % 7}", f"r{n[0]}").row()
            d["versions"] = {**d["versions"], "plan": plan, "ranker": None}
            rows.append(d)
            n[0] += 1
        insert_decisions(db, rows)
        time.sleep(0.6)  # the pacer reads decisions older than half a second (a worker's log queue)

    def plan_now(source: str) -> int:
        assert loop._plan()[0] == "ok"
        got = registry.latest_plan(db, cfg.version)
        assert got is not None and got.solver["prices_from"] == source
        return got.version

    first = registry.latest_plan(db, cfg.version)
    assert first is not None
    serve(40, first.version)
    assert loop._pace()[0] == "ok" and p.pacer._value.shape[0] == 40
    # no shift: a recalibration beside the pacer's prices keeps its window
    p.solved = cfg.config.loop.pace_window
    steady = plan_now("pacer")
    serve(10, first.version)  # a worker that has not taken up the recalibration yet
    serve(15, steady)
    assert loop._pace()[0] == "ok"
    assert p.valued_from == first.version and p.pacer._value.shape[0] == 40 + 10 + 15
    # a shift: the loop settles (its calibration restarts there), and the pacer keeps its window
    loop._forget = Forget(time.time(), 0.0)
    loop._shift_feedback = 1
    assert loop._settling()
    p.solved = 199
    shifted = plan_now("planner")  # not 200 decisions yet: the planner's prices, a new window
    serve(3, shifted)
    assert loop._pace()[0] == "ok"
    assert p.valued_from == shifted and p.pacer._value.shape[0] == 3
    p.solved = 200
    recal = plan_now("pacer")
    serve(10, shifted)
    serve(15, recal)
    assert loop._pace()[0] == "ok"
    assert p.valued_from == shifted and p.pacer._value.shape[0] == 3 + 10 + 15
    p.solved = 0  # the planner's prices again (as `homepage plan` would publish them)
    planned = plan_now("planner")
    serve(5, recal)
    serve(12, planned)
    assert loop._pace()[0] == "ok"
    assert p.valued_from == planned and p.pacer._value.shape[0] == 12


def test_a_restarted_loop_counts_new_events_from_the_newest_ranker(db, tmp_path):
    """A loop taking over (a restart, a failover) does not retrain on the whole log at once: it waits
    ``train_every_s`` from the newest ranker record and counts new events from the feedback that ranker
    was trained through (``metrics["feedback_through"]``)."""
    world = make_world(n_users=30, n_items=200, seed=0)
    world.to_catalog_csv(tmp_path / "items.csv")
    cat = read_catalog_csv(tmp_path / "items.csv")
    upsert_items(db, cat.rows())
    body = world.default_config_toml() + "\n[loop]\ntrain_every_s = 0.5\ntrain_min_events = 50\n"
    registry.activate_config(db, body, author="test")
    cfg = registry.active_config(db)
    items = [str(i) for i in cat.item_ids[:40].tolist()]
    now = datetime.now(tz=UTC)

    def plays(start: int, n: int) -> None:
        rows = [_event(f"e{k}", f"r{k}", items[k % len(items)], "play", now) for k in range(start, start + n)]
        insert_decisions(db, [_decision(r["request_id"], f"u{k % 7}", now) for k, r in enumerate(rows)])
        insert_feedback(db, rows)

    plays(0, 300)
    through = 300  # feedback ids 1..300
    registry.publish_model(db, "ranker", {"feedback_through": through}, None, status="rejected")
    loop = BackgroundLoop(db, holder="t")
    loop._on_config(cfg)
    assert loop._train() == ("idle", "")  # 300 events, but a ranker was trained on them just now
    time.sleep(0.6)
    assert loop._train() == ("idle", "")  # train_every_s has passed; nothing new since the ranker
    plays(300, 60)
    outcome, detail = loop._train()
    assert outcome == "ok" and detail == "training started on 60 new behaviour events", detail
    loop._training.thread.join(60)


def test_the_pacer_keeps_the_block_tables_of_its_fresh_sampled_decisions(db, tmp_path):
    """The decisions that log their block table (``[loop] pace_sample``) hand it to the pacer through the
    log: its table window holds exactly the sampled decisions among those it re-solves on (counted here
    from the rows written), rebuilds their logged candidates exactly, and leaves out those a ranker
    older than the newest scored."""
    import numpy as np

    from allocator import LayoutSpace
    from policy_api.log import insert_decisions

    cfg, loop, plan, engine = _loop_pacing_from_a_plan(db, tmp_path)
    assert cfg.config.loop.pace_sample == 0.25
    p = loop._pacing
    made: dict[str, object] = {}

    def serve(count: int, ranker: int | None, start: int) -> list[str]:
        rows, sampled = [], []
        for k in range(start, start + count):
            d = engine.decide(f"u{k % 7}", f"r{k}")
            row = d.row()
            row["versions"] = {**row["versions"], "plan": plan.version, "ranker": ranker}
            rows.append(row)
            made[d.request_id] = d
            if "pace" in d.context:
                sampled.append(d.request_id)
        insert_decisions(db, rows)
        time.sleep(0.6)  # the pacer reads decisions older than half a second
        return sampled

    first = serve(120, None, 0)
    assert loop._pace()[0] == "ok"
    tables = p.pacer._tables
    assert tables is not None and len(tables) == p.pacer.tables_kept == len(first) > 10
    # the pacer solved on the rebuilt sets once it held 30 tables, on the served sets before
    assert p.pacer.solved_on_ == ("rebuilt" if len(first) >= 30 else "served")
    space = LayoutSpace.from_config(cfg.config)
    value, exposure, ok = tables.candidates(space, engine.state.prices)
    for row, rid in enumerate(first):  # in the log's order: the rows as written
        logged = made[rid].candidates
        real = np.flatnonzero(ok[row])
        assert real.size == len(logged)
        np.testing.assert_allclose(value[row, real], [c["value"] for c in logged], atol=2e-6)
    second = serve(80, 1, 120)  # a ranker is published: the built-in scorer's tables leave
    assert loop._pace()[0] == "ok"
    assert len(p.pacer._tables) == len(second)


def test_a_planner_that_finishes_after_the_pacer_came_to_own_the_prices_keeps_them(db, tmp_path):
    """The planner starts while the pacer is young; if the pacer owns the prices by the time the plan is
    solved, the plan is published with the pacer's prices and the planner's calibration (prices_from
    "pacer", which the pacer takes as a recalibration beside its prices, not a restart)."""
    import numpy as np

    from policy_api.loop._loop import _Pacing

    cfg, loop, pacer = _loop_with_a_pacer(db, tmp_path, [0.01, 0.002])
    names = cfg.config.constraint_names
    rng = np.random.default_rng(1)
    pacer._keep(rng.uniform(1.0, 1.1, (50, 6)), rng.uniform(0, 0.3, (50, 6, len(names))), np.ones((50, 6), dtype=bool))
    first = registry.publish_plan(db, cfg.version, dict(zip(names, pacer.prices_.tolist(), strict=True)))
    loop._pacing = _Pacing(cfg.version, pacer, datetime.now(tz=UTC), first, fresh=0, solved=50)
    with loop._pacer_lock:
        assert loop._plan_step() == ("ok", "planning in the background (the pacer goes on)")
        pacer.prices_ = np.array([0.7, 0.3])[:len(names)]
        loop._pacing.solved = cfg.config.loop.pace_window  # the pacer comes to own the prices meanwhile
    assert loop._planner is not None
    loop._planner.join(timeout=120)
    plan = registry.latest_plan(db, cfg.version)
    assert plan is not None and plan.version > first
    assert plan.solver["prices_from"] == "pacer" and "planner_prices" in plan.solver
    assert [plan.prices[n] for n in names] == pytest.approx(pacer.prices_.tolist())
