"""Served-page evaluation (`homepage evaluate`) and the publish gate that uses it.

References: the page extraction against allocator.layout_items run user by user; the metrics against
a per-user loop over the pages; the gate against oracle and anti-oracle candidates whose pages are
known to contain the most / fewest future positives.
"""

from __future__ import annotations

import csv
import json
import sqlite3

import numpy as np
import pytest

import rankers
from allocator import block_table, build_candidates, layout_items
from policy_api import cli, jobs, registry
from policy_api.engine import DecisionEngine, LiveSignals, ScorerHandle, build_state, head_first, load_state
from policy_api.errors import InvalidInput
from policy_api.log import Catalog, load_items, make_engine, read_catalog_csv, upgrade, upsert_items
from simulator import EVENT_TYPES, exposure_log, make_world


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A small simulator world's exposure log imported as history; the config active."""
    tmp = tmp_path_factory.mktemp("evaluate")
    world = make_world(n_users=120, n_items=240, seed=3)
    (tmp / "homepage.toml").write_text(world.default_config_toml())
    world.to_catalog_csv(tmp / "items.csv")
    _, ev = exposure_log(world, 1500, np.random.default_rng(4))
    with (tmp / "inter.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "event", "timestamp"])
        for u, i, t, ts in zip(ev["user"].tolist(), ev["item"].tolist(), ev["type"].tolist(), ev["ts"].tolist(),
                               strict=True):
            w.writerow([f"u{u}", str(world.item_ids[i]), EVENT_TYPES[t], repr(ts)])
    url = f"sqlite:///{tmp / 'h.db'}"
    upgrade(url)
    db = make_engine(url)
    rec = registry.activate_config(db, (tmp / "homepage.toml").read_text(), author="test")
    cfg = registry.require_active_config(db)
    upsert_items(db, read_catalog_csv(tmp / "items.csv", cfg.config.category_names).rows())
    jobs.import_file(db, tmp / "inter.csv")
    yield tmp, db, cfg, rec
    db.dispose()


def _holdout(db, cfg, **kw):
    catalog = Catalog.from_arrays(load_items(db))
    ev = jobs.log_events(db, catalog)
    h = jobs.holdout_split(ev["user"], ev["item"], ev["ts"], ev["type"], event_weights=cfg.config.event_weight_vector(),
                           n_users=ev["n_users"], n_items=catalog.n_items, **kw)
    return catalog, ev, h


@pytest.mark.parametrize("page_users", [1000, 3])  # all users at once; 3 at a time (the last part 1)
def test_served_pages_match_the_engine_layout_user_by_user(logged, seed, page_users, monkeypatch):
    monkeypatch.setattr(jobs._evaluate, "PAGE_USERS", page_users)
    _, db, cfg, _ = logged
    catalog = Catalog.from_arrays(load_items(db))
    state = build_state(cfg.config, catalog)
    rng = np.random.default_rng(seed)
    pools = jobs._evaluate._pools(state, 7, seed)
    scores = rng.gamma(1.0, size=pools.shape)
    pages = jobs.served_pages(state, scores, pools)
    space = state.space
    b0 = int(np.flatnonzero(space.tilt_levels == 0)[0])
    for u in range(pools.shape[0]):  # the reference: one user at a time, the engine's own helpers
        cat = state.item_category[pools[u]]
        tbl = block_table(space, scores[u][None], cat, state.is_tail[pools[u]], state.tail[pools[u]],
                          rank_scores=head_first(scores[u], state.is_tail[pools[u]])[None])
        cand = build_candidates(space, tbl, np.zeros(space.n_constraints))
        ok = np.flatnonzero(cand.mask[0] & (cand.tilt[0] == b0))
        best = ok[np.argmax(cand.value[0, ok])]
        shown = layout_items(space, tbl, 0, cand.categories[0, best], cand.blocks[0, best], b0)
        want = np.full((space.n_slots, space.items_per_module), -1)
        for s, pos in enumerate(shown):
            want[s, :pos.size] = pools[u][pos]
        np.testing.assert_array_equal(pages[u], want.ravel())
        # every page item is in the pool, each category's block is its best-scored items in order
        assert np.isin(pages[u][pages[u] >= 0], pools[u]).all()


def test_pools_follow_the_engine_quotas(logged, seed):
    _, db, cfg, _ = logged
    state = build_state(cfg.config, Catalog.from_arrays(load_items(db)))
    pools = jobs._evaluate._pools(state, 50, seed)
    assert pools.shape[1] == int((state.head_quota + state.rest_quota).sum())
    for c, items in enumerate(state.by_category):
        inside = np.isin(pools, items).sum(axis=1)
        assert (inside == state.head_quota[c] + state.rest_quota[c]).all()
        assert np.isin(items[: state.head_quota[c]], pools[0]).all()
    assert (np.sort(pools, axis=1)[:, 1:] != np.sort(pools, axis=1)[:, :-1]).all()  # no item twice


def test_pools_drawn_a_few_users_at_a_time_are_the_pools_drawn_at_once(logged, seed, monkeypatch):
    """The random keys come a bounded number at a time; the draws are those of one call for all."""
    import dataclasses

    _, db, cfg, _ = logged
    small = dataclasses.replace(cfg.config, pool_size=120)  # half the catalog: each user's rest is drawn
    state = build_state(small, Catalog.from_arrays(load_items(db)))
    assert state.rest_quota.sum() > 0
    at_once = jobs._evaluate._pools(state, 40, seed)
    monkeypatch.setattr(jobs._evaluate, "POOL_KEYS", 1)  # one user at a time
    one_by_one = jobs._evaluate._pools(state, 40, seed)
    monkeypatch.setattr(jobs._evaluate, "POOL_KEYS", 250)
    np.testing.assert_array_equal(one_by_one, at_once)
    np.testing.assert_array_equal(jobs._evaluate._pools(state, 40, seed), at_once)
    assert (at_once[0] != at_once[1]).any()


def test_holdout_split_is_by_time_and_keeps_new_positives_only(logged):
    _, db, cfg, _ = logged
    catalog, ev, h = _holdout(db, cfg, train_share=0.7)
    w = cfg.config.event_weight_vector()[ev["type"]]
    assert h.train_ts.max() < h.cutoff and (h.train_weight > 0).all()
    assert h.train_item.size == int(((ev["ts"] < h.cutoff) & (w > 0)).sum())
    for r, u in enumerate(h.users.tolist()[:20]):  # a slow reference per user
        m = ev["user"] == u
        past = set(ev["item"][m & (ev["ts"] < h.cutoff) & (w > 0)].tolist())
        fut = set(ev["item"][m & (ev["ts"] >= h.cutoff) & (w > 0)].tolist()) - past
        assert set(h.positives[[r]].indices.tolist()) == fut and fut
        assert set(h.seen[[r]].indices.tolist()) == past


def test_metrics_match_a_per_user_loop_and_oracle_beats_popularity(logged):
    _, db, cfg, _ = logged
    catalog, _, h = _holdout(db, cfg)
    state = build_state(cfg.config, catalog)
    pos = h.positives.toarray() > 0

    def oracle(users, pools):  # the held-out users' future positives first, the others near 0
        return 1e-3 + pos[np.searchsorted(h.users, users)[:, None], pools]

    scorers = jobs.baseline_scorers(h, state.item_category, names=("popularity",))
    scorers["oracle"] = oracle
    res = jobs.evaluate_pages(state, h, scorers, baselines=("popularity",), n_boot=200)
    assert res.best_baseline == "popularity" and res.n_users == h.users.size
    pools = jobs._evaluate._pools(state, h.users.size, 0)
    # the user's seen items below every other of the pool, as the evaluation excludes them
    seen = h.seen.toarray()[np.arange(h.users.size)[:, None], pools] > 0
    sc = oracle(h.users, pools)
    sc = np.where(seen, sc.min(axis=1, keepdims=True) - 1.0 - np.abs(sc).max(axis=1, keepdims=True), sc)
    pages = jobs.served_pages(state, sc, pools, last=seen)
    k = pages.shape[1]
    rec = [len(set(p[p >= 0].tolist()) & set(np.flatnonzero(q).tolist())) / min(q.sum(), k)
           for p, q in zip(pages, pos, strict=True)]
    assert res.row("oracle")["recall"] == pytest.approx(np.mean(rec))
    d = res.diff("oracle", "recall")
    assert d["ci_low"] > 0 and d["mean_diff"] == pytest.approx(res.row("oracle")["recall"] - res.row("popularity")["recall"])


class _PairScorer:
    """A candidate model with fixed scores: +1 (oracle) or -1 (anti-oracle) on the future positives."""

    def __init__(self, pos, sign):
        self.pos, self.sign = pos, sign

    def score_pairs(self, user_idx, item_idx):
        u = np.asarray(user_idx)
        hit = self.pos[np.maximum(u, 0), item_idx] * (u >= 0)
        return 1e-3 + (hit if self.sign > 0 else 1.0 - hit)


def table_users(h):
    """Held-out users the gate judges: those of the holdout with a future positive."""
    return int(h.users.size)


def test_gate_passes_an_oracle_and_refuses_a_loser(logged):
    _, db, cfg, _ = logged
    catalog, ev, h = _holdout(db, cfg)
    state = build_state(cfg.config, catalog)
    full = np.zeros((ev["n_users"], catalog.n_items))
    full[h.users] = h.positives.toarray() > 0
    data = {"events": ev["events"], "n_users": ev["n_users"], "user_ids": ev["user_ids"]}
    w = cfg.config.event_weight_vector()
    # too few held-out users to decide on: even the oracle is not published
    chosen, table = jobs._train.served_gate(state, data, {"oracle": _PairScorer(full, 1.0)}, h.cutoff, w, n_boot=200,
                                            min_users=table_users(h) + 1)
    assert chosen is None and not table["passed"]
    assert f"only {table_users(h)} held-out users (need at least {table_users(h) + 1} to decide)" in table["reason"]
    chosen, table = jobs._train.served_gate(state, data, {"oracle": _PairScorer(full, 1.0)}, h.cutoff, w, n_boot=200,
                                            min_users=1)
    assert chosen == "oracle" and table["passed"]
    chosen, table = jobs._train.served_gate(state, data, {"loser": _PairScorer(full, -1.0)}, h.cutoff, w, n_boot=200,
                                            min_users=1)
    assert chosen is None and not table["passed"]
    rows = {r["scorer"]: r["recall"] for r in table["scorers"]}
    assert rows["loser"] < rows[table["best_baseline"]] == max(v for k, v in rows.items() if k != "loser")
    # two candidates: the better one is chosen (the debiasing dial)
    chosen, table = jobs._train.served_gate(state, data, {"loser": _PairScorer(full, -1.0),
                                                          "oracle": _PairScorer(full, 1.0)}, h.cutoff, w, n_boot=200,
                                            min_users=1)
    assert chosen == "oracle"


class _RateScorer:
    """A candidate that scores every user's items by one rate per item."""

    def __init__(self, rate):
        self.rate = rate

    def score_pairs(self, user_idx, item_idx):
        return self.rate[np.asarray(item_idx)]


def test_gate_judges_the_item_rates_the_engine_serves_built_in(logged):
    """Where the client reports impressions, the engine's plan serves each item's rate per impression: the
    gate judges that scorer too (each item's exposures and positives before the cutoff, counted here row
    by row), and a copy of it cannot pass (its difference is 0 for every user)."""
    _, db, cfg, _ = logged
    catalog, _, h = _holdout(db, cfg)
    state = build_state(cfg.config, catalog)
    data = jobs._train.log_training_arrays(db, catalog)
    w = cfg.config.event_weight_vector()
    imp, ev = data["impressions"], data["events"]
    positive = {(d, i) for d, i, t, k in zip(ev["decision"].tolist(), ev["item"].tolist(), ev["ts"].tolist(),
                                              ev["type"].tolist(), strict=True) if t < h.cutoff and w[k] > 0}
    shown, hit = [], []
    for d, i, t in zip(imp["decision"].tolist(), imp["item"].tolist(), imp["ts"].tolist(), strict=True):
        if t < h.cutoff:
            shown.append(i)
            hit.append((d, i) in positive)
    cat0 = np.where(state.item_category >= 0, state.item_category, 0)
    rate, _ = rankers.item_rates(np.array(shown), np.array(hit), cat0)
    copy = {"copy": _RateScorer(rate)}
    # an imported history of ratings has no reported impressions: the engine's plan carries no item rates
    _, table = jobs._train.served_gate(state, data, copy, h.cutoff, w, n_boot=200, min_users=1, item_rate=True)
    assert "item_rate" not in {r["scorer"] for r in table["scorers"]}
    data["impressions"]["explicit"] = np.ones(imp["item"].size, dtype=bool)
    chosen, table = jobs._train.served_gate(state, data, copy, h.cutoff, w, n_boot=200, min_users=1, item_rate=True)
    rows = {r["scorer"]: r["recall"] for r in table["scorers"]}
    assert rows["item_rate"] == pytest.approx(rows["copy"], abs=1e-12)
    assert rows["copy"] > rows["popularity"]  # it beats the baselines it would replace ...
    assert chosen is None and not table["passed"]  # ... but not what the engine serves already
    # nor does a baseline of positive counts replace the item rates: on a log of the engine's own
    # exposures its recall measures what was shown as much as what users like
    best = table["best_baseline"]
    assert best != "item_rate" and rows[best] > rows["item_rate"]
    before = len(registry.model_history(db, "ranker"))
    published, served = jobs._train._serve_baseline(db, table, data, state, catalog, cfg.config.category_names, w,
                                                    {}, "refused")
    assert published is None and served["kind"] == "unchanged" and best in served["reason"]
    assert len(registry.model_history(db, "ranker")) == before
    chosen, table = jobs._train.served_gate(state, data, copy, h.cutoff, w, n_boot=200, min_users=1, item_rate=False)
    assert "item_rate" not in {r["scorer"] for r in table["scorers"]}


def _world_db(path, world, ev, keep, toml, popularity=None):
    """A database at ``path`` with ``toml`` active, the world's catalog (its popularity column
    ``popularity`` where given, without features) and the events ``keep`` imported."""
    with (path / "inter.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "event", "timestamp"])
        for u, i, t, ts in zip(ev["user"][keep].tolist(), ev["item"][keep].tolist(), ev["type"][keep].tolist(),
                               ev["ts"][keep].tolist(), strict=True):
            w.writerow([f"u{u}", str(world.item_ids[i]), EVENT_TYPES[t], repr(ts)])
    if popularity is None:
        world.to_catalog_csv(path / "items.csv")
    else:
        with (path / "items.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["item_id", "category", "popularity"])
            w.writerows((str(world.item_ids[k]), world.categories[int(world.item_category[k])], float(popularity[k]))
                        for k in range(world.n_items))
    url = f"sqlite:///{path / 'h.db'}"
    upgrade(url)
    db = make_engine(url)
    registry.activate_config(db, toml, author="test")
    cfg = registry.require_active_config(db)
    upsert_items(db, read_catalog_csv(path / "items.csv", cfg.config.category_names).rows())
    jobs.import_file(db, path / "inter.csv")
    return db, cfg


@pytest.fixture(scope="module")
def split_worlds(tmp_path_factory):
    """The same world's log twice: all of it, and only its past (before the 80 % cutoff); a config
    whose served layout is the tilt-0 argmax (no exploration), so served pages are deterministic."""
    world = make_world(n_users=120, n_items=240, seed=3)
    _, ev = exposure_log(world, 1500, np.random.default_rng(4))
    toml = (world.default_config_toml().replace("levels = [0.0, 0.25, 0.5, 1.0]", "levels = [0.0]")
            .replace("budget = 0.05", "budget = 0.0\ntemperature = 0.0"))
    cutoff = float(np.sort(ev["ts"])[int(ev["ts"].size * 0.8)])
    full_dir, past_dir = tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("past")
    full, cfg_full = _world_db(full_dir, world, ev, np.ones(ev["ts"].size, bool), toml)
    past, cfg_past = _world_db(past_dir, world, ev, ev["ts"] < cutoff, toml)
    yield {"full": full, "cfg_full": cfg_full, "past": past, "cfg_past": cfg_past, "cutoff": cutoff,
           "past_dir": past_dir}
    full.dispose()
    past.dispose()


def _losing_residual(monkeypatch):
    """Make the trained residual ranker lose: its coefficients negated (popularity ranks last)."""
    fit = rankers.fit_residual
    monkeypatch.setattr(rankers, "fit_residual", lambda *a, **k: -fit(*a, **k))


def _engine_pages(db, user_ids):
    """Each user's page as the serving engine lays it out (decide(), the layout's items slot by slot)."""
    state = load_state(db)
    engine = DecisionEngine(state)
    index = state.catalog.index_of()
    k = state.config.items_per_module
    pages = np.full((len(user_ids), state.config.slots * k), -1)
    for r, uid in enumerate(user_ids):  # the reference: one request per user, as GET /layout serves it
        d = engine.decide(uid, f"req-{r}")
        assert not d.fallback, d.fallback_reason
        for m in d.modules:
            rows = [index[it["item_id"]] for it in m["items"]]
            pages[r, m["slot"] * k:m["slot"] * k + len(rows)] = rows
    return state, pages


def test_refused_model_serves_the_best_baseline_with_its_evaluated_pages(split_worlds, monkeypatch, capsys):
    w = split_worlds
    _losing_residual(monkeypatch)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{w['past_dir'] / 'h.db'}")
    monkeypatch.chdir(w["past_dir"])
    assert cli.main(["train", "--min-gate-users", "50", "--report-dir", str(w["past_dir"] / "report")]) == 0
    out = capsys.readouterr().out
    rows = registry.model_history(w["past"], "ranker")
    assert [(r.version, r.status) for r in rows] == [(2, "published"), (1, "rejected")]
    served = registry.model(w["past"], "ranker")
    gate = served.metrics["gate"]
    best = gate["best_baseline"]
    assert not gate["passed"] and served.metrics["served"]["kind"] == "baseline"
    assert served.metrics["served"]["scorer"] == best
    assert f"SERVED SCORER: baseline {best} (ranker version 2)" in out
    assert f"trained model NOT published (version 1 recorded as rejected); serving the best built-in baseline {best}" in out
    # the independent reference: `homepage evaluate`'s machinery on the whole log, split at the cutoff
    catalog, ev, h = _holdout(w["full"], w["cfg_full"], cutoff=w["cutoff"])
    ref_state = build_state(w["cfg_full"].config, catalog)
    ref = jobs.evaluate_pages(ref_state, h, jobs.baseline_scorers(h, ref_state.item_category), n_boot=10)
    assert ref.best_baseline == best
    # the pages the serving engine builds with the published scorer, user by user
    user_ids = [ev["user_ids"][u] for u in h.users.tolist()]
    state, pages = _engine_pages(w["past"], user_ids)
    assert state.scorer.name == f"{best}:2" and state.versions["ranker"] == 2
    m = rankers.page_metrics(pages, h.positives, n_items=catalog.n_items)
    # the served scorer demotes what the user already played only where plays seldom repeat in the log
    past = jobs.log_events(w["past"], catalog)  # the log the training saw
    ev_play = np.asarray(past["type"]) == rankers.EVENT_TYPES.index("play")
    share = rankers.repeat_share(np.asarray(past["user"])[ev_play], np.asarray(past["item"])[ev_play],
                                 np.asarray(past["ts"])[ev_play], catalog.n_items)
    demote = share < jobs.MAX_REPEAT_SHARE and int(ev_play.sum()) >= jobs.MIN_PLAYS_TO_DEMOTE
    assert served.metrics["served"]["demote_seen"] is demote
    assert served.metrics["served"]["repeat_share"] == pytest.approx(share)
    if not demote:  # judged as served: the scores as they are
        ref = jobs.evaluate_pages(ref_state, h, jobs.baseline_scorers(h, ref_state.item_category), n_boot=10,
                                  exclude_seen=False)
    assert np.mean(m["recall"]) == pytest.approx(ref.row(best)["recall"], abs=1e-12)
    assert np.mean(m["ndcg"]) == pytest.approx(ref.row(best)["ndcg"], abs=1e-12)
    seen = h.seen.toarray() > 0
    shown_seen = np.take_along_axis(seen, np.maximum(pages, 0), axis=1) & (pages >= 0)
    assert shown_seen.any() != demote  # what the user already chose is served back only where plays repeat


def test_baseline_served_with_live_events_scores_them_as_history(split_worlds):
    """A live positive joins the served baseline's history: its item leaves the page and, for
    item-kNN, its neighbours gain."""
    w = split_worlds
    catalog = Catalog.from_arrays(load_items(w["past"]))
    cfg = w["cfg_past"].config
    ev = jobs.log_events(w["past"], catalog)
    wv = cfg.event_weight_vector()
    pos = wv[ev["type"]] > 0
    state0 = build_state(cfg, catalog)
    knn = jobs.fit_baseline("item_knn", ev["user"][pos], ev["item"][pos], ev["ts"][pos], wv[ev["type"]][pos],
                            item_category=state0.item_category, n_users=ev["n_users"], type_weights=wv)
    handle = _handle(knn, ev["user_ids"])
    state = build_state(cfg, catalog, scorer=handle)
    engine = DecisionEngine(state)
    pool = np.concatenate(state.by_category)
    liked = int(state.by_category[0][0])
    live = LiveSignals("hit", np.zeros(len(cfg.category_names)), np.zeros(0, np.int64), 1,
                       positives=np.array([liked]), positive_types=np.array([0]), n_positive=1)
    cold, _ = engine.item_scores(state, -1, pool)
    hot, _ = engine.item_scores(state, -1, pool, live)
    want = knn.score_live(-1, pool, np.array([liked]), np.array([0]))
    np.testing.assert_allclose(hot / np.max(np.abs(hot)), want / np.max(np.abs(want)), rtol=1e-9, atol=1e-12)
    at = int(np.flatnonzero(pool == liked)[0])
    assert hot[at] == hot.min() and cold[at] > cold.min()
    neighbours = knn.similarity_[[liked]].toarray()[0][pool] > 0
    assert neighbours.any() and (hot[neighbours] > 0).all()
    assert isinstance(knn, rankers.HistoryScorer)


def _handle(scorer, user_ids):
    return ScorerHandle(scorer, {u: i for i, u in enumerate(user_ids)}, name="item_knn:test")


def test_residual_ranker_is_gated_and_published_when_it_wins(split_worlds, monkeypatch):
    """The published residual model is what the gate judged; a loser is never published."""
    w = split_worlds
    res = jobs.train_ranker(w["full"], w["cfg_full"], gate_users=200, min_gate_users=1)
    gate = res.metrics["gate"]
    rows = {r["scorer"]: r for r in gate["scorers"]}
    d = next(x for x in gate["differences_vs_best_baseline"] if x["scorer"] == "residual" and x["metric"] == "recall")
    assert d["mean_diff"] == pytest.approx(rows["residual"]["recall"] - rows[gate["best_baseline"]]["recall"])
    assert gate["passed"] == (d["ci_low"] > 0)
    assert res.metrics["pop_exponent"] in jobs.POP_EXPONENTS
    rec = registry.model(w["full"], "ranker")
    if gate["passed"] and gate["ece_passed"]:
        assert res.rejected is None and rec.metrics["served"]["kind"] == "model"
    elif gate["best_baseline"] == jobs.CATALOG_POPULARITY:
        assert res.rejected is not None and res.published is None and rec is None
    else:
        assert res.rejected is not None and rec.metrics["served"]["kind"] == "baseline"
        assert rec.metrics["served"]["scorer"] == gate["best_baseline"]
    assert rec is None or rec.version == res.published


def test_evaluate_judges_a_published_history_scorer_as_of_the_cutoff(split_worlds, monkeypatch):
    """A scorer published from the whole log holds the held-out events in its snapshot (judged as
    stored, they would count as already seen): `homepage evaluate` judges its parameters on the
    history before the cutoff. A baseline published in place of a refused model then scores exactly
    as that baseline's own row; the residual ranker as the same coefficients fitted on a log that
    ends at the cutoff."""
    from policy_api.jobs._evaluate import _as_of_cutoff

    w = split_worlds
    _losing_residual(monkeypatch)
    jobs.train_ranker(w["full"], w["cfg_full"], gate_users=200, min_gate_users=1)
    rec = registry.model(w["full"], "ranker")
    assert rec.metrics["served"]["kind"] == "baseline"
    base = rec.metrics["served"]["scorer"]
    got = jobs.evaluate_served(w["full"], w["cfg_full"], n_boot=10)
    published = got.row(f"{base}:{rec.version}")
    assert (published["recall"], published["ndcg"]) == (got.row(base)["recall"], got.row(base)["ndcg"])
    assert got.info["ranker_judged"].startswith("as of the cutoff")
    # the residual ranker: any coefficients, the whole log's snapshot moved back to the cutoff
    catalog = Catalog.from_arrays(load_items(w["full"]))
    cfg = w["cfg_full"].config
    wv = cfg.event_weight_vector()
    full = jobs.log_events(w["full"], catalog)
    h = jobs.holdout_split(full["user"], full["item"], full["ts"], full["type"], event_weights=wv,
                           n_users=full["n_users"], n_items=catalog.n_items, cutoff=w["cutoff"])
    cat = np.maximum(build_state(cfg, catalog).item_category, 0)
    n_feat = len(rankers.HistoryScorer("popularity", cat).feature_names())
    coef = np.random.default_rng(5).normal(size=n_feat)
    stored = jobs.residual_scorer(full, cat, coef, 0.5, wv)
    as_of = _as_of_cutoff(stored, full, h, cat, wv, catalog.popularity)
    past = jobs.log_events(w["past"], catalog)  # the reference: a log that ends at the cutoff
    ref = jobs.residual_scorer(past, cat, coef, 0.5, wv)
    row_in_past = {u: k for k, u in enumerate(past["user_ids"])}
    users = h.users[[full["user_ids"][u] in row_in_past for u in h.users.tolist()]]
    pools = np.tile(np.arange(catalog.n_items), (users.size, 1))
    np.testing.assert_allclose(as_of.score_pools(users, pools),
                               ref.score_pools(np.array([row_in_past[full["user_ids"][u]] for u in users.tolist()]),
                                               pools), rtol=1e-9, atol=1e-12)
    assert not np.allclose(stored.score_pools(users, pools), ref.score_pools(
        np.array([row_in_past[full["user_ids"][u]] for u in users.tolist()]), pools))
    assert users.size > 50


@pytest.mark.slow
def test_torch_model_that_loses_is_refused_and_the_baseline_served(logged, tmp_path):
    tmp, _, _, _ = logged
    with sqlite3.connect(tmp / "h.db") as src, sqlite3.connect(tmp_path / "h.db") as dst:
        src.backup(dst)  # a snapshot with what is still in the write-ahead log (a file copy misses it)
    db = make_engine(f"sqlite:///{tmp_path / 'h.db'}")
    cfg = registry.require_active_config(db)
    res = jobs.train_ranker(db, cfg, model="torch", max_epochs=1, interaction="cross", min_gate_users=1)
    gate = res.metrics["gate"]
    rows = {r["scorer"]: r["recall"] for r in gate["scorers"]}
    chosen = gate["chosen"]
    d = next(x for x in gate["differences_vs_best_baseline"] if x["scorer"] == chosen and x["metric"] == "recall")
    assert d["mean_diff"] == pytest.approx(rows[chosen] - rows[gate["best_baseline"]])
    # one epoch on a popularity-driven log: the model's pages lose to a baseline, so it is refused
    assert d["ci_low"] <= 0 and rows[chosen] < rows[gate["best_baseline"]]
    assert gate["passed"] == (d["ci_low"] > 0)
    assert res.rejected is not None
    served = registry.model(db, "ranker")
    if gate["best_baseline"] == jobs.CATALOG_POPULARITY:
        # the catalog's popularity column, which the engine serves built in, beats every baseline fitted
        # on the log: nothing is published and the engine keeps serving it
        assert res.published is None and served is None
        assert res.metrics["served"]["kind"] == "unchanged"
    else:
        assert res.published == res.rejected + 1
        assert served.metrics["served"] == res.metrics["served"]
        assert (served.metrics["served"]["kind"], served.metrics["served"]["scorer"]) == ("baseline",
                                                                                         gate["best_baseline"])
    db.dispose()


def test_model_choice_is_checked(logged):
    _, db, cfg, _ = logged
    with pytest.raises(InvalidInput, match=r"model must be 'residual' or 'torch'; got 'gbdt'"):
        jobs.train_ranker(db, cfg, model="gbdt")


def test_cli_evaluate_prints_writes_json_and_report(logged, monkeypatch, capsys):
    tmp, db, cfg, _ = logged
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp / 'h.db'}")
    monkeypatch.chdir(tmp)
    out = tmp / "ev"
    assert cli.main(["evaluate", "--n-boot", "100", "--json", str(tmp / "e.json"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads((tmp / "e.json").read_text())
    assert [r["scorer"] for r in res["scorers"]] == [*jobs.BASELINE_SCORERS, jobs.CATALOG_POPULARITY]
    for r in res["scorers"]:
        assert f"{r['recall']:.4f}" in text and 0.0 <= r["recall"] <= r["hr"] <= 1.0
    assert (out / "index.html").is_file() and (out / "metrics.png").stat().st_size > 1000
    assert cli.main(["evaluate", "--train-share", "1.5"]) == 2
    assert "train_share must be in (0, 1); got 1.5" in capsys.readouterr().err
    assert cli.main(["evaluate", "--n-boot", "0"]) == 2
    assert "n_boot must be an int >= 1; got 0" in capsys.readouterr().err


def test_bad_baseline_name_is_named(logged):
    _, db, cfg, _ = logged
    catalog, _, h = _holdout(db, cfg)
    with pytest.raises(InvalidInput, match=r"baseline must be one of popularity, recent_popularity"):
        jobs.baseline_scorers(h, np.zeros(catalog.n_items, dtype=np.int64), names=("nope",))


def test_recent_item_popularity_matches_a_loop(seed):
    rng = np.random.default_rng(seed)
    n = 200
    ev = {"item": rng.integers(0, 7, n), "ts": rng.uniform(0, 100, n), "type": rng.integers(0, 5, n)}
    w = np.array([1.0, 2.0, 4.0, 5.0, -0.5])
    got = jobs.recent_item_popularity(ev, w, 7, t_end=80.0, half_life_s=10.0)
    want = np.zeros(7)
    for i, t, k in zip(ev["item"].tolist(), ev["ts"].tolist(), ev["type"].tolist(), strict=True):
        if w[k] > 0 and t <= 80.0:
            want[i] += w[k] * 0.5 ** ((80.0 - t) / 10.0)
    np.testing.assert_allclose(got, want)


def test_sampled_negatives_are_unlabelled_impressions_of_imported_decisions(logged):
    _, db, _, _ = logged
    catalog = Catalog.from_arrays(load_items(db))
    base = jobs.log_training_arrays(db, catalog)
    more = jobs.log_training_arrays(db, catalog, sampled_negatives=3, seed=1)
    n0, n1 = base["impressions"]["item"].size, more["impressions"]["item"].size
    assert n0 < n1 <= 4 * n0  # collisions with a chosen item (or each other) merge
    key = lambda d: set((d["impressions"]["decision"] * catalog.n_items + d["impressions"]["item"]).tolist())  # noqa: E731
    assert key(base) <= key(more)
    # the events (labels) are unchanged: the new impressions carry none
    np.testing.assert_array_equal(base["events"]["item"], more["events"]["item"])
    per_dec = np.bincount(more["impressions"]["decision"]) - np.bincount(base["impressions"]["decision"],
                                                                         minlength=more["impressions"]["decision"].max() + 1)
    assert per_dec.max() <= 3 * np.bincount(base["events"]["decision"]).max()
    with pytest.raises(InvalidInput, match=r"sampled_negatives must be an int >= 0; got -1"):
        jobs.log_training_arrays(db, catalog, sampled_negatives=-1)


@pytest.mark.parametrize(("recall_ci", "ndcg_ci", "replaces"), [
    ((-0.08, 0.01), (-0.09, 0.02), False),  # not surely better on either: the catalog's popularity stays
    ((-0.08, -0.01), (-0.09, 0.02), True),  # surely more recall
    ((-0.02, 0.03), (-0.09, -0.02), True),  # recall a tie, surely better NDCG
    ((0.01, 0.05), (-0.09, -0.02), False),  # the catalog surely has more recall
])
def test_a_log_baseline_replaces_the_catalog_popularity_only_when_surely_better(recall_ci, ndcg_ci, replaces):
    from policy_api.jobs._train import _serve_baseline, beats_catalog_popularity

    diffs = [{"scorer": jobs.CATALOG_POPULARITY, "metric": m, "vs": "item_knn", "mean_diff": sum(ci) / 2,
              "ci_low": ci[0], "ci_high": ci[1], "p_value": 0.5} for m, ci in (("recall", recall_ci), ("ndcg", ndcg_ci))]
    gate = {"best_baseline": "item_knn", "differences_vs_best_baseline": diffs,
            "scorers": [{"scorer": "item_knn", "recall": 0.9, "ndcg": 0.5}]}
    ok, why = beats_catalog_popularity(gate)
    assert ok is replaces
    if not replaces:  # the catalog's popularity stays served; on a young log (10 plays) as built in
        assert f"recall minus item_knn's {sum(recall_ci) / 2:+.4f}, 95% CI [{recall_ci[0]:+.4f}" in why
        data, catalog = _plays(np.arange(10) % 3, np.arange(10))
        version, served = _serve_baseline(None, gate, data, None, catalog, ("songs",), np.ones(5), {},  # type: ignore[arg-type]
                                          "refused")
        assert version is None and served["kind"] == "unchanged" and why in served["reason"]
        assert "the log holds 10 plays (at least 2000" in served["reason"]


def _plays(user, item):
    """A log's training arrays holding only ``play`` events (user, item rows, one second apart) and a
    catalog of ``item.max() + 1`` songs, popularity 1, 2, ..."""
    n_items = int(item.max()) + 1
    data = {"events": {"user": user, "item": item, "ts": np.arange(user.size, dtype=np.float64),
                       "type": np.full(user.size, rankers.EVENT_TYPES.index("play"))}, "n_users": int(user.max()) + 1}
    catalog = Catalog.from_arrays({"item_ids": [f"i{k}" for k in range(n_items)], "category": ["songs"] * n_items,
                                   "popularity": np.arange(1.0, n_items + 1.0), "features": np.zeros((n_items, 0))})
    return data, catalog


def test_exposure_counts_the_pages_that_showed_each_item_and_needs_explicit_impressions(seed):
    rng = np.random.default_rng(seed)
    n_dec, n_items, n_users = 300, 40, 25
    dec_ts = np.sort(rng.uniform(0, 1000, n_dec))
    dec_user = rng.integers(0, n_users, n_dec)
    pairs = {(int(d), int(i)) for d, i in zip(rng.integers(0, n_dec, 2500), rng.integers(0, n_items, 2500),
                                             strict=True)}
    d_imp, i_imp = (np.array(x) for x in zip(*sorted(pairs), strict=True))
    explicit = rng.random(d_imp.size) < 0.9
    chosen = rng.random(d_imp.size) < 0.3  # a positive event on the pair
    data = {"n_users": n_users,
            "impressions": {"decision": d_imp, "user": dec_user[d_imp], "item": i_imp, "ts": dec_ts[d_imp],
                            "explicit": explicit},
            "events": {"decision": d_imp[chosen], "user": dec_user[d_imp[chosen]], "item": i_imp[chosen],
                       "ts": dec_ts[d_imp[chosen]] + 1.0, "type": np.zeros(int(chosen.sum()), dtype=np.int64)}}
    wv = np.array([1.0])
    start, end = 300.0, 800.0
    ex = jobs.exposure_of(data, wv, start, end, n_items=n_items)
    # the reference: a loop over the period's pages with a reported impression
    pages: dict[int, set[int]] = {}
    for d, i, e in zip(d_imp.tolist(), i_imp.tolist(), explicit.tolist(), strict=True):
        if e and start <= dec_ts[d] < end:
            pages.setdefault(d, set()).add(i)
    want = np.array([sum(i in s for s in pages.values()) for i in range(n_items)]) / len(pages)
    assert ex is not None and ex.n_pages == len(pages)
    np.testing.assert_allclose(ex.propensity, want, rtol=1e-12)
    pos_pairs = [(d, i) for d, i, c in zip(d_imp.tolist(), i_imp.tolist(), chosen.tolist(), strict=True)
                 if c and start <= dec_ts[d] < end]
    assert ex.explicit_share == pytest.approx(np.mean([i in pages.get(d, ()) for d, i in pos_pairs]))
    floor = jobs.MIN_EXPOSURES / len(pages)
    np.testing.assert_allclose(ex.item_weight(), 1.0 / np.maximum(want, floor))
    # a log of choices only (no impression reported) is not exposure-logged; nor is one where most
    # positives come without a reported impression
    only_choices = dict(data, impressions=dict(data["impressions"], explicit=np.zeros(d_imp.size, dtype=bool)))
    assert jobs.exposure_of(only_choices, wv, start, end, n_items=n_items) is None
    rare = dict(data, impressions=dict(data["impressions"], explicit=explicit & (rng.random(d_imp.size) < 0.3)))
    assert jobs.exposure_of(rare, wv, start, end, n_items=n_items) is None


def test_exposure_weighting_moves_the_judgement_from_what_was_shown_toward_what_users_prefer():
    """In a popularity-led exposure log, what users go on to choose is popularity x preference: counted
    plainly, a page of popular items they like recalls far more than a page of what they prefer; with
    each positive weighted by its item's inverse exposure (the simulator's truth: exposure was drawn
    by popularity alone), most of that lead goes."""
    from dataclasses import replace

    from allocator import parse_config_text
    from tests.test_common import world_catalog

    world = make_world(n_users=300, n_items=600, seed=5)
    imp, ev = exposure_log(world, 6000, np.random.default_rng(1))
    data = {"n_users": world.n_users, "events": ev,
            "impressions": {**imp, "explicit": np.ones(imp["item"].size, dtype=bool)}}
    cfg = parse_config_text(world.default_config_toml())
    state = build_state(cfg, world_catalog(world))
    wv = cfg.event_weight_vector()
    cutoff = float(np.quantile(ev["ts"], 0.7))
    h = jobs.gate_holdout(state, data, cutoff, wv, max_users=300)
    ex = jobs.exposure_of(data, wv, cutoff, np.inf, n_items=world.n_items)
    assert ex is not None and ex.explicit_share == 1.0

    def scorer(with_popularity: bool) -> jobs.PageScorer:
        def score(users: np.ndarray, pools: np.ndarray) -> np.ndarray:
            u, i = np.repeat(users, pools.shape[1]), pools.ravel()
            p = 1.0 / (1.0 + np.exp(-world.true_preference(u, i)))
            return (p * (world.popularity[i] if with_popularity else 1.0)).reshape(pools.shape)
        return score

    res = jobs.evaluate_pages(state, replace(h, item_weight=ex.item_weight()),
                              {"choice": scorer(True), "preference": scorer(False)}, baselines=["choice"], n_boot=1)
    pref, choice = res.row("preference"), res.row("choice")
    plain = pref["recall"] - choice["recall"]
    weighted = pref["recall_ipw"] - choice["recall_ipw"]
    assert plain < -0.15  # counted plainly, exposure decides (-0.18 to -0.21 over world seeds 5-7)
    assert weighted - plain > 0.06, (plain, weighted)  # +0.09 to +0.12 over those seeds
    assert "IPW recall / NDCG" in res.table()


def test_held_pool_items_equal_the_dense_lookup(seed):
    """The gate's calibration reads which pool items each held-out user holds from the sparse matrix
    (no dense users x catalog copy): the same as the dense lookup, stored zeros included."""
    import scipy.sparse as sp

    from policy_api.jobs._evaluate import held_in_pools

    rng = np.random.default_rng(seed)
    m = sp.random(40, 300, density=0.05, random_state=seed, format="csr")
    m.data[rng.random(m.data.size) < 0.2] = 0.0  # stored zeros hold nothing
    pools = np.stack([rng.choice(300, 60, replace=False) for _ in range(40)])
    want = np.take_along_axis(m.toarray() > 0, pools, axis=1)
    np.testing.assert_array_equal(held_in_pools(m, pools), want)
    assert want.any() and (m.data == 0).any()


@pytest.fixture(scope="module")
def future_popularity(tmp_path_factory):
    """A log of films (each user plays an item once: no repeats) whose tastes turn at 60 % of its time
    (the items drawn from another popularity after it), and a catalog whose popularity column counts
    each item's plays since the turn: it knows the present, so it is the best baseline where the
    log-fitted ones still carry the past. The whole log and its past alone (before the 80 % cutoff)
    imported, under a config served as its tilt-0 argmax."""
    world = make_world(n_users=300, n_items=200, seed=5)
    rng = np.random.default_rng(6)
    span, turn = 90 * 86400.0, 0.6 * 90 * 86400.0
    before = world.popularity / world.popularity.sum()
    after = rng.permutation(before)
    users, items, times = [], [], []
    for u in range(300):  # building the fixture's log, not a measured path
        t = np.sort(rng.uniform(0.0, span, int(rng.integers(8, 20))))
        k = int((t < turn).sum())
        first = rng.choice(200, size=k, replace=False, p=before)
        rest = after.copy()
        rest[first] = 0.0
        later = rng.choice(200, size=t.size - k, replace=False, p=rest / rest.sum())
        users.append(np.full(t.size, u))
        items.append(np.concatenate([first, later]))
        times.append(1.6e9 + t)
    user, item, ts = np.concatenate(users), np.concatenate(items), np.concatenate(times)
    cutoff = float(np.sort(ts)[int(ts.size * 0.8)])
    future = np.bincount(item[ts >= 1.6e9 + turn], minlength=200) + 0.5
    toml = (world.default_config_toml().replace("levels = [0.0, 0.25, 0.5, 1.0]", "levels = [0.0]")
            .replace("budget = 0.05", "budget = 0.0\ntemperature = 0.0"))
    ev = {"user": user, "item": item, "ts": ts, "type": np.full(user.size, EVENT_TYPES.index("play"))}
    dbs = {}
    for name, keep in (("full", np.ones(ts.size, bool)), ("past", ts < cutoff)):
        path = tmp_path_factory.mktemp(name)
        dbs[name], dbs[f"cfg_{name}"] = _world_db(path, world, ev, keep, toml, popularity=future)
    yield {**dbs, "cutoff": cutoff}
    dbs["full"].dispose()
    dbs["past"].dispose()


def test_the_catalog_popularity_stays_served_without_what_each_user_already_chose(future_popularity, monkeypatch):
    """When the catalog's popularity is the best baseline on a log whose plays never repeat, the gate
    judged its pages without each user's history; the engine serves those pages (not the built-in
    scorer's, which shows users the films they already saw), and reads the popularity from the catalog
    as it stands."""
    from policy_api.jobs._evaluate import with_catalog_popularity

    w = future_popularity
    _losing_residual(monkeypatch)
    res = jobs.train_ranker(w["past"], w["cfg_past"], min_gate_users=1)
    gate = res.metrics["gate"]
    assert gate["best_baseline"] == jobs.CATALOG_POPULARITY and not gate["passed"]
    served = res.metrics["served"]
    assert (served["kind"], served["scorer"], served["demote_seen"], served["repeat_share"]) == (
        "baseline", jobs.CATALOG_POPULARITY, True, 0.0)
    assert res.published == res.rejected + 1
    # the independent reference: the evaluation's machinery on the whole log, split at the cutoff
    catalog, ev, h = _holdout(w["full"], w["cfg_full"], cutoff=w["cutoff"])
    ref_state = build_state(w["cfg_full"].config, catalog)
    scorers = jobs.baseline_scorers(h, ref_state.item_category)
    ref = jobs.evaluate_pages(ref_state, h, scorers, baselines=with_catalog_popularity(scorers, catalog.popularity),
                              n_boot=10)
    assert ref.best_baseline == jobs.CATALOG_POPULARITY
    user_ids = [ev["user_ids"][u] for u in h.users.tolist()]
    state, pages = _engine_pages(w["past"], user_ids)
    assert state.scorer.name == f"{jobs.CATALOG_POPULARITY}:{res.published}"
    m = rankers.page_metrics(pages, h.positives, n_items=catalog.n_items)
    assert np.mean(m["recall"]) == pytest.approx(ref.row(jobs.CATALOG_POPULARITY)["recall"], abs=1e-12)
    assert np.mean(m["ndcg"]) == pytest.approx(ref.row(jobs.CATALOG_POPULARITY)["ndcg"], abs=1e-12)
    seen = h.seen.toarray() > 0
    # what the engine served before: the built-in popularity scorer shows users what they already saw
    builtin = DecisionEngine(build_state(w["cfg_past"].config, Catalog.from_arrays(load_items(w["past"]))))
    index = catalog.index_of()
    old = np.full_like(pages, -1)
    k = state.config.items_per_module
    for r, uid in enumerate(user_ids):
        for mod in builtin.decide(uid, f"req-{r}").modules:
            rows = [index[it["item_id"]] for it in mod["items"]]
            old[r, mod["slot"] * k:mod["slot"] * k + len(rows)] = rows
    def shown_seen(p):
        return int((np.take_along_axis(seen, np.maximum(p, 0), axis=1) & (p >= 0)).sum())
    # (a category of ~50 films runs out of unseen ones in a page's third module: both pages show some)
    assert shown_seen(pages) < shown_seen(old) / 2
    assert np.mean(rankers.page_metrics(old, h.positives, n_items=catalog.n_items)["recall"]) < np.mean(m["recall"])
    # `homepage evaluate` judges the published scorer as of the cutoff: the catalog's own row
    got = jobs.evaluate_served(w["past"], w["cfg_past"], n_boot=10)
    name = f"{jobs.CATALOG_POPULARITY}:{res.published}"
    assert (got.row(name)["recall"], got.row(name)["ndcg"]) == (got.row(jobs.CATALOG_POPULARITY)["recall"],
                                                                got.row(jobs.CATALOG_POPULARITY)["ndcg"])
    # a catalog loaded later: the served scores are its popularity, not the one trained with
    items = np.flatnonzero(state.item_category >= 0)
    new_pop = np.random.default_rng(7).uniform(1.0, 50.0, catalog.n_items)
    upsert_items(w["past"], [{"item_id": str(catalog.item_ids[k]), "category": w["cfg_past"].config.category_names[
        int(state.item_category[k])], "popularity": float(new_pop[k]), "features": []} for k in range(catalog.n_items)])
    fresh = load_state(w["past"])
    np.testing.assert_allclose(fresh.scorer.score(-1, items), new_pop[items], rtol=1e-12)


def test_the_catalog_popularity_is_not_republished_where_users_replay_items():
    """Where plays come back to items (songs), the built-in scorer is the page the gate judged: nothing
    is published, and the reason says why."""
    from policy_api.jobs._train import _serve_catalog_popularity

    # each of 100 users plays each of 10 songs three times
    data, catalog = _plays(np.repeat(np.arange(100), 30), np.tile(np.repeat(np.arange(10), 3), 100))
    version, served = _serve_catalog_popularity(None, {}, data, None, catalog, ("songs",), np.ones(5), {},  # type: ignore[arg-type]
                                                "refused")
    assert version is None and served["kind"] == "unchanged"
    assert served["repeat_share"] == pytest.approx(2 / 3) and "67% of the log's 3000 plays come back" in served["reason"]


def _training_arrays_row_by_row(db, catalog):
    """The reference for log_training_arrays: the log read as rows and joined with dicts."""
    from policy_api.log import read_decisions, read_feedback, to_epoch

    dec = read_decisions(db, columns=["request_id", "ts", "user_id"])
    fb = read_feedback(db, columns=["request_id", "item_id", "type", "ts"])
    at = {r: k for k, r in enumerate(dec["request_id"].tolist())}
    users = sorted(set(dec["user_id"].tolist()))
    user_of = {u: k for k, u in enumerate(users)}
    item_of = {str(i): k for k, i in enumerate(catalog.item_ids)}
    dec_ts, fb_ts = to_epoch(dec["ts"]), to_epoch(fb["ts"])
    shown: dict[tuple[int, int], bool] = {}
    events = []
    for r, i, kind, t in zip(fb["request_id"].tolist(), fb["item_id"].tolist(), fb["type"].tolist(), fb_ts.tolist(),
                             strict=True):
        if r not in at or i not in item_of:
            continue
        d, k = at[r], item_of[i]
        shown[(d, k)] = shown.get((d, k), False) or kind == "impression"
        if kind in EVENT_TYPES:
            events.append((d, user_of[dec["user_id"][d]], k, t, EVENT_TYPES.index(kind)))
    pairs = sorted(shown)
    impressions = {"decision": [d for d, _ in pairs], "user": [user_of[dec["user_id"][d]] for d, _ in pairs],
                   "item": [k for _, k in pairs], "ts": [dec_ts[d] for d, _ in pairs],
                   "explicit": [shown[p] for p in pairs]}
    return users, impressions, {key: [e[j] for e in events] for j, key in enumerate(("decision", "user", "item", "ts",
                                                                                      "type"))}


def test_the_training_arrays_join_the_log_as_a_row_by_row_join_does(database_url):
    """log_training_arrays (the log's strings joined by hash in Arrow) against a dict join of the rows:
    served decisions with reported impressions, an import, feedback of an unknown decision, of an
    item not in the catalog, and of no item, users whose ids sort differently as bytes and as numbers."""
    from datetime import UTC, datetime

    from policy_api.log import insert_decisions, insert_feedback

    world = make_world(n_users=10, n_items=40, seed=1)
    upgrade(database_url)
    db = make_engine(database_url)
    try:
        registry.activate_config(db, world.default_config_toml(), author="test")
        rows = [{"item_id": str(i), "category": world.categories[c], "popularity": 1.0 + k,
                 "features": [0.0, 1.0, 2.0]}
                for k, (i, c) in enumerate(zip(world.item_ids, world.item_category, strict=True))]
        upsert_items(db, rows)
        catalog = Catalog.from_arrays(load_items(db))
        rng = np.random.default_rng(7)
        users = ["u10", "u9", "é1", "u1", "7"]
        dec, fb = [], []
        for k in range(300):
            rid = f"r{rng.integers(10**9)}-{k}"
            when = datetime.fromtimestamp(1.7e9 + float(rng.integers(0, 5000)) + 0.5 * (k % 2), tz=UTC)
            dec.append({"request_id": rid, "ts": when, "user_id": users[k % 5], "context": {}, "versions": {},
                        "policy": "import" if k % 7 == 0 else "vw", "candidates": [], "pmf": [1.0], "chosen": 0,
                        "propensity": 1.0, "layout": [], "fallback_reason": None})
            for j in range(int(rng.integers(0, 4))):
                item = str(world.item_ids[rng.integers(40)]) if j < 3 or k % 11 else "not-in-catalog"
                kind = ["impression", "play", "skip", "full_play", "favorite", "share"][int(rng.integers(6))]
                fb.append({"event_id": f"{rid}:{j}", "request_id": rid if k % 13 else "no-such-decision",
                           "slot": 0, "item_id": item if k % 17 else None, "type": kind,
                           "ts": datetime.fromtimestamp(when.timestamp() + float(rng.integers(1, 60)), tz=UTC)})
        insert_decisions(db, dec)
        insert_feedback(db, fb)
        got = jobs.log_training_arrays(db, catalog)
        users_ref, imp_ref, ev_ref = _training_arrays_row_by_row(db, catalog)
    finally:
        db.dispose()
    assert got["user_ids"] == users_ref and got["n_users"] == 5
    assert len(ev_ref["item"]) > 100 and sum(imp_ref["explicit"]) > 20 and not all(imp_ref["explicit"])
    for key, want in imp_ref.items():
        np.testing.assert_array_equal(got["impressions"][key], np.asarray(want), err_msg=key)
    for key, want in ev_ref.items():
        np.testing.assert_array_equal(got["events"][key], np.asarray(want), err_msg=key)
