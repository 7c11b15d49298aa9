"""Reading the decision log fast: the JSON columns come back as text and are parsed in bulk by
Arrow's C++ JSON reader, then flattened into the :class:`DecisionLog` arrays with numpy — no Python
object per candidate. The learner and replay use it; :func:`policy_api.log.decision_log` (one
dict per candidate) stays as the reference implementation it is tested against."""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
from sqlalchemy.engine import Engine

from allocator import HomepageConfig

from ._arrays import DecisionLog, pad_candidates, to_epoch
from ._rows import iter_decisions

__all__ = ["read_decision_log"]

_F64 = pa.float64()
_CAND = pa.struct([("modules", pa.list_(pa.string())), ("categories", pa.list_(pa.string())), ("tilt", _F64),
                   ("value", _F64), ("score", _F64), ("exposure", pa.list_(_F64)), ("engagement", pa.list_(_F64)),
                   ("tail", _F64)])
_VERS = pa.struct([(k, pa.int64()) for k in ("config", "plan", "ranker", "bandit")])
_SCHEMA = pa.schema([("c", pa.list_(_CAND)), ("p", pa.list_(_F64)), ("x", pa.struct([("shared", pa.list_(_F64))])),
                     ("v", _VERS)])
_COLS = ["request_id", "ts", "user_id", "policy", "context", "versions", "candidates", "pmf", "chosen", "propensity"]


def _parse(cols: dict[str, Any]) -> pa.Table:
    lines = [f'{{"c":{c or "[]"},"p":{p or "[]"},"x":{x or "{}"},"v":{v or "{}"}}}'
             for c, p, x, v in zip(cols["candidates"], cols["pmf"], cols["context"], cols["versions"], strict=True)]
    data = "\n".join(lines).encode()
    longest = max((len(s) for s in lines), default=0)
    return pajson.read_json(io.BytesIO(data),
                            read_options=pajson.ReadOptions(block_size=max(1 << 22, 4 * longest)),
                            parse_options=pajson.ParseOptions(explicit_schema=_SCHEMA, unexpected_field_behavior="ignore"))


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
        uniq, inv = np.unique(names.flatten().to_numpy(zero_copy_only=False).astype(str), return_inverse=True)
        lookup = {c: k for k, c in enumerate(config.category_names)}
        codes = np.array([lookup.get(u, -1) for u in uniq.tolist()], dtype=np.float64)[inv]
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


def _empty(config: HomepageConfig) -> DecisionLog:
    z = np.zeros(0)
    S, K = config.slots, len(config.constraints)
    return DecisionLog(np.zeros(0, dtype=str), np.zeros(0, dtype=object), np.zeros(0, dtype=object), z,
                       np.zeros(0, dtype=np.int64), z, np.zeros(0, dtype=np.int64), np.zeros((0, 1), bool),
                       np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1)), np.zeros((0, 1, K)), np.zeros((0, 1, S)),
                       np.zeros((0, 1)), np.zeros((0, 1, S), dtype=np.int64), np.zeros((0, 1)), np.zeros((0, 0)), [], [],
                       [])
