"""Shards in Ray actors: a :class:`allocator.ShardMap` whose shards live in other processes (or machines).

Each actor builds its shards once, from callables shipped to it (a shard's arrays, a Parquet
partition to read, or a generator and its seed), keeps them in its memory, and answers
``map(method, *args)`` with one small result per shard: a pass ships the arguments (K prices and a
temperature, for planning) out and the shards' partial sums back. Shards are assigned to actors in
contiguous runs, and results come back in shard order, so sums over them are taken in the same order
as :class:`allocator.LocalShards` takes them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from ..errors import InvalidInput

__all__ = ["RayShards", "cluster_cpus", "ray_available", "require_ray"]

#: what the missing-extra error tells the user to run
INSTALL_HINT = "pip install 'homepage-engine[ray]'"


def ray_available() -> bool:
    """Whether Ray can be imported (without importing it)."""
    return importlib.util.find_spec("ray") is not None


def require_ray() -> ModuleType:
    """The ``ray`` module; :class:`InvalidInput` (field ``engine``) naming the extra when it is missing."""
    try:
        import ray
    except ImportError:
        raise InvalidInput(f"engine 'ray' needs Ray, which is not installed: install the 'ray' extra "
                           f"({INSTALL_HINT}) or use engine 'local'", field="engine") from None
    return ray


def _connect() -> ModuleType:
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    return ray


def cluster_cpus() -> int:
    """CPUs of the connected Ray cluster (a local one is started when none is connected)."""
    return max(1, int(_connect().cluster_resources().get("CPU", 1)))


class _ShardHost:
    """The actor: builds its shards once and calls one method on each, in order."""

    def __init__(self, builders: Sequence[Callable[[], Any]]) -> None:
        self.shards = [b() for b in builders]

    def map(self, method: str, *args: Any) -> list[Any]:
        return [getattr(s, method)(*args) for s in self.shards]

    def ping(self) -> int:
        return len(self.shards)


class RayShards:
    """Shards held by Ray actors, one actor per worker (at most one per shard).

    Parameters
    ----------
    builders
        One callable per shard, run inside its actor (it must pickle: ``functools.partial`` of a
        module-level function or class).
    n_workers
        Actors to start; default: the cluster's CPUs (each actor reserves one CPU).

    Starts Ray on this machine (``ray.init``) when no cluster is connected. Use as a context
    manager (or call :meth:`close`) to stop the actors.
    """

    def __init__(self, builders: Sequence[Callable[[], Any]], *, n_workers: int | None = None) -> None:
        if len(builders) == 0:
            raise InvalidInput("shards: at least one shard is needed; got none", field="shards")
        if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1):
            raise InvalidInput(f"workers must be an integer >= 1; got {n_workers!r}", field="workers")
        ray = _connect()
        self._ray = ray
        cpus = cluster_cpus()
        n = min(len(builders), n_workers if n_workers is not None else cpus)
        bounds = [round(i * len(builders) / n) for i in range(n + 1)]
        host = ray.remote(num_cpus=1)(_ShardHost) if n <= cpus else ray.remote(num_cpus=0)(_ShardHost)
        self._hosts = [host.remote(list(builders[bounds[i]:bounds[i + 1]])) for i in range(n)]
        ray.get([h.ping.remote() for h in self._hosts])  # shards built (errors surface here)
        self._n = len(builders)

    @property
    def n_shards(self) -> int:
        return self._n

    @property
    def n_workers(self) -> int:
        return len(self._hosts)

    def map(self, method: str, *args: Any) -> list[Any]:
        refs = [self._ray.put(a) if _big(a) else a for a in args]
        out: list[Any] = []
        for part in self._ray.get([h.map.remote(method, *refs) for h in self._hosts]):
            out.extend(part)
        return out

    def close(self) -> None:
        for h in self._hosts:
            self._ray.kill(h)
        self._hosts = []

    def __enter__(self) -> RayShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _big(x: object) -> bool:
    nbytes = getattr(x, "nbytes", 0)
    return isinstance(nbytes, int) and nbytes > 1 << 16
