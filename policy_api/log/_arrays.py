"""The decision log as arrays, and rewards joined from feedback — shared by learn, replay, train, pace.

Decisions come from :func:`policy_api.log.read_decisions` (or a Parquet export); candidates are
padded to the largest candidate count (``pmf`` 0 on padding). Rewards are joined vectorised: feedback
request ids are matched by binary search on the sorted decision ids, never by a loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from typing import Any

import numpy as np

from allocator import EVENT_TYPES, HomepageConfig

__all__ = ["DecisionLog", "Rewards", "decision_log", "join_rewards", "pad_candidates", "to_epoch"]


def to_epoch(ts: Any) -> np.ndarray:
    """Seconds since the epoch, float64, from datetime64 / datetime objects / numbers."""
    a = np.asarray(ts)
    if a.dtype.kind == "M":
        return a.astype("datetime64[us]").astype(np.int64) / 1e6
    if a.dtype.kind in "fiu":
        return a.astype(np.float64)
    return np.array([t.timestamp() if isinstance(t, datetime) else float(t) for t in a.tolist()], dtype=np.float64)


@dataclass(frozen=True)
class DecisionLog:
    """Logged decisions as arrays (n_rounds rows, L = most candidates in a row, S slots, K constraints).

    Attributes
    ----------
    request_id, user_id, policy : (n,) str
    ts : (n,) float epoch seconds
    action : (n,) int, the chosen candidate; pscore : (n,) its logged propensity
    n_cand : (n,) int; mask : (n, L) bool, real candidates
    pmf : (n, L) the logged distribution over candidates (0 on padding)
    value, score : (n, L) expected value and price-adjusted score of each candidate when logged
    exposure : (n, L, K) exposure vectors in the logged config's constraint order
    engagement : (n, L, S) mean engagement score of each slot's module
    tail : (n, L) long-tail share of the candidate's shown items
    categories : (n, L, S) category index per slot (config order; -1 unknown or padding)
    tilt : (n, L) tilt level value
    shared : (n, d) shared (user context) features the bandit saw
    versions : list of dicts
    layout : list (per decision) of the served modules
    modules : list (per decision) of lists (per candidate) of module ids by slot
    """

    request_id: np.ndarray
    user_id: np.ndarray
    policy: np.ndarray
    ts: np.ndarray
    action: np.ndarray
    pscore: np.ndarray
    n_cand: np.ndarray
    mask: np.ndarray
    pmf: np.ndarray
    value: np.ndarray
    score: np.ndarray
    exposure: np.ndarray
    engagement: np.ndarray
    tail: np.ndarray
    categories: np.ndarray
    tilt: np.ndarray
    shared: np.ndarray
    versions: list[dict[str, Any]]
    layout: list[Any]
    modules: list[Any]

    def __len__(self) -> int:
        return int(self.action.size)

    def take(self, idx: np.ndarray) -> DecisionLog:
        kw: dict[str, Any] = {}
        for f in self.__dataclass_fields__:
            v = getattr(self, f)
            kw[f] = [v[i] for i in np.asarray(idx).tolist()] if isinstance(v, list) else v[idx]
        return DecisionLog(**kw)

    @property
    def chosen_exposure(self) -> np.ndarray:
        """Shape (n, K): exposure of the served layouts."""
        return self.exposure[np.arange(len(self)), self.action]


def pad_candidates(values: Any, counts: np.ndarray, L: int, fill: float = 0.0) -> np.ndarray:
    """(n, L) from a flat sequence holding counts[i] values for row i, padded with ``fill``."""
    n = counts.size
    out = np.full((n, L), fill, dtype=np.float64)
    if len(values):
        rows = np.repeat(np.arange(n), counts)
        cols = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        out[rows, cols] = values
    return out


def decision_log(cols: dict[str, Any], config: HomepageConfig, *, serving_only: bool = True) -> DecisionLog:
    """Build a :class:`DecisionLog` from ``read_decisions`` columns.

    ``serving_only`` drops fallback decisions (no candidates to learn from or replay over).
    """
    cands: list[list[dict[str, Any]]] = list(cols["candidates"])
    keep = np.array([len(c) > 0 for c in cands], dtype=bool) if serving_only else np.ones(len(cands), bool)
    idx = np.flatnonzero(keep)
    cands = [cands[i] for i in idx.tolist()]
    n = len(cands)
    counts = np.fromiter((len(c) for c in cands), dtype=np.int64, count=n)
    L = int(counts.max(initial=1))
    S = config.slots
    K = len(config.constraints)
    flat = list(chain.from_iterable(cands))
    pmf_flat = list(chain.from_iterable(cols["pmf"][i] for i in idx.tolist()))
    if len(pmf_flat) != len(flat):
        raise ValueError("decisions.pmf must have one entry per candidate; the log is inconsistent")
    cat_lookup = {c: k for k, c in enumerate(config.category_names)}
    mod_cat = {m.id: cat_lookup[m.category] for m in config.modules}

    def slots_of(c: dict[str, Any], key: str, default: float) -> list[float]:
        v = c.get(key)
        return list(v)[:S] + [default] * (S - len(v)) if v is not None else [default] * S

    def cats_of(c: dict[str, Any]) -> list[int]:
        names = c.get("categories")
        if names is not None:
            out = [cat_lookup.get(x, -1) for x in names]
        else:
            out = [mod_cat.get(m, -1) for m in c.get("modules", [])]
        return out[:S] + [-1] * (S - len(out))

    mask = pad_candidates([1.0] * len(flat), counts, L) > 0
    eng = np.zeros((n, L, S))
    cats = np.full((n, L, S), -1, dtype=np.int64)
    ex = np.zeros((n, L, K))
    if flat:
        eng[mask] = _rect([c.get("engagement") for c in flat], S, 0.0, lambda c: slots_of(c, "engagement", 0.0), flat)
        cats[mask] = _category_index([c.get("categories") for c in flat], S, cat_lookup, lambda c: cats_of(c), flat)
        if K:
            try:
                ex_arr = np.array([c["exposure"] for c in flat], dtype=np.float64)
            except (KeyError, ValueError):
                ex_arr = np.zeros((0,))
            if ex_arr.shape != (len(flat), K):
                raise ValueError(f"candidate exposure vectors must have {K} entries (one per constraint of "
                                 "the config); the log was written under a different constraint set — pass that config")
            ex[mask] = ex_arr
    ctx = cols.get("context")
    shared_rows = [((ctx[i] or {}).get("shared") or []) if ctx is not None else [] for i in idx.tolist()]
    d = max((len(r) for r in shared_rows), default=0)
    shared = np.zeros((n, d))
    for r, row in enumerate(shared_rows):  # rows are short lists; numpy cannot ragged-stack
        shared[r, :len(row)] = row

    def take(key: str) -> np.ndarray:
        return np.asarray(cols[key])[idx] if key in cols else np.full(n, None, dtype=object)

    return DecisionLog(
        request_id=np.asarray(take("request_id"), dtype=str),
        user_id=np.asarray(take("user_id"), dtype=object),
        policy=np.asarray(take("policy"), dtype=object),
        ts=to_epoch(take("ts")) if n else np.zeros(0),
        action=np.asarray(take("chosen"), dtype=np.int64),
        pscore=np.asarray(take("propensity"), dtype=np.float64),
        n_cand=counts,
        mask=mask,
        pmf=pad_candidates(pmf_flat, counts, L),
        value=pad_candidates([float(c["value"]) for c in flat], counts, L),
        score=pad_candidates([float(c.get("score", c["value"])) for c in flat], counts, L, fill=-np.inf),
        exposure=ex,
        engagement=eng,
        tail=pad_candidates([float(c.get("tail", 0.0)) for c in flat], counts, L),
        categories=cats,
        tilt=pad_candidates([float(c.get("tilt", 0.0)) for c in flat], counts, L),
        shared=shared,
        versions=[(cols["versions"][i] or {}) for i in idx.tolist()] if "versions" in cols else [{}] * n,
        layout=[cols["layout"][i] for i in idx.tolist()] if "layout" in cols else [None] * n,
        modules=[[c.get("modules", []) for c in row] for row in cands],
    )


def _rect(rows: list[Any], S: int, fill: float, slow: Any, flat: list[dict[str, Any]]) -> np.ndarray:
    """(m, S) float array from per-candidate lists; one numpy call when every row has S entries."""
    try:
        a = np.array(rows, dtype=np.float64)
        if a.shape == (len(rows), S):
            return a
    except (TypeError, ValueError):
        pass
    return np.array([slow(c) for c in flat], dtype=np.float64).reshape(len(flat), S)


def _category_index(rows: list[Any], S: int, lookup: dict[str, int], slow: Any, flat: list[dict[str, Any]]
                    ) -> np.ndarray:
    """(m, S) category indices from per-candidate name lists, mapped once per distinct name."""
    try:
        names = np.array(rows, dtype=str)
        if names.shape == (len(rows), S):
            uniq, inv = np.unique(names, return_inverse=True)
            codes = np.array([lookup.get(u, -1) for u in uniq.tolist()], dtype=np.int64)
            return codes[inv].reshape(len(rows), S)
    except (TypeError, ValueError):
        pass
    return np.array([slow(c) for c in flat], dtype=np.int64).reshape(len(flat), S)


@dataclass(frozen=True)
class Rewards:
    """Per-decision rewards and what the join saw.

    reward : (n,) sum over in-window events of units(type) * value(category of the item);
        ``default_reward`` where a decision got no feedback at all
    has_feedback : (n,) bool
    n_events, n_late, n_orphan : events joined, events after the window (kept, not learned from),
        events whose request id is not among these decisions — counted over the events passed in
        (the learner passes behaviour events only; impressions carry no units)
    """

    reward: np.ndarray
    has_feedback: np.ndarray
    n_events: int
    n_late: int
    n_orphan: int


def join_rewards(dlog: DecisionLog, fb: dict[str, Any], config: HomepageConfig, item_ids: np.ndarray,
                 item_category: np.ndarray, *, window_s: float | None = None,
                 default_reward: float | None = None, first_seen: dict[str, Any] | None = None) -> Rewards:
    """Join feedback to decisions inside the reward window and compute each decision's reward.

    Parameters
    ----------
    fb
        ``read_feedback`` columns: ``request_id``, ``item_id``, ``type``, ``ts``.
    first_seen
        Optional ``feedback_first_seen`` (request id, first event time): then ``fb`` may leave
        out the unit-less impression events, and a decision counts as having feedback when its first
        event of any type falls inside the window.
    item_ids, item_category
        The catalog: item ids and each item's category name.
    """
    window = config.learning.reward_window_s if window_s is None else window_s
    default = config.learning.default_reward if default_reward is None else default_reward
    n = len(dlog)
    rid = np.asarray(fb["request_id"], dtype=str)
    m = rid.size
    order = np.argsort(dlog.request_id, kind="stable")
    sorted_ids = dlog.request_id[order]
    pos = np.searchsorted(sorted_ids, rid) if n else np.zeros(m, dtype=np.int64)
    pos_c = np.minimum(pos, max(n - 1, 0))
    matched = (pos < n) & (sorted_ids[pos_c] == rid) if n else np.zeros(m, dtype=bool)
    d_idx = order[pos_c] if n else np.zeros(m, dtype=np.int64)
    delay = to_epoch(fb["ts"]) - (dlog.ts[d_idx] if n else 0.0)
    in_window = matched & (delay <= window)
    # units of each event type (impression and unknown types carry 0)
    types = np.asarray(fb["type"], dtype=str)
    uniq, inv = np.unique(types, return_inverse=True)
    unit_of = np.array([float(config.events.get(t, 0.0)) if t in EVENT_TYPES else 0.0 for t in uniq.tolist()])
    units = unit_of[inv] if m else np.zeros(0)
    # money per unit from the item's category
    cat_values = {c.name: c.value_per_engagement for c in config.categories}
    ids = np.asarray(item_ids, dtype=str)
    io = np.argsort(ids, kind="stable")
    item_val = np.array([cat_values.get(c, 0.0) for c in np.asarray(item_category).tolist()])
    fb_items = np.asarray(fb["item_id"], dtype=str)
    if ids.size:
        ipos = np.minimum(np.searchsorted(ids[io], fb_items), ids.size - 1)
        val = np.where(ids[io][ipos] == fb_items, item_val[io][ipos], 0.0)
    else:
        val = np.zeros(m)
    reward = np.bincount(d_idx[in_window], weights=(units * val)[in_window], minlength=n) if n else np.zeros(0)
    has = np.bincount(d_idx[in_window], minlength=n) > 0 if n else np.zeros(0, dtype=bool)
    if first_seen is not None and n and len(first_seen["request_id"]):
        sid = np.asarray(first_seen["request_id"], dtype=str)
        spos = np.minimum(np.searchsorted(sorted_ids, sid), n - 1)
        smatch = sorted_ids[spos] == sid
        sidx = order[spos]
        s_in = smatch & (to_epoch(first_seen["ts"]) - dlog.ts[sidx] <= window)
        has[sidx[s_in]] = True
    reward = np.where(has, reward, default)
    return Rewards(reward, has, int(in_window.sum()), int((matched & ~in_window).sum()), int((~matched).sum()))
