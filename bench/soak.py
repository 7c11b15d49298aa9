"""Soak: ``homepage serve`` (gunicorn, 2 workers, the loop beside them) under a steady load with
feedback for N minutes, then the slow-client run.

1. Capacity: closed-loop clients (4 threads) for 15 s, each doing ``GET /layout`` then
   ``POST /feedback`` (2 events) for it; capacity = rounds/s.
2. Soak: an open-loop client at 80 % of that capacity for ``--minutes`` (latency counts from each
   request's scheduled send time). Per minute: rounds, errors (anything but 200/202, or no answer),
   p50/p99 of layout and feedback, and the summed RSS of the gunicorn workers (from /proc).
3. Slow clients: 8 connections that send their request headers one byte per second while normal
   clients run at 50 % of capacity for 30 s: p99 of the normal clients.
4. Rows lost: the server is stopped gracefully, a fresh writer replays whatever the journal still
   holds (as the next process would), and the acknowledged decisions and events are looked up in the
   database: lost = acknowledged and absent; duplicated = stored more than once.

SQLite in a temporary folder by default; ``--database-url`` for PostgreSQL. Prints JSON lines.

    .venv/bin/python bench/soak.py [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import sqlalchemy as sa

from policy_api.log import LogWriter, make_engine
from simulator import make_world


def emit(**kw: Any) -> None:
    kw["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(kw), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def workers_rss_mb(master: int) -> float:
    return round(sum(per_worker_rss_mb(master)), 1)


def per_worker_rss_mb(master: int) -> list[float]:
    """RSS of each gunicorn worker of ``master`` (children with its command line), in MB."""
    own = Path(f"/proc/{master}/cmdline").read_bytes()
    out: list[float] = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == master and (p / "cmdline").read_bytes() == own:
                for line in (p / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out.append(round(int(line.split()[1]) / 1024, 1))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


class Ledger:
    """What the server acknowledged, and each request's outcome."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decisions: set[str] = set()
        self.events: set[str] = set()
        self.records: list[tuple[float, str, float, bool]] = []  # (time, kind, latency s, ok)


def one_round(sess: requests.Session, base: str, user: str, due: float, led: Ledger) -> None:
    ok, lat, rid = False, float("nan"), None
    try:
        r = sess.get(base + "/layout", params={"user_id": user}, timeout=10)
        lat = time.perf_counter() - due
        ok = r.status_code == 200
        if ok:
            body = r.json()
            rid = body["request_id"]
    except requests.RequestException:
        lat = time.perf_counter() - due
    with led.lock:
        led.records.append((time.time(), "layout", lat, ok))
        if rid is not None:
            led.decisions.add(rid)
    if rid is None:
        return
    ev = [{"event_id": f"{rid}:{j}", "slot": j, "type": "play",
           "item_id": body["modules"][j]["items"][0]["item_id"]} for j in range(2)]
    t1 = time.perf_counter()
    ok = False
    try:
        f = sess.post(base + "/feedback", json={"request_id": rid, "events": ev}, timeout=10)
        ok = f.status_code == 202
    except requests.RequestException:
        pass
    with led.lock:
        led.records.append((time.time(), "feedback", time.perf_counter() - t1, ok))
        if ok:
            led.events.update(e["event_id"] for e in ev)


def closed_loop(base: str, users: list[str], seconds: float, threads: int, led: Ledger) -> float:
    stop = time.perf_counter() + seconds
    done = [0] * threads

    def run(t: int) -> None:
        sess = requests.Session()
        k = t
        while time.perf_counter() < stop:
            one_round(sess, base, users[k % len(users)], time.perf_counter(), led)
            done[t] += 1
            k += threads

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return sum(done) / seconds


def open_loop(base: str, users: list[str], rate: float, seconds: float, led: Ledger, threads: int = 16) -> None:
    n = int(rate * seconds)
    start = time.perf_counter() + 0.2

    def run(t: int) -> None:
        sess = requests.Session()
        for k in range(t, n, threads):
            due = start + k / rate
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            one_round(sess, base, users[k % len(users)], due, led)

    ths = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()


def slow_client(port: int, stop: threading.Event) -> None:
    """Sends a request's headers one byte per second until ``stop`` (or the server hangs up)."""
    data = b"GET /layout?user_id=slow HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 4000
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            for b in data:
                if stop.is_set():
                    return
                s.sendall(bytes([b]))
                time.sleep(1.0)
    except OSError:
        return


def pct(values: list[float], q: float) -> float | None:
    v = [x for x in values if x == x]
    return round(float(np.percentile(v, q)) * 1e3, 2) if v else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the soak at 80 %% of capacity")
    ap.add_argument("--database-url", default=None, help="PostgreSQL URL (default: SQLite in a temp folder)")
    ap.add_argument("--slow-seconds", type=float, default=30.0)
    args = ap.parse_args()

    world = make_world(n_users=2000, n_items=3000, seed=0)
    users = [str(u) for u in world.user_ids]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        url = args.database_url or f"sqlite:///{d / 'h.db'}"
        env = dict(os.environ, DATABASE_URL=url, HOMEPAGE_DATA_DIR=str(d), HOMEPAGE_CONFIG=str(d / "homepage.toml"))
        (d / "homepage.toml").write_text(world.default_config_toml())
        world.to_catalog_csv(d / "items.csv")
        subprocess.run([sys.executable, "-m", "policy_api.cli", "catalog", "load", str(d / "items.csv")], env=env,
                       cwd=d, check=True, capture_output=True)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "policy_api.cli", "serve", "--port", str(port),
                                 "--workers", "2"], env=env, cwd=d, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        led = Ledger()
        try:
            for _ in range(600):
                try:
                    if requests.get(base + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.2)
            closed_loop(base, users, 3.0, 2, Ledger())  # warm-up
            capacity = closed_loop(base, users, 15.0, 4, led)
            emit(bench="soak_capacity", rounds_per_s=round(capacity, 1),
                 note="1 round = GET /layout + POST /feedback (2 events), closed loop, 4 client threads")

            rate = 0.8 * capacity
            minutes = max(1, round(args.minutes))
            for m in range(minutes):
                t0 = time.time()
                open_loop(base, users, rate, args.minutes * 60 / minutes, led)
                rec = [r for r in led.records if r[0] >= t0]
                lay = [r[2] for r in rec if r[1] == "layout"]
                fb = [r[2] for r in rec if r[1] == "feedback"]
                emit(bench="soak_minute", minute=m + 1, offered_rounds_per_s=round(rate, 1), rounds=len(lay),
                     errors=sum(1 for r in rec if not r[3]), layout_p50_ms=pct(lay, 50), layout_p99_ms=pct(lay, 99),
                     feedback_p99_ms=pct(fb, 99), workers_rss_mb=workers_rss_mb(proc.pid),
                     per_worker_rss_mb=per_worker_rss_mb(proc.pid))

            stop = threading.Event()
            slow = [threading.Thread(target=slow_client, args=(port, stop), daemon=True) for _ in range(8)]
            for th in slow:
                th.start()
            time.sleep(2.0)
            t0 = time.time()
            open_loop(base, users, 0.5 * capacity, args.slow_seconds, led)
            stop.set()
            rec = [r for r in led.records if r[0] >= t0]
            lay = [r[2] for r in rec if r[1] == "layout"]
            emit(bench="soak_slow_clients", slow_connections=8, offered_rounds_per_s=round(0.5 * capacity, 1),
                 rounds=len(lay), errors=sum(1 for r in rec if not r[3]), layout_p50_ms=pct(lay, 50),
                 layout_p99_ms=pct(lay, 99), feedback_p99_ms=pct([r[2] for r in rec if r[1] == "feedback"], 99))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

        engine = make_engine(url)
        with LogWriter(engine, d / "spill", durable=True) as writer:  # the next process's replay
            writer.flush(timeout=60, replay=True)
        with engine.connect() as c:
            dec = [r[0] for r in c.execute(sa.text("SELECT request_id FROM decisions"))]
            evs = [r[0] for r in c.execute(sa.text("SELECT event_id FROM feedback"))]
        engine.dispose()
        emit(bench="soak_rows", acknowledged_decisions=len(led.decisions), acknowledged_events=len(led.events),
             lost_decisions=len(led.decisions - set(dec)), lost_events=len(led.events - set(evs)),
             duplicated=(len(dec) - len(set(dec))) + (len(evs) - len(set(evs))))


if __name__ == "__main__":
    main()
