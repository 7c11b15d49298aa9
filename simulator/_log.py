"""Logged traffic drawn from a World, in the shape the rankers' data builder reads."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._world import EVENT_TYPES, World

__all__ = ["exposure_log"]


def exposure_log(world: World, n_requests: int, rng: np.random.Generator, popularity_bias: float = 1.0
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Impressions (examined items) and events under a popularity-biased exposure policy: each slot
    position shows an item drawn with probability proportional to ``popularity ** popularity_bias``.

    Returns
    -------
    impressions
        ``decision, user, item, ts`` (n,): one row per examined (request, item).
    events
        ``decision, user, item, ts, type`` (m,): behaviours, ``type`` a code into ``EVENT_TYPES``;
        5 s after their request.
    """
    users = world.sample_users(n_requests, rng)
    p = world.popularity ** popularity_bias
    items = rng.choice(world.n_items, size=(n_requests, world.n_slots, world.items_per_module), p=p / p.sum())
    fb = world.sample_feedback_batch(users, items, rng)
    ts = 1.7e9 + 60.0 * np.arange(n_requests)
    imp = fb.event == "impression"
    _, first = np.unique(fb.row[imp] * world.n_items + fb.item_idx[imp], return_index=True)
    rows, shown = fb.row[imp][first], fb.item_idx[imp][first]
    ev = ~imp
    codes = np.searchsorted(np.array(EVENT_TYPES), np.asarray(fb.event[ev], dtype=str), sorter=np.argsort(EVENT_TYPES))
    typ = np.argsort(EVENT_TYPES)[codes].astype(np.int64)
    r = fb.row[ev]
    return (
        {"decision": rows, "user": users[rows], "item": shown, "ts": ts[rows]},
        {"decision": r, "user": users[r], "item": fb.item_idx[ev], "ts": ts[r] + 5.0, "type": typ},
    )
