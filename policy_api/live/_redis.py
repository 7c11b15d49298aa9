"""The live state in Redis (redis-py): one string key per user, one hash of item stats.

Keys, under ``key_prefix``: ``<prefix>u:<user_id>`` holds the user's state as JSON (orjson);
``<prefix>items`` is a hash ``item_id -> [engagement, updated]``. A read is one ``MGET``; a write is one
optimistic transaction (``WATCH`` the keys, read, apply, ``MULTI``/``EXEC``), retried when another
writer got in between, so concurrent writers never lose events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.exceptions import WatchError
from redis.retry import Retry

from ._state import (
    ItemStats,
    LiveEvent,
    UserState,
    apply_events,
    decode_item,
    decode_state,
    encode_item,
    encode_state,
    item_increments,
    item_stats_at,
    merge_item,
)
from ._store import DeadlineStore

__all__ = ["RedisStateStore"]

_WRITE_ATTEMPTS = 20


def watch(pipe: Pipeline) -> Callable[..., Any]:
    """``pipe.watch``, which redis-py leaves unannotated (typed here once rather than ignored per call)."""
    method: Callable[..., Any] = pipe.watch
    return method


class RedisStateStore(DeadlineStore):
    """:class:`~policy_api.live.UserStateStore` on Redis.

    Parameters
    ----------
    url
        ``redis://[[user]:password@]host:port/N`` (or ``rediss://``).
    half_life_s, max_events, impression_half_life
        See :func:`~policy_api.live.apply_events`.
    socket_timeout_s, connect_timeout_s
        redis-py's ``socket_timeout`` / ``socket_connect_timeout``: a Redis that stops answering frees a
        stuck read thread (and fails a write) after this long. No retries: a read that fails is a cold
        user for one request, and the next read reconnects.
    key_prefix
        Namespace of every key (several deployments or tests in one Redis database).
    read_threads
        Reads in flight at once (see :class:`~policy_api.live._store.DeadlinePool`).
    """

    def __init__(self, url: str, *, half_life_s: float = 3600.0, max_events: int = 50,
                 socket_timeout_s: float = 1.0, connect_timeout_s: float = 1.0,
                 key_prefix: str = "homepage:live:", read_threads: int = 4,
                 impression_half_life: float | None = None) -> None:
        super().__init__(half_life_s=half_life_s, max_events=max_events, read_threads=read_threads,
                         name="live-redis-read", impression_half_life=impression_half_life)
        self.key_prefix = key_prefix
        self._items_key = f"{key_prefix}items"
        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
            retry=Retry(NoBackoff(), 0), decode_responses=False)

    def _user_key(self, user_id: str) -> str:
        return f"{self.key_prefix}u:{user_id}"

    # ---- writes
    def _write(self, events: Sequence[LiveEvent]) -> None:
        by_user: dict[str, list[LiveEvent]] = {}
        for e in events:
            by_user.setdefault(e.user_id, []).append(e)
        users = sorted(by_user)
        user_keys = [self._user_key(u) for u in users]
        increments = item_increments(events, self.half_life_s)
        items = sorted(increments)
        with self.client.pipeline(transaction=True) as pipe:
            for attempt in range(_WRITE_ATTEMPTS):
                try:
                    watch(pipe)(*user_keys, self._items_key)
                    old_users: list[Any] = pipe.mget(user_keys) if user_keys else []
                    old_items: list[Any] = pipe.hmget(self._items_key, items) if items else []
                    new_users = {
                        k: encode_state(apply_events(decode_state(raw), by_user[u], half_life_s=self.half_life_s,
                                                     max_events=self.max_events,
                                                     impression_half_life=self.impression_half_life, forget=self.forget))
                        for u, k, raw in zip(users, user_keys, old_users, strict=True)
                    }
                    new_items: list[str | bytes] = []  # hset(items=[field, value, ...])
                    for i, raw in zip(items, old_items, strict=True):
                        old = None if raw is None else decode_item(raw)
                        new_items += [i, encode_item(merge_item(old, increments[i], self.half_life_s))]
                    pipe.multi()
                    if new_users:
                        pipe.mset(new_users)
                    if new_items:
                        pipe.hset(self._items_key, items=new_items)
                    pipe.execute()
                    return
                except WatchError:
                    if attempt == _WRITE_ATTEMPTS - 1:
                        raise
                    pipe.reset()

    # ---- reads (on the deadline pool)
    def _read_users(self, user_ids: Sequence[str]) -> list[UserState | None]:
        raw: list[Any] = self.client.mget([self._user_key(u) for u in user_ids])
        return [decode_state(r) for r in raw]

    def _read_item_rows(self) -> ItemStats | None:
        raw: dict[Any, Any] = self.client.hgetall(self._items_key)
        return item_stats_at({k.decode(): decode_item(v) for k, v in raw.items()}, self.half_life_s)

    def _close(self) -> None:
        self.client.close()
