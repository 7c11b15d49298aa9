"""Allocation jobs: plan (LP / dual), dry-run and apply a config, pace (online dual descent),
realised exposure, and refreshing the long-tail head from logged impressions.

Each job reads one snapshot (the registry's active config and prices, the catalog, the log), computes
with :mod:`allocator` and returns a frozen result; publishing is the last step and the only write.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from allocator import (
    BlockTable,
    Candidates,
    DualPacer,
    HomepageConfig,
    InfeasiblePlan,
    PacerConfig,
    Plan,
    PlanShard,
    ShardedPlan,
    block_table,
    build_candidates,
    exploit_pmf,
    exploitable,
    plan_dual_sharded,
    softmax_prices,
    softmax_response,
    solve_plan,
)

from .. import registry
from ..engine import (
    CALIBRATION_PRIOR,
    ITEM_LIFT_PRIOR,
    DecisionEngine,
    EngineState,
    calibrated,
    calibration_predicted,
    calibration_rates,
    catalog_long_tail,
    catalog_prior_calibration,
    curve_rate,
    fresh_rows,
    head_first,
    item_lift,
    item_lift_of,
    load_catalog,
    load_state,
    serving_since,
    with_item_lift,
    with_plan_calibration,
)
from ..errors import InvalidInput, from_infeasible
from ..log import (
    Catalog,
    decision_log,
    item_engagement,
    load_items,
    read_decisions,
    read_feedback,
    to_epoch,
    upsert_items,
)
from ..registry import ConfigRecord
from ..scale import RayShards, cluster_cpus

__all__ = [
    "ApplyResult",
    "ConfigCheck",
    "HeadRefresh",
    "PaceResult",
    "PlanResult",
    "UNPERSONALISED_PRIOR",
    "apply_config",
    "calibration",
    "check_config",
    "dry_run",
    "exposure_report",
    "pace",
    "plan",
    "plan_calibration",
    "refresh_head",
    "repeat_engagement",
    "repeat_rates",
    "sample_users",
    "user_candidates",
]


@dataclass(frozen=True, slots=True)
class PlanResult:
    """A solved plan for one config: prices and projections by constraint name, solver figures.

    ``value`` is the projected expected value per request, in the config's money units (category
    value per engagement unit x engagement x slot weight, summed over slots).
    """

    config_version: int | None
    prices: dict[str, float]
    value: float
    shares: dict[str, float]
    solver: dict[str, Any]
    users: int
    candidates: int
    plan_version: int | None = None

    @property
    def projected(self) -> dict[str, Any]:
        return {"value": self.value, "shares": dict(self.shares)}


# ---- building the planning problem -------------------------------------------------------------
#: users a plan made before any traffic is solved over (unknown to every scorer: a prior over pools)
COLD_START_USERS = 200


def sample_users(db: Engine, *, since: datetime | None = None, n: int = 2000, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Users of recent traffic and their traffic weights.

    Draws ``n`` logged decisions uniformly (so users come in proportion to their traffic) and weighs
    each drawn decision 1/n; repeated users merge. With no traffic yet: ``min(n, COLD_START_USERS)``
    cold-start users of equal weight (each gets a candidate pool of its own, as each request does).
    """
    cols = read_decisions(db, since=since, columns=["user_id"])
    users = np.asarray(cols["user_id"], dtype=object)
    if users.size == 0:
        m = min(n, COLD_START_USERS)
        return np.array([f"<cold-start-{k}>" for k in range(m)], dtype=object), np.full(m, 1.0 / m)
    rng = np.random.default_rng(seed)
    drawn = users[rng.integers(0, users.size, size=min(n, users.size))]
    uniq, counts = np.unique(drawn.astype(str), return_counts=True)
    return uniq.astype(object), counts / counts.sum()


def user_candidates(state: EngineState, user_ids: np.ndarray, seed: int = 0, *,
                    blocks: tuple[BlockTable, np.ndarray | None] | None = None) -> Candidates:
    """Candidate layouts of many users, as serving builds them at ``state.prices``.

    Every user gets a candidate pool of their own (each category's head plus a seeded draw from its
    rest, as every request does): with one pool shared by all users, a non-personal scorer makes every
    user's candidates identical and the plan's prices sit exactly where all of them tie, which serving
    would round to the same corner for everyone. ``blocks`` (:func:`user_blocks` of the same state,
    users and seed) skips building what does not depend on the prices again.
    """
    tbl, lead = blocks if blocks is not None else user_blocks(state, user_ids, seed)
    return build_candidates(state.space, tbl, state.prices, lead_categories=lead)


def user_blocks(state: EngineState, user_ids: np.ndarray, seed: int = 0) -> tuple[BlockTable, np.ndarray | None]:
    """The block table of many users' pools and their leading categories: the part of
    :func:`user_candidates` that the prices do not change (pools, scores, blocks), built once per plan
    and reused at every price its rounds try."""
    eng = DecisionEngine(state)
    rng = np.random.default_rng(seed)
    U = int(user_ids.size)
    pools = np.stack([eng.pool(state, rng) for _ in range(U)])  # (U, P); planning, not the request path
    P = pools.shape[1]
    sc = state.scorer
    u_idx = np.array([sc.user_idx(str(u)) for u in user_ids.tolist()], dtype=np.int64)
    scores = sc.score_pairs(np.repeat(u_idx, P), pools.ravel()).reshape(U, P)
    if state.item_lift is not None:  # part of the scorer, as serving applies it
        lift = state.item_lift[pools]
        scores = np.where(scores > 0, scores * lift, scores / lift)
    # order within a category and the tilt's reach: the scorer's own, the head first (see block_table)
    rank = head_first(scores, state.is_tail[pools])
    cat = state.item_category[pools]
    if state.score_multiplier is not None:  # as serving calibrates it
        scores = scores * state.score_multiplier[pools]
        if state.score_offset is not None:
            scores = scores + state.score_offset[pools]
    prefs = [sc.category_preferences(int(u)) for u in u_idx.tolist()]
    lead = None
    rows = [p for p in prefs if p is not None]  # a scorer gives them for every user or for none
    if rows:
        lead = np.argsort(-np.stack(rows), axis=1, kind="stable")[:, : min(rows[0].size, 4)]
    return block_table(state.space, scores, cat, state.is_tail[pools], state.tail[pools], rank_scores=rank), lead


def _result(config: HomepageConfig, version: int | None, p: Plan | ShardedPlan, users: int, candidates: int,
            extra: dict[str, Any] | None = None) -> PlanResult:
    names = config.constraint_names
    solver = {"method": p.method, "status": p.status, "gap": float(p.gap), "violation": float(p.violation),
              "n_vars": int(p.n_vars), "build_s": float(p.build_s), "solve_s": float(p.solve_s),
              "iterations": int(p.iterations), "users": users, **(extra or {})}
    return PlanResult(config_version=version, prices=dict(zip(names, map(float, p.prices), strict=True)),
                      value=float(p.objective), shares=dict(zip(names, map(float, p.shares), strict=True)),
                      solver=solver, users=users, candidates=candidates)


#: candidate sets a plan is solved on: those serving builds at the state's prices, then at each
#: solution's prices in turn (see :func:`_solve`)
PLAN_ROUNDS = 3


def candidate_union(a: Candidates, b: Candidates) -> Candidates:
    """Each user's candidates of ``a`` and then those of ``b`` that ``a`` does not hold (the same
    modules in every slot at the same tilt level); ``b``'s repeats are masked out."""
    cat = {f: np.concatenate([getattr(a, f), getattr(b, f)], axis=1)
           for f in ("categories", "blocks", "modules", "tilt", "value", "exposure", "mask")}
    # one integer per layout: its modules (-1 = empty slot) and tilt level in a positional code
    base = int(max(cat["modules"].max(initial=0), cat["tilt"].max(initial=0))) + 2
    key = cat["tilt"].astype(np.int64)
    for s in range(cat["modules"].shape[2]):
        key = key * base + (cat["modules"][:, :, s].astype(np.int64) + 1)
    key = np.where(cat["mask"], key, -1 - np.arange(key.shape[1]))  # masked entries never match
    order = np.argsort(key, axis=1, kind="stable")  # a's entries come first among equal keys
    ranked = np.take_along_axis(key, order, axis=1)
    repeat = np.zeros_like(cat["mask"])
    np.put_along_axis(repeat, order[:, 1:], ranked[:, 1:] == ranked[:, :-1], axis=1)
    cat["mask"] = cat["mask"] & ~repeat
    return Candidates(**cat)


def _solve(state: EngineState, config: HomepageConfig, version: int | None, users: np.ndarray,
           weight: np.ndarray, *, method: str = "auto", seed: int = 0, what: str = "the config",
           engine: str = "local", workers: int | None = None) -> PlanResult:
    """The plan of ``users``' candidates. Serving builds each request's candidates around the prices
    it serves with (the priced-greedy layouts among them), so candidates built at other prices can
    lack what serving will offer at the plan's: a plan solved on the candidates of zero prices priced
    a live floor at 13, at which serving's own candidates were 43 % live (floor 10 %). So each round
    solves on the union of the candidate sets so far, builds the candidates serving would at the
    round's prices, and measures there how far serving's shares miss the bounds (``served_miss`` in
    the plan's record); the plan is the round that misses least, of ``PLAN_ROUNDS``."""
    blocks = user_blocks(state, users, seed=seed)
    cand = user_candidates(state, users, seed=seed, blocks=blocks)
    lo, hi = config.bounds()
    t = config.exploration.temperature
    names = config.constraint_names
    best: tuple[float, Plan | ShardedPlan, dict[str, Any], int] | None = None
    steered = False
    for r in range(PLAN_ROUNDS if config.constraints else 1):
        try:
            p = _solve_on(engine, cand, weight, lo, hi, names, method, workers)
        except InfeasiblePlan as e:
            if best is not None:
                break
            if steered:
                raise from_infeasible(e, what) from None
            # the candidates of these prices cannot meet the bounds (a floor on a category that no
            # priced-greedy layout shows): add those serving builds at prices that push toward each
            # bound, and solve once more; infeasible then, the config is
            cand, steered = steered_candidates(state, config, users, cand, seed, blocks=blocks), True
            try:
                p = _solve_on(engine, cand, weight, lo, hi, names, method, workers)
            except InfeasiblePlan as e2:
                raise from_infeasible(e2, what) from None
        extra: dict[str, Any] = {}
        if t > 0 and config.constraints:
            # serving exploits a softmax of the priced values: the prices at which that rule meets the
            # bounds on these users (the entropy-regularised dual, started from the LP's); the LP's
            # stay on record
            ok = exploitable(state.space.tilt_levels[cand.tilt], cand.mask, state.space.tail_goal)
            soft = softmax_prices(cand.value, cand.exposure, lo, hi, t, weight=weight, mask=ok, start=p.prices)
            shares, _ = softmax_response(cand.value, cand.exposure, soft, t, weight=weight, mask=ok)
            q = exploit_pmf(cand.value + cand.exposure @ soft, cand.value, t, ok)
            value = float(np.asarray(weight) / np.sum(weight) @ (q * np.where(cand.mask, cand.value, 0.0)).sum(1))
            extra = {"lp_prices": dict(zip(names, map(float, p.prices), strict=True)), "lp_value": float(p.objective),
                     "temperature": t}
            p = replace(p, prices=soft, shares=shares, objective=value)
        if not config.constraints:
            return _result(config, version, p, int(users.size), int(cand.mask.sum()), extra=extra)
        served = user_candidates(replace(state, prices=np.asarray(p.prices, dtype=np.float64)), users, seed=seed,
                                 blocks=blocks)
        miss = served_miss(served, p.prices, lo, hi, t, weight, state)
        if best is None or miss < best[0]:
            best = (miss, p, {**extra, "served_miss": miss, "rounds": r + 1}, int(cand.mask.sum()))
        more = candidate_union(cand, served)
        if int(more.mask.sum()) == int(cand.mask.sum()):
            break
        cand = more
    assert best is not None
    _, p, extra, n_cand = best
    return _result(config, version, p, int(users.size), n_cand, extra=extra)


def steered_candidates(state: EngineState, config: HomepageConfig, users: np.ndarray, cand: Candidates,
                       seed: int = 0, *, blocks: tuple[BlockTable, np.ndarray | None] | None = None) -> Candidates:
    """``cand`` and the candidates serving builds at prices that push toward each bound: for each
    constraint alone, then all together, a price of ten times the largest candidate value (positive
    toward a floor, negative toward a cap). The layouts that meet a floor on a category that no
    value-greedy layout shows (or a cap on one that every such layout overfills) enter the plan's
    candidate set, so a feasible config is solved as feasible."""
    lo, hi = config.bounds()
    push = np.where(lo > 0, 1.0, np.where(hi < np.inf, -1.0, 0.0))
    scale = 10.0 * max(float(np.abs(np.where(cand.mask, cand.value, 0.0)).max(initial=0.0)), 1e-6)
    directions = [np.eye(push.size)[k] * push for k in np.flatnonzero(push)] + [push]
    out = cand
    for d in directions:
        out = candidate_union(out, user_candidates(replace(state, prices=scale * d), users, seed=seed,
                                                    blocks=blocks))
    return out


def served_miss(cand: Candidates, prices: Any, lo: np.ndarray, hi: np.ndarray, temperature: float,
                weight: np.ndarray, state: EngineState) -> float:
    """How far the shares serving gives ``cand`` (the candidates it builds at ``prices``) at
    ``prices`` fall outside the bounds: the largest miss over the constraints (0 inside all)."""
    pr = np.asarray(prices, dtype=np.float64)
    ok = exploitable(state.space.tilt_levels[cand.tilt], cand.mask, state.space.tail_goal)
    if temperature > 0:
        shares, _ = softmax_response(cand.value, cand.exposure, pr, temperature, weight=weight, mask=ok)
    else:
        pick = np.argmax(np.where(ok, cand.value + cand.exposure @ pr, -np.inf), axis=1)
        w = np.asarray(weight, dtype=np.float64) / np.sum(weight)
        shares = w @ cand.exposure[np.arange(pick.size), pick]
    return float(np.max(np.maximum(np.maximum(lo - shares, shares - hi), 0.0), initial=0.0))


#: where a plan is solved: ``local`` (this process) or ``ray`` (user shards in Ray actors)
PLAN_ENGINES = ("local", "ray")


def _solve_on(engine: str, cand: Candidates, weight: np.ndarray, lo: np.ndarray, hi: np.ndarray,
              names: tuple[str, ...], method: str, workers: int | None) -> Plan | ShardedPlan:
    if engine not in PLAN_ENGINES:
        raise InvalidInput(f"engine must be one of {', '.join(PLAN_ENGINES)}; got {engine!r}", field="engine")
    if engine == "local":
        return solve_plan(cand.value, cand.exposure, weight, lo, hi, cand.mask, names=names, method=method)
    if method == "lp":
        raise InvalidInput("method 'lp' runs on one machine; engine 'ray' solves with the dual (method auto "
                           "or dual)", field="method")
    n = int(weight.size)
    n_shards = max(1, min(n, workers if workers is not None else cluster_cpus()))
    edges = [round(i * n / n_shards) for i in range(n_shards + 1)]
    builders = [partial(PlanShard, cand.value[a:b], cand.exposure[a:b], weight[a:b], cand.mask[a:b])
                for a, b in zip(edges[:-1], edges[1:], strict=True)]
    with RayShards(builders, n_workers=workers) as shards:
        return plan_dual_sharded(shards, lo, hi, names=names)


# ---- plan ----------------------------------------------------------------------------------------
#: engagement is measured over this much recent feedback for the plan's category calibration
CALIBRATION_WINDOW = timedelta(hours=6)
#: impressions needed before a plan carries a calibration
MIN_CALIBRATION_IMPRESSIONS = 200


#: examined impressions of all traffic's rate that a group's rate on unpersonalised decisions is shrunk
#: toward (see :func:`calibration`)
UNPERSONALISED_PRIOR = 500.0

#: examined impressions up to which a group's rate in the previous calibration fills in for what the
#: window lost (see :func:`calibration`'s ``previous``)
CARRIED_IMPRESSIONS = 1000.0


#: examined impressions of an item's own that count as much as its group's rate in the item's expected rate
#: (:func:`repeat_rates`)
ITEM_RATE_PRIOR = 10.0


def repeat_rates(user: np.ndarray, request: np.ndarray, item: np.ndarray, ts: np.ndarray, units: np.ndarray,
                 impression: np.ndarray, weight: np.ndarray, item_category: np.ndarray, is_tail: np.ndarray,
                 n_categories: int, *, item_prior: float = ITEM_RATE_PRIOR) -> np.ndarray:
    """What an item earns when it is shown again to a user who engaged with it before, against what it
    earns from anyone it is shown to: ``(C, 3)`` per category, ``[units, expected, impressions]`` over
    the *repeat* impressions (the user had a positive event on the item in an earlier request of the
    window): their engagement units, the units the item's own rate expects of them, and their examined
    impressions. ``units / expected`` is the repeat lift serving multiplies a user's recent positives'
    scores with. In a music app people come back to what they liked; in a film log they rarely do, and
    the lift says so.

    One row per feedback event: ``user``, ``request`` and ``item`` int codes (item: catalog row, -1 =
    not in the catalog), ``ts`` (s), ``units`` (the event type's weight; impressions 0), ``impression``
    (bool), ``weight`` (an impression's examination weight). An item's expected rate per examined
    impression is its units over its examined impressions on *first* impressions (not repeats), shrunk
    toward its (category, head | tail) group's rate with ``item_prior`` impressions. A request's units
    on an item are the sum over its events on it. Vectorised (sorts and bincounts), no loop over rows.
    """
    n_items = item_category.size
    C = int(n_categories)
    ok = (item >= 0) & (item < n_items)
    ok[ok] = item_category[item[ok]] >= 0
    user, request, item, ts = user[ok], request[ok], item[ok], ts[ok]
    units, impression, weight = units[ok], impression[ok], weight[ok]
    out = np.zeros((C, 3))
    if not impression.any():
        return out
    # each (request, item) pair's units, summed over its events, reach its impressions
    pair_key = request.astype(np.int64) * n_items + item
    pairs, pair = np.unique(pair_key, return_inverse=True)
    pair_units = np.bincount(pair, weights=np.where(impression, 0.0, units), minlength=pairs.size)
    # the first positive event of each (user, item), and its request
    ui_key = user.astype(np.int64) * n_items + item
    pos = ~impression & (units > 0)
    order = np.lexsort((ts[pos], ui_key[pos]))
    pk, first = np.unique(ui_key[pos][order], return_index=True)
    first_ts, first_req = ts[pos][order][first], request[pos][order][first]
    imp = np.flatnonzero(impression)
    at = np.searchsorted(pk, ui_key[imp])
    found = at < pk.size
    found[found] = pk[at[found]] == ui_key[imp][found]
    at = np.minimum(at, max(pk.size - 1, 0))
    repeat = found & (first_ts[at] < ts[imp]) & (first_req[at] != request[imp]) if pk.size else np.zeros(imp.size, bool)
    got = pair_units[pair[imp]]
    w = weight[imp]
    it = item[imp]
    group = item_category[it] * 2 + is_tail[it].astype(np.int64)
    new = ~repeat
    g_units = np.bincount(group[new], weights=got[new], minlength=2 * C)
    g_imps = np.bincount(group[new], weights=w[new], minlength=2 * C)
    g_rate = np.divide(g_units, g_imps, out=np.zeros(2 * C), where=g_imps > 0)
    i_units = np.bincount(it[new], weights=got[new], minlength=n_items)
    i_imps = np.bincount(it[new], weights=w[new], minlength=n_items)
    rate = (i_units[it] + item_prior * g_rate[group]) / (i_imps[it] + item_prior)
    c = item_category[it][repeat]
    out[:, 0] = np.bincount(c, weights=got[repeat], minlength=C)
    out[:, 1] = np.bincount(c, weights=(w * rate)[repeat], minlength=C)
    out[:, 2] = np.bincount(c, weights=w[repeat], minlength=C)
    return out


def measured_items_needed(config: HomepageConfig, category: int) -> int:
    """How many of a category's head items must each have ``ITEM_LIFT_PRIOR`` examined impressions
    before the category carries item rates: :data:`MIN_MEASURED_ITEMS`, or fewer when the category's
    modules show fewer items at once (its modules times ``items_per_module``; a page of short modules
    never shows that many of them often)."""
    shown = len(config.modules_of()[category]) * config.items_per_module
    return max(1, min(MIN_MEASURED_ITEMS, shown))


#: at most this many items (the most impressed) carry their own rate in a plan's calibration
MAX_ITEM_RATES = 20000
#: a category carries item rates once this many of its head items have ``ITEM_LIFT_PRIOR`` impressions each
MIN_MEASURED_ITEMS = 20
#: examined impressions of a user's own in a category that count as much as the population's rate, when
#: :func:`item_rates` separates what users bring from what items bring
ITEM_USER_PRIOR = 20.0


def item_rates(user: np.ndarray, request: np.ndarray, item: np.ndarray, units: np.ndarray,
               impression: np.ndarray, x: np.ndarray, category: np.ndarray, *,
               user_prior: float = ITEM_USER_PRIOR, item_prior: float = ITEM_LIFT_PRIOR, iterations: int = 5
               ) -> ItemRates:
    """What each item earns per examined impression from an average user, measured on the log.

    One row per feedback event: ``user``, ``request`` and ``item`` int codes (item: catalog row, -1 =
    not in the catalog), ``units`` (the event type's weight; impressions 0; only positive units
    count), ``impression`` (bool). ``x`` (n_items,) the item's log popularity (the prior's feature),
    ``category`` (n_items,) its category (-1: not served).

    The positive units of an impression of item ``i`` to user ``u`` are modelled as ``a[u, c] * r[i]``:
    the user's factor for the category (shrunk toward 1 by ``user_prior`` impressions) times the
    item's rate for an average user, ``r[i] = (y[i] + k f[i]) / (A[i] + k)`` with ``y`` its units,
    ``A`` the sum of its viewers' factors over its impressions and ``k = item_prior``, shrunk toward
    the category's curve ``f`` of item rates over ``x`` (:func:`_rate_curve`); ``iterations`` rounds
    of alternating closed-form updates. An item never shown gets its curve. The user factor matters:
    once serving personalises, an item deep in a category (its second and third modules) is shown
    mostly to users who like the category, and would look better than the category's first items for
    that alone. Each impression counts once. Vectorised (bincounts), no loop over rows.

    Examples
    --------
    Two users, two items of one category: user 0 engages with all, user 1 with nothing; item 1 is
    shown to user 0 only, item 0 to both: item 1 is not better than item 0 for that (equal rates).

    >>> r = item_rates(np.array([0, 0, 0, 0, 1]), np.array([0, 0, 0, 0, 1]), np.array([0, 0, 1, 1, 0]),
    ...                np.array([0.0, 1.0, 0.0, 1.0, 0.0]), np.array([True, False, True, False, True]),
    ...                np.array([1.0, 0.5]), np.zeros(2, int), user_prior=1e-9, item_prior=1e-9)
    >>> (r.units.tolist(), (r.units / r.exposure).round(2).tolist())
    ([1.0, 1.0], [0.67, 0.67])
    """
    n_items = x.size
    C = int(category.max(initial=-1)) + 1
    ok = (item >= 0) & (item < n_items)
    ok[ok] = category[item[ok]] >= 0
    user, request, item, units, impression = user[ok], request[ok], item[ok], units[ok], impression[ok]
    imp = np.flatnonzero(impression)
    if imp.size == 0 or C == 0:
        return ItemRates(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), np.zeros(0),
                         tuple((np.zeros(1), np.zeros(1)) for _ in range(max(C, 0))))
    # each (request, item) pair's positive units reach its impressions
    pairs, pair = np.unique(request.astype(np.int64) * n_items + item, return_inverse=True)
    pair_units = np.bincount(pair, weights=np.where(impression, 0.0, np.maximum(units, 0.0)), minlength=pairs.size)
    y = pair_units[pair[imp]]
    it = item[imp]
    cat = category[it]
    items, i_of = np.unique(it, return_inverse=True)
    icat = category[items]
    ix = x[items]
    uc_keys, uc = np.unique(user[imp].astype(np.int64) * C + cat, return_inverse=True)
    y_i = np.bincount(i_of, weights=y, minlength=items.size)
    y_uc = np.bincount(uc, weights=y, minlength=uc_keys.size)
    n_uc = np.bincount(uc, minlength=uc_keys.size).astype(np.float64)
    n_c = np.bincount(cat, minlength=C).astype(np.float64)
    a = np.ones(uc_keys.size)
    a_i: np.ndarray = np.bincount(i_of, minlength=items.size).astype(np.float64)
    curve: tuple[tuple[np.ndarray, np.ndarray], ...] = ()
    for _ in range(max(int(iterations), 1)):
        curve = tuple(_rate_curve(ix[icat == c], y_i[icat == c], a_i[icat == c], item_prior) for c in range(C))
        f = np.zeros(items.size)
        for c in range(C):  # a handful of categories
            m = icat == c
            f[m] = curve_rate(ix[m], *curve[c])
        rate = (y_i + item_prior * f) / (a_i + item_prior)
        # the users' factors against the items' rates, shrunk toward 1, each category's mean over its
        # impressions kept at 1 (the items' rates carry the level)
        e_uc = np.bincount(uc, weights=rate[i_of], minlength=uc_keys.size)
        per = np.divide(e_uc, n_uc, out=np.zeros(uc_keys.size), where=n_uc > 0)
        a = np.divide(y_uc + user_prior * per, e_uc + user_prior * per, out=np.ones(uc_keys.size), where=e_uc > 0)
        level = np.divide(np.bincount(cat, weights=a[uc], minlength=C), n_c, out=np.ones(C), where=n_c > 0)
        a = a / np.where(level > 0, level, 1.0)[uc_keys % C]
        a_i = np.bincount(i_of, weights=a[uc], minlength=items.size)
    return ItemRates(items, y_i, a_i, np.bincount(i_of, minlength=items.size).astype(np.float64), curve)


#: at most this many knots in a category's curve of item rates over log popularity (see :func:`item_rates`)
CURVE_KNOTS = 8


def _rate_curve(x: np.ndarray, units: np.ndarray, exposure: np.ndarray, prior: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """Knots ``(x, rate)`` of a category's curve of item rates over log popularity: the measured items
    in up to :data:`CURVE_KNOTS` bins of equal count by ``x``, each bin's mean raw rate ``units /
    exposure`` with weights ``exposure / (exposure + prior)`` (a well-measured item counts about once,
    one shown twice barely; the most shown items do not outweigh the rest), at the bin's mean ``x``.
    ``engine.curve_rate`` reads it. A category without measured items: one knot at rate 0."""
    ok = exposure > 0
    if not ok.any():
        return np.zeros(1), np.zeros(1)
    x, raw, w = x[ok], units[ok] / exposure[ok], exposure[ok] / (exposure[ok] + prior)
    order = np.argsort(x, kind="stable")
    n_bins = int(min(CURVE_KNOTS, max(1, x.size // 10)))
    edges = np.linspace(0, x.size, n_bins + 1).round().astype(np.int64)
    bin_of = np.empty(x.size, dtype=np.int64)
    bin_of[order] = np.searchsorted(edges, np.arange(x.size), side="right") - 1
    sw = np.bincount(bin_of, weights=w, minlength=n_bins)
    kx = np.bincount(bin_of, weights=w * x, minlength=n_bins) / np.maximum(sw, 1e-300)
    ky = np.bincount(bin_of, weights=w * raw, minlength=n_bins) / np.maximum(sw, 1e-300)
    keep = sw > 0
    kx, ky = kx[keep], ky[keep]
    first = np.concatenate([[True], np.diff(kx) > 0])  # np.interp wants increasing knots
    return kx[first], ky[first]


@dataclass(frozen=True)
class ItemRates:
    """:func:`item_rates`: ``items`` (catalog rows with impressions), their positive ``units``,
    ``exposure`` (their viewers' factors summed over their impressions) and ``impressions``, and per
    category the prior's ``curve``: knots ``(x, rate)`` over log popularity (``engine.curve_rate``)."""

    items: np.ndarray
    units: np.ndarray
    exposure: np.ndarray
    impressions: np.ndarray
    curve: tuple[tuple[np.ndarray, np.ndarray], ...]

    def rates(self, x: np.ndarray, category: np.ndarray, prior: float = ITEM_LIFT_PRIOR) -> np.ndarray:
        """(n_items,) every item's rate: its own evidence shrunk toward its category's curve, the curve
        alone for an item never shown (0 for items of no category)."""
        out = np.zeros(x.size)
        for c, (kx, ky) in enumerate(self.curve):
            m = category == c
            out[m] = curve_rate(x[m], kx, ky)
        f = out[self.items]
        out[self.items] = (self.units + prior * f) / (self.exposure + prior)
        return out


def _codes(values: list[Any] | tuple[Any, ...]) -> tuple[np.ndarray, list[Any]]:
    """(int codes, distinct values) of a column of strings, by Arrow's hash dictionary (codes in order
    of first appearance; None gets the code of the value ``None`` appended last)."""
    enc = pc.dictionary_encode(pa.array(values, pa.string()))
    uniq = enc.dictionary.to_pylist()
    codes = enc.indices.fill_null(len(uniq)).to_numpy(zero_copy_only=False).astype(np.int64)
    return codes, [*uniq, None]


def _window_events(db: Engine, config: HomepageConfig, catalog: Catalog, start: datetime | None, *,
                   times: bool = True) -> dict[str, np.ndarray] | None:
    """The feedback events since ``start`` joined to their decisions, as int codes: ``user``,
    ``request``, ``item`` (catalog row, -1 = not in the catalog), ``ts`` (s), ``units`` (the event
    type's weight; impressions 0), ``impression`` (bool) and ``weight`` (the examined impressions one
    impression in its slot counts as, ``HomepageConfig.impression_weights``; 1 without a slot). None
    when there are none. One query, its rows taken from the driver's cursor as plain tuples (a
    SQLAlchemy row object per event cost as much as the query), each string column encoded by Arrow's
    hash dictionary and the times parsed by numpy in one call. ``times=False`` leaves ``ts`` out."""
    from ..log import decisions, feedback, reading
    from ..log._rows import _time_column

    with reading(db) as conn:
        cols: list[sa.ColumnElement[Any]] = [decisions.c.user_id, feedback.c.request_id, feedback.c.item_id,
                                             feedback.c.type, feedback.c.slot]
        if times:  # the UTC wall clock as the driver returns it, parsed below in one call
            cols.append(_time_column(conn, feedback.c.ts))
        q = sa.select(*cols).select_from(feedback.join(decisions, decisions.c.request_id == feedback.c.request_id))
        if start is not None:
            q = q.where(feedback.c.ts >= start)
        result = conn.execute(q)
        try:
            rows = result.cursor.fetchall()
        finally:
            result.close()
    if not rows:
        return None
    user_s, req_s, item_s, kind_s, slot_s, *rest = zip(*rows, strict=True)
    del rows
    user, _ = _codes(user_s)
    request, _ = _codes(req_s)
    at, ids = _codes(item_s)
    index = catalog.index_of()
    item = np.array([-1 if i is None else index.get(i, -1) for i in ids], dtype=np.int64)[at]  # per distinct item
    kind, kinds = _codes(kind_s)
    kind_units = np.array([0.0 if k is None else float(config.events.get(k, 0.0)) for k in kinds])
    impression = np.array([k == "impression" for k in kinds])[kind]
    slot = np.nan_to_num(np.array(slot_s, dtype=np.float64), nan=-1.0).astype(np.int64)  # None: no slot
    pw = config.impression_weights()
    in_range = (slot >= 0) & (slot < pw.size)
    weight = np.where(in_range, pw[np.clip(slot, 0, pw.size - 1)], 1.0)
    out = {"user": user, "request": request, "item": item,
           "units": np.where(impression, 0.0, kind_units[kind]), "impression": impression, "weight": weight}
    if times:
        out["ts"] = to_epoch(np.array(rest[0], dtype="datetime64[us]"))
    return out


def _since(ev: dict[str, np.ndarray], start: float) -> dict[str, np.ndarray]:
    """The events of a :func:`_window_events` read (with ``ts``) at or after ``start`` (epoch s)."""
    keep = ev["ts"] >= start
    return {k: v[keep] for k, v in ev.items()}


def item_engagement_rates(db: Engine, config: HomepageConfig, since: datetime | None = None, *,
                          catalog: Catalog | None = None) -> ItemRates | None:
    """:func:`item_rates` over the last ``loop.item_events`` feedback events since ``since`` (None when
    there are none)."""
    from ..log._rows import recent_since

    catalog = catalog if catalog is not None else load_catalog(db)
    ev = _window_events(db, config, catalog, recent_since(db, config.loop.item_events, since), times=False)
    return None if ev is None else _item_rates_of(ev, config, catalog)


def _item_rates_of(ev: dict[str, np.ndarray], config: HomepageConfig, catalog: Catalog) -> ItemRates:
    return item_rates(ev["user"], ev["request"], ev["item"], ev["units"], ev["impression"],
                      np.log1p(catalog.popularity), catalog.category_index(config.category_names))


def repeat_engagement(db: Engine, config: HomepageConfig, since: datetime | None = None, *,
                      catalog: Catalog | None = None) -> np.ndarray:
    """:func:`repeat_rates` over the calibration's window (the last ``loop.calibration_events`` feedback
    events since ``since``), read in one query of the feedback joined to its decisions."""
    from ..log._rows import recent_since

    catalog = catalog if catalog is not None else load_catalog(db)
    return _repeat_of(_window_events(db, config, catalog, recent_since(db, config.loop.calibration_events, since)),
                      config, catalog)


def _repeat_of(ev: dict[str, np.ndarray] | None, config: HomepageConfig, catalog: Catalog) -> np.ndarray:
    names = config.category_names
    if ev is None:
        return np.zeros((len(names), 3))
    is_tail, _ = catalog_long_tail(catalog, config)
    return repeat_rates(ev["user"], ev["request"], ev["item"], ev["ts"], ev["units"], ev["impression"], ev["weight"],
                        catalog.category_index(names), is_tail, len(names))


def calibration(db: Engine, config: HomepageConfig, scorer: Callable[[np.ndarray], np.ndarray] | None = None, *,
                repeat: bool = True, since: datetime | None = None,
                items: Mapping[str, Any] | None = None,
                previous: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]] | None:
    """Recent engagement units and examined impressions (``HomepageConfig.impression_weights``: a viewed
    impression counts one, a rendered one its slot's position weight over the mean) per config category,
    for its head and its long tail apart, over the last ``loop.calibration_events`` feedback events of
    the last 6 hours, measured on the decisions served without a personal live state (each group shrunk
    toward its rate over all traffic by ``UNPERSONALISED_PRIOR`` impressions, at most as many as all
    traffic has: over all traffic, a niche category is shown mostly to users who like it, which
    overstates what it earns from anyone else):
    ``{category: {"head": [units, impressions], "tail": [...]}}``, what serving calibrates a
    popularity scorer with (a popularity scorer's tail items are engaged with less than their scores
    say, so one multiplier per category would make a tail-heavy page look cheap); None while there are
    fewer than ``MIN_CALIBRATION_IMPRESSIONS``.

    With ``scorer`` (catalog rows -> the scores of a user it knows nothing of), each category also
    gets ``"predicted": [head, tail]``: the scorer's scores of the items shown, each times its examined
    impressions, summed (shrunk like the units): serving divides the units by these, so a group is
    calibrated on the items it actually showed, not on its best items (a category shown mostly in its
    second and third modules engages less per impression than its first module would).

    With ``repeat``, each category also gets ``"repeat": [units, expected, impressions]`` of its items
    shown again to users who engaged with them before (:func:`repeat_engagement`).

    ``since`` starts every window there at the earliest (the loop's last population shift: what users
    engaged with before it is not what they engage with now). ``items`` (category -> ``"items"`` block
    of an earlier calibration) reuses those item rates instead of measuring them again.

    ``previous`` (the calibration of the plan in force) carries what was measured before into a group
    the window holds fewer impressions of than it did: its earlier rate counts for the impressions the
    window lost (the previous ones less the window's), up to ``CARRIED_IMPRESSIONS`` less the window's.
    A category the engine stopped showing (it earned too little) had its rate from the other
    categories' level instead: unknown looked average, and a category worth twice the others per
    engagement went back to the top of every new user's page until the window measured it again, over
    and over."""
    start = datetime.now(tz=UTC) - CALIBRATION_WINDOW
    since = start if since is None else max(start, since)
    catalog = load_catalog(db)
    names = config.category_names
    item_cat = catalog.category_index(names)
    is_tail, _ = catalog_long_tail(catalog, config)
    index = catalog.index_of()
    C = len(names)
    from ..log._rows import recent_since

    rep: np.ndarray | None = None  # the repeat lift, when measured on the items' read
    item_block: dict[str, dict[str, Any]] = {}
    if scorer is not None and config.loop.item_events > 0:
        # each item's own rate (engine.item_lift_of), on a longer window than the groups': an item needs
        # tens of impressions of its own; the groups are then calibrated on the lifted scores. Not cut
        # at a population shift: the lifts move items within their category's head (they average 1
        # over it), and what moved at once is the categories' level, which the groups measure anew
        got = None
        if items is None:
            # one read serves the item rates and the repeat lift below: the repeat window (the last
            # calibration_events since ``since``) lies inside the items' (the last item_events since the
            # start of the calibration window) when it holds no more events, and is then sliced from it
            inside = repeat and config.loop.calibration_events <= config.loop.item_events
            window = _window_events(db, config, catalog, recent_since(db, config.loop.item_events, start),
                                    times=inside)
            if inside:
                cut = recent_since(db, config.loop.calibration_events, since)
                rep = _repeat_of(None if window is None else _since(window, -np.inf if cut is None else cut.timestamp()),
                                 config, catalog)
            got = None if window is None else _item_rates_of(window, config, catalog)
        if items is not None:  # measured before (a plan's): reused as they are
            item_block = {c: v for c, v in items.items() if c in names}
        elif got is not None and got.items.size:
            x = np.log1p(catalog.popularity)
            rate = got.rates(x, item_cat)
            score = np.asarray(scorer(got.items), dtype=np.float64)
            group = item_cat[got.items] * 2 + is_tail[got.items].astype(np.int64)
            num = np.bincount(group, weights=got.impressions * rate[got.items], minlength=2 * C)
            den = np.bincount(group, weights=got.impressions * np.maximum(score, 0.0), minlength=2 * C)
            scale = np.divide(num, den, out=np.zeros(2 * C), where=den > 0)
            keep = np.argsort(-got.impressions, kind="stable")[:MAX_ITEM_RATES]
            cat = item_cat[got.items[keep]]
            # a category carries item rates once enough of its head items are well measured: on a
            # handful, the lifts and the groups' calibration on them swung the first few hundred
            # requests (the long-tail share fell 4 pp under its floor)
            head = ~is_tail[got.items]
            well = np.bincount(item_cat[got.items], weights=head & (got.impressions >= ITEM_LIFT_PRIOR), minlength=C)
            for k, c in enumerate(names):
                if well[k] < measured_items_needed(config, k):
                    continue
                mine = keep[cat == k]
                item_block[c] = {"ids": [str(catalog.item_ids[r]) for r in got.items[mine].tolist()],
                                 "units": got.units[mine].tolist(), "exposure": got.exposure[mine].tolist(),
                                 "curve": {"x": got.curve[k][0].tolist(), "rate": got.curve[k][1].tolist()},
                                 "scale": [float(scale[2 * k]), float(scale[2 * k + 1])]}
        if item_block:
            served = np.flatnonzero(item_cat >= 0)
            all_scores = np.zeros(item_cat.size)
            all_scores[served] = np.asarray(scorer(served), dtype=np.float64)
            lift = item_lift_of({c: {"items": v} for c, v in item_block.items()}, names, index, item_cat, is_tail,
                                catalog.popularity, all_scores,
                                uncapped=fresh_rows(catalog, item_cat, serving_since(db)))
            if lift is not None:
                plain = scorer

                def scorer(rows: np.ndarray) -> np.ndarray:
                    s_ = np.asarray(plain(rows), dtype=np.float64)
                    return np.where(s_ > 0, s_ * lift[rows], s_ / lift[rows])

    def groups(unpersonalised: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, units, imps = item_engagement(db, config.events, since=since,
                                           position_weights=config.impression_weights().tolist(),
                                           max_events=config.loop.calibration_events, unpersonalised=unpersonalised)
        row = np.array([index.get(str(i), -1) for i in ids.tolist()], dtype=np.int64)  # items with feedback
        cat = np.where(row >= 0, item_cat[np.maximum(row, 0)], -1)
        ok = cat >= 0
        group = cat[ok] * 2 + is_tail[row[ok]].astype(np.int64)
        pred = np.zeros(2 * C)
        if scorer is not None and ok.any():
            score = np.asarray(scorer(row[ok]), dtype=np.float64)
            pred = np.bincount(group, weights=imps[ok] * score, minlength=2 * C).astype(np.float64)
        return (np.bincount(group, weights=units[ok], minlength=2 * C),
                np.bincount(group, weights=imps[ok], minlength=2 * C), pred)

    u_all, i_all, p_all = groups(False)
    if float(i_all.sum()) < MIN_CALIBRATION_IMPRESSIONS:
        return None
    # the rate a user not chosen for liking the category gives it: measured on unpersonalised
    # decisions, each group shrunk toward its rate over all traffic by UNPERSONALISED_PRIOR impressions
    u_cold, i_cold, p_cold = groups(True)
    rate_all = np.divide(u_all, i_all, out=np.zeros(2 * C), where=i_all > 0)
    pred_all = np.divide(p_all, i_all, out=np.zeros(2 * C), where=i_all > 0)
    # (as much as all traffic has seen, at most: a few impressions of personal pages of a category the
    # engine no longer shows anyone else, counted as UNPERSONALISED_PRIOR, made it look the best of all)
    prior = np.minimum(i_all, UNPERSONALISED_PRIOR)
    u, i, p = u_cold + prior * rate_all, i_cold + prior, p_cold + prior * pred_all
    if previous:
        before = calibration_rates(previous, names).reshape(2 * C, 2)
        pred_before = calibration_predicted(previous, names)
        # only what the window lost: the previous calibration's impressions beyond the window's (the
        # window overlaps the one it measured; while it grows, carrying would count its events twice
        # and make the first small samples' rates stick)
        k = np.minimum(np.maximum(before[:, 1] - i, 0.0), np.maximum(CARRIED_IMPRESSIONS - i, 0.0))
        per = np.divide(k, before[:, 1], out=np.zeros(2 * C), where=before[:, 1] > 0)
        u, i = u + per * before[:, 0], i + k
        if pred_before is not None:
            p = p + per * pred_before.ravel()
    out: dict[str, dict[str, Any]] = {
        c: {"head": [float(u[2 * k]), float(i[2 * k])], "tail": [float(u[2 * k + 1]), float(i[2 * k + 1])],
            # what the window itself holds of the category (all traffic; nothing carried or assumed)
            "seen": [float(i_all[2 * k]), float(i_all[2 * k + 1])]}
        for k, c in enumerate(names)}
    if scorer is not None:
        for k, c in enumerate(names):
            out[c]["predicted"] = [float(p[2 * k]), float(p[2 * k + 1])]
    if repeat:
        if rep is None:
            rep = repeat_engagement(db, config, since, catalog=catalog)
        for k, c in enumerate(names):
            out[c]["repeat"] = [float(x) for x in rep[k]]
    for c, v in item_block.items():
        out[c]["items"] = v
    return out


def feedback_seen(db: Engine) -> int:
    """The log's newest feedback row id (0 when empty): a plan records it beside its calibration, and the
    loop measures the feedback that arrived since by it."""
    from ..log import feedback, reading

    with reading(db) as conn:
        return int(conn.execute(sa.select(sa.func.max(feedback.c.id))).scalar() or 0)


def plan(db: Engine, *, users: int = 2000, since: datetime | None = None, method: str = "auto", seed: int = 0,
         publish: bool = True, engine: str = "local", workers: int | None = None,
         calibration_since: datetime | None = None) -> PlanResult:
    """Plan the active config on ``users`` users sampled from traffic since ``since``; publish its prices.

    Raises :class:`~policy_api.errors.Infeasible` (nothing published) when the constraints cannot hold.
    ``engine="ray"`` solves the same plan with the users in ``workers`` Ray actors (the sharded dual,
    :func:`allocator.plan_dual_sharded`; the ``ray`` extra).
    The plan carries the category calibration measured on recent feedback (:func:`calibration`):
    serving uses it with the plan's prices, and the plan is solved on the same calibrated values
    (measured from ``calibration_since`` on, when given).
    """
    cfg = registry.require_active_config(db)
    sampled, weight = sample_users(db, since=since, n=users, seed=seed)
    state = load_state(db, cfg)
    seen = feedback_seen(db)
    rates, _ = plan_calibration(db, cfg, state, since=calibration_since)
    if rates is not None:
        names = cfg.config.category_names
        lift = item_lift(rates, state)
        state = calibrated(replace(state, item_lift=lift), calibration_rates(rates, names),
                           calibration_predicted(rates, names))
        state = with_item_lift(state, lift)
    res = _solve(state, cfg.config, cfg.version, sampled, weight, method=method, seed=seed,
                 what=f"config version {cfg.version}", engine=engine, workers=workers)
    if rates is not None:
        res = replace(res, solver={**res.solver, "calibration": rates, "calibration_scorer": state.scorer.name,
                                   "feedback_seen": seen})
    if not publish:
        return res
    v = registry.publish_plan(db, cfg.version, res.prices, projected=res.projected, solver=res.solver)
    return replace(res, plan_version=v)


def plan_calibration(db: Engine, cfg: ConfigRecord, state: EngineState | None = None, *,
                     since: datetime | None = None, items: Mapping[str, Any] | None = None
                     ) -> tuple[dict[str, dict[str, list[float]]] | None, str]:
    """The calibration a plan of ``cfg`` carries (:func:`calibration` with the served scorer's
    predictions) and that scorer's name, without solving the plan: what the loop publishes beside the
    pacer's own prices once it has them (scoring a plan's sampled users with a history scorer takes
    tens of seconds, during which the loop would neither pace nor learn)."""
    st = state if state is not None else load_state(db, cfg)
    last = registry.latest_plan(db, cfg.version)
    solver = {} if last is None else (last.solver or {})
    previous = solver.get("calibration")
    # carried only from a calibration measured with the same scorer (its predictions mean something else
    # under another) and from the same start: after a population shift, only one measured since it
    epoch = (solver.get("forget") or {}).get("epoch")
    same_start = since is None if epoch is None else since is not None and abs(since.timestamp() - epoch) < 1e-3
    if solver.get("calibration_scorer") != st.scorer.name or not same_start:
        previous = None
    if previous is None and not solver.get("calibration") and since is None and st.scorer.name == "popularity":
        # the first calibration: a group the window holds fewer than CALIBRATION_PRIOR impressions of is
        # filled in with what the engine believed before any feedback (the catalog's prior), not with
        # the other groups' level: a category seldom shown under the prior (it earned little) looked
        # average on its first few impressions and went to the top of every new user's page
        previous = catalog_prior_calibration(st, CALIBRATION_PRIOR)
    return (calibration(db, cfg.config, scorer=lambda rows: st.scorer.score(-1, rows), since=since, items=items,
                        previous=previous),
            st.scorer.name)


def dry_run(db: Engine, config: HomepageConfig, users: np.ndarray, weight: np.ndarray,
            *, what: str = "the config") -> PlanResult:
    """Plan ``config`` on ``users`` from zero prices without publishing anything, with what the engine
    has measured (the category calibration of the active config's newest plan: rates per category
    and head or tail hold for any config over the same catalog; a projection without them is in the
    catalog prior's units, which a served page's rewards can be ten times)."""
    cfg = ConfigRecord(version=-1, body="", config=config, status="dry-run")
    state = load_state(db, cfg)
    active = registry.active_config(db)
    plan = None if active is None else registry.latest_plan(db, active.version)
    solver = {} if plan is None else (plan.solver or {})
    measured: dict[str, Any] = {}
    if plan is not None and solver.get("calibration"):
        measured = {k: solver[k] for k in ("calibration", "calibration_scorer") if k in solver}
        state = with_plan_calibration(state, replace(plan, solver=measured))
    state = replace(state, prices=np.zeros(len(config.constraints)))
    res = _solve(state, config, None, users, weight, what=what)
    # the plan an apply publishes carries it on: without it, the workers serving the new config predicted
    # from the catalog's prior until the loop had measured again (a long-tail floor's share fell from
    # 0.20 to 0.005 for 300 requests after a change to another bound)
    return replace(res, solver={**res.solver, **measured})


@dataclass(frozen=True, slots=True)
class ConfigCheck:
    """A proposed config's dry run next to the active one's (None when there is no active config)."""

    proposed: PlanResult
    current: PlanResult | None
    current_version: int | None
    users: int


def check_config(db: Engine, config: HomepageConfig, *, users: int = 1000, seed: int = 0) -> ConfigCheck:
    """Dry-run ``config`` and the active config on the same recent users (raises Infeasible for ``config``)."""
    sampled, weight = sample_users(db, n=users, seed=seed)
    active = registry.active_config(db)
    current = None if active is None else dry_run(db, active.config, sampled, weight,
                                                   what=f"config version {active.version}")
    proposed = dry_run(db, config, sampled, weight)
    return ConfigCheck(proposed, current, None if active is None else active.version, int(sampled.size))


@dataclass(frozen=True, slots=True)
class ApplyResult:
    version: int
    plan_version: int
    previous_version: int | None
    plan: PlanResult
    warnings: tuple[str, ...]


def apply_config(db: Engine, body: str, *, author: str, note: str, users: int = 500) -> ApplyResult:
    """Validate ``body``, dry-run it (an infeasible config is never applied) and make it active,
    together with its plan, in one transaction."""
    config = registry.parse_body(body)
    sampled, weight = sample_users(db, n=users, seed=0)
    res = dry_run(db, config, sampled, weight)
    previous = registry.active_config(db)
    with db.begin() as conn:  # config and its plan land together, or not at all
        version = registry.activate_config(conn, body, author=author, note=note, projection=res.projected)
        plan_version = registry.publish_plan(conn, version, res.prices, projected=res.projected,
                                             solver={**res.solver, "source": f"dry run at apply ({author})"})
    return ApplyResult(version, plan_version, None if previous is None else previous.version,
                       replace(res, config_version=version, plan_version=plan_version), tuple(config.warnings))


# ---- pacing ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PaceResult:
    plan_version: int
    prices: dict[str, float]
    realised: dict[str, float]
    n_decisions: int


def pace(db: Engine, *, window_s: float = 300.0, step_size: float = 2.0, min_decisions: int = 50,
         now: datetime | None = None) -> PaceResult | None:
    """One pacing step: realised exposure of recent served decisions moves the active plan's prices
    (dual descent); publishes a new plan version for the same config. None when there is not enough
    traffic under the active config in the window."""
    cfg = registry.require_active_config(db)
    config = cfg.config
    now = now or datetime.now(tz=UTC)
    cols = read_decisions(db, since=now - timedelta(seconds=window_s),
                          columns=["request_id", "ts", "candidates", "pmf", "chosen", "propensity", "versions"])
    if len(cols["chosen"]) < min_decisions or not config.constraints:
        return None
    dlog = decision_log(cols, config)
    # only decisions made under this config: older ones carry other constraint sets
    same = np.array([v.get("config") == cfg.version for v in dlog.versions], dtype=bool)
    if same.sum() < min_decisions:
        return None
    start, base = registry.prices(db, cfg)
    lo, hi = config.bounds()
    saved = None if base is None else (base.solver or {}).get("pacer")
    if saved is not None and saved.get("config", {}).get("names") == list(config.constraint_names):
        pacer = DualPacer.from_dict(saved)
        pacer.floor_multipliers_ = np.maximum(start, 0.0)
        pacer.cap_multipliers_ = np.maximum(-start, 0.0)
        pacer.prices_ = start.copy()
    else:
        init = np.where(np.isfinite(lo), np.maximum(start, 0), 0) - np.where(np.isfinite(hi), np.maximum(-start, 0), 0)
        pacer = DualPacer(PacerConfig(lower=tuple(lo), upper=tuple(hi), step_size=step_size, max_price=50.0,
                                      names=config.constraint_names), prices=init)
    new = pacer.update(dlog.chosen_exposure[same])
    names = config.constraint_names
    realised = dict(zip(names, map(float, pacer.shares_), strict=True))
    prices = dict(zip(names, map(float, new), strict=True))
    solver = {"method": "pacer", "window_s": window_s, "n_decisions": int(same.sum()), "realised": realised,
              "pacer": pacer.to_dict(), "base_plan": None if base is None else base.version}
    for key in ("calibration", "calibration_scorer"):  # the prices move, the calibration stays
        kept = None if base is None else (base.solver or {}).get(key)
        if kept:
            solver[key] = kept
    v = registry.publish_plan(db, cfg.version, prices, projected=None if base is None else base.projected,
                              solver=solver)
    return PaceResult(v, prices, realised, int(same.sum()))


# ---- exposure (GET /exposure, the ops page, reports) --------------------------------------------
def exposure_report(db: Engine, config: HomepageConfig, config_version: int | None, window_s: float
                    ) -> dict[str, Any]:
    """Realised share of every constraint over the last ``window_s`` seconds of decisions made under
    ``config_version``, against its bounds."""
    since = datetime.now(tz=UTC) - timedelta(seconds=window_s)
    cols = read_decisions(db, since=since, columns=["request_id", "ts", "candidates", "pmf", "chosen",
                                                     "propensity", "versions"])
    dlog = decision_log(cols, config)
    same = np.array([v.get("config") == config_version for v in dlog.versions], dtype=bool)
    rows = []
    shares = dlog.chosen_exposure[same].mean(0) if same.any() else np.full(len(config.constraints), np.nan)
    for k, c in enumerate(config.constraints):
        s = float(shares[k])
        ok = None if np.isnan(s) else bool((c.min is None or s >= c.min) and (c.max is None or s <= c.max))
        rows.append({"name": c.name, "kind": c.kind, "min": c.min, "max": c.max,
                     "realised": None if np.isnan(s) else s, "holds": ok})
    return {"window_s": window_s, "decisions": int(same.sum()), "config_version": config_version,
            "constraints": rows}


# ---- the long-tail head --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HeadRefresh:
    items: int
    impressions: int
    since: datetime
    blend: float


def refresh_head(db: Engine, *, days: float = 7.0, blend: float = 0.0, min_impressions: int = 1000
                 ) -> HeadRefresh:
    """Popularity := impressions in the log over the window (items never shown: 0), blended with the
    catalog's popularity, so the long-tail head is what traffic actually sees."""
    if not 0.0 <= blend <= 1.0:
        raise InvalidInput(f"blend must be in [0, 1]; got {blend!r}", field="blend")
    since = datetime.now(tz=UTC) - timedelta(days=days)
    fb = read_feedback(db, since=since, columns=["item_id", "type"])
    types = np.asarray(fb["type"], dtype=str)
    shown = np.asarray(fb["item_id"], dtype=str)[types == "impression"]
    items = load_items(db)
    ids = np.asarray(items["item_ids"], dtype=str)
    if shown.size < min_impressions:
        raise InvalidInput(f"min_impressions: only {shown.size} impressions since {since:%Y-%m-%d}; need "
                           f"{min_impressions} to recompute the head", field="min_impressions")
    uniq, counts = np.unique(shown, return_counts=True)
    pos = np.minimum(np.searchsorted(uniq, ids), max(uniq.size - 1, 0))
    imp = np.where(uniq[pos] == ids, counts[pos], 0).astype(np.float64)
    pop = (1 - blend) * imp / imp.sum() + blend * items["popularity"] / max(items["popularity"].sum(), 1e-12)
    upsert_items(db, [{"item_id": i, "category": c, "popularity": float(p), "features": list(map(float, f))}
                      for i, c, p, f in zip(ids.tolist(), list(items["category"]), pop.tolist(), items["features"],
                                            strict=True)])
    return HeadRefresh(int(ids.size), int(shown.size), since, blend)
