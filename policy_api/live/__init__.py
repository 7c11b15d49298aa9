"""The engine's real-time user state: each accepted feedback event updates its user's live state
(recent positive and negative items, decayed engagement and examined impressions per category) and
its item's trend.

One writer (the background loop) calls ``write_batch``; every serving worker calls ``read`` at decision
time with a deadline that holds whatever the backend does. One interface, :class:`UserStateStore`, with
a backend per file: :class:`SqlStateStore` (the log's database, the default) and :class:`RedisStateStore`;
:func:`make_state_store` builds the one the config names. The update rules are pure
(:func:`apply_events`, :func:`category_vector`).
"""

from ._factory import make_state_store
from ._sql import SqlStateStore
from ._state import (
    IMPRESSION,
    NEGATIVE_TYPES,
    POSITIVE_TYPES,
    Forget,
    ItemStats,
    LiveEvent,
    UserState,
    apply_events,
    before_vectors,
    category_vector,
    forget_factor,
    live_sequences,
)
from ._store import UserStateStore
from ._transfer import ShiftMap, fit_shift_map

__all__ = [
    "IMPRESSION",
    "NEGATIVE_TYPES",
    "POSITIVE_TYPES",
    "Forget",
    "ItemStats",
    "LiveEvent",
    "RedisStateStore",
    "SqlStateStore",
    "UserState",
    "UserStateStore",
    "ShiftMap",
    "apply_events",
    "before_vectors",
    "category_vector",
    "fit_shift_map",
    "forget_factor",
    "live_sequences",
    "make_state_store",
]


def __getattr__(name: str) -> object:
    # RedisStateStore on first use: importing redis-py costs every process ~0.2 s
    if name == "RedisStateStore":
        from ._redis import RedisStateStore

        return RedisStateStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
