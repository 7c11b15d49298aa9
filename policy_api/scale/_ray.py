"""Work in Ray actors: shards held in other processes (or machines), and a pool of workers.

:class:`RayShards` is a :class:`allocator.ShardMap` whose shards live in Ray actors. Each actor
builds its shards once, from callables shipped to it (a shard's arrays, or a generator and its
seed), keeps them in its memory, and answers ``map(method, *args)`` with one small result per shard:
a pass ships the arguments (K prices and a temperature, for planning) out and the shards' partial
sums back. Shards are assigned to actors in contiguous runs, and results come back in shard order,
so sums over them are taken in the same order as :class:`allocator.LocalShards` takes them.

:class:`RayPool` runs one function over many items (a replay's partition files), each item on
whichever worker is free, and gives the results back in the items' order.

Both start their actors at the driver's CPU priority (for a cluster that ``ray.init`` started here:
the raylet's, which it inherits). Ray's default (``worker_niceness = 15`` in its ``ray_config_def.h``)
lowers every worker's: right for background work beside a busy raylet, wrong for a job the user
launched and waits for, whose workers then lose the cores to anything else running. The core worker
applies ``RAY_worker_niceness`` from its own environment when it starts, as an increment, so each
actor is started with ``runtime_env={"env_vars": {"RAY_worker_niceness": ...}}`` (:data:`WORKER_NICENESS`;
works on a cluster started elsewhere too).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from ..errors import InvalidInput

__all__ = ["WORKER_NICENESS", "RayPool", "RayShards", "cluster_cpus", "ray_available", "require_ray"]

#: what the missing-extra error tells the user to run
INSTALL_HINT = "pip install 'homepage-engine[ray]'"

#: niceness increment of the actors' worker processes over the raylet's (the driver's, for a cluster
#: that ``ray.init`` started here): 0 runs them at the user's priority (Ray's own default is 15)
WORKER_NICENESS = 0


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

    niceness
        The actors' niceness increment (see the module docstring).

    Starts Ray on this machine (``ray.init``) when no cluster is connected. Use as a context
    manager (or call :meth:`close`) to stop the actors.
    """

    def __init__(self, builders: Sequence[Callable[[], Any]], *, n_workers: int | None = None,
                 niceness: int = WORKER_NICENESS) -> None:
        if len(builders) == 0:
            raise InvalidInput("shards: at least one shard is needed; got none", field="shards")
        _check_workers(n_workers)
        ray = _connect()
        self._ray = ray
        cpus = cluster_cpus()
        n = min(len(builders), n_workers if n_workers is not None else cpus)
        bounds = [round(i * len(builders) / n) for i in range(n + 1)]
        host = _actor_class(ray, _ShardHost, n <= cpus, niceness)
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


class _PoolWorker:
    """The pool's actor: calls the function it is handed on one item."""

    def run(self, fn: Callable[[Any], Any], item: Any) -> Any:
        return fn(item)

    def niceness(self) -> int:
        return os.nice(0)

    def cpu_seconds(self) -> float:
        t = os.times()
        return t.user + t.system


class RayPool:
    """Ray actors, one per worker, that run a function on many items, each item on whichever worker is free.

    Parameters
    ----------
    n_workers
        Actors to start; default: the cluster's CPUs (each actor reserves one CPU).
    niceness
        The actors' niceness increment (see the module docstring).

    Each worker has at most ``depth`` (2) items queued, so it starts its next item as soon as it sends
    a result, and a worker slowed by other jobs takes fewer items instead of holding the others up.
    Starts Ray on this machine (``ray.init``) when no cluster is connected. Use as a context manager
    (or call :meth:`close`) to stop the actors; one pool serves any number of :meth:`map` calls.
    """

    depth = 2

    def __init__(self, n_workers: int | None = None, *, niceness: int = WORKER_NICENESS) -> None:
        _check_workers(n_workers)
        ray = _connect()
        self._ray = ray
        cpus = cluster_cpus()
        n = n_workers if n_workers is not None else cpus
        worker = _actor_class(ray, _PoolWorker, n <= cpus, niceness)
        self._workers = [worker.remote() for _ in range(n)]
        self._nice = ray.get([w.niceness.remote() for w in self._workers])  # the actors are up

    @property
    def n_workers(self) -> int:
        return len(self._workers)

    @property
    def worker_niceness(self) -> list[int]:
        """Each worker process's niceness, as it started."""
        return list(self._nice)

    def cpu_seconds(self) -> list[float]:
        """Each worker process's CPU time so far (user + system): differences over a :meth:`map` give
        its CPU time per item, which, unlike its wall time, does not depend on other jobs' load."""
        return [float(x) for x in self._ray.get([w.cpu_seconds.remote() for w in self._workers])]

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(item) for item in items]``, computed by the workers; ``fn`` must pickle (a module-level
        function, or ``functools.partial`` of one) and is shipped once per call."""
        ray = self._ray
        fn_ref = ray.put(fn)
        out: list[Any] = [None] * len(items)
        todo = iter(range(len(items)))
        pending: dict[Any, tuple[int, Any]] = {}

        def submit(worker: Any) -> None:
            i = next(todo, None)
            if i is not None:
                pending[worker.run.remote(fn_ref, items[i])] = (i, worker)

        for _ in range(self.depth):
            for w in self._workers:
                submit(w)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i, w = pending.pop(done[0])
            out[i] = ray.get(done[0])
            submit(w)
        return out

    def close(self) -> None:
        for w in self._workers:
            self._ray.kill(w)
        self._workers = []

    def __enter__(self) -> RayPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_workers(n_workers: object) -> None:
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1):
        raise InvalidInput(f"workers must be an integer >= 1; got {n_workers!r}", field="workers")


def _actor_class(ray: ModuleType, cls: type, one_cpu_each: bool, niceness: int) -> Any:
    """``cls`` as a Ray actor reserving one CPU (none when there are more actors than CPUs), its
    worker process started at ``niceness`` (an increment over the raylet's)."""
    if isinstance(niceness, bool) or not isinstance(niceness, int) or not 0 <= niceness <= 19:
        raise InvalidInput(f"niceness must be an integer in [0, 19]; got {niceness!r}", field="niceness")
    return ray.remote(num_cpus=1 if one_cpu_each else 0,
                      runtime_env={"env_vars": {"RAY_worker_niceness": str(niceness)}})(cls)


def _big(x: object) -> bool:
    nbytes = getattr(x, "nbytes", 0)
    return isinstance(nbytes, int) and nbytes > 1 << 16
