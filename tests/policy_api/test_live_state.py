"""The live user state: the pure update rule against its closed form, and one suite that every store
backend passes (SQLite, PostgreSQL, Redis): round trip, two workers, a frozen backend under a read
deadline, item trends, concurrent writers.

References are independent of the code under test: engagement is the closed-form sum
``sum_e units_e * 2**(-(t - ts_e) / h)`` written with ``math.exp``, the recent sequence is a sort of all
events by ``(ts, arrival)``, counts are counted. The frozen backend is real: the store reaches
PostgreSQL and Redis through a TCP relay that keeps accepting connections but stops moving bytes.

Redis: ``HOMEPAGE_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``); each test uses its own key
prefix and deletes its keys. The Redis tests are skipped only when the variable is unset and nothing
answers at the default address; with the variable set, an unreachable Redis fails them.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from policy_api.errors import InvalidInput
from policy_api.live import (
    IMPRESSION,
    NEGATIVE_TYPES,
    POSITIVE_TYPES,
    LiveEvent,
    RedisStateStore,
    SqlStateStore,
    UserState,
    UserStateStore,
    apply_events,
    category_vector,
    make_state_store,
)
from policy_api.log import make_engine, upgrade

from ..conftest import _postgres_admin_url

REDIS_ENV = "HOMEPAGE_TEST_REDIS_URL"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"
UNITS = {"play": 1.0, "full_play": 2.5, "favorite": 4.0, "share": 6.0, "skip": -1.5}
CATEGORIES = ("music", "news", "sport", "kids")
T0 = 1_700_000_000.0


# ------------------------------------------------------------------------------------------ reference


def closed_form(events: Sequence[LiveEvent], half_life_s: float, max_events: int) -> dict[str, Any]:
    """Everything a user's state must hold after ``events`` (in arrival order), from first principles."""
    updated = max(e.ts for e in events)
    engagement: dict[str, float] = {}
    shown: dict[str, float] = {}
    for e in events:
        into = shown if e.type == "impression" else engagement
        into[e.category] = into.get(e.category, 0.0) + e.units * math.exp(-math.log(2.0) * (updated - e.ts) / half_life_s)
    events = [e for e in events if e.type != "impression"]  # impressions join no sequence and no count
    order = sorted(range(len(events)), key=lambda k: (events[k].ts, k), reverse=True)[:max_events]
    return {
        "impressions": shown,
        "items": tuple(events[k].item_id for k in order),
        "types": tuple(events[k].type for k in order),
        "ts": tuple(events[k].ts for k in order),
        "engagement": engagement,
        "n_positive": sum(e.type in ("play", "full_play", "favorite", "share") for e in events),
        "n_negative": sum(e.type == "skip" for e in events),
        "updated": updated,
    }


def assert_state(state: UserState | None, events: Sequence[LiveEvent], half_life_s: float, max_events: int) -> None:
    ref = closed_form(events, half_life_s, max_events)
    assert state is not None
    assert (state.items, state.types, state.ts) == (ref["items"], ref["types"], ref["ts"])
    assert state.n_positive == ref["n_positive"] and state.n_negative == ref["n_negative"]
    assert state.updated == ref["updated"]
    assert set(state.category_engagement) == set(ref["engagement"])
    for c, v in ref["engagement"].items():
        assert state.category_engagement[c] == pytest.approx(v, rel=1e-9, abs=1e-12), c
    assert set(state.category_impressions) == set(ref["impressions"])
    for c, v in ref["impressions"].items():
        assert state.category_impressions[c] == pytest.approx(v, rel=1e-9, abs=1e-12), c


def random_events(rng: np.random.Generator, n: int, users: Sequence[str] = ("u0",), n_items: int = 30,
                  span_s: float = 6 * 3600.0) -> list[LiveEvent]:
    """Events in a shuffled arrival order (impressions among them, as the loop writes them: examined
    weights of one user's category); half the times are whole seconds so that some tie."""
    types = [*UNITS, "impression"]
    out = []
    for k in range(n):
        ts = T0 + float(rng.uniform(0, span_s))
        if k % 2:
            ts = float(round(ts / 60.0) * 60.0)
        t = types[int(rng.integers(len(types)))]
        units = float(rng.uniform(0.0, 30.0)) if t == "impression" else UNITS[t] * float(rng.uniform(0.5, 1.5))
        out.append(LiveEvent(user_id=users[int(rng.integers(len(users)))],
                             item_id="" if t == "impression" else f"i{int(rng.integers(n_items))}",
                             category=CATEGORIES[int(rng.integers(len(CATEGORIES)))], type=t, units=units, ts=ts))
    return out


def split(rng: np.random.Generator, events: list[LiveEvent], n_batches: int) -> list[list[LiveEvent]]:
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, len(events)), size=n_batches - 1, replace=False))
    return [events[a:b] for a, b in zip([0, *cuts], [*cuts, len(events)], strict=True)]


# ---------------------------------------------------------------------------------------- pure rules


def test_event_types_are_the_configs():
    from allocator import EVENT_TYPES

    assert set(POSITIVE_TYPES) | set(NEGATIVE_TYPES) == set(EVENT_TYPES)
    assert not set(POSITIVE_TYPES) & set(NEGATIVE_TYPES)


def test_apply_events_matches_the_closed_form(seed):
    rng = np.random.default_rng(seed)
    h, max_events = 1800.0, 25
    events = random_events(rng, 400)
    state = None
    for batch in split(rng, events, 12):  # shuffled times: most batches hold events older than the state
        frozen = list(batch)
        state = apply_events(state, batch, half_life_s=h, max_events=max_events)
        assert batch == frozen  # inputs not mutated
        assert len(state.items) <= max_events
    assert_state(state, events, h, max_events)
    assert state.positives() == [i for i, t in zip(state.items, state.types, strict=True) if t != "skip"]
    assert state.negatives() == [i for i, t in zip(state.items, state.types, strict=True) if t == "skip"]
    # the category vector at a later time, against the closed form at that time
    now = state.updated + 2500.0
    names = [*CATEGORIES, "unseen"]
    want = [sum(e.units * math.exp(-math.log(2.0) * (now - e.ts) / h) for e in events
                if e.category == c and e.type != "impression") for c in names]
    np.testing.assert_allclose(category_vector(state, names, now, h), want, rtol=1e-9, atol=1e-12)
    want = [sum(e.units * math.exp(-math.log(2.0) * (now - e.ts) / h) for e in events
                if e.category == c and e.type == "impression") for c in names]
    np.testing.assert_allclose(category_vector(state, names, now, h, impressions=True), want, rtol=1e-9, atol=1e-12)
    assert category_vector(None, names, now, h).tolist() == [0.0] * 5
    # a reader's clock behind the writer's reads the state as of `updated`, never an extrapolation
    np.testing.assert_array_equal(category_vector(state, names, state.updated - 100.0, h),
                                  category_vector(state, names, state.updated, h))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    times=st.lists(st.integers(0, 20_000), min_size=1, max_size=40),
    data=st.data(),
)
def test_any_arrival_order_and_batching_gives_the_same_state(times, data):
    n = len(times)
    kinds = data.draw(st.lists(st.sampled_from(list(UNITS)), min_size=n, max_size=n))
    cats = data.draw(st.lists(st.sampled_from(CATEGORIES[:2]), min_size=n, max_size=n))
    events = [LiveEvent("u", f"i{k}", c, t, UNITS[t], T0 + ts)
              for k, (ts, t, c) in enumerate(zip(times, kinds, cats, strict=True))]
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=5)))) if n > 1 else []
    state = None
    for a, b in zip([0, *cuts], [*cuts, n], strict=True):
        state = apply_events(state, events[a:b], half_life_s=3000.0, max_events=7)
    assert_state(state, events, 3000.0, 7)


def test_apply_events_refuses_what_breaks_its_contract():
    e = LiveEvent("u1", "i1", "music", "play", 1.0, T0)
    with pytest.raises(InvalidInput, match=r"events must all be of user 'u1'; got an event of 'u2'"):
        apply_events(None, [e, LiveEvent("u2", "i1", "music", "play", 1.0, T0)], half_life_s=60.0, max_events=5)
    with pytest.raises(InvalidInput, match=r"events must not be empty when there is no state"):
        apply_events(None, [], half_life_s=60.0, max_events=5)
    with pytest.raises(InvalidInput, match=r"half_life_s must be a finite number > 0; got 0"):
        apply_events(None, [e], half_life_s=0, max_events=5)
    with pytest.raises(InvalidInput, match=r"max_events must be an integer >= 1; got 0"):
        apply_events(None, [e], half_life_s=60.0, max_events=0)
    with pytest.raises(InvalidInput, match=r"type must be one of play, full_play, favorite, share, skip, "
                                           r"impression; got 'click'") as err:
        LiveEvent("u1", "i1", "music", "click", 0.0, T0)
    assert err.value.field == "type"
    with pytest.raises(InvalidInput, match=r"units of an impression \(its examination weight\) must be >= 0; "
                                           r"got -1.0") as err:
        LiveEvent("u1", "", "music", IMPRESSION, -1.0, T0)
    assert err.value.field == "units"
    with pytest.raises(InvalidInput, match=r"ts must be a finite number; got nan"):
        LiveEvent("u1", "i1", "music", "play", 1.0, math.nan)
    state = apply_events(None, [e], half_life_s=60.0, max_events=5)
    assert apply_events(state, [], half_life_s=60.0, max_events=5) == state


def test_make_state_store_refuses_other_stores(tmp_path):
    db = make_engine(f"sqlite:///{tmp_path / 'log.sqlite'}")
    try:
        with pytest.raises(InvalidInput, match=r"state_store must be 'sql' or a redis:// URL; got 'mysql://x'") as err:
            make_state_store("mysql://x", db)
        assert err.value.field == "state_store"
        with pytest.raises(InvalidInput, match=r"got 'mysql://me:\*\*\*@h/db'") as err:
            make_state_store("mysql://me:secret@h/db", db)
        assert "secret" not in str(err.value)
        sql = make_state_store("sql", db, half_life_s=60.0, max_events=3)
        red = make_state_store("redis://127.0.0.1:1/0", db)  # redis-py connects on first use
        assert isinstance(sql, SqlStateStore) and isinstance(red, RedisStateStore)
        assert isinstance(sql, UserStateStore) and isinstance(red, UserStateStore)
        assert (sql.half_life_s, sql.max_events) == (60.0, 3)
        with pytest.raises(InvalidInput, match=r"deadline_s must be a finite number > 0; got 0"):
            sql.read(["u"], deadline_s=0)
        # nothing listens on port 1: a failed read is a cold user, counted, never an exception
        assert red.read(["u", "v"], deadline_s=2.0) == [None, None] and red.read_items(deadline_s=2.0) is None
        assert {k: red.stats()[k] for k in ("reads", "errors", "timeouts")} == {"reads": 2, "errors": 2, "timeouts": 0}
        with pytest.raises(redis.ConnectionError):  # the writer is told, so it can retry the batch
            red.write_batch([LiveEvent("u", "i", "music", "play", 1.0, T0)])
        assert red.stats()["errors"] == 3 and red.stats()["writes"] == 0
        sql.close()
        red.close()
    finally:
        db.dispose()


# -------------------------------------------------------------------------------------------- backends


class FreezableRelay:
    """A TCP relay 127.0.0.1:port -> upstream; ``freeze()`` keeps accepting connections but moves no byte
    either way (a backend that is up and never answers), ``thaw()`` delivers what waited."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._flowing.set()
        try:  # wakes the accept() blocked in the other thread; close() alone does not on Linux
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._socks.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # frozen while this was in flight: hold it
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class WalReadLock:
    """Freezes an SQLite WAL database for readers as a stuck process would: a child process holds the
    WAL index's five read-mark locks (bytes 123-127 of the ``-shm`` file, SQLite's unix VFS), so a
    reader can start no read transaction; SQLite retries for about 10 s, past any busy timeout."""

    def __init__(self, url: str) -> None:
        self.shm = f"{sa.make_url(url).database}-shm"
        self.proc: subprocess.Popen[str] | None = None

    def hold(self) -> None:
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                "fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 123); print('held', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, self.shm], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the child exits: the kernel drops its locks
            self.proc.wait(10)
            self.proc = None


@dataclass
class Backend:
    """One backend of the shared suite: builds stores on it (each a separate "worker")."""

    kind: str
    url: str
    prefix: str = ""
    closers: list[Callable[[], None]] = field(default_factory=list)

    def store(self, url: str | None = None, **kw: Any) -> UserStateStore:
        if self.kind == "redis":
            s: UserStateStore = RedisStateStore(url or self.url, key_prefix=self.prefix, **kw)
        else:
            eng = make_engine(url or self.url, **({"connect_timeout_s": 1.0} if self.kind == "postgres" else {}))
            self.closers.append(eng.dispose)
            s = SqlStateStore(eng, **kw)
        self.closers.append(s.close)
        return s

    def slow_store(self, **kw: Any) -> tuple[UserStateStore, Callable[[], None], Callable[[], None]]:
        """A store whose backend can be frozen: (store, freeze, thaw)."""
        if self.kind == "sqlite":  # no socket to cut: another process holds the WAL index's read locks
            s = self.store(**kw)
            lock = WalReadLock(self.url)
            self.closers.append(lock.release)
            return s, lock.hold, lock.release
        if self.kind == "postgres":
            parsed = sa.make_url(self.url)
            relay = FreezableRelay((parsed.host or "127.0.0.1", parsed.port or 5432))
            url = parsed.set(host="127.0.0.1", port=relay.port).render_as_string(hide_password=False)
        else:
            parsed_r = redis.connection.parse_url(self.url)
            relay = FreezableRelay((parsed_r.get("host", "127.0.0.1"), int(parsed_r.get("port", 6379))))
            url = f"redis://127.0.0.1:{relay.port}/{parsed_r.get('db', 0)}"
            kw.setdefault("socket_timeout_s", 0.5)
        self.closers.append(relay.close)
        return self.store(url, **kw), relay.freeze, relay.thaw

    def close(self) -> None:
        for fn in reversed(self.closers):
            fn()


def _redis_url() -> str:
    url = os.environ.get(REDIS_ENV) or REDIS_DEFAULT
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping()
    except redis.RedisError:
        if os.environ.get(REDIS_ENV):
            raise
        pytest.skip(f"redis tests need {REDIS_ENV} or a Redis at {REDIS_DEFAULT} (neither)")
    return url


@pytest.fixture(params=[
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    pytest.param("redis", id="redis"),
])
def backend(request: pytest.FixtureRequest, tmp_path) -> Iterator[Backend]:
    """An empty backend: a migrated SQLite file, a migrated PostgreSQL schema (the ``database_url``
    pattern of conftest.py; skipped only when HOMEPAGE_TEST_POSTGRES_URL is unset) or a Redis key prefix."""
    if request.param == "sqlite":
        b = Backend("sqlite", f"sqlite:///{tmp_path / 'log.sqlite'}")
        upgrade(b.url)
        yield b
        b.close()
        return
    if request.param == "redis":
        url = _redis_url()
        b = Backend("redis", url, prefix=f"test-live:{uuid.uuid4().hex[:12]}:")
        try:
            yield b
        finally:
            b.close()
            client = redis.Redis.from_url(url)
            keys = list(client.scan_iter(match=f"{b.prefix}*"))
            if keys:
                client.delete(*keys)
            client.close()
        return
    admin: sa.Engine = request.getfixturevalue("_postgres_admin")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    base = _postgres_admin_url()
    assert base is not None
    options = base.query.get("options")
    search = f"-csearch_path={schema}"
    url = base.update_query_dict({"options": f"{options} {search}" if options else search})
    b = Backend("postgres", url.render_as_string(hide_password=False))
    try:
        upgrade(b.url)
        yield b
    finally:
        b.close()
        with admin.begin() as conn:
            conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))


def poll(fn: Callable[[], Any], ok: Callable[[Any], bool], within_s: float) -> tuple[Any, float]:
    start = time.perf_counter()
    while True:
        out = fn()
        elapsed = time.perf_counter() - start
        if ok(out) or elapsed > within_s:
            return out, elapsed


# ------------------------------------------------------------------------------------- shared suite


def test_round_trip_equals_apply_events_over_every_batch(backend, seed):
    rng = np.random.default_rng(seed)
    h, max_events = 900.0, 8
    store = backend.store(half_life_s=h, max_events=max_events)
    users = [f"user-{k}" for k in range(6)]
    events = random_events(rng, 240, users=users)
    for batch in split(rng, events, 7):
        store.write_batch(batch)
    got = store.read([*users, "nobody", users[0]], deadline_s=5.0)
    assert got[len(users)] is None and got[-1] == got[0]
    for u, state in zip(users, got, strict=False):
        mine = [e for e in events if e.user_id == u]
        assert_state(state, mine, h, max_events)
        once = apply_events(None, mine, half_life_s=h, max_events=max_events)
        assert state is not None and (state.items, state.types, state.ts, state.n_positive, state.updated) == (
            once.items, once.types, once.ts, once.n_positive, once.updated)
    assert store.read([], deadline_s=1.0) == []
    s = store.stats()
    assert (s["writes"], s["events_written"], s["timeouts"], s["errors"]) == (7, 240, 0, 0)
    assert s["reads"] == 1  # an empty read asks nothing


def test_another_worker_reads_the_new_state_within_100ms(backend):
    writer, reader = backend.store(), backend.store()
    assert reader.read(["u"], deadline_s=5.0) == [None]
    first = LiveEvent("u", "i1", "music", "play", 1.0, T0)
    writer.write_batch([first])
    got, elapsed = poll(lambda: reader.read(["u"], deadline_s=0.1)[0], lambda s: s is not None, 0.1)
    assert got is not None and got.items == ("i1",) and elapsed < 0.1
    writer.write_batch([LiveEvent("u", "i2", "news", "skip", -1.0, T0 + 5)])
    got, elapsed = poll(lambda: reader.read(["u"], deadline_s=0.1)[0], lambda s: s is not None and s.n_negative, 0.1)
    assert got is not None and got.items == ("i2", "i1") and elapsed < 0.1


def test_a_frozen_backend_cannot_hold_a_read_past_its_deadline(backend):
    writer = backend.store()
    reader, freeze, thaw = backend.slow_store()
    writer.write_batch([LiveEvent("u", "i1", "music", "share", 6.0, T0)])
    assert reader.read(["u"], deadline_s=5.0)[0] is not None  # connected through the relay
    before = reader.stats()
    freeze()
    worst = 0.0
    for _ in range(20):
        start = time.perf_counter()
        got = reader.read(["u"], deadline_s=0.05)
        worst = max(worst, time.perf_counter() - start)
        assert got == [None]
    start = time.perf_counter()
    assert reader.read_items(deadline_s=0.05) is None
    worst = max(worst, time.perf_counter() - start)
    after = reader.stats()
    assert worst < 0.05 + 0.05, (worst, before, after)
    assert after["timeouts"] - before["timeouts"] == 21, (before, after)
    assert after["shed"] - before["shed"] > 0, (before, after)  # all read threads stuck: answered at once
    thaw()
    got, elapsed = poll(lambda: reader.read(["u"], deadline_s=0.5)[0], lambda s: s is not None, 10.0)
    assert got is not None and got.items == ("i1",), elapsed
    items = reader.read_items(deadline_s=2.0)
    assert items is not None and items.item_ids.tolist() == ["i1"]


def test_item_stats_are_decayed_positive_units(backend, seed):
    rng = np.random.default_rng(seed)
    h = 1200.0
    store = backend.store(half_life_s=h)
    events = random_events(rng, 300, users=["a", "b", "c"], n_items=25)
    events.append(LiveEvent("a", "only-skipped", "news", "skip", -1.5, T0 + 10))
    for batch in split(rng, events, 5):
        store.write_batch(batch)
    got = store.read_items(deadline_s=5.0)
    positive = [e for e in events if e.type not in ("skip", "impression")]  # impressions add no trend either
    updated = max(e.ts for e in positive)
    want: dict[str, float] = {}
    for e in positive:
        want[e.item_id] = want.get(e.item_id, 0.0) + e.units * math.exp(-math.log(2.0) * (updated - e.ts) / h)
    assert got is not None and got.updated == updated
    assert sorted(got.item_ids.tolist()) == sorted(want)  # skips add nothing, not even a row
    np.testing.assert_allclose(got.engagement, [want[i] for i in got.item_ids.tolist()], rtol=1e-9)
    assert (np.diff(got.engagement) <= 0).all()  # most engaged first
    assert backend.store().read_items(deadline_s=5.0) is not None  # another worker sees them


def test_concurrent_writers_lose_no_event(backend):
    a, b = backend.store(max_events=500), backend.store(max_events=500)
    users = ["x", "y", "z"]

    def work(store: UserStateStore, tag: int) -> None:
        for k in range(8):
            store.write_batch([LiveEvent(users[(j + k) % 3], f"i{tag}-{k}-{j}", "music", "play", 1.0,
                                         T0 + tag + 10 * k + j) for j in range(12)])

    threads = [threading.Thread(target=work, args=(s, t)) for t, s in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    states = a.read(users, deadline_s=5.0)
    assert sum(s.n_positive for s in states if s is not None) == 2 * 8 * 12
    items = a.read_items(deadline_s=5.0)
    assert items is not None and len(items.item_ids) == 2 * 8 * 12
    assert a.stats()["errors"] == b.stats()["errors"] == 0


def test_a_state_written_before_impressions_were_kept_still_reads():
    from policy_api.live._state import decode_state, encode_state

    old = (b'{"v":1,"user_id":"u","items":["i1"],"types":["play"],"ts":[5.0],"category_engagement":{"music":1.5},'
           b'"n_positive":1,"n_negative":0,"updated":5.0}')
    got = decode_state(old)
    assert got is not None and got.category_engagement == {"music": 1.5} and got.category_impressions == {}
    assert decode_state(encode_state(got)) == got
    with pytest.raises(ValueError, match=r"live state format must be 1 or 2; got 9"):
        decode_state(old.replace(b'"v":1', b'"v":9'))


def test_the_state_fades_with_the_users_own_impressions():
    """With ``impression_half_life``, what the state held before a batch is multiplied by
    ``2**(-I / h_imp)`` (``I``: the batch's examined impressions) on top of the time decay; the batch
    itself is not."""
    h, h_imp = 600.0, 50.0
    first = [LiveEvent("u", "i1", "music", "play", 3.0, T0), LiveEvent("u", "", "music", IMPRESSION, 10.0, T0),
             LiveEvent("u", "", "news", IMPRESSION, 4.0, T0)]
    s1 = apply_events(None, first, half_life_s=h, max_events=5, impression_half_life=h_imp)
    assert s1.category_engagement == {"music": 3.0}  # nothing was there before the first batch
    assert s1.category_impressions == pytest.approx({"music": 10.0, "news": 4.0})
    second = [LiveEvent("u", "", "news", IMPRESSION, 20.0, T0 + 120), LiveEvent("u", "", "news", IMPRESSION, 5.0, T0 + 60),
              LiveEvent("u", "i2", "news", "skip", -0.5, T0 + 90)]
    s2 = apply_events(s1, second, half_life_s=h, max_events=5, impression_half_life=h_imp)
    fade = 0.5 ** (25.0 / h_imp) * 0.5 ** (120.0 / h)  # 25 examined impressions, 120 s
    assert s2.category_engagement == pytest.approx({"music": 3.0 * fade, "news": -0.5 * 0.5 ** (30.0 / h)})
    assert s2.category_impressions == pytest.approx({"music": 10.0 * fade,
                                                     "news": 4.0 * fade + 20.0 + 5.0 * 0.5 ** (60.0 / h)})
    # without it, only time decays the state
    s3 = apply_events(s1, second, half_life_s=h, max_events=5)
    assert s3.category_engagement["music"] == pytest.approx(3.0 * 0.5 ** (120.0 / h))
    s4 = apply_events(s1, second, half_life_s=h, max_events=5, impression_half_life=math.inf)
    assert s4.category_engagement["music"] == pytest.approx(s3.category_engagement["music"])
    with pytest.raises(InvalidInput, match=r"impression_half_life must be a number > 0 \(inf: none\) or None; got 0"):
        apply_events(s1, second, half_life_s=h, max_events=5, impression_half_life=0)


def test_long_tail_items_join_the_sequences_but_not_the_category_sums():
    events = [LiveEvent("u", "i1", "music", "play", 1.0, T0), LiveEvent("u", "i2", "music", "skip", -0.5, T0 + 1, head=False),
              LiveEvent("u", "", "music", IMPRESSION, 4.0, T0 + 2), LiveEvent("u", "", "music", IMPRESSION, 3.0, T0 + 2,
                                                                              head=False)]
    s = apply_events(None, events, half_life_s=1e9, max_events=5, impression_half_life=10.0)
    assert s.items == ("i2", "i1") and s.n_negative == 1 and s.negatives() == ["i2"]
    assert s.category_engagement == pytest.approx({"music": 1.0}) and s.category_impressions == pytest.approx({"music": 4.0})
    # the fading counts the head's impressions too: 4 of them against a half-life of 10
    s2 = apply_events(s, [LiveEvent("u", "", "music", IMPRESSION, 4.0, T0 + 3),
                          LiveEvent("u", "", "music", IMPRESSION, 9.0, T0 + 3, head=False)],
                      half_life_s=1e9, max_events=5, impression_half_life=10.0)
    assert s2.category_impressions["music"] == pytest.approx(4.0 * 0.5 ** 0.4 + 4.0, rel=1e-6)
