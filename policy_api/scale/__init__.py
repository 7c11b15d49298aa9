"""Scale-out on Ray (the optional ``ray`` extra): user shards and log partitions held in Ray actors.

Ray is imported only when one of these is called; without it they raise :class:`InvalidInput`
naming the extra. The numeric work stays in the core (:func:`allocator.plan_dual_sharded`,
:func:`bandits.ope_partial_sums`): an actor only holds its shards and answers their passes.
"""

from ._ray import RayShards, cluster_cpus, ray_available, require_ray
from ._replay import (
    ENGINES,
    OPEPartition,
    partition_paths,
    read_ope_partition,
    replay_partitions,
    write_ope_partition,
)

__all__ = ["ENGINES", "OPEPartition", "RayShards", "cluster_cpus", "partition_paths", "ray_available", "read_ope_partition",
           "replay_partitions", "require_ray", "write_ope_partition"]
