"""The live state store's interface and the deadline that every backend's reads keep.

A read runs on a small pool of the store's own daemon threads and the caller waits at most
``deadline_s`` for it (``Future.result(timeout=...)``), whatever the backend does. A read still stuck
in the backend keeps its thread; while every thread is stuck, a read is not queued behind them but
answered at once (None, counted as a timeout and as ``shed``), and the pool serves again as soon as a
thread comes back: on Redis after ``socket_timeout`` at most; on PostgreSQL when the server answers or
the connection breaks (statement timeout, TCP keepalives), so a server that is frozen but still
acknowledges packets holds its threads, and the readers stay cold, until it answers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from queue import SimpleQueue
from typing import Protocol, TypeVar, runtime_checkable

from ..errors import InvalidInput
from ._state import Forget, ItemStats, LiveEvent, UserState, check_store_params

__all__ = ["DeadlinePool", "DeadlineStore", "UserStateStore"]

_log = logging.getLogger("policy_api.live")
T = TypeVar("T")
STAT_KEYS = ("reads", "timeouts", "shed", "errors", "writes", "events_written")


@runtime_checkable
class UserStateStore(Protocol):
    """Where the live state lives: one writer (the background loop), many readers (serving workers).

    The writer's ``forget`` (a :class:`~policy_api.live.Forget` or None) is the population shift its
    writes apply (:func:`~policy_api.live.apply_events`)."""

    forget: Forget | None

    def write_batch(self, events: Sequence[LiveEvent]) -> None:
        """Apply events (any users, items, order) to the users' states and the items' stats.

        Not idempotent: a batch written twice counts twice. Raises when the backend fails (the writer
        retries or drops the batch).
        """
        ...

    def read(self, user_ids: Sequence[str], *, deadline_s: float) -> list[UserState | None]:
        """The users' states, in order; None for a user without state and for every user when the
        backend did not answer within ``deadline_s`` (counted). Never raises on a slow or failing backend;
        raises :class:`~policy_api.errors.InvalidInput` for a ``deadline_s`` that is not a number > 0."""
        ...

    def read_items(self, *, deadline_s: float) -> ItemStats | None:
        """The item trends; None when there are none or the backend did not answer in time."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters since the store was built: ``reads``, ``timeouts`` (of which ``shed``: no free
        thread), ``errors`` (backend failures, reads and writes), ``writes`` (batches), ``events_written``."""
        ...

    def close(self) -> None:
        """Stop the read threads and release the backend's connections (a shared Engine stays open)."""
        ...


class DeadlinePool:
    """At most ``max_threads`` daemon threads; :meth:`submit` returns None instead of queueing when all
    are busy, so a caller never waits behind reads stuck in a frozen backend.

    Threads start on first use (after a fork, the child starts its own) and are daemons: one stuck
    forever in a socket read never blocks the interpreter's exit.
    """

    def __init__(self, max_threads: int, name: str) -> None:
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise InvalidInput(f"read_threads must be an integer >= 1; got {max_threads!r}", field="read_threads")
        self._max = max_threads
        self._name = name
        self._lock = threading.Lock()
        self._busy = 0  # submitted and not finished
        self._threads = 0
        self._closed = False
        self._queue: SimpleQueue[Callable[[], None] | None] = SimpleQueue()

    def submit(self, fn: Callable[[], T]) -> Future[T] | None:
        spawn = False
        with self._lock:
            if self._closed or self._busy >= self._max:
                return None
            self._busy += 1
            if self._threads < self._busy:  # keeps threads >= busy: every queued call has a thread
                self._threads += 1
                spawn = True
            number = self._threads
        fut: Future[T] = Future()

        def job() -> None:
            if fut.set_running_or_notify_cancel():  # False: the caller cancelled it while queued
                try:
                    fut.set_result(fn())
                except BaseException as e:  # delivered to the caller, if it still waits
                    fut.set_exception(e)

        self._queue.put(job)
        if spawn:
            threading.Thread(target=self._work, name=f"{self._name}-{number}", daemon=True).start()
        return fut

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            finally:
                with self._lock:
                    self._busy -= 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            n = self._threads
        for _ in range(n):
            self._queue.put(None)


def _check_deadline(deadline_s: float) -> None:
    if not (isinstance(deadline_s, int | float) and math.isfinite(deadline_s) and deadline_s > 0):
        raise InvalidInput(f"deadline_s must be a finite number > 0; got {deadline_s!r}", field="deadline_s")


class DeadlineStore(ABC):
    """The part every backend shares: reads under a deadline on a :class:`DeadlinePool`, counters.

    A backend implements ``_read_users(user_ids) -> list[UserState | None]``, ``_read_item_rows() ->
    ItemStats | None``, ``_write(events)`` and ``_close()``; each may block or raise.
    """

    def __init__(self, *, half_life_s: float, max_events: int, read_threads: int, name: str,
                 impression_half_life: float | None = None) -> None:
        check_store_params(half_life_s, max_events)
        self.half_life_s = float(half_life_s)
        self.max_events = max_events
        self.impression_half_life = impression_half_life
        #: the population shift the writer forgets (set by the loop when it detects one)
        self.forget: Forget | None = None
        self._pool = DeadlinePool(read_threads, name)
        self._counts = dict.fromkeys(STAT_KEYS, 0)
        self._counts_lock = threading.Lock()
        self._failing = False

    # ---- to implement
    @abstractmethod
    def _read_users(self, user_ids: Sequence[str]) -> list[UserState | None]:
        """Implemented by each backend."""

    @abstractmethod
    def _read_item_rows(self) -> ItemStats | None:
        """Implemented by each backend."""

    @abstractmethod
    def _write(self, events: Sequence[LiveEvent]) -> None:
        """Implemented by each backend."""

    @abstractmethod
    def _close(self) -> None:
        """Implemented by each backend."""

    # ---- the interface
    def write_batch(self, events: Sequence[LiveEvent]) -> None:
        if not events:
            return
        try:
            self._write(events)
        except Exception:
            self._count("errors")
            raise
        self._count("writes")
        self._count("events_written", len(events))

    def read(self, user_ids: Sequence[str], *, deadline_s: float) -> list[UserState | None]:
        _check_deadline(deadline_s)
        ids = list(user_ids)
        if not ids:
            return []
        result = self._within(lambda: self._read_users(ids), deadline_s)
        return [None] * len(ids) if result is None else result

    def read_items(self, *, deadline_s: float) -> ItemStats | None:
        _check_deadline(deadline_s)
        return self._within(self._read_item_rows, deadline_s)

    def stats(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    def close(self) -> None:
        self._pool.close()
        self._close()

    # ---- machinery
    def _count(self, key: str, n: int = 1) -> None:
        with self._counts_lock:
            self._counts[key] += n

    def _guarded(self, fn: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            try:
                out = fn()
            except Exception as e:
                self._count("errors")  # counted here: the caller may have stopped waiting
                if not self._failing:  # one warning per run of failures, not one per read
                    _log.warning("live state read failed: %s: %s", type(e).__name__, e)
                self._failing = True
                raise
            self._failing = False
            return out

        return run

    def _within(self, fn: Callable[[], T], deadline_s: float) -> T | None:
        start = time.monotonic()
        self._count("reads")
        fut = self._pool.submit(self._guarded(fn))
        if fut is None:
            self._count("timeouts")
            self._count("shed")
            return None
        try:
            return fut.result(timeout=max(0.0, deadline_s - (time.monotonic() - start)))
        except FutureTimeout:
            fut.cancel()  # not started yet: never runs
            self._count("timeouts")
            return None
        except Exception:
            return None  # counted by _guarded
