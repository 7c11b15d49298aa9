"""The analyst / ML-engineer jobs (`homepage learn`, `homepage replay`, `homepage log export`) on a real log.

One log is built per module, without mocks: the in-process decision engine (a ranker that knows the
simulator's true engagement for most users, so candidate counts vary per request, plus a few safe-default
decisions) serves simulated traffic, the simulator draws what each user did on the page it was shown, and
both go to a real SQLite database through the store. Every number is checked against a slow Python
recomputation from the raw decision rows and feedback events.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from allocator import parse_config_text
from bandits import VWLayoutBandit, budget_pmf, parse_dsjson_line
from policy_api import log as store
from policy_api import registry
from policy_api.engine import DecisionEngine, RequestIds, ScorerHandle, build_state
from policy_api.jobs import (
    config_candidates,
    learn,
    load_log,
    log_features,
    log_from_parquet,
    new_bandit,
    replay,
    target_distribution,
)
from policy_api.log import join_rewards, make_engine, read_parquet, upgrade
from simulator import make_world
from tests.test_common import world_catalog

WINDOW_S = 600.0
DEFAULT_REWARD = -0.25
T0 = datetime(2024, 3, 1, tzinfo=UTC).timestamp()
STEP_S = 5.0  # decision k is made at T0 + k * STEP_S
N_MAIN = 900  # decisions in the database
N_EXTRA = 150  # decisions made later, held back (their feedback arrives first: orphans until they land)
FALLBACK_EVERY = 75  # every 75th request hits a broken ranker and gets the safe default
PRICES = {"live_floor": 0.8, "long_tail": -0.3}  # the active plan's duals for config version 1


# ---- the log ------------------------------------------------------------------------------------
class TrueScorer:
    """A ranker that knows the simulator's expected engagement of known users (unknown: a popularity
    prior and flat preferences), so candidate layouts and shared features differ per user."""

    def __init__(self, world: Any) -> None:
        self.world = world
        self.prior = 0.1 + 0.6 * world.popularity / world.popularity.max()

    def score(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray:
        if user_idx < 0:
            return self.prior[item_idx]
        return self.world.expected_units(np.full(item_idx.size, user_idx), item_idx)

    def category_preferences(self, user_idx: int) -> np.ndarray:
        if user_idx < 0:
            return np.full(self.world.n_categories, 1.0 / self.world.n_categories)
        return np.asarray(self.world.user_affinity[user_idx], dtype=np.float64)


class SeededIds(RequestIds):
    """Signed request ids drawn from a seeded generator, so the log (whose draws the ids seed) is
    the same on every run."""

    def __init__(self, secret: bytes, rng: np.random.Generator) -> None:
        super().__init__(secret)
        self.rng = rng

    def issue(self) -> str:
        body = self.rng.bytes(12).hex()
        return f"{body}.{self._tag(body)}"


class Broken:
    def score(self, user_idx: int, item_idx: np.ndarray) -> np.ndarray:
        raise RuntimeError("ranker backend down")


@dataclass
class Log:
    dir: Path
    url: str
    db: Any
    world: Any
    text: str  # the logged config's TOML
    cfg: Any
    rows: list[dict[str, Any]]  # decision rows in the database, in time order (fallbacks included)
    extra: list[dict[str, Any]]  # held-back decision rows (later than every row above)
    events: dict[str, list[dict[str, Any]]]  # request id -> its stored feedback rows (first of duplicates)
    env: dict[str, str]

    @property
    def serving(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["candidates"]]


def _items_of(world: Any, row: dict[str, Any], index: dict[str, int]) -> np.ndarray:
    return np.array([[index[it["item_id"]] for it in m["items"]] for m in row["layout"]], dtype=np.int64)


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Log:
    tmp = tmp_path_factory.mktemp("jobs_bandit")
    world = make_world(n_users=60, n_items=400, seed=11)
    text = world.default_config_toml() + (f"\n[learning]\nreward_window_s = {WINDOW_S!r}\n"
                                          f"default_reward = {DEFAULT_REWARD!r}\n")
    cfg = parse_config_text(text)
    cat = world_catalog(world)
    known = {u: k for k, u in enumerate(world.user_ids.tolist()[:45])}  # the last 15 users are unknown
    prices = np.array([PRICES[n] for n in cfg.constraint_names])
    state = build_state(cfg, cat, scorer=ScorerHandle(TrueScorer(world), user_index=known, name="truth"),
                        prices=prices, versions={"config": 1, "plan": 1})
    good, broken = DecisionEngine(state), DecisionEngine(replace(state, scorer=ScorerHandle(Broken())))
    rng = np.random.default_rng(7)
    ids = SeededIds(b"test-key", rng)
    users = world.sample_users(N_MAIN + N_EXTRA, rng)
    index = {iid: k for k, iid in enumerate(world.item_ids.tolist())}
    rows, fb = [], []
    for k, u in enumerate(users.tolist()):
        eng = broken if k % FALLBACK_EVERY == FALLBACK_EVERY - 1 else good
        d = eng.decide(str(world.user_ids[u]), ids.issue())
        d.ts = T0 + STEP_S * k
        # the references below read the candidates one dict each (the store encodes them back to the
        # engine's columnar form)
        row = {**d.row(), "candidates": d.candidates}
        rows.append(row)
        mode = rng.random()
        if mode < 0.06:  # the client never reported
            continue
        evs = world.sample_feedback(u, _items_of(world, row, index), rng)
        late = mode < 0.11  # everything arrives after the window
        delay = WINDOW_S + 1 + rng.exponential(200.0, len(evs)) if late else rng.exponential(150.0, len(evs))
        for j, ((slot, item, kind), dt) in enumerate(zip(evs, delay.tolist(), strict=True)):
            t = datetime.fromtimestamp(d.ts + dt, tz=UTC)
            fb.append({"event_id": f"{d.request_id}/{j}", "request_id": d.request_id, "slot": slot,
                       "item_id": str(world.item_ids[item]), "type": kind, "value": None, "ts": t,
                       "received_at": t + timedelta(seconds=0.5)})
    main, extra = rows[:N_MAIN], rows[N_MAIN:]
    url = f"sqlite:///{tmp / 'homepage.db'}"
    upgrade(url)
    db = make_engine(url)
    store.upsert_items(db, cat.rows())
    assert registry.activate_config(db, text, author="test") == 1
    registry.publish_plan(db, 1, PRICES)
    store.insert_decisions(db, main)
    store.insert_feedback(db, fb)
    # a client retrying a batch with altered payloads: the stored events (first writes) are kept
    retry = [dict(e, type="share") for e in fb[::97]]
    store.insert_feedback(db, retry)
    events: dict[str, list[dict[str, Any]]] = {}
    for e in fb:
        events.setdefault(e["request_id"], []).append(e)
    (tmp / "homepage.toml").write_text(text)
    world.to_catalog_csv(tmp / "items.csv")
    env = {k: v for k, v in os.environ.items() if k != "HOMEPAGE_CONFIG"}
    env.update(DATABASE_URL=url, HOMEPAGE_DATA_DIR=str(tmp))
    return Log(tmp, url, db, world, text, cfg, main, extra, events, env)


def homepage(lg: Log, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "policy_api.cli", *args], env=env or lg.env, cwd=lg.dir,
                          capture_output=True, text=True, timeout=180)


def copy_db(lg: Log, tmp_path: Path) -> tuple[str, Any]:
    """A private copy of the log's database (for jobs that publish into it)."""
    path = tmp_path / "copy.db"
    with sqlite3.connect(lg.dir / "homepage.db") as src, sqlite3.connect(path) as dst:
        src.backup(dst)  # a snapshot with what is still in the write-ahead log (a file copy misses it)
    url = f"sqlite:///{path}"
    return url, make_engine(url)


# ---- slow references ----------------------------------------------------------------------------
def slow_rewards(lg: Log, rows: list[dict[str, Any]]) -> tuple[np.ndarray, int]:
    """Per decision: sum over its events within the window of event units x category value of the
    item; the default reward when no event came within the window. Also the number of late events."""
    cfg = lg.cfg
    value = {c.name: c.value_per_engagement for c in cfg.categories}
    category = {str(i): lg.world.categories[c] for i, c in zip(lg.world.item_ids, lg.world.item_category,
                                                                strict=True)}
    out, late = [], 0
    for r in rows:
        total, seen = 0.0, False
        for e in lg.events.get(r["request_id"], []):
            if (e["ts"] - r["ts"]).total_seconds() > WINDOW_S:
                late += e["type"] != "impression"  # the join counts behaviour events (impressions carry no units)
                continue
            seen = True
            if e["type"] != "impression":
                total += cfg.events[e["type"]] * value[category[e["item_id"]]]
        out.append(total if seen else DEFAULT_REWARD)
    return np.array(out), late


def slow_features(lg: Log, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shared (n, d_s), actions (n, L, d_a), n_cand (n,)) from the raw rows, by the documented formula:
    category one-hot per slot, tilt, value / max|value|, score / max|value| (padding rows all 0)."""
    names = lg.cfg.category_names
    C, S = len(names), lg.cfg.slots
    L = max(len(r["candidates"]) for r in rows)
    actions = np.zeros((len(rows), L, S * C + 3))
    for i, r in enumerate(rows):
        top = max(abs(c["value"]) for c in r["candidates"])
        for j, c in enumerate(r["candidates"]):
            for s, name in enumerate(c["categories"]):
                actions[i, j, s * C + names.index(name)] = 1.0
            actions[i, j, S * C:] = [c["tilt"], c["value"] / top, c["score"] / top]
    shared = np.array([r["context"]["shared"] for r in rows], dtype=np.float64)
    return shared, actions, np.array([len(r["candidates"]) for r in rows])


def chosen_exposure(rows: list[dict[str, Any]]) -> np.ndarray:
    return np.array([r["candidates"][r["chosen"]]["exposure"] for r in rows])


def price_vector(lg: Log) -> np.ndarray:
    return np.array([PRICES[n] for n in lg.cfg.constraint_names])


def cli_estimate(stdout: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\s+(-?\d+\.\d+)\s", stdout, flags=re.M)
    assert m, stdout
    return float(m.group(1))


@pytest.fixture(scope="module")
def logged(log: Log) -> tuple[Any, Any]:
    return load_log(log.db, log.cfg, None, None, config_version=1)


# ---- replay -------------------------------------------------------------------------------------
def test_the_log_is_what_the_engine_served(log, logged):
    dlog, rw = logged
    serving = log.serving
    assert len(serving) < len(log.rows)  # safe-default decisions are not replayed
    assert dlog.request_id.tolist() == [r["request_id"] for r in serving]
    assert len(set(dlog.n_cand.tolist())) > 1  # candidate counts vary: padding is exercised
    np.testing.assert_array_equal(dlog.n_cand, [len(r["candidates"]) for r in serving])
    np.testing.assert_array_equal(dlog.action, [r["chosen"] for r in serving])
    for i in (0, 1, len(serving) // 2, len(serving) - 1):
        k = len(serving[i]["candidates"])
        np.testing.assert_array_equal(dlog.pmf[i, :k], serving[i]["pmf"])
        assert (dlog.pmf[i, k:] == 0).all() and not dlog.mask[i, k:].any() and dlog.mask[i, :k].all()
    # the features learn and replay rebuild from the log follow the documented formula
    shared, actions, _ = slow_features(log, serving)
    got_s, got_a = log_features(dlog, log.cfg)
    np.testing.assert_allclose(got_s, shared, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_a, actions, rtol=0, atol=1e-12)


def test_replay_of_the_logged_policy_returns_the_logged_mean_reward(log, logged):
    dlog, rw = logged
    ref, late = slow_rewards(log, log.serving)
    np.testing.assert_allclose(rw.reward, ref, rtol=1e-12, atol=1e-12)
    assert (ref == DEFAULT_REWARD).sum() > 20 and rw.n_late == late > 0
    assert rw.n_orphan > 0  # the held-back decisions' and the safe defaults' feedback
    res = replay(dlog, rw.reward, "logged", log.cfg, log.db, n_boot=0)
    by = {r["estimator"]: r for r in res.rows}
    assert by["IPS"]["value"] == pytest.approx(ref.mean(), rel=1e-12, abs=1e-12)
    assert by["SNIPS"]["value"] == pytest.approx(ref.mean(), rel=1e-12, abs=1e-12)
    assert res.logged_mean == pytest.approx(ref.mean(), rel=1e-12) and res.n == len(log.serving)
    np.testing.assert_array_equal(res.weights, 1.0)
    # projected exposure of the logged pmf = the logged exposure in expectation (slow loop)
    proj = np.mean([sum(p * np.asarray(c["exposure"]) for p, c in zip(r["pmf"], r["candidates"], strict=True))
                    for r in log.serving], axis=0)
    shares = {s["constraint"]: s for s in res.shares}
    for k, name in enumerate(log.cfg.constraint_names):
        assert shares[name]["target"] == pytest.approx(proj[k], rel=1e-9)
        assert shares[name]["logged"] == pytest.approx(chosen_exposure(log.serving)[:, k].mean(), rel=1e-9)


def test_replay_targets_greedy_and_uniform(log, logged):
    dlog, rw = logged
    serving = log.serving
    greedy, _, _ = target_distribution("greedy", dlog, log.cfg)
    best = [int(np.argmax([c["score"] for c in r["candidates"]])) for r in serving]
    for b, r in zip(best, serving, strict=True):  # serving's priced argmax (scores are logged to 1e-6)
        assert r["candidates"][r["context"]["greedy"]]["score"] >= r["candidates"][b]["score"] - 1e-6
    expect = np.zeros_like(greedy)
    expect[np.arange(len(best)), best] = 1.0
    np.testing.assert_array_equal(greedy, expect)
    uniform, _, _ = target_distribution("uniform", dlog, log.cfg)
    for i, r in enumerate(serving):
        k = len(r["candidates"])
        np.testing.assert_allclose(uniform[i, :k], 1.0 / k, rtol=1e-15)
        assert (uniform[i, k:] == 0).all()
    # the reported change is signed like the change in value, whatever the sign of the rewards
    for shift in (0.0, -10.0):
        reward = rw.reward + shift
        res = replay(dlog, reward, "uniform", log.cfg, n_boot=0)
        ips = np.mean(reward * uniform[np.arange(len(dlog)), dlog.action] / dlog.pscore)
        row = next(r for r in res.rows if r["estimator"] == "IPS")
        assert row["value"] == pytest.approx(ips, rel=1e-12)
        assert res.logged_mean == pytest.approx(reward.mean(), rel=1e-12)
        for r in res.rows:
            change = r["value"] - reward.mean()
            assert r["relative_to_logged"] == pytest.approx(change / abs(reward.mean()), rel=1e-9)


def _config_text(lg: Log, *, values: dict[str, float] | None = None, weights: list[float] | None = None,
                 reverse_categories: bool = False, extra: str = "") -> str:
    """The logged config with other category values / position weights / category order."""
    cfg = lg.cfg
    lines = [f"[homepage]\nslots = {cfg.slots}\n"
             f"position_weights = {list(weights or cfg.position_weights)!r}\n"
             f"items_per_module = {cfg.items_per_module}\n"]
    cats = list(cfg.categories)[::-1] if reverse_categories else list(cfg.categories)
    for c in cats:
        v = (values or {}).get(c.name, c.value_per_engagement)
        lines.append(f'[[categories]]\nname = "{c.name}"\nvalue_per_engagement = {v!r}\n')
    for m in cfg.modules:
        lines.append(f'[[modules]]\nid = "{m.id}"\ncategory = "{m.category}"\n')
    lines.append("[events]\n" + "".join(f"{k} = {v!r}\n" for k, v in cfg.events.items()))
    lines.append(f"[tilt]\nlevels = {list(cfg.tilt.levels)!r}\nhead_share = {cfg.tilt.head_share!r}\n")
    for c in cfg.constraints:
        where = f'category = "{c.category}"\n' if c.kind == "category_share" else ""
        lines.append(f'[[constraints]]\nname = "{c.name}"\nkind = "{c.kind}"\n{where}min = {c.min!r}\n')
    lines.append(extra)
    lines.append(f"[exploration]\nbudget = {cfg.exploration.budget!r}\n")
    return "\n".join(lines)


def test_config_candidates_reproduce_the_logged_values_and_exposures(log, logged):
    dlog, _ = logged
    cfg = log.cfg
    raw_value = np.zeros(dlog.mask.shape)
    raw_ex = np.zeros(dlog.exposure.shape)
    for i, r in enumerate(log.serving):
        for j, c in enumerate(r["candidates"]):
            raw_value[i, j], raw_ex[i, j] = c["value"], c["exposure"]
    # serving logs its numbers rounded to 1e-6: the value rebuilt from rounded slot engagements is off
    # by at most half a unit of each rounding, weighted as in the value
    top = max(c.value_per_engagement for c in cfg.categories)
    tol = 0.5e-6 * (1 + sum(cfg.position_weights) * top) + 1e-12
    value, ex = config_candidates(dlog, cfg, dlog.modules)
    assert np.abs(value - raw_value).max() <= tol
    np.testing.assert_allclose(ex, raw_ex, rtol=0, atol=1e-6 + 1e-12)
    # the same config with its categories listed in another order is the same config
    same = parse_config_text(_config_text(log, reverse_categories=True))
    value2, ex2 = config_candidates(dlog, same, dlog.modules, logged_categories=cfg.category_names)
    np.testing.assert_allclose(value2, value, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ex2, ex, rtol=1e-12, atol=1e-15)
    # doubled category values double every candidate's value and leave its exposure alone
    doubled = parse_config_text(_config_text(log, values={c.name: 2 * c.value_per_engagement
                                                          for c in cfg.categories}))
    value2, ex2 = config_candidates(dlog, doubled, dlog.modules, logged_categories=cfg.category_names)
    np.testing.assert_allclose(value2, 2 * value, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ex2, ex, rtol=1e-12, atol=1e-15)


def test_config_candidates_under_other_weights_values_and_a_module_cap(log, logged):
    dlog, _ = logged
    cfg = log.cfg
    w = [1.0, 0.9, 0.7, 0.6, 0.3, 0.1][: cfg.slots]
    vals = {c.name: 0.5 + k for k, c in enumerate(cfg.categories)}
    module = cfg.modules[0].id
    text = _config_text(log, weights=w, values=vals, reverse_categories=True,
                        extra=f'[[constraints]]\nname = "cap"\nkind = "module_share"\nmodule = "{module}"\nmax = 0.3\n')
    new = parse_config_text(text)
    value, ex = config_candidates(dlog, new, dlog.modules, logged_categories=cfg.category_names)
    wn = np.asarray(w) / sum(w)
    for i, r in enumerate(log.serving):
        for j, c in enumerate(r["candidates"]):
            v = sum(w[s] * c["engagement"][s] * vals[c["categories"][s]] for s in range(cfg.slots))
            assert value[i, j] == pytest.approx(v, rel=1e-12)
            live = sum(wn[s] for s in range(cfg.slots) if c["categories"][s] == "live")
            cap = sum(wn[s] for s in range(cfg.slots) if c["modules"][s] == module)
            np.testing.assert_allclose(ex[i, j], [live, c["tail"], cap], rtol=1e-12, atol=1e-12)
        assert (value[i, len(r["candidates"]):] == 0).all()


def test_config_file_target_is_the_planned_greedy_within_the_budget(log, logged, tmp_path):
    dlog, rw = logged
    path = tmp_path / "same.toml"
    path.write_text(log.text)
    dist, label, info = target_distribution(str(path), dlog, log.cfg)
    cfg = log.cfg
    prices = np.array([info["prices"][n] for n in cfg.constraint_names])
    w, vals = cfg.position_weights, {c.name: c.value_per_engagement for c in cfg.categories}
    budget = cfg.exploration.budget
    live = cfg.constraint_names.index("live_floor")

    def priced(c: dict[str, Any]) -> float:  # the candidate under the config, from its logged slots
        v = sum(w[s] * c["engagement"][s] * vals[c["categories"][s]] for s in range(cfg.slots))
        a = np.zeros(len(prices))
        a[live] = sum(w[s] for s in range(cfg.slots) if c["categories"][s] == "live") / sum(w)
        a[1 - live] = c["tail"]
        return v + float(a @ prices)

    for i, r in enumerate(log.serving):
        k = len(r["candidates"])
        g = int(np.argmax([priced(c) for c in r["candidates"]]))
        expect = np.full(k, budget / (k - 1))  # uniform exploration, budget-clipped, greedy takes the rest
        expect[g] = 1 - budget
        np.testing.assert_allclose(dist[i, :k], expect, rtol=1e-12, atol=1e-15)
        assert (dist[i, k:] == 0).all()


# ---- learn --------------------------------------------------------------------------------------
def test_learn_publishes_versions_from_closed_windows_only(log, tmp_path):
    _, db = copy_db(log, tmp_path)
    n1 = 400
    until = datetime.fromtimestamp(T0 + STEP_S * n1 + WINDOW_S, tz=UTC)  # closes decisions 0 .. n1-1
    first = [r for r in log.rows[:n1] if r["candidates"]]
    out = learn(db, until=until)
    assert out is not None and out.bandit_version == 1 and out.previous is None
    assert out.decisions == len(first)
    ref, late = slow_rewards(log, first)
    lagrangian = ref + chosen_exposure(first) @ price_vector(log)
    assert out.mean_reward == pytest.approx(ref.mean(), rel=1e-12)
    assert out.mean_lagrangian == pytest.approx(lagrangian.mean(), rel=1e-12)
    assert abs(out.mean_lagrangian - out.mean_reward) > 0.01  # the prices are in the cost (not a vanishing term)
    assert out.late_events == late
    # the model is VW trained on the Lagrangian cost of exactly those decisions
    rec = registry.model(db, "bandit")
    version, metrics, artifact = rec.version, rec.metrics, rec.artifact
    assert version == 1 and metrics["decisions"] == len(first)
    model = VWLayoutBandit.load(artifact)
    shared, actions, n_cand = slow_features(log, first)
    ref_model = VWLayoutBandit("epsilon", epsilon=log.cfg.exploration.budget, seed=0)
    ref_model.learn_batch(shared, actions, np.array([r["chosen"] for r in first]), -lagrangian,
                          np.array([r["propensity"] for r in first]), n_cand)
    np.testing.assert_allclose(model.predict_batch(shared[:60], actions[:60], n_cand[:60]),
                               ref_model.predict_batch(shared[:60], actions[:60], n_cand[:60]), atol=1e-9)
    # nothing new: no version; one more second of closed log: below min_decisions, nothing published
    assert learn(db, until=until) is None
    assert learn(db, until=until + timedelta(seconds=1)) is None
    assert registry.model(db, "bandit").version == 1
    # later decisions land (and a plan for a config that is not the active one is published: it is
    # recorded, not put in force, so the active config's prices still make the cost)
    store.insert_decisions(db, log.extra)
    stale = registry.publish_plan(db, 99, {"live_floor": 5.0, "long_tail": 5.0})
    assert registry.latest_plan(db).version != stale
    far = datetime.fromtimestamp(T0 + STEP_S * (N_MAIN + N_EXTRA) + WINDOW_S, tz=UTC)
    out2 = learn(db, until=far)
    second = [r for r in log.rows[n1:] + log.extra if r["candidates"]]  # decision n1 sat on the boundary
    assert out2.bandit_version == 2 and out2.previous == 1 and out2.decisions == len(second)
    ref2, _ = slow_rewards(log, second)
    assert out2.mean_reward == pytest.approx(ref2.mean(), rel=1e-12)
    assert out2.mean_lagrangian == pytest.approx((ref2 + chosen_exposure(second) @ price_vector(log)).mean(),
                                                 rel=1e-12)
    assert VWLayoutBandit.load(registry.model(db, "bandit").artifact).n_learned_ == len(first) + len(second)
    assert learn(db, until=far + timedelta(days=1)) is None


def test_bandit_target_is_the_model_within_the_serving_budget(log, logged, tmp_path):
    dlog, _ = logged
    _, db = copy_db(log, tmp_path)
    out = learn(db, until=datetime.fromtimestamp(T0 + STEP_S * N_MAIN + WINDOW_S, tz=UTC))
    assert out is not None
    dist, _, info = target_distribution("bandit:1", dlog, log.cfg, db)
    assert info["bandit_version"] == 1
    model = VWLayoutBandit.load(registry.model(db, "bandit").artifact)
    shared, actions, n_cand = slow_features(log, log.serving)
    for i in range(0, len(log.serving), 17):
        r, k = log.serving[i], int(n_cand[i])
        pmf = model.predict(shared[i], actions[i, :k])
        expect = budget_pmf(pmf, r["context"]["greedy"], log.cfg.exploration.budget,
                            value=np.array([c["value"] for c in r["candidates"]]))
        np.testing.assert_allclose(dist[i, :k], expect, atol=1e-12)
        assert (dist[i, k:] == 0).all()


def test_learn_cli_reports_what_it_published(log, tmp_path):
    url, db = copy_db(log, tmp_path)
    env = dict(log.env, DATABASE_URL=url)
    first = homepage(log, "learn", env=env)
    assert first.returncode == 0, first.stderr
    m = re.search(r"published bandit version (\d+): (\d+) decisions, mean reward (-?\d+\.\d+)", first.stdout)
    ref, _ = slow_rewards(log, log.serving)  # every window closed long ago
    assert m and (int(m.group(1)), int(m.group(2))) == (1, len(log.serving))
    assert float(m.group(3)) == pytest.approx(ref.mean(), abs=5e-5)
    assert learn(db) is None  # nothing new since


# ---- log export -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_parquet_export_replays_like_the_database(log, logged):
    dlog, rw = logged
    out = log.dir / "log.parquet"
    exp = homepage(log, "log", "export", "--out", str(out))
    assert exp.returncode == 0, exp.stderr
    assert f"wrote {len(log.rows)} decisions" in exp.stdout
    cols = read_parquet(out, columns=["request_id"])
    assert cols["request_id"].tolist() == [r["request_id"] for r in log.rows]
    # the file alone (config + catalog files, no database) rebuilds the same log and rewards
    dlog_p, fb = log_from_parquet(out, log.cfg)
    rw_p = join_rewards(dlog_p, fb, log.cfg, log.world.item_ids,
                        np.array([log.world.categories[c] for c in log.world.item_category]))
    assert dlog_p.request_id.tolist() == dlog.request_id.tolist()
    np.testing.assert_allclose(rw_p.reward, rw.reward, rtol=1e-12, atol=1e-12)
    for name in ("pmf", "value", "score", "exposure", "engagement", "tail", "categories", "shared", "pscore"):
        np.testing.assert_array_equal(getattr(dlog_p, name), getattr(dlog, name), err_msg=name)
    ref, _ = slow_rewards(log, log.serving)
    from_db = homepage(log, "replay", "--policy", "logged", "--n-boot", "0", "--out", str(log.dir / "r1"))
    from_file = homepage(log, "replay", "--from-parquet", str(out), "--policy", "logged", "--config",
                         "homepage.toml", "--catalog", "items.csv", "--n-boot", "0", "--out", str(log.dir / "r2"),
                         env=dict(log.env, DATABASE_URL=f"sqlite:///{log.dir / 'absent' / 'none.db'}"))
    assert from_db.returncode == 0, from_db.stderr
    assert from_file.returncode == 0, from_file.stderr
    assert cli_estimate(from_file.stdout, "IPS") == cli_estimate(from_db.stdout, "IPS")
    assert cli_estimate(from_db.stdout, "IPS") == pytest.approx(ref.mean(), abs=5e-5)
    assert f"on {len(log.serving)} logged decisions" in from_file.stdout
    assert (log.dir / "r2" / "index.html").read_text().count(f"{len(log.serving)} logged decisions") == 1


def test_dsjson_export_is_read_by_vw_and_trains_the_same_model(log):
    out = log.dir / "log.dsjson"
    exp = homepage(log, "log", "export", "--format", "dsjson", "--out", str(out))
    assert exp.returncode == 0, exp.stderr
    lines = out.read_text().splitlines()
    serving = log.serving
    assert len(lines) == len(serving)
    shared, actions, n_cand = slow_features(log, serving)
    ref, _ = slow_rewards(log, serving)
    cost = -(ref + chosen_exposure(serving) @ price_vector(log))  # what `homepage learn` minimises
    for i, line in enumerate(lines):
        d = parse_dsjson_line(line, shared.shape[1], actions.shape[2])
        k = int(n_cand[i])
        assert d.event_id == serving[i]["request_id"] and d.chosen == serving[i]["chosen"]
        np.testing.assert_allclose(d.pmf, serving[i]["pmf"], rtol=1e-15)
        np.testing.assert_allclose(d.actions, actions[i, :k], rtol=1e-15)
        np.testing.assert_allclose(d.shared, shared[i], rtol=1e-15)
        assert d.cost == pytest.approx(cost[i], rel=1e-12, abs=1e-12)
        assert d.outcomes == pytest.approx((ref[i],), rel=1e-12, abs=1e-12)
    from_lines = VWLayoutBandit("epsilon", epsilon=0.1, seed=3)
    assert from_lines.learn_dsjson(lines) == len(serving)  # VW's own parser accepts every line
    from_arrays = VWLayoutBandit("epsilon", epsilon=0.1, seed=3)
    from_arrays.learn_batch(shared, actions, np.array([r["chosen"] for r in serving]), cost,
                            np.array([r["propensity"] for r in serving]), n_cand)
    a = from_lines.predict_batch(shared, actions, n_cand)
    np.testing.assert_allclose(a, from_arrays.predict_batch(shared, actions, n_cand), atol=1e-9)
    assert len({int(np.argmax(p)) for p in a}) > 1  # a model that learned something, not a constant


# ---- CLI errors -----------------------------------------------------------------------------------
def test_replay_rejects_an_unknown_policy_and_a_bad_time(log):
    bad = homepage(log, "replay", "--policy", "nonsense")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "policy must be logged, greedy, uniform, bandit[:VERSION]" in bad.stderr and "'nonsense'" in bad.stderr
    bad = homepage(log, "replay", "--policy", "logged", "--since", "notatime")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--since must be an ISO 8601 time" in bad.stderr and "'notatime'" in bad.stderr


def test_replay_on_an_empty_log_says_so(log, tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    upgrade(url)
    db = make_engine(url)
    registry.activate_config(db, log.text, author="test")
    res = homepage(log, "replay", "--policy", "logged", env=dict(log.env, DATABASE_URL=url))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "replay needs at least 10 logged decisions with candidates; found 0" in res.stderr


def test_replay_cli_errors_in_process(log, monkeypatch, capsys, tmp_path):
    from policy_api import cli

    monkeypatch.chdir(log.dir)
    monkeypatch.setenv("DATABASE_URL", log.url)
    assert cli.main(["replay", "--policy", "bandit:x"]) == 2
    assert "policy must be" in capsys.readouterr().err
    assert cli.main(["replay", "--policy", "bandit:7", "--n-boot", "0", "--out", str(tmp_path / "r")]) == 2
    assert "no published bandit model version 7" in capsys.readouterr().err
    missing = str(tmp_path / "nope.parquet")
    assert cli.main(["replay", "--from-parquet", missing, "--policy", "logged", "--config", "homepage.toml",
                     "--catalog", "items.csv"]) == 2
    err = capsys.readouterr().err
    assert "--from-parquet" in err and "nope.parquet" in err
    assert cli.main(["replay", "--policy", "missing.toml"]) == 2
    assert "policy 'missing.toml': config file not found" in capsys.readouterr().err


def test_bulk_reader_equals_the_reference_reader(log):
    """The Arrow reader the learner and replay use gives exactly the arrays of the one-dict-per-candidate
    reference implementation, on the same rows."""
    from policy_api import log as store
    from policy_api.log import decision_log, read_decision_log

    fast = read_decision_log(log.db, log.cfg, with_modules=True)
    ref = decision_log(store.read_decisions(log.db), log.cfg)
    assert len(fast) == len(ref) == len(log.serving)
    for name in ref.__dataclass_fields__:
        if name == "layout":
            continue
        a, b = getattr(fast, name), getattr(ref, name)
        if name == "versions":  # the bulk reader reads the four version keys, None where absent
            keys = ("config", "plan", "ranker", "bandit")
            assert a == [{k: v.get(k) for k in keys} for v in b]
            continue
        if isinstance(b, np.ndarray):
            assert a.shape == b.shape, name
            if b.dtype.kind in "fc":
                np.testing.assert_array_equal(a, b, err_msg=name)
            else:
                assert (a.astype(str) == b.astype(str)).all(), name
        else:
            assert a == b, name
    # and with a config filter: only the decisions made under that version
    assert len(read_decision_log(log.db, log.cfg, config_version=10**6)) == 0


# ---- the stored form of the candidates ----------------------------------------------------------------
def old_form_copy(lg: Log, tmp_path: Path) -> tuple[str, Any]:
    """A copy of the log's database whose decisions are stored as before the columnar encoding: the
    candidates as the engine's list of dicts, through the executemany of the SQLAlchemy table."""
    import sqlalchemy as sa

    url, db = copy_db(lg, tmp_path)
    with db.begin() as conn:
        conn.execute(sa.delete(store.decisions))
        conn.execute(sa.insert(store.decisions), [{c: r.get(c) for c in store.DECISION_COLUMNS} for r in lg.rows])
        stored = conn.execute(sa.select(sa.type_coerce(store.decisions.c.candidates, sa.Text()))).scalars().all()
    assert all(t.startswith("[") for t in stored)  # the old form, really
    return url, db


def test_columnar_candidates_round_trip_the_engine_rows(log):
    import sqlalchemy as sa

    for r in log.rows:
        enc = store.encode_candidates(r["candidates"])
        assert store.decode_candidates(enc) == r["candidates"]
        if r["candidates"]:
            assert list(enc) == ["$n", *r["candidates"][0]] and enc["$n"] == len(r["candidates"])
            assert enc["value"] == [c["value"] for c in r["candidates"]]
    with log.db.connect() as conn:
        stored = conn.execute(sa.select(sa.type_coerce(store.decisions.c.candidates, sa.Text()))).scalars().all()
    assert sum(t.startswith('{"$n":') for t in stored) == len(log.serving)  # fallbacks: [] as before
    assert sum(len(t) for t in stored) < 0.8 * sum(len(store.json_dumps(r["candidates"])) for r in log.rows)
    got = store.read_decisions(log.db)
    assert got["candidates"] == [r["candidates"] for r in log.rows]
    assert got["pmf"] == [r["pmf"] for r in log.rows]
    # candidates of different shapes stay as given; a columnar value with a short field names it
    mixed = [{"modules": ["a"], "value": 1.0}, {"modules": ["b"]}]
    assert store.encode_candidates(mixed) is mixed and store.decode_candidates(mixed) is mixed
    with pytest.raises(ValueError, match=r"decisions.candidates field 'value' must be a list of 2 entries "
                                         r"\(one per candidate\); got 1 entries"):
        store.decode_candidates({"$n": 2, "modules": [["a"], ["b"]], "value": [1.0]})


def test_old_form_rows_read_export_and_replay_identically(log, logged, tmp_path):
    """A database written before the columnar encoding gives the same arrays, rewards, replay
    estimates and exports as the same decisions stored columnar."""
    from policy_api.jobs import export_dsjson
    from policy_api.log import export_parquet, read_decision_log

    _, old = old_form_copy(log, tmp_path)
    a_cols, b_cols = store.read_decisions(old), store.read_decisions(log.db)
    for name in store.DECISION_COLUMNS:
        assert repr(list(a_cols[name])) == repr(list(b_cols[name])), name
    a, b = read_decision_log(old, log.cfg, with_modules=True), read_decision_log(log.db, log.cfg, with_modules=True)
    for name in b.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(y, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert (x.astype(str) == y.astype(str)).all() if y.dtype.kind not in "fcb" else \
                np.array_equal(x, y), name
        else:
            assert x == y, name
    dlog_old, rw_old = load_log(old, log.cfg, None, None, config_version=1)
    dlog, rw = logged
    np.testing.assert_array_equal(rw_old.reward, rw.reward)
    for target in ("logged", "uniform", "greedy"):
        got = replay(dlog_old, rw_old.reward, target, log.cfg, old, n_boot=0)
        ref = replay(dlog, rw.reward, target, log.cfg, log.db, n_boot=0)
        assert got.rows == ref.rows, target
    import pyarrow.parquet as pq

    export_parquet(old, tmp_path / "old.parquet")
    export_parquet(log.db, tmp_path / "new.parquet")
    assert pq.read_table(tmp_path / "old.parquet").equals(pq.read_table(tmp_path / "new.parquet"))
    assert export_dsjson(old, tmp_path / "old.dsjson") == export_dsjson(log.db, tmp_path / "new.dsjson") > 0
    assert (tmp_path / "old.dsjson").read_bytes() == (tmp_path / "new.dsjson").read_bytes()


def test_mixed_old_and_columnar_rows_read_in_order(log, tmp_path):
    """Rows written before and after the change, interleaved in one database, read as one log."""
    import sqlalchemy as sa

    from policy_api.log import read_decision_log

    _, db = copy_db(log, tmp_path)
    old_ids = [r["request_id"] for r in log.rows[::3]]
    with db.begin() as conn:  # every third decision back in the old form
        conn.execute(sa.delete(store.decisions).where(store.decisions.c.request_id.in_(old_ids)))
        conn.execute(sa.insert(store.decisions),
                     [{c: r.get(c) for c in store.DECISION_COLUMNS} for r in log.rows[::3]])
    a, b = read_decision_log(db, log.cfg, with_modules=True), read_decision_log(log.db, log.cfg, with_modules=True)
    for name in ("request_id", "n_cand", "pmf", "value", "score", "exposure", "engagement", "tail", "categories",
                 "tilt", "shared", "action", "pscore"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.modules == b.modules


# ---- the learner's reward join in SQL -----------------------------------------------------------------
def test_sql_reward_join_equals_the_reference_join(log, logged):
    from policy_api.log import read_decision_log, read_rewards

    dlog, rw = logged
    got = read_rewards(log.db, dlog, log.cfg)
    np.testing.assert_allclose(got.reward, rw.reward, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.has_feedback, rw.has_feedback)
    assert (got.n_events, got.n_late, got.n_orphan) == (rw.n_events, rw.n_late, rw.n_orphan)
    ref, late = slow_rewards(log, log.serving)
    np.testing.assert_allclose(got.reward, ref, rtol=1e-12, atol=1e-12)
    assert got.n_late == late > 0
    # a time slice, as the learner reads one: decisions in [since, until), feedback since `since`
    since = datetime.fromtimestamp(T0 + STEP_S * 200, tz=UTC)
    until = datetime.fromtimestamp(T0 + STEP_S * 600, tz=UTC)
    part = read_decision_log(log.db, log.cfg, since, until, config_version=1)
    ref_rw = load_log(log.db, log.cfg, since, until, config_version=1)[1]
    got = read_rewards(log.db, part, log.cfg, since, until)
    np.testing.assert_allclose(got.reward, ref_rw.reward, rtol=1e-12, atol=1e-12)
    assert (got.n_events, got.n_late, got.n_orphan) == (ref_rw.n_events, ref_rw.n_late, ref_rw.n_orphan)
    assert got.n_orphan > 0  # events of decisions after `until`
    # another window and default: the boundary is the reference's
    for window in (1.0, 60.0, WINDOW_S):
        a = read_rewards(log.db, dlog, log.cfg, window_s=window, default_reward=-9.0)
        b = load_log(log.db, log.cfg, None, None, config_version=1)[0]
        from policy_api.jobs import catalog_categories

        ids, cats = catalog_categories(log.db)
        fb = store.read_feedback(log.db, columns=["request_id", "item_id", "type", "ts"], exclude_types=("impression",))
        ref_w = join_rewards(b, fb, log.cfg, ids, cats, window_s=window, default_reward=-9.0,
                             first_seen=store.feedback_first_seen(log.db))
        np.testing.assert_allclose(a.reward, ref_w.reward, rtol=1e-12, atol=1e-12)
        assert (a.n_events, a.n_late) == (ref_w.n_events, ref_w.n_late), window


# ---- the learner's stream -----------------------------------------------------------------------------
def test_stream_gives_the_whole_read_chunk_by_chunk(log, logged):
    """iter_log_rewards in chunks of 64 decisions: the arrays of the whole read (the learner's
    candidate fields; padding to each chunk's own widest decision) and the rewards of the reference
    join and of the slow loop, over the whole log and over a time slice."""
    from policy_api.log import LEARNER_FIELDS, iter_log_rewards, read_decision_log

    dlog, rw = logged
    whole = read_decision_log(log.db, log.cfg, config_version=1, fields=LEARNER_FIELDS)
    chunks = list(iter_log_rewards(log.db, log.cfg, None, None, config_version=1, chunk_size=64))
    assert len(chunks) == -(-N_MAIN // 64) and all(0 < len(d) <= 64 for d, _ in chunks)
    lo = 0
    for part, _ in chunks:
        hi = lo + len(part)
        width = part.mask.shape[1]
        assert not whole.mask[lo:hi, width:].any()  # what the chunk leaves out is padding
        for name in ("request_id", "ts", "action", "pscore", "n_cand", "shared"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[lo:hi], err_msg=name)
        for name in ("mask", "pmf", "value", "score", "tilt", "exposure", "categories"):
            np.testing.assert_array_equal(getattr(part, name), getattr(whole, name)[lo:hi, :width], err_msg=name)
        assert np.isnan(part.engagement).all() and np.isnan(part.tail).all()  # not read by the learner
        lo = hi
    assert lo == len(dlog)
    reward = np.concatenate([r.reward for _, r in chunks])
    np.testing.assert_allclose(reward, rw.reward, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.concatenate([r.has_feedback for _, r in chunks]), rw.has_feedback)
    ref, late = slow_rewards(log, log.serving)
    np.testing.assert_allclose(reward, ref, rtol=1e-12, atol=1e-12)
    assert sum(r.n_events for _, r in chunks) == rw.n_events
    assert sum(r.n_late for _, r in chunks) == rw.n_late == late > 0
    assert all(r.n_orphan == 0 for _, r in chunks)  # the stream does not count them (rw does)
    # a time slice, as the learner reads one: decisions in [since, until), feedback since `since`
    since = datetime.fromtimestamp(T0 + STEP_S * 200, tz=UTC)
    until = datetime.fromtimestamp(T0 + STEP_S * 600, tz=UTC)
    ref_log, ref_rw = load_log(log.db, log.cfg, since, until, config_version=1)
    chunks = list(iter_log_rewards(log.db, log.cfg, since, until, config_version=1, chunk_size=100))
    assert len(chunks) == 4
    np.testing.assert_array_equal(np.concatenate([d.request_id for d, _ in chunks]), ref_log.request_id)
    np.testing.assert_allclose(np.concatenate([r.reward for _, r in chunks]), ref_rw.reward, rtol=1e-12, atol=1e-12)
    assert sum(r.n_late for _, r in chunks) == ref_rw.n_late
    # another config version: nothing; a chunk size out of range names it
    assert list(iter_log_rewards(log.db, log.cfg, None, None, config_version=2)) == []
    for bad in (0, 20_001, 2.0, True):
        with pytest.raises(ValueError, match=rf"chunk_size must be an integer in \[1, 20000\]; got {bad!r}"):
            next(iter_log_rewards(log.db, log.cfg, chunk_size=bad))


def test_stream_stopped_early_gives_its_connections_back(log, tmp_path):
    """A consumer that stops after one chunk (as an error in learning would) leaves no connection
    checked out and no thread running: the database can be written at once."""
    import threading

    from policy_api.log import iter_log_rewards

    url, db = copy_db(log, tmp_path)
    before = threading.active_count()
    stream = iter_log_rewards(db, log.cfg, chunk_size=50)
    first, _ = next(stream)
    assert len(first) > 0
    stream.close()
    assert db.pool.checkedout() == 0
    assert threading.active_count() == before
    store.insert_decisions(db, log.extra[:5])  # not blocked by a reader left behind
    assert store.read_decisions(db, columns=["request_id"])["request_id"].size == len(log.rows) + 5


def test_learn_in_chunks_publishes_the_model_of_the_whole_log(log, tmp_path):
    """learn() streaming 50 decisions at a time publishes byte for byte the model that VW learns from
    the whole log read at once, and predicts as the slow reference features and rewards do."""
    from policy_api.log import read_log_rewards

    _, db = copy_db(log, tmp_path)
    until = datetime.fromtimestamp(T0 + STEP_S * N_MAIN + WINDOW_S, tz=UTC)
    out = learn(db, until=until, chunk_size=50)
    assert out is not None and out.decisions == len(log.serving)
    model = VWLayoutBandit.load(registry.model(db, "bandit").artifact)
    dlog, rw = read_log_rewards(db, log.cfg, None, None, 1)
    cost = -(rw.reward + dlog.chosen_exposure @ price_vector(log))
    whole = new_bandit(log.cfg)
    whole.learn_batch(*log_features(dlog, log.cfg), dlog.action, cost, dlog.pscore, dlog.n_cand)
    assert model.save() == VWLayoutBandit.load(whole.save()).save()  # both as loaded from the registry
    ref, late = slow_rewards(log, log.serving)
    lagrangian = ref + chosen_exposure(log.serving) @ price_vector(log)
    assert out.mean_reward == pytest.approx(ref.mean(), rel=1e-12)
    assert out.mean_lagrangian == pytest.approx(lagrangian.mean(), rel=1e-12)
    assert out.late_events == late
    shared, actions, n_cand = slow_features(log, log.serving)
    slow = VWLayoutBandit("epsilon", epsilon=log.cfg.exploration.budget, seed=0)
    slow.learn_batch(shared, actions, np.array([r["chosen"] for r in log.serving]), -lagrangian,
                     np.array([r["propensity"] for r in log.serving]), n_cand)
    np.testing.assert_allclose(model.predict_batch(shared[:80], actions[:80], n_cand[:80]),
                               slow.predict_batch(shared[:80], actions[:80], n_cand[:80]), atol=1e-9)


def test_reader_parses_only_the_fields_asked_for(log):
    from policy_api.log import CANDIDATE_FIELDS, read_decision_log

    full = read_decision_log(log.db, log.cfg)
    part = read_decision_log(log.db, log.cfg, fields=("value", "exposure"))
    for name in ("request_id", "mask", "pmf", "value", "exposure", "shared", "action", "pscore"):
        a, b = getattr(part, name), getattr(full, name)
        assert (a == b).all() if a.dtype.kind not in "fc" else np.array_equal(a, b), name
    for name in ("tilt", "score", "engagement", "tail"):
        assert np.isnan(getattr(part, name)).all(), name
    assert (part.categories == -1).all() and (full.categories >= 0).any()
    assert read_decision_log(log.db, log.cfg, fields=()).value.shape == full.value.shape
    with pytest.raises(ValueError, match=r"fields must be a collection of \('categories', 'tilt', 'value', "
                                         r"'score', 'exposure', 'engagement', 'tail'\); got \['modules'\]"):
        read_decision_log(log.db, log.cfg, fields=("value", "modules"))
    with pytest.raises(ValueError, match=r"fields must be a collection of .*; got 'value'"):
        read_decision_log(log.db, log.cfg, fields="value")
    assert CANDIDATE_FIELDS == ("categories", "tilt", "value", "score", "exposure", "engagement", "tail")


def test_an_imported_history_before_serving_is_never_read(log, tmp_path):
    """A history imported with `homepage import` (years of interactions before serving began) is the
    rankers' data, not the bandit's: the learner and the readers of serving decisions start where
    serving began. The imported rows are made unreadable to show that none is parsed (on a log of
    millions of them the loop's first learn read and parsed every one, for minutes, and no other
    step ran meanwhile), and the model is byte for byte the one learned without them."""
    from policy_api.jobs import import_file
    from policy_api.log import read_decision_log, read_log_rewards, serving_began

    _, plain = copy_db(log, tmp_path)
    (tmp_path / "imported").mkdir()
    _, db = copy_db(log, tmp_path / "imported")
    world, rng = log.world, np.random.default_rng(5)
    n = 3000
    users = world.user_ids[rng.integers(0, world.n_users, n)]
    items = world.item_ids[rng.integers(0, world.n_items, n)]
    kinds = rng.choice(["play", "skip", "favorite"], n)
    start = T0 - 400 * 86400.0  # a year before serving began
    lines = [f"{u},{i},{e},{start + 3600.0 * k}" for k, (u, i, e) in enumerate(zip(users, items, kinds, strict=True))]
    (tmp_path / "history.csv").write_text("user_id,item_id,event,timestamp\n" + "\n".join(lines) + "\n")
    got = import_file(db, tmp_path / "history.csv")
    assert got.decisions == n
    # serving began at the first logged decision that is not an import (a brute force over the rows)
    first = min(r["ts"] for r in log.rows)
    assert serving_began(db) == first and serving_began(plain) == first
    with db.begin() as conn:
        bad = conn.execute(sa.text("UPDATE decisions SET candidates = 'not json {', versions = '[', pmf = '{' "
                                   "WHERE policy = 'import'")).rowcount
    assert bad == n
    until = datetime.fromtimestamp(T0 + STEP_S * N_MAIN + WINDOW_S, tz=UTC)
    out, ref = learn(db, until=until, chunk_size=500), learn(plain, until=until, chunk_size=500)
    assert out is not None and ref is not None and out.decisions == ref.decisions == len(log.serving)
    assert out.mean_reward == ref.mean_reward and out.late_events == ref.late_events
    assert registry.model(db, "bandit").artifact == registry.model(plain, "bandit").artifact
    a, b = read_decision_log(db, log.cfg), read_decision_log(plain, log.cfg)
    np.testing.assert_array_equal(a.request_id, b.request_id)
    (da, ra), (dp, rp) = read_log_rewards(db, log.cfg), read_log_rewards(plain, log.cfg)
    np.testing.assert_array_equal(da.request_id, dp.request_id)
    np.testing.assert_array_equal(ra.reward, rp.reward)
    # replay's reference join: the imported events are not the serving decisions' orphans either
    for sql_join in (False, True):
        (da, ra), (dp, rp) = (load_log(d, log.cfg, None, None, sql_join=sql_join) for d in (db, plain))
        np.testing.assert_array_equal(da.request_id, dp.request_id)
        np.testing.assert_array_equal(ra.reward, rp.reward)
        np.testing.assert_array_equal(ra.has_feedback, rp.has_feedback)
        assert (ra.n_events, ra.n_late) == (rp.n_events, rp.n_late)
        if not sql_join:
            assert ra.n_orphan == rp.n_orphan
    db.dispose()
    plain.dispose()
