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
cand_categories    list<list<string>>                           (n_cand, n_slots) category per slot [#]_
cand_engagement    list<list<double>>                           (n_cand, n_slots) slot engagement [#]_
cand_tail          list<double>                                 (n_cand,) long-tail share [#]_
fallback_reason    string (null = none)
context            string                                       JSON text of ``decisions.context``
versions           string                                       JSON text of ``decisions.versions``
layout             string                                       JSON text of the served layout
feedback           list<struct<event_id: string, slot: int32,   every feedback event with this
                   item_id: string, type: string, value:        request_id, in arrival order (late
                   double, ts: timestamp[us, tz=UTC]>>          events included; the reward window is
                                                                the reader's choice)
reward             double (null = not computed)                 only with ``rewards``: the decision's
                                                                reward under a config (its event
                                                                weights, values and reward window) [#]_
exposure           struct<{constraint name}: double>            only with ``exposure_names``: the
                                                                served layout's exposure, by name
                                                                (null when its vector has another
                                                                length)
=================  ===========================================  ========================================

.. [#] int64 when the logged module ids are integers, string when they are names; fixed for a file
   by its first decision with candidates.
.. [#] Optional candidate fields (the engine logs them): null for a decision none of whose
   candidates carries the field.
.. [#] ``homepage log export`` computes it under the active config for the decisions made under it
   and records ``homepage.reward_config_version`` and ``homepage.reward_window_s`` in the metadata.

``context``, ``versions`` and ``layout`` hold the stored JSON text as is (compact on SQLite,
``jsonb``'s text form on PostgreSQL); :func:`read_parquet` parses them. Other candidate fields stay
in the database only.

The file's schema metadata records ``homepage.since`` / ``homepage.until`` (ISO, or empty).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson
import pyarrow.parquet as pq
from sqlalchemy.engine import Connection, Engine

from ._bulk import candidate_lists
from ._rows import iter_decisions, read_feedback

__all__ = ["EXPORT_COLUMNS", "OPTIONAL_EXPORT_COLUMNS", "export_parquet", "read_parquet"]

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
_OPTIONAL_FIELDS = {"categories": pa.list_(pa.string()), "engagement": pa.list_(_F64), "tail": _F64}


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
            ("cand_categories", pa.list_(pa.list_(pa.string()))),
            ("cand_engagement", pa.list_(pa.list_(_F64))),
            ("cand_tail", pa.list_(_F64)),
            ("fallback_reason", pa.string()),
            ("context", pa.string()),
            ("versions", pa.string()),
            ("layout", pa.string()),
            ("feedback", pa.list_(_FEEDBACK_TYPE)),
        ]
    )


EXPORT_COLUMNS: tuple[str, ...] = tuple(_schema(pa.int64()).names)
#: columns written only when asked for (see :func:`export_parquet`)
OPTIONAL_EXPORT_COLUMNS: tuple[str, ...] = ("reward", "exposure")


def _with_optional(schema: pa.Schema, rewards: bool, exposure_names: Sequence[str] | None) -> pa.Schema:
    if rewards:
        schema = schema.append(pa.field("reward", _F64))
    if exposure_names is not None:
        schema = schema.append(pa.field("exposure", pa.struct([(n, _F64) for n in exposure_names])))
    return schema


def _module_type(candidates_text: list[str]) -> pa.DataType | None:
    """int64 or string, from the first logged module id; None when no candidate has modules."""
    for text in candidates_text:
        for modules in _modules_of(json.loads(text)):
            if modules:
                return pa.int64() if isinstance(modules[0], int) else pa.string()
    return None


def _modules_of(stored: Any) -> list[Any]:
    """Each candidate's module list, from either stored form of ``decisions.candidates``."""
    if isinstance(stored, dict):  # columnar: {"$n": n, "modules": [[...], ...], ...}
        modules = stored.get("modules")
        return modules if isinstance(modules, list) else []
    return [c.get("modules") if isinstance(c, dict) else None for c in stored or []]


def _parse_candidates(cand_text: list[str], pmf_text: list[str], module_type: pa.DataType) -> pa.Table:
    """Parse candidates (either stored form) and pmf JSON text in Arrow's C++ JSON reader (no Python
    object per value). Candidate fields other than those exported are ignored.
    """
    cand = pa.struct(
        [
            ("modules", pa.list_(module_type)),
            ("tilt", _F64),
            ("value", _F64),
            ("exposure", pa.list_(_F64)),
            ("score", _F64),
            *_OPTIONAL_FIELDS.items(),
        ]
    )
    lines = [f'{{"p":{p}}}' for p in pmf_text]
    data = "\n".join(lines).encode("utf-8")
    longest = max((len(x) for x in lines), default=0)
    pmf = pajson.read_json(
        io.BytesIO(data),
        read_options=pajson.ReadOptions(block_size=max(1 << 22, 4 * longest)),
        parse_options=pajson.ParseOptions(explicit_schema=pa.schema([("p", pa.list_(_F64))])),
    )
    return pa.table({"c": candidate_lists(cand_text, cand), "p": pmf.column("p")})


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


def _batch(conn: Connection, cols: dict[str, Any], schema: pa.Schema,
           rewards: tuple[np.ndarray, np.ndarray] | None = None) -> pa.RecordBatch:
    module_type = schema.field("cand_modules").type.value_type.value_type
    parsed = _parse_candidates(cols["candidates"], cols["pmf"], module_type)
    candidates = parsed.column("c").combine_chunks()
    offsets, flat = candidates.offsets, candidates.flatten()

    def per_candidate(name: str) -> pa.ListArray:
        values = flat.field(name)
        if name not in _OPTIONAL_FIELDS:
            return pa.ListArray.from_arrays(offsets, values)
        # null for a decision none of whose candidates logged the field
        seen = np.concatenate([[0], np.cumsum(values.is_valid().to_numpy(zero_copy_only=False))])
        bounds = np.asarray(offsets)
        missing = seen[bounds[1:]] == seen[bounds[:-1]]
        return pa.ListArray.from_arrays(offsets, values, mask=pa.array(missing, type=pa.bool_()))

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
        "pmf": parsed.column("p").combine_chunks(),
        "cand_modules": per_candidate("modules"),
        "cand_tilt": per_candidate("tilt"),
        "cand_value": per_candidate("value"),
        "cand_score": per_candidate("score"),
        "cand_exposure": per_candidate("exposure"),
        "cand_categories": per_candidate("categories"),
        "cand_engagement": per_candidate("engagement"),
        "cand_tail": per_candidate("tail"),
        "fallback_reason": pa.array(cols["fallback_reason"], type=pa.string()),
        **{c: pa.array(cols[c], type=pa.string()) for c in _JSON_COLUMNS},  # stored JSON text as is
        "feedback": _feedback_lists(cols["request_id"], fb),
    }
    rid = np.asarray(cols["request_id"], dtype=str)
    hit = np.ones(rid.size, dtype=bool)
    if rewards is not None:  # (sorted request ids, their rewards): NaN/null for a decision not among them
        keys, values = rewards
        pos = np.minimum(np.searchsorted(keys, rid), max(keys.size - 1, 0))
        hit = (keys[pos] == rid) if keys.size else np.zeros(rid.size, dtype=bool)
        r = np.where(hit, values[pos] if keys.size else 0.0, np.nan)
        arrays["reward"] = pa.array(r, type=_F64, mask=~hit | np.isnan(r))
    if "exposure" in schema.names:
        names = schema.field("exposure").type
        K = names.num_fields
        chosen = np.asarray(cols["chosen"], dtype=np.int64)
        starts = np.asarray(offsets)[:-1]
        ex = flat.field("exposure")
        n_cand = np.diff(np.asarray(offsets))
        # with rewards, only the decisions they cover (those made under the rewards' config) are named
        ok = (chosen >= 0) & (chosen < n_cand) & hit
        full = np.zeros((rid.size, K))
        if len(ex) and ok.any():
            picked = ex.take(pa.array(np.where(ok, starts + chosen, 0)))
            lengths = pc.fill_null(pc.list_value_length(picked), 0).to_numpy(zero_copy_only=False)
            ok &= lengths == K
            values = pc.list_flatten(picked.filter(pa.array(ok))).to_numpy(zero_copy_only=False)
            full[ok] = values.reshape(-1, K)
        arrays["exposure"] = pa.StructArray.from_arrays([pa.array(full[:, k], type=_F64) for k in range(K)],
                                                        fields=list(names), mask=pa.array(~ok))
    return pa.RecordBatch.from_arrays([arrays[name] for name in schema.names], schema=schema)


def export_parquet(
    bind: Engine | Connection,
    path: str | os.PathLike[str],
    since: datetime | None = None,
    until: datetime | None = None,
    *,
    chunk_size: int = 5000,
    rewards: tuple[Sequence[str] | np.ndarray, Sequence[float] | np.ndarray] | None = None,
    exposure_names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Write decisions with ``since <= ts < until`` and their feedback to a Parquet file.

    ``rewards`` (request ids, rewards) adds a ``reward`` column (null for a decision not listed);
    ``exposure_names`` adds ``exposure``, the served layout's exposure vector named by constraint;
    ``metadata`` is added to the file's schema metadata (say there how the rewards were computed).

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
        **(metadata or {}),
    }
    reward_lookup: tuple[np.ndarray, np.ndarray] | None = None
    if rewards is not None:
        keys = np.asarray(rewards[0], dtype=str)
        order = np.argsort(keys, kind="stable")
        reward_lookup = (keys[order], np.asarray(rewards[1], dtype=np.float64)[order])
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
            for cols in iter_decisions(conn, since, until, columns, chunk_size=chunk_size, raw_json=True):
                if schema is None:
                    module_type = _module_type(cols["candidates"])
                    if module_type is None:  # no candidate modules seen yet: decide later
                        pending.append(cols)
                        continue
                    schema = _with_optional(_schema(module_type), rewards is not None,
                                            exposure_names).with_metadata(meta)
                    writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                assert writer is not None
                for chunk in [*pending, cols]:
                    writer.write_batch(_batch(conn, chunk, schema, reward_lookup))
                    total += len(chunk["request_id"])
                pending = []
            if schema is None:
                schema = _with_optional(_schema(pa.int64()), rewards is not None,
                                        exposure_names).with_metadata(meta)
                writer = pq.ParquetWriter(tmp, schema, compression="zstd")
                for chunk in pending:
                    writer.write_batch(_batch(conn, chunk, schema, reward_lookup))
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
        present = tuple(pq.read_schema(path).names)
        allowed = EXPORT_COLUMNS + tuple(c for c in OPTIONAL_EXPORT_COLUMNS if c in present)
        bad = [c for c in columns if c not in allowed]
        if bad:
            raise ValueError(f"columns must be among {allowed}; got {bad!r}")
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
