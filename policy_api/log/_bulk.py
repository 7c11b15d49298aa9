"""Reading the decision log fast: the JSON columns come back as text and are parsed in bulk by
Arrow's C++ JSON reader, then flattened into the :class:`DecisionLog` arrays with numpy — no Python
object per candidate. The learner and replay use it; :func:`policy_api.log.decision_log` (one
dict per candidate) stays as the reference implementation it is tested against."""

from __future__ import annotations

import queue
import threading
from collections.abc import Collection, Generator, Iterator, Sequence
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
from ._rows import (
    DECISION_COLUMNS,
    FEEDBACK_COLUMNS,
    N_CANDIDATES_KEY,
    _check_columns,
    _iter_columns,
    _to_column,
    iter_decisions,
    serving_began,
)
from ._schema import Bind, UTCDateTime, decisions, feedback, reading

__all__ = ["CANDIDATE_FIELDS", "LEARNER_FIELDS", "candidate_lists", "iter_log_rewards", "read_decision_log",
           "read_log_columns", "read_log_rewards", "read_rewards"]

_F64 = pa.float64()
_CAND_TYPES: dict[str, pa.DataType] = {
    "modules": pa.list_(pa.string()), "categories": pa.list_(pa.string()), "tilt": _F64, "value": _F64,
    "score": _F64, "exposure": pa.list_(_F64), "engagement": pa.list_(_F64), "tail": _F64}
#: The candidate fields :func:`read_decision_log` parses into :class:`DecisionLog` arrays (each
#: candidate's module ids are read with ``with_modules``).
CANDIDATE_FIELDS: tuple[str, ...] = ("categories", "tilt", "value", "score", "exposure", "engagement", "tail")
#: What the learner reads of each candidate: the bandit's features and the served exposure.
LEARNER_FIELDS: tuple[str, ...] = ("categories", "tilt", "value", "score", "exposure")
_VERS = pa.struct([(k, pa.int64()) for k in ("config", "plan", "ranker", "bandit")])
_SCHEMA = pa.schema([("p", pa.list_(_F64)), ("x", pa.struct([("shared", pa.list_(_F64))])), ("v", _VERS)])
_COLS = ["request_id", "ts", "user_id", "policy", "context", "versions", "candidates", "pmf", "chosen", "propensity"]


def read_log_columns(bind: Bind, table: str, columns: Sequence[str], *, chunk_size: int = 50_000
                     ) -> dict[str, Any]:
    """Whole columns of ``table`` ("decisions", in (ts, request_id) order as
    :func:`~policy_api.log.read_decisions` reads them, or "feedback", in arrival order), with each
    string column as an Arrow ``large_string`` array (null where NULL) and the others as
    :func:`~policy_api.log.read_decisions` gives them (times ``datetime64[us]``).

    For reading a large log whole: the rows come ``chunk_size`` at a time and each chunk's strings go
    into Arrow's compact buffers at once, so that memory holds their bytes, not a Python object per
    value (~60 bytes more each)."""
    if table not in ("decisions", "feedback"):
        raise ValueError(f"table must be 'decisions' or 'feedback'; got {table!r}")
    tbl = decisions if table == "decisions" else feedback
    cols = _check_columns(columns, DECISION_COLUMNS if table == "decisions" else FEEDBACK_COLUMNS, table)
    text = {c for c in cols if isinstance(tbl.c[c].type, sa.String)}
    parts: dict[str, list[Any]] = {c: [] for c in cols}
    with reading(bind) as conn:
        chunks = (iter_decisions(conn, columns=cols, chunk_size=chunk_size) if table == "decisions" else
                  _iter_columns(conn, feedback, cols, [], [feedback.c.id], chunk_size))
        for chunk in chunks:
            for c in cols:
                parts[c].append(pa.array(chunk[c], pa.large_string()) if c in text else chunk[c])
    out: dict[str, Any] = {}
    for c in cols:
        if c in text:
            out[c] = pa.chunked_array(parts[c], pa.large_string()).combine_chunks()
        else:
            out[c] = np.concatenate([_to_column([], tbl.c[c]), *parts[c]])
    return out


def _read_json(lines: pa.Array, schema: pa.Schema, threads: bool = True) -> pa.Table:
    """Parse ``lines`` (a string array: one JSON object per entry, each ending in a newline) with
    Arrow's C++ JSON reader; the entries' bytes are handed over as they lie in the array's buffer.
    ``threads``: on Arrow's thread pool (faster alone, more CPU in all) or on the calling thread."""
    if len(lines) == 0:
        return schema.empty_table()
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset:lines.offset + len(lines) + 1]
    start, longest = int(offsets[0]), int(np.diff(offsets).max())
    data = lines.buffers()[2].slice(start, int(offsets[-1]) - start)
    return pajson.read_json(pa.BufferReader(data),
                            read_options=pajson.ReadOptions(use_threads=threads,
                                                            block_size=max(1 << 22, 4 * longest)),
                            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"))


def _lines(*parts: pa.Array | str) -> pa.Array:
    """One JSON line per entry: string arrays and literals concatenated element-wise, then a newline."""
    return pc.binary_join_element_wise(*parts, "\n", "")


def _columnar_lists(col: pa.StructArray, cand_type: pa.StructType) -> pa.ListArray:
    """list<struct> (one struct per candidate) from parsed columnar candidates (``{"$n": n, field:
    [one value per candidate], ...}``); a field a decision did not log is null for its candidates."""
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
    # no field asked for: m empty structs still (the counts live in the list offsets)
    struct = pa.StructArray.from_arrays(children, fields=list(cand_type)) if children else \
        pa.StructArray.from_buffers(pa.struct([]), m, [None])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), struct)


def candidate_lists(texts: Sequence[str | None] | pa.Array, cand_type: pa.StructType, *,
                    threads: bool = True) -> pa.ListArray:
    """Stored ``decisions.candidates`` JSON text (either form, see
    :func:`~policy_api.log.encode_candidates`) as list<``cand_type``>: one list per decision, one
    struct per candidate, parsed by Arrow's C++ JSON reader (on its thread pool unless ``threads`` is
    False: a pipeline whose other stages keep the cores busy parses on its own thread, with less CPU
    in all). Fields other than ``cand_type``'s are skipped by the parser, not built; NULL text is an
    empty list.

    Raises
    ------
    ValueError
        When a columnar field does not hold one entry per candidate.
    """
    stored = (texts if isinstance(texts, pa.Array) else pa.array(texts, type=pa.string())).fill_null("[]")
    n = len(stored)
    columnar = pc.starts_with(stored, "{").to_numpy(zero_copy_only=False)
    out_type = pa.list_(cand_type)
    parts, where = [], []
    if not columnar.all():
        idx = np.flatnonzero(~columnar)
        rows = stored.take(pa.array(idx)) if columnar.any() else stored
        table = _read_json(_lines('{"c":', rows, "}"), pa.schema([("c", out_type)]), threads)
        parts.append(table.column("c").combine_chunks())
        where.append(idx)
    if columnar.any():
        idx = np.flatnonzero(columnar)
        rows = stored.take(pa.array(idx)) if not columnar.all() else stored
        # each columnar row is a JSON object already: parsed as a line of its own
        fields = [(N_CANDIDATES_KEY, pa.int64()), *[(f.name, pa.list_(f.type)) for f in cand_type]]
        table = _read_json(_lines(rows), pa.schema(fields), threads)
        parts.append(_columnar_lists(table.to_struct_array().combine_chunks(), cand_type))
        where.append(idx)
    if not parts:
        return pa.array([], type=out_type)
    if len(parts) == 1:
        return parts[0].cast(out_type)
    order = np.argsort(np.concatenate(where), kind="stable")
    merged = pa.concat_arrays([p.cast(out_type) for p in parts])
    assert len(merged) == n
    return merged.take(pa.array(order))


def _parse(cols: dict[str, Any], cand_type: pa.StructType, *, threads: bool = True) -> pa.Table:
    def text(name: str, null: str) -> pa.Array:
        return pa.array(cols[name], type=pa.string()).fill_null(null)

    lines = _lines('{"p":', text("pmf", "[]"), ',"x":', text("context", "{}"), ',"v":', text("versions", "{}"), "}")
    table = _read_json(lines, _SCHEMA, threads)
    return table.append_column("c", pa.chunked_array([candidate_lists(cols["candidates"], cand_type,
                                                                      threads=threads)]))


def _candidate_type(fields: Collection[str] | None, with_modules: bool) -> tuple[tuple[str, ...], pa.StructType]:
    """The candidate fields to read (checked against :data:`CANDIDATE_FIELDS`) and their struct."""
    if fields is None:
        names = CANDIDATE_FIELDS
    else:
        if isinstance(fields, str) or not set(fields) <= set(CANDIDATE_FIELDS):
            unknown = fields if isinstance(fields, str) else sorted(set(fields) - set(CANDIDATE_FIELDS))
            raise ValueError(f"fields must be a collection of {CANDIDATE_FIELDS}; got {unknown!r}")
        names = tuple(f for f in CANDIDATE_FIELDS if f in fields)
    read = (*(("modules",) if with_modules else ()), *names)
    return names, pa.struct([(f, _CAND_TYPES[f]) for f in read])


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
                      config_version: int | None = None, *, with_modules: bool = False,
                      fields: Collection[str] | None = None) -> DecisionLog:
    """The serving decisions in [since, until) (made under ``config_version`` if given) as arrays.

    ``fields``: the candidate fields to parse, out of :data:`CANDIDATE_FIELDS` (None: all). The
    parser skips the others without building them; their arrays come back NaN (``categories``: -1).
    The learner reads :data:`LEARNER_FIELDS`.

    Raises
    ------
    ValueError
        When ``fields`` names a field not in :data:`CANDIDATE_FIELDS`, or a columnar candidate field
        does not hold one entry per candidate.
    """
    names, cand_type = _candidate_type(fields, with_modules)
    served, since = _serving_since(db, since)
    if not served:
        return _empty(config)
    parts = []
    with db.connect() as conn:
        for cols in iter_decisions(conn, since, until, _COLS, raw_json=True, chunk_size=20_000):
            parts.append((cols, _parse(cols, cand_type)))
    if not parts:
        return _empty(config)
    table = pa.concat_tables([t for _, t in parts])
    cols = {k: np.concatenate([np.asarray(c[k]) for c, _ in parts]) for k in _SCALARS}
    return _build(cols, table, config, config_version, names, with_modules)


def _serving_since(db: Engine, since: datetime | None) -> tuple[bool, datetime | None]:
    """(whether the log holds a serving decision, ``since`` raised to when serving began): the readers
    of serving decisions skip the imported history before it with one index seek
    (:func:`~policy_api.log.serving_began`) instead of reading and parsing every imported row."""
    began = serving_began(db)
    if began is None:
        return False, since
    return True, began if since is None or began > since else since


def _decision_chunks(db: Engine, config: HomepageConfig, since: datetime | None, until: datetime | None,
                     config_version: int | None, names: tuple[str, ...], cand_type: pa.StructType,
                     chunk_size: int) -> Generator[DecisionLog, None, None]:
    """:func:`read_decision_log` one chunk of decisions at a time, in log order (chunks left
    without serving decisions are skipped)."""
    with db.connect() as conn:
        for cols in iter_decisions(conn, since, until, _COLS, raw_json=True, chunk_size=chunk_size):
            dlog = _build({k: np.asarray(cols[k]) for k in _SCALARS}, _parse(cols, cand_type, threads=False), config,
                          config_version, names, False)
            if len(dlog):
                yield dlog


_SCALARS = ("request_id", "ts", "user_id", "policy", "chosen", "propensity")


def _build(cols: dict[str, np.ndarray], table: pa.Table, config: HomepageConfig, config_version: int | None,
           names: tuple[str, ...], with_modules: bool) -> DecisionLog:
    """The :class:`DecisionLog` of parsed rows (``cols``: the scalar columns; ``table``: the parsed
    JSON columns ``p``, ``x``, ``v`` and ``c``)."""
    cand = table.column("c").combine_chunks()
    counts_all = cand.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    vers = table.column("v").combine_chunks()
    keep = counts_all > 0  # serving decisions only: fallbacks and imports have no candidates
    if config_version is not None:
        cfgv = vers.field("config").to_numpy(zero_copy_only=False)
        keep &= np.nan_to_num(cfgv.astype(np.float64), nan=-1) == config_version
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        return _empty(config)
    take = pa.array(idx)
    cand = cand.take(take)
    n = idx.size
    counts = counts_all[idx]
    L = int(counts.max(initial=1))
    S, K = config.slots, len(config.constraints)
    flat = cand.flatten()
    m = int(counts.sum())
    mask = pad_candidates(np.ones(m), counts, L) > 0

    def per_candidate(name: str, fill: float = 0.0, *, nan: float | None = 0.0) -> np.ndarray:
        """(n, L) of a scalar field; NaN where the field was not read."""
        if name not in names:
            return np.full((n, L), np.nan)
        values = flat.field(name).to_numpy(zero_copy_only=False).astype(np.float64)
        return pad_candidates(values if nan is None else np.nan_to_num(values, nan=nan), counts, L, fill=fill)

    exposure = np.zeros((n, L, K)) if "exposure" in names else np.full((n, L, K), np.nan)
    engagement = np.zeros((n, L, S)) if "engagement" in names else np.full((n, L, S), np.nan)
    categories = np.full((n, L, S), -1, dtype=np.int64)
    if m:
        if K and "exposure" in names:
            exposure[mask] = _fixed(flat.field("exposure"), K, m, 0.0)
        if "engagement" in names:
            engagement[mask] = _fixed(flat.field("engagement"), S, m, 0.0)
        if "categories" in names:
            cats = flat.field("categories")
            lengths = cats.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
            # each distinct name looked up once (Arrow's hash dictionary; a null name is unknown: -1)
            enc = pc.dictionary_encode(cats.flatten())
            uniq = enc.dictionary.to_pylist()
            lookup = {c: k for k, c in enumerate(config.category_names)}
            known = np.array([lookup.get(u, -1) for u in uniq] + [-1], dtype=np.float64)
            codes = known[enc.indices.fill_null(len(uniq)).to_numpy(zero_copy_only=False)]
            rows_c = pa.ListArray.from_arrays(pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32)), pa.array(codes))
            categories[mask] = _fixed(rows_c, S, m, -1.0).astype(np.int64)
    pmf_lists = table.column("p").combine_chunks().take(take)
    pmf = pad_candidates(pmf_lists.flatten().to_numpy(zero_copy_only=False).astype(np.float64), counts, L)
    shared_lists = table.column("x").combine_chunks().field("shared").take(take)
    d = int(shared_lists.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).max(initial=0))
    shared = _fixed(shared_lists, d, n, 0.0) if d else np.zeros((n, 0))
    modules: list[Any] = [[] for _ in range(n)]
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
        value=per_candidate("value", nan=None),
        score=per_candidate("score", -np.inf),
        exposure=exposure,
        engagement=engagement,
        tail=per_candidate("tail"),
        categories=categories,
        tilt=per_candidate("tilt"),
        shared=shared,
        versions=vers.take(take).to_pylist(),  # one dict per decision, built by Arrow
        layout=[None] * n,
        modules=modules,
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
                     with_modules: bool = False,
                     fields: Collection[str] | None = None) -> tuple[DecisionLog, Rewards]:
    """:func:`read_decision_log` and :func:`read_rewards` of the same decisions, the reward query
    running in the database while the decisions are read and parsed (both wait mostly outside
    Python: SQLite and Arrow's parser release the interpreter). :func:`iter_log_rewards` does the
    same one chunk at a time."""
    with ThreadPoolExecutor(1, thread_name_prefix="reward-join") as pool:
        rows = pool.submit(_reward_rows, db, config, since, until, None, _serving_since(db, since)[1])
        dlog = read_decision_log(db, config, since, until, config_version, with_modules=with_modules, fields=fields)
        return dlog, rows.result().rewards(dlog, config.learning.default_reward)


def _reward_rows(db: Engine, config: HomepageConfig, since: datetime | None, until: datetime | None,
                 window_s: float | None, decisions_since: datetime | None = None) -> _RewardRows:
    """The reward join's queries (see :func:`read_rewards`); the decisions are only needed after.
    ``decisions_since`` (default ``since``) bounds the decisions alone (the events keep ``since``)."""
    window = config.learning.reward_window_s if window_s is None else window_s
    params: dict[str, Any] = {"window_us": int(round(window * 1e6))}
    units, values = _units_and_values(config)

    def case(column: str, pairs: list[tuple[str, float]], prefix: str) -> str:
        return _case(column, pairs, prefix, params)

    where, fb_where = [], []
    if since is not None:
        params["since"] = since
        fb_where.append("f.ts >= :since")
    if decisions_since is None and since is not None:
        where.append("d0.ts >= :since")
    elif decisions_since is not None:
        params["dsince"] = decisions_since
        where.append("d0.ts >= :dsince")
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
        binds: list[sa.BindParameter[Any]] = [sa.bindparam(k, type_=UTCDateTime()) for k in ("since", "until", "dsince")
                                              if k in params]
        if dialect == "postgresql":
            params["window"] = timedelta(microseconds=params.pop("window_us"))
            binds.append(sa.bindparam("window", type_=sa.Interval()))
        rows = conn.execute(sa.text(behaviour_sql).bindparams(*binds), params).all()
        seen_params = {k: v for k, v in params.items() if k in ("since", "until", "dsince", "window", "window_us")}
        seen = np.asarray(conn.execute(sa.text(seen_sql).bindparams(*binds), seen_params).scalars().all(), dtype=str)
        total_sql = " AND ".join(["SELECT COUNT(*) FROM feedback f WHERE f.type <> 'impression'", *fb_where])
        since_only = {k: v for k, v in params.items() if k == "since"}
        total = int(conn.execute(sa.text(total_sql).bindparams(*binds[:len(since_only)]), since_only).scalar_one())
    ids = np.asarray([r[0] for r in rows], dtype=str)
    agg = np.array([r[1:] for r in rows], dtype=np.float64).reshape(len(rows), 3)
    return _RewardRows(ids, agg, seen, total)


def _units_and_values(config: HomepageConfig) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(units per behaviour event type, value per engagement per category) of the reward."""
    units = [(t, float(config.events.get(t, 0.0))) for t in sorted(EVENT_TYPES) if t != "impression"]
    return units, [(c.name, float(c.value_per_engagement)) for c in config.categories]


def _case(column: str, pairs: list[tuple[str, float]], prefix: str, params: dict[str, Any]) -> str:
    """SQL ``CASE column WHEN key THEN value ... ELSE 0.0 END`` with the pairs bound in ``params``."""
    whens = []
    for k, (key, val) in enumerate(pairs):
        params[f"{prefix}k{k}"], params[f"{prefix}v{k}"] = key, val
        whens.append(f"WHEN :{prefix}k{k} THEN :{prefix}v{k}")
    return f"CASE {column} {' '.join(whens)} ELSE 0.0 END" if whens else "0.0"


def _chunk_reward_rows(db: Engine, config: HomepageConfig, request_ids: np.ndarray,
                       since: datetime | None) -> _RewardRows:
    """The reward join of the decisions ``request_ids`` alone (see :func:`read_rewards`): their
    events found through the feedback's request-id index, so that a chunk costs what its own events
    cost. Behaviour events of other decisions are not counted (no orphans)."""
    params: dict[str, Any] = {"ids": request_ids.tolist(), "window_us": int(round(config.learning.reward_window_s * 1e6))}
    units, values = _units_and_values(config)
    binds: list[sa.BindParameter[Any]] = [sa.bindparam("ids", expanding=True)]
    fb_filter = ""
    if since is not None:
        params["since"] = since
        binds.append(sa.bindparam("since", type_=UTCDateTime()))
        fb_filter = " WHERE f.ts >= :since"
    behaviour = "f.type <> 'impression' AND f.ts <= d.cutoff"
    # the item's category only for in-window behaviour events (a lookup per impression would cost
    # more than the rest of the query); a missing item is worth 0.0, as the left join reads it
    value = (f"COALESCE((SELECT {_case('i.category', values, 'c', params)} FROM items i "
             f"WHERE i.item_id = f.item_id), 0.0)")
    with db.connect() as conn:
        dialect = conn.dialect.name
        if dialect == "postgresql":
            params["window"] = timedelta(microseconds=params.pop("window_us"))
            binds.append(sa.bindparam("window", type_=sa.Interval()))
        # SQLite: CROSS JOIN keeps the chunk's decisions as the outer loop (an index probe each)
        join = "CROSS JOIN" if dialect == "sqlite" else "JOIN"
        sql = (f"WITH d AS MATERIALIZED (SELECT d0.request_id, {_cutoff(dialect)} AS cutoff FROM decisions d0 "
               f"WHERE d0.request_id IN :ids) "
               f"SELECT d.request_id, "
               f"SUM(CASE WHEN {behaviour} THEN {_case('f.type', units, 'u', params)} * {value} ELSE 0.0 END), "
               f"SUM(CASE WHEN {behaviour} THEN 1 ELSE 0 END), "
               f"SUM(CASE WHEN f.type <> 'impression' THEN 1 ELSE 0 END), "
               f"MAX(CASE WHEN f.ts <= d.cutoff THEN 1 ELSE 0 END) "
               f"FROM d {join} feedback f ON f.request_id = d.request_id{fb_filter} GROUP BY d.request_id")
        rows = conn.execute(sa.text(sql).bindparams(*binds), params).all()
    ids = np.asarray([r[0] for r in rows], dtype=str)
    agg = np.array([r[1:] for r in rows], dtype=np.float64).reshape(len(rows), 4)
    # any event in the window (impressions included) is feedback; every behaviour event joined
    return _RewardRows(ids, agg[:, :3], ids[agg[:, 3] > 0], int(agg[:, 2].sum()))


#: chunks read (and their joins started) ahead of the caller of :func:`iter_log_rewards`
READ_AHEAD = 2
_DONE = object()


def iter_log_rewards(db: Engine, config: HomepageConfig, since: datetime | None = None,
                     until: datetime | None = None, config_version: int | None = None, *,
                     chunk_size: int = 4096,
                     fields: Collection[str] | None = LEARNER_FIELDS) -> Iterator[tuple[DecisionLog, Rewards]]:
    """:func:`read_log_rewards` as a pipeline, in log order: one chunk of at most ``chunk_size``
    decisions at a time. A reader thread reads and parses chunk after chunk, up to
    :data:`READ_AHEAD` ahead of the caller, and hands each to a joiner thread that joins its rewards
    in the database, so that reading chunk k+2, joining chunk k+1 and the caller's work on chunk k
    overlap (Arrow's parser, the database and VW's learner run mostly outside the interpreter).

    Chunk by chunk, the decisions equal :func:`read_decision_log`'s (``fields`` as there; by default
    the learner's) and the rewards equal :func:`read_rewards`'s, except that the stream counts no
    orphans (``n_orphan`` is 0: an event whose decision is in no chunk read so far may belong to a
    later one). Each chunk's events are found through the feedback's request-id index, so a chunk's
    join costs what its own events cost. A caller that stops early (closes the iterator) gets every
    connection back and no thread left running once the chunk being read is done.

    Raises
    ------
    ValueError
        When ``chunk_size`` is not an integer in [1, 20000] (each chunk's ids are bound as query
        parameters), or as :func:`read_decision_log`.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 1 <= chunk_size <= 20_000:
        raise ValueError(f"chunk_size must be an integer in [1, 20000]; got {chunk_size!r}")
    names, cand_type = _candidate_type(fields, False)
    default = config.learning.default_reward
    served, decisions_since = _serving_since(db, since)
    if not served:
        return
    chunks = _decision_chunks(db, config, decisions_since, until, config_version, names, cand_type, chunk_size)
    ready: queue.Queue[Any] = queue.Queue(maxsize=READ_AHEAD)
    stop = threading.Event()
    with ThreadPoolExecutor(1, thread_name_prefix="reward-join") as joiner:

        def offer(item: Any) -> bool:
            """Put ``item`` for the caller unless it stopped reading; whether it was put."""
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            # the reader thread alone advances `chunks` (and so holds its connection, given back here)
            try:
                for dlog in chunks:
                    if not offer((dlog, joiner.submit(_chunk_reward_rows, db, config, dlog.request_id, since))):
                        return
                offer(_DONE)
            except BaseException as exc:  # handed to the caller, raised there
                offer(exc)
            finally:
                chunks.close()

        reader = threading.Thread(target=read, name="log-read", daemon=True)
        reader.start()
        try:
            while (item := ready.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                dlog, joined = item
                yield dlog, joined.result().rewards(dlog, default)
        finally:
            stop.set()
            reader.join()


def _empty(config: HomepageConfig) -> DecisionLog:
    z = np.zeros(0)
    S, K = config.slots, len(config.constraints)
    return DecisionLog(np.zeros(0, dtype=str), np.zeros(0, dtype=object), np.zeros(0, dtype=object), z,
                       np.zeros(0, dtype=np.int64), z, np.zeros(0, dtype=np.int64), np.zeros((0, 1), bool),
                       np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1, K)), np.zeros((0, 1, S)),
                       np.zeros((0, 1)), np.zeros((0, 1, S), dtype=np.int64), np.zeros((0, 1)), np.zeros((0, 0)), [], [],
                       [])
