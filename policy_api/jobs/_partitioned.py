"""Replay of a log exported in time partitions (``homepage log export`` files, one per period), each
partition reduced where it is held (this process or a Ray actor) to the estimators' partial sums.

Per partition: its decisions and feedback are read (:func:`log_from_parquet`), rewards joined inside the
reward window, the target's distribution recomputed on the logged candidates, and a reward model
cross-fitted on the partition's own rounds (folds seeded by ``[seed, partition]``); then
:func:`bandits.ope_partial_sums`. :func:`bandits.combine_partial_sums` adds the partitions up, so the
result is the same on one machine and on a Ray cluster. IPS and SNIPS equal the single-file
:func:`replay` of the same decisions; DM and the DR family differ from it by the reward model (fitted
per partition here, on the whole log there).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from allocator import HomepageConfig
from bandits import OPEPartialSums, combine_partial_sums, cross_fit_rewards, ope_partial_sums

from ..errors import InvalidInput
from ..log import join_rewards
from ..scale import ENGINES, RayShards
from ._learn import log_features
from ._replay import log_from_parquet, target_distribution

__all__ = ["PARTITION_TARGETS", "ExportPartition", "replay_partitioned"]

#: targets whose distribution a partition computes on its own rows
PARTITION_TARGETS = ("logged", "greedy", "uniform")


class ExportPartition:
    """One exported file, read once where it is held; :meth:`sums` reduces it to partial sums."""

    def __init__(self, path: str, index: int, config: HomepageConfig, item_ids: np.ndarray,
                 item_category: np.ndarray, target: str) -> None:
        dlog, fb = log_from_parquet(Path(path), config)
        if len(dlog) < 2:
            raise InvalidInput(f"partition {path!r} holds {len(dlog)} decisions with candidates; each partition "
                               f"needs at least 2", field="partitions")
        self.index = index
        self.action = dlog.action
        self.pscore = dlog.pscore
        self.reward = join_rewards(dlog, fb, config, item_ids, item_category).reward
        self.dist = target_distribution(target, dlog, config)[0]
        self.actions = log_features(dlog, config)[1]

    def sums(self, n_boot: int, seed: int) -> OPEPartialSums:
        rng = np.random.default_rng([seed, self.index])
        est_r = cross_fit_rewards(self.actions, self.action, self.reward, n_folds=2, rng=rng)
        return ope_partial_sums(self.reward, self.action, self.pscore, self.dist, est_r, n_boot=n_boot, seed=seed,
                                partition=self.index)


def replay_partitioned(paths: Sequence[str], config: HomepageConfig, item_ids: np.ndarray,
                       item_category: np.ndarray, target: str, *, engine: str = "local", workers: int | None = None,
                       n_boot: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Every estimator of ``target`` over exported partitions (in the order given), combined exactly.

    ``engine="ray"`` holds the partitions in ``workers`` Ray actors (the ``ray`` extra); the rows equal
    ``engine="local"``'s. Targets: ``logged``, ``greedy``, ``uniform`` (a bandit or config target needs
    the whole log or the registry: use :func:`replay`).
    """
    if engine not in ENGINES:
        raise InvalidInput(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}", field="engine")
    if target not in PARTITION_TARGETS:
        raise InvalidInput(f"policy must be one of {', '.join(PARTITION_TARGETS)} for a partitioned replay; got "
                           f"{target!r}", field="policy")
    if not paths:
        raise InvalidInput("partitions: at least one exported file is needed; got none", field="partitions")
    builders = [partial(ExportPartition, str(p), i, config, item_ids, item_category, target)
                for i, p in enumerate(paths)]
    if engine == "local":
        parts = [b().sums(n_boot, seed) for b in builders]
    else:
        with RayShards(builders, n_workers=workers) as shards:
            parts = shards.map("sums", n_boot, seed)
    return combine_partial_sums(parts)
