"""Replay (off-policy evaluation) over a log partitioned by time, one Parquet file per partition.

A partition file holds the arrays the estimators read, one row per logged decision: ``reward``
(float64), ``action`` (int64), ``pscore`` (float64), ``action_dist`` and optionally
``estimated_rewards`` (``n_cand`` float64 per row). Each partition is read where it is processed,
one batch of rows at a time, and each batch is reduced while it is in cache
(:func:`bandits.ope_partial_sums_blocks`), then dropped; only the partial sums travel, and
:func:`bandits.combine_partial_sums` adds them up in partition order, exactly.

The per-candidate columns are written as Parquet fixed-length byte arrays (``n_cand`` little-endian
float64 per row), in row groups of :data:`ROW_GROUP_ROWS` rows, LZ4 by default: decoding is then a
copy of the page bytes, the reader views them as an ``(n_rounds, n_cand)`` array without another
copy, and a row group's decoded columns (9 MB with 16 candidates) stay in cache until they are
reduced. The file is memory-mapped and read on the calling thread, only the estimators' columns. A
nested fixed-size list (Arrow's ``fixed_size_list<double>``) and files with other row groups are read
too (in batches of :data:`ROW_GROUP_ROWS` rows), but Parquet stores a nested list with repetition
levels, which decode several times slower.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bandits import OPEPartialSums, combine_partial_sums, ope_partial_sums_blocks

from ..errors import InvalidInput
from ._ray import RayPool

__all__ = ["ENGINES", "ROW_GROUP_ROWS", "OPEPartition", "iter_ope_batches", "partition_paths", "partition_sums",
           "read_ope_partition", "replay_partitions", "write_ope_partition"]

#: where a replay runs: ``local`` (this process) or ``ray`` (partitions in Ray actors)
ENGINES = ("local", "ray")

#: Parquet codecs a partition may be written with
COMPRESSIONS = ("lz4", "zstd", "snappy", "none")

#: rows per row group of a partition file, and per batch when reading one: 9 MB of decoded columns
#: with 16 candidates, reduced while they are in cache
ROW_GROUP_ROWS = 32768

_REQUIRED = ("reward", "action", "pscore", "action_dist")


def _rows_as_bytes(x: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(n, k) float64 -> n fixed-length values of 8 k little-endian bytes (no copy on little-endian hosts)."""
    x = np.ascontiguousarray(x, dtype="<f8")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * x.shape[1]), x.shape[0], [None, pa.py_buffer(x)])


def write_ope_partition(path: str | os.PathLike[str], reward: np.ndarray, action: np.ndarray, pscore: np.ndarray,
                        action_dist: np.ndarray, estimated_rewards: np.ndarray | None = None, *,
                        compression: str = "lz4", row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write one partition's arrays (see the module docstring) to ``path``.

    Parameters
    ----------
    reward, action, pscore
        Shape (n_rounds,).
    action_dist, estimated_rewards
        Shape (n_rounds, n_cand).
    compression
        One of ``lz4`` (default: fast to decode), ``zstd`` (smaller), ``snappy``, ``none`` (fastest to
        read when the columns do not compress, e.g. random floats).
    row_group_rows
        Rows per row group (default :data:`ROW_GROUP_ROWS`).
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}")
    if isinstance(row_group_rows, bool) or not isinstance(row_group_rows, int) or row_group_rows < 1:
        raise ValueError(f"row_group_rows must be an integer >= 1; got {row_group_rows!r}")
    pi = np.asarray(action_dist, dtype=np.float64)
    if pi.ndim != 2 or pi.shape[1] == 0:
        raise ValueError(f"action_dist must have shape (n_rounds, n_cand); got {pi.shape}")
    n = pi.shape[0]
    cols: dict[str, pa.Array] = {
        "reward": pa.array(np.asarray(reward, dtype=np.float64)),
        "action": pa.array(np.asarray(action, dtype=np.int64)),
        "pscore": pa.array(np.asarray(pscore, dtype=np.float64)),
        "action_dist": _rows_as_bytes(pi),
    }
    if estimated_rewards is not None:
        q = np.asarray(estimated_rewards, dtype=np.float64)
        if q.shape != pi.shape:
            raise ValueError(f"estimated_rewards must have the shape of action_dist {pi.shape}; got {q.shape}")
        cols["estimated_rewards"] = _rows_as_bytes(q)
    for name in ("reward", "action", "pscore"):
        if len(cols[name]) != n:
            raise ValueError(f"{name} must have shape ({n},) like action_dist's rows; got ({len(cols[name])},)")
    pq.write_table(pa.table(cols), path, compression=compression, use_dictionary=False,
                   row_group_size=row_group_rows)


def _matrix(col: pa.ChunkedArray | pa.Array, path: str, name: str) -> np.ndarray:
    """A per-candidate column as an (n_rounds, n_cand) float64 array."""
    if isinstance(col, pa.ChunkedArray):
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    else:
        arr = col
    if pa.types.is_fixed_size_binary(arr.type):
        width = arr.type.byte_width
        if width % 8 or arr.null_count:
            raise InvalidInput(f"partition {path!r}: column {name} must hold n_cand float64 per row without "
                               f"nulls; got {width}-byte values, {arr.null_count} nulls", field="partitions")
        buf = arr.buffers()[1]
        assert buf is not None
        flat = np.frombuffer(buf, dtype="<f8", count=len(arr) * width // 8, offset=arr.offset * width)
        return flat.reshape(len(arr), width // 8)
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy().reshape(len(arr), arr.type.list_size)
    raise InvalidInput(f"partition {path!r}: column {name} must be fixed_size_binary (n_cand float64 per row) or "
                       f"fixed_size_list<double>; got {arr.type}", field="partitions")


def _columns(path: str, names: list[str], with_model: bool) -> list[str]:
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise InvalidInput(f"partition {path!r}: columns {missing} are missing; a partition needs reward, "
                           f"action, pscore, action_dist (estimated_rewards optional)", field="partitions")
    return [*_REQUIRED, *(["estimated_rewards"] if with_model and "estimated_rewards" in names else [])]


def read_ope_partition(path: str | os.PathLike[str], *, with_model: bool = True) -> dict[str, np.ndarray]:
    """The arrays of one partition file, without a Python loop over rows.

    Reads only the estimators' columns (``estimated_rewards`` only when ``with_model``), memory-mapped,
    on the calling thread. A replay reads a partition in batches instead (:func:`iter_ope_batches`).
    """
    path = str(path)
    cols = _columns(path, pq.read_schema(path).names, with_model)
    t = pq.read_table(path, columns=cols, use_threads=False, memory_map=True)
    out = {c: t.column(c).to_numpy() for c in ("reward", "action", "pscore")}
    for c in cols[3:]:
        out[c] = _matrix(t.column(c), path, c)
    return out


def iter_ope_batches(path: str | os.PathLike[str], *, with_model: bool = True, batch_rows: int = ROW_GROUP_ROWS
                     ) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray | None]]]:
    """A partition file's number of rows, and its rows in order as ``(reward, action, pscore,
    action_dist, estimated_rewards)`` batches of at most ``batch_rows`` (one row group each, for
    files written by :func:`write_ope_partition`); ``estimated_rewards`` is None without the column
    or ``with_model``.

    Memory-mapped, on the calling thread, only the estimators' columns, without pre-buffering: a
    batch is decoded just before it is used, and the per-candidate columns are views of its pages.
    """
    path = str(path)
    pf = pq.ParquetFile(path, memory_map=True, pre_buffer=False)
    cols = _columns(path, pf.schema_arrow.names, with_model)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols, use_threads=False):
            r, a, p = (batch.column(i).to_numpy(zero_copy_only=False) for i in range(3))
            q = _matrix(batch.column(4), path, cols[4]) if len(cols) > 4 else None
            yield r, a, p, _matrix(batch.column(3), path, cols[3]), q

    return pf.metadata.num_rows, batches()


def partition_sums(path: str, index: int, *, switch_tau: float = 10.0, n_boot: int = 0, seed: int = 0
                   ) -> OPEPartialSums:
    """One partition file's partial sums (:func:`bandits.ope_partial_sums_blocks`), read batch by
    batch: memory is one batch (plus, with ``n_boot``, five float64 columns) whatever its size."""
    n, batches = iter_ope_batches(path)
    if n < 2:
        raise InvalidInput(f"partition {path!r} holds {n} rows; each partition needs at least 2", field="partitions")
    return ope_partial_sums_blocks(batches, n, switch_tau=switch_tau, n_boot=n_boot, seed=seed, partition=index)


class OPEPartition:
    """One partition file: :meth:`sums` reads it, reduces it to partial sums and lets it go, so a
    worker holds one batch of one partition at a time whatever the number it is given."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index

    def sums(self, switch_tau: float, n_boot: int, seed: int) -> OPEPartialSums:
        return partition_sums(self.path, self.index, switch_tau=switch_tau, n_boot=n_boot, seed=seed)


def _sums_of(args: tuple[float, int, int], item: tuple[str, int]) -> OPEPartialSums:
    switch_tau, n_boot, seed = args
    return partition_sums(item[0], item[1], switch_tau=switch_tau, n_boot=n_boot, seed=seed)


def partition_paths(folder: str | os.PathLike[str]) -> list[str]:
    """The ``*.parquet`` files of a folder in name order (name partitions by time: ``2026-11-30T10.parquet``)."""
    paths = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    if not paths:
        raise InvalidInput(f"partitions: no *.parquet files in {str(folder)!r}", field="partitions")
    return paths


def replay_partitions(paths: Sequence[str], *, engine: str = "local", workers: int | None = None,
                      switch_tau: float = 10.0, n_boot: int = 0, seed: int = 0, alpha: float = 0.05,
                      pool: RayPool | None = None) -> list[dict[str, Any]]:
    """Every estimator over the partitions, combined from their partial sums.

    The partition index (the bootstrap's stream) is the file's position in ``paths``. ``engine="ray"``
    reads and reduces the partitions in ``workers`` Ray actors (a :class:`RayPool`; or in ``pool``,
    already started), each partition on whichever worker is free; the sums are added in partition
    order, so the rows equal ``engine="local"``'s.
    """
    if engine not in ENGINES:
        raise InvalidInput(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}", field="engine")
    if not paths:
        raise InvalidInput("partitions: at least one partition file is needed; got none", field="partitions")
    items = [(str(p), i) for i, p in enumerate(paths)]
    fn = partial(_sums_of, (switch_tau, n_boot, seed))
    if engine == "local":
        parts = [fn(it) for it in items]
    elif pool is not None:
        parts = pool.map(fn, items)
    else:
        if isinstance(workers, int) and not isinstance(workers, bool) and workers > len(items):
            workers = len(items)  # no idle actors
        with RayPool(workers) as own:
            parts = own.map(fn, items)
    return combine_partial_sums(parts, alpha=alpha)
