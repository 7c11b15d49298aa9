"""Replay validated against the simulator's truth: each logged candidate's page is reconstructed
from its request id (the pool draw is seeded by it) and priced by the ground truth, so the true value
of any target policy over the logged candidates is known exactly."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from allocator import HomepageConfig, layout_items
from simulator import World

from .. import registry
from ..engine import (
    DecisionEngine,
    EngineState,
    build_state,
    load_catalog,
    ranker_scorer,
    seed_of,
    with_plan_calibration,
)
from ..errors import NotFound
from ..jobs import load_log, replay, target_distribution
from ..log import DecisionLog
from ..reports import table_html

__all__ = ["candidate_pages", "true_candidate_values", "validate_replay", "MIN_ESS_RATIO"]

#: targets whose effective sample size is below this share of the log are reported, not judged
MIN_ESS_RATIO = 0.1


def candidate_pages(state: EngineState, dlog: DecisionLog, i: int) -> np.ndarray:
    """Shape (n_cand, S, K): catalog item indices of every logged candidate of decision i (-1 empty)."""
    st = state
    eng = DecisionEngine(st)
    pool = eng.pool(st, np.random.default_rng(seed_of(str(dlog.request_id[i]))))
    u = st.scorer.user_idx(str(dlog.user_id[i]))
    tbl, _ = eng.pool_table(st, u, pool)  # the demo serves without the loop: no live state
    S, K = st.space.n_slots, st.space.items_per_module
    n = int(dlog.n_cand[i])
    out = np.full((n, S, K), -1, dtype=np.int64)
    levels = st.space.tilt_levels
    for j in range(n):
        cats = dlog.categories[i, j]
        blocks = np.array([(cats[:s] == cats[s]).sum() for s in range(S)])
        b = int(np.argmin(np.abs(levels - dlog.tilt[i, j])))
        for s, pos in enumerate(layout_items(st.space, tbl, 0, cats, blocks, b)):
            out[j, s, :pos.size] = pool[pos]
    return out


def true_candidate_values(states: dict[Any, EngineState], dlog: DecisionLog, world: World, world_user: dict[str, int],
                          world_item: np.ndarray) -> np.ndarray:
    """Shape (n, L): the ground-truth expected reward of every logged candidate (0 on padding).
    ``states`` maps (ranker version, plan version) to the state that served with them."""
    n, L = dlog.mask.shape
    out = np.zeros((n, L))
    for i in range(n):  # evaluation only: one reconstruction per logged decision
        v = dlog.versions[i] or {}
        state = states[(v.get("ranker"), v.get("plan"))]
        pages = candidate_pages(state, dlog, i)
        pages = np.where(pages >= 0, world_item[np.maximum(pages, 0)], -1)
        u = world_user[str(dlog.user_id[i])]
        out[i, : pages.shape[0]] = world.expected_reward_batch(np.full(pages.shape[0], u), pages)
    return out


def _states(db: Engine, cfg: HomepageConfig, version: int, served: set[tuple[Any, Any]]) -> dict[Any, EngineState]:
    """The engine state for each (ranker version, plan version) that served: the scorer and the plan's
    category calibration decide what each candidate showed (the logged candidates give the rest)."""
    catalog = load_catalog(db)
    plans = {p.version: p for p in registry.plan_history(db, limit=10_000)}
    out: dict[Any, EngineState] = {}
    for rv, pv in served:
        scorer = None
        if rv is not None:
            rec = registry.model(db, "ranker", int(rv))
            if rec is None:
                raise NotFound(f"ranker version {rv} is logged but not in the registry", field="versions.ranker")
            scorer = ranker_scorer(rec, catalog)
        state = build_state(cfg, catalog, scorer=scorer, versions={"config": version, "ranker": rv})
        out[(rv, pv)] = with_plan_calibration(state, plans.get(pv) if pv is not None else None)
    return out


def validate_replay(db: Engine, world: World, targets: tuple[str, ...] = ("logged", "greedy", "uniform", "bandit"),
                    n_boot: int = 200, served: dict[str, float] | None = None) -> dict[str, Any]:
    """Replay each target on the active config's log and compare with its true value."""
    active = registry.require_active_config(db)
    version, cfg = active.version, active.config
    dlog, rw = load_log(db, cfg, None, None, config_version=version)
    reward = rw.reward
    states = _states(db, cfg, version, {((v or {}).get("ranker"), (v or {}).get("plan")) for v in dlog.versions})
    world_user = {u: i for i, u in enumerate(world.user_ids.tolist())}
    w_index = {iid: i for i, iid in enumerate(world.item_ids.tolist())}
    any_state = next(iter(states.values()))
    world_item = np.array([w_index[i] for i in any_state.catalog.item_ids.tolist()])
    truth_l = true_candidate_values(states, dlog, world, world_user, world_item)
    check = None
    if served:  # the served candidate, reconstructed from its request id, is the page the client saw
        got = truth_l[np.arange(len(dlog)), dlog.action]
        want = np.array([served.get(str(r), np.nan) for r in dlog.request_id])
        ok_rows = ~np.isnan(want)
        check = {"decisions_checked": int(ok_rows.sum()),
                 "max_abs_diff": float(np.max(np.abs(got[ok_rows] - want[ok_rows]), initial=0.0))}
    # the log's own check: the served candidate's true value, averaged, is what the logged policy earned
    rows: list[dict[str, Any]] = []
    for t in targets:
        try:
            res = replay(dlog, reward, t, cfg, db, n_boot=n_boot)
        except Exception as e:  # a target that cannot be evaluated (e.g. no bandit yet) is reported as such
            rows.append({"target": t, "error": str(e)})
            continue
        dist, _, _ = target_distribution(t, dlog, cfg, db)
        truth = float((dist * truth_l).sum(1).mean())
        row: dict[str, Any] = {"target": res.label, "true value": truth}
        for r in res.rows:
            row[r["estimator"]] = r["value"]
        for name in ("DR", "SNIPS"):
            if name in row and truth:
                row[f"{name} rel. error"] = abs(row[name] - truth) / abs(truth)
        row["ESS"] = res.rows[0]["ess"]
        rows.append(row)
    # estimates are only trustworthy where the log overlaps the target; the criterion covers those
    judged = [r for r in rows if "error" not in r and r["ESS"] >= MIN_ESS_RATIO * len(dlog)]
    for r in rows:
        if "error" not in r:
            r["judged"] = r in judged
    ok = bool(judged) and all(r.get("DR rel. error", 1.0) <= 0.05 and r.get("SNIPS rel. error", 1.0) <= 0.05
                              for r in judged)
    return {"job": "replay", "reconstruction": check, "title": f"Replay vs truth ({len(dlog)} logged decisions, all phases)",
            "rows": rows, "dr_snips_within_5pct": ok, "table_html": table_html(rows)}
