"""`homepage_client` against a real `homepage serve` process, with faults injected by a real TCP relay
between them (connections reset, responses lost after the engine processed the request, 503s)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from homepage_client import (
    ConfigJob,
    ConfigJobError,
    Event,
    HomepageClient,
    HomepageClientError,
    Layout,
    Module,
)
from policy_api import registry
from policy_api.log import make_engine

from .test_api import Server, free_port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("client"))
    yield s
    if s.proc.poll() is None:
        s.stop()


def _read_message(sock: socket.socket) -> bytes:
    """One HTTP/1.1 message with a Content-Length body (all the engine and requests send)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class Relay:
    """A TCP relay in front of the engine. Each request takes the next fault from ``faults`` (then
    plain forwarding): ``reset`` closes the connection without forwarding; ``lose_response`` forwards
    the request, lets the engine answer, and closes without passing the answer on; ``busy`` answers 503."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.faults: list[str] = []
        self.requests_forwarded = 0
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.url = f"http://127.0.0.1:{self.lsock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as up:
            while req := _read_message(client):
                fault = self.faults.pop(0) if self.faults else "forward"
                if fault == "reset":
                    return
                if fault == "busy":
                    body = b'{"error": {"code": "unavailable", "message": "busy", "field": null}}'
                    client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                   b"Retry-After: 0\r\nConnection: close\r\nContent-Length: "
                                   + str(len(body)).encode() + b"\r\n\r\n" + body)
                    return
                up.sendall(req)
                self.requests_forwarded += 1
                resp = _read_message(up)
                if fault == "lose_response":
                    return
                client.sendall(resp)

    def close(self) -> None:
        self.lsock.close()


@pytest.fixture
def relay(server):
    r = Relay(server.port)
    yield r
    r.close()


def feedback_rows(server, request_id: str) -> int:
    import sqlalchemy as sa

    eng = sa.create_engine(f"sqlite:///{server.db_path}")
    with eng.connect() as c:
        n = c.execute(sa.text("SELECT COUNT(*) FROM feedback WHERE request_id = :r"), {"r": request_id}).scalar_one()
    eng.dispose()
    return int(n)


def wait_for(fn, timeout=15.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.mark.slow  # a real server: gunicorn, two workers
def test_layout_is_typed_and_matches_the_wire(server):
    with HomepageClient(server.url, timeout=5) as client:
        page = client.layout("u00007", device="mobile", hour=20)
    assert isinstance(page, Layout) and page.source == "engine" and not page.fallback
    raw = requests.get(server.url + "/readyz", timeout=5).json()
    assert page.versions["config"] == raw["versions"]["config"]
    slots = sorted(m.slot for m in page.modules)
    assert slots == list(range(len(slots))) and len(slots) > 0
    assert all(isinstance(m, Module) and m.items for m in page.modules)
    assert 0 < page.propensity <= 1 and page.user_id == "u00007"


@pytest.mark.slow  # a real server: gunicorn, two workers
def test_feedback_is_idempotent_when_the_response_is_lost(server, relay):
    """The engine stores the events, the answer is lost on the way back, the client retries: the
    retry is reported as duplicates and the log holds each event exactly once."""
    client = HomepageClient(relay.url, timeout=5, retries=2, backoff_s=0.01)
    page = client.layout("u00011")
    item = page.modules[0].items[0].item_id
    events = [Event(slot=page.modules[0].slot, item_id=item, type="impression"),
              Event(slot=page.modules[0].slot, item_id=item, type="play")]
    relay.faults = ["lose_response"]
    before = relay.requests_forwarded
    res = client.feedback(page.request_id, events)
    assert relay.requests_forwarded - before == 2  # the engine saw the post twice
    # the retry may reach the other worker before the first post is flushed: then it is accepted
    # again and the log's unique event ids settle it; either way each event is stored once
    assert res.attempts == 2 and res.accepted + res.duplicates == 2
    wait_for(lambda: feedback_rows(server, page.request_id) == 2)
    time.sleep(1.0)
    assert feedback_rows(server, page.request_id) == 2  # never more
    client.close()


@pytest.mark.slow  # a real server: gunicorn, two workers
def test_retries_connection_resets_and_503_with_backoff(server, relay):
    client = HomepageClient(relay.url, timeout=5, retries=3, backoff_s=0.05)
    relay.faults = ["reset", "busy", "reset"]
    t0 = time.perf_counter()
    page = client.layout("u00012")
    took = time.perf_counter() - t0
    assert page.source == "engine" and page.request_id
    assert took >= 0.05 + 0.1 + 0.2  # three waits, doubling
    assert relay.faults == []
    # a 4xx is the caller's mistake: raised at once, not retried
    relay.faults = []
    before = relay.requests_forwarded
    with pytest.raises(HomepageClientError) as e:
        client.layout("u00012", device="toaster")
    assert e.value.status == 400 and e.value.field == "device" and "toaster" in e.value.message
    assert relay.requests_forwarded - before == 1
    with pytest.raises(HomepageClientError) as e:
        client.feedback("never-issued", [Event(slot=0, item_id="i1", type="play")])
    assert e.value.status == 404 and e.value.field == "request_id"
    client.close()


def test_unreachable_engine_gives_the_fallback_layout_within_the_deadline():
    port = free_port()  # nothing listens there
    fallback = (Module(0, "home_default", "music", 0.0, ()),)
    client = HomepageClient(f"http://127.0.0.1:{port}", timeout=0.2, retries=2, backoff_s=0.02,
                            fallback=lambda user_id: fallback)
    t0 = time.perf_counter()
    page = client.layout("u1")
    assert time.perf_counter() - t0 < 3 * 0.2 + 0.02 + 0.04 + 0.5
    assert page.source == "client_fallback" and page.fallback and page.request_id is None
    assert page.modules == fallback
    strict = HomepageClient(f"http://127.0.0.1:{port}", timeout=0.2, retries=0, fallback=None)
    with pytest.raises(HomepageClientError, match="engine unreachable"):
        strict.layout("u1")
    with pytest.raises(HomepageClientError, match="engine unreachable"):
        strict.feedback("r", [Event(slot=0, item_id="i", type="play")])


def test_config_calls_run_as_jobs_and_wait_for_them(server):
    admin = HomepageClient(server.url, operator_token="sesame")
    db = make_engine(f"sqlite:///{server.db_path}")
    try:
        active = registry.active_config(db)
        assert active is not None
        dry = admin.dry_run_config(active.body)
        assert isinstance(dry, ConfigJob) and dry.kind == "dry_run" and dry.status == "done"
        assert dry.result is not None and dry.result["feasible"] and dry.result["diff"] == []  # the same text
        text = server.config.read_text()
        assert 'category = "live"\nmin = 0.1\n' in text
        new = text.replace('category = "live"\nmin = 0.1\n', 'category = "live"\nmin = 0.3\n')
        job = admin.apply_config(new, author="bob", note="more live")
        assert job.status == "done" and job.result is not None and job.result["previous_version"] == active.version
        rec = registry.active_config(db)  # the reference: the registry itself
        assert rec is not None and rec.version == job.result["version"] and rec.body == new
        assert (rec.author, rec.note) == ("bob", "more live")
        assert admin.config_job(job.job_id) == job
        with pytest.raises(ConfigJobError) as failed:
            admin.apply_config(text.replace('category = "live"\nmin = 0.1\n', 'category = "live"\nmin = 0.97\n'))
        assert failed.value.code == "infeasible" and failed.value.job.status == "failed"
        after = registry.active_config(db)
        assert after is not None and after.version == rec.version  # nothing applied
        with pytest.raises(HomepageClientError) as bad:
            admin.apply_config(text.replace("budget = 0.05", "budget = 5"))
        assert bad.value.status == 400 and bad.value.field == "exploration.budget"
        back = admin.rollback_config(active.version)
        assert back.result is not None and back.result["rolled_back_to"] == active.version
        assert registry.config_version(db, back.result["version"]).body == active.body
        with pytest.raises(HomepageClientError) as missing:
            admin.config_job("no-such-job")
        assert missing.value.status == 404 and missing.value.field == "job_id"
    finally:
        db.dispose()
    with pytest.raises(ValueError, match=r"operator_token must be given to HomepageClient for config calls"):
        HomepageClient(server.url).dry_run_config("x")
    with pytest.raises(ValueError, match=r"version must be an integer >= 1; got 0"):
        admin.rollback_config(0)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match=r"base_url must start with http:// or https://; got 'localhost:8000'"):
        HomepageClient("localhost:8000")
    with pytest.raises(ValueError, match=r"retries must be an integer >= 0; got -1"):
        HomepageClient("http://x", retries=-1)
    with pytest.raises(ValueError, match=r"timeout must be > 0 seconds; got 0"):
        HomepageClient("http://x", timeout=0)
    with pytest.raises(ValueError, match=r"user_id must be a non-empty string"):
        HomepageClient("http://x").layout(" ")
