"""Export the decision log to Parquet (one row per decision, its feedback nested), and read it back.

Schema of :func:`export_parquet` (one row per decision, ordered by ``ts``, ``request_id``):

=================  ===========================================  ========================================
column             Arrow type                                   meaning
=================  ===========================================  ========================================
request_id         string                                       decision id
ts                 timestamp[us, tz=UTC]                        decision time
user_id            string
policy             string                                       serving policy name
chosen             int64                                        index of the served candidate
propensity         double                                       ``pmf[chosen]`` as logged (``pscore``)
n_candidates       int32                                        ``n_cand`` of this decision
pmf                list<double>                                 (n_cand,) logged action distribution
cand_modules       list<list<int64>> or list<list<string>>      (n_cand, n_slots) module ids [#]_
cand_tilt          list<double>                                 (n_cand,) tilt level beta
cand_value         list<double>                                 (n_cand,) expected value v(u, l)
cand_score         list<double>                                 (n_cand,) dual-adjusted score
cand_exposure      list<list<double>>                           (n_cand, K) exposure vectors a(u, l)
fallback_reason    string (null = none)
context            string                                       JSON text of ``decisions.context``
versions           string                                       JSON text of ``decisions.versions``
layout             string                                       JSON text of the served layout
feedback           list<struct<event_id: string, slot: int32,   every feedback event with this
                   item_id: string, type: string, value:        request_id, in arrival order (late
                   double, ts: timestamp[us, tz=UTC]>>          events included; the reward window is
                                                                the reader's choice)
=================  ===========================================  ========================================

.. [#] int64 when the logged module ids are integers, string when they are names; fixed for a file
   by its first decision with candidates.

The file's schema metadata records ``homepage.since`` / ``homepage.until`` (ISO, or empty).
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy.engine import Connection, Engine

from ._db import json_dumps
from ._store import iter_decisions, read_feedback

__all__ = ["EXPORT_COLUMNS", "export_parquet", "read_parquet"]

_TS = pa.timestamp("us", tz="UTC")
_F64 = pa.float64()
_FEEDBACK_TYPE = pa.struct(
    [
        ("event_id", pa.string()),
        ("slot", pa.int32()),
        ("item_id", pa.string()),
        ("type", pa.string()),
        ("value", _F64),
        ("ts", _TS),
    ]
)
_JSON_COLUMNS = ("context", "versions", "layout")


def _schema(module_type: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            ("request_id", pa.string()),
            ("ts", _TS),
            ("user_id", pa.string()),
            ("policy", pa.string()),
            ("chosen", pa.int64()),
            ("propensity", _F64),
            ("n_candidates", pa.int32()),
            ("pmf", pa.list_(_F64)),
            ("cand_modules", pa.list_(pa.list_(module_type))),
            ("cand_tilt", pa.list_(_F64)),
            ("cand_value", pa.list_(_F64)),
            ("cand_score", pa.list_(_F64)),
            ("cand_exposure", pa.list_(pa.list_(_F64))),
            ("fallback_reason", pa.string()),
            ("context", pa.string()),
            ("versions", pa.string()),
            ("layout", pa.string()),
            ("feedback", pa.list_(_FEEDBACK_TYPE)),
        ]
    )


EXPORT_COLUMNS: tuple[str, ...] = tuple(_schema(pa.int64()).names)


def _module_type(candidates: pa.ListArray) -> pa.DataType | None:
    flat = candidates.flatten()
    if not pa.types.is_struct(flat.type) or flat.type.get_field_index("modules") < 0:
        return None
    inner = flat.type.field("modules").type
    if not pa.types.is_list(inner) or pa.types.is_null(inner.value_type):
        return None
    return pa.int64() if pa.types.is_integer(inner.value_type) else pa.string()


def _field(flat: pa.StructArray, name: str, typ: pa.DataType) -> pa.Array:
    if pa.types.is_struct(flat.type) and flat.type.get_field_index(name) >= 0:
        return flat.field(name).cast(typ)
    return pa.nulls(len(flat), typ)


def _ts(values: np.ndarray) -> pa.Array:
    return pa.array(values.astype("datetime64[us]"), type=pa.timestamp("us")).cast(_TS)


def _feedback_lists(request_ids: np.ndarray, fb: dict[str, Any]) -> pa.ListArray:
    """Group feedback rows under their decisions: list<struct> aligned with ``request_ids``."""
    n = len(request_ids)
    order = np.argsort(request_ids, kind="stable")
    sorted_ids = request_ids[order]
    pos = np.searchsorted(sorted_ids, fb["request_id"]) if len(fb["request_id"]) else np.zeros(0, int)
    owner = order[np.minimum(pos, max(n - 1, 0))] if n else np.zeros(0, int)
    perm = np.lexsort((fb["id"], owner))  # by decision, then arrival
    counts = np.bincount(owner, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    slot = fb["slot"][perm]
    value = fb["value"][perm]
    struct = pa.StructArray.from_arrays(
        [
            pa.array(fb["event_id"][perm], type=pa.string()),
            pa.array(slot, type=pa.int32(), mask=slot < 0),
            pa.array(fb["item_id"][perm], type=pa.string()),
            pa.array(fb["type"][perm], type=pa.string()),
            pa.array(value, type=_F64, mask=np.isnan(value)),
            _ts(fb["ts"][perm]),
        ],
        fields=list(_FEEDBACK_TYPE),
    )
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), struct)


def _batch(conn: Connection, cols: dict[str, Any], schema: pa.Schema) -> pa.RecordBatch:
    candidates = pa.array(cols["candidates"])
    offsets = candidates.offsets
    flat = candidates.flatten()
    module_type = schema.field("cand_modules").type.value_type.value_type
    modules = _field(flat, "modules", pa.list_(module_type))
    exposure = _field(flat, "exposure", pa.list_(_F64))

    def per_candidate(arr: pa.Array) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, arr)

    fb = read_feedback(
        conn,
        columns=["id", "event_id", "request_id", "slot", "item_id", "type", "value", "ts"],
        request_ids=cols["request_id"].tolist(),
    )
    arrays = {
        "request_id": pa.array(cols["request_id"], type=pa.string()),
        "ts": _ts(cols["ts"]),
        "user_id": pa.array(cols["user_id"], type=pa.string()),
        "policy": pa.array(cols["policy"], type=pa.string()),
        "chosen": pa.array(cols["chosen"], type=pa.int64()),
        "propensity": pa.array(cols["propensity"], type=_F64),
        "n_candidates": pc.list_value_length(candidates).cast(pa.int32()),
        "pmf": pa.array(cols["pmf"], type=pa.list_(_F64)),
        "cand_modules": per_candidate(modules),
        "cand_tilt": per_candidate(_field(flat, "tilt", _F64)),
        "cand_value": per_candidate(_field(flat, "value", _F64)),
        "cand_score": per_candidate(_field(flat, "score", _F64)),
        "cand_exposure": per_candidate(exposure),
        "fallback_reason": pa.array(cols["fallback_reason"], type=pa.string()),
        **{
            c: pa.array([None if v is None else json_dumps(v) for v in cols[c]], type=pa.string())
            for c in _JSON_COLUMNS
        },
        "feedback": _feedback_lists(cols["request_id"], fb),
    }
    return pa.RecordBatch.from_arrays([arrays[name] for name in schema.names], schema=schema)


def export_parquet(
    bind: Engine | Connection,
    path: str | os.PathLike[str],
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    chunk_size: int = 5000,
) -> int:
    """Write decisions with ``since <= ts < until`` and their feedback to a Parquet file.

    One row group per ``chunk_size`` decisions, so memory stays bounded on a large log. The file is
    written beside ``path`` and renamed into place, so a reader never sees half a file.
    See the module docstring for the schema. Returns the number of decisions written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {
        "homepage.since": "" if since is None else since.isoformat(),
        "homepage.until": "" if until is None else until.isoformat(),
    }
    columns = [
        "request_id", "ts", "user_id", "policy", "candidates", "pmf", "chosen", "propensity",
        "fallback_reason", "context", "versions", "layout",
    ]  # fmt: skip
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    pending: list[dict[str, Any]] = []
    total = 0
    conn_cm: AbstractContextManager[Connection] = bind.connect() if isinstance(bind, Engine) else nullcontext(bind)
    try:
        with conn_cm as conn:
            for cols in iter_decisions(conn, since, until, columns, chunk_size=chunk_size):
                if schema is None:
                    module_type = _module_type(pa.array(cols["candidates"]))
                    if module_type is None:  # no candidate modules seen yet: decide later
                        pending.append(cols)
                        continue
                    schema = _schema(module_type).with_metadata(meta)
                    writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                assert writer is not None
                for chunk in [*pending, cols]:
                    writer.write_batch(_batch(conn, chunk, schema))
                    total += len(chunk["request_id"])
                pending = []
            if schema is None:
                schema = _schema(pa.int64()).with_metadata(meta)
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                for chunk in pending:
                    writer.write_batch(_batch(conn, chunk, schema))
                    total += len(chunk["request_id"])
            assert writer is not None
            writer.close()
            writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return total


def read_parquet(path: str | os.PathLike[str], columns: list[str] | None = None) -> dict[str, Any]:
    """Read a file written by :func:`export_parquet` back into columns.

    Returns
    -------
    dict
        ``ts`` -> ``datetime64[us]`` (UTC); ``chosen``, ``n_candidates`` -> int64 arrays;
        ``propensity`` -> float64 array; strings -> object arrays; ``context``, ``versions`` and
        ``layout`` -> parsed JSON values (lists); list columns (``pmf``, ``cand_*``) -> nested Python
        lists; ``feedback`` -> per decision a list of dicts (``ts`` timezone-aware).
    """
    if columns is not None:
        bad = [c for c in columns if c not in EXPORT_COLUMNS]
        if bad:
            raise ValueError(f"columns must be among {EXPORT_COLUMNS}; got {bad!r}")
    table = pq.read_table(path, columns=columns)
    out: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name)
        typ = col.type
        if name in _JSON_COLUMNS:
            out[name] = [None if v is None else json.loads(v) for v in col.to_pylist()]
        elif pa.types.is_timestamp(typ):
            out[name] = col.cast(pa.timestamp("us")).to_numpy().astype("datetime64[us]")
        elif pa.types.is_integer(typ):
            out[name] = col.to_numpy().astype(np.int64)
        elif pa.types.is_floating(typ):
            out[name] = col.to_numpy().astype(np.float64)
        elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
            arr = np.empty(len(col), dtype=object)
            arr[:] = col.to_pylist()
            out[name] = arr
        else:
            out[name] = col.to_pylist()
    return out
