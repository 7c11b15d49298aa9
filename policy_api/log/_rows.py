"""Rows of the SQL log (decisions, feedback, catalog items): small functions over an Engine or a Connection.

Every function takes ``bind``: an :class:`~sqlalchemy.engine.Engine` (the function runs its own
transaction and commits) or a :class:`~sqlalchemy.engine.Connection` (it runs inside the caller's
transaction; the caller commits).

Batch inserts of decisions and feedback are idempotent (``INSERT ... ON CONFLICT DO NOTHING`` on
``decisions.request_id`` and ``feedback.event_id``), so replaying a spill file or a retried request
never duplicates a row. Bulk reads return columns (numpy arrays for numbers, strings and times; lists
for JSON values), fetched in chunks so a large log never materialises one Python object per row beyond
what the driver returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from ._schema import (
    IMPORT_POLICY,
    Bind,
    UTCDateTime,
    _json_default,
    begin,
    decisions,
    feedback,
    items,
    reading,
    utcnow,
)

__all__ = [
    "DECISION_COLUMNS",
    "FEEDBACK_COLUMNS",
    "N_CANDIDATES_KEY",
    "category_engagement",
    "decode_candidates",
    "encode_candidates",
    "item_engagement",
    "existing_event_ids",
    "feedback_first_seen",
    "insert_decisions",
    "insert_feedback",
    "insert_stored",
    "stored_timestamps",
    "iter_decisions",
    "load_items",
    "read_decisions",
    "read_feedback",
    "serving_began",
    "unpersonalised_since",
    "upsert_items",
    "write_decisions",
    "write_feedback",
]


DECISION_COLUMNS: tuple[str, ...] = tuple(c.name for c in decisions.columns)
FEEDBACK_COLUMNS: tuple[str, ...] = tuple(c.name for c in feedback.columns)
_IN_CHUNK = 900  # bound parameters per IN (...) query; far below SQLite's and psycopg's limits


def _insert(conn: Connection, table: sa.Table) -> Any:
    name = conn.dialect.name
    if name == "postgresql":
        return postgresql.insert(table)
    if name == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"dialect must be 'sqlite' or 'postgresql'; got {name!r}")


# ------------------------------------------------------------------------------- candidate encoding

#: key of the candidate count in the columnar form of ``decisions.candidates``
N_CANDIDATES_KEY = "$n"


def encode_candidates(candidates: Any) -> Any:
    """The stored form of ``decisions.candidates``: columnar when every candidate is a dict with the
    same keys, as given otherwise.

    The columnar form is one JSON object with one list per candidate field (``{"$n": n_cand,
    "modules": [[...], ...], "tilt": [...], ...}``, fields in the candidates' key order) instead of
    one object per candidate: the field names are written once, not once per candidate, and the
    database parses fewer objects. :func:`decode_candidates` restores the list of dicts exactly.
    An empty list, candidates with different keys, or a candidate with a ``"$n"`` field are stored
    as given (the original form, which every reader also takes).

    Examples
    --------
    >>> encode_candidates([{"modules": ["a", "b"], "value": 1.5}, {"modules": ["c", "a"], "value": 0.5}])
    {'$n': 2, 'modules': [['a', 'b'], ['c', 'a']], 'value': [1.5, 0.5]}
    >>> decode_candidates(encode_candidates([{"tilt": 0.0}, {"tilt": 1.0}]))
    [{'tilt': 0.0}, {'tilt': 1.0}]
    """
    if type(candidates) is not list or not candidates:
        return candidates
    if set(map(type, candidates)) != {dict}:
        return candidates
    keys = set(map(tuple, candidates))  # key tuples, in order: one when every candidate has the same
    if len(keys) != 1:
        return candidates
    names = keys.pop()
    if N_CANDIDATES_KEY in names:
        return candidates
    out: dict[str, Any] = {N_CANDIDATES_KEY: len(candidates)}
    out.update(zip(names, map(list, zip(*map(dict.values, candidates), strict=True)), strict=True))
    return out


def decode_candidates(stored: Any) -> Any:
    """Inverse of :func:`encode_candidates`: the list of candidate dicts from either stored form.

    Raises
    ------
    ValueError
        When a field of a columnar value does not hold one entry per candidate.
    """
    if type(stored) is not dict or N_CANDIDATES_KEY not in stored:
        return stored
    n = stored[N_CANDIDATES_KEY]
    names = [k for k in stored if k != N_CANDIDATES_KEY]
    for name in names:
        value = stored[name]
        if not isinstance(value, list) or len(value) != n:
            found = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
            raise ValueError(f"decisions.candidates field {name!r} must be a list of {n} entries (one per "
                             f"candidate); got {found}")
    if not names:
        return [{} for _ in range(n)]
    return [dict(zip(names, values, strict=True)) for values in zip(*(stored[k] for k in names), strict=True)]


# --------------------------------------------------------------------------------- decisions/feedback

_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
_DECISION_INSERT = DECISION_COLUMNS
_JSON_DECISION = frozenset(c.name for c in decisions.columns if isinstance(c.type, sa.JSON))
COPY_MIN_ROWS = 16  # PostgreSQL batches at least this large go through COPY


def _json_value(value: Any, table: str, column: str) -> str | None:
    if value is None:
        return None  # SQL NULL (none_as_null), as the JSON columns store None
    try:
        return orjson.dumps(value, default=_json_default, option=_JSON_OPTS).decode()
    except TypeError as exc:
        raise TypeError(f"{table}.{column} must be JSON-serialisable; got {exc}") from None


def _timestamp(value: Any, table: str, column: str, sqlite_text: bool) -> Any:
    """An aware datetime as the backend stores it: UTC wall-clock text on SQLite (the form
    :class:`UTCDateTime` writes), the datetime itself for PostgreSQL."""
    if value is None:
        return None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise ValueError(f"{table}.{column} must be a timezone-aware datetime; got {value!r}")
    if not sqlite_text:
        return value
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _decision_values(row: Mapping[str, Any], sqlite_text: bool) -> tuple[Any, ...]:
    """One ``decisions`` row as the tuple of its column values, JSON encoded (candidates columnar)."""
    get = row.get
    return (
        get("request_id"),
        _timestamp(get("ts"), "decisions", "ts", sqlite_text),
        get("user_id"),
        _json_value(get("context"), "decisions", "context"),
        _json_value(get("versions"), "decisions", "versions"),
        get("policy"),
        _json_value(encode_candidates(get("candidates")), "decisions", "candidates"),
        _json_value(get("pmf"), "decisions", "pmf"),
        _scalar(get("chosen")),
        _scalar(get("propensity")),
        _json_value(get("layout"), "decisions", "layout"),
        get("fallback_reason"),
    )


_FEEDBACK_INSERT = tuple(c for c in FEEDBACK_COLUMNS if c != "id")


def _feedback_values(row: Mapping[str, Any], now: datetime, sqlite_text: bool) -> tuple[Any, ...]:
    get = row.get
    received = get("received_at")
    if received is None:
        received = now
    ts = get("ts")
    if ts is None:
        ts = received
    return (get("event_id"), get("request_id"), _scalar(get("slot")), get("item_id"), get("type"),
            _scalar(get("value")), _timestamp(ts, "feedback", "ts", sqlite_text),
            _timestamp(received, "feedback", "received_at", sqlite_text))


_UNIQUE_VIOLATION = "23505"


def _copy_insert(conn: Connection, table: sa.Table, columns: Sequence[str], values: list[tuple[Any, ...]],
                 key: str) -> None:
    """PostgreSQL: ``COPY`` the rows straight into ``table`` inside a savepoint; when one of them is
    already stored (a replayed batch: COPY cannot skip duplicates), roll back to the savepoint and
    ``COPY`` into a temporary table shaped like ``table`` (emptied at commit), then ``INSERT ...
    SELECT ... ON CONFLICT (key) DO NOTHING``. Several times fewer round trips and less parsing than
    an executemany of INSERTs; the rows are written once unless the batch holds a duplicate."""
    names = ", ".join(f'"{c}"' for c in columns)
    dbapi = conn.connection.driver_connection
    assert dbapi is not None
    with dbapi.cursor() as cur:
        try:
            with dbapi.transaction(), cur.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
                for row in values:
                    copy.write_row(row)
            return
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != _UNIQUE_VIOLATION:
                raise
        tmp = f"_copy_{table.name}"
        cur.execute(f'CREATE TEMP TABLE IF NOT EXISTS "{tmp}" ON COMMIT DELETE ROWS AS '
                    f'SELECT {names} FROM "{table.name}" WITH NO DATA')
        with cur.copy(f'COPY "{tmp}" ({names}) FROM STDIN') as copy:
            for row in values:
                copy.write_row(row)
        cur.execute(f'INSERT INTO "{table.name}" ({names}) SELECT {names} FROM "{tmp}" '
                    f'ON CONFLICT ("{key}") DO NOTHING')
        cur.execute(f'TRUNCATE "{tmp}"')  # several batches may share one transaction


def _write(conn: Connection, table: sa.Table, columns: Sequence[str], values: list[tuple[Any, ...]],
           key: str) -> None:
    name = conn.dialect.name
    if name == "postgresql" and len(values) >= COPY_MIN_ROWS:
        _copy_insert(conn, table, columns, values, key)
        return
    if name not in ("sqlite", "postgresql"):
        raise ValueError(f"dialect must be 'sqlite' or 'postgresql'; got {name!r}")
    mark = "?" if name == "sqlite" else "%s"
    names = ", ".join(f'"{c}"' for c in columns)
    conn.exec_driver_sql(f'INSERT INTO "{table.name}" ({names}) VALUES ({", ".join([mark] * len(columns))}) '
                         f'ON CONFLICT ("{key}") DO NOTHING', values)


def write_decisions(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert decision rows on an open connection (the caller's transaction), idempotently.

    The JSON columns are encoded here, once per row (orjson; ``candidates`` in the columnar form of
    :func:`encode_candidates`), and the rows go to the driver as tuples: an executemany on SQLite,
    ``COPY`` on PostgreSQL for batches of ``COPY_MIN_ROWS`` or more. Keys other than the columns are
    ignored. Returns the number of rows sent.

    Raises
    ------
    ValueError, TypeError
        For a value that cannot be stored (a naive timestamp, a value JSON cannot hold), naming the
        column; the database raises for a missing required column.
    """
    if not rows:
        return 0
    sqlite_text = conn.dialect.name == "sqlite"
    _write(conn, decisions, _DECISION_INSERT, [_decision_values(r, sqlite_text) for r in rows], "request_id")
    return len(rows)


def write_feedback(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert feedback rows on an open connection, idempotently (as :func:`write_decisions`).

    Missing ``received_at`` is now; missing ``ts`` (event time) is ``received_at``.
    """
    if not rows:
        return 0
    now = utcnow()
    sqlite_text = conn.dialect.name == "sqlite"
    _write(conn, feedback, _FEEDBACK_INSERT, [_feedback_values(r, now, sqlite_text) for r in rows], "event_id")
    return len(rows)


#: SQLite's page cache while :func:`insert_stored` writes (KiB; the connection's own setting after)
IMPORT_CACHE_KIB = 262_144


def stored_timestamps(epoch: np.ndarray, dialect: str) -> list[Any]:
    """Epoch seconds as a timestamp column stores them (what :func:`write_decisions` and
    :func:`write_feedback` send for aware datetimes of those instants, to the microsecond): UTC
    wall-clock text on SQLite, converted in one vectorised step; aware datetimes for PostgreSQL."""
    t = np.asarray(epoch, dtype=np.float64)
    if not np.isfinite(t).all():
        raise ValueError("timestamps must be finite epoch seconds")
    whole = np.floor(t)
    micros = whole.astype(np.int64) * 1_000_000 + np.round((t - whole) * 1e6).astype(np.int64)
    if dialect != "sqlite":
        return [datetime.fromtimestamp(us / 1e6, tz=UTC) for us in micros.tolist()]
    text = np.datetime_as_string(micros.astype("datetime64[us]"), unit="us")
    return np.char.replace(text, "T", " ").tolist()


def insert_stored(bind: Bind, table: str, values: Sequence[tuple[Any, ...]], *, batch: int = 50_000,
                  progress: Callable[[int], None] | None = None) -> int:
    """Insert rows given as the tuples :func:`write_decisions` / :func:`write_feedback` hand the
    driver: ``table`` "decisions" (:data:`DECISION_COLUMNS` order) or "feedback" (its columns but
    ``id``), JSON columns as encoded text, timestamps as :func:`stored_timestamps` gives them. For
    callers that build many rows column-wise (an imported history): the per-row dicts and their
    encoding are skipped. Idempotent like the two; one transaction per ``batch`` rows, after each of
    which ``progress(rows)`` is called with the rows it sent. Returns the number of rows sent."""
    spec = {"decisions": (decisions, _DECISION_INSERT, "request_id"),
            "feedback": (feedback, _FEEDBACK_INSERT, "event_id")}
    if table not in spec:
        raise ValueError(f"table must be one of {sorted(spec)}; got {table!r}")
    tbl, columns, key = spec[table]
    own = not isinstance(bind, Connection)  # else the caller's transaction, committed by the caller
    with (bind.connect() if not isinstance(bind, Connection) else nullcontext(bind)) as conn:
        raw = conn.connection.driver_connection if conn.dialect.name == "sqlite" else None
        if raw is not None:  # the indexes of random keys (ids are hashes) stay in memory while the rows go in
            before = int(raw.execute("PRAGMA cache_size").fetchone()[0])
            raw.execute(f"PRAGMA cache_size=-{IMPORT_CACHE_KIB}")
        try:
            for k in range(0, len(values), batch):
                with conn.begin() if own else nullcontext():
                    _write(conn, tbl, columns, list(values[k:k + batch]), key)
                if progress is not None:
                    progress(min(batch, len(values) - k))
        finally:
            if raw is not None:
                raw.execute(f"PRAGMA cache_size={before}")
    return len(values)


def insert_decisions(bind: Bind, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert decision rows (dicts keyed by column name) in one transaction; duplicates (by
    ``request_id``) are skipped. See :func:`write_decisions`.

    Returns the number of rows sent (duplicates included).
    """
    batch = list(rows)
    if batch:
        with begin(bind) as conn:
            write_decisions(conn, batch)
    return len(batch)


def insert_feedback(bind: Bind, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert feedback rows; an ``event_id`` already stored is skipped (idempotent replays).

    Missing ``received_at`` is now; missing ``ts`` (event time) is ``received_at``.
    Returns the number of rows sent (duplicates included).
    """
    batch = list(rows)
    if batch:
        with begin(bind) as conn:
            write_feedback(conn, batch)
    return len(batch)


def existing_event_ids(bind: Bind, ids: Iterable[str]) -> set[str]:
    """The subset of ``ids`` already stored in ``feedback.event_id``."""
    wanted = list(dict.fromkeys(ids))
    found: set[str] = set()
    with reading(bind) as conn:
        for i in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[i : i + _IN_CHUNK]
            res = conn.execute(sa.select(feedback.c.event_id).where(feedback.c.event_id.in_(chunk)))
            found.update(res.scalars())
    return found


def serving_began(bind: Bind) -> datetime | None:
    """When serving made its first logged decision; None before any.

    Imported history (``policy = "import"``, ``homepage import``) is not serving: its rows carry the
    interactions' own times, often years before the catalog was loaded, and no candidates. Read as a
    loose scan of the ``(policy, ts)`` index: one seek for each distinct policy and one for its first
    decision, however many rows the log holds. Every decision logged before this time is an import,
    so the readers of serving decisions start here (a learner on a log of millions of imported
    interactions reads none of them)."""
    first: list[Any] = []
    p: sa.BindParameter[str] = sa.bindparam("p", type_=sa.String())
    next_policy = sa.select(sa.func.min(decisions.c.policy)).where(decisions.c.policy > p)
    first_of = sa.select(sa.func.min(decisions.c.ts)).where(decisions.c.policy == p)
    with reading(bind) as conn:
        policy: str | None = ""
        while (policy := conn.execute(next_policy, {"p": policy}).scalar()) is not None:
            if policy != IMPORT_POLICY:
                first.append(conn.execute(first_of, {"p": policy}).scalar())
    got = [t for t in first if t is not None]
    return min(got) if got else None


def _time_column(conn: Connection, col: sa.Column[Any]) -> sa.ColumnElement[Any]:
    # Raw UTC wall clock, parsed by numpy in one call instead of one aware datetime per row.
    if conn.dialect.name == "postgresql":
        return sa.func.timezone("UTC", col).label(col.name)
    return sa.type_coerce(col, sa.String()).label(col.name)


def _to_column(values: list[Any], col: sa.Column[Any]) -> Any:
    if isinstance(col.type, UTCDateTime):
        return np.array(values, dtype="datetime64[us]")
    if isinstance(col.type, sa.Integer):
        if col.nullable:
            return np.array([-1 if v is None else v for v in values], dtype=np.int64)
        return np.array(values, dtype=np.int64)
    if isinstance(col.type, sa.Float):
        return np.array(values, dtype=np.float64)  # None -> nan
    if isinstance(col.type, sa.String):
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return values  # JSON: the parsed values, as the driver returns them


def _json_text(conn: Connection, col: sa.Column[Any]) -> sa.ColumnElement[Any]:
    # The stored JSON as text, unparsed (jsonb::text on PostgreSQL).
    if conn.dialect.name == "postgresql":
        return sa.cast(col, sa.Text()).label(col.name)
    return sa.type_coerce(col, sa.Text()).label(col.name)


def _iter_columns(
    conn: Connection,
    table: sa.Table,
    columns: Sequence[str],
    where: list[sa.ColumnElement[bool]],
    order_by: Sequence[sa.Column[Any]],
    chunk_size: int,
    raw_json: bool = False,
) -> Iterator[dict[str, Any]]:
    cols = [table.c[c] for c in columns]
    select_cols: list[sa.ColumnElement[Any]] = []
    for c in cols:
        if isinstance(c.type, UTCDateTime):
            select_cols.append(_time_column(conn, c))
        elif raw_json and isinstance(c.type, sa.JSON):
            select_cols.append(_json_text(conn, c))
        else:
            select_cols.append(c)
    stmt = sa.select(*select_cols).where(*where).order_by(*order_by)
    result = conn.execution_options(yield_per=chunk_size).execute(stmt)
    try:
        for part in result.partitions():
            transposed = list(zip(*part, strict=True))
            chunk = {c.name: _to_column(list(transposed[j]), c) for j, c in enumerate(cols)}
            if table is decisions and not raw_json and "candidates" in chunk:
                chunk["candidates"] = [decode_candidates(v) for v in chunk["candidates"]]
            yield chunk
    finally:
        result.close()


def _concat(chunks: list[dict[str, Any]], table: sa.Table, columns: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in columns:
        parts = [ch[c] for ch in chunks]
        empty = _to_column([], table.c[c])
        if isinstance(empty, np.ndarray):
            out[c] = np.concatenate([empty, *parts])
        else:
            out[c] = [v for p in parts for v in p]
    return out


def _read_columns(
    conn: Connection,
    table: sa.Table,
    columns: Sequence[str],
    where: list[sa.ColumnElement[bool]],
    order_by: Sequence[sa.Column[Any]],
    chunk_size: int,
) -> dict[str, Any]:
    return _concat(list(_iter_columns(conn, table, columns, where, order_by, chunk_size)), table, columns)


def _check_columns(columns: Sequence[str] | None, allowed: tuple[str, ...], table: str) -> list[str]:
    if columns is None:
        return list(allowed)
    bad = [c for c in columns if c not in allowed]
    if bad:
        raise ValueError(f"columns must be among {table} columns {allowed}; got {bad!r}")
    return list(columns)


def _check_chunk(chunk_size: int) -> None:
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1; got {chunk_size!r}")


def _decision_filter(since: datetime | None, until: datetime | None) -> list[sa.ColumnElement[bool]]:
    where = []
    if since is not None:
        where.append(decisions.c.ts >= since)
    if until is not None:
        where.append(decisions.c.ts < until)
    return where


def iter_decisions(
    conn: Connection,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: Sequence[str] | None = None,
    *,
    chunk_size: int = 10_000,
    raw_json: bool = False,
) -> Iterator[dict[str, Any]]:
    """:func:`read_decisions` one chunk (at most ``chunk_size`` rows) at a time, on an open connection.

    With ``raw_json`` the JSON columns come back as their JSON text (``str`` or None), unparsed
    (``candidates`` then in either stored form: see :func:`encode_candidates`).
    """
    cols = _check_columns(columns, DECISION_COLUMNS, "decisions")
    _check_chunk(chunk_size)
    order = [decisions.c.ts, decisions.c.request_id]
    return _iter_columns(conn, decisions, cols, _decision_filter(since, until), order, chunk_size, raw_json)


def read_decisions(
    bind: Bind,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: Sequence[str] | None = None,
    *,
    chunk_size: int = 10_000,
) -> dict[str, Any]:
    """Decisions with ``since <= ts < until``, ordered by (ts, request_id), as columns.

    Returns
    -------
    dict
        One entry per requested column (default: all, in table order), each of length ``n_rounds``:
        ``ts`` -> ``datetime64[us]`` (UTC); ``chosen`` -> int64; ``propensity`` -> float64;
        strings -> object arrays (``None`` where NULL); JSON columns (``context``, ``versions``,
        ``candidates``, ``pmf``, ``layout``) -> lists of the parsed values (``candidates`` as one
        dict per candidate, whichever form it is stored in).
        Rows are fetched ``chunk_size`` at a time (a server-side cursor on PostgreSQL).
    """
    cols = _check_columns(columns, DECISION_COLUMNS, "decisions")
    with reading(bind) as conn:
        return _concat(list(iter_decisions(conn, since, until, cols, chunk_size=chunk_size)), decisions, cols)


def read_feedback(
    bind: Bind,
    since: datetime | None = None,
    until: datetime | None = None,
    columns: Sequence[str] | None = None,
    *,
    request_ids: Iterable[str] | None = None,
    exclude_types: Sequence[str] = (),
    chunk_size: int = 10_000,
) -> dict[str, Any]:
    """Feedback with event time ``since <= ts < until`` (and ``request_id`` in ``request_ids`` when
    given; ``type`` not in ``exclude_types``), ordered by ``id`` (arrival order), as columns.

    ``slot`` is int64 with -1 where NULL; ``value`` float64 with NaN where NULL; ``ts`` and
    ``received_at`` are ``datetime64[us]`` (UTC); strings are object arrays.
    """
    cols = _check_columns(columns, FEEDBACK_COLUMNS, "feedback")
    _check_chunk(chunk_size)
    where: list[sa.ColumnElement[bool]] = []
    if since is not None:
        where.append(feedback.c.ts >= since)
    if until is not None:
        where.append(feedback.c.ts < until)
    if exclude_types:
        where.append(feedback.c.type.not_in(list(exclude_types)))
    with reading(bind) as conn:
        if request_ids is None:
            return _read_columns(conn, feedback, cols, where, [feedback.c.id], chunk_size)
        ids = list(dict.fromkeys(request_ids))
        order = cols if "id" in cols else [*cols, "id"]
        parts = [
            _read_columns(
                conn,
                feedback,
                order,
                [*where, feedback.c.request_id.in_(ids[i : i + _IN_CHUNK])],
                [feedback.c.id],
                chunk_size,
            )
            for i in range(0, len(ids), _IN_CHUNK)
        ]
    merged = _concat(parts, feedback, order)
    by_id = np.argsort(merged["id"], kind="stable")
    return {c: merged[c][by_id] for c in cols}


def feedback_first_seen(bind: Bind, since: datetime | None = None, until: datetime | None = None) -> dict[str, Any]:
    """Per request id with feedback in ``since <= ts < until``: the time of its first event.

    One aggregate query, so a reward join need not fetch every impression event to know which
    decisions got any feedback. ``ts`` is ``datetime64[us]`` (UTC).
    """
    where: list[sa.ColumnElement[bool]] = []
    if since is not None:
        where.append(feedback.c.ts >= since)
    if until is not None:
        where.append(feedback.c.ts < until)
    first = sa.func.min(feedback.c.ts)
    with reading(bind) as conn:
        ts_col = sa.func.timezone("UTC", first) if conn.dialect.name == "postgresql" else sa.type_coerce(first, sa.String())
        rows = conn.execute(sa.select(feedback.c.request_id, ts_col).where(*where).group_by(feedback.c.request_id)).all()
    ids = np.empty(len(rows), dtype=object)
    ids[:] = [r[0] for r in rows]
    return {"request_id": ids, "ts": np.array([r[1] for r in rows], dtype="datetime64[us]")}


# ------------------------------------------------------------------------------------------- catalog


def upsert_items(bind: Bind, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert or update catalog items (``item_id``, ``category``, ``popularity``, ``features``).

    ``features`` is a list of floats (or a 1-d array); ``updated_at`` defaults to now, and so does
    ``added_at`` for an item not in the catalog yet (an update keeps the item's ``added_at``).
    Returns the number of rows sent.
    """
    now = utcnow()
    batch = []
    for r in rows:
        row = {c.name: r.get(c.name) for c in items.columns}
        if row["updated_at"] is None:
            row["updated_at"] = now
        if row["added_at"] is None:
            row["added_at"] = row["updated_at"]
        batch.append(row)
    if batch:
        with begin(bind) as conn:
            stmt = _insert(conn, items)
            stmt = stmt.on_conflict_do_update(
                index_elements=["item_id"],
                set_={c: stmt.excluded[c] for c in ("category", "popularity", "features", "updated_at")},
            )
            conn.execute(stmt, batch)
    return len(batch)


def load_items(bind: Bind) -> dict[str, Any]:
    """The catalog ordered by ``item_id``, as arrays.

    Returns
    -------
    dict
        ``item_ids`` (n_items,) object, ``category`` (n_items,) object, ``popularity`` (n_items,)
        float64, ``features`` (n_items, n_features) float64 (``n_features = 0`` when no item has
        features), ``updated_at`` and ``added_at`` (n_items,) datetime64[us] UTC (``added_at`` NaT for
        items loaded before it was recorded).

    Raises
    ------
    ValueError
        When items have feature vectors of different lengths.
    """
    with reading(bind) as conn:
        cols = _read_columns(
            conn,
            items,
            ["item_id", "category", "popularity", "features", "updated_at", "added_at"],
            [],
            [items.c.item_id],
            10_000,
        )
    feats = cols["features"]
    lengths = {len(f) for f in feats if f is not None}
    if len(lengths) > 1 or (lengths and any(f is None for f in feats)):
        sizes = sorted({-1 if f is None else len(f) for f in feats})
        raise ValueError(f"items.features must have one length for every item; got lengths {sizes}")
    n_features = lengths.pop() if lengths else 0
    features = np.array(feats, dtype=np.float64).reshape(len(feats), n_features) if n_features else np.zeros((len(feats), 0))
    return {
        "item_ids": cols["item_id"],
        "category": cols["category"],
        "popularity": cols["popularity"],
        "features": features,
        "updated_at": cols["updated_at"],
        "added_at": cols["added_at"],
    }


def _unpersonalised() -> sa.ColumnElement[bool]:
    """The condition that a decision was served without a personal live state (the user's first
    requests, a state that could not be read, imported history): the page such a user saw was not
    chosen for that user's tastes."""
    live = decisions.c.context["live"].as_string()
    return sa.or_(live.is_(None), live != "hit")


#: decisions per query of :func:`unpersonalised_since`'s walk (and its ids bound per IN list)
_WALK = _IN_CHUNK
#: the most unpersonalised decisions the walk goes back through: a log whose client reports little or
#: no feedback would otherwise be read whole at every look
_WALK_MAX = 100_000


def unpersonalised_since(bind: Bind, n: int, since: datetime | None = None) -> datetime | None:
    """The decision time from which the most recent unpersonalised decisions (made at or after
    ``since``) hold ``n`` feedback events (at or after ``since``): ``since`` itself when they hold no
    more than ``n``.

    The walk goes back through the decisions, newest first, a few hundred at a time, counting each
    one's feedback through the feedback's request-id index; it reads the decisions of the window and
    the feedback of its unpersonalised ones, never the feedback of the personal pages in between
    (most of the log, once most users have a live state). It goes back through at most
    :data:`_WALK_MAX` unpersonalised decisions: when they hold fewer than ``n`` events, the window
    starts at the oldest of them.
    """
    if n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}")
    total = walked = 0
    after: tuple[Any, Any] | None = None
    with reading(bind) as conn:
        while True:
            q = sa.select(decisions.c.request_id, decisions.c.ts).where(_unpersonalised())
            if since is not None:
                q = q.where(decisions.c.ts >= since)
            if after is not None:  # keyset: strictly older than the last decision seen; the bound on ts
                # alone lets the planner walk the ts index down from there (with the OR alone, SQLite
                # gathered every older decision and sorted them, for every chunk of the walk)
                q = q.where(decisions.c.ts <= after[1],
                            sa.or_(decisions.c.ts < after[1], decisions.c.request_id < after[0]))
            rows = conn.execute(q.order_by(decisions.c.ts.desc(), decisions.c.request_id.desc()).limit(_WALK)).all()
            if not rows:
                return since
            mine = sa.select(feedback.c.request_id, sa.func.count()).where(
                feedback.c.request_id.in_([r[0] for r in rows]),
                *([] if since is None else [feedback.c.ts >= since]))
            counts: dict[str, int] = {str(r[0]): int(r[1]) for r in conn.execute(mine.group_by(feedback.c.request_id))}
            for rid, ts in rows:
                total += counts.get(rid, 0)
                walked += 1
                if total >= n or walked >= _WALK_MAX:
                    return ts if since is None or ts > since else since
            after = (rows[-1][0], rows[-1][1])


def recent_since(bind: Bind, n: int, since: datetime | None = None) -> datetime | None:
    """The time from which the most recent ``n`` feedback events (after ``since``) start: ``since``
    itself when there are no more than ``n`` of them. One indexed query."""
    if n < 1:
        raise ValueError(f"n must be an int >= 1; got {n!r}")
    q = sa.select(feedback.c.ts).order_by(feedback.c.ts.desc()).limit(1).offset(n - 1)
    if since is not None:
        q = q.where(feedback.c.ts >= since)
    with reading(bind) as conn:
        cut = conn.execute(q).scalar()
    if cut is None:
        return since
    return cut if since is None or cut > since else since


def item_engagement(bind: Bind, events: Mapping[str, float], since: datetime | None = None,
                    position_weights: Sequence[float] | None = None, max_events: int | None = None, *,
                    unpersonalised: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item with feedback since ``since`` (and among the last ``max_events`` feedback events, when
    given): item ids, engagement units and examined impressions (weighted by slot as in
    :func:`category_engagement`). One aggregate query (by item, type, slot).

    With ``unpersonalised``, only the feedback of decisions served without a personal live state (the
    user's first requests, users whose state could not be read, imported history): what a category
    earns when it is shown to users not picked for liking it. Over all traffic, a niche category is
    shown mostly to the users who like it, and its rate says far more than a new user would give it.
    The window is then that of the most recent such decisions holding ``max_events`` events
    (:func:`unpersonalised_since`), made at or after ``since``; the query starts from those decisions
    and reaches their feedback through its request-id index. Feedback without a decision row is not
    theirs.
    """
    if unpersonalised:
        cut = since if max_events is None else unpersonalised_since(bind, max_events, since)
        where = [_unpersonalised(), *([] if cut is None else [decisions.c.ts >= cut]),
                 *([] if since is None else [feedback.c.ts >= since])]
        q = (sa.select(feedback.c.item_id, feedback.c.type, feedback.c.slot, sa.func.count())
             .select_from(decisions.join(feedback, feedback.c.request_id == decisions.c.request_id)))
    else:
        if max_events is not None:
            since = recent_since(bind, max_events, since)
        where = [] if since is None else [feedback.c.ts >= since]
        q = sa.select(feedback.c.item_id, feedback.c.type, feedback.c.slot, sa.func.count())
    q = q.where(*where).group_by(feedback.c.item_id, feedback.c.type, feedback.c.slot)
    with reading(bind) as conn:
        rows = conn.execute(q).all()
    if not rows:
        return np.zeros(0, dtype=object), np.zeros(0), np.zeros(0)
    ids = np.array([str(r[0]) for r in rows], dtype=object)
    kind = np.array([str(r[1]) for r in rows], dtype=object)
    slot = np.array([-1 if r[2] is None else int(r[2]) for r in rows], dtype=np.int64)
    n = np.array([int(r[3]) for r in rows], dtype=np.float64)
    imp = kind == "impression"
    weight = np.ones(slot.size)
    if position_weights is not None:
        w = np.asarray(position_weights, dtype=np.float64)
        w = w / w.mean()
        ok = (slot >= 0) & (slot < w.size)
        weight[ok] = w[slot[ok]]
    unit = np.array([float(events.get(k, 0.0)) for k in kind.tolist()])
    uniq, inv = np.unique(ids.astype(str), return_inverse=True)
    units = np.bincount(inv, weights=np.where(imp, 0.0, unit * n), minlength=uniq.size)
    imps = np.bincount(inv, weights=np.where(imp, weight * n, 0.0), minlength=uniq.size)
    return uniq.astype(object), units, imps


def category_engagement(bind: Bind, events: Mapping[str, float], since: datetime | None = None,
                        position_weights: Sequence[float] | None = None) -> dict[str, tuple[float, float]]:
    """Per catalog category, over feedback with ``ts >= since``: engagement units (each event type
    weighted by ``events``; impressions weigh 0) and the impressions.

    With ``position_weights`` (one per slot) an impression counts as its slot's weight relative to the
    mean weight, i.e. impressions are counted as *examined* impressions: a category shown only in low
    slots is not judged less engaging for being seen less (without this its low rate would keep it in
    low slots). An impression without a slot, or with one out of range, counts 1.

    One aggregate query (feedback joined to the catalog by item id).
    """
    where = [] if since is None else [feedback.c.ts >= since]
    q = (sa.select(items.c.category, feedback.c.type, feedback.c.slot, sa.func.count())
         .select_from(feedback.join(items, items.c.item_id == feedback.c.item_id))
         .where(*where).group_by(items.c.category, feedback.c.type, feedback.c.slot))
    w = None if position_weights is None else np.asarray(position_weights, dtype=np.float64)
    if w is not None:
        w = w / w.mean()
    out: dict[str, tuple[float, float]] = {}
    with reading(bind) as conn:
        for cat, kind, slot, n in conn.execute(q):
            units, imps = out.get(str(cat), (0.0, 0.0))
            if kind == "impression":
                weight = 1.0 if w is None or slot is None or not 0 <= int(slot) < w.size else float(w[int(slot)])
                imps += weight * int(n)
            else:
                units += float(events.get(str(kind), 0.0)) * int(n)
            out[str(cat)] = (units, imps)
    return out
