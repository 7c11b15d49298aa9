"""Replay validated against the simulator's truth: each logged candidate's page is reconstructed
from its request id (the pool draw is seeded by it) and priced by the ground truth, so the true value
of any target policy over the logged candidates is known exactly."""

from __future__ import annotations

from typing import Any

import numpy as np

from allocator import block_table, layout_items

from ._engine import DecisionEngine, EngineState
from ._ids import seed_of
from ._logdata import DecisionLog

__all__ = ["candidate_pages", "true_candidate_values", "validate_replay"]


def candidate_pages(state: EngineState, dlog: DecisionLog, i: int) -> np.ndarray:
    """Shape (n_cand, S, K): catalog item indices of every logged candidate of decision i (-1 empty)."""
    st = state
    eng = DecisionEngine(st)
    pool = eng.pool(st, np.random.default_rng(seed_of(str(dlog.request_id[i]))))
    u = st.scorer.user_idx(str(dlog.user_id[i]))
    scores = st.scorer.score(u, pool)
    tbl = block_table(st.space, scores[None, :], st.item_category[pool], st.is_tail[pool], st.tail[pool])
    S, K = st.space.n_slots, st.space.items_per_module
    n = int(dlog.n_cand[i])
    out = np.full((n, S, K), -1, dtype=np.int64)
    levels = st.space.tilt_levels
    for l in range(n):
        cats = dlog.categories[i, l]
        blocks = np.array([(cats[:s] == cats[s]).sum() for s in range(S)])
        b = int(np.argmin(np.abs(levels - dlog.tilt[i, l])))
        for s, pos in enumerate(layout_items(st.space, tbl, 0, cats, blocks, b)):
            out[l, s, :pos.size] = pool[pos]
    return out


def true_candidate_values(state: EngineState, dlog: DecisionLog, world: Any, world_user: dict[str, int],
                          world_item: np.ndarray) -> np.ndarray:
    """Shape (n, L): the ground-truth expected reward of every logged candidate (0 on padding)."""
    n, L = dlog.mask.shape
    out = np.zeros((n, L))
    for i in range(n):  # evaluation only: one reconstruction per logged decision
        pages = candidate_pages(state, dlog, i)
        pages = np.where(pages >= 0, world_item[np.maximum(pages, 0)], -1)
        u = world_user[str(dlog.user_id[i])]
        out[i, : pages.shape[0]] = world.expected_reward_batch(np.full(pages.shape[0], u), pages)
    return out


def validate_replay(db: Any, world: Any, targets: tuple[str, ...] = ("logged", "greedy", "uniform", "bandit"),
                    n_boot: int = 200) -> dict[str, Any]:
    """Replay each target on the active config's log and compare with its true value."""
    from ._jobs_bandit import _active_config, load_log, replay, target_distribution
    from ._report import table_html
    from ._runtime import load_state

    version, cfg = _active_config(db)
    dlog, rw = load_log(db, cfg, None, None, config_version=version)
    # the serving phase only: the state that served it is the newest one
    latest = {k: v for k, v in (dlog.versions[-1] or {}).items() if k in ("ranker", "bandit")}
    keep = np.array([all((v or {}).get(k) == latest[k] for k in latest) for v in dlog.versions], dtype=bool)
    dlog = dlog.take(np.flatnonzero(keep))
    reward = rw.reward[keep]
    state = load_state(db)
    world_user = {u: i for i, u in enumerate(world.user_ids.tolist())}
    w_index = {iid: i for i, iid in enumerate(world.item_ids.tolist())}
    world_item = np.array([w_index[i] for i in state.catalog.item_ids.tolist()])
    truth_l = true_candidate_values(state, dlog, world, world_user, world_item)
    # the log's own check: the served candidate's true value, averaged, is what the logged policy earned
    rows = []
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
    ok = bool(rows) and all(r.get("DR rel. error", 1) <= 0.05 and r.get("SNIPS rel. error", 1) <= 0.05 for r in rows)
    return {"job": "replay", "title": f"Replay vs truth ({len(dlog)} logged decisions of the final phase)",
            "rows": rows, "dr_snips_within_5pct": ok, "table_html": table_html(rows)}
