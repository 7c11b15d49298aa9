"""Replay of a log exported in time partitions (``homepage log export`` files, one per period), each
partition reduced where it is read (this process, or whichever worker of a Ray pool is free) to the
estimators' partial sums.

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
from ..scale import ENGINES, RayPool
from ._learn import log_features
from ._replay import log_from_parquet, target_distribution

__all__ = ["PARTITION_TARGETS", "ExportPartition", "replay_partitioned"]

#: targets whose distribution a partition computes on its own rows
PARTITION_TARGETS = ("logged", "greedy", "uniform")


class ExportPartition:
    """One exported file, read once where it is processed; :meth:`sums` reduces it to partial sums."""

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


def _export_sums(args: tuple[HomepageConfig, np.ndarray, np.ndarray, str, int, int], item: tuple[str, int]
                 ) -> OPEPartialSums:
    config, item_ids, item_category, target, n_boot, seed = args
    return ExportPartition(item[0], item[1], config, item_ids, item_category, target).sums(n_boot, seed)


def replay_partitioned(paths: Sequence[str], config: HomepageConfig, item_ids: np.ndarray,
                       item_category: np.ndarray, target: str, *, engine: str = "local", workers: int | None = None,
                       n_boot: int = 0, seed: int = 0) -> list[dict[str, Any]]:
    """Every estimator of ``target`` over exported partitions (in the order given), combined exactly.

    ``engine="ray"`` reads and reduces the partitions in ``workers`` Ray actors (a
    :class:`~policy_api.scale.RayPool`, the ``ray`` extra; the config and catalog are shipped once),
    each partition on whichever worker is free; the sums are added in partition order, so the rows
    equal ``engine="local"``'s. Targets: ``logged``, ``greedy``, ``uniform`` (a bandit or config target needs
    the whole log or the registry: use :func:`replay`).
    """
    if engine not in ENGINES:
        raise InvalidInput(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}", field="engine")
    if target not in PARTITION_TARGETS:
        raise InvalidInput(f"policy must be one of {', '.join(PARTITION_TARGETS)} for a partitioned replay; got "
                           f"{target!r}", field="policy")
    if not paths:
        raise InvalidInput("partitions: at least one exported file is needed; got none", field="partitions")
    items = [(str(p), i) for i, p in enumerate(paths)]
    fn = partial(_export_sums, (config, item_ids, item_category, target, n_boot, seed))
    if engine == "local":
        parts = [fn(it) for it in items]
    else:
        if isinstance(workers, int) and not isinstance(workers, bool) and workers > len(items):
            workers = len(items)  # no idle actors
        with RayPool(workers) as pool:
            parts = pool.map(fn, items)
    return combine_partial_sums(parts)
