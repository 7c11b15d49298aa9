"""The store named by the config's ``loop.state_store``."""

from __future__ import annotations

import re

from sqlalchemy.engine import Engine

from ..errors import InvalidInput
from ._sql import SqlStateStore
from ._store import UserStateStore

__all__ = ["make_state_store"]

_CREDENTIALS = re.compile(r"(//[^/:@]*:)[^/@]*@")


def make_state_store(spec: str, db: Engine, *, half_life_s: float = 3600.0, max_events: int = 50,
                     impression_half_life: float | None = None) -> UserStateStore:
    """The store named by the config's ``loop.state_store``.

    Parameters
    ----------
    spec
        ``"sql"``: tables ``user_state`` / ``item_stats`` in the log's database ``db``;
        ``"redis://host:port/N"`` (or ``rediss://``): that Redis database.

    Raises
    ------
    InvalidInput
        For anything else (field ``state_store``).
    """
    if spec == "sql":
        return SqlStateStore(db, half_life_s=half_life_s, max_events=max_events,
                             impression_half_life=impression_half_life)
    if isinstance(spec, str) and spec.startswith(("redis://", "rediss://")):
        from ._redis import RedisStateStore  # redis-py is imported only where Redis is used

        return RedisStateStore(spec, half_life_s=half_life_s, max_events=max_events,
                               impression_half_life=impression_half_life)
    shown = _CREDENTIALS.sub(r"\1***@", spec) if isinstance(spec, str) else spec
    raise InvalidInput(f"state_store must be 'sql' or a redis:// URL; got {shown!r}", field="state_store")
