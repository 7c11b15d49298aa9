"""Reading the decision log fast: the JSON columns come back as text and are parsed in bulk by
Arrow's C++ JSON reader, then flattened into the :class:`DecisionLog` arrays with numpy — no Python
object per candidate. The learner and replay use it; :func:`policy_api.log.decision_log` (one
dict per candidate) stays as the reference implementation it is tested against."""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from allocator import EVENT_TYPES, HomepageConfig

from ._arrays import DecisionLog, Rewards, pad_candidates, to_epoch
from ._rows import N_CANDIDATES_KEY, iter_decisions
from ._schema import UTCDateTime

__all__ = ["candidate_lists", "read_decision_log", "read_log_rewards", "read_rewards"]

_F64 = pa.float64()
_CAND = pa.struct([("modules", pa.list_(pa.string())), ("categories", pa.list_(pa.string())), ("tilt", _F64),
                   ("value", _F64), ("score", _F64), ("exposure", pa.list_(_F64)), ("engagement", pa.list_(_F64)),
                   ("tail", _F64)])
_VERS = pa.struct([(k, pa.int64()) for k in ("config", "plan", "ranker", "bandit")])
_SCHEMA = pa.schema([("p", pa.list_(_F64)), ("x", pa.struct([("shared", pa.list_(_F64))])), ("v", _VERS)])
_COLS = ["request_id", "ts", "user_id", "policy", "context", "versions", "candidates", "pmf", "chosen", "propensity"]


def _read_json(lines: list[str], schema: pa.Schema) -> pa.Table:
    data = "\n".join(lines).encode()
    longest = max((len(x) for x in lines), default=0)
    return pajson.read_json(io.BytesIO(data),
                            read_options=pajson.ReadOptions(block_size=max(1 << 22, 4 * longest)),
                            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))


def _columnar_lists(table: pa.Table, cand_type: pa.StructType) -> pa.ListArray:
    """list<struct> (one struct per candidate) from parsed columnar candidates (``{"$n": n, field:
    [one value per candidate], ...}``); a field a decision did not log is null for its candidates."""
    col = table.column("c").combine_chunks()
    counts = col.field(N_CANDIDATES_KEY).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.r_[0, np.cumsum(counts)]
    m = int(offsets[-1])
    children = []
    for field in cand_type:
        lists = col.field(field.name)
        present = lists.is_valid().to_numpy(zero_copy_only=False)
        lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        bad = present & (lengths != counts)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"decisions.candidates field {field.name!r} must hold one entry per candidate "
                             f"({int(counts[i])}); got {int(lengths[i])}")
        values = lists.flatten()
        if present.all():
            children.append(values)
            continue
        # the present rows' values, and one null at the end for the candidates of the others
        starts = np.r_[0, np.cumsum(np.where(present, counts, 0))][:-1]
        within = np.arange(m) - np.repeat(offsets[:-1], counts)
        take = np.where(np.repeat(present, counts), np.repeat(starts, counts) + within, len(values))
        padded = pa.concat_arrays([values, pa.nulls(1, type=values.type)])
        children.append(padded.take(pa.array(take)))
    struct = pa.StructArray.from_arrays(children, fields=list(cand_type)) if children else \
        pa.StructArray.from_arrays([], fields=[])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), struct)


def candidate_lists(texts: Sequence[str | None], cand_type: pa.StructType) -> pa.ListArray:
    """Stored ``decisions.candidates`` JSON text (either form, see
    :func:`~policy_api.log.encode_candidates`) as list<``cand_type``>: one list per decision, one
    struct per candidate, parsed by Arrow's C++ JSON reader. Fields other than ``cand_type``'s are
    ignored; NULL text is an empty list.

    Raises
    ------
    ValueError
        When a columnar field does not hold one entry per candidate.
    """
    n = len(texts)
    stored = pa.array(texts, type=pa.string()).fill_null("[]")
    columnar = pc.starts_with(stored, "{").to_numpy(zero_copy_only=False)
    out_type = pa.list_(cand_type)
    parts, where = [], []
    if not columnar.all():
        idx = np.flatnonzero(~columnar)
        rows = stored.take(pa.array(idx)).to_pylist()
        table = _read_json([f'{{"c":{t}}}' for t in rows], pa.schema([("c", out_type)]))
        parts.append(table.column("c").combine_chunks())
        where.append(idx)
    if columnar.any():
        idx = np.flatnonzero(columnar)
        rows = stored.take(pa.array(idx)).to_pylist()
        col_type = pa.struct([(N_CANDIDATES_KEY, pa.int64()), *[(f.name, pa.list_(f.type)) for f in cand_type]])
        table = _read_json([f'{{"c":{t}}}' for t in rows], pa.schema([("c", col_type)]))
        parts.append(_columnar_lists(table, cand_type))
        where.append(idx)
    if not parts:
        return pa.array([], type=out_type)
    if len(parts) == 1:
        return parts[0].cast(out_type)
    order = np.argsort(np.concatenate(where), kind="stable")
    merged = pa.concat_arrays([p.cast(out_type) for p in parts])
    assert len(merged) == n
    return merged.take(pa.array(order))


def _parse(cols: dict[str, Any]) -> pa.Table:
    lines = [f'{{"p":{p or "[]"},"x":{x or "{}"},"v":{v or "{}"}}}'
             for p, x, v in zip(cols["pmf"], cols["context"], cols["versions"], strict=True)]
    table = _read_json(lines, _SCHEMA)
    return table.append_column("c", pa.chunked_array([candidate_lists(cols["candidates"], _CAND)]))


def _fixed(lists: pa.Array, width: int, n: int, fill: float) -> np.ndarray:
    """(n, width) from a list<double> column whose rows should all have ``width`` entries."""
    if n == 0:
        return np.zeros((0, width))
    lengths = lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    flat = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    if (lengths == width).all():
        return flat.reshape(n, width)
    out = np.full((n, width), fill)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = cols < width
    out[rows[keep], cols[keep]] = flat[keep]
    return out


def read_decision_log(db: Engine, config: HomepageConfig, since: datetime | None = None, until: datetime | None = None,
                      config_version: int | None = None, *, with_modules: bool = False) -> DecisionLog:
    """The serving decisions in [since, until) (made under ``config_version`` if given) as arrays."""
    parts = []
    with db.connect() as conn:
        for cols in iter_decisions(conn, since, until, _COLS, raw_json=True, chunk_size=20_000):
            parts.append((cols, _parse(cols)))
    if not parts:
        return _empty(config)
    table = pa.concat_tables([t for _, t in parts])
    cols = {k: np.concatenate([np.asarray(c[k]) for c, _ in parts]) for k in ("request_id", "ts", "user_id", "policy",
                                                                              "chosen", "propensity")}
    cand = table.column("c").combine_chunks()
    counts_all = cand.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    vers = table.column("v").combine_chunks()
    keep = counts_all > 0  # serving decisions only: fallbacks and imports have no candidates
    if config_version is not None:
        cfgv = vers.field("config").to_numpy(zero_copy_only=False)
        keep &= np.nan_to_num(cfgv.astype(np.float64), nan=-1) == config_version
    idx = np.flatnonzero(keep)
    cand = cand.take(pa.array(idx))
    n = idx.size
    counts = counts_all[idx]
    L = int(counts.max(initial=1))
    S, K = config.slots, len(config.constraints)
    flat = cand.flatten()
    m = int(counts.sum())
    mask = pad_candidates(np.ones(m), counts, L) > 0

    def f(name: str) -> np.ndarray:
        return flat.field(name).to_numpy(zero_copy_only=False).astype(np.float64)

    exposure = np.zeros((n, L, K))
    engagement = np.zeros((n, L, S))
    categories = np.full((n, L, S), -1, dtype=np.int64)
    if m:
        if K:
            exposure[mask] = _fixed(flat.field("exposure"), K, m, 0.0)
        engagement[mask] = _fixed(flat.field("engagement"), S, m, 0.0)
        names = flat.field("categories")
        lengths = names.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
        # each distinct name looked up once (Arrow's hash dictionary; a null name is unknown: -1)
        enc = pc.dictionary_encode(names.flatten())
        uniq = enc.dictionary.to_pylist()
        lookup = {c: k for k, c in enumerate(config.category_names)}
        known = np.array([lookup.get(u, -1) for u in uniq] + [-1], dtype=np.float64)
        codes = known[enc.indices.fill_null(len(uniq)).to_numpy(zero_copy_only=False)]
        rows_c = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)), pa.array(codes))
        categories[mask] = _fixed(rows_c, S, m, -1.0).astype(np.int64)
    pmf_lists = table.column("p").combine_chunks().take(pa.array(idx))
    pmf = pad_candidates(pmf_lists.flatten().to_numpy(zero_copy_only=False).astype(np.float64), counts, L)
    shared_lists = table.column("x").combine_chunks().field("shared").take(pa.array(idx))
    d = int(shared_lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).max(initial=0))
    shared = _fixed(shared_lists, d, n, 0.0) if d else np.zeros((n, 0))
    vsub = vers.take(pa.array(idx))
    vcols = {k: vsub.field(k).to_pylist() for k in ("config", "plan", "ranker", "bandit")}
    versions = [{k: vcols[k][i] for k in vcols} for i in range(n)]
    modules: list[Any] = []
    if with_modules:
        mods = flat.field("modules").to_pylist()
        bounds = np.r_[0, np.cumsum(counts)]
        modules = [mods[bounds[i]:bounds[i + 1]] for i in range(n)]
    return DecisionLog(
        request_id=cols["request_id"][idx].astype(str),
        user_id=cols["user_id"][idx].astype(object),
        policy=cols["policy"][idx].astype(object),
        ts=to_epoch(cols["ts"][idx]),
        action=cols["chosen"][idx].astype(np.int64),
        pscore=cols["propensity"][idx].astype(np.float64),
        n_cand=counts,
        mask=mask,
        pmf=pmf,
        value=pad_candidates(f("value"), counts, L),
        score=pad_candidates(np.nan_to_num(f("score"), nan=0.0), counts, L, fill=-np.inf),
        exposure=exposure,
        engagement=engagement,
        tail=pad_candidates(np.nan_to_num(f("tail"), nan=0.0), counts, L),
        categories=categories,
        tilt=pad_candidates(np.nan_to_num(f("tilt"), nan=0.0), counts, L),
        shared=shared,
        versions=versions,
        layout=[None] * n,
        modules=modules if with_modules else [[] for _ in range(n)],
    )


def _cutoff(dialect: str) -> str:
    """SQL for a decision's reward-window end, ``ts + :window_us`` microseconds, computed once per
    decision, in the form its feedback's ``ts`` compares with exactly."""
    if dialect == "postgresql":
        return "d0.ts + :window"
    # SQLite stores the UTC wall clock as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTCDateTime), whose text
    # order is time order: the end in that form, to the microsecond
    end = ("(CAST(strftime('%s', substr(d0.ts, 1, 19)) AS INTEGER) * 1000000"
           " + CAST(substr(d0.ts || '.000000', 21, 6) AS INTEGER) + :window_us)")
    return f"datetime({end} / 1000000, 'unixepoch') || '.' || printf('%06d', {end} % 1000000)"


@dataclass(frozen=True, slots=True)
class _RewardRows:
    """What the reward query returned: per decision id with behaviour events, (reward, in-window
    count, behaviour count); the ids whose first impression fell in their window; and the behaviour
    events since ``since`` in all (orphans included)."""

    ids: np.ndarray
    agg: np.ndarray
    seen: np.ndarray
    total: int

    def rewards(self, dlog: DecisionLog, default: float) -> Rewards:
        """The :class:`Rewards` of ``dlog``'s decisions (ids not among them are orphans)."""
        n = len(dlog)
        reward, has = np.zeros(n), np.zeros(n, dtype=bool)
        n_events = n_behaviour = 0
        if n:
            order = np.argsort(dlog.request_id, kind="stable")
            sorted_ids = dlog.request_id[order]

            def at(found: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                """(rows of ``dlog`` holding the ids in ``found``, which of ``found`` are there)."""
                pos = np.minimum(np.searchsorted(sorted_ids, found), n - 1)
                hit = sorted_ids[pos] == found
                return order[pos[hit]], hit

            rows, hit = at(self.ids)
            reward[rows] = self.agg[hit, 0]
            has[rows] = self.agg[hit, 1] > 0
            n_events = int(self.agg[hit, 1].sum())
            n_behaviour = int(self.agg[hit, 2].sum())
            has[at(self.seen)[0]] = True
        return Rewards(np.where(has, reward, default), has, n_events, n_behaviour - n_events,
                       self.total - n_behaviour)


def read_rewards(db: Engine, dlog: DecisionLog, config: HomepageConfig, since: datetime | None = None,
                 until: datetime | None = None, *, window_s: float | None = None,
                 default_reward: float | None = None) -> Rewards:
    """:func:`~policy_api.log.join_rewards` done by the database: one aggregate row per decision
    instead of every feedback event.

    ``dlog`` holds decisions with ``since <= ts < until`` (as :func:`read_decision_log` read them);
    the feedback is every event with ``ts >= since``, as the reference join reads it. Per decision the
    query sums ``units(type) * value(category of the item)`` over its events whose delay after the
    decision is at most the reward window (to the microsecond), counts its in-window and
    late behaviour events, and whether any event (impressions included) came within the window;
    ``reward`` is ``default_reward`` where none did. Events of decisions not in ``dlog`` are orphans.
    Equal to the reference join up to the order of floating-point additions.
    """
    default = config.learning.default_reward if default_reward is None else default_reward
    return _reward_rows(db, config, since, until, window_s).rewards(dlog, default)


def read_log_rewards(db: Engine, config: HomepageConfig, since: datetime | None = None,
                     until: datetime | None = None, config_version: int | None = None, *,
                     with_modules: bool = False) -> tuple[DecisionLog, Rewards]:
    """:func:`read_decision_log` and :func:`read_rewards` of the same decisions, the reward query
    running in the database while the decisions are read and parsed (both wait mostly outside
    Python: SQLite and Arrow's parser release the interpreter)."""
    with ThreadPoolExecutor(1, thread_name_prefix="reward-join") as pool:
        rows = pool.submit(_reward_rows, db, config, since, until, None)
        dlog = read_decision_log(db, config, since, until, config_version, with_modules=with_modules)
        return dlog, rows.result().rewards(dlog, config.learning.default_reward)


def _reward_rows(db: Engine, config: HomepageConfig, since: datetime | None, until: datetime | None,
                 window_s: float | None) -> _RewardRows:
    """The reward join's queries (see :func:`read_rewards`); the decisions are only needed after."""
    window = config.learning.reward_window_s if window_s is None else window_s
    params: dict[str, Any] = {"window_us": int(round(window * 1e6))}
    units = [(t, float(config.events.get(t, 0.0))) for t in sorted(EVENT_TYPES) if t != "impression"]
    values = [(c.name, float(c.value_per_engagement)) for c in config.categories]

    def case(column: str, pairs: list[tuple[str, float]], prefix: str) -> str:
        whens = []
        for k, (key, val) in enumerate(pairs):
            params[f"{prefix}k{k}"], params[f"{prefix}v{k}"] = key, val
            whens.append(f"WHEN :{prefix}k{k} THEN :{prefix}v{k}")
        return f"CASE {column} {' '.join(whens)} ELSE 0.0 END" if whens else "0.0"

    where, fb_where = [], []
    if since is not None:
        params["since"] = since
        where.append("d0.ts >= :since")
        fb_where.append("f.ts >= :since")
    if until is not None:
        params["until"] = until
        where.append("d0.ts < :until")
    fb_filter = "".join(f" AND {w}" for w in fb_where)
    with db.connect() as conn:
        dialect = conn.dialect.name
        # the window ends once per decision (MATERIALIZED: not once per event)
        d = (f"WITH d AS MATERIALIZED (SELECT d0.request_id, {_cutoff(dialect)} AS cutoff FROM decisions d0"
             f"{' WHERE ' + ' AND '.join(where) if where else ''}) ")
        # one aggregate row per decision over its behaviour events (impressions carry no units and
        # are most of the table: they are neither joined to the items nor summed)
        behaviour_sql = (f"{d}SELECT f.request_id, "
                         f"SUM(CASE WHEN f.ts <= d.cutoff THEN {case('f.type', units, 'u')} * "
                         f"{case('i.category', values, 'c')} ELSE 0.0 END), "
                         f"SUM(CASE WHEN f.ts <= d.cutoff THEN 1 ELSE 0 END), COUNT(*) "
                         f"FROM feedback f JOIN d ON d.request_id = f.request_id "
                         f"LEFT JOIN items i ON i.item_id = f.item_id "
                         f"WHERE f.type <> 'impression'{fb_filter} GROUP BY f.request_id")
        # a decision whose only in-window events are impressions has feedback too: its first
        # impression, grouped before the join (one row per decision instead of one per impression)
        seen_sql = (f"{d}SELECT g.request_id FROM (SELECT f.request_id, MIN(f.ts) AS first FROM feedback f "
                    f"WHERE f.type = 'impression'{fb_filter} GROUP BY f.request_id) g "
                    f"JOIN d ON d.request_id = g.request_id WHERE g.first <= d.cutoff")
        binds: list[sa.BindParameter[Any]] = [sa.bindparam(k, type_=UTCDateTime()) for k in ("since", "until")
                                              if k in params]
        if dialect == "postgresql":
            params["window"] = timedelta(microseconds=params.pop("window_us"))
            binds.append(sa.bindparam("window", type_=sa.Interval()))
        rows = conn.execute(sa.text(behaviour_sql).bindparams(*binds), params).all()
        seen_params = {k: v for k, v in params.items() if k in ("since", "until", "window", "window_us")}
        seen = np.asarray(conn.execute(sa.text(seen_sql).bindparams(*binds), seen_params).scalars().all(), dtype=str)
        total_sql = " AND ".join(["SELECT COUNT(*) FROM feedback f WHERE f.type <> 'impression'", *fb_where])
        since_only = {k: v for k, v in params.items() if k == "since"}
        total = int(conn.execute(sa.text(total_sql).bindparams(*binds[:len(since_only)]), since_only).scalar_one())
    ids = np.asarray([r[0] for r in rows], dtype=str)
    agg = np.array([r[1:] for r in rows], dtype=np.float64).reshape(len(rows), 3)
    return _RewardRows(ids, agg, seen, total)


def _empty(config: HomepageConfig) -> DecisionLog:
    z = np.zeros(0)
    S, K = config.slots, len(config.constraints)
    return DecisionLog(np.zeros(0, dtype=str), np.zeros(0, dtype=object), np.zeros(0, dtype=object), z,
                       np.zeros(0, dtype=np.int64), z, np.zeros(0, dtype=np.int64), np.zeros((0, 1), bool),
                       np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1, K)), np.zeros((0, 1, S)),
                       np.zeros((0, 1)), np.zeros((0, 1, S), dtype=np.int64), np.zeros((0, 1)), np.zeros((0, 0)), [], [],
                       [])
