"""Reward join against a slow loop: window, late and orphan events, default reward."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np

from allocator import parse_config_text
from policy_api.log import decision_log, join_rewards
from simulator import make_world


def test_join_rewards_matches_slow_loop(seed):
    rng = np.random.default_rng(seed)
    world = make_world(n_users=10, n_items=80, seed=seed)
    cfg = parse_config_text(world.default_config_toml())
    n = 40
    t0 = 1_700_000_000.0
    ts = t0 + np.sort(rng.random(n)) * 1000
    cands = [[{"modules": list(cfg.module_ids[:cfg.slots]), "value": 1.0, "exposure": [0.1, 0.2], "score": 1.0}]
             for _ in range(n)]
    cols = {"request_id": np.array([f"r{k}" for k in range(n)], dtype=object),
            "ts": np.array([datetime.fromtimestamp(t, tz=UTC) for t in ts], dtype=object),
            "user_id": np.array(["u"] * n, dtype=object), "policy": np.array(["p"] * n, dtype=object),
            "chosen": np.zeros(n, int), "propensity": np.ones(n), "candidates": cands, "pmf": [[1.0]] * n,
            "context": [{}] * n, "versions": [{}] * n, "layout": [None] * n}
    dlog = decision_log(cols, cfg)
    m = 300
    rid = np.array([f"r{k}" for k in rng.integers(0, n + 5, m)])  # some orphans
    types = rng.choice(["impression", "play", "full_play", "favorite", "share", "skip"], m)
    items = rng.choice(world.item_ids, m)
    d_of = {f"r{k}": k for k in range(n)}
    fts = np.array([ts[d_of[r]] if r in d_of else t0 for r in rid]) + rng.exponential(cfg.learning.reward_window_s / 3, m)
    cat_names = np.array([world.categories[c] for c in world.item_category])
    fb = {"request_id": rid, "type": types, "item_id": items,
          "ts": np.array([datetime.fromtimestamp(t, tz=UTC) for t in fts], dtype=object)}
    got = join_rewards(dlog, fb, cfg, world.item_ids, cat_names, default_reward=-7.0)
    # slow reference
    value = {c.name: c.value_per_engagement for c in cfg.categories}
    cat_of = dict(zip(world.item_ids.tolist(), cat_names.tolist(), strict=True))
    ref = np.zeros(n)
    has = np.zeros(n, bool)
    late = orphan = 0
    for r, t, it, ft in zip(rid, types, items, fts, strict=True):
        if r not in d_of:
            orphan += 1
            continue
        k = d_of[r]
        if ft - ts[k] > cfg.learning.reward_window_s:
            late += 1
            continue
        has[k] = True
        ref[k] += cfg.events.get(t, 0.0) * value[cat_of[it]] if t != "impression" else 0.0
    ref[~has] = -7.0
    np.testing.assert_allclose(got.reward, ref)
    assert (got.n_late, got.n_orphan) == (late, orphan) and late > 0 and orphan > 0
