"""A PostgreSQL outage while serving: layouts and feedback keep being answered, and after recovery every
decision and event is in the database exactly once. The outage is real: the server reaches PostgreSQL
through a TCP relay that this test takes down (connections cut, new ones refused) and brings back."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from simulator import make_world

from ..conftest import _postgres_admin_url
from .test_api import free_port

pytestmark = pytest.mark.postgres


class Relay:
    """A TCP relay 127.0.0.1:port -> PostgreSQL; ``down()`` cuts every connection and refuses new ones;
    ``freeze()`` keeps every connection open (new ones are accepted too) but forwards no byte until
    ``thaw()``: a server that is reachable but silent, whose peer's kernel still acknowledges."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thawed = threading.Event()
        self._thawed.set()
        self.up()

    def freeze(self) -> None:
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def up(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            if self._listener is not None:
                try:  # wakes the accept() blocked in the other thread; close() alone does not on Linux
                    self._listener.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._listener.close()
                self._listener = None
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
            self._socks.clear()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
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
                self._thawed.wait()  # frozen: read nothing, so bytes pile up in the kernel buffers
                if not (data := src.recv(65536)):
                    break
                self._thawed.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@contextlib.contextmanager
def relayed_postgres(tmp_path: Path, prefix: str, **env_extra: str
                     ) -> Iterator[tuple[sa.Engine, str, Relay, dict[str, str]]]:
    """A fresh PostgreSQL schema reached through a :class:`Relay`, the simulator's catalog loaded into it
    and a config beside it: yields (admin engine, schema, relay, the server's environment). Dropped after."""
    admin_url = _postgres_admin_url()
    if admin_url is None:
        pytest.skip("postgres tests need HOMEPAGE_TEST_POSTGRES_URL (unset)")
    admin = sa.create_engine(admin_url)
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.begin() as c:
        c.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    relay = Relay((admin_url.host or "127.0.0.1", admin_url.port or 5432))
    try:
        url = admin_url.set(host="127.0.0.1", port=relay.port).update_query_dict(
            {"options": f"-csearch_path={schema}"})
        world = make_world(n_users=30, n_items=300, seed=5)
        (tmp_path / "homepage.toml").write_text(world.default_config_toml())
        world.to_catalog_csv(tmp_path / "items.csv")
        env = dict(os.environ, DATABASE_URL=url.render_as_string(hide_password=False),
                   HOMEPAGE_DATA_DIR=str(tmp_path), HOMEPAGE_CONFIG=str(tmp_path / "homepage.toml"),
                   HOMEPAGE_RELOAD_S="0.5", HOMEPAGE_DB_CONNECT_TIMEOUT="1", **env_extra)
        done = subprocess.run([sys.executable, "-m", "policy_api.cli", "catalog", "load",
                               str(tmp_path / "items.csv")], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        yield admin, schema, relay, env
    finally:
        relay.thaw()
        relay.down()
        with admin.begin() as c:
            c.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.mark.slow
def test_an_outage_loses_nothing_and_fails_no_request(tmp_path):
    with relayed_postgres(tmp_path, "outage") as (admin, schema, relay, env):
        _outage(tmp_path, admin, schema, relay, env)


def _outage(tmp_path: Path, admin: sa.Engine, schema: str, relay: Relay, env: dict[str, str]) -> None:
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "policy_api.cli", "serve", "--port", str(port), "--workers", "2"],
                            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    sent_decisions, sent_events = set(), 0
    sess = requests.Session()

    def traffic(n: int, tag: str) -> float:
        nonlocal sent_events
        worst = 0.0
        for k in range(n):
            t0 = time.perf_counter()
            r = sess.get(base + "/layout", params={"user_id": f"{tag}{k % 9}"}, timeout=10)
            worst = max(worst, time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            body = r.json()
            assert not body["fallback"]
            sent_decisions.add(body["request_id"])
            ev = [{"event_id": f"{body['request_id']}:{j}", "slot": j, "type": "impression",
                   "item_id": body["modules"][j]["items"][0]["item_id"]} for j in range(2)]
            f = sess.post(base + "/feedback", json={"request_id": body["request_id"], "events": ev}, timeout=10)
            assert f.status_code == 202 and f.json()["accepted"] == 2, f.text
            sent_events += 2
        return worst

    try:
        ready_by = time.time() + 120  # a loaded 2-core machine may take a while to start 3 processes
        while True:
            try:
                if requests.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.time() < ready_by and proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        traffic(20, "before")
        relay.down()
        worst = traffic(40, "during")
        assert worst < 5.0  # answered from memory; the log waits in the spill file
        time.sleep(1.0)
        seen = [requests.get(base + "/readyz", timeout=5).json()["log"] for _ in range(10)]
        assert any(s["spilled"] > 0 or not s["healthy"] for s in seen), seen  # the outage was real
        relay.up()
        traffic(20, "after")
        deadline = time.time() + 60
        while time.time() < deadline:  # the writers replay their spill files once the database is back
            with admin.connect() as c:
                n = c.execute(sa.text(f'SELECT COUNT(*) FROM "{schema}".decisions')).scalar_one()
            if n >= len(sent_decisions):
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    with admin.connect() as c:
        ids = {r[0] for r in c.execute(sa.text(f'SELECT request_id FROM "{schema}".decisions'))}
        n_fb = c.execute(sa.text(f'SELECT COUNT(*) FROM "{schema}".feedback')).scalar_one()
        n_fb_distinct = c.execute(sa.text(f'SELECT COUNT(DISTINCT event_id) FROM "{schema}".feedback')).scalar_one()
    assert ids == sent_decisions, (len(ids), len(sent_decisions), (tmp_path / "server.log").read_text()[-3000:])
    assert n_fb == n_fb_distinct == sent_events
