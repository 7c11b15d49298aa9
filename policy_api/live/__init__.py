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
from ._redis import RedisStateStore
from ._sql import SqlStateStore
from ._state import (
    IMPRESSION,
    NEGATIVE_TYPES,
    POSITIVE_TYPES,
    ItemStats,
    LiveEvent,
    UserState,
    apply_events,
    category_vector,
    live_sequences,
)
from ._store import UserStateStore

__all__ = [
    "IMPRESSION",
    "NEGATIVE_TYPES",
    "POSITIVE_TYPES",
    "ItemStats",
    "LiveEvent",
    "RedisStateStore",
    "SqlStateStore",
    "UserState",
    "UserStateStore",
    "apply_events",
    "category_vector",
    "live_sequences",
    "make_state_store",
]
