"""Replay (off-policy evaluation) over a log partitioned by time, one Parquet file per partition.

A partition file holds the arrays the estimators read, one row per logged decision: ``reward``
(float64), ``action`` (int64), ``pscore`` (float64), ``action_dist`` and optionally
``estimated_rewards`` (``n_cand`` float64 per row). Each partition is read and reduced where it is
processed (:func:`bandits.ope_partial_sums`), then dropped; only the partial sums travel, and
:func:`bandits.combine_partial_sums` adds them up in partition order, exactly.

The per-candidate columns are written as Parquet fixed-length byte arrays (``n_cand`` little-endian
float64 per row), one row group per file, LZ4 by default: decoding is then a copy of the page bytes,
and the reader views them as an ``(n_rounds, n_cand)`` array without another copy. A nested
fixed-size list (Arrow's ``fixed_size_list<double>``) is read too, but Parquet stores it with
repetition levels, which decode several times slower.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bandits import OPEPartialSums, combine_partial_sums, ope_partial_sums

from ..errors import InvalidInput
from ._ray import RayShards

__all__ = ["ENGINES", "OPEPartition", "partition_paths", "read_ope_partition", "replay_partitions",
           "write_ope_partition"]

#: where a replay runs: ``local`` (this process) or ``ray`` (partitions in Ray actors)
ENGINES = ("local", "ray")

#: Parquet codecs a partition may be written with
COMPRESSIONS = ("lz4", "zstd", "snappy", "none")

_REQUIRED = ("reward", "action", "pscore", "action_dist")


def _rows_as_bytes(x: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(n, k) float64 -> n fixed-length values of 8 k little-endian bytes (no copy on little-endian hosts)."""
    x = np.ascontiguousarray(x, dtype="<f8")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(8 * x.shape[1]), x.shape[0], [None, pa.py_buffer(x)])


def write_ope_partition(path: str | os.PathLike[str], reward: np.ndarray, action: np.ndarray, pscore: np.ndarray,
                        action_dist: np.ndarray, estimated_rewards: np.ndarray | None = None, *,
                        compression: str = "lz4") -> None:
    """Write one partition's arrays (see the module docstring) to ``path``, as one row group.

    Parameters
    ----------
    reward, action, pscore
        Shape (n_rounds,).
    action_dist, estimated_rewards
        Shape (n_rounds, n_cand).
    compression
        One of ``lz4`` (default: fast to decode), ``zstd`` (smaller), ``snappy``, ``none``.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {', '.join(COMPRESSIONS)}; got {compression!r}")
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
    # one row group: each column comes back as one chunk that the reader views without copying
    pq.write_table(pa.table(cols), path, compression=compression, use_dictionary=False,
                   row_group_size=max(n, 1))


def _matrix(col: pa.ChunkedArray, path: str, name: str) -> np.ndarray:
    """A per-candidate column as an (n_rounds, n_cand) float64 array."""
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
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


def read_ope_partition(path: str | os.PathLike[str], *, with_model: bool = True) -> dict[str, np.ndarray]:
    """The arrays of one partition file, without a Python loop over rows.

    Reads only the estimators' columns (``estimated_rewards`` only when ``with_model``), memory-mapped,
    on the calling thread; the per-candidate columns are views of the decoded pages.
    """
    path = str(path)
    names = pq.read_schema(path).names
    missing = [c for c in _REQUIRED if c not in names]
    if missing:
        raise InvalidInput(f"partition {path!r}: columns {missing} are missing; a partition needs reward, "
                           f"action, pscore, action_dist (estimated_rewards optional)", field="partitions")
    cols = [*_REQUIRED, *(["estimated_rewards"] if with_model and "estimated_rewards" in names else [])]
    t = pq.read_table(path, columns=cols, use_threads=False, memory_map=True)
    out = {c: t.column(c).to_numpy() for c in ("reward", "action", "pscore")}
    for c in cols[3:]:
        out[c] = _matrix(t.column(c), path, c)
    return out


class OPEPartition:
    """One partition file: :meth:`sums` reads it, reduces it to partial sums and lets it go, so a
    worker holds one partition at a time whatever the number it is given."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index

    def sums(self, switch_tau: float, n_boot: int, seed: int) -> OPEPartialSums:
        d = read_ope_partition(self.path)
        return ope_partial_sums(d["reward"], d["action"], d["pscore"], d["action_dist"],
                                d.get("estimated_rewards"), switch_tau=switch_tau, n_boot=n_boot, seed=seed,
                                partition=self.index)


def partition_paths(folder: str | os.PathLike[str]) -> list[str]:
    """The ``*.parquet`` files of a folder in name order (name partitions by time: ``2026-11-30T10.parquet``)."""
    paths = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    if not paths:
        raise InvalidInput(f"partitions: no *.parquet files in {str(folder)!r}", field="partitions")
    return paths


def replay_partitions(paths: Sequence[str], *, engine: str = "local", workers: int | None = None,
                      switch_tau: float = 10.0, n_boot: int = 0, seed: int = 0, alpha: float = 0.05
                      ) -> list[dict[str, Any]]:
    """Every estimator over the partitions, combined from their partial sums.

    The partition index (the bootstrap's stream) is the file's position in ``paths``. ``engine="ray"``
    holds the partitions in ``workers`` Ray actors; the rows equal ``engine="local"``'s.
    """
    if engine not in ENGINES:
        raise InvalidInput(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}", field="engine")
    if not paths:
        raise InvalidInput("partitions: at least one partition file is needed; got none", field="partitions")
    builders = [partial(OPEPartition, str(p), i) for i, p in enumerate(paths)]
    if engine == "local":
        parts = [b().sums(switch_tau, n_boot, seed) for b in builders]
    else:
        with RayShards(builders, n_workers=workers) as shards:
            parts = shards.map("sums", switch_tau, n_boot, seed)
    return combine_partial_sums(parts, alpha=alpha)
