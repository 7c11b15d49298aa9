"""Faults injected for real into a real server (``homepage serve``, gunicorn, 2 workers) on a real
PostgreSQL reached through a TCP relay the test controls: a frozen database, a worker ``kill -9``, a
graceful stop during an outage, and a full journal disk (a tiny tmpfs mounted for the test). Each
asserts that requests are answered within the configured deadlines and that the database ends up
holding exactly what the API acknowledged: 0 lost, 0 duplicated."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa

from .test_api import free_port
from .test_outage import Relay, relayed_postgres

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

DB_DEADLINE_MS = 200  # HOMEPAGE_DB_DEADLINE_MS given to the server
STALL_S = 1.0  # HOMEPAGE_WRITER_STALL_S
#: a connection broken by a killed worker: before the answer, or in the middle of its body (a worker
#: killed after its headers went out); either way nothing reached the client, so nothing was acknowledged
BROKEN = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


@dataclass
class Acked:
    """What clients were answered: acknowledged decisions and events, refusals, worst latency."""

    decisions: set[str] = field(default_factory=set)
    events: set[str] = field(default_factory=set)
    refused: int = 0  # feedback answered 503 (+ Retry-After)
    failed: int = 0  # connection broken (a killed worker): nothing was acknowledged
    statuses: dict[int, int] = field(default_factory=dict)
    worst_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Site:
    """A PostgreSQL schema behind a relay, a data folder with a catalog, and the server's env."""

    tmp: Path
    admin: sa.Engine
    schema: str
    relay: Relay
    env: dict[str, str]

    def rows(self) -> tuple[set[str], list[str]]:
        with self.admin.connect() as c:
            dec = [r[0] for r in c.execute(sa.text(f'SELECT request_id FROM "{self.schema}".decisions'))]
            fb = [r[0] for r in c.execute(sa.text(f'SELECT event_id FROM "{self.schema}".feedback'))]
        assert len(dec) == len(set(dec))  # primary key: never two rows for one decision
        return set(dec), fb

    def wait_rows(self, acked: Acked, timeout: float = 30.0) -> tuple[set[str], list[str]]:
        deadline = time.time() + timeout
        while True:
            dec, fb = self.rows()
            if (acked.decisions <= dec and acked.events <= set(fb)) or time.time() > deadline:
                return dec, fb
            time.sleep(0.3)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with relayed_postgres(tmp_path, "faults", HOMEPAGE_DB_DEADLINE_MS=str(DB_DEADLINE_MS),
                          HOMEPAGE_WRITER_STALL_S=str(STALL_S), HOMEPAGE_SHUTDOWN_FLUSH_S="2"
                          ) as (admin, schema, relay, env):
        yield Site(tmp_path, admin, schema, relay, env)


class Server:
    """``homepage serve --no-loop`` (gunicorn master + 2 workers) as a child process."""

    def __init__(self, site: Site, name: str = "server") -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.logfile = site.tmp / f"{name}.log"
        self.spill = Path(site.env.get("HOMEPAGE_SPILL_DIR") or site.tmp / "spill")
        with self.logfile.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "policy_api.cli", "serve", "--port", str(self.port), "--workers", "2",
                 "--no-loop"], env=site.env, cwd=site.tmp, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 90
        while time.time() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.base + "/readyz", timeout=1).status_code == 200:
                    return
            assert self.proc.poll() is None, self.log()
            time.sleep(0.2)
        raise AssertionError(f"server not ready: {self.log()}")

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")[-4000:]

    def workers(self) -> list[int]:
        """The gunicorn workers: children of the master running the same command line."""
        own = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes()
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid and (p / "cmdline").read_bytes() == own:
                    pids.append(int(p.name))
        return pids

    def stop(self, timeout: float = 30.0) -> float:
        """SIGTERM (graceful); returns the seconds until the master exited."""
        t0 = time.perf_counter()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=timeout)
        return time.perf_counter() - t0


def one_round(sess: requests.Session, base: str, tag: str, k: int, acked: Acked, timeout: float = 10.0) -> None:
    """GET /layout then POST /feedback (2 events) for it; record what was acknowledged."""
    def timed(fn, *a, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            with acked.lock:
                acked.worst_s = max(acked.worst_s, time.perf_counter() - t0)

    try:
        r = timed(sess.get, base + "/layout", params={"user_id": f"{tag}{k % 9}"}, timeout=timeout)
    except BROKEN:
        with acked.lock:
            acked.failed += 1
        return
    with acked.lock:
        acked.statuses[r.status_code] = acked.statuses.get(r.status_code, 0) + 1
    assert r.status_code == 200, r.text
    body = r.json()
    with acked.lock:
        acked.decisions.add(body["request_id"])
    ev = [{"event_id": f"{body['request_id']}:{j}", "slot": j, "type": "impression",
           "item_id": body["modules"][j]["items"][0]["item_id"]} for j in range(2)]
    try:
        f = timed(sess.post, base + "/feedback", json={"request_id": body["request_id"], "events": ev},
                  timeout=timeout)
    except BROKEN:
        with acked.lock:
            acked.failed += 1
        return
    with acked.lock:
        acked.statuses[f.status_code] = acked.statuses.get(f.status_code, 0) + 1
        if f.status_code == 202:
            assert f.json()["accepted"] == 2, f.text
            acked.events.update(e["event_id"] for e in ev)
        else:
            assert f.status_code == 503 and int(f.headers["Retry-After"]) >= 1, (f.status_code, f.text)
            assert f.json()["error"]["code"] == "not_durable"
            acked.refused += 1


def clients(base: str, tag: str, seconds: float, acked: Acked, n_threads: int = 2) -> None:
    """``n_threads`` clients in a closed loop for ``seconds``."""
    stop = time.time() + seconds

    def run(i: int) -> None:
        sess = requests.Session()
        k = 0
        while time.time() < stop:
            one_round(sess, base, f"{tag}{i}-", k, acked)
            k += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def assert_exactly_acknowledged(site: Site, acked: Acked, *, unacked_slack: int = 0) -> None:
    dec, fb = site.wait_rows(acked)
    assert len(fb) == len(set(fb)), "a feedback event stored twice"
    lost_dec, lost_fb = acked.decisions - dec, acked.events - set(fb)
    assert not lost_dec and not lost_fb, (len(lost_dec), len(lost_fb))
    # rows of requests whose answer never arrived (a killed worker) may exist: at most one per failure
    assert len(dec - acked.decisions) + len(set(fb) - acked.events) <= 2 * unacked_slack


def _fill(path: Path) -> None:
    """Append to ``path`` until the filesystem is full."""
    with path.open("ab", buffering=0) as f:
        chunk = b"\0" * 4096
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return


def phase_frozen(site: Site, server: Server, acked: Acked) -> None:
    """PostgreSQL reachable but silent: every request is answered within the deadlines, from memory
    and the journal; the writer notices the stalled flush."""
    site.relay.freeze()
    frozen = Acked()
    probe_worst = 0.0

    def probes() -> None:
        nonlocal probe_worst
        for _ in range(12):
            t0 = time.perf_counter()
            assert requests.get(server.base + "/healthz", timeout=10).status_code == 200
            probe_worst = max(probe_worst, time.perf_counter() - t0)
            time.sleep(0.2)

    prober = threading.Thread(target=probes)
    prober.start()
    clients(server.base, "frozen", 3.0, frozen)
    prober.join()
    stats = [requests.get(server.base + "/readyz", timeout=5).json()["log"] for _ in range(6)]
    site.relay.thaw()
    assert frozen.failed == 0 and frozen.refused == 0 and len(frozen.decisions) >= 10, frozen.statuses
    # HOMEPAGE_DB_DEADLINE_MS bounds the only database read of a request; the rest never waits on it
    assert frozen.worst_s < 1.0 and probe_worst < 1.0, (frozen.worst_s, probe_worst)
    # the writer noticed: stalled while a flush hangs on the silent server, unhealthy both then and once
    # the connection's own timeouts turn the hang into an error (which of the two a probe sees is timing)
    assert any(not s["healthy"] for s in stats) and all(s["stalled"] <= (not s["healthy"]) for s in stats), stats
    acked.decisions |= frozen.decisions
    acked.events |= frozen.events


def phase_kill_9(server: Server, acked: Acked) -> int:
    """Two workers killed with SIGKILL under load; returns the requests whose answer was lost."""
    killed = []

    def killer() -> None:
        for _ in range(2):
            time.sleep(1.0)
            pids = server.workers()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

    k = threading.Thread(target=killer)
    k.start()
    kills = Acked()
    clients(server.base, "kill", 3.0, kills, n_threads=3)
    k.join()
    assert len(killed) == 2 and len(kills.decisions) >= 30, (killed, kills.statuses, server.log())
    acked.decisions |= kills.decisions
    acked.events |= kills.events
    return kills.failed


def phase_cut_then_stop(site: Site, server: Server, acked: Acked) -> None:
    """The database cut (connections reset, new ones refused), then a graceful stop before it is back:
    answered within the deadlines, and the stop does not wait for the database."""
    site.relay.down()
    cut = Acked()
    clients(server.base, "cut", 1.5, cut)
    assert cut.failed == 0 and cut.refused == 0 and cut.worst_s < 1.0, (cut.worst_s, cut.statuses)
    acked.decisions |= cut.decisions
    acked.events |= cut.events
    took = server.stop()
    # HOMEPAGE_SHUTDOWN_FLUSH_S=2, well inside gunicorn's graceful timeout: the master never kills
    assert server.proc.returncode == 0 and took < 8.0, (took, server.log())
    left = [p for p in server.spill.glob("*.jsonl") if not p.name.startswith("rejected-")]
    assert left, "the unflushed rows wait in the journal"


def phase_disk_full(server: Server, acked: Acked) -> None:
    """The journal's disk full: feedback is refused with 503 + Retry-After (nothing acknowledged that
    is not durable), layouts are still served, readiness says so; all recovers with the disk."""
    filler = server.spill / "filler"
    _fill(filler)
    time.sleep(1.5)  # journal segments already written to the database are deleted: fill that too
    full = Acked()
    sess = requests.Session()
    for k in range(10):
        _fill(filler)
        one_round(sess, server.base, "full", k, full)
    ready = [requests.get(server.base + "/readyz", timeout=5) for _ in range(4)]
    assert full.refused == 10 and not full.events and full.statuses[200] == 10, full.statuses
    assert full.worst_s < 1.5, full.worst_s  # HOMEPAGE_JOURNAL_DEADLINE_MS (1 s) at most
    assert all(r.status_code == 503 and r.json()["log"]["durable"] is False for r in ready), ready[0].text
    acked.decisions |= full.decisions  # the database was up: they reached it from memory
    filler.unlink()
    deadline = time.time() + 10
    while requests.get(server.base + "/readyz", timeout=5).status_code != 200:
        assert time.time() < deadline, "readiness did not come back with the disk"
        time.sleep(0.2)
    again = Acked()
    clients(server.base, "again", 0.5, again)
    assert again.refused == 0 and again.events, again.statuses
    acked.decisions |= again.decisions
    acked.events |= again.events


def test_faults_lose_no_acknowledged_row_and_stall_no_request(site: Site) -> None:
    """One server through a frozen database, worker kill -9s, a cut and a graceful stop during it; the
    next server replays the journal, then its journal disk fills up. After each step the database
    holds exactly what was acknowledged."""
    spill = site.tmp / "spill"
    spill.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(spill)],
                             capture_output=True).returncode == 0  # a real full disk needs root
    site.env["HOMEPAGE_SPILL_DIR"] = str(spill)
    servers: list[Server] = []
    try:
        servers.append(server := Server(site))
        acked = Acked()
        clients(server.base, "warm", 0.5, acked)
        phase_frozen(site, server, acked)
        lost_answers = phase_kill_9(server, acked)
        assert_exactly_acknowledged(site, acked, unacked_slack=lost_answers)
        phase_cut_then_stop(site, server, acked)
        site.relay.up()
        servers.append(server := Server(site, "next"))  # whichever process starts next replays
        assert_exactly_acknowledged(site, acked, unacked_slack=lost_answers)
        if mounted:
            phase_disk_full(server, acked)
            assert_exactly_acknowledged(site, acked, unacked_slack=lost_answers)
    finally:
        site.relay.thaw()
        for sv in servers:
            sv.stop()
        if mounted:
            subprocess.run(["umount", "-l", str(spill)], capture_output=True)
    if not mounted:
        pytest.skip("the full-disk phase needs a tmpfs mount (root); every other phase passed")
