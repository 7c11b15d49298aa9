"""Scale-out on Ray (the optional ``ray`` extra): user shards held in Ray actors, log partitions
reduced by a pool of them.

Ray is imported only when one of these is called; without it they raise :class:`InvalidInput`
naming the extra. The numeric work stays in the core (:func:`allocator.plan_dual_sharded`,
:func:`bandits.ope_partial_sums_blocks`): an actor only holds its shards and answers their passes,
or reads a partition and returns its partial sums.
"""

from ._ray import WORKER_NICENESS, RayPool, RayShards, cluster_cpus, ray_available, require_ray
from ._replay import (
    ENGINES,
    ROW_GROUP_ROWS,
    OPEPartition,
    iter_ope_batches,
    partition_paths,
    partition_sums,
    read_ope_partition,
    replay_partitions,
    write_ope_partition,
)

__all__ = ["ENGINES", "ROW_GROUP_ROWS", "WORKER_NICENESS", "OPEPartition", "RayPool", "RayShards", "cluster_cpus",
           "iter_ope_batches", "partition_paths", "partition_sums", "ray_available", "read_ope_partition",
           "replay_partitions", "require_ray", "write_ope_partition"]
