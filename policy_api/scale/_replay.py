"""Replay (off-policy evaluation) over a log partitioned by time, one Parquet file per partition.

A partition file holds the arrays the estimators read, one row per logged decision: ``reward``
(float64), ``action`` (int64), ``pscore`` (float64), ``action_dist`` and optionally
``estimated_rewards`` (fixed-size lists of ``n_cand`` float64). Each partition is read and reduced
where it lives (:func:`bandits.ope_partial_sums`); only the partial sums travel, and
:func:`bandits.combine_partial_sums` adds them up in partition order, exactly.
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


def write_ope_partition(path: str | os.PathLike[str], reward: np.ndarray, action: np.ndarray, pscore: np.ndarray,
                        action_dist: np.ndarray, estimated_rewards: np.ndarray | None = None) -> None:
    """Write one partition's arrays (see the module docstring) to ``path``."""
    pi = np.ascontiguousarray(action_dist, dtype=np.float64)
    if pi.ndim != 2:
        raise ValueError(f"action_dist must have shape (n_rounds, n_cand); got {pi.shape}")
    n, L = pi.shape
    cols: dict[str, pa.Array] = {
        "reward": pa.array(np.asarray(reward, dtype=np.float64)),
        "action": pa.array(np.asarray(action, dtype=np.int64)),
        "pscore": pa.array(np.asarray(pscore, dtype=np.float64)),
        "action_dist": pa.FixedSizeListArray.from_arrays(pa.array(pi.reshape(-1)), L),
    }
    if estimated_rewards is not None:
        q = np.ascontiguousarray(estimated_rewards, dtype=np.float64)
        if q.shape != pi.shape:
            raise ValueError(f"estimated_rewards must have the shape of action_dist {pi.shape}; got {q.shape}")
        cols["estimated_rewards"] = pa.FixedSizeListArray.from_arrays(pa.array(q.reshape(-1)), L)
    pq.write_table(pa.table(cols), path, compression="zstd")


def read_ope_partition(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of one partition file, without a Python loop over rows."""
    t = pq.read_table(path)
    missing = [c for c in ("reward", "action", "pscore", "action_dist") if c not in t.column_names]
    if missing:
        raise InvalidInput(f"partition {str(path)!r}: columns {missing} are missing; a partition needs reward, "
                           f"action, pscore, action_dist (estimated_rewards optional)", field="partitions")
    out = {c: t.column(c).to_numpy() for c in ("reward", "action", "pscore")}
    for c in ("action_dist", "estimated_rewards"):
        if c in t.column_names:
            col = t.column(c).combine_chunks()
            width = col.type.list_size
            out[c] = col.flatten().to_numpy().reshape(len(col), width)
    return out


class OPEPartition:
    """One partition, read once where it is held; :meth:`sums` reduces it to partial sums."""

    def __init__(self, path: str, index: int) -> None:
        self.path = path
        self.index = index
        self.data = read_ope_partition(path)

    def sums(self, switch_tau: float, n_boot: int, seed: int) -> OPEPartialSums:
        d = self.data
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
