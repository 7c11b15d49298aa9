"""Allocation jobs: plan (LP / dual), dry-run and apply a config, pace (online dual descent),
realised exposure, and refreshing the long-tail head from logged impressions.

Each job reads one snapshot (the registry's active config and prices, the catalog, the log), computes
with :mod:`allocator` and returns a frozen result; publishing is the last step and the only write.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from allocator import (
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
    DecisionEngine,
    EngineState,
    calibrated,
    calibration_predicted,
    calibration_rates,
    catalog_long_tail,
    load_catalog,
    load_state,
)
from ..errors import InvalidInput, from_infeasible
from ..log import (
    Catalog,
    decision_log,
    item_engagement,
    load_items,
    read_decisions,
    read_feedback,
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


def user_candidates(state: EngineState, user_ids: np.ndarray, seed: int = 0) -> Candidates:
    """Candidate layouts of many users, as serving builds them.

    Every user gets a candidate pool of their own (each category's head plus a seeded draw from its
    rest, as every request does): with one pool shared by all users, a non-personal scorer makes every
    user's candidates identical and the plan's prices sit exactly where all of them tie, which serving
    would round to the same corner for everyone.
    """
    eng = DecisionEngine(state)
    rng = np.random.default_rng(seed)
    U = int(user_ids.size)
    pools = np.stack([eng.pool(state, rng) for _ in range(U)])  # (U, P); planning, not the request path
    P = pools.shape[1]
    sc = state.scorer
    u_idx = np.array([sc.user_idx(str(u)) for u in user_ids.tolist()], dtype=np.int64)
    scores = sc.score_pairs(np.repeat(u_idx, P), pools.ravel()).reshape(U, P)
    rank = scores  # order within a category and the tilt's reach: the scorer's own (see block_table)
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
    tbl = block_table(state.space, scores, cat, state.is_tail[pools], state.tail[pools], rank_scores=rank)
    return build_candidates(state.space, tbl, state.prices, lead_categories=lead)


def _result(config: HomepageConfig, version: int | None, p: Plan | ShardedPlan, users: int, candidates: int,
            extra: dict[str, Any] | None = None) -> PlanResult:
    names = config.constraint_names
    solver = {"method": p.method, "status": p.status, "gap": float(p.gap), "violation": float(p.violation),
              "n_vars": int(p.n_vars), "build_s": float(p.build_s), "solve_s": float(p.solve_s),
              "iterations": int(p.iterations), "users": users, **(extra or {})}
    return PlanResult(config_version=version, prices=dict(zip(names, map(float, p.prices), strict=True)),
                      value=float(p.objective), shares=dict(zip(names, map(float, p.shares), strict=True)),
                      solver=solver, users=users, candidates=candidates)


def _solve(state: EngineState, config: HomepageConfig, version: int | None, users: np.ndarray,
           weight: np.ndarray, *, method: str = "auto", seed: int = 0, what: str = "the config",
           engine: str = "local", workers: int | None = None) -> PlanResult:
    cand = user_candidates(state, users, seed=seed)
    lo, hi = config.bounds()
    try:
        p = _solve_on(engine, cand, weight, lo, hi, config.constraint_names, method, workers)
    except InfeasiblePlan as e:
        raise from_infeasible(e, what) from None
    t = config.exploration.temperature
    if t == 0 or not config.constraints:
        return _result(config, version, p, int(users.size), int(cand.mask.sum()))
    # serving exploits a softmax of the priced values: publish the prices at which that rule meets the
    # bounds on these users (the entropy-regularised dual, started from the LP's); the LP's stay on record
    ok = exploitable(state.space.tilt_levels[cand.tilt], cand.mask, state.space.tail_goal)
    soft = softmax_prices(cand.value, cand.exposure, lo, hi, t, weight=weight, mask=ok, start=p.prices)
    shares, _ = softmax_response(cand.value, cand.exposure, soft, t, weight=weight, mask=ok)
    q = exploit_pmf(cand.value + cand.exposure @ soft, cand.value, t, ok)
    value = float(np.asarray(weight) / np.sum(weight) @ (q * np.where(cand.mask, cand.value, 0.0)).sum(1))
    names = config.constraint_names
    lp = {"lp_prices": dict(zip(names, map(float, p.prices), strict=True)), "lp_value": float(p.objective),
          "temperature": t}
    p = replace(p, prices=soft, shares=shares, objective=value)
    return _result(config, version, p, int(users.size), int(cand.mask.sum()), extra=lp)


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


def repeat_engagement(db: Engine, config: HomepageConfig, since: datetime | None = None, *,
                      catalog: Catalog | None = None) -> np.ndarray:
    """:func:`repeat_rates` over the calibration's window (the last ``loop.calibration_events`` feedback
    events since ``since``), read in one query of the feedback joined to its decisions."""
    from ..log import decisions, feedback, reading
    from ..log._rows import recent_since

    catalog = catalog if catalog is not None else load_catalog(db)
    names = config.category_names
    item_cat = catalog.category_index(names)
    is_tail, _ = catalog_long_tail(catalog, config)
    start = recent_since(db, config.loop.calibration_events, since)
    q = (sa.select(decisions.c.user_id, feedback.c.request_id, feedback.c.item_id, feedback.c.type, feedback.c.ts,
                   feedback.c.slot)
         .select_from(feedback.join(decisions, decisions.c.request_id == feedback.c.request_id)))
    if start is not None:
        q = q.where(feedback.c.ts >= start)
    with reading(db) as conn:
        rows = conn.execute(q).all()
    C = len(names)
    if not rows:
        return np.zeros((C, 3))
    user_s, req_s, item_s, kind_s, ts_s, slot_s = zip(*rows, strict=True)
    _, user = np.unique(np.array(user_s, dtype=object).astype(str), return_inverse=True)
    _, request = np.unique(np.array(req_s, dtype=object).astype(str), return_inverse=True)
    index = catalog.index_of()
    ids, at = np.unique(np.array(item_s, dtype=object).astype(str), return_inverse=True)
    item = np.array([index.get(i, -1) for i in ids.tolist()], dtype=np.int64)[at]  # per distinct item
    kinds, kind = np.unique(np.array(kind_s, dtype=object).astype(str), return_inverse=True)
    kind_units = np.array([float(config.events.get(k, 0.0)) for k in kinds.tolist()])
    impression = kinds[kind] == "impression"
    ts = np.fromiter((t.timestamp() for t in ts_s), dtype=np.float64, count=len(ts_s))
    slot = np.array([-1 if s is None else s for s in slot_s], dtype=np.int64)
    pw = np.asarray(config.position_weights, dtype=np.float64)
    pw = pw / pw.mean()
    in_range = (slot >= 0) & (slot < pw.size)
    weight = np.where(in_range, pw[np.clip(slot, 0, pw.size - 1)], 1.0)
    return repeat_rates(user, request, item, ts, np.where(impression, 0.0, kind_units[kind]), impression, weight,
                        item_cat, is_tail, C)


def calibration(db: Engine, config: HomepageConfig, scorer: Callable[[np.ndarray], np.ndarray] | None = None, *,
                repeat: bool = True) -> dict[str, dict[str, list[float]]] | None:
    """Recent engagement units and examined impressions (each weighted by its slot's position weight
    relative to the mean) per config category, for its head and its long tail apart, over the last
    ``loop.calibration_events`` feedback events of the last 6 hours, measured on the decisions served
    without a personal live state (each group shrunk toward its rate over all traffic by
    ``UNPERSONALISED_PRIOR`` impressions: over all traffic, a niche category is shown mostly to users
    who like it, which overstates what it earns from anyone else):
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
    shown again to users who engaged with them before (:func:`repeat_engagement`)."""
    since = datetime.now(tz=UTC) - CALIBRATION_WINDOW
    catalog = load_catalog(db)
    names = config.category_names
    item_cat = catalog.category_index(names)
    is_tail, _ = catalog_long_tail(catalog, config)
    index = catalog.index_of()
    C = len(names)

    def groups(unpersonalised: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, units, imps = item_engagement(db, config.events, since=since, position_weights=config.position_weights,
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
    prior = np.where(i_all > 0, UNPERSONALISED_PRIOR, 0.0)
    u, i, p = u_cold + prior * rate_all, i_cold + prior, p_cold + prior * pred_all
    out: dict[str, dict[str, list[float]]] = {
        c: {"head": [float(u[2 * k]), float(i[2 * k])], "tail": [float(u[2 * k + 1]), float(i[2 * k + 1])]}
        for k, c in enumerate(names)}
    if scorer is not None:
        for k, c in enumerate(names):
            out[c]["predicted"] = [float(p[2 * k]), float(p[2 * k + 1])]
    if repeat:
        rep = repeat_engagement(db, config, since, catalog=catalog)
        for k, c in enumerate(names):
            out[c]["repeat"] = [float(x) for x in rep[k]]
    return out


def plan(db: Engine, *, users: int = 2000, since: datetime | None = None, method: str = "auto", seed: int = 0,
         publish: bool = True, engine: str = "local", workers: int | None = None) -> PlanResult:
    """Plan the active config on ``users`` users sampled from traffic since ``since``; publish its prices.

    Raises :class:`~policy_api.errors.Infeasible` (nothing published) when the constraints cannot hold.
    ``engine="ray"`` solves the same plan with the users in ``workers`` Ray actors (the sharded dual,
    :func:`allocator.plan_dual_sharded`; the ``ray`` extra).
    The plan carries the category calibration measured on recent feedback (:func:`calibration`):
    serving uses it with the plan's prices, and the plan is solved on the same calibrated values.
    """
    cfg = registry.require_active_config(db)
    sampled, weight = sample_users(db, since=since, n=users, seed=seed)
    state = load_state(db, cfg)
    rates, _ = plan_calibration(db, cfg, state)
    if rates is not None:
        state = calibrated(state, calibration_rates(rates, cfg.config.category_names),
                           calibration_predicted(rates, cfg.config.category_names))
    res = _solve(state, cfg.config, cfg.version, sampled, weight, method=method, seed=seed,
                 what=f"config version {cfg.version}", engine=engine, workers=workers)
    if rates is not None:
        res = replace(res, solver={**res.solver, "calibration": rates, "calibration_scorer": state.scorer.name})
    if not publish:
        return res
    v = registry.publish_plan(db, cfg.version, res.prices, projected=res.projected, solver=res.solver)
    return replace(res, plan_version=v)


def plan_calibration(db: Engine, cfg: ConfigRecord, state: EngineState | None = None
                     ) -> tuple[dict[str, dict[str, list[float]]] | None, str]:
    """The calibration a plan of ``cfg`` carries (:func:`calibration` with the served scorer's
    predictions) and that scorer's name, without solving the plan: what the loop publishes beside the
    pacer's own prices once it has them (scoring a plan's sampled users with a history scorer takes
    tens of seconds, during which the loop would neither pace nor learn)."""
    st = state if state is not None else load_state(db, cfg)
    return calibration(db, cfg.config, scorer=lambda rows: st.scorer.score(-1, rows)), st.scorer.name


def dry_run(db: Engine, config: HomepageConfig, users: np.ndarray, weight: np.ndarray,
            *, what: str = "the config") -> PlanResult:
    """Plan ``config`` on ``users`` from zero prices without publishing anything."""
    cfg = ConfigRecord(version=-1, body="", config=config, status="dry-run")
    state = replace(load_state(db, cfg), prices=np.zeros(len(config.constraints)))
    return _solve(state, config, None, users, weight, what=what)


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
